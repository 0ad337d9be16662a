'use strict'
// instrument() on real mysql2 pools (callback and promise) and real mysql
// pools, against a fake MySQL server made with mysql2's own server side
// (handshake, OK to every query and ping): the libraries' own pool logic and
// event order, the sockets' real local addresses and fds, no MariaDB needed.

const test = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const mysql2 = require('mysql2')
const mysql2Promise = require('mysql2/promise')
const mysql = require('mysql')

const { instrument, stats, tid, _internal } = require('../lib/index')
const { Receiver, busyFor, assertFailedAcquire, collect, registration, silentTcpServer, GOLDEN, checkedKinds } = require('./helpers')

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const kinds = (messages) => messages.map((m) => m.kind)
const conn2 = (c) => ({ local_address: `${c.stream.localAddress}:${c.stream.localPort}`, fd: c.stream._handle.fd })
const conn1 = (c) => ({ local_address: `${c._socket.localAddress}:${c._socket.localPort}`, fd: c._socket._handle.fd })
const named = (m) => ({ local_address: m.local_address, fd: m.fd })

/** A fake MySQL server on 127.0.0.1: handshakes, answers OK. */
function startServer(t) {
  const server = mysql2.createServer()
  const conns = new Set()
  server.on('connection', (conn) => {
    conns.add(conn)
    conn.serverHandshake({
      protocolVersion: 10,
      serverVersion: '10.11.0-fake',
      connectionId: conns.size,
      statusFlags: 2,
      characterSet: 8,
      capabilityFlags: 0xffffff & ~0x800, // no TLS
    })
    // mysql (the older library) expects the reply's sequence id to be 1.
    const ok = () => {
      conn.sequenceId = 1
      conn.writeOk()
    }
    conn.on('query', ok)
    conn.on('ping', ok)
    conn.on('error', () => {})
  })
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      t.after(() => {
        for (const c of conns) c.stream.destroy()
        server.close()
      })
      resolve(server._server.address().port)
    })
  })
}

async function setup(t, lib, options = {}, name = 'shop', instrumentOptions = {}) {
  const port = options.port || (await startServer(t))
  const rx = new Receiver()
  t.after(() => rx.close())
  const config = Object.assign({ host: '127.0.0.1', port, user: 'u', database: 'shop', connectionLimit: 2 }, options)
  const pool = lib.createPool(config)
  assert.equal(instrument(pool, Object.assign({ name, socketPath: rx.path }, instrumentOptions)), pool)
  return { pool, rx, port }
}

const get = (pool) =>
  new Promise((resolve, reject) => pool.getConnection((err, c) => (err ? reject(err) : resolve(c))))
const end = (pool) => new Promise((resolve) => pool.end(() => resolve()))

test('tid is the event loop thread: the pid on the main thread', () => {
  assert.equal(tid, process.pid)
})

for (const [lib, library, socketOf] of [
  [mysql2, 'mysql2', conn2],
  [mysql, 'mysql', conn1],
]) {
  test(`${library}: registration names the pool, its server and connectionLimit`, async (t) => {
    const { pool, rx, port } = await setup(t, lib, { connectionLimit: 4 })
    assert.deepEqual(await registration(rx), {
      v: 1,
      kind: 'pool',
      pool: 'shop',
      db_system: 'mysql',
      server_address: '127.0.0.1',
      server_port: port,
      namespace: 'shop',
      max: 4,
      library,
    })
    assert.equal(stats(pool).pool, 'shop')
    await end(pool)
  })

  test(`${library}: acquire, release, reuse, query and close, naming the real socket`, async (t) => {
    const { pool, rx } = await setup(t, lib)
    await rx.messages()
    const c = await get(pool)
    const conn = socketOf(c)
    let m = await rx.messages()
    assert.deepEqual(kinds(m), ['acquire_start', 'connection_created', 'acquire_end'])
    assert.deepEqual(named(m[1]), conn)
    assert.deepEqual([m[2].request, m[2].result, m[2].tid], [m[0].request, 'ok', process.pid])
    assert.deepEqual(named(m[2]), conn)
    assert.equal(m[0].tid, process.pid)
    c.release()
    m = await rx.messages()
    assert.deepEqual(kinds(m), ['release'])
    assert.deepEqual(named(m[0]), conn)
    if (library === 'mysql2') {
      c.release() // mysql2 ignores a second release: so do we
      assert.deepEqual(await rx.messages(), [])
    }
    const again = await get(pool)
    assert.equal(again, c, 'the idle connection, no new one')
    m = await rx.messages()
    assert.deepEqual(kinds(m), ['acquire_start', 'acquire_end'])
    assert.equal(m[0].request, 2)
    again.release()
    await rx.messages()
    await new Promise((resolve, reject) => pool.query('SELECT 1', (err) => (err ? reject(err) : resolve())))
    assert.deepEqual(kinds(await rx.messages()), ['acquire_start', 'acquire_end', 'release'])
    await end(pool)
    m = await collect(rx, 1)
    assert.deepEqual(kinds(m), ['connection_closed'])
    assert.deepEqual(named(m[0]), conn, 'named as it was while open')
  })

  test(`${library}: a waiter on an exhausted pool gets one request id and its wait`, async (t) => {
    const { pool, rx } = await setup(t, lib, { connectionLimit: 1 })
    await rx.messages()
    const held = await get(pool)
    await rx.messages()
    const waiting = get(pool)
    let m = await rx.messages()
    assert.deepEqual(kinds(m), ['acquire_start'])
    const start = m[0]
    assert.equal(pool._connectionQueue.length, 1)
    await sleep(50)
    held.release()
    const got = await waiting
    assert.equal(got, held)
    // Given back at once: its acquire_start was sent, so the checkout
    // leaves as one `checkout` message with the request id (shown here
    // as its acquire_end and release).
    got.release()
    m = await rx.messages()
    // mysql calls getConnection again for the waiter: still one request.
    assert.deepEqual(kinds(m), ['release', 'acquire_end', 'release'])
    assert.equal(m[1].request, start.request)
    assert.ok(m[1].mono_ns - start.mono_ns >= 45e6, 'waited about 50 ms')
    assert.deepEqual(named(m[1]), socketOf(held))
    await end(pool)
  })

  test(`${library}: queueLimit and waitForConnections refusals end as timeout`, async (t) => {
    const { pool, rx } = await setup(t, lib, { connectionLimit: 1, queueLimit: 1 })
    const held = await get(pool)
    const waiting = get(pool)
    await rx.messages()
    await assert.rejects(get(pool), /Queue limit reached/)
    assertFailedAcquire(await rx.messages(), 'timeout')
    held.release()
    ;(await waiting).release()
    await end(pool)

    const strict = await setup(t, lib, { connectionLimit: 1, waitForConnections: false })
    const one = await get(strict.pool)
    await strict.rx.messages()
    await assert.rejects(get(strict.pool), /No connections available/)
    assertFailedAcquire(await strict.rx.messages(), 'timeout')
    one.release()
    await end(strict.pool)
  })

  test(`${library}: a connection that cannot be made ends the acquire with error`, async (t) => {
    const probe = net.createServer()
    await new Promise((resolve) => probe.listen(0, '127.0.0.1', resolve))
    const port = probe.address().port
    await new Promise((resolve) => probe.close(resolve)) // nobody listens there now
    const { pool, rx } = await setup(t, lib, { port })
    await rx.messages()
    await assert.rejects(get(pool), /ECONNREFUSED/)
    assertFailedAcquire(await rx.messages(), 'error')
    await end(pool)
  })

  test(`${library}: a checked-out connection destroyed: closed, never released`, async (t) => {
    const { pool, rx } = await setup(t, lib)
    const c = await get(pool)
    const conn = socketOf(c)
    await rx.messages()
    c.destroy()
    const m = await collect(rx, 1)
    assert.deepEqual(kinds(m), ['connection_closed'])
    assert.deepEqual(named(m[0]), conn)
    await end(pool)
    assert.deepEqual(await rx.messages(), [])
  })
}

test('mysql: acquireTimeout while connecting ends the acquire with timeout', async (t) => {
  const port = await silentTcpServer(t)
  const { pool, rx } = await setup(t, mysql, { port, acquireTimeout: 100 })
  await rx.messages()
  await assert.rejects(get(pool), (err) => err.code === 'PROTOCOL_SEQUENCE_TIMEOUT')
  assertFailedAcquire(await rx.messages(), 'timeout')
  await end(pool)
})

test('mysql2: an acquire served from a free connection within its turn has no wait; one that waits for a new connection has its wait', async (t) => {
  const { pool, rx } = await setup(t, mysql2)
  await rx.messages()
  ;(await get(pool)).release()
  await rx.messages()
  const pending = get(pool)
  // The one free connection is taken: the second caller waits for a new one.
  const second = get(pool)
  busyFor(5) // the caller's own work before it yields
  const first = await pending
  const other = await second
  const ends = (await rx.drain()).map((x) => x.json).filter((x) => x.kind === 'acquire_end')
  assert.equal(ends.length, 2, JSON.stringify(ends))
  assert.equal(ends[0].wait_ns, 0, 'served from the free connection within the turn')
  // Seen in the call, without wrapping the callback: still the connection
  // the caller got.
  const { address, port: localPort } = first.stream.address()
  assert.equal(ends[0].local_address, `${address}:${localPort}`, JSON.stringify(ends[0]))
  assert.ok(ends[1].wait_ns >= 5e6, `the second waited for a new connection: ${JSON.stringify(ends[1])}`)
  assert.notEqual(ends[0].request, ends[1].request)
  first.release()
  other.release()
  await end(pool)
})

test('mysql2/promise: createPool and pool.promise() are both reported', async (t) => {
  const port = await startServer(t)
  const rx = new Receiver()
  t.after(() => rx.close())
  const pool = mysql2Promise.createPool({ host: '127.0.0.1', port, user: 'u', database: 'shop', connectionLimit: 2 })
  assert.equal(instrument(pool, { name: 'promised', socketPath: rx.path }), pool)
  assert.equal(instrument(pool, { name: 'again', socketPath: rx.path }), pool, 'idempotent')
  const [reg] = await rx.messages()
  assert.deepEqual([reg.kind, reg.pool, reg.library, reg.max], ['pool', 'promised', 'mysql2', 2])
  const c = await pool.getConnection()
  const conn = conn2(c.connection)
  let m = await rx.messages()
  assert.deepEqual(kinds(m), ['acquire_start', 'connection_created', 'acquire_end'])
  assert.deepEqual(named(m[2]), conn)
  await c.query('SELECT 1')
  c.release()
  assert.deepEqual(kinds(await rx.messages()), ['release'])
  await pool.query('SELECT 1')
  assert.deepEqual(kinds(await rx.messages()), ['acquire_start', 'acquire_end', 'release'])
  assert.equal(stats(pool).pool, 'promised')
  // pool.promise() of an instrumented callback pool: the same reporter.
  const core = pool.pool
  const p2 = core.promise()
  const d = await p2.getConnection()
  assert.deepEqual(kinds(await rx.messages()), ['acquire_start', 'acquire_end'])
  p2.releaseConnection(d)
  m = await rx.messages()
  assert.deepEqual(kinds(m), ['release'])
  assert.equal(m[0].pool, 'promised')
  await pool.end()
  assert.deepEqual(kinds(await collect(rx, 1)), ['connection_closed'])
})

test('a restarted agent gets the checkouts of a mysql2 pool, with their tid', async (t) => {
  const { pool, rx } = await setup(t, mysql2, { connectionLimit: 3 })
  const a = await get(pool)
  const acquired = (await rx.messages()).filter((m) => m.kind === 'acquire_end')
  await rx.stop()
  await rx.listen()
  const m = await collect(rx, 2)
  assert.deepEqual(kinds(m), ['pool', 'checkout_state'])
  assert.deepEqual(m[1].checkouts, [{ ...named(acquired[0]), tid: process.pid, mono_ns: acquired[0].mono_ns }])
  a.release()
  await end(pool)
})

// Holder stacks (docs/adapter-protocol.md, "Holder stacks").

const path = require('node:path')
const ADAPTER_LIB = path.join(__dirname, '..', 'lib')
const STACK_AFTER_MS = 150
const notApplication = (frame) => /node_modules|node:internal/.test(frame) || frame.includes(ADAPTER_LIB)

/** The application's functions that take a connection and keep it. */
function keepAConnectionByCallback(pool) {
  return new Promise((resolve, reject) => pool.getConnection((err, c) => (err ? reject(err) : resolve(c))))
}
async function keepAConnectionByPromise(pool) {
  return pool.getConnection()
}

for (const [what, lib, take, freeFirst] of [
  ['mysql2 (a new connection)', mysql2, keepAConnectionByCallback, false],
  ['mysql2 (a free connection, at once)', mysql2, keepAConnectionByCallback, true],
  ['mysql2/promise', mysql2Promise, keepAConnectionByPromise, true],
  ['mysql', mysql, keepAConnectionByCallback, true],
]) {
  test(`${what}: a checkout held past stackAfterMs sends its taker's stack once, after its acquire_end, the library's frames left out`, async (t) => {
    // (Interval 0: the checkout right after another one captures too.)
    const { pool, rx } = await setup(t, lib, {}, 'shop', { stackAfterMs: STACK_AFTER_MS, stackIntervalUs: 0 })
    if (freeFirst) (await (lib === mysql2Promise ? pool.getConnection() : get(pool))).release()
    await rx.messages()
    const c = await take(pool)
    await sleep(STACK_AFTER_MS + 350)
    const raw = (await rx.drain()).map((x) => x.json).filter((m) => m.kind !== 'connection_created' && m.kind !== 'acquire_start')
    assert.deepEqual(kinds(raw), ['acquire_end', 'holder_stack'])
    const [acquired, sent] = raw
    assert.deepEqual(named(sent), named(acquired))
    assert.equal(sent.since_ns, acquired.mono_ns, 'since_ns is the acquire_end\'s mono_ns')
    assert.ok(sent.mono_ns - sent.since_ns >= STACK_AFTER_MS * 1e6)
    // Innermost first: the callback form's promise executor, then the
    // function that asked.
    assert.match(sent.stack[0], /mysql\.test\.js:\d+:\d+\)?$/, JSON.stringify(sent.stack))
    assert.ok(sent.stack.slice(0, 3).some((f) => f.startsWith(`${take.name} (`) || f.startsWith(`async ${take.name} (`)), JSON.stringify(sent.stack))
    assert.ok(!sent.stack.some(notApplication), JSON.stringify(sent.stack))
    c.release()
    await sleep(STACK_AFTER_MS + 50)
    assert.deepEqual(kinds(await rx.messages()), ['release'], 'once')
    await (lib === mysql2Promise ? pool.end() : end(pool))
  })
}

test('mysql2: pool.query\'s caller is the holder, a short checkout sends no stack', async (t) => {
  const { pool, rx } = await setup(t, mysql2, {}, 'shop', { stackAfterMs: STACK_AFTER_MS })
  await rx.messages()
  function queryAndForget() {
    return new Promise((resolve, reject) => pool.query('SELECT 1', (err) => (err ? reject(err) : resolve())))
  }
  for (let i = 0; i < 10; i++) await queryAndForget()
  await sleep(STACK_AFTER_MS + 200)
  const m = await rx.messages()
  assert.equal(m.filter((x) => x.kind === 'holder_stack').length, 0, JSON.stringify(m))
  await end(pool)
})

test('mysql2: at most one capture per interval; the next checkout past it captures', async (t) => {
  const captureStackTrace = Error.captureStackTrace
  let captures = 0
  Error.captureStackTrace = function (...args) {
    captures += 1
    return captureStackTrace.apply(this, args)
  }
  t.after(() => {
    Error.captureStackTrace = captureStackTrace
  })
  const { pool, rx } = await setup(t, mysql2, {}, 'shop', { stackAfterMs: STACK_AFTER_MS, stackIntervalUs: 200_000 })
  ;(await get(pool)).release()
  await sleep(210)
  captures = 0
  for (let i = 0; i < 100; i++) (await get(pool)).release()
  assert.equal(captures, 1, 'the first of 100 checkouts in a row')
  await rx.messages()
  await sleep(210)
  const c = await keepAConnectionByCallback(pool)
  assert.equal(captures, 2, 'past the interval')
  await sleep(STACK_AFTER_MS + 350)
  const sent = (await rx.messages()).filter((x) => x.kind === 'holder_stack')
  assert.equal(sent.length, 1)
  assert.ok(sent[0].stack.slice(0, 3).some((f) => f.startsWith('keepAConnectionByCallback (')), JSON.stringify(sent[0].stack))
  c.release()
  await end(pool)
})

test('errors are classified: exhausted pools and timeouts as timeout, the rest as error', () => {
  const r = _internal.mysqlResultOfError
  assert.equal(r(Object.assign(new Error('Queue limit reached.'), { code: 'POOL_ENQUEUELIMIT' })), 'timeout')
  assert.equal(r(new Error('Queue limit reached.')), 'timeout')
  assert.equal(r(new Error('No connections available.')), 'timeout')
  assert.equal(r(Object.assign(new Error('x'), { code: 'PROTOCOL_SEQUENCE_TIMEOUT' })), 'timeout')
  assert.equal(r(Object.assign(new Error('connect ETIMEDOUT'), { code: 'ETIMEDOUT' })), 'timeout')
  assert.equal(r(new Error('Pool is closed.')), 'error')
  assert.equal(r(Object.assign(new Error('Access denied'), { code: 'ER_ACCESS_DENIED_ERROR' })), 'error')
  assert.equal(r(undefined), 'error')
})

test('instrument never throws on look-alikes', () => {
  const weird = { getConnection: () => {}, releaseConnection: 1, on: () => {}, config: {} }
  assert.equal(instrument(weird), weird)
  const promiseLike = { getConnection: () => {}, pool: {} }
  assert.equal(instrument(promiseLike), promiseLike)
  assert.equal(stats(weird), null)
})

test('every kind the mysql adapters send was checked against the golden messages', () => {
  assert.deepEqual([...checkedKinds].sort(), [...GOLDEN.keys()].sort())
})
