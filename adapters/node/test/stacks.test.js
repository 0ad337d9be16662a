'use strict'
// Holder stacks (lib/stacks.js): what a capture becomes once formatted, the
// switches, and reportPool()'s stacks. The pg and mysql pools' stacks are
// tested in pool.test.js and mysql.test.js.

const test = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')
const vm = require('node:vm')
const { spawnSync } = require('node:child_process')

const { reportPool } = require('../lib/index')
const stacks = require('../lib/stacks')
const { Receiver, collect, eventually } = require('./helpers')

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const kinds = (messages) => messages.map((m) => m.kind)
const STACK_AFTER_MS = 150

/** A capture of the caller's stack, as the hooks make it, but with room
 * for `frames` frames. */
function captureWith(frames, hook = captureWith) {
  const limit = Error.stackTraceLimit
  const holder = {}
  Error.stackTraceLimit = frames
  Error.captureStackTrace(holder, hook)
  Error.stackTraceLimit = limit
  return holder
}

/** `fn(take)` run in a script of its own file name. */
function inFile(filename, source) {
  return vm.runInThisContext(source, { filename })
}

test('stacks: on by default, off with POOLSCOPE_ADAPTER_STACKS=off, 0 or false; stack_after from the environment', () => {
  assert.equal(stacks.stacksFromEnv({}), true)
  for (const v of ['on', '1', 'true', '', 'yes']) assert.equal(stacks.stacksFromEnv({ POOLSCOPE_ADAPTER_STACKS: v }), true, v)
  for (const v of ['off', 'OFF', '0', 'false', ' False ']) assert.equal(stacks.stacksFromEnv({ POOLSCOPE_ADAPTER_STACKS: v }), false, v)
  assert.equal(stacks.stackAfterFromEnv({}), 1000)
  assert.equal(stacks.stackAfterFromEnv({ POOLSCOPE_ADAPTER_STACK_AFTER_MS: '250' }), 250)
  assert.equal(stacks.stackAfterFromEnv({ POOLSCOPE_ADAPTER_STACK_AFTER_MS: '0' }), 0)
  assert.equal(stacks.stackAfterFromEnv({ POOLSCOPE_ADAPTER_STACK_AFTER_MS: 'soon' }), 1000)
  assert.equal(stacks.stackAfterFromEnv({ POOLSCOPE_ADAPTER_STACK_AFTER_MS: '-5' }), 1000)
})

test('stacks: the capture interval from POOLSCOPE_ADAPTER_STACK_INTERVAL_US, whole microseconds, else 1000', () => {
  assert.equal(stacks.DEFAULT_STACK_INTERVAL_US, 1000)
  assert.equal(stacks.stackIntervalFromEnv({}), 1000)
  const env = (v) => stacks.stackIntervalFromEnv({ POOLSCOPE_ADAPTER_STACK_INTERVAL_US: v })
  assert.equal(env('0'), 0)
  assert.equal(env('250'), 250)
  assert.equal(env(' 20000 '), 20000)
  for (const v of ['', ' ', 'soon', '-5', '1.5', '1e400', '0x10q', 'NaN']) assert.equal(env(v), 1000, JSON.stringify(v))
})

test('stacks: captureDue lets one capture through per interval, process-wide; 0 lets every one through', async () => {
  stacks.lastCapture.ms = -Infinity
  let due = 0
  for (let i = 0; i < 100; i++) if (stacks.captureDue(10)) due += 1
  assert.equal(due, 1, 'the first of 100 immediate ones')
  await sleep(15)
  assert.equal(stacks.captureDue(10), true, 'the next one past the interval')
  assert.equal(stacks.captureDue(10), false)
  // Another interval reads the same last capture.
  assert.equal(stacks.captureDue(60_000), false)
  due = 0
  for (let i = 0; i < 100; i++) if (stacks.captureDue(0)) due += 1
  assert.equal(due, 100)
})

test('stacks: a capture is formatted innermost first, from the application\'s first frame, at most 32 frames', () => {
  // The application calls the pool library, which calls the hook.
  const hook = function theHook() {
    return captureWith(100, theHook)
  }
  const library = inFile(
    '/srv/app/node_modules/pg-pool/index.js',
    '(function poolConnect(hook) { return (function poolInner() { return hook() })() })'
  )
  const recurse = inFile('/srv/app/reports.js', '(function leakyReport(n, f) { return n === 0 ? f() : leakyReport(n - 1, f) })')
  const holder = recurse(50, () => library(hook))
  const frames = stacks.formatStack(holder)
  assert.equal(frames.length, 32)
  assert.match(frames[0], /^\/work\/|stacks\.test\.js/, 'the arrow that called the library')
  assert.match(frames[1], /^leakyReport \(\/srv\/app\/reports\.js:1:\d+\)$/)
  assert.ok(!frames.some((f) => f.includes('node_modules') || f.includes('theHook')), JSON.stringify(frames))
  // An ORM's frames above the application's are left out too; with no
  // frame of the application's own, the stack starts at the ORM's.
  const orm = inFile('/srv/app/node_modules/knex/lib/runner.js', '(function ensureConnection(lib, hook) { return lib(hook) })')
  const service = inFile('/srv/app/orders.js', '(function listOrders(orm, lib, hook) { return orm(lib, hook) })')
  const viaOrm = stacks.formatStack(service(orm, library, hook))
  assert.match(viaOrm[0], /^listOrders \(\/srv\/app\/orders\.js:1:\d+\)$/, JSON.stringify(viaOrm))
  const framework = inFile('/srv/app/node_modules/express/lib/router.js', '(function handle(orm, lib, hook) { return orm(lib, hook) })')
  const fourFrames = function fourFrames() {
    return captureWith(4, fourFrames)
  }
  const onlyPackages = stacks.formatStack(framework(orm, library, fourFrames))
  assert.deepEqual(
    onlyPackages.map((f) => f.split(' ')[0]),
    ['ensureConnection', 'handle'],
    JSON.stringify(onlyPackages)
  )
  // Nothing is left out when no frame is the application's.
  const only = library(() => captureWith(5))
  assert.ok(stacks.formatStack(only).length >= 1)
  // stackSkip: more files counted as the pool's.
  const skipped = stacks.formatStack(recurse(2, () => library(hook)), stacks.skipOption(/stacks\.test\.js$/g))
  assert.match(skipped[0], /^leakyReport /)
  assert.equal(stacks.formatStack(null), null)
})

test('stacks: frames are cut at 256 characters and lose their control characters and lone surrogates', () => {
  const file = `/srv/${'x'.repeat(300)}\u0000\n\u009b\ud800.js`
  const f = inFile(file, '(function take(c) { return c() })')
  const [, frame] = stacks.formatStack(f(() => captureWith(10)))
  assert.equal(Array.from(frame).length, 256)
  assert.match(frame, /^take \(\/srv\/x+$/)
  const g = inFile('/srv/a\tb\u2028\ud800c.js', '(function take(c) { return c() })')
  const short = stacks.formatStack(g(() => captureWith(10)))
  assert.match(short[1], /^take \(\/srv\/a\?b\u2028\ufffdc\.js:1:\d+\)$/, JSON.stringify(short))
  // Emoji (surrogate pairs) are characters, never cut in half.
  const h = inFile(`/srv/${'😀'.repeat(300)}.js`, '(function take(c) { return c() })')
  const [, emoji] = stacks.formatStack(h(() => captureWith(10)))
  assert.equal(Array.from(emoji).length, 256)
  assert.ok(!/[\ud800-\udbff]$/.test(emoji))
})

test('stacks: an application\'s Error.prepareStackTrace that cannot be set aside: its V8-style text is read', (t) => {
  const before = Object.getOwnPropertyDescriptor(Error, 'prepareStackTrace')
  t.after(() => {
    if (before === undefined) delete Error.prepareStackTrace
    else Object.defineProperty(Error, 'prepareStackTrace', before)
  })
  const f = inFile('/srv/app/jobs.js', '(function nightlyJob(c) { return c() })')
  Object.defineProperty(Error, 'prepareStackTrace', {
    value: (err, sites) => `Error\n${sites.map((s) => `    at ${s}`).join('\n')}`,
    writable: false,
    configurable: true,
  })
  const frames = stacks.formatStack(f(() => captureWith(10)))
  assert.match(frames[1], /^nightlyJob \(\/srv\/app\/jobs\.js:1:\d+\)$/, JSON.stringify(frames))
})

function setup(t, options = {}) {
  const rx = new Receiver()
  t.after(() => rx.close())
  // (Every checkout captures, unless a test says otherwise.)
  const report = reportPool(
    Object.assign({ name: 'handles', dbSystem: 'sqlite', max: 2, socketPath: rx.path, stackAfterMs: STACK_AFTER_MS, stackIntervalUs: 0 }, options)
  )
  t.after(() => report.stop())
  return { rx, report }
}

async function borrowAHandleAndKeepIt(report, handle) {
  const waiting = report.acquire()
  await sleep(10) // the pool's own wait
  waiting.ok(handle)
  return handle
}

test('generic: a handle held past stackAfterMs sends the stack of the code that asked for it, once', async (t) => {
  const { rx, report } = setup(t)
  const handle = { handle: 'a' }
  report.connectionCreated(handle)
  await rx.messages()
  await borrowAHandleAndKeepIt(report, handle)
  await sleep(STACK_AFTER_MS + 350)
  const m = (await rx.drain()).map((x) => x.json)
  assert.deepEqual(kinds(m), ['acquire_end', 'holder_stack'])
  const [end, sent] = m
  assert.equal(sent.conn, end.conn)
  assert.equal(sent.since_ns, end.mono_ns)
  assert.match(sent.stack[0], /^borrowAHandleAndKeepIt \(.*stacks\.test\.js:\d+:\d+\)$/, JSON.stringify(sent.stack))
  assert.ok(!sent.stack.some((f) => f.includes(path.join(__dirname, '..', 'lib'))))
  await sleep(STACK_AFTER_MS)
  assert.deepEqual(await rx.messages(), [])
  report.released(handle)
  // A short one: nothing.
  await borrowAHandleAndKeepIt(report, handle)
  report.released(handle)
  await sleep(STACK_AFTER_MS + 100)
  const after = await rx.messages()
  assert.ok(after.some((x) => x.kind === 'release'), JSON.stringify(after))
  assert.ok(!after.some((x) => x.kind === 'holder_stack'), JSON.stringify(after))
})

test('generic: a sent stack goes again after every checkout_state (a comeback, the periodic state) while its checkout is out', async (t) => {
  const { rx, report } = setup(t)
  const handle = { handle: 'r' }
  const other = { handle: 's' }
  report.connectionCreated(handle)
  report.connectionCreated(other)
  await rx.messages()
  await borrowAHandleAndKeepIt(report, handle)
  await sleep(STACK_AFTER_MS + 350)
  const [end, sent] = (await rx.drain()).map((x) => x.json)
  assert.deepEqual([end.kind, sent.kind], ['acquire_end', 'holder_stack'])
  // Another checkout, its stack not due yet (a minute from now): none of
  // its own.
  report.reporter.stackAfterMs = 60_000
  report.acquire().ok(other)
  // The agent restarts: the state, then the stack, as sent before.
  await rx.stop()
  await eventually(() => report.stats().connected === false)
  await rx.listen()
  // (The other checkout's acquire_start and acquire_end waited too.)
  const m = (await collect(rx, 5)).filter((x) => !x.kind.startsWith('acquire_'))
  assert.deepEqual(kinds(m), ['pool', 'checkout_state', 'holder_stack'])
  assert.deepEqual(m[1].checkouts.map((c) => c.conn), [end.conn, 2])
  assert.deepEqual([m[2].conn, m[2].since_ns, m[2].stack], [sent.conn, sent.since_ns, sent.stack])
  assert.equal(m[1].checkouts[0].mono_ns, sent.since_ns)
  // The periodic state: the same again.
  report.reporter.sendState()
  const again = await collect(rx, 3)
  assert.deepEqual(kinds(again), ['pool', 'checkout_state', 'holder_stack'])
  assert.deepEqual([again[2].conn, again[2].since_ns, again[2].stack], [sent.conn, sent.since_ns, sent.stack])
  // Released: its frames are dropped, a later state sends no stack for it.
  report.released(handle)
  report.released(other)
  await rx.messages()
  assert.equal(report.reporter.handles.get(handle).sentFrames, null)
  await borrowAHandleAndKeepIt(report, handle)
  report.reporter.sendState()
  const later = (await rx.drain()).map((x) => x.json)
  // (Its new checkout's acquire_end, held for the batch, comes after.)
  assert.deepEqual(kinds(later), ['pool', 'checkout_state', 'acquire_end'], JSON.stringify(later))
  report.released(handle)
})

test('generic: with an interval, of many checkouts in a row only the first captures; one past the interval captures again', async (t) => {
  const { rx, report } = setup(t, { stackIntervalUs: 50_000 })
  const handle = { handle: 'i' }
  report.connectionCreated(handle)
  await sleep(60)
  let captured = 0
  for (let i = 0; i < 100; i++) {
    const waiting = report.acquire()
    if (waiting.stack !== null) captured += 1
    waiting.ok(handle)
    report.released(handle)
  }
  assert.equal(captured, 1)
  await sleep(60)
  const next = report.acquire()
  assert.notEqual(next.stack, null, 'past the interval')
  next.ok(handle)
  report.released(handle)
  await rx.messages()
  // An uncaptured checkout held long (another pool's, whose interval of a
  // minute counts from that last capture): its acquire_end, no holder_stack.
  const other = setup(t, { name: 'handles-2', stackIntervalUs: 60_000_000 })
  const otherHandle = { handle: 'k' }
  other.report.connectionCreated(otherHandle)
  await other.rx.messages()
  const held = other.report.acquire()
  assert.equal(held.stack, null)
  held.ok(otherHandle)
  await sleep(STACK_AFTER_MS + 350)
  const m = (await other.rx.drain()).map((x) => x.json)
  assert.deepEqual(kinds(m), ['acquire_end'], JSON.stringify(m))
  other.report.released(otherHandle)
})

test('generic: interval 0 captures at every checkout; the interval comes from the environment by default', async (t) => {
  const { report } = setup(t, { stackIntervalUs: 0 })
  const handle = { handle: 'j' }
  report.connectionCreated(handle)
  let captured = 0
  for (let i = 0; i < 100; i++) {
    const waiting = report.acquire()
    if (waiting.stack !== null) captured += 1
    waiting.ok(handle)
    report.released(handle)
  }
  assert.equal(captured, 100)
  const before = process.env.POOLSCOPE_ADAPTER_STACK_INTERVAL_US
  t.after(() => {
    if (before === undefined) delete process.env.POOLSCOPE_ADAPTER_STACK_INTERVAL_US
    else process.env.POOLSCOPE_ADAPTER_STACK_INTERVAL_US = before
  })
  process.env.POOLSCOPE_ADAPTER_STACK_INTERVAL_US = '2500'
  assert.equal(setup(t, { stackIntervalUs: undefined }).report.reporter.stackIntervalMs, 2.5)
  assert.equal(setup(t, { stackIntervalUs: 'often' }).report.reporter.stackIntervalMs, 2.5, 'an invalid option: the environment\'s')
  delete process.env.POOLSCOPE_ADAPTER_STACK_INTERVAL_US
  assert.equal(setup(t, { stackIntervalUs: undefined }).report.reporter.stackIntervalMs, 1)
  assert.equal(setup(t, { stackIntervalUs: 40 }).report.reporter.stackIntervalMs, 0.04)
})

test('generic: stackSkip leaves out the application\'s own pool code', async (t) => {
  const { rx, report } = setup(t, { stackSkip: /handle_pool\.js$/ })
  const handlePool = inFile('/srv/app/handle_pool.js', '(function checkout(report, handle) { const w = report.acquire(); w.ok(handle); return handle })')
  const handle = { handle: 'b' }
  function serveARequest() {
    return handlePool(report, handle)
  }
  serveARequest()
  await sleep(STACK_AFTER_MS + 350)
  const [sent] = (await rx.messages()).filter((x) => x.kind === 'holder_stack')
  assert.match(sent.stack[0], /^serveARequest \(/, JSON.stringify(sent.stack))
  report.released(handle)
})

test('generic: a holder_stack line too long for the protocol loses its outer frames', async (t) => {
  const { rx, report } = setup(t, { stackAfterMs: 60_000 })
  const handle = { handle: 'c' }
  report.connectionCreated(handle)
  report.acquire().ok(handle)
  await rx.messages()
  // 32 frames of 256 characters each (more than 4096 bytes in all).
  const recurse = inFile(`/srv/app/${'long/'.repeat(60)}.js`, '(function deeper(n, f) { return n === 0 ? f() : deeper(n - 1, f) })')
  const holder = recurse(40, () => captureWith(100))
  assert.equal(stacks.formatStack(holder).length, 32)
  const conn = report.reporter.handles.get(handle)
  report.reporter.sendStack(conn, holder)
  const [line] = (await rx.drain()).filter((x) => x.json.kind === 'holder_stack')
  assert.ok(Buffer.byteLength(line.text) <= 4096, `${Buffer.byteLength(line.text)} bytes`)
  assert.ok(line.json.stack.length >= 10 && line.json.stack.length < 32, `${line.json.stack.length} frames`)
  assert.deepEqual(line.json.stack, stacks.formatStack(holder).slice(0, line.json.stack.length), 'the innermost ones kept')
  report.released(handle)
})

test('stacks: a held checkout\'s stack timer does not keep the process alive', () => {
  const rx = new Receiver({ golden: false })
  try {
    const script = `
      const { reportPool } = require(${JSON.stringify(path.join(__dirname, '..', 'lib', 'index'))})
      const report = reportPool({ name: 'h', socketPath: ${JSON.stringify(rx.path)} })
      const handle = {}
      report.connectionCreated(handle)
      report.acquire().ok(handle)
      setTimeout(() => {
        process.stdout.write(String(report.reporter.stackTimer !== null))
      }, 200)
    `
    const started = Date.now()
    const child = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 10_000 })
    assert.equal(child.status, 0, child.stderr)
    assert.equal(child.stdout, 'true', 'the timer was set')
    assert.ok(Date.now() - started < 900, `exited ${Date.now() - started} ms after it started, not at stack_after`)
  } finally {
    rx.close()
  }
})
