'use strict'
// instrument() on a real pg.Pool (pg-pool underneath) whose clients are
// fakes with real TCP sockets to a local server: the pool's own event order,
// the sockets' real local addresses and fds, and no PostgreSQL needed.

const test = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const { EventEmitter } = require('node:events')
const { Pool } = require('pg')

const { instrument, stats, _internal } = require('../lib/index')
const { monotonicNs } = require('../lib/sender')
const { Receiver, busyFor, assertFailedAcquire, collect, registration, silentTcpServer, eventually, GOLDEN, checkGoldenShape, checkedKinds } = require('./helpers')

/** Enough of pg.Client for pg-pool: connect, query, end, and a socket. */
function fakeClientClass(port, behaviour = {}) {
  return class FakeClient extends EventEmitter {
    constructor(options) {
      super()
      // Where pg would say it connects (the fake really connects to `port`).
      this.host = options.host || 'localhost'
      this.port = options.port || 5432
      this.database = options.database || 'postgres'
      this._queryable = true
      this._ending = false
    }

    connect(cb) {
      if (behaviour.failConnect) {
        setImmediate(() => cb(new Error('connection refused (fake)')))
        return
      }
      const stream = net.connect(port, '127.0.0.1')
      this.connection = { stream }
      stream.once('connect', () => cb())
      stream.once('error', (err) => cb(err))
    }

    query(text, values, cb) {
      if (typeof values === 'function') cb = values
      const answer = () => cb(undefined, { rows: [] })
      if (behaviour.queryMs > 0) setTimeout(answer, behaviour.queryMs)
      else setImmediate(answer)
    }

    end(cb) {
      this._ending = true
      this._queryable = false
      const stream = this.connection && this.connection.stream
      if (!stream || stream.destroyed) {
        if (cb) setImmediate(cb)
        return
      }
      stream.once('close', () => {
        this.emit('end')
        if (cb) cb()
      })
      stream.destroy()
    }

    ref() {}
    unref() {}
  }
}

async function setup(t, poolOptions = {}, behaviour = {}, instrumentOptions = {}) {
  const port = await silentTcpServer(t)
  const rx = new Receiver()
  t.after(() => rx.close())
  const pool = new Pool(
    Object.assign(
      { host: '127.0.0.1', port: 5432, database: 'shop', max: 2, Client: fakeClientClass(port, behaviour) },
      poolOptions
    )
  )
  instrument(pool, Object.assign({ name: 'orders', socketPath: rx.path }, instrumentOptions))
  return { pool, rx }
}

const kinds = (messages) => messages.map((m) => m.kind)

test('registration names the pool, its server and its limits', async (t) => {
  const { pool, rx } = await setup(t, { max: 4, min: 1 })
  assert.deepEqual(await registration(rx), {
    v: 1,
    kind: 'pool',
    pool: 'orders',
    db_system: 'postgresql',
    server_address: '127.0.0.1',
    server_port: 5432,
    library: 'node-postgres',
    namespace: 'shop',
    max: 4,
    min_idle: 1,
  })
  assert.equal(stats(pool).pool, 'orders')
  await pool.end()
})

test('acquire, release and close, in order, naming the real socket', async (t) => {
  const { pool, rx } = await setup(t)
  await rx.messages() // registration
  const client = await pool.connect()
  const stream = client.connection.stream
  const conn = { local_address: `${stream.localAddress}:${stream.localPort}`, fd: stream._handle.fd }
  assert.ok(conn.fd > 2)
  let m = await rx.messages()
  assert.deepEqual(kinds(m), ['acquire_start', 'connection_created', 'acquire_end'])
  assert.equal(m[0].request, 1)
  assert.deepEqual({ local_address: m[1].local_address, fd: m[1].fd }, conn)
  assert.equal(m[2].request, 1)
  assert.equal(m[2].result, 'ok')
  assert.deepEqual({ local_address: m[2].local_address, fd: m[2].fd }, conn)
  assert.ok(m[2].mono_ns >= m[0].mono_ns)
  assert.equal(m[2].tid, undefined, 'no tid from Node')

  client.release()
  m = await rx.messages()
  assert.deepEqual(kinds(m), ['release'])
  assert.deepEqual({ local_address: m[0].local_address, fd: m[0].fd }, conn)

  // The idle client is handed out again: no new connection.
  const again = await pool.connect()
  assert.equal(again, client)
  m = await rx.messages()
  assert.deepEqual(kinds(m), ['acquire_start', 'acquire_end'])
  assert.equal(m[0].request, 2)
  assert.equal(m[1].request, 2)
  again.release()
  await rx.messages()

  await pool.end()
  m = await collect(rx, 1)
  assert.deepEqual(kinds(m), ['connection_closed'])
  assert.deepEqual({ local_address: m[0].local_address, fd: m[0].fd }, conn, 'named as it was while open')
})

test('the first connection corrects what the options guessed', async (t) => {
  const { pool, rx } = await setup(t, { host: undefined, port: undefined, database: undefined })
  assert.equal((await rx.messages())[0].server_address, 'localhost')
  await pool.query('SELECT 1')
  const m = await rx.messages()
  assert.deepEqual(kinds(m), ['acquire_start', 'pool', 'connection_created', 'acquire_end', 'release'])
  assert.equal(m[1].namespace, 'postgres', 'the database the client used')
  await pool.query('SELECT 1')
  assert.deepEqual(kinds(await rx.messages()), ['acquire_start', 'acquire_end', 'release'], 'only once')
  await pool.end()
})

test('callback style, done() and pool.query are all seen', async (t) => {
  const { pool, rx } = await setup(t)
  await rx.messages()
  await new Promise((resolve, reject) => {
    pool.connect((err, client, done) => {
      if (err) return reject(err)
      done()
      resolve()
    })
  })
  assert.deepEqual(kinds(await rx.messages()), ['acquire_start', 'connection_created', 'acquire_end', 'release'])
  await pool.query('SELECT 1')
  assert.deepEqual(kinds(await rx.messages()), ['acquire_start', 'acquire_end', 'release'])
  await new Promise((resolve) => pool.query('SELECT 1', [], resolve))
  assert.deepEqual(kinds(await rx.messages()), ['acquire_start', 'acquire_end', 'release'])
  await pool.end()
})

test('a waiter gets its own request id and its wait is measured', async (t) => {
  const { pool, rx } = await setup(t, { max: 1 })
  await rx.messages()
  const first = await pool.connect()
  await rx.messages()
  const waiting = pool.connect()
  assert.equal(pool.waitingCount, 1)
  let m = await rx.messages()
  assert.deepEqual(kinds(m), ['acquire_start'])
  const start = m[0]
  assert.equal(start.folded, undefined, 'sent while it waits: the agent sees it pending')
  await new Promise((resolve) => setTimeout(resolve, 50))
  first.release()
  const second = await waiting
  m = (await rx.drain()).map((x) => x.json)
  assert.deepEqual(kinds(m), ['release', 'acquire_end'])
  assert.equal(m[1].request, start.request)
  assert.equal(m[1].wait_ns, undefined, 'its start was sent')
  assert.ok(m[1].mono_ns - start.mono_ns >= 45e6, 'waited about 50 ms')
  second.release()
  await pool.end()
})

test('an acquire that finds an idle client is one message: its acquire_end with the wait', async (t) => {
  const { pool, rx } = await setup(t)
  await rx.messages()
  ;(await pool.connect()).release()
  await rx.messages()
  const before = monotonicNs()
  const client = await pool.connect()
  const after = monotonicNs()
  const m = (await rx.drain()).map((x) => x.json)
  assert.deepEqual(kinds(m), ['acquire_end'])
  assert.equal(m[0].result, 'ok')
  assert.ok(Number.isInteger(m[0].wait_ns) && m[0].wait_ns >= 0, JSON.stringify(m[0]))
  assert.ok(BigInt(m[0].wait_ns) <= after - before, 'no longer than connect() took')
  assert.ok(BigInt(m[0].mono_ns) >= before && BigInt(m[0].mono_ns) <= after)
  client.release()
  await pool.end()
})

test('an acquire served from an idle client within its turn has no wait: the rest of the turn is the caller\'s own time', async (t) => {
  const { pool, rx } = await setup(t, { max: 2 })
  await rx.messages()
  ;(await pool.connect()).release()
  await rx.messages()
  const pending = pool.connect()
  // A second caller in the same turn finds the one idle client taken: it
  // waits, and its wait is measured.
  const second = pool.connect()
  busyFor(5) // the caller's own work before it yields
  const client = await pending
  const other = await second
  const m = (await rx.drain()).map((x) => x.json)
  const ends = m.filter((x) => x.kind === 'acquire_end')
  assert.equal(ends.length, 2, JSON.stringify(m))
  assert.equal(ends[0].wait_ns, 0, 'served from the idle client within the turn')
  assert.ok(ends[1].wait_ns >= 5e6, `the second waited for a new client: ${JSON.stringify(ends[1])}`)
  client.release()
  other.release()
  await pool.end()
})

test('checkouts that begin and end within a batch are folded into one message per connection', async (t) => {
  const { pool, rx } = await setup(t)
  await rx.messages()
  ;(await pool.connect()).release()
  await rx.messages()
  const before = monotonicNs()
  const client = await pool.connect()
  await new Promise((resolve) => setTimeout(resolve, 2))
  client.release()
  ;(await pool.connect()).release()
  const after = monotonicNs()
  const m = (await rx.drain()).map((x) => x.json)
  assert.deepEqual(kinds(m), ['checkouts'])
  const stream = client.connection.stream
  assert.deepEqual({ local_address: m[0].local_address, fd: m[0].fd }, { local_address: `${stream.localAddress}:${stream.localPort}`, fd: stream._handle.fd })
  assert.equal(m[0].request, undefined, 'no request ids: nobody waited on them')
  const { waits_ns: waits, uses_ns: uses } = m[0]
  assert.equal(waits.length, 2)
  assert.equal(uses.length, 2)
  assert.ok(uses[0] >= 1e6 && BigInt(uses[0]) <= after - before, `used about 2 ms: ${uses[0]}`)
  assert.ok(uses[1] < uses[0], `the second one at once: ${uses}`)
  assert.ok(waits.every((w) => Number.isInteger(w) && w < uses[0]), JSON.stringify(m[0]))
  assert.ok(BigInt(m[0].mono_ns) <= after && BigInt(m[0].mono_ns) >= before)
  // Held over a batch, it is an acquire_end and later a release.
  const held = await pool.connect()
  const ends = (await rx.drain()).map((x) => x.json)
  assert.deepEqual(kinds(ends), ['acquire_end'])
  held.release()
  assert.deepEqual(kinds((await rx.drain()).map((x) => x.json)), ['release'])
  await pool.end()
})

test('more than 64 short checkouts of a connection within a batch leave in lines of 64', async (t) => {
  const { pool, rx } = await setup(t, { max: 1 })
  await rx.messages()
  ;(await pool.connect()).release()
  await rx.messages()
  for (let i = 0; i < 150; i++) (await pool.connect()).release()
  const m = (await rx.drain()).map((x) => x.json)
  const folded = m.filter((x) => x.kind === 'checkouts')
  assert.equal(folded.reduce((n, x) => n + x.waits_ns.length, 0), 150, 'every checkout, once')
  assert.ok(folded.every((x) => x.waits_ns.length <= 64 && x.uses_ns.length === x.waits_ns.length))
  assert.ok(folded.length >= 3)
  await pool.end()
})

test('a waiter that begins after a hand-out in the same batch is sent after it', async (t) => {
  const { pool, rx } = await setup(t, { max: 1 })
  await rx.messages()
  ;(await pool.connect()).release()
  await rx.messages()
  const first = await pool.connect()
  const waiting = pool.connect()
  // Raw, as the agent reads them: the hand-out first, so that the agent
  // counts the connection in use when the waiter's acquire_start arrives.
  const m = (await rx.drain()).map((x) => x.json)
  assert.deepEqual(
    m.map((x) => [x.kind, x.request]),
    [
      ['acquire_end', 2],
      ['acquire_start', 3],
    ]
  )
  // The waiter's acquire_start was sent: its short checkout leaves as one
  // `checkout` message, with its request id.
  first.release()
  ;(await waiting).release()
  const after = (await rx.drain()).map((x) => x.json)
  assert.deepEqual(
    after.map((x) => [x.kind, x.request, x.wait_ns]),
    [
      ['release', undefined, undefined],
      ['checkout', 3, undefined],
    ]
  )
  await pool.end()
})

test('a timed-out acquire ends with result timeout, a failed one with error', async (t) => {
  const { pool, rx } = await setup(t, { max: 1, connectionTimeoutMillis: 30 })
  await rx.messages()
  const held = await pool.connect()
  await rx.messages()
  await assert.rejects(pool.connect(), /timeout/)
  assertFailedAcquire(await rx.messages(), 'timeout')
  held.release()
  await pool.end()

  const failing = await setup(t, {}, { failConnect: true })
  await failing.rx.messages()
  await assert.rejects(failing.pool.connect(), /refused/)
  assertFailedAcquire(await failing.rx.messages(), 'error')
  await failing.pool.end()
})

test('a double release is reported once and still throws as pg-pool does', async (t) => {
  const { pool, rx } = await setup(t)
  await rx.messages()
  const client = await pool.connect()
  client.release()
  assert.throws(() => client.release(), /already been released/)
  assert.deepEqual(kinds(await rx.messages()), ['acquire_start', 'connection_created', 'acquire_end', 'release'])
  await pool.end()
})

test('a pool without the release event (pg before 8.7): each checkout\'s release is wrapped, reported once', async (t) => {
  const port = await silentTcpServer(t)
  const rx = new Receiver()
  t.after(() => rx.close())
  const pool = new Pool({ host: '127.0.0.1', port: 5432, database: 'shop', max: 2, Client: fakeClientClass(port) })
  // pg-pool as it was before the event: _release emits nothing.
  const original = Pool.prototype._release
  pool._release = function (client, idleListener, err) {
    const emit = this.emit
    this.emit = (event, ...args) => (event === 'release' ? false : emit.call(this, event, ...args))
    try {
      return original.call(this, client, idleListener, err)
    } finally {
      this.emit = emit
    }
  }
  assert.equal(_internal.emitsRelease(pool), false)
  assert.equal(_internal.emitsRelease(new Pool()), true, 'this pg-pool has the event')
  instrument(pool, { name: 'orders', socketPath: rx.path })
  await rx.messages()
  const client = await pool.connect()
  client.release()
  assert.throws(() => client.release(), /already been released/)
  assert.deepEqual(kinds(await rx.messages()), ['acquire_start', 'connection_created', 'acquire_end', 'release'])
  ;(await pool.connect()).release()
  assert.deepEqual(kinds(await rx.messages()), ['acquire_start', 'acquire_end', 'release'])
  await pool.end()
})

test('release(err) reports the release, then the close', async (t) => {
  const { pool, rx } = await setup(t)
  await rx.messages()
  const client = await pool.connect()
  await rx.messages()
  client.release(new Error('broken'))
  const m = await collect(rx, 2)
  assert.deepEqual(kinds(m), ['release', 'connection_closed'])
  await pool.end()
})

test('instrument never throws and is idempotent', async (t) => {
  assert.equal(instrument(null), null)
  assert.deepEqual(instrument({}), {})
  const weird = { connect: 1, on: 2 }
  assert.equal(instrument(weird), weird)
  const { pool, rx } = await setup(t)
  await rx.messages()
  assert.equal(instrument(pool, { name: 'again', socketPath: rx.path }), pool)
  await pool.query('SELECT 1')
  const m = await rx.messages()
  assert.deepEqual(kinds(m), ['acquire_start', 'connection_created', 'acquire_end', 'release'], 'hooks installed once')
  assert.ok(m.every((x) => x.pool === 'orders'))
  await pool.end()
})

test('without an agent the pool works as before', async (t) => {
  const port = await silentTcpServer(t)
  const pool = new Pool({ max: 2, Client: fakeClientClass(port) })
  instrument(pool, { name: 'lonely', socketPath: `/tmp/poolscope-absent-${process.pid}/adapter.sock` })
  for (let i = 0; i < 5; i++) await pool.query('SELECT 1')
  const s = stats(pool)
  assert.equal(s.sent, 0)
  assert.equal(s.connected, false)
  // The registration, the connection made, and the 5 checkouts (folded
  // into a `checkouts` line per batch window).
  assert.ok(s.waiting + s.dropped >= 3, JSON.stringify(s))
  assert.ok(s.waiting <= 1024, 'the backlog is bounded')
  await pool.end()
})

test('default pool name and server come from options, URL, env, defaults', async () => {
  const { serverFromOptions, formatAddress, isTimeout } = _internal
  assert.deepEqual(serverFromOptions({ host: 'db', port: 6432, database: 'x' }, {}), {
    host: 'db',
    port: 6432,
    database: 'x',
  })
  assert.deepEqual(serverFromOptions({ connectionString: 'postgres://u:p@[::1]:5433/shop' }, {}), {
    host: '::1',
    port: 5433,
    database: 'shop',
  })
  assert.deepEqual(serverFromOptions({ connectionString: 'postgresql:///shop?host=/run/postgresql' }, {}), {
    host: '/run/postgresql',
    port: 5432,
    database: 'shop',
  })
  assert.deepEqual(serverFromOptions({}, { PGHOST: 'h', PGPORT: '7', PGUSER: 'me' }), {
    host: 'h',
    port: 7,
    database: 'me',
  })
  assert.deepEqual(serverFromOptions({}, {}), { host: 'localhost', port: 5432, database: undefined })
  assert.equal(formatAddress('::1', 5), '[::1]:5')
  assert.equal(formatAddress('10.0.0.1', 5), '10.0.0.1:5')
  assert.equal(isTimeout(new Error('timeout exceeded when trying to connect')), true)
  assert.equal(isTimeout(new Error('Connection terminated due to connection timeout')), true)
  assert.equal(isTimeout(new Error('ECONNREFUSED')), false)

  const rx = new Receiver()
  try {
    const pool = new Pool({ host: '127.0.0.1', port: 5439, database: 'shop' })
    instrument(pool, { socketPath: rx.path })
    assert.equal((await rx.messages())[0].pool, '127.0.0.1:5439/shop')
    const long = new Pool({})
    instrument(long, { name: 'é'.repeat(300), socketPath: rx.path })
    assert.equal(Array.from((await rx.messages())[0].pool).length, 128)
    await pool.end()
    await long.end()
  } finally {
    rx.close()
  }
})

test('IPv6 local addresses are bracketed', async (t) => {
  const server = net.createServer((s) => s.on('error', () => {}))
  const listening = await new Promise((resolve) => {
    server.once('error', () => resolve(false))
    server.listen(0, '::1', () => resolve(true))
  })
  if (!listening) {
    t.skip('no IPv6 loopback here')
    return
  }
  t.after(() => server.close())
  const stream = net.connect(server.address().port, '::1')
  await new Promise((resolve) => stream.once('connect', resolve))
  const ref = _internal.connectionOf({ connection: { stream } })
  assert.equal(ref.local_address, `[::1]:${stream.localPort}`)
  assert.equal(ref.fd, stream._handle.fd)
  stream.destroy()
})

// Re-sending the checkouts after an agent restart (checkout_state).

const fs = require('node:fs')
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const states = (messages) => messages.filter((m) => m.kind === 'checkout_state')

test('an agent that comes back gets what waited, the registration and what is checked out', async (t) => {
  // (A holder stack of `a`, held over a second, is not this test's matter.)
  const { pool, rx } = await setup(t, { max: 3 }, {}, { stackAfterMs: 60_000 })
  const a = await pool.connect()
  const b = await pool.connect()
  const acquired = (await rx.messages()).filter((m) => m.kind === 'acquire_end')
  // The agent exits: its streams close, its socket file goes.
  await rx.stop()
  await eventually(() => stats(pool).connected === false)
  b.release() // waits in the backlog for the next agent
  assert.equal(stats(pool).waiting, 1)
  await rx.listen() // a new agent: the sender reconnects after its backoff
  const m = await collect(rx, 3)
  // The state first (the new agent must know the pool before its events),
  // then what waited.
  assert.deepEqual(kinds(m), ['pool', 'checkout_state', 'release'])
  assert.equal(m[2].fd, acquired[1].fd, 'the release that waited')
  const [state] = states(m)
  assert.deepEqual(state.checkouts, [{ local_address: acquired[0].local_address, fd: acquired[0].fd, mono_ns: acquired[0].mono_ns }])
  // Counted once the connection lasted.
  await eventually(() => stats(pool).comebacks === 1, 3000)
  assert.equal(stats(pool).dropped, 0)
  a.release()
  assert.deepEqual(kinds(await rx.messages()), ['release'])
  await pool.end()
})

test('the state is re-sent periodically only while connections are out', async (t) => {
  const { pool, rx } = await setup(t, { max: 3 }, {}, { stateIntervalMs: 100 })
  await sleep(250)
  assert.equal(states(await rx.messages()).length, 0)
  const a = await pool.connect()
  const fd = a.connection.stream._handle.fd
  await sleep(350)
  const got = states(await rx.messages())
  assert.ok(got.length >= 2, JSON.stringify(got))
  assert.deepEqual(got.map((s) => s.checkouts.map((e) => e.fd)), got.map(() => [fd]))
  a.release()
  await rx.messages()
  await sleep(300)
  const after = await rx.messages()
  assert.equal(states(after).length, 0)
  assert.ok(kinds(after).includes('pool'), 'the registration is still repeated')
  await pool.end()
})

// Holder stacks: the stack of the code that took a connection still held
// `stackAfterMs` later (docs/adapter-protocol.md, "Holder stacks").

const path = require('node:path')
const vm = require('node:vm')
const { CAPTURE_FRAMES } = require('../lib/stacks')
const ADAPTER_LIB = path.join(__dirname, '..', 'lib')
const STACK_AFTER_MS = 150
const stacksOf = (messages) => messages.filter((m) => m.kind === 'holder_stack')

/** A frame of the pool libraries, of this adapter or of Node's internals. */
const notApplication = (frame) => /node_modules|node:internal/.test(frame) || frame.includes(ADAPTER_LIB)

/** The application's function that takes a connection and keeps it. */
async function takeAClientAndKeepItForAWhile(pool) {
  return pool.connect()
}

test('holder stack: a checkout held past stackAfterMs sends the stack of the code that took it, once, after its acquire_end', async (t) => {
  // (Interval 0: the checkout right after another one captures too.)
  const { pool, rx } = await setup(t, {}, {}, { stackAfterMs: STACK_AFTER_MS, stackIntervalUs: 0 })
  ;(await pool.connect()).release()
  await rx.messages()
  const limit = Error.stackTraceLimit
  const client = await takeAClientAndKeepItForAWhile(pool)
  assert.equal(Error.stackTraceLimit, limit, 'the application\'s limit put back')
  await sleep(STACK_AFTER_MS + 350)
  const raw = (await rx.drain()).map((x) => x.json)
  assert.deepEqual(kinds(raw), ['acquire_end', 'holder_stack'])
  const [end, sent] = raw
  const stream = client.connection.stream
  assert.deepEqual({ local_address: sent.local_address, fd: sent.fd }, { local_address: `${stream.localAddress}:${stream.localPort}`, fd: stream._handle.fd })
  assert.equal(sent.since_ns, end.mono_ns, 'since_ns is the acquire_end\'s mono_ns')
  const late = sent.mono_ns - sent.since_ns
  assert.ok(late >= STACK_AFTER_MS * 1e6 && late < (STACK_AFTER_MS + 500) * 1e6, `sent ${late / 1e6} ms after the checkout`)
  assert.match(sent.stack[0], /^async takeAClientAndKeepItForAWhile \(.*pool\.test\.js:\d+:\d+\)$|^takeAClientAndKeepItForAWhile \(.*pool\.test\.js:\d+:\d+\)$/, JSON.stringify(sent.stack))
  assert.ok(!sent.stack.some(notApplication), `no frame of pg-pool, the adapter or Node: ${JSON.stringify(sent.stack)}`)
  // Once per checkout.
  await sleep(STACK_AFTER_MS + 100)
  assert.deepEqual(await rx.messages(), [])
  client.release()
  assert.deepEqual(kinds(await rx.messages()), ['release'])
  await pool.end()
})

test('holder stack: pool.query\'s caller, pg-pool\'s own frames left out', async (t) => {
  const { pool, rx } = await setup(t, {}, { queryMs: STACK_AFTER_MS + 300 }, { stackAfterMs: STACK_AFTER_MS, stackIntervalUs: 0 })
  await rx.messages()
  async function aReportThatQueriesForLong() {
    return pool.query('SELECT pg_sleep(1)')
  }
  await aReportThatQueriesForLong()
  const [sent, ...more] = stacksOf(await rx.messages())
  assert.equal(more.length, 0)
  assert.match(sent.stack[0], /aReportThatQueriesForLong \(.*pool\.test\.js:\d+:\d+\)$/, JSON.stringify(sent.stack))
  assert.ok(!sent.stack.some(notApplication), JSON.stringify(sent.stack))
  await pool.end()
})

test('holder stack: none for checkouts given back before stackAfterMs, short or held over a batch', async (t) => {
  const { pool, rx } = await setup(t, {}, {}, { stackAfterMs: STACK_AFTER_MS })
  await rx.messages()
  for (let i = 0; i < 20; i++) (await pool.connect()).release()
  const held = await pool.connect()
  await sleep(100) // its acquire_end leaves with a batch
  held.release()
  await sleep(STACK_AFTER_MS + 200)
  const m = await rx.messages()
  assert.ok(m.some((x) => x.kind === 'release'), JSON.stringify(m))
  assert.deepEqual(stacksOf(m), [])
  await pool.end()
})

test('holder stack: off with stacks: false or POOLSCOPE_ADAPTER_STACKS=off: nothing captured, nothing sent', async (t) => {
  const captureStackTrace = Error.captureStackTrace
  let captures = 0
  Error.captureStackTrace = function (...args) {
    captures += 1
    return captureStackTrace.apply(this, args)
  }
  t.after(() => {
    Error.captureStackTrace = captureStackTrace
  })
  const byOption = await setup(t, {}, {}, { stackAfterMs: 50, stacks: false })
  const before = process.env.POOLSCOPE_ADAPTER_STACKS
  process.env.POOLSCOPE_ADAPTER_STACKS = 'off'
  let byEnv
  try {
    byEnv = await setup(t, {}, {}, { stackAfterMs: 50 })
  } finally {
    if (before === undefined) delete process.env.POOLSCOPE_ADAPTER_STACKS
    else process.env.POOLSCOPE_ADAPTER_STACKS = before
  }
  for (const { pool, rx } of [byOption, byEnv]) {
    const client = await pool.connect()
    await pool.query('SELECT 1')
    await sleep(300)
    const m = await rx.messages()
    assert.ok(m.some((x) => x.kind === 'acquire_end'), JSON.stringify(m))
    assert.deepEqual(stacksOf(m), [])
    client.release()
    await pool.end()
  }
  assert.equal(captures, 0, 'no stack captured')
  // On by default, and with anything but off, 0 and false.
  const { pool } = await setup(t, {}, {}, { stackAfterMs: 50 })
  ;(await pool.connect()).release()
  assert.equal(captures, 1)
  await pool.end()
})

test('holder stack: at most one capture per interval, by any pool of the process; 0 captures at every checkout', async (t) => {
  const captureStackTrace = Error.captureStackTrace
  let captures = 0
  Error.captureStackTrace = function (...args) {
    captures += 1
    return captureStackTrace.apply(this, args)
  }
  t.after(() => {
    Error.captureStackTrace = captureStackTrace
  })
  const spaced = await setup(t, {}, {}, { stackAfterMs: STACK_AFTER_MS, stackIntervalUs: 200_000 })
  const every = await setup(t, {}, {}, { stackAfterMs: STACK_AFTER_MS, stackIntervalUs: 0 })
  for (const { pool } of [spaced, every]) (await pool.connect()).release()
  await sleep(210)
  captures = 0
  for (let i = 0; i < 100; i++) (await spaced.pool.connect()).release()
  assert.equal(captures, 1, 'the first of 100 checkouts in a row')
  for (let i = 0; i < 100; i++) (await every.pool.connect()).release()
  assert.equal(captures, 101, 'interval 0: every one')
  // The last capture (the other pool's) counts for this one too.
  ;(await spaced.pool.connect()).release()
  assert.equal(captures, 101)
  await sleep(210)
  const client = await takeAClientAndKeepItForAWhile(spaced.pool)
  assert.equal(captures, 102, 'past the interval')
  await sleep(STACK_AFTER_MS + 350)
  const [sent] = stacksOf(await spaced.rx.messages())
  assert.match(sent.stack[0], /takeAClientAndKeepItForAWhile/, JSON.stringify(sent.stack))
  client.release()
  await spaced.pool.end()
  await every.pool.end()
})

test('holder stack: the application\'s Error.prepareStackTrace is neither called nor replaced', async (t) => {
  const { pool, rx } = await setup(t, {}, {}, { stackAfterMs: STACK_AFTER_MS, stackIntervalUs: 0 })
  await rx.messages()
  // (Other errors, such as the reconnects of earlier tests' senders, do go
  // through it: only calls for the adapter's capture count.)
  let calls = 0
  const theirs = (err, sites) => {
    if (sites.some((site) => String(site).includes('takeAClientAndKeepItForAWhile'))) calls += 1
    return `theirs: ${sites.length}`
  }
  const before = Object.getOwnPropertyDescriptor(Error, 'prepareStackTrace')
  Error.prepareStackTrace = theirs
  t.after(() => {
    if (before === undefined) delete Error.prepareStackTrace
    else Object.defineProperty(Error, 'prepareStackTrace', before)
  })
  const client = await takeAClientAndKeepItForAWhile(pool)
  await sleep(STACK_AFTER_MS + 350)
  const [sent] = stacksOf(await rx.messages())
  assert.match(sent.stack[0], /takeAClientAndKeepItForAWhile/, JSON.stringify(sent.stack))
  assert.equal(calls, 0, 'not called for the adapter\'s captures')
  assert.equal(Error.prepareStackTrace, theirs, 'still installed')
  assert.match(new Error('x').stack, /^theirs: \d+$/, 'and still used for the application\'s errors')
  client.release()
  await pool.end()
})

test('holder stack: an Error.stackTraceLimit the application made read-only: no stack, the pool works as before', async (t) => {
  const { pool, rx } = await setup(t, {}, {}, { stackAfterMs: 50 })
  await rx.messages()
  const before = Object.getOwnPropertyDescriptor(Error, 'stackTraceLimit')
  Object.defineProperty(Error, 'stackTraceLimit', { value: 7, writable: false, configurable: true })
  t.after(() => Object.defineProperty(Error, 'stackTraceLimit', before))
  const client = await takeAClientAndKeepItForAWhile(pool)
  await pool.query('SELECT 1')
  assert.equal(Error.stackTraceLimit, 7)
  await sleep(300)
  const m = await rx.messages()
  assert.ok(m.some((x) => x.kind === 'acquire_end'), JSON.stringify(m))
  assert.deepEqual(stacksOf(m), [])
  client.release()
  await pool.end()
})

test('holder stack: a deep stack is cut at the capture\'s depth, its frames at 256 characters without control characters, in one line of at most 4096 bytes', async (t) => {
  const { pool, rx } = await setup(t, {}, {}, { stackAfterMs: STACK_AFTER_MS, stackIntervalUs: 0 })
  await rx.messages()
  // Deep recursion in a script whose file name is long and holds a newline
  // and a tab: every frame's text is too long and has control characters.
  const file = `/srv/app/${'deep/'.repeat(60)}\nreports\t.js`
  const recurse = vm.runInThisContext(
    `(function recurseThenTake(n, take) { return n === 0 ? take() : recurseThenTake(n - 1, take) })`,
    { filename: file }
  )
  let client = null
  recurse(60, function takeFromDeepDown() {
    pool.connect().then((c) => {
      client = c
    })
  })
  await sleep(STACK_AFTER_MS + 350)
  const lines = (await rx.drain()).filter((x) => x.json.kind === 'holder_stack')
  assert.equal(lines.length, 1)
  const [{ text, json: sent }] = lines
  assert.ok(Buffer.byteLength(text) <= 4096, `${Buffer.byteLength(text)} bytes`)
  assert.ok(sent.stack.length >= 2 && sent.stack.length <= CAPTURE_FRAMES, `${sent.stack.length} frames`)
  for (const frame of sent.stack) {
    assert.ok(Array.from(frame).length <= 256 && frame.length > 0, frame)
    assert.ok(!/[\u0000-\u001f\u007f-\u009f]/.test(frame), JSON.stringify(frame))
  }
  assert.match(sent.stack[0], /^takeFromDeepDown \(.*pool\.test\.js:\d+:\d+\)$/)
  assert.match(sent.stack[1], /^recurseThenTake \(\/srv\/app\/deep\//)
  client.release()
  await pool.end()
})

// Defined last: the tests of this file run in order, and each message they
// read was checked against the golden shapes (helpers.js, Receiver).
test('every kind the adapter sends was checked against the golden messages', () => {
  assert.deepEqual([...checkedKinds].sort(), [...GOLDEN.keys()].sort())
  assert.throws(() => checkGoldenShape({ v: 1, kind: 'release', pool: 'p', mono_ns: 1, fd: '3' }), /fd is a string/)
  assert.throws(() => checkGoldenShape({ v: 1, kind: 'release', pool: 'p', mono_ns: 1, fd: 3, extra: 1 }), /no golden example/)
  assert.throws(() => checkGoldenShape({ v: 1, kind: 'checkout_state', pool: 'p', mono_ns: 1, checkouts: [{ fd: 1 }] }), /lacks mono_ns/)
})
