'use strict'
const test = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')

const { Sender, encode, socketPathFromEnv, senderFor, DEFAULT_SOCKET, MAX_MESSAGE_BYTES } = require('../lib/sender')
const adapter = require('../lib/index')
const { Receiver, eventually, queueLength } = require('./helpers')

test('the native sender is built and loaded', () => {
  assert.equal(adapter.available, true, `native sender missing: ${adapter.nativeError}`)
})

test('one datagram per message, named by the kernel with our pid', (t) => {
  const rx = new Receiver({ golden: false })
  t.after(() => rx.close())
  const sender = new Sender(rx.path)
  assert.equal(sender.send({ v: 1, kind: 'release', pool: 'p', fd: 7 }, 123n), true)
  assert.equal(sender.send({ v: 1, kind: 'release', pool: 'p', fd: 8 }, 124n), true)
  const got = rx.drain()
  assert.equal(got.length, 2)
  assert.equal(got[0].pid, process.pid)
  assert.equal(got[0].text, '{"v":1,"kind":"release","pool":"p","fd":7,"mono_ns":123}')
  assert.deepEqual(got[1].json, { v: 1, kind: 'release', pool: 'p', fd: 8, mono_ns: 124 })
  assert.equal(got[0].json.pid, undefined, 'adapters leave pid out')
  assert.deepEqual(sender.stats(), { active: true, socket: rx.path, sent: 2, dropped: 0, deferred: 0, waiting: 0, lastError: 0, comebacks: 0 })
  sender.close()
})

test('mono_ns is process.hrtime.bigint() written in full, even past 2^53', (t) => {
  const rx = new Receiver({ golden: false })
  t.after(() => rx.close())
  const sender = new Sender(rx.path)
  const before = process.hrtime.bigint()
  sender.send({ v: 1, kind: 'acquire_start', pool: 'p', request: 1 })
  const after = process.hrtime.bigint()
  const [m] = rx.drain()
  const stamped = BigInt(/"mono_ns":(\d+)}$/.exec(m.text)[1])
  assert.ok(stamped >= before && stamped <= after)
  const huge = 2n ** 60n + 1n
  assert.match(encode({ v: 1 }, huge).toString(), /^\{"v":1,"mono_ns":1152921504606846977\}$/)
  assert.equal(encode({ v: 1 }, undefined).toString(), '{"v":1}')
  sender.close()
})

test('CLOCK_MONOTONIC: hrtime agrees with the kernel uptime clock', () => {
  // /proc/uptime counts CLOCK_BOOTTIME, which is CLOCK_MONOTONIC plus time
  // spent suspended: hrtime may not be ahead of it.
  const uptimeS = Number(require('node:fs').readFileSync('/proc/uptime', 'utf8').split(' ')[0])
  const hrtimeS = Number(process.hrtime.bigint()) / 1e9
  assert.ok(hrtimeS <= uptimeS + 1, `hrtime ${hrtimeS}s vs uptime ${uptimeS}s`)
})

test('no agent: sends are dropped and counted, nothing throws', () => {
  const sender = new Sender(path.join(require('node:os').tmpdir(), `no-agent-${process.pid}`, 'adapter.sock'))
  assert.equal(sender.send({ v: 1, kind: 'release', pool: 'p', fd: 1 }), false)
  assert.equal(sender.stats().dropped, 1)
  assert.ok(sender.stats().lastError < 0)
  const tooLong = new Sender('/tmp/' + 'x'.repeat(200))
  assert.equal(tooLong.send({ v: 1 }), false)
  sender.close()
  tooLong.close()
})

test('oversized messages are dropped, not sent', (t) => {
  const rx = new Receiver({ golden: false })
  t.after(() => rx.close())
  const sender = new Sender(rx.path)
  assert.equal(sender.send({ v: 1, kind: 'pool', pool: 'p', library: 'x'.repeat(MAX_MESSAGE_BYTES) }), false)
  assert.equal(rx.drain().length, 0)
  sender.close()
})

test('a full agent queue: messages wait in order, bounded, and never block', async (t) => {
  const rx = new Receiver({ golden: false })
  const total = queueLength() + 500
  t.after(() => rx.close())
  const sender = new Sender(rx.path, { maxBacklog: 100 })
  const started = Date.now()
  for (let i = 0; i < total; i++) sender.send({ v: 1, kind: 'release', pool: 'p', fd: i })
  assert.ok(Date.now() - started < 2000, 'never blocks')
  const s = sender.stats()
  assert.equal(s.waiting, 100, 'the backlog is bounded')
  assert.ok(s.dropped >= 1, `the queue filled up (net.unix.max_dgram_qlen): ${JSON.stringify(s)}`)
  assert.equal(s.sent + s.waiting + s.dropped, total)
  // The agent reads: what waited follows, in the order it was sent.
  const got = []
  await eventually(() => {
    got.push(...rx.messages())
    return sender.stats().waiting === 0 && got.length === s.sent + 100
  })
  const fds = got.map((m) => m.fd)
  assert.deepEqual(fds, [...fds].sort((a, b) => a - b), 'in order')
  assert.equal(sender.stats().dropped, s.dropped, 'nothing more dropped')
  // Once it has caught up, sends go straight out again.
  assert.equal(sender.send({ v: 1, kind: 'release', pool: 'p', fd: 1000 }), true)
  assert.equal(sender.stats().waiting, 0)
  assert.deepEqual(rx.messages().map((m) => m.fd), [1000])
  sender.close()
})

test('what waits is retried while the application sits idle', async (t) => {
  // A process whose event loop has nothing to do but wait (here for a long
  // timer, as an app waits for requests): the backlog must still drain as
  // the agent makes room, without any activity of the application.
  const rx = new Receiver({ golden: false })
  const total = queueLength() + 300
  t.after(() => rx.close())
  const { spawn } = require('node:child_process')
  const sender = require.resolve('../lib/sender')
  const child = spawn(
    process.execPath,
    [
      '-e',
      `const { Sender } = require(${JSON.stringify(sender)})
       const s = new Sender(process.argv[1])
       for (let i = 0; i < Number(process.argv[2]); i++) s.send({ v: 1, kind: 'release', pool: 'p', fd: i })
       process.stdout.write(JSON.stringify(s.stats()) + '\\n')
       setTimeout(() => {}, 60000)`,
      rx.path,
      String(total),
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] }
  )
  t.after(() => child.kill())
  const first = await new Promise((resolve) => child.stdout.once('data', (d) => resolve(JSON.parse(d))))
  assert.ok(first.waiting > 0, `the burst filled the queue: ${JSON.stringify(first)}`)
  const got = []
  // Read slowly, a few at a time, as a busy agent would.
  await eventually(() => {
    const m = rx.messages()
    got.push(...m)
    return got.length === total
  }, 10000)
  assert.deepEqual(
    got.map((m) => m.fd),
    Array.from({ length: total }, (_, i) => i)
  )
})

test('a backlog does not keep the process alive and is dropped on close', (t) => {
  const rx = new Receiver({ golden: false })
  const total = queueLength() + 50
  t.after(() => rx.close())
  const sender = new Sender(rx.path)
  for (let i = 0; i < total; i++) sender.send({ v: 1, kind: 'release', pool: 'p', fd: i })
  assert.ok(sender.stats().waiting > 0)
  assert.equal(sender.retry.hasRef(), false, 'the retry timer is unref()ed')
  sender.close()
  assert.equal(sender.stats().waiting, 0)
  assert.equal(sender.stats().sent + sender.stats().dropped, total)
})

test('if the agent goes away, what waits is dropped, not kept', async () => {
  const rx = new Receiver({ golden: false })
  const total = queueLength() + 50
  const sender = new Sender(rx.path)
  for (let i = 0; i < total; i++) sender.send({ v: 1, kind: 'release', pool: 'p', fd: i })
  assert.ok(sender.stats().waiting > 0)
  rx.close()
  await eventually(() => sender.stats().waiting === 0)
  assert.equal(sender.stats().sent + sender.stats().dropped, total)
  assert.ok(sender.stats().lastError !== -11, 'dropped for the missing socket')
  sender.close()
})

test('an agent that stays stuck: the backlog is given up, new sends go on', async (t) => {
  const rx = new Receiver({ golden: false })
  const total = queueLength() + 20
  t.after(() => rx.close())
  const sender = new Sender(rx.path, { giveUpMs: 50 })
  for (let i = 0; i < total; i++) sender.send({ v: 1, kind: 'release', pool: 'p', fd: i })
  const waited = sender.stats().waiting
  assert.ok(waited > 0)
  // Nobody reads: after giveUpMs without progress, what waits is dropped.
  await eventually(() => sender.stats().waiting === 0, 2000)
  assert.equal(sender.stats().dropped, waited)
  assert.equal(sender.retry, null, 'no timer left behind')
  // The agent reads again: new messages are sent as usual.
  const queued = rx.messages().length
  assert.equal(queued, total - waited)
  assert.equal(sender.send({ v: 1, kind: 'release', pool: 'p', fd: 9999 }), true)
  assert.deepEqual(rx.messages().map((m) => m.fd), [9999])
  sender.close()
})

test('socket path: POOLSCOPE_ADAPTER_SOCKET, else the default', () => {
  assert.equal(DEFAULT_SOCKET, '/run/poolscope/adapter.sock')
  assert.equal(socketPathFromEnv({}), DEFAULT_SOCKET)
  assert.equal(socketPathFromEnv({ POOLSCOPE_ADAPTER_SOCKET: '' }), DEFAULT_SOCKET)
  assert.equal(socketPathFromEnv({ POOLSCOPE_ADAPTER_SOCKET: '/tmp/a.sock' }), '/tmp/a.sock')
  assert.equal(senderFor('/tmp/a.sock'), senderFor('/tmp/a.sock'), 'one sender per path')
})
