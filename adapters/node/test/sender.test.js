'use strict'
// The stream sender against a listening Unix stream socket in a temp dir (as
// the agent binds it): lines, order, the bounded backlog while there is no
// agent, reconnecting, the bound on Node's write buffer, and never keeping
// a process alive.

const test = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const os = require('node:os')
const path = require('node:path')
const { spawn } = require('node:child_process')

const { Sender, encode, socketPathFromEnv, senderFor, DEFAULT_SOCKET, MAX_BACKLOG, MAX_MESSAGE_BYTES, monoNsAt, clockMs, MONO_BASE_SLACK_NS } = require('../lib/sender')
const adapter = require('../lib/index')
const { MAX_IDLE_CONNS } = require('../lib/common')
const { Receiver, collect, eventually } = require('./helpers')

const SENDER = require.resolve('../lib/sender')
const fast = { reconnectDelaysMs: [10, 20, 40], stableMs: 100 }
const release = (fd) => ({ v: 1, kind: 'release', pool: 'p', fd })
/** A pool reporter over `sender`, with a fixed registration. */
function testReporter(sender, name) {
  const { Reporter } = require('../lib/common')
  class TestReporter extends Reporter {
    registration() {
      return { db_system: 'postgresql', max: 4 }
    }
  }
  return new TestReporter({}, { sender, name }, 'p')
}
const nowhere = () => path.join(os.tmpdir(), `poolscope-absent-${process.pid}-${Math.random()}`, 'adapter-stream.sock')

/** Runs `code` in a child node with `args`; resolves with { code, ms, stdout }. */
function runChild(code, args, timeoutMs = 10000) {
  const started = Date.now()
  const child = spawn(process.execPath, ['-e', code, ...args], { stdio: ['ignore', 'pipe', 'inherit'] })
  let stdout = ''
  child.stdout.on('data', (d) => (stdout += d))
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.on('exit', (code, signal) => {
      clearTimeout(timer)
      resolve({ code, signal, ms: Date.now() - started, stdout })
    })
  })
}

test('pure JavaScript: nothing to build, always available', () => {
  assert.equal(adapter.available, true)
  assert.equal(new Sender(nowhere()).active, true)
})

test('one line per message on one stream, in order, without pid', async (t) => {
  const rx = new Receiver({ golden: false })
  t.after(() => rx.close())
  const sender = new Sender(rx.path, fast)
  t.after(() => sender.close())
  assert.equal(sender.send(release(7), 123n), true)
  assert.equal(sender.send(release(8), 124n), true)
  const got = await rx.drain([sender])
  assert.deepEqual(got.map((m) => m.text), [
    '{"v":1,"kind":"release","pool":"p","fd":7,"mono_ns":123}',
    '{"v":1,"kind":"release","pool":"p","fd":8,"mono_ns":124}',
  ])
  assert.equal(got[0].json.pid, undefined, 'adapters leave pid out: the agent names the stream')
  assert.equal(rx.accepted, 1, 'one stream')
  for (let i = 0; i < 500; i++) sender.send(release(i))
  const more = await rx.messages([sender])
  assert.deepEqual(more.map((m) => m.fd), Array.from({ length: 500 }, (_, i) => i))
  assert.equal(rx.accepted, 1)
  const s = sender.stats()
  assert.equal(s.connected, true)
  assert.equal(s.sent, 502)
  assert.equal(s.dropped, 0)
  assert.equal(s.comebacks, 0, 'the first connection is not a comeback')
})

test('mono_ns is CLOCK_MONOTONIC (process.hrtime.bigint(), within the clock base\'s slack) written in full, even past 2^53', async (t) => {
  const rx = new Receiver({ golden: false })
  t.after(() => rx.close())
  const sender = new Sender(rx.path, fast)
  t.after(() => sender.close())
  const before = process.hrtime.bigint()
  sender.send({ v: 1, kind: 'acquire_start', pool: 'p', request: 1 })
  const after = process.hrtime.bigint()
  const [m] = await rx.drain([sender])
  const stamped = BigInt(/"mono_ns":(\d+)}$/.exec(m.text)[1])
  const slack = BigInt(MONO_BASE_SLACK_NS)
  assert.ok(slack < 50_000n, `the adapter's clock is within ${slack} ns of CLOCK_MONOTONIC`)
  assert.ok(stamped >= before - slack && stamped <= after + slack, `${before} <= ${stamped} <= ${after} (slack ${slack})`)
  const huge = 2n ** 60n + 1n
  assert.match(encode({ v: 1 }, huge).toString(), /^\{"v":1,"mono_ns":1152921504606846977\}$/)
  assert.equal(encode({ v: 1 }, undefined).toString(), '{"v":1}')
  assert.equal(encode({ v: 1, pool: 'a\nb' }).toString(), '{"v":1,"pool":"a\\nb"}', 'a newline in a value cannot cut the line')
})

test('CLOCK_MONOTONIC: hrtime agrees with the kernel uptime clock', () => {
  // /proc/uptime counts CLOCK_BOOTTIME, which is CLOCK_MONOTONIC plus time
  // spent suspended: hrtime may not be ahead of it.
  const uptimeS = Number(require('node:fs').readFileSync('/proc/uptime', 'utf8').split(' ')[0])
  const hrtimeS = Number(process.hrtime.bigint()) / 1e9
  assert.ok(hrtimeS <= uptimeS + 1, `hrtime ${hrtimeS}s vs uptime ${uptimeS}s`)
})

test('no agent: messages wait in a bounded backlog, the rest are dropped and counted, nothing throws', async () => {
  const sender = new Sender(nowhere(), { maxBacklog: 100, ...fast })
  const started = Date.now()
  for (let i = 0; i < 150; i++) assert.equal(sender.send(release(i)), i < 100)
  assert.ok(Date.now() - started < 1000, 'never blocks')
  let s = sender.stats()
  assert.deepEqual([s.sent, s.waiting, s.dropped, s.deferred], [0, 100, 50, 100])
  await eventually(() => sender.stats().lastError === 'ENOENT')
  assert.notEqual(sender.reconnectTimer, null, 'retrying')
  assert.equal(sender.reconnectTimer.hasRef(), false, 'the retry timer is unref()ed')
  assert.equal(new Sender('/tmp/' + 'x'.repeat(200), fast).send(release(1)), true, 'a bad path queues, never throws')
  sender.close()
  s = sender.stats()
  assert.deepEqual([s.waiting, s.dropped], [0, 150], 'closing drops what waits, counted')
  assert.equal(sender.reconnectTimer, null)
})

test('oversized messages are dropped, a 4096-byte one is sent', async (t) => {
  const rx = new Receiver({ golden: false })
  t.after(() => rx.close())
  const sender = new Sender(rx.path, fast)
  t.after(() => sender.close())
  assert.equal(sender.sendBytes(Buffer.alloc(MAX_MESSAGE_BYTES + 1, 'x')), false)
  const head = '{"v":1,"kind":"pool","pool":"p","library":"'
  const exact = head + 'x'.repeat(MAX_MESSAGE_BYTES - head.length - 2) + '"}'
  assert.equal(Buffer.byteLength(exact), MAX_MESSAGE_BYTES)
  assert.equal(sender.sendBytes(Buffer.from(exact)), true)
  const got = await rx.drain([sender])
  assert.deepEqual(got.map((m) => m.text), [exact])
  assert.equal(sender.stats().dropped, 1)
})

test('an agent that starts later gets what waited, in order, with its times; a comeback is counted', async (t) => {
  const dir = require('node:fs').mkdtempSync(path.join(os.tmpdir(), 'poolscope-late-'))
  t.after(() => require('node:fs').rmSync(dir, { recursive: true, force: true }))
  const socketPath = path.join(dir, 'adapter-stream.sock')
  const sender = new Sender(socketPath, fast)
  t.after(() => sender.close())
  let comebacks = 0
  sender.onComeback(() => (comebacks += 1))
  for (let i = 0; i < 20; i++) sender.send(release(i), BigInt(1000 + i))
  await eventually(() => sender.stats().lastError === 'ENOENT')
  // The agent starts: bind where the sender looks.
  const server = net.createServer()
  const lines = []
  server.on('connection', (s) => {
    let partial = ''
    s.setEncoding('utf8')
    s.on('data', (c) => {
      const parts = (partial + c).split('\n')
      partial = parts.pop()
      lines.push(...parts)
    })
  })
  await new Promise((resolve) => server.listen(socketPath, resolve))
  t.after(() => server.close())
  await eventually(() => lines.length === 20, 3000)
  assert.deepEqual(
    lines.map((l) => JSON.parse(l)),
    Array.from({ length: 20 }, (_, i) => ({ ...release(i), mono_ns: 1000 + i }))
  )
  assert.equal(comebacks, 1, 'listeners are told (pools re-send their state)')
  await eventually(() => sender.stats().comebacks === 1, 3000)
  assert.equal(sender.stats().waiting, 0)
})

test('an agent that restarts: the sender reconnects with a backoff and keeps the order', async (t) => {
  const rx = new Receiver({ golden: false })
  t.after(() => rx.close())
  const sender = new Sender(rx.path, fast)
  t.after(() => sender.close())
  for (let i = 0; i < 10; i++) sender.send(release(i))
  assert.deepEqual((await rx.messages([sender])).map((m) => m.fd), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
  await rx.stop()
  await eventually(() => !sender.stats().connected)
  for (let i = 10; i < 20; i++) sender.send(release(i))
  assert.equal(sender.stats().waiting, 10)
  // A few failed attempts while the agent is away, further apart each time.
  await eventually(() => sender.failures >= 3)
  await rx.listen()
  const got = await collect(rx, 10)
  assert.deepEqual(got.map((m) => m.fd), [10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
  await eventually(() => sender.stats().comebacks === 1, 3000)
  const s = sender.stats()
  assert.deepEqual([s.connects, s.disconnects >= 1, s.comebacks, s.dropped], [2, true, 1, 0])
  // An idle sender whose agent restarts reconnects by itself while a pool
  // would re-send its state (so that it does, without waiting for the
  // application's next event).
  const off = sender.onComeback(() => sender.send(release(99)))
  await rx.stop()
  await rx.listen()
  await eventually(() => sender.stats().comebacks === 2, 3000)
  assert.deepEqual((await collect(rx, 1)).map((m) => m.fd), [99])
  // With nothing to say it opens no stream (the agent closes silent ones);
  // the next message connects.
  off()
  await rx.stop()
  await eventually(() => !sender.stats().connected)
  await rx.listen()
  const connects = sender.stats().connects
  await new Promise((resolve) => setTimeout(resolve, 300))
  assert.equal(sender.stats().connects, connects, 'no stream with nothing to say')
  sender.send(release(100))
  assert.deepEqual((await collect(rx, 1)).map((m) => m.fd), [100])
})

test("an agent that stops reading: Node's write buffer stays bounded, sends never block", async (t) => {
  const dir = require('node:fs').mkdtempSync(path.join(os.tmpdir(), 'poolscope-stuck-'))
  t.after(() => require('node:fs').rmSync(dir, { recursive: true, force: true }))
  const socketPath = path.join(dir, 'adapter-stream.sock')
  const streams = []
  const server = net.createServer((s) => {
    s.pause() // accepts, never reads
    streams.push(s)
  })
  await new Promise((resolve) => server.listen(socketPath, resolve))
  t.after(() => {
    for (const s of streams) s.destroy()
    server.close()
  })
  const limit = 64 * 1024
  const sender = new Sender(socketPath, { maxWritableBytes: limit, ...fast })
  t.after(() => sender.close())
  sender.send(release(0))
  await eventually(() => sender.stats().connected)
  const big = { v: 1, kind: 'pool', pool: 'p', library: 'x'.repeat(1000) }
  const started = Date.now()
  let i = 0
  for (; i < 20000 && sender.stats().dropped === 0; i++) sender.send(big)
  assert.ok(Date.now() - started < 2000, 'never blocks')
  const s = sender.stats()
  assert.ok(s.dropped >= 1, `the socket's buffers filled up after ${i} messages: ${JSON.stringify(s)}`)
  assert.ok(s.buffered <= limit, `Node buffers at most ${limit} bytes: ${JSON.stringify(s)}`)
})

test('the sender never keeps a process alive, connected or not', async (t) => {
  const rx = new Receiver({ golden: false })
  t.after(() => rx.close())
  const code = `const { Sender } = require(${JSON.stringify(SENDER)})
    const s = new Sender(process.argv[1])
    for (let i = 0; i < 5; i++) s.send({ v: 1, kind: 'release', pool: 'p', fd: i })
    setTimeout(() => process.stdout.write(JSON.stringify(s.stats())), 300)`
  const connected = await runChild(code, [rx.path])
  assert.equal(connected.code, 0)
  assert.ok(connected.ms < 5000, `exited by itself after ${connected.ms} ms`)
  assert.equal(JSON.parse(connected.stdout).sent, 5)
  const absent = await runChild(code, [nowhere()])
  assert.equal(absent.code, 0)
  assert.ok(absent.ms < 5000, `exited by itself after ${absent.ms} ms`)
  assert.equal(JSON.parse(absent.stdout).waiting, 5)
})

test('a backlog no agent took for giveUpMs is given up', async () => {
  const sender = new Sender(nowhere(), { giveUpMs: 50, ...fast })
  for (let i = 0; i < 5; i++) sender.send(release(i))
  await new Promise((resolve) => setTimeout(resolve, 120))
  sender.send(release(5))
  const s = sender.stats()
  assert.deepEqual([s.waiting, s.dropped], [1, 5])
  sender.close()
})

test('socket path: POOLSCOPE_ADAPTER_STREAM_SOCKET, else the default', () => {
  assert.equal(DEFAULT_SOCKET, '/run/poolscope/adapter-stream.sock')
  assert.equal(socketPathFromEnv({}), DEFAULT_SOCKET)
  assert.equal(socketPathFromEnv({ POOLSCOPE_ADAPTER_STREAM_SOCKET: '' }), DEFAULT_SOCKET)
  assert.equal(socketPathFromEnv({ POOLSCOPE_ADAPTER_STREAM_SOCKET: '/tmp/a.sock' }), '/tmp/a.sock')
  assert.equal(socketPathFromEnv({ POOLSCOPE_ADAPTER_SOCKET: '/tmp/d.sock' }), DEFAULT_SOCKET, 'the datagram path is not the stream path')
  assert.equal(senderFor('/tmp/a.sock'), senderFor('/tmp/a.sock'), 'one sender per path')
  senderFor('/tmp/a.sock').close()
})

test('an agent that closes every stream at accept (its stream limit): a few connects with backoff, no spin, sends never block', async (t) => {
  const dir = require('node:fs').mkdtempSync(path.join(os.tmpdir(), 'poolscope-refused-'))
  t.after(() => require('node:fs').rmSync(dir, { recursive: true, force: true }))
  const socketPath = path.join(dir, 'adapter-stream.sock')
  let accepted = 0
  const server = net.createServer((s) => {
    accepted += 1
    s.on('error', () => {})
    s.destroy()
  })
  await new Promise((resolve) => server.listen(socketPath, resolve))
  t.after(() => server.close())
  // The real delays and stable time, as an application has them.
  const sender = new Sender(socketPath)
  t.after(() => sender.close())
  let states = 0
  sender.onComeback(() => {
    states += 1
    sender.send({ v: 1, kind: 'pool', pool: 'p' })
  })
  const started = Date.now()
  let slowest = 0
  while (Date.now() - started < 2000) {
    const before = process.hrtime.bigint()
    assert.equal(typeof sender.send(release(1)), 'boolean', 'never throws')
    slowest = Math.max(slowest, Number(process.hrtime.bigint() - before))
    await new Promise((resolve) => setTimeout(resolve, 2))
  }
  const s = sender.stats()
  assert.ok(s.connects >= 2 && s.connects <= 6, `a handful of connects in 2 s, not one per 50 ms: ${JSON.stringify(s)}`)
  assert.ok(accepted <= 6, `accepted ${accepted}`)
  assert.ok(states <= 6, `the state re-sent ${states} times`)
  assert.equal(s.comebacks, 0, 'a stream closed at once is no comeback')
  assert.ok(s.waiting <= MAX_BACKLOG, 'bounded')
  assert.ok(slowest < 50e6, `send never blocks: slowest ${slowest} ns`)
})

test('after a comeback the state comes first, then what waited, in order', async (t) => {
  const rx = new Receiver({ golden: false })
  t.after(() => rx.close())
  const sender = new Sender(rx.path, fast)
  t.after(() => sender.close())
  const reporter = testReporter(sender, 'p')
  reporter.start(0)
  t.after(() => reporter.stop())
  const sinceMs = 1234.5
  reporter.checkedOut(reporter.connOf({ local_address: '10.0.0.7:51234', fd: 12 }), sinceMs, 81233)
  assert.deepEqual((await rx.messages([sender])).map((m) => m.kind), ['pool'])
  await rx.stop()
  await eventually(() => !sender.stats().connected)
  for (let i = 0; i < 5; i++) sender.send(release(i), BigInt(2000 + i))
  await eventually(() => sender.failures >= 1)
  await rx.listen()
  const got = await collect(rx, 7)
  assert.deepEqual(got.map((m) => m.kind), ['pool', 'checkout_state', 'release', 'release', 'release', 'release', 'release'])
  assert.deepEqual(got[1].checkouts, [{ local_address: '10.0.0.7:51234', fd: 12, tid: 81233, mono_ns: Number(monoNsAt(sinceMs)) }])
  assert.deepEqual(got.slice(2).map((m) => [m.fd, m.mono_ns]), [0, 1, 2, 3, 4].map((i) => [i, 2000 + i]))
  await eventually(() => sender.stats().comebacks === 1, 3000)
})

test('checkout_state lines fit in 4096 bytes: 64 IPv6 checkouts, a 128-character non-ASCII pool name', () => {
  const lines = []
  const fake = { send: () => true, sendBytes: (b) => (lines.push(b), true), stats: () => ({}) }
  const name = '😀'.repeat(64) + 'é中'.repeat(32)
  assert.equal(Array.from(name).length, 128)
  const reporter = testReporter(fake, name)
  assert.equal(reporter.name, name, 'not cut')
  const want = []
  for (let i = 0; i < 64; i++) {
    const address = `[fd12:3456:789a:bcde:f012:3456:789a:${i.toString(16).padStart(4, '0')}]:${60000 + i}`
    want.push(address)
    // Handed out 30 years into the machine's uptime: mono_ns past 2^53.
    reporter.checkedOut(reporter.connOf({ local_address: address, fd: 1000 + i }), 1e12 + i, 4194304)
  }
  reporter.sendState()
  assert.ok(lines.length > 2, `${lines.length} lines: split by bytes, not only by 32 entries`)
  const got = []
  for (const line of lines) {
    assert.ok(line.length <= MAX_MESSAGE_BYTES, `a line of ${line.length} bytes`)
    const m = JSON.parse(line.toString('utf8'))
    assert.equal(m.kind, 'checkout_state')
    assert.equal(m.pool, name)
    assert.ok(m.checkouts.length >= 1 && m.checkouts.length <= 32)
    got.push(...m.checkouts.map((c) => c.local_address))
  }
  assert.deepEqual(got, want, 'every checkout, oldest first')
})

test('putUint writes the digits String() writes, for Numbers up to 2^53 and BigInts up to 2^64', () => {
  const { putUint } = require('../lib/sender')
  const values = [0, 1, 9, 10, 99, 100, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 7, 999999999999, 10 ** 15, Number.MAX_SAFE_INTEGER]
  for (let i = 0; i < 2000; i++) values.push(Math.floor(Math.random() * 2 ** Math.floor(Math.random() * 53)))
  const big = [0n, 7n, 2n ** 53n, 2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n, 123456789012345678n]
  const buf = Buffer.alloc(64)
  for (const n of [...values, ...big]) {
    const end = putUint(buf, 3, n)
    assert.equal(buf.toString('latin1', 3, end), n.toString(), `digits of ${n}`)
  }
})

test('folded checkouts written as bytes read back exactly, waiting for the agent or batched, with a non-ASCII pool name', async (t) => {
  const rx = new Receiver()
  t.after(() => rx.close())
  const sender = new Sender(rx.path, fast)
  t.after(() => sender.close())
  const name = 'zahlungen-€-😀'
  const reporter = testReporter(sender, name)
  const entry = reporter.connOf({ local_address: '[fd00::1]:5432', fd: 31 })
  const big = Number.MAX_SAFE_INTEGER
  // Ended 104 days into the machine's uptime: mono_ns past 2^53.
  const lateMs = 2 ** 53 / 1e6 + 12
  // Not connected yet: the line waits in the backlog.
  assert.equal(sender.stats().connected, false)
  assert.ok(reporter.fold(entry, 1500, 250000, 4321, lateMs - 1))
  assert.ok(reporter.fold(entry, 0, big, 4322, lateMs))
  assert.ok(reporter.sendFolded(entry))
  assert.equal(entry.folded, 0, 'sent, then forgotten')
  await eventually(() => sender.stats().connected)
  // Connected: straight into the batch; 64 at most per line.
  for (let i = 0; i < 65; i++) reporter.fold(entry, i, 2 * i, 0, 123.456789)
  assert.equal(entry.folded, 1, 'the 64th sent its line at once')
  assert.ok(reporter.sendFolded(entry))
  const lines = await rx.drain([sender])
  assert.equal(lines.length, 3)
  // Past 2^53 the numbers are written in full (JSON.parse would round them).
  assert.ok(monoNsAt(lateMs) > 2n ** 53n)
  assert.ok(lines[0].text.endsWith(`"waits_ns":[1500,0],"uses_ns":[250000,${big}],"mono_ns":${monoNsAt(lateMs)}}`), lines[0].text)
  const got = lines.map((l) => l.json)
  assert.deepEqual(
    [got[0].kind, got[0].pool, got[0].local_address, got[0].fd, got[0].tid, got[0].request],
    ['checkouts', name, '[fd00::1]:5432', 31, 4322, undefined]
  )
  assert.deepEqual(got[1].waits_ns, [...Array(64).keys()])
  assert.deepEqual(got[1].uses_ns, [...Array(64).keys()].map((i) => 2 * i))
  assert.equal(got[1].tid, undefined)
  assert.deepEqual([got[2].waits_ns, got[2].uses_ns, got[2].mono_ns], [[64], [128], Number(monoNsAt(123.456789))])
  assert.equal(sender.stats().dropped, 0)
})

test('a checkout written as bytes reads as the message it stands for, waiting for the agent or batched, with a non-ASCII pool name', async (t) => {
  const rx = new Receiver()
  t.after(() => rx.close())
  const sender = new Sender(rx.path, fast)
  t.after(() => sender.close())
  const name = 'zahlungen-€-😀'
  const reporter = testReporter(sender, name)
  const conn = reporter.connOf({ local_address: '[fd00::1]:5432', fd: 31 })
  // Not connected yet: the line waits in the backlog.
  assert.equal(sender.stats().connected, false)
  assert.ok(reporter.sendCheckout(7, conn, 4321, 1500, 250000, 2n ** 53n + 11n))
  await eventually(() => sender.stats().connected)
  // Connected: straight into the batch (no tid, no wait: its start was sent).
  assert.ok(reporter.sendCheckout(2 ** 40, conn, 0, -1, 0, 123456789n))
  const lines = await rx.drain([sender])
  assert.equal(lines.length, 2)
  const got = lines.map((l) => l.json)
  // Past 2^53 the time is written in full (JSON.parse would round it).
  assert.ok(lines[0].text.endsWith(`,"mono_ns":${2n ** 53n + 11n}}`), lines[0].text)
  delete got[0].mono_ns
  assert.deepEqual(got[0], {
    v: 1, kind: 'checkout', pool: name, request: 7, local_address: '[fd00::1]:5432', fd: 31,
    tid: 4321, wait_ns: 1500, use_ns: 250000,
  })
  assert.deepEqual(got[1], {
    v: 1, kind: 'checkout', pool: name, request: 2 ** 40, local_address: '[fd00::1]:5432', fd: 31,
    use_ns: 0, mono_ns: 123456789,
  })
  assert.equal(sender.stats().dropped, 0)
})

/** A registered reporter whose batches leave when the test says
 * (`sender._batchTime()`, what the interval's tick does): its batch period
 * is far longer than the test. */
async function withOwnBatches(t) {
  const rx = new Receiver()
  t.after(() => rx.close())
  const sender = new Sender(rx.path, { ...fast, batchMs: 60_000 })
  t.after(() => sender.close())
  const reporter = testReporter(sender, 'p')
  reporter.register()
  await eventually(() => sender.stats().connected)
  return { rx, sender, reporter }
}

test('a checkout handed out less than a batch ago stays held through the batch and folds; an older one, or any with a waiter, is sent', async (t) => {
  const { rx, sender, reporter } = await withOwnBatches(t)
  sender._batchTime()
  assert.deepEqual((await rx.drain([sender])).map((l) => l.json.kind), ['pool'])
  const young = reporter.connOf({ local_address: '127.0.0.1:40001', fd: 41 })
  const old = reporter.connOf({ local_address: '127.0.0.1:40002', fd: 42 })
  const now = clockMs()
  reporter.handedOut(reporter.acquireStart(7), young, 7, now)
  reporter.handedOut(reporter.acquireStart(8), old, 8, now - 120_000)
  sender._batchTime()
  assert.ok(reporter.pendingScheduled && sender.stats().batching, 'the young one waits for the next batch')
  assert.notEqual(young.heldRequest, 0)
  assert.equal(old.heldRequest, 0)
  reporter.releasedConnection(young, true)
  sender._batchTime()
  let got = (await rx.drain([sender])).map((l) => l.json)
  assert.deepEqual(got.map((m) => [m.kind, m.fd]), [['acquire_end', 42], ['checkouts', 41]], 'the old one at once, the young one folded')
  assert.equal(got[1].waits_ns.length, 1)
  // With a waiter, every held checkout goes before it, however young.
  reporter.handedOut(reporter.acquireStart(7), young, 7, clockMs())
  const waiter = reporter.acquireStart(9)
  sender._batchTime()
  got = (await rx.drain([sender])).map((l) => l.json)
  assert.deepEqual(got.map((m) => [m.kind, m.fd, m.request]), [['acquire_end', 41, got[0].request], ['acquire_start', undefined, waiter.request]])
})

test('idle connections past the bound are forgotten at a batch; one still out is kept, one seen again is new', async (t) => {
  const { rx, sender, reporter } = await withOwnBatches(t)
  // A pool whose closes go unseen while its connections' ports change.
  const n = MAX_IDLE_CONNS + 100
  for (let i = 0; i < n; i++) {
    const conn = reporter.connOf({ local_address: `127.0.0.1:${20000 + i}`, fd: 100 + i })
    reporter.handedOut(reporter.acquireStart(7), conn, 7, clockMs())
    reporter.releasedConnection(conn, true)
  }
  const out = reporter.connOf({ local_address: '127.0.0.1:40100', fd: 99 })
  reporter.handedOut(reporter.acquireStart(7), out, 7, clockMs() - 120_000)
  sender._batchTime()
  const got = (await rx.drain([sender])).map((l) => l.json)
  assert.equal(got.filter((m) => m.kind === 'checkouts').length, n, 'every folded checkout sent first')
  assert.equal(reporter.conns.size, 1, 'the idle ones forgotten, the one out kept')
  assert.equal(reporter.conns.values().next().value, out)
  const again = reporter.connOf({ local_address: '127.0.0.1:20005', fd: 105 })
  assert.equal(again.live, true)
  assert.equal(reporter.conns.size, 2)
})
