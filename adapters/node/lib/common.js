'use strict'
// What every pool adapter of this package shares: naming a connection by its
// socket, and a reporter that remembers what is checked out and re-sends it
// (checkout_state) when the agent comes back and periodically.

const fs = require('node:fs')
const { senderFor, socketPathFromEnv, monotonicNs, putBytes, putUint, MAX_MESSAGE_BYTES } = require('./sender')

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

/** An acquire's state: its acquire_start not sent yet, sent, or ended. */
const STARTING = 0
const STARTED = 1
const ENDED = 2

function tidText(tid) {
  return Number.isInteger(tid) && tid > 0 ? `,"tid":${tid}` : ''
}

/** The wait of a folded acquire (null: its acquire_start was sent). */
function waitText(wait) {
  return wait === null ? '' : `,"wait_ns":${wait}`
}

/** What a connection reference caches about itself (symbols: JSON and the
 * messages never show them). References are made once per connection, so
 * the hot path builds no strings for them. */
const REF_KEY = Symbol('poolscope.refKey')
const REF_TEXT = Symbol('poolscope.refText')
const REF_BYTES = Symbol('poolscope.refBytes')

/** The fixed parts of a `checkout` line, as bytes. */
const CHECKOUT_REQUEST = Buffer.from(',"request":')
const CHECKOUT_TID = Buffer.from(',"tid":')
const CHECKOUT_WAIT = Buffer.from(',"wait_ns":')
const CHECKOUT_USE = Buffer.from(',"use_ns":')
const CHECKOUT_MONO = Buffer.from(',"mono_ns":')
const CLOSE_BRACE = 0x7d
/** The parts of a `checkouts` line (see `sendFolded`). */
const FOLDED_WAITS = Buffer.from(',"waits_ns":[')
const FOLDED_USES = Buffer.from('],"uses_ns":[')
const FOLDED_END = Buffer.from(']')
const COMMA = 0x2c
/** Checkouts folded into one `checkouts` line, at most (the protocol's
 * bound; 64 pairs of u64 digits fit in a message with any pool name). */
const MAX_FOLDED = 64
/** Room for the digits of any number the hot path writes (u64). */
const DIGITS = 20
/** A checkout line's bytes besides its head and connection. */
const CHECKOUT_FIXED =
  CHECKOUT_REQUEST.length + CHECKOUT_TID.length + CHECKOUT_WAIT.length + CHECKOUT_USE.length + CHECKOUT_MONO.length + 5 * DIGITS + 1
/** A `checkouts` line's bytes besides its head, connection and numbers. */
const FOLDED_FIXED = CHECKOUT_TID.length + FOLDED_WAITS.length + FOLDED_USES.length + FOLDED_END.length + CHECKOUT_MONO.length + 2 * DIGITS + 1

/** The checkouts' key of the connection `ref` names: its fd, else its address. */
function connKey(ref) {
  let key = ref[REF_KEY]
  if (key === undefined) {
    key = ref.fd !== undefined ? `fd:${ref.fd}` : `addr:${ref.local_address}`
    ref[REF_KEY] = key
  }
  return key
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
    /** Connections seen checked out: connection key -> { ref, monoNs
     * (BigInt; null once returned), tid, held (the acquire, its `wait`
     * set, while the checkout's acquire_end waits for the batch, else
     * null), waits/uses/foldTid/foldNs (short checkouts folded since the
     * last batch, see `fold`) }, and how many are out now. */
    this.out = new Map()
    this.outCount = 0
    this.unsubscribe = null
    /** Per kind: the message's opening text (see `head`). */
    this.heads = new Map()
    /** The `checkout` message's opening, as bytes. */
    this.checkoutHead = null
    /** Acquires whose acquire_start waits for the batch, newest first: a
     * list linked through the acquires (`prev`, `next`), so that an acquire
     * that ends at once, the usual one, leaves it without a search. */
    this.waitingHead = null
    /** The `checkouts` message's opening, as bytes. */
    this.foldedHead = null
    /** Whether the batch will call `sendPending`. */
    this.pendingScheduled = false
    this.sendPendingNow = () => this.sendPending()
  }

  /** Rare messages, built from an object. */
  send(kind, fields, monoNs) {
    return this.sender.send(Object.assign({ v: VERSION, kind, pool: this.name }, fields), monoNs)
  }

  /** `{"v":1,"kind":KIND,"pool":NAME` once per kind, with how many more
   * bytes than characters it takes in UTF-8 (the pool name may be any text;
   * everything the hot path adds to it is ASCII). */
  head(kind) {
    let h = this.heads.get(kind)
    if (h === undefined) {
      const text = `{"v":${VERSION},"kind":${JSON.stringify(kind)},"pool":${JSON.stringify(this.name)}`
      h = { text, extraBytes: Buffer.byteLength(text) - text.length }
      this.heads.set(kind, h)
    }
    return h
  }

  /** The hot path: `members` is ASCII JSON text, each member led by a comma. */
  sendMembers(kind, members, monoNs = monotonicNs()) {
    const h = this.head(kind)
    const text = `${h.text}${members},"mono_ns":${monoNs}}`
    return this.sender.sendText(text, text.length + h.extraBytes)
  }

  /** A connection reference's members (`,"local_address":...,"fd":...`),
   * built once per reference. */
  refText(ref) {
    if (ref === null || typeof ref !== 'object') return ''
    let text = ref[REF_TEXT]
    if (text === undefined) {
      text = ''
      if (ref.local_address !== undefined) text += `,"local_address":${JSON.stringify(ref.local_address)}`
      if (ref.fd !== undefined) text += `,"fd":${ref.fd}`
      ref[REF_TEXT] = text
    }
    return text
  }

  /** `refText` as UTF-8 bytes, made once per reference. */
  refBytes(ref) {
    let bytes = ref[REF_BYTES]
    if (bytes === undefined) {
      bytes = Buffer.from(this.refText(ref), 'utf8')
      ref[REF_BYTES] = bytes
    }
    return bytes
  }

  /**
   * The `checkout` message, the one every short checkout sends: written as
   * bytes straight into the sender's batch (no text is built, and the
   * numbers go in digit by digit).
   */
  sendCheckout(request, ref, tid, wait, use, monoNs) {
    const sender = this.sender
    let head = this.checkoutHead
    if (head === null) {
      head = Buffer.from(this.head('checkout').text, 'utf8')
      this.checkoutHead = head
    }
    const refBytes = this.refBytes(ref)
    let at = sender.openLine(head.length + refBytes.length + CHECKOUT_FIXED)
    if (at < 0) return false
    const buf = sender.lineBuffer
    at = putBytes(buf, at, head)
    at = putBytes(buf, at, CHECKOUT_REQUEST)
    at = putUint(buf, at, request)
    at = putBytes(buf, at, refBytes)
    if (Number.isInteger(tid) && tid > 0) {
      at = putBytes(buf, at, CHECKOUT_TID)
      at = putUint(buf, at, tid)
    }
    if (wait !== null) {
      at = putBytes(buf, at, CHECKOUT_WAIT)
      at = putUint(buf, at, wait)
    }
    at = putBytes(buf, at, CHECKOUT_USE)
    at = putUint(buf, at, use)
    at = putBytes(buf, at, CHECKOUT_MONO)
    at = putUint(buf, at, monoNs)
    buf[at] = CLOSE_BRACE
    return sender.commitLine(at + 1)
  }

  /**
   * The short checkouts of `entry`'s connection folded since the last
   * batch, as one `checkouts` line (bytes straight into the batch, as
   * `sendCheckout`), and forgotten.
   */
  sendFolded(entry) {
    const waits = entry.waits
    const n = waits.length
    if (n === 0) return true
    const uses = entry.uses
    const sender = this.sender
    let head = this.foldedHead
    if (head === null) {
      head = Buffer.from(this.head('checkouts').text, 'utf8')
      this.foldedHead = head
    }
    const refBytes = this.refBytes(entry.ref)
    let at = sender.openLine(head.length + refBytes.length + FOLDED_FIXED + 2 * n * (DIGITS + 1))
    if (at >= 0) {
      const buf = sender.lineBuffer
      at = putBytes(buf, at, head)
      at = putBytes(buf, at, refBytes)
      const tid = entry.foldTid
      if (Number.isInteger(tid) && tid > 0) {
        at = putBytes(buf, at, CHECKOUT_TID)
        at = putUint(buf, at, tid)
      }
      at = putBytes(buf, at, FOLDED_WAITS)
      for (let i = 0; i < n; i++) {
        if (i > 0) buf[at++] = COMMA
        at = putUint(buf, at, waits[i])
      }
      at = putBytes(buf, at, FOLDED_USES)
      for (let i = 0; i < n; i++) {
        if (i > 0) buf[at++] = COMMA
        at = putUint(buf, at, uses[i])
      }
      at = putBytes(buf, at, FOLDED_END)
      at = putBytes(buf, at, CHECKOUT_MONO)
      at = putUint(buf, at, entry.foldNs)
      buf[at] = CLOSE_BRACE
      sender.commitLine(at + 1)
    }
    waits.length = 0
    uses.length = 0
    return at >= 0
  }

  /** A short checkout of `entry`'s connection (no acquire_start was sent
   * for it), folded into the connection's next `checkouts` line. */
  fold(entry, wait, use, tid, monoNs) {
    entry.waits.push(wait)
    entry.uses.push(use)
    entry.foldTid = tid
    entry.foldNs = monoNs
    if (entry.waits.length >= MAX_FOLDED) return this.sendFolded(entry)
    return true
  }

  /** release, connection_created, connection_closed. */
  sendRef(kind, ref, monoNs = monotonicNs()) {
    return this.sendMembers(kind, this.refText(ref), monoNs)
  }

  /**
   * A caller asks for a connection: returns the acquire, to hand to
   * `handedOut` or `acquireEnd`. Its acquire_start waits for the sender's next batch, and
   * is never sent if the acquire ends first (most find an idle connection
   * at once): the acquire_end then carries the wait (`wait_ns`), one
   * message instead of two. An acquire still waiting when the batch leaves
   * has its acquire_start sent in it, with the time it began, so the agent
   * sees it pending within a few milliseconds.
   */
  acquireStart(tid) {
    const next = this.waitingHead
    const acquire = { request: this.nextRequestId(), monoNs: monotonicNs(), tid, state: STARTING, wait: null, prev: null, next }
    if (next !== null) next.prev = acquire
    this.waitingHead = acquire
    this.schedulePending()
    return acquire
  }

  /** `acquire` leaves the list of acquires whose acquire_start waits. */
  unlinkWaiting(acquire) {
    const { prev, next } = acquire
    if (prev !== null) prev.next = next
    else if (this.waitingHead === acquire) this.waitingHead = next
    if (next !== null) next.prev = prev
    acquire.prev = null
    acquire.next = null
  }

  /** `acquireStart`, or null if it failed (never into the application). */
  safeAcquireStart(tid) {
    try {
      return this.acquireStart(tid)
    } catch (e) {
      return null
    }
  }

  /** The subclass's `acquired(acquire, err, connection)` (the pool handed
   * out a connection or failed), never throwing into the application. */
  safeAcquired(acquire, err, connection) {
    try {
      this.acquired(acquire, err, connection)
    } catch (e) {
      // never into the application
    }
  }

  schedulePending() {
    if (this.pendingScheduled) return
    this.pendingScheduled = true
    this.sender.atNextWrite(this.sendPendingNow)
  }

  /**
   * When the batch leaves: the folded short checkouts, then the starts of
   * acquires still waiting and the ends of checkouts still out, in the
   * order they happened, so that the
   * agent sees the pool as a waiter saw it (the connections handed out
   * before it began already in use).
   */
  sendPending() {
    this.pendingScheduled = false
    // One pass over the pool's connections (no list grows per checkout):
    // the folded checkouts leave first, each having ended before its
    // connection's held acquire_end began.
    const events = []
    for (const entry of this.out.values()) {
      this.sendFolded(entry)
      if (entry.held !== null) events.push([entry.monoNs, null, entry])
    }
    for (let a = this.waitingHead; a !== null; a = a.next) events.push([a.monoNs, a, null])
    if (events.length === 0) return
    events.sort((x, y) => (x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : 0))
    for (const [, acquire, entry] of events) {
      if (entry !== null) {
        this.sendHeld(entry)
        continue
      }
      this.unlinkWaiting(acquire)
      acquire.state = STARTED
      this.sendMembers('acquire_start', `,"request":${acquire.request}${tidText(acquire.tid)}`, acquire.monoNs)
    }
  }

  /** The acquire ended at `monoNs` without a connection: `result` timeout
   * or error (or ok with a connection that cannot be named). */
  acquireEnd(acquire, result, ref, tid, monoNs) {
    const wait = this.endAcquire(acquire, monoNs)
    return this.sendMembers('acquire_end', this.endMembers(acquire.request, result, ref, tid, wait), monoNs)
  }

  /**
   * The acquire got `ref`'s connection at `monoNs`, for thread `tid`. Its
   * acquire_end waits for the sender's next batch, and if the connection
   * comes back first (a short checkout, the usual one) the pair leaves as
   * one `checkout` message (see `releasedConnection`); otherwise it is
   * sent with the batch, with its own time.
   */
  handedOut(acquire, ref, tid, monoNs) {
    const wait = this.endAcquire(acquire, monoNs)
    const entry = this.checkedOut(ref, monoNs, tid)
    if (entry.held !== null) this.sendHeld(entry)
    acquire.wait = wait
    entry.held = acquire
    this.schedulePending()
  }

  /** Ends the acquire; the wait to send with its end, or null when its
   * acquire_start was sent. */
  endAcquire(acquire, monoNs) {
    const folded = acquire.state === STARTING
    if (folded) this.unlinkWaiting(acquire)
    acquire.state = ENDED
    if (!folded) return null
    const wait = monoNs - acquire.monoNs
    return wait > 0n ? wait : 0n
  }

  endMembers(request, result, ref, tid, wait) {
    const conn = result === 'ok' ? this.refText(ref) : ''
    return `,"request":${request},"result":"${result}"${conn}${tidText(tid)}${waitText(wait)}`
  }

  /** The folded checkouts and held acquire_end of `entry`, sent now. */
  sendHeld(entry) {
    // Its folded checkouts came before it.
    this.sendFolded(entry)
    const held = entry.held
    if (held === null) return
    entry.held = null
    this.sendMembers('acquire_end', this.endMembers(held.request, 'ok', entry.ref, entry.tid, held.wait), entry.monoNs)
  }

  /**
   * The caller gave `ref`'s connection back. A checkout whose acquire_end
   * is still held is folded into the connection's `checkouts` line (its
   * wait, and its use from being handed out to now), or, if its
   * acquire_start was sent, leaves as one `checkout` message; otherwise a
   * `release`, if the connection was out (or `always`).
   */
  releasedConnection(ref, always) {
    const now = monotonicNs()
    const entry = this.out.get(connKey(ref))
    if (entry !== undefined && entry.held !== null) {
      const { held, tid } = entry
      entry.held = null
      let use = now - entry.monoNs
      if (use < 0n) use = 0n
      this.returned(ref)
      // No acquire_start was sent for it: nobody waits on its request.
      if (held.wait !== null) return this.fold(entry, held.wait, use, tid, now)
      return this.sendCheckout(held.request, entry.ref, tid, held.wait, use, now)
    }
    if (this.returned(ref) || always) return this.sendRef('release', ref, now)
    return false
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
    const entries = [...this.out.values()].filter((e) => e.monoNs !== null).sort((a, b) => (a.monoNs < b.monoNs ? -1 : a.monoNs > b.monoNs ? 1 : 0))
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

  /** `ref` was handed out at `monoNs` to thread `tid`. A connection's
   * entry stays in `out` between checkouts (marked returned), so that the
   * hot path neither adds nor deletes map entries; `forget` drops it. */
  checkedOut(ref, monoNs, tid) {
    const key = connKey(ref)
    let entry = this.out.get(key)
    if (entry === undefined) {
      entry = { ref, monoNs: null, tid: undefined, held: null, waits: [], uses: [], foldTid: undefined, foldNs: 0n }
      this.out.set(key, entry)
    }
    if (entry.monoNs === null) this.outCount += 1
    entry.ref = ref
    entry.monoNs = monoNs
    entry.tid = tid
    return entry
  }

  /** Forgets a checkout; true if `ref` was checked out. */
  returned(ref) {
    const entry = this.out.get(connKey(ref))
    if (entry !== undefined && entry.monoNs !== null) {
      entry.monoNs = null
      entry.tid = undefined
      this.outCount -= 1
      return true
    }
    // Named otherwise than when handed out: by its address.
    let found = false
    if (ref.local_address !== undefined) {
      for (const e of this.out.values()) {
        if (e.monoNs !== null && e.ref.local_address === ref.local_address) {
          e.monoNs = null
          e.tid = undefined
          this.outCount -= 1
          found = true
        }
      }
    }
    return found
  }

  /** The connection closed: its folded checkouts and held acquire_end sent (before the close),
   * returned, and its entry dropped. */
  forget(ref) {
    const entry = this.out.get(connKey(ref))
    if (entry !== undefined) this.sendHeld(entry)
    this.returned(ref)
    this.out.delete(connKey(ref))
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
      const tick = () => (this.outCount > 0 ? this.sendState() : this.register())
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
