'use strict'
// poolscope adapter for node-postgres: reports what a pg.Pool does (pool
// registration, acquires with their wait, releases, connections opened and
// closed) to the poolscope agent, one datagram per event. See
// docs/adapter-protocol.md in the poolscope repository for the messages.
//
// It never throws into the application and never blocks the event loop:
// every hook is wrapped, and sends are non-blocking and dropped on error.

const { native, loadError } = require('./native')
const { Sender, senderFor, socketPathFromEnv, monotonicNs, DEFAULT_SOCKET } = require('./sender')

const VERSION = 1
const LIBRARY = 'node-postgres'
const MAX_POOL_NAME = 128
/** How often the registration is sent again, so that an agent that started
 * (or restarted) after the application still learns the pool's settings. */
const DEFAULT_REREGISTER_MS = 30_000

const INSTRUMENTED = Symbol.for('poolscope-adapter.instrumented')
const RELEASE_WRAPPED = Symbol.for('poolscope-adapter.release')

function safely(f) {
  return function (...args) {
    try {
      return f.apply(this, args)
    } catch (err) {
      return undefined
    }
  }
}

function truncate(text, max) {
  const chars = Array.from(text)
  return chars.length > max ? chars.slice(0, max).join('') : text
}

function positiveInt(value) {
  const n = typeof value === 'string' && value.trim() !== '' ? Number(value) : value
  return Number.isInteger(n) && n >= 0 ? n : undefined
}

function nonEmpty(value) {
  return typeof value === 'string' && value !== '' ? value : undefined
}

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

/** The client's socket, or under TLS the TCP socket beneath it. */
function clientStreams(client) {
  const stream = client && client.connection && client.connection.stream
  if (!stream) return []
  const out = [stream]
  for (const key of ['_parent', 'socket']) {
    const inner = stream[key]
    if (inner && typeof inner === 'object' && !out.includes(inner)) out.push(inner)
  }
  return out
}

function formatAddress(address, port) {
  return address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`
}

/** How the agent can find the connection: local "ip:port" and/or the fd. */
function connectionOf(client) {
  const ref = {}
  for (const s of clientStreams(client)) {
    if (ref.local_address === undefined) {
      const address = s.localAddress
      const port = s.localPort
      if (typeof address === 'string' && address !== '' && Number.isInteger(port) && port > 0) {
        ref.local_address = formatAddress(address, port)
      }
    }
    if (ref.fd === undefined) {
      const fd = s._handle && s._handle.fd
      if (Number.isInteger(fd) && fd >= 0) ref.fd = fd
    }
  }
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

/** Entries per checkout_state datagram (the agent takes up to 64). */
const STATE_ENTRIES = 32

function connKey(ref) {
  return ref.fd !== undefined ? `fd:${ref.fd}` : `addr:${ref.local_address}`
}

class PoolReporter {
  constructor(pool, options) {
    this.pool = pool
    this.sender = options.sender || senderFor(options.socketPath || socketPathFromEnv())
    const server = serverFromOptions(pool.options || {})
    this.server = server
    const fallbackName = `${server.host}:${server.port}/${server.database ?? ''}`.replace(/\/$/, '')
    this.name = truncate(nonEmpty(options.name) ?? fallbackName, MAX_POOL_NAME)
    this.nextRequest = 1
    /** client -> its connection reference, taken while the socket is open
     * (the pool emits `remove` only after the socket is closed). */
    this.connections = new WeakMap()
    this.learnedFromClient = false
    this.timer = null
    /** Checked out now: connection key -> { ref, monoNs (BigInt), tid }. */
    this.out = new Map()
    this.comebacksSeen = this.sender.comebacks || 0
  }

  send(kind, fields, monoNs) {
    const sent = this.sender.send(Object.assign({ v: VERSION, kind, pool: this.name }, fields), monoNs)
    this.afterSend()
    return sent
  }

  /** A send just found the agent back: it knows nothing of this pool. */
  afterSend() {
    const comebacks = this.sender.comebacks || 0
    if (comebacks !== this.comebacksSeen) {
      this.comebacksSeen = comebacks
      this.sendState()
    }
  }

  /**
   * The registration and the connections checked out now (`checkout_state`,
   * at most STATE_ENTRIES per datagram), sent when the agent comes back and
   * periodically while any are out; the agent takes it idempotently.
   */
  sendState() {
    this.register()
    const entries = [...this.out.values()].sort((a, b) => (a.monoNs < b.monoNs ? -1 : a.monoNs > b.monoNs ? 1 : 0))
    for (let i = 0; i < entries.length; i += STATE_ENTRIES) {
      const list = entries.slice(i, i + STATE_ENTRIES).map((e) => {
        const fields = Object.assign({}, e.ref)
        if (e.tid !== undefined) fields.tid = e.tid
        // mono_ns written from the BigInt in full (past 2^53 too).
        return `${JSON.stringify(fields).slice(0, -1)},"mono_ns":${e.monoNs.toString()}}`
      })
      const head = JSON.stringify({ v: VERSION, kind: 'checkout_state', pool: this.name })
      const text = `${head.slice(0, -1)},"checkouts":[${list.join(',')}],"mono_ns":${monotonicNs().toString()}}`
      this.sender.sendBytes(Buffer.from(text, 'utf8'))
    }
  }

  checkedOut(ref, monoNs) {
    this.out.set(connKey(ref), { ref, monoNs, tid: undefined })
  }

  returned(ref) {
    if (!this.out.delete(connKey(ref)) && ref.local_address !== undefined) {
      for (const [key, e] of this.out) {
        if (e.ref.local_address === ref.local_address) this.out.delete(key)
      }
    }
  }

  register() {
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
    this.send('pool', fields)
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

  connectionRef(client) {
    let ref = this.connections.get(client)
    if (ref === undefined) {
      ref = connectionOf(client)
      if (ref !== null && client && typeof client === 'object') this.connections.set(client, ref)
    }
    return ref
  }

  onConnect(client) {
    this.learnFrom(client)
    const ref = this.connectionRef(client)
    if (ref !== null) this.send('connection_created', ref)
  }

  onRemove(client) {
    const ref = this.connections.get(client) || connectionOf(client)
    if (ref) {
      this.returned(ref)
      this.send('connection_closed', ref)
    }
  }

  /** Called when pool.connect() hands out `client` (or fails). */
  acquired(request, err, client) {
    const now = monotonicNs()
    if (err) {
      this.send('acquire_end', { request, result: isTimeout(err) ? 'timeout' : 'error' }, now)
      return
    }
    const ref = this.connectionRef(client) || {}
    // Before sending: a comeback noticed by this very send re-sends the
    // state, this checkout included.
    if (ref.fd !== undefined || ref.local_address !== undefined) this.checkedOut(ref, now)
    this.send('acquire_end', Object.assign({ request, result: 'ok' }, ref), now)
    this.wrapRelease(client)
  }

  /** pg-pool gives each checkout its own client.release; report the first
   * call of it (a second one throws in pg-pool, as it would without us). */
  wrapRelease(client) {
    const original = client && client.release
    if (typeof original !== 'function' || original[RELEASE_WRAPPED]) return
    const reporter = this
    let reported = false
    const release = function (...args) {
      if (!reported) {
        reported = true
        try {
          const ref = reporter.connectionRef(client)
          if (ref !== null) {
            reporter.returned(ref)
            reporter.send('release', ref)
          }
        } catch (e) {
          // never into the application
        }
      }
      return original.apply(this, args)
    }
    release[RELEASE_WRAPPED] = true
    client.release = release
  }

  nextRequestId() {
    const id = this.nextRequest
    this.nextRequest = id >= Number.MAX_SAFE_INTEGER ? 1 : id + 1
    return id
  }

  install() {
    const pool = this.pool
    const reporter = this
    pool.on('connect', safely((client) => reporter.onConnect(client)))
    pool.on('remove', safely((client) => reporter.onRemove(client)))

    const originalConnect = pool.connect
    pool.connect = function connect(callback) {
      let request = 0
      try {
        request = reporter.nextRequestId()
        reporter.send('acquire_start', { request })
      } catch (e) {
        // never into the application
      }
      const done = safely((err, client) => reporter.acquired(request, err, client))
      if (typeof callback === 'function') {
        return originalConnect.call(this, function (err, client, release) {
          done(err, client)
          // The wrapped release, so that `done()`-style callers are seen too.
          const wrapped = !err && client && typeof client.release === 'function' ? client.release : release
          return callback.call(this, err, client, wrapped)
        })
      }
      const promise = originalConnect.call(this)
      if (!promise || typeof promise.then !== 'function') return promise
      return promise.then(
        (client) => {
          done(undefined, client)
          return client
        },
        (err) => {
          done(err)
          throw err
        }
      )
    }

    const originalEnd = pool.end
    if (typeof originalEnd === 'function') {
      pool.end = function end(...args) {
        reporter.stop()
        return originalEnd.apply(this, args)
      }
    }
  }

  /** The registration now, then every `reregisterMs` the registration
   * and, while connections are out, the checkouts (a restarted agent
   * learns them back even if the application stays idle). */
  start(reregisterMs) {
    this.register()
    if (reregisterMs > 0) {
      const tick = () => (this.out.size > 0 ? this.sendState() : this.register())
      this.timer = setInterval(safely(tick), reregisterMs)
      if (typeof this.timer.unref === 'function') this.timer.unref()
    }
  }

  stop() {
    if (this.timer !== null) {
      clearInterval(this.timer)
      this.timer = null
    }
  }

  stats() {
    return Object.assign({ pool: this.name }, this.sender.stats())
  }
}

/**
 * Reports a pg.Pool (pg-pool 3.x) to poolscope. Call it once, right after
 * creating the pool and before using it; returns the pool.
 *
 * options.name          pool name (1 to 128 characters; default host:port/database)
 * options.socketPath    agent socket (default $POOLSCOPE_ADAPTER_SOCKET, else
 *                       /run/poolscope/adapter.sock)
 * options.reregisterMs  resend the registration, and the connections checked
 *                       out (checkout_state), this often (default 30000; 0: never);
 *                       they are also re-sent when the agent comes back
 * options.stateIntervalMs  the same (it wins when both are given)
 *
 * One timer, two names: `reregisterMs` is the original option (README) and
 * stays for the applications that set it; `stateIntervalMs` is the name
 * docs/adapter-protocol.md gives it alongside the other adapters' settings.
 */
function instrument(pool, options = {}) {
  try {
    if (!pool || typeof pool.connect !== 'function' || typeof pool.on !== 'function') return pool
    if (pool[INSTRUMENTED]) return pool
    const opts = options && typeof options === 'object' ? options : {}
    const reporter = new PoolReporter(pool, opts)
    reporter.install()
    Object.defineProperty(pool, INSTRUMENTED, { value: reporter, enumerable: false, configurable: true })
    const every = positiveInt(opts.stateIntervalMs) ?? positiveInt(opts.reregisterMs)
    reporter.start(every === undefined ? DEFAULT_REREGISTER_MS : every)
  } catch (err) {
    // An adapter must never break the application.
  }
  return pool
}

/** What the adapter did for an instrumented pool (null if it is not). */
function stats(pool) {
  const reporter = pool && pool[INSTRUMENTED]
  return reporter ? reporter.stats() : null
}

module.exports = {
  instrument,
  stats,
  /** Whether the native sender loaded; if not, `nativeError` says why. */
  available: native !== null,
  nativeError: loadError,
  DEFAULT_SOCKET,
  Sender,
  // for tests
  _internal: { connectionOf, serverFromOptions, isTimeout, formatAddress },
}
