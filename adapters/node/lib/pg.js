'use strict'
// node-postgres (pg.Pool, pg-pool 3.x): pool registration, acquires with
// their wait, releases, connections opened and closed.

const { clockMs } = require('./sender')
const { AT_ONCE, Reporter, formatAddress, nonEmpty, positiveInt, refOfStreams, safely, withInner } = require('./common')
const { CAPTURE_FRAMES, failedCapture, lastCapture } = require('./stacks')

const LIBRARY = 'node-postgres'
const RELEASE_WRAPPED = Symbol.for('poolscope-adapter.release')

/** host, port and database as pg itself would pick them before connecting:
 * options, then the connection string, then the PG* environment, then pg's
 * defaults (localhost:5432, database named like the user). */
function serverFromOptions(options, env = process.env) {
  let url = null
  if (nonEmpty(options.connectionString)) {
    try {
      url = new URL(options.connectionString)
    } catch (err) {
      url = null
    }
  }
  const fromUrl = (key) => {
    if (url === null) return undefined
    const v = url.searchParams.get(key)
    return nonEmpty(v === null ? undefined : v)
  }
  const decode = (text) => {
    try {
      return decodeURIComponent(text)
    } catch (err) {
      return text
    }
  }
  const host =
    nonEmpty(options.host) ??
    fromUrl('host') ??
    (url && nonEmpty(decode(url.hostname).replace(/^\[(.*)\]$/, '$1'))) ??
    nonEmpty(env.PGHOST) ??
    'localhost'
  const port =
    positiveInt(options.port) ?? (url && positiveInt(url.port)) ?? positiveInt(env.PGPORT) ?? 5432
  const user =
    nonEmpty(options.user) ?? (url && nonEmpty(decode(url.username))) ?? nonEmpty(env.PGUSER) ?? nonEmpty(env.USER)
  const database =
    nonEmpty(options.database) ??
    (url && nonEmpty(decode(url.pathname.replace(/^\//, '')))) ??
    nonEmpty(env.PGDATABASE) ??
    user
  return { host, port, database }
}

/** How the agent can find the client's connection: local "ip:port" and/or
 * the fd (under TLS, of the TCP socket beneath). */
function connectionOf(client) {
  const stream = client && client.connection && client.connection.stream
  const ref = refOfStreams(withInner(stream)) || {}
  // pg-native (libpq) clients: the socket's fd, from libpq itself.
  if (ref.fd === undefined && client && client.native && client.native.pq) {
    const pq = client.native.pq
    const fd = typeof pq.socket === 'function' ? pq.socket() : undefined
    if (Number.isInteger(fd) && fd >= 0) ref.fd = fd
  }
  return ref.local_address !== undefined || ref.fd !== undefined ? ref : null
}

function isTimeout(err) {
  return Boolean(err && typeof err.message === 'string' && /timeout/i.test(err.message))
}

/** Whether the pool emits `release` (pg-pool 3.4 and later, from pg 8.7):
 * read from the code of its `_release`, since an older pool that lacks the
 * event would only be found out by a release never reported. */
function emitsRelease(pool) {
  const f = pool && pool._release
  if (typeof f !== 'function') return false
  try {
    return /\.emit\(\s*['"]release['"]/.test(Function.prototype.toString.call(f))
  } catch (err) {
    return false
  }
}

function isPgPool(pool) {
  return Boolean(pool) && typeof pool.connect === 'function' && typeof pool.on === 'function'
}

class PgReporter extends Reporter {
  constructor(pool, options) {
    const server = serverFromOptions(pool.options || {})
    super(pool, options, `${server.host}:${server.port}/${server.database ?? ''}`.replace(/\/$/, ''))
    this.server = server
    this.learnedFromClient = false
    /** Releases come from the pool's `release` event; otherwise from each
     * checkout's client.release, wrapped (see `wrapRelease`). */
    this.releaseEvent = emitsRelease(pool)
  }

  registration() {
    const options = this.pool.options || {}
    const fields = {
      db_system: 'postgresql',
      server_address: this.server.host,
      server_port: this.server.port,
      library: LIBRARY,
    }
    if (this.server.database !== undefined) fields.namespace = this.server.database
    const max = positiveInt(options.max)
    if (max !== undefined) fields.max = max
    const min = positiveInt(options.min)
    if (min !== undefined) fields.min_idle = min
    return fields
  }

  /** The first connected client says where pg really connected. */
  learnFrom(client) {
    if (this.learnedFromClient || !client) return
    this.learnedFromClient = true
    const host = nonEmpty(client.host)
    const port = positiveInt(client.port)
    const database = nonEmpty(client.database)
    const next = {
      host: host ?? this.server.host,
      port: port ?? this.server.port,
      database: database ?? this.server.database,
    }
    if (next.host !== this.server.host || next.port !== this.server.port || next.database !== this.server.database) {
      this.server = next
      this.register()
    }
  }

  /** The client's socket, named while it is open (the pool emits `remove`
   * only after the socket is closed). */
  refOf(client) {
    return connectionOf(client)
  }

  onConnect(client) {
    this.learnFrom(client)
    const conn = this.connFor(client)
    if (conn !== null) this.sendConn('connection_created', conn)
  }

  onRemove(client) {
    let conn = this.handles.get(client)
    if (conn === undefined) {
      const ref = connectionOf(client)
      conn = ref === null ? null : this.knownConn(ref) || this.connOf(ref)
    }
    if (conn !== null) {
      this.forget(conn)
      this.sendConn('connection_closed', conn)
    }
  }

  /** Called when pool.connect() hands out `client` (or fails); `stack`:
   * its caller's. */
  acquired(acquire, err, client, stack) {
    if (acquire === null) return
    const now = clockMs()
    const conn = err ? null : this.connFor(client)
    this.answered(acquire, err ? (isTimeout(err) ? 'timeout' : 'error') : 'ok', conn, 0, now, stack)
    if (!err && !this.releaseEvent) this.wrapRelease(client)
  }

  /** The checkout of `client` ended (reported once per checkout: pg-pool
   * throws on a second release before it would report it again). */
  onRelease(client) {
    const conn = this.connFor(client)
    if (conn !== null) this.releasedConnection(conn, true)
  }

  /** A pool without the `release` event gives each checkout its own
   * client.release: report the first call of it (a second one throws in
   * pg-pool, as it would without us). */
  wrapRelease(client) {
    const original = client && client.release
    if (typeof original !== 'function' || original[RELEASE_WRAPPED]) return
    const reporter = this
    let reported = false
    const release = function (...args) {
      if (!reported) {
        reported = true
        try {
          reporter.onRelease(client)
        } catch (e) {
          // never into the application
        }
      }
      return original.apply(this, args)
    }
    release[RELEASE_WRAPPED] = true
    client.release = release
  }

  install() {
    const pool = this.pool
    const reporter = this
    pool.on('connect', safely((client) => reporter.onConnect(client)))
    pool.on('remove', safely((client) => reporter.onRemove(client)))
    // Called once per checkout: a plain function (no rest arguments to
    // collect and apply, as `safely` does).
    if (this.releaseEvent) {
      pool.on('release', function onPoolRelease(err, client) {
        try {
          reporter.onRelease(client)
        } catch (e) {
          // never into the application
        }
      })
    }

    const originalConnect = pool.connect
    pool.connect = function connect(callback) {
      // Who asks (pool.query's caller, through pg-pool's frames): captured
      // unformatted, kept with the checkout, formatted only if it is held
      // long (see stacks.js, captureStack, done here in the hook's own
      // frame); and only if the last capture in the process was at least
      // stackIntervalMs ago (captureDue, done here inline: a clock read, a
      // comparison, a store), else the checkout keeps no stack.
      let stack = null
      if (reporter.stacks) {
        const now = clockMs()
        if (now - lastCapture.ms >= reporter.stackIntervalMs) {
          lastCapture.ms = now
          const limit = Error.stackTraceLimit
          try {
            Error.stackTraceLimit = CAPTURE_FRAMES
            stack = {}
            Error.captureStackTrace(stack, connect)
            Error.stackTraceLimit = limit
          } catch (e) {
            stack = failedCapture(limit)
          }
        }
      }
      // An idle client for this caller and every one ahead of it: pg-pool
      // hands it out at the next tick, within this turn of the event loop,
      // before any batch can leave, so nothing needs keeping for this
      // acquire (the usual case; its wait is the caller's own time).
      const acquire =
        !this.ending && this.idleCount > this.waitingCount ? AT_ONCE : reporter.safeAcquireStart(undefined)
      if (typeof callback === 'function') {
        return originalConnect.call(this, function (err, client, release) {
          reporter.safeAcquired(acquire, err, client, stack)
          // The wrapped release, so that `done()`-style callers are seen too.
          const wrapped = !err && client && typeof client.release === 'function' ? client.release : release
          return callback.call(this, err, client, wrapped)
        })
      }
      // The promise pg-pool would make, made here around its callback
      // form: one promise per acquire, as without the adapter, not a second
      // one chained to it.
      const PromiseImpl = typeof this.Promise === 'function' ? this.Promise : Promise
      return new PromiseImpl((resolve, reject) => {
        originalConnect.call(this, (err, client) => {
          reporter.safeAcquired(acquire, err, client, stack)
          if (err) reject(err)
          else resolve(client)
        })
      })
    }

    this.wrapEnd()
  }
}

module.exports = { PgReporter, isPgPool, connectionOf, serverFromOptions, isTimeout, formatAddress, emitsRelease }
