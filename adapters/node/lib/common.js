'use strict'
// What every pool adapter of this package shares: naming a connection by its
// socket, and a reporter that remembers what is checked out and re-sends it
// (checkout_state) when the agent comes back and periodically.

const fs = require('node:fs')
const { senderFor, socketPathFromEnv, clockMs, monoNsAt, monotonicNs, nsBetween, putBytes, putUint, MAX_MESSAGE_BYTES } = require('./sender')
const { captureDue, captureStack, formatStack, skipOption, stackAfterFromEnv, stackIntervalFromEnv, stacksFromEnv, wholeNumber } = require('./stacks')

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

/** The acquire of a request that the pool serves from its idle connections
 * within the turn of the event loop that asked (pg-pool's and mysql2's
 * hand-out at the next tick, no I/O): no batch can leave before it ends,
 * so nothing is kept for it, and its wait, the rest of the turn, is the
 * caller's own time (see `handedOutAtOnce`). */
const AT_ONCE = Object.freeze({ atOnce: true })

function tidText(tid) {
  return Number.isInteger(tid) && tid > 0 ? `,"tid":${tid}` : ''
}

/** The wait of a folded acquire (-1: its acquire_start was sent). */
function waitText(wait) {
  return wait >= 0 ? `,"wait_ns":${wait}` : ''
}

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
/** Connections remembered with nothing out, at most: a pool whose closes
 * go unseen while its connections' addresses change keeps no more than
 * this many (the batch forgets idle ones past it; one seen again is
 * remembered anew). */
const MAX_IDLE_CONNS = 1024
/** The longest delay setTimeout takes (ms). */
const MAX_TIMEOUT_MS = 2 ** 31 - 1
/** Room for the digits of any number the hot path writes (u64). */
const DIGITS = 20
/** A checkout line's bytes besides its head and connection. */
const CHECKOUT_FIXED =
  CHECKOUT_REQUEST.length + CHECKOUT_TID.length + CHECKOUT_WAIT.length + CHECKOUT_USE.length + CHECKOUT_MONO.length + 5 * DIGITS + 1
/** A `checkouts` line's bytes besides its head, connection and numbers. */
const FOLDED_FIXED = CHECKOUT_TID.length + FOLDED_WAITS.length + FOLDED_USES.length + FOLDED_END.length + CHECKOUT_MONO.length + 2 * DIGITS + 1

/** A connection reference's members (`,"local_address":...,"fd":...`). */
function refText(ref) {
  let text = ''
  if (ref.local_address !== undefined) text += `,"local_address":${JSON.stringify(ref.local_address)}`
  if (ref.fd !== undefined) text += `,"fd":${ref.fd}`
  if (ref.conn !== undefined) text += `,"conn":${ref.conn}`
  return text
}

/** The key of the connection `ref` names: the adapter's id for it, else
 * its fd, else its address. */
function refKey(ref) {
  if (ref.conn !== undefined) return `conn:${ref.conn}`
  return ref.fd !== undefined ? `fd:${ref.fd}` : `addr:${ref.local_address}`
}

/**
 * One connection of the pool, made once (when first seen) with its
 * reference's text and bytes; the hot path only reads and writes its
 * fields. One class, so that those reads stay monomorphic.
 */
class Conn {
  constructor(ref) {
    this.ref = ref
    this.key = refKey(ref)
    this.text = refText(ref)
    this.bytes = Buffer.from(this.text, 'utf8')
    /** Handed out at (clockMs), or -1 while in the pool. */
    this.sinceMs = -1
    /** The holder's thread id, 0 if unknown. */
    this.tid = 0
    /** While the checkout's acquire_end waits for the batch (see
     * `Reporter#handedOut`): the acquire's request id, else 0; and its wait
     * (ns), or -1 if its acquire_start was sent. Numbers, not the acquire:
     * a long-lived object pointing at a young one costs every checkout a
     * write barrier and every scavenge a root. */
    this.heldRequest = 0
    this.heldWait = -1
    /** Short checkouts folded since the last batch (ns; see `fold`): their
     * waits and uses, the last holder and when the last one ended. */
    this.waits = new Float64Array(MAX_FOLDED)
    this.uses = new Float64Array(MAX_FOLDED)
    this.folded = 0
    this.foldTid = 0
    this.foldMs = 0
    /** False once the connection closed (`Reporter#forget`). */
    this.live = true
    /** Whether its connection_created was sent and its close is watched
     * (for pools whose hooks may see a connection first when handed out). */
    this.announced = false
    /** The stack of the code that took it (a capture, see stacks.js), while
     * it is out and its holder_stack is not sent; else null. */
    this.stack = null
    /** Once its holder_stack is sent, while it is out: the frames sent (as
     * JSON text, at most MAX_MESSAGE_BYTES), re-sent with every
     * checkout_state (a restarted agent learns the stack back); else null. */
    this.sentFrames = null
  }
}

/** A caller's request for a connection (see `Reporter#acquireStart`). */
class Acquire {
  constructor(request, startMs, tid, next) {
    this.request = request
    this.startMs = startMs
    this.tid = tid
    this.state = STARTING
    /** The list of acquires whose acquire_start waits for the batch. */
    this.prev = null
    this.next = next
  }
}

function threadId(tid) {
  return Number.isInteger(tid) && tid > 0 ? tid : 0
}

/**
 * Sends one pool's messages and keeps what re-sending its state needs.
 * Subclasses define `registration()` (the `pool` message's fields) and
 * `install()` (the hooks) and `refOf(handle)` (how the agent can find the
 * socket of the library's connection object).
 */
class Reporter {
  constructor(pool, options, fallbackName) {
    this.pool = pool
    this.sender = options.sender || senderFor(options.socketPath || socketPathFromEnv())
    this.name = truncate(nonEmpty(options.name) ?? fallbackName, MAX_POOL_NAME)
    this.nextRequest = 1
    this.timer = null
    /** The pool's connections by key (see `Conn`), checked out or not: a
     * connection's entry stays between checkouts, so that the hot path
     * neither adds nor deletes map entries; `forget` drops it. */
    this.conns = new Map()
    /** The pool library's connection objects (clients) -> their Conn, named
     * while the socket is open (see `connFor`). */
    this.handles = new WeakMap()
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
    /** Holder stacks (see stacks.js): captured at a checkout unless turned
     * off (`stacks: false`, POOLSCOPE_ADAPTER_STACKS=off), and only if at
     * least `stackIntervalMs` passed since the last capture in this process
     * (`stackIntervalUs`, POOLSCOPE_ADAPTER_STACK_INTERVAL_US; 0: at every
     * checkout); sent for a checkout still held `stackAfterMs` later. */
    this.stacks = typeof options.stacks === 'boolean' ? options.stacks : stacksFromEnv()
    this.stackAfterMs = wholeNumber(options.stackAfterMs) ?? stackAfterFromEnv()
    this.stackIntervalMs = (wholeNumber(options.stackIntervalUs) ?? stackIntervalFromEnv()) / 1000
    this.stackSkip = skipOption(options.stackSkip)
    /** One timer (unref'd) for the earliest stack due, set only while a
     * checkout with a stack is held past a batch. */
    this.stackTimer = null
    this.stackDueMs = Infinity
    this.checkStacksNow = () => {
      this.stackTimer = null
      this.stackDueMs = Infinity
      try {
        this.checkStacks()
      } catch (e) {
        // never into the application
      }
    }
  }

  /** The stack of the caller of `hook` (the adapter's function the
   * application called: the frames from it inward are left out), captured
   * unformatted; null with stacks off or when the last capture in this
   * process was less than `stackIntervalMs` ago. (The pg and mysql hooks
   * do the same in their own frame, see stacks.js.) */
  stackOf(hook) {
    return this.stacks && captureDue(this.stackIntervalMs) ? captureStack(hook) : null
  }

  /** The connection `ref` names (made the first time). */
  connOf(ref) {
    const key = refKey(ref)
    let conn = this.conns.get(key)
    if (conn === undefined) {
      conn = new Conn(ref)
      this.conns.set(key, conn)
    }
    return conn
  }

  /** The Conn of the library's connection object `handle`, or null if its
   * socket cannot be named (`refOf`, the subclass's). */
  connFor(handle) {
    let conn = this.handles.get(handle)
    if (conn === undefined || !conn.live) {
      const ref = this.refOf(handle)
      if (ref === null) return null
      conn = this.connOf(ref)
      if (handle && typeof handle === 'object') this.handles.set(handle, conn)
    }
    return conn
  }

  /** The known connection `ref` names, by its key or else by its address
   * (a reference taken later may lack the fd), or null. */
  knownConn(ref) {
    const conn = this.conns.get(refKey(ref))
    if (conn !== undefined) return conn
    if (ref.local_address === undefined) return null
    for (const c of this.conns.values()) if (c.ref.local_address === ref.local_address) return c
    return null
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

  /** `members` is ASCII JSON text, each member led by a comma. */
  sendMembers(kind, members, monoNs = monotonicNs()) {
    const h = this.head(kind)
    const text = `${h.text}${members},"mono_ns":${monoNs}}`
    return this.sender.sendText(text, text.length + h.extraBytes)
  }

  /** release, connection_created, connection_closed of `conn`. */
  sendConn(kind, conn, monoNs = monotonicNs()) {
    return this.sendMembers(kind, conn.text, monoNs)
  }

  /**
   * The `checkout` message (a checkout whose acquire_start was sent):
   * written as bytes straight into the sender's batch (no text is built,
   * and the numbers go in digit by digit).
   */
  sendCheckout(request, conn, tid, wait, use, monoNs) {
    const sender = this.sender
    let head = this.checkoutHead
    if (head === null) {
      head = Buffer.from(this.head('checkout').text, 'utf8')
      this.checkoutHead = head
    }
    let at = sender.openLine(head.length + conn.bytes.length + CHECKOUT_FIXED)
    if (at < 0) return false
    const buf = sender.lineBuffer
    at = putBytes(buf, at, head)
    at = putBytes(buf, at, CHECKOUT_REQUEST)
    at = putUint(buf, at, request)
    at = putBytes(buf, at, conn.bytes)
    if (tid > 0) {
      at = putBytes(buf, at, CHECKOUT_TID)
      at = putUint(buf, at, tid)
    }
    if (wait >= 0) {
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
   * The short checkouts of `conn` folded since the last batch, as one
   * `checkouts` line (bytes straight into the batch, as `sendCheckout`),
   * and forgotten.
   */
  sendFolded(conn) {
    const n = conn.folded
    if (n === 0) return true
    const waits = conn.waits
    const uses = conn.uses
    const sender = this.sender
    let head = this.foldedHead
    if (head === null) {
      head = Buffer.from(this.head('checkouts').text, 'utf8')
      this.foldedHead = head
    }
    let at = sender.openLine(head.length + conn.bytes.length + FOLDED_FIXED + 2 * n * (DIGITS + 1))
    if (at >= 0) {
      const buf = sender.lineBuffer
      at = putBytes(buf, at, head)
      at = putBytes(buf, at, conn.bytes)
      if (conn.foldTid > 0) {
        at = putBytes(buf, at, CHECKOUT_TID)
        at = putUint(buf, at, conn.foldTid)
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
      at = putUint(buf, at, monoNsAt(conn.foldMs))
      buf[at] = CLOSE_BRACE
      sender.commitLine(at + 1)
    }
    conn.folded = 0
    return at >= 0
  }

  /** A short checkout of `conn` (no acquire_start was sent for it),
   * folded into the connection's next `checkouts` line. */
  fold(conn, wait, use, tid, endMs) {
    const n = conn.folded
    conn.waits[n] = wait
    conn.uses[n] = use
    conn.folded = n + 1
    conn.foldTid = tid
    conn.foldMs = endMs
    if (n + 1 >= MAX_FOLDED) return this.sendFolded(conn)
    return true
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
    const acquire = new Acquire(this.nextRequestId(), clockMs(), threadId(tid), next)
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

  /** The subclass's `acquired(acquire, err, connection, stack)` (the pool
   * handed out a connection or failed; `stack` the caller's, see
   * `stackOf`), never throwing into the application. */
  safeAcquired(acquire, err, connection, stack = null) {
    try {
      this.acquired(acquire, err, connection, stack)
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
    // With nobody waiting, a checkout handed out less than a batch ago stays
    // held for the next batch: most end before it and fold (a busy loop is
    // mid-query at every batch, and would otherwise send an acquire_end and
    // a release per batch). One that lasts is sent a batch later; a waiter
    // sends every held one, so that the agent sees the pool as it saw it.
    const youngFromMs = this.waitingHead === null ? clockMs() - this.sender.batchMs : Infinity
    let kept = false
    // One pass over the pool's connections (no list grows per checkout):
    // the folded checkouts leave first, each having ended before its
    // connection's held acquire_end began.
    const events = []
    const prune = this.conns.size > MAX_IDLE_CONNS
    // The oldest checkout out with a stack still to send: the stack timer
    // is set for it (the only timer a held checkout needs).
    let stackSinceMs = Infinity
    for (const conn of this.conns.values()) {
      this.sendFolded(conn)
      if (prune && conn.heldRequest === 0 && conn.sinceMs < 0) {
        conn.live = false
        this.conns.delete(conn.key)
        continue
      }
      if (conn.stack !== null && conn.sinceMs >= 0 && conn.sinceMs < stackSinceMs) stackSinceMs = conn.sinceMs
      if (conn.heldRequest === 0) continue
      if (conn.sinceMs >= youngFromMs) kept = true
      else events.push([conn.sinceMs, null, conn])
    }
    if (kept) this.schedulePending()
    if (stackSinceMs !== Infinity) this.armStacks(stackSinceMs + this.stackAfterMs)
    for (let a = this.waitingHead; a !== null; a = a.next) events.push([a.startMs, a, null])
    if (events.length === 0) return
    events.sort((x, y) => x[0] - y[0])
    for (const [, acquire, conn] of events) {
      if (conn !== null) {
        this.sendHeld(conn)
        continue
      }
      this.unlinkWaiting(acquire)
      acquire.state = STARTED
      this.sendMembers('acquire_start', `,"request":${acquire.request}${tidText(acquire.tid)}`, monoNsAt(acquire.startMs))
    }
  }

  /** The acquire ended at `endMs` (clockMs) without a connection: `result`
   * timeout or error (or ok with a connection that cannot be named). */
  acquireEnd(acquire, result, conn, tid, endMs) {
    const wait = this.endAcquire(acquire, endMs)
    return this.sendMembers('acquire_end', this.endMembers(acquire.request, result, conn, threadId(tid), wait), monoNsAt(endMs))
  }

  /**
   * The acquire got `conn` at `endMs` (clockMs), for thread `tid`. Its
   * acquire_end waits for the sender's next batch, and if the connection
   * comes back first (a short checkout, the usual one) the pair is folded
   * into the connection's `checkouts` line (see `releasedConnection`);
   * otherwise it is sent with the batch, with its own time.
   */
  handedOut(acquire, conn, tid, endMs, stack = null) {
    const wait = this.endAcquire(acquire, endMs)
    this.holdCheckout(conn, acquire.request, wait, tid, endMs, stack)
  }

  /**
   * The pool's answer to `acquire` (an Acquire or AT_ONCE) at `endMs`:
   * `conn`, or null with `result` (the pool failed, or handed out a
   * connection that cannot be named). `stack`: the caller's (`stackOf`).
   */
  answered(acquire, result, conn, tid, endMs, stack = null) {
    if (acquire === AT_ONCE) {
      if (conn !== null) this.handedOutAtOnce(conn, tid, endMs, stack)
      // Not served after all (the pool ended meanwhile), or unnamed: an
      // acquire of no wait, ended now.
      else this.acquireEnd(this.acquireStart(tid), result, null, tid, endMs)
    } else if (conn !== null) this.handedOut(acquire, conn, tid, endMs, stack)
    else this.acquireEnd(acquire, result, null, tid, endMs)
  }

  /**
   * `conn` handed out at `endMs` by an acquire that found it idle within
   * the turn of the event loop that asked (AT_ONCE): its wait is 0.
   */
  handedOutAtOnce(conn, tid, endMs, stack = null) {
    this.holdCheckout(conn, this.nextRequestId(), 0, tid, endMs, stack)
  }

  /** `conn`'s checkout by `request`, its acquire_end held for the batch,
   * with the stack of the code that took it. */
  holdCheckout(conn, request, wait, tid, endMs, stack) {
    if (conn.heldRequest !== 0) this.sendHeld(conn)
    this.checkedOut(conn, endMs, tid)
    conn.heldRequest = request
    conn.heldWait = wait
    conn.stack = stack
    conn.sentFrames = null
    this.schedulePending()
  }

  /** The stack timer fires at `dueMs` (clockMs) or earlier, if it would
   * later. */
  armStacks(dueMs) {
    if (this.stackTimer !== null) {
      if (this.stackDueMs <= dueMs) return
      clearTimeout(this.stackTimer)
    }
    this.stackDueMs = dueMs
    // (Node's longest timeout: a later one fires early and is set again.)
    this.stackTimer = setTimeout(this.checkStacksNow, Math.min(MAX_TIMEOUT_MS, Math.max(0, Math.ceil(dueMs - clockMs()))))
    if (typeof this.stackTimer.unref === 'function') this.stackTimer.unref()
  }

  /**
   * The stacks of the checkouts held `stackAfterMs` or longer, formatted
   * and sent (once per checkout); the timer set for the next one due. A
   * checkout whose acquire_end still waits for the batch keeps its stack
   * until then: that batch sets the timer again, so the stack always
   * leaves after the acquire_end.
   */
  checkStacks() {
    const now = clockMs()
    let next = Infinity
    for (const conn of this.conns.values()) {
      if (conn.stack === null || conn.sinceMs < 0) continue
      const due = conn.sinceMs + this.stackAfterMs
      if (due > now) {
        if (due < next) next = due
        continue
      }
      if (conn.heldRequest !== 0) continue
      const holder = conn.stack
      conn.stack = null
      this.sendStack(conn, holder)
    }
    if (next !== Infinity) this.armStacks(next)
  }

  /** The `holder_stack` of `conn`'s checkout (its `since_ns` the
   * acquire_end's `mono_ns`), outer frames left out if the line would be
   * too long. */
  sendStack(conn, holder) {
    let frames = formatStack(holder, this.stackSkip)
    if (frames === null) return false
    const members = this.stackMembers(conn)
    const end = `,"mono_ns":${monotonicNs()}}`
    for (;;) {
      const json = JSON.stringify(frames)
      const text = `${members}${json}${end}`
      const bytes = Buffer.byteLength(text)
      if (bytes <= MAX_MESSAGE_BYTES || frames.length <= 1) {
        // Kept with the checkout while it is out (see `resendStacks`).
        conn.sentFrames = json
        return this.sender.sendText(text, bytes)
      }
      frames = frames.slice(0, -1)
    }
  }

  /** A holder_stack's opening, up to its `stack`. */
  stackMembers(conn) {
    return `${this.head('holder_stack').text}${conn.text},"since_ns":${monoNsAt(conn.sinceMs)},"stack":`
  }

  /** The holder_stack of every checkout out whose stack was sent, again
   * (same since_ns, same frames; the agent replaces it), after a
   * checkout_state: an agent restarted since knows the stacks of the leaks
   * that began before. */
  resendStacks() {
    for (const conn of this.conns.values()) {
      if (conn.sentFrames === null || conn.sinceMs < 0) continue
      const text = `${this.stackMembers(conn)}${conn.sentFrames},"mono_ns":${monotonicNs()}}`
      this.sender.sendText(text, Buffer.byteLength(text))
    }
  }

  /** Ends the acquire; the wait (ns) to send with its end, or -1 when its
   * acquire_start was sent. */
  endAcquire(acquire, endMs) {
    const folded = acquire.state === STARTING
    if (folded) this.unlinkWaiting(acquire)
    acquire.state = ENDED
    return folded ? nsBetween(acquire.startMs, endMs) : -1
  }

  endMembers(request, result, conn, tid, wait) {
    const named = result === 'ok' && conn !== null ? conn.text : ''
    return `,"request":${request},"result":"${result}"${named}${tidText(tid)}${waitText(wait)}`
  }

  /** The folded checkouts and held acquire_end of `conn`, sent now. */
  sendHeld(conn) {
    // Its folded checkouts came before it.
    this.sendFolded(conn)
    const request = conn.heldRequest
    if (request === 0) return
    conn.heldRequest = 0
    this.sendMembers('acquire_end', this.endMembers(request, 'ok', conn, conn.tid, conn.heldWait), monoNsAt(conn.sinceMs))
  }

  /**
   * The caller gave `conn` back. A checkout whose acquire_end is still
   * held is folded into the connection's `checkouts` line (its wait, and
   * its use from being handed out to now), or, if its acquire_start was
   * sent, leaves as one `checkout` message; otherwise a `release`, if the
   * connection was out (or `always`).
   */
  releasedConnection(conn, always) {
    const nowMs = clockMs()
    const request = conn.heldRequest
    if (request !== 0) {
      conn.heldRequest = 0
      const wait = conn.heldWait
      const use = nsBetween(conn.sinceMs, nowMs)
      const tid = conn.tid
      this.returned(conn)
      // No acquire_start was sent for it: nobody waits on its request.
      if (wait >= 0) return this.fold(conn, wait, use, tid, nowMs)
      return this.sendCheckout(request, conn, tid, wait, use, monoNsAt(nowMs))
    }
    if (this.returned(conn) || always) return this.sendConn('release', conn, monoNsAt(nowMs))
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
    this.resendStacks()
  }

  /** The checkout_state messages (Buffers), oldest checkouts first. */
  stateLines() {
    const out = [...this.conns.values()].filter((c) => c.sinceMs >= 0).sort((a, b) => a.sinceMs - b.sinceMs)
    if (out.length === 0) return []
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
    for (const c of out) {
      const fields = Object.assign({}, c.ref)
      if (c.tid > 0) fields.tid = c.tid
      // mono_ns written from the BigInt in full (past 2^53 too).
      const text = `${JSON.stringify(fields).slice(0, -1)},"mono_ns":${monoNsAt(c.sinceMs).toString()}}`
      const size = Buffer.byteLength(text)
      if (list.length > 0 && (list.length >= STATE_ENTRIES || bytes + 1 + size > MAX_MESSAGE_BYTES)) flush()
      bytes += (list.length > 0 ? 1 : 0) + size
      list.push(text)
    }
    flush()
    return lines
  }

  /** `conn` was handed out at `sinceMs` (clockMs) to thread `tid`. */
  checkedOut(conn, sinceMs, tid) {
    conn.sinceMs = sinceMs
    conn.tid = threadId(tid)
  }

  /** Whether any connection is checked out now. */
  anyOut() {
    for (const c of this.conns.values()) if (c.sinceMs >= 0) return true
    return false
  }

  /** `conn` is back in the pool; true if it was checked out. */
  returned(conn) {
    conn.stack = null
    conn.sentFrames = null
    if (conn.sinceMs < 0) return false
    conn.sinceMs = -1
    conn.tid = 0
    return true
  }

  /** The connection closed: its folded checkouts and held acquire_end sent
   * (before the close), returned, and its entry dropped. */
  forget(conn) {
    this.sendHeld(conn)
    this.returned(conn)
    conn.live = false
    if (this.conns.get(conn.key) === conn) this.conns.delete(conn.key)
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
      const tick = () => (this.anyOut() ? this.sendState() : this.register())
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
    if (this.stackTimer !== null) {
      clearTimeout(this.stackTimer)
      this.stackTimer = null
      this.stackDueMs = Infinity
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
  AT_ONCE,
  DEFAULT_REREGISTER_MS,
  MAX_IDLE_CONNS,
  Reporter,
  eventLoopTid,
  formatAddress,
  nonEmpty,
  positiveInt,
  refOfStreams,
  safely,
  withInner,
}
