'use strict'
// poolscope adapter for Node.js pools: node-postgres (pg.Pool), mysql2
// (callback and promise pools) and mysql. Reports what a pool does (pool
// registration, acquires with their wait, releases, connections opened and
// closed) to the poolscope agent, one JSON line per event on its Unix stream
// socket. See docs/adapter-protocol.md in the poolscope repository.
//
// It never throws into the application and never blocks the event loop:
// every hook is wrapped, and sends are non-blocking, bounded and dropped
// (counted) when they cannot be kept.

const { Sender, senderFor, socketPathFromEnv, DEFAULT_SOCKET } = require('./sender')
const { DEFAULT_REREGISTER_MS, positiveInt, formatAddress, eventLoopTid } = require('./common')
const pg = require('./pg')
const mysql = require('./mysql')
const generic = require('./generic')

const INSTRUMENTED = Symbol.for('poolscope-adapter.instrumented')

function reporterFor(pool, options) {
  if (pg.isPgPool(pool)) return { target: pool, reporter: new pg.PgReporter(pool, options) }
  if (mysql.isCallbackPool(pool)) return { target: pool, reporter: new mysql.MysqlReporter(pool, options) }
  // A mysql2 PromisePool: the callback pool beneath does the work (and a
  // later pool.promise() of it is covered too).
  if (mysql.isPromisePool(pool)) return { target: pool.pool, reporter: new mysql.MysqlReporter(pool.pool, options) }
  return null
}

/**
 * Reports a pool to poolscope: a pg.Pool (pg-pool 3.x), a mysql2 pool
 * (`mysql2.createPool`, `pool.promise()`, `mysql2/promise` createPool) or a
 * mysql pool (`mysql.createPool`). Call it once, right after creating the
 * pool and before using it; returns the pool.
 *
 * options.name          pool name (1 to 128 characters; default host:port/database)
 * options.socketPath    the agent's stream socket (default
 *                       $POOLSCOPE_ADAPTER_STREAM_SOCKET, else
 *                       /run/poolscope/adapter-stream.sock)
 * options.reregisterMs  resend the registration, and the connections checked
 *                       out (checkout_state), this often (default 30000; 0: never);
 *                       they are also re-sent when the agent comes back
 * options.stateIntervalMs  the same (it wins when both are given)
 * options.stacks        capture the stack of the code that takes each
 *                       connection, sent for checkouts held long (default
 *                       on, unless $POOLSCOPE_ADAPTER_STACKS is off, 0 or false)
 * options.stackAfterMs  how long a checkout is held before its stack is sent
 *                       (default $POOLSCOPE_ADAPTER_STACK_AFTER_MS, else 1000)
 * options.stackIntervalUs  a checkout captures its stack only if this long
 *                       (µs) has passed since the last capture in the
 *                       process, by any pool (default
 *                       $POOLSCOPE_ADAPTER_STACK_INTERVAL_US, else 1000; 0:
 *                       every checkout captures)
 * options.stackSkip     a RegExp of more files whose frames above the
 *                       application's are left out of stacks
 */
function instrument(pool, options = {}) {
  try {
    const found = reporterFor(pool, options && typeof options === 'object' ? options : {})
    if (found === null) return pool
    const { target, reporter } = found
    if (target[INSTRUMENTED]) {
      if (target !== pool) Object.defineProperty(pool, INSTRUMENTED, { value: target[INSTRUMENTED], enumerable: false, configurable: true })
      return pool
    }
    reporter.install()
    for (const p of new Set([target, pool])) {
      Object.defineProperty(p, INSTRUMENTED, { value: reporter, enumerable: false, configurable: true })
    }
    const opts = options && typeof options === 'object' ? options : {}
    const every = positiveInt(opts.stateIntervalMs) ?? positiveInt(opts.reregisterMs)
    reporter.start(every === undefined ? DEFAULT_REREGISTER_MS : every)
  } catch (err) {
    // An adapter must never break the application.
  }
  return pool
}

/**
 * Reports a pool the application keeps itself (SQLite handles, anything no
 * integration covers), from the pool's own code; returns its ReportedPool:
 *
 *   const report = reportPool({ name: 'handles', dbSystem: 'sqlite', max: 4 })
 *   report.connectionCreated(handle)       // the pool opened it
 *   const waiting = report.acquire()       // before the pool may wait
 *   waiting.ok(handle)                     // or waiting.timeout() / .error()
 *   report.released(handle)                // back in the pool
 *   report.connectionClosed(handle)        // closed or discarded
 *
 * options.name          pool name (1 to 128 characters)
 * options.dbSystem      db.system.name: 'sqlite', 'postgresql'...
 * options.serverAddress what it talks to (a host, the database file)
 * options.serverPort, options.namespace, options.max, options.minIdle,
 * options.library       the rest of the registration
 * options.socketPath, options.stateIntervalMs, options.stacks,
 * options.stackAfterMs, options.stackIntervalUs,
 * options.stackSkip     as for instrument() (the stack
 *                       is that of the code that called report.acquire())
 */
function reportPool(options = {}) {
  const opts = options && typeof options === 'object' ? options : {}
  const reporter = new generic.GenericReporter(opts)
  try {
    const every = positiveInt(opts.stateIntervalMs) ?? positiveInt(opts.reregisterMs)
    reporter.start(every === undefined ? DEFAULT_REREGISTER_MS : every)
  } catch (err) {
    // An adapter must never break the application.
  }
  return new generic.ReportedPool(reporter)
}

/** What the adapter did for an instrumented pool (null if it is not). */
function stats(pool) {
  const reporter = pool && (pool[INSTRUMENTED] || (pool.pool && pool.pool[INSTRUMENTED]))
  return reporter ? reporter.stats() : null
}

module.exports = {
  instrument,
  reportPool,
  stats,
  /** Always true: the sender is pure JavaScript, nothing to build. */
  available: true,
  DEFAULT_SOCKET,
  Sender,
  senderFor,
  socketPathFromEnv,
  /** The OS thread id sent as `tid` by the mysql adapters (the event loop's thread). */
  tid: eventLoopTid,
  // for tests
  _internal: {
    connectionOf: pg.connectionOf,
    serverFromOptions: pg.serverFromOptions,
    isTimeout: pg.isTimeout,
    emitsRelease: pg.emitsRelease,
    formatAddress,
    mysqlConnectionOf: mysql.connectionOf,
    mysqlResultOfError: mysql.resultOfError,
  },
}
