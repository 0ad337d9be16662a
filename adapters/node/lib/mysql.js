'use strict'
// mysql2 (callback pools, and promise pools through the callback pool they
// wrap) and mysql (the older library): pool registration, acquires with
// their wait, releases, connections opened and closed.
//
// Both libraries' pools have the same shape: getConnection(cb),
// releaseConnection(conn) (which PoolConnection#release calls), the events
// `connection`, `acquire`, `enqueue` and `release`, and `config` with
// `connectionLimit`, `queueLimit` and the `connectionConfig`. A connection's
// socket is `conn.stream` in mysql2 and `conn._socket` in mysql.

const { clockMs } = require('./sender')
const { AT_ONCE, Reporter, eventLoopTid, nonEmpty, positiveInt, refOfStreams, safely, withInner } = require('./common')
const { CAPTURE_FRAMES, failedCapture, lastCapture } = require('./stacks')

/** Marks a getConnection callback that already has its acquire_start: the
 * pools call getConnection again with a queued callback (mysql when a
 * connection is released to a waiter; mysql2 when a removed connection's
 * waiter is served), which is the same request, not a new one. */
const WAITER = Symbol.for('poolscope-adapter.waiter')

/** A callback pool of mysql2 or mysql. */
function isCallbackPool(pool) {
  return (
    Boolean(pool) &&
    typeof pool.getConnection === 'function' &&
    typeof pool.releaseConnection === 'function' &&
    typeof pool.on === 'function' &&
    Boolean(pool.config) &&
    typeof pool.config === 'object' &&
    Boolean(pool.config.connectionConfig)
  )
}

/** mysql2's PromisePool (`pool.promise()`, `require('mysql2/promise').createPool`):
 * its `.pool` is the callback pool that does the work. */
function isPromisePool(pool) {
  return Boolean(pool) && typeof pool.getConnection === 'function' && isCallbackPool(pool.pool)
}

/** mysql2's pools have `promise()`; mysql's have not. */
function libraryOf(pool) {
  return typeof pool.promise === 'function' ? 'mysql2' : 'mysql'
}

/** The connection's socket: mysql2 `conn.stream` (a TLSSocket under TLS,
 * whose `_parent`/`socket` is the TCP socket), mysql `conn._socket`. */
function socketsOf(conn) {
  if (!conn || typeof conn !== 'object') return []
  const core = conn.connection && typeof conn.connection === 'object' && !conn.stream && !conn._socket ? conn.connection : conn
  return [...withInner(core.stream), ...withInner(core._socket)]
}

/** The newest of a pool's free connections: mysql2 keeps them in a
 * Denque (`peekBack`), older releases in an array. */
function newestOf(free) {
  return typeof free.peekBack === 'function' ? free.peekBack() : free[free.length - 1]
}

function connectionOf(conn) {
  return refOfStreams(socketsOf(conn))
}

/** The pool refused at once because it is exhausted (queueLimit reached,
 * waitForConnections false) or a wait ran out of time (mysql's
 * acquireTimeout, a connect timeout): `timeout`; anything else `error`. */
function resultOfError(err) {
  const code = err && typeof err.code === 'string' ? err.code : ''
  const message = err && typeof err.message === 'string' ? err.message : ''
  if (['POOL_ENQUEUELIMIT', 'POOL_CONNLIMIT', 'PROTOCOL_SEQUENCE_TIMEOUT', 'ETIMEDOUT'].includes(code)) return 'timeout'
  if (/^(Queue limit reached|No connections available)\.?$/.test(message)) return 'timeout'
  return /timeout|timed out/i.test(message) ? 'timeout' : 'error'
}

class MysqlReporter extends Reporter {
  constructor(pool, options) {
    const c = (pool.config && pool.config.connectionConfig) || {}
    const socketPath = nonEmpty(c.socketPath)
    const server = socketPath
      ? { host: socketPath, port: undefined, database: nonEmpty(c.database) }
      : { host: nonEmpty(c.host) ?? 'localhost', port: positiveInt(c.port) ?? 3306, database: nonEmpty(c.database) }
    const where = server.port === undefined ? server.host : `${server.host}:${server.port}`
    super(pool, options, `${where}/${server.database ?? ''}`.replace(/\/$/, ''))
    this.server = server
    this.library = libraryOf(pool)
  }

  registration() {
    const config = this.pool.config || {}
    const fields = { db_system: 'mysql', server_address: this.server.host, library: this.library }
    if (this.server.port !== undefined) fields.server_port = this.server.port
    if (this.server.database !== undefined) fields.namespace = this.server.database
    // connectionLimit 0 means no limit.
    const max = positiveInt(config.connectionLimit)
    if (max !== undefined && max > 0) fields.max = max
    // mysql2: idle connections beyond maxIdle are closed.
    const maxIdle = positiveInt(config.maxIdle)
    if (max !== undefined && max > 0 && maxIdle !== undefined && maxIdle < max) fields.idle_max = maxIdle
    return fields
  }

  refOf(conn) {
    return connectionOf(conn)
  }

  /** A connection the pool made (its `connection` event), or one first
   * seen when handed out: announce it and watch its socket close. */
  announce(conn) {
    if (!conn || typeof conn !== 'object') return
    const known = this.connFor(conn)
    if (known !== null && !known.announced) this.announceAs(conn, known)
  }

  /** `conn`'s connection_created, as `known`, and its socket's close watched. */
  announceAs(conn, known) {
    known.announced = true
    this.sendConn('connection_created', known)
    const [socket] = socketsOf(conn)
    if (socket && typeof socket.once === 'function') {
      socket.once(
        'close',
        safely(() => {
          this.forget(known)
          this.sendConn('connection_closed', known)
        })
      )
    }
  }

  acquired(acquire, err, conn, stack) {
    if (acquire === null) return
    const now = clockMs()
    const known = err ? null : this.connFor(conn)
    // One first seen when handed out is announced then.
    if (known !== null && !known.announced) this.announceAs(conn, known)
    this.answered(acquire, err ? resultOfError(err) : 'ok', known, eventLoopTid, now, stack)
  }

  /**
   * The free connections of `pool` when getConnection() on it now is
   * served from them within this turn of the event loop (AT_ONCE), else
   * null: mysql2 pops the newest one, emits `acquire` and hands it out at
   * the next tick when the pool is open and has one (nobody can queue
   * while one is free). mysql pings a connection idle for long before
   * handing it out, so its acquires are timed.
   */
  freeAtOnce(pool) {
    try {
      if (this.library !== 'mysql2' || pool._closed) return null
      const free = pool._freeConnections
      return free !== null && typeof free === 'object' && free.length > 0 ? free : null
    } catch (e) {
      return null // never into the application
    }
  }

  /** releaseConnection(conn) with the connection still in the pool
   * (`_pool` set) returns it; the pools also call it for connections they
   * removed (`_pool` null), which is a close, reported from the socket. */
  released(conn) {
    if (!conn || !conn._pool) return
    let known = this.handles.get(conn)
    if (known === undefined) {
      const ref = connectionOf(conn)
      known = ref === null ? null : this.knownConn(ref)
    }
    // Once per checkout: a second release of the same checkout is not one.
    if (known !== null) this.releasedConnection(known, false)
  }

  install() {
    const pool = this.pool
    const reporter = this
    pool.on('connection', safely((conn) => reporter.announce(conn)))

    // Called once per checkout: the pools pass one argument, so no rest
    // arguments are collected and spread for it (any others still pass).
    const originalGet = pool.getConnection
    pool.getConnection = function getConnection(cb) {
      if (typeof cb !== 'function' || cb[WAITER] !== undefined) return originalGet.apply(this, arguments)
      // Who asks (pool.query's or the promise pool's caller, through the
      // library's frames): captured unformatted, kept with the checkout,
      // formatted only if it is held long (see stacks.js, captureStack,
      // done here in the hook's own frame); and only if the last capture
      // in the process was at least stackIntervalMs ago (captureDue, done
      // here inline: a clock read, a comparison, a store), else the
      // checkout keeps no stack.
      let stack = null
      if (reporter.stacks) {
        const now = clockMs()
        if (now - lastCapture.ms >= reporter.stackIntervalMs) {
          lastCapture.ms = now
          const limit = Error.stackTraceLimit
          try {
            Error.stackTraceLimit = CAPTURE_FRAMES
            stack = {}
            Error.captureStackTrace(stack, getConnection)
            Error.stackTraceLimit = limit
          } catch (e) {
            stack = failedCapture(limit)
          }
        }
      }
      const free = reporter.freeAtOnce(this)
      if (free !== null) return getAtOnce(this, free, arguments, stack)
      const acquire = reporter.safeAcquireStart(eventLoopTid)
      const callback = function (err, conn) {
        reporter.safeAcquired(acquire, err, conn, stack)
        return arguments.length === 2 ? cb.call(this, err, conn) : cb.apply(this, arguments)
      }
      callback[WAITER] = acquire
      if (arguments.length === 1) return originalGet.call(this, callback)
      const args = Array.prototype.slice.call(arguments)
      args[0] = callback
      return originalGet.apply(this, args)
    }

    // A checkout served from the free connections (the usual one) is seen
    // in the call itself: the connection popped is the newest free one,
    // and the application's callback runs unwrapped (no closure, no extra
    // frame per checkout). Its time is the call's, a tick before the
    // callback, as good as the callback's for a checkout of no wait.
    function getAtOnce(self, free, args, stack) {
      let before = 0
      let newest
      try {
        before = free.length
        newest = newestOf(free)
      } catch (e) {
        newest = undefined // never into the application
      }
      const result = args.length === 1 ? originalGet.call(self, args[0]) : originalGet.apply(self, args)
      let popped = null
      try {
        // Only if the pool did take exactly that one (a pool that took
        // another would leave it the newest).
        if (newest !== undefined && free.length === before - 1 && newestOf(free) !== newest) popped = newest
      } catch (e) {
        // never into the application
      }
      reporter.safeAcquired(AT_ONCE, null, popped, stack)
      return result
    }

    const originalRelease = pool.releaseConnection
    pool.releaseConnection = function releaseConnection(conn) {
      try {
        reporter.released(conn)
      } catch (e) {
        // never into the application
      }
      return arguments.length === 1 ? originalRelease.call(this, conn) : originalRelease.apply(this, arguments)
    }

    this.wrapEnd()
  }
}

module.exports = { MysqlReporter, isCallbackPool, isPromisePool, connectionOf, resultOfError, WAITER }
