'use strict'
// Pools no integration covers: a pool the application keeps itself (SQLite
// handles, sockets a library hides), reported from the pool's own code.
// Connections are named by the objects the pool passes (the handle itself)
// and numbered by the reporter: the protocol's `conn` id, beside the
// socket's fd and local address when the pool can name its socket.

const { Reporter, eventLoopTid, nonEmpty, positiveInt, refOfStreams, withInner } = require('./common')
const { clockMs } = require('./sender')

/** A `db_system` the agent takes: a `db.system.name` of the semantic
 * conventions (postgresql, sqlite...). */
const SYSTEM_NAME = /^[a-z0-9._]{1,32}$/
const MAX_TEXT = 128

function text(value) {
  const t = nonEmpty(typeof value === 'string' ? value : undefined)
  return t === undefined ? undefined : t.slice(0, MAX_TEXT)
}

class GenericReporter extends Reporter {
  constructor(options) {
    super(null, options, 'pool')
    this.options = options
    /** Handles -> their number (the `conn` id), for as long as they live. */
    this.ids = new WeakMap()
    this.nextId = 1
    /** Handles -> their socket's fd and local address, when the pool named
     * the socket at `connectionCreated`. */
    this.sockets = new WeakMap()
  }

  registration() {
    const o = this.options
    const fields = {}
    if (typeof o.dbSystem === 'string' && SYSTEM_NAME.test(o.dbSystem)) fields.db_system = o.dbSystem
    const server = text(o.serverAddress)
    if (server !== undefined) fields.server_address = server
    const port = positiveInt(o.serverPort)
    if (port !== undefined && port <= 65535) fields.server_port = port
    const namespace = text(o.namespace)
    if (namespace !== undefined) fields.namespace = namespace
    const max = positiveInt(o.max)
    if (max !== undefined) fields.max = max
    const minIdle = positiveInt(o.minIdle)
    if (minIdle !== undefined) fields.min_idle = minIdle
    const library = text(o.library)
    if (library !== undefined) fields.library = library
    return fields
  }

  /** The handle's number, and its socket when the pool named one. */
  refOf(handle) {
    if (handle === null || (typeof handle !== 'object' && typeof handle !== 'function')) return null
    let id = this.ids.get(handle)
    if (id === undefined) {
      id = this.nextId
      this.nextId = id >= Number.MAX_SAFE_INTEGER ? 1 : id + 1
      this.ids.set(handle, id)
    }
    return Object.assign({ conn: id }, this.sockets.get(handle))
  }

  connectionCreated(handle, socket) {
    if (socket !== undefined && socket !== null && handle && !this.sockets.has(handle)) {
      const named = refOfStreams(withInner(socket))
      if (named) this.sockets.set(handle, named)
    }
    const conn = this.connFor(handle)
    if (conn !== null) this.sendConn('connection_created', conn)
  }

  acquired(acquire, handle, stack = null) {
    const conn = this.connFor(handle)
    if (conn !== null) this.handedOut(acquire, conn, eventLoopTid, clockMs(), stack)
    else this.acquireEnd(acquire, 'ok', null, eventLoopTid, clockMs())
  }

  released(handle) {
    const conn = this.connFor(handle)
    if (conn !== null) this.releasedConnection(conn, true)
  }

  connectionClosed(handle) {
    const conn = this.handles.get(handle)
    if (conn === undefined || !conn.live) return
    this.forget(conn)
    this.sendConn('connection_closed', conn)
    this.handles.delete(handle)
    this.ids.delete(handle)
    this.sockets.delete(handle)
  }
}

/** One caller waiting for a connection: end it once with `ok(handle)`,
 * `timeout()` or `error()`. */
class Waiting {
  constructor(reporter, acquire, stack = null) {
    this.reporter = reporter
    this.acquire = acquire
    /** The stack of the code that asked (see stacks.js). */
    this.stack = stack
  }

  /** The caller got `handle`. */
  ok(handle) {
    try {
      if (this.acquire !== null) this.reporter.acquired(this.acquire, handle, this.stack)
    } catch (e) {
      // never into the application
    }
    this.acquire = null
    this.stack = null
  }

  /** The pool gave up waiting. */
  timeout() {
    this.end('timeout')
  }

  /** The pool failed, or the caller stopped waiting. */
  error() {
    this.end('error')
  }

  end(result) {
    try {
      if (this.acquire !== null) this.reporter.acquireEnd(this.acquire, result, null, eventLoopTid, clockMs())
    } catch (e) {
      // never into the application
    }
    this.acquire = null
    this.stack = null
  }
}

/** The application's side of one reported pool: every method swallows its
 * own errors and never blocks. */
class ReportedPool {
  constructor(reporter) {
    this.reporter = reporter
    this.name = reporter.name
  }

  /** The pool opened `handle`; `socket` (a net.Socket or a stream over
   * one), if the pool can name it, joins it to the kernel's view. */
  connectionCreated(handle, socket) {
    try {
      this.reporter.connectionCreated(handle, socket)
    } catch (e) {
      // never into the application
    }
  }

  /** A caller asks for a connection: call before the pool may wait. The
   * stack of the code that called it is kept with the checkout (the
   * pool's own frames count as the application's unless `stackSkip`
   * names its file). */
  acquire() {
    return new Waiting(this.reporter, this.reporter.safeAcquireStart(eventLoopTid), this.reporter.stackOf(ReportedPool.prototype.acquire))
  }

  /** The caller gave `handle` back to the pool. */
  released(handle) {
    try {
      this.reporter.released(handle)
    } catch (e) {
      // never into the application
    }
  }

  /** The pool closed or discarded `handle`; it is forgotten. */
  connectionClosed(handle) {
    try {
      this.reporter.connectionClosed(handle)
    } catch (e) {
      // never into the application
    }
  }

  /** Changes the registration (e.g. a new `max`) and sends it again. */
  update(options) {
    try {
      Object.assign(this.reporter.options, options)
      this.reporter.register()
    } catch (e) {
      // never into the application
    }
  }

  /** Stops the periodic re-sends (when the pool is shut down). */
  stop() {
    this.reporter.stop()
  }

  stats() {
    return this.reporter.stats()
  }
}

module.exports = { GenericReporter, ReportedPool, Waiting, SYSTEM_NAME }
