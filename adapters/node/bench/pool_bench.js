'use strict'
// The adapter bench's Node.js side (`cargo xtask bench --only adapters`,
// xtask/src/bench/adapters.rs): one loop over a real pool, then one JSON line
// on stdout.
//
// LIB=pg (pg.Pool) or LIB=mysql2 (mysql2/promise createPool).
// MODE=pairs: N acquire/release pairs, no query (the event loop turns every
// 64 pairs, see `pairs`). MODE=query: acquire,
// SELECT 1, release, for SECONDS. MODE=query_ab: the query loop over two
// pools, one plain and one instrumented, in alternating slices (see
// `queryAb`). ADAPTER=on calls instrument(pool) right
// after creating the pool, ADAPTER=off does not: the loop is the same code
// either way. Both measure after a warm-up (WARMUP pairs, or WARMUP_SECONDS
// of queries). CPU time is the whole process's (process.cpuUsage(): user +
// system of all its threads), wall time from process.hrtime.bigint().
//
// Environment: LIB, MODE, ADAPTER, AGENT (present: wait until the adapter is
// connected), N, RATE, SECONDS, WARMUP, WARMUP_SECONDS, PG_URL (pg), MYSQL_HOST,
// MYSQL_PORT, MYSQL_USER, MYSQL_DATABASE (mysql2), and the adapter's
// POOLSCOPE_ADAPTER_STREAM_SOCKET, POOLSCOPE_ADAPTER_STACKS (off: no
// holder stacks captured; by default a checkout captures one if the last
// capture was at least POOLSCOPE_ADAPTER_STACK_INTERVAL_US ago, 1000 unless
// set; 0: every checkout captures).

const adapter = require('../lib/index')

const env = (name, fallback) => process.env[name] || fallback
const LIB = env('LIB', 'pg')
const MODE = env('MODE', 'pairs')
const ADAPTER = env('ADAPTER', 'off') === 'on'
const AGENT = env('AGENT', 'absent') === 'present'
const N = Number(env('N', '1000000'))
const SECONDS = Number(env('SECONDS', '5'))
const WARMUP = Number(env('WARMUP', '200000'))
const RATE = Number(env('RATE', '0'))
const WARMUP_SECONDS = Number(env('WARMUP_SECONDS', '1'))
const POOL_SIZE = 4

function makePool() {
  if (LIB === 'pg') {
    const { Pool } = require('pg')
    return {
      pool: new Pool({ connectionString: env('PG_URL'), max: POOL_SIZE }),
      acquire: (pool) => pool.connect(),
      release: (conn) => conn.release(),
    }
  }
  if (LIB === 'mysql2') {
    const mysql = require('mysql2/promise')
    return {
      pool: mysql.createPool({
        host: env('MYSQL_HOST', '127.0.0.1'),
        port: Number(env('MYSQL_PORT', '3306')),
        user: env('MYSQL_USER', 'root'),
        database: env('MYSQL_DATABASE'),
        connectionLimit: POOL_SIZE,
        waitForConnections: true,
      }),
      acquire: (pool) => pool.getConnection(),
      release: (conn) => conn.release(),
    }
  }
  throw new Error(`unknown LIB ${LIB}`)
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Pairs between two turns of the event loop (see `pairs`). */
const PAIRS_PER_TURN = 64
const nextTurn = () => new Promise((resolve) => setImmediate(resolve))

// An idle pool hands out a connection without I/O, so a bare loop of
// `await acquire()` would never leave the microtask queue: nothing the
// adapter writes would reach the socket (Node's writable keeps it until
// the event loop turns), its buffer would fill and every later message
// would be dropped, which is cheaper than sending and nothing like an
// application, which does I/O between acquires. So the loop lets the event
// loop turn every PAIRS_PER_TURN pairs, with the adapter on or off alike.
//
// RATE (pairs a second, 0: as fast as they go) paces the loop: unpaced, it
// makes messages faster than the agent reads them, so that the adapter
// meets a full socket and drops, which costs less than sending; paced far
// above what a service does, every message is sent and the CPU per pair is
// the cost of sending it. The pacing sleeps when a turn is ahead of time,
// with the adapter on or off alike.
async function pairs(pool, acquire, release, n) {
  const start = process.hrtime.bigint()
  for (let i = 0; i < n; i++) {
    const conn = await acquire(pool)
    release(conn)
    if (i % PAIRS_PER_TURN === PAIRS_PER_TURN - 1) {
      const aheadMs = RATE > 0 ? ((i + 1) * 1000) / RATE - Number(process.hrtime.bigint() - start) / 1e6 : 0
      await (aheadMs >= 1 ? sleep(Math.floor(aheadMs)) : nextTurn())
    }
  }
  return n
}

async function queries(pool, acquire, release, untilNs) {
  let done = 0
  let sum = 0
  for (;;) {
    const conn = await acquire(pool)
    try {
      const res = await conn.query('SELECT 1 AS one')
      sum += LIB === 'pg' ? res.rows[0].one : res[0][0].one
    } finally {
      release(conn)
    }
    done++
    if ((done & 63) === 0 && process.hrtime.bigint() >= untilNs) break
  }
  if (sum !== done) throw new Error('SELECT 1 returned something else')
  return done
}

/** Slices of the A/B query run (ms). */
const SLICE_MS = 250

/**
 * MODE=query_ab: the query loop over two pools in one process, one plain
 * and one instrumented, in alternating 250 ms slices (plain, instrumented,
 * instrumented, plain, ...) for SECONDS after WARMUP_SECONDS on each. Two
 * processes differ by more than the 2 % the comparison must resolve (where
 * the JIT put things, which core the server's backends run on); slices of
 * one process share all that, and the order cancels a drift. Prints
 * {"ab":[plain side, instrumented side]}.
 */
async function queryAb() {
  // Which pool is made (and connects) first alternates between runs
  // (AB_INSTRUMENTED_FIRST): it is not to favour either side.
  const made = [makePool(), makePool()]
  const sides = env('AB_INSTRUMENTED_FIRST', '0') === '1' ? [made[1], made[0]] : made
  // AB_CONTROL=1: neither side instrumented, to see what the method itself
  // tells two equal sides apart by.
  const control = env('AB_CONTROL', '0') === '1'
  if (!control) adapter.instrument(sides[1].pool, { name: `bench-node-${LIB}` })
  for (const { pool, acquire, release } of made) {
    pool.on('error', () => {})
    release(await acquire(pool))
  }
  if (AGENT && !control) {
    const deadline = Date.now() + 30000
    while (!adapter.stats(sides[1].pool).connected && Date.now() < deadline) await sleep(10)
    if (!adapter.stats(sides[1].pool).connected) process.stderr.write('the adapter did not connect to the agent\n')
  }
  const secondsFromNow = (s) => process.hrtime.bigint() + BigInt(Math.round(s * 1e9))
  for (const { pool, acquire, release } of made) await queries(pool, acquire, release, secondsFromNow(WARMUP_SECONDS))
  const totals = sides.map(() => ({ ops: 0, cpu_ns: 0, wall_ns: 0 }))
  const none = { sent: 0, dropped: 0, connected: false }
  const s0 = adapter.stats(sides[1].pool) || none
  const slices = Math.max(4, 4 * Math.round((SECONDS * 1000) / SLICE_MS / 4))
  for (let k = 0; k < slices; k++) {
    const side = k % 4 === 1 || k % 4 === 2 ? 1 : 0
    const { pool, acquire, release } = sides[side]
    const cpu0 = process.cpuUsage()
    const t0 = process.hrtime.bigint()
    totals[side].ops += await queries(pool, acquire, release, t0 + BigInt(SLICE_MS * 1e6))
    totals[side].wall_ns += Number(process.hrtime.bigint() - t0)
    const cpu = process.cpuUsage(cpu0)
    totals[side].cpu_ns += (cpu.user + cpu.system) * 1000
  }
  const s1 = adapter.stats(sides[1].pool) || none
  Object.assign(totals[1], { sent: s1.sent - s0.sent, dropped: s1.dropped - s0.dropped, connected: s1.connected, sent_total: s1.sent })
  process.stdout.write(JSON.stringify({ ab: totals }) + '\n')
  for (const { pool } of sides) await pool.end()
  process.exit(0)
}

async function main() {
  if (MODE === 'query_ab') return queryAb()
  const { pool, acquire, release } = makePool()
  if (ADAPTER) adapter.instrument(pool, { name: `bench-node-${LIB}` })
  pool.on('error', () => {})
  // One connection first (its events are the adapter's first messages),
  // then, with an agent, until the adapter's stream is connected: a loop
  // whose acquires never wait for I/O never lets the event loop finish a
  // connect.
  release(await acquire(pool))
  if (ADAPTER && AGENT) {
    const deadline = Date.now() + 30000
    while (!adapter.stats(pool).connected && Date.now() < deadline) await sleep(10)
    if (!adapter.stats(pool).connected) process.stderr.write('the adapter did not connect to the agent\n')
  }
  const secondsFromNow = (s) => process.hrtime.bigint() + BigInt(Math.round(s * 1e9))
  if (MODE === 'query') await queries(pool, acquire, release, secondsFromNow(WARMUP_SECONDS))
  else await pairs(pool, acquire, release, WARMUP)

  const s0 = ADAPTER ? adapter.stats(pool) : null
  const cpu0 = process.cpuUsage()
  const t0 = process.hrtime.bigint()
  const ops =
    MODE === 'query'
      ? await queries(pool, acquire, release, t0 + BigInt(Math.round(SECONDS * 1e9)))
      : await pairs(pool, acquire, release, N)
  const t1 = process.hrtime.bigint()
  const cpu = process.cpuUsage(cpu0)
  const s1 = ADAPTER ? adapter.stats(pool) : null
  const out = { ops, cpu_ns: (cpu.user + cpu.system) * 1000, wall_ns: Number(t1 - t0) }
  if (s0 && s1) {
    Object.assign(out, { sent: s1.sent - s0.sent, dropped: s1.dropped - s0.dropped, connected: s1.connected })
    // Everything the agent got from this run, warm-up included.
    out.sent_total = s1.sent
  }
  process.stdout.write(JSON.stringify(out) + '\n')
  await pool.end()
  // The adapter's timers and socket must not keep the process alive.
  process.exit(0)
}

main().catch((err) => {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`)
  process.exit(1)
})
