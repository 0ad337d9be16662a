'use strict'
// What every pool adapter of this package shares: naming a connection by its
// socket, and a reporter that remembers what is checked out and re-sends it
// (checkout_state) when the agent comes back and periodically.

const fs = require('node:fs')
const { senderFor, socketPathFromEnv, monotonicNs, MAX_MESSAGE_BYTES } = require('./sender')

const VERSION = 1
const MAX_POOL_NAME = 128
/** How often the registration is sent again, so that an agent that started
 * (or restarted) after the application still learns the pool's settings. */
const DEFAULT_REREGISTER_MS = 30_000
/** Entries per checkout_state message (the agent takes up to 64). */
const STATE_ENTRIES = 32

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

function formatAddress(address, port) {
  return address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`
}

/** A socket (net.Socket, or a TLSSocket) and the TCP socket beneath it. */
function withInner(stream) {
  if (!stream || typeof stream !== 'object') return []
  const out = [stream]
  for (const key of ['_parent', 'socket']) {
    const inner = stream[key]
    if (inner && typeof inner === 'object' && !out.includes(inner)) out.push(inner)
  }
  return out
}

/** How the agent can find the connection of these sockets: local "ip:port"
 * and/or the fd; null if they name none (not connected, closed). */
function refOfStreams(streams) {
  const ref = {}
  for (const s of streams) {
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
  return ref.local_address !== undefined || ref.fd !== undefined ? ref : null
}

/**
 * The OS thread id of the thread running this code: the event loop's thread
 * (the process's pid on the main thread, another id in a worker_threads
 * Worker). Read once per thread from /proc/thread-self; undefined elsewhere.
 */
const eventLoopTid = (() => {
  try {
    const m = /\/task\/(\d+)$/.exec(fs.readlinkSync('/proc/thread-self'))
    const tid = m ? Number(m[1]) : NaN
    return Number.isInteger(tid) && tid > 0 ? tid : undefined
  } catch (err) {
    return undefined
  }
})()

function connKey(ref) {
  return ref.fd !== undefined ? `fd:${ref.fd}` : `addr:${ref.local_address}`
}

/**
 * Sends one pool's messages and keeps what re-sending its state needs.
 * Subclasses define `registration()` (the `pool` message's fields) and
 * `install()` (the hooks).
 */
class Reporter {
  constructor(pool, options, fallbackName) {
    this.pool = pool
    this.sender = options.sender || senderFor(options.socketPath || socketPathFromEnv())
    this.name = truncate(nonEmpty(options.name) ?? fallbackName, MAX_POOL_NAME)
    this.nextRequest = 1
    this.timer = null
    /** Checked out now: connection key -> { ref, monoNs (BigInt), tid }. */
    this.out = new Map()
    this.unsubscribe = null
  }

  send(kind, fields, monoNs) {
    return this.sender.send(Object.assign({ v: VERSION, kind, pool: this.name }, fields), monoNs)
  }

  register() {
    this.send('pool', this.registration())
  }

  /**
   * The registration and the connections checked out now (`checkout_state`,
   * at most STATE_ENTRIES per message and never more than MAX_MESSAGE_BYTES
   * once encoded: a long non-ASCII pool name and IPv6 addresses take more
   * bytes than characters), sent when the agent comes back and periodically
   * while any are out; the agent takes it idempotently.
   */
  sendState() {
    this.register()
    for (const line of this.stateLines()) this.sender.sendBytes(line)
  }

  /** The checkout_state messages (Buffers), oldest checkouts first. */
  stateLines() {
    const entries = [...this.out.values()].sort((a, b) => (a.monoNs < b.monoNs ? -1 : a.monoNs > b.monoNs ? 1 : 0))
    if (entries.length === 0) return []
    const head = JSON.stringify({ v: VERSION, kind: 'checkout_state', pool: this.name })
    // One time for the whole state: when it was taken.
    const prefix = `${head.slice(0, -1)},"checkouts":[`
    const suffix = `],"mono_ns":${monotonicNs().toString()}}`
    const base = Buffer.byteLength(prefix) + Buffer.byteLength(suffix)
    const lines = []
    let list = []
    let bytes = base
    const flush = () => {
      lines.push(Buffer.from(`${prefix}${list.join(',')}${suffix}`, 'utf8'))
      list = []
      bytes = base
    }
    for (const e of entries) {
      const fields = Object.assign({}, e.ref)
      if (e.tid !== undefined) fields.tid = e.tid
      // mono_ns written from the BigInt in full (past 2^53 too).
      const text = `${JSON.stringify(fields).slice(0, -1)},"mono_ns":${e.monoNs.toString()}}`
      const size = Buffer.byteLength(text)
      if (list.length > 0 && (list.length >= STATE_ENTRIES || bytes + 1 + size > MAX_MESSAGE_BYTES)) flush()
      bytes += (list.length > 0 ? 1 : 0) + size
      list.push(text)
    }
    flush()
    return lines
  }

  checkedOut(ref, monoNs, tid) {
    this.out.set(connKey(ref), { ref, monoNs, tid })
  }

  /** Forgets a checkout; true if `ref` was checked out. */
  returned(ref) {
    if (this.out.delete(connKey(ref))) return true
    let found = false
    if (ref.local_address !== undefined) {
      for (const [key, e] of this.out) {
        if (e.ref.local_address === ref.local_address) {
          this.out.delete(key)
          found = true
        }
      }
    }
    return found
  }

  isOut(ref) {
    return this.out.has(connKey(ref))
  }

  nextRequestId() {
    const id = this.nextRequest
    this.nextRequest = id >= Number.MAX_SAFE_INTEGER ? 1 : id + 1
    return id
  }

  /** The registration now, then every `everyMs` the registration and, while
   * connections are out, the checkouts (a restarted agent learns them back
   * even if the application stays idle); and both whenever the sender
   * reconnects after losing the agent. */
  start(everyMs) {
    this.register()
    if (typeof this.sender.onComeback === 'function') {
      this.unsubscribe = this.sender.onComeback(safely(() => this.sendState()))
    }
    if (everyMs > 0) {
      const tick = () => (this.out.size > 0 ? this.sendState() : this.register())
      this.timer = setInterval(safely(tick), everyMs)
      if (typeof this.timer.unref === 'function') this.timer.unref()
    }
  }

  /** Stops the timers when the application ends the pool. */
  wrapEnd() {
    const reporter = this
    const originalEnd = this.pool.end
    if (typeof originalEnd !== 'function') return
    this.pool.end = function end(...args) {
      reporter.stop()
      return originalEnd.apply(this, args)
    }
  }

  stop() {
    if (this.timer !== null) {
      clearInterval(this.timer)
      this.timer = null
    }
    if (this.unsubscribe !== null) {
      this.unsubscribe()
      this.unsubscribe = null
    }
  }

  stats() {
    return Object.assign({ pool: this.name }, this.sender.stats())
  }
}

module.exports = {
  DEFAULT_REREGISTER_MS,
  Reporter,
  eventLoopTid,
  formatAddress,
  nonEmpty,
  positiveInt,
  refOfStreams,
  safely,
  withInner,
}
