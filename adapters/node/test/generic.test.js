'use strict'
// reportPool(): a pool the application keeps itself, reported from its own
// code, its connections named by the ids the reporter gives them.

const test = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')

const { reportPool } = require('../lib/index')
const { Receiver, registration, silentTcpServer } = require('./helpers')

const kinds = (messages) => messages.map((m) => m.kind)

function setup(t, options = {}) {
  const rx = new Receiver()
  t.after(() => rx.close())
  const report = reportPool(
    Object.assign(
      { name: 'handles', dbSystem: 'sqlite', serverAddress: '/tmp/app.db', max: 2, library: 'handle_pool', socketPath: rx.path },
      options,
    ),
  )
  t.after(() => report.stop())
  return { rx, report }
}

test('generic: the registration says what the pool declared', async (t) => {
  const { rx } = setup(t, { namespace: 'main', minIdle: 1 })
  assert.deepEqual(await registration(rx), {
    v: 1,
    kind: 'pool',
    pool: 'handles',
    db_system: 'sqlite',
    server_address: '/tmp/app.db',
    namespace: 'main',
    max: 2,
    min_idle: 1,
    library: 'handle_pool',
  })
})

test('generic: handles are named by their ids through a checkout, a timeout and a close', async (t) => {
  const { rx, report } = setup(t)
  await rx.messages()
  const a = { handle: 'a' }
  const b = { handle: 'b' }
  report.connectionCreated(a)
  report.connectionCreated(b)
  const waiting = report.acquire()
  waiting.ok(b)
  await new Promise((resolve) => setTimeout(resolve, 30))
  report.released(b)
  report.acquire().timeout()
  report.connectionClosed(a)
  report.connectionClosed(a) // twice: sent once
  // In the order they happened: a short checkout leaves folded, with the
  // batch, after what was sent at once.
  const m = (await rx.messages()).sort((x, y) => x.mono_ns - y.mono_ns)
  assert.deepEqual(
    m.map((x) => [x.kind, x.conn, x.result]),
    [
      ['connection_created', 1, undefined],
      ['connection_created', 2, undefined],
      ['acquire_start', undefined, undefined],
      ['acquire_end', 2, 'ok'],
      ['release', 2, undefined],
      ['acquire_start', undefined, undefined],
      ['acquire_end', undefined, 'timeout'],
      ['connection_closed', 1, undefined],
    ],
  )
  assert.equal(m[3].tid, process.pid, 'the event loop thread holds it')
  assert.equal(m[3].fd, undefined, 'a handle has no socket')
  assert.ok(m[4].mono_ns - m[3].mono_ns >= 25e6, 'the use is timed')
})

test('generic: a handle whose socket the pool names is sent with both', async (t) => {
  const port = await silentTcpServer(t)
  const { rx, report } = setup(t)
  await rx.messages()
  const socket = net.connect(port, '127.0.0.1')
  t.after(() => socket.destroy())
  await new Promise((resolve) => socket.once('connect', resolve))
  const handle = {}
  report.connectionCreated(handle, socket)
  const [created] = await rx.messages()
  assert.deepEqual(created.conn, 1)
  assert.equal(created.local_address, `127.0.0.1:${socket.localPort}`)
  assert.equal(created.fd, socket._handle.fd)
})

test('generic: the checkouts re-sent after a comeback name handles by id', async (t) => {
  const { rx, report } = setup(t)
  report.acquire().ok({})
  const held = {}
  report.acquire().ok(held)
  await rx.messages()
  const lines = report.reporter.stateLines().map((b) => JSON.parse(b.toString()))
  assert.deepEqual(
    lines.flatMap((l) => l.checkouts.map((c) => c.conn)),
    [1, 2],
  )
})

test('generic: bad input is left out and never throws', async (t) => {
  const { rx, report } = setup(t, { dbSystem: 'SQL Server', max: -3 })
  const reg = await registration(rx)
  assert.equal(reg.db_system, undefined)
  assert.equal(reg.max, undefined)
  for (const handle of [null, undefined, 7, 'text']) {
    report.connectionCreated(handle)
    report.acquire().ok(handle)
    report.released(handle)
    report.connectionClosed(handle)
  }
  const m = await rx.messages()
  assert.deepEqual(
    kinds(m).filter((k) => k !== 'acquire_start'),
    ['acquire_end', 'acquire_end', 'acquire_end', 'acquire_end'],
    'an acquire whose handle cannot be named ends without one',
  )
})
