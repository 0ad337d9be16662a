'use strict'
// One datagram per message to the agent's socket, without ever blocking or
// throwing. A send that cannot happen (no agent, no native sender, a message
// too large) drops the message and counts it; one that cannot happen *yet*
// (the agent's queue is full) waits in a bounded backlog and is retried from
// a timer.

const { native } = require('./native')

/** Where the agent listens unless POOLSCOPE_ADAPTER_SOCKET says otherwise. */
const DEFAULT_SOCKET = '/run/poolscope/adapter.sock'
/** The agent refuses larger datagrams. */
const MAX_MESSAGE_BYTES = 4096

function socketPathFromEnv(env = process.env) {
  const fromEnv = env.POOLSCOPE_ADAPTER_SOCKET
  return typeof fromEnv === 'string' && fromEnv !== '' ? fromEnv : DEFAULT_SOCKET
}

/**
 * CLOCK_MONOTONIC nanoseconds: libuv's hrtime is clock_gettime(CLOCK_MONOTONIC)
 * on Linux, the clock the agent and the kernel use.
 */
function monotonicNs() {
  return process.hrtime.bigint()
}

/**
 * The message as JSON text. `mono_ns` (a BigInt) is written as a JSON integer
 * in full: JSON.stringify cannot write BigInts, and a Number would lose
 * precision once the machine has been up for more than 2^53 ns (104 days).
 */
function encode(message, monoNs) {
  let text = JSON.stringify(message)
  if (typeof monoNs === 'bigint' && monoNs >= 0n) {
    text = `${text.slice(0, -1)},"mono_ns":${monoNs.toString()}}`
  }
  return Buffer.from(text, 'utf8')
}

/** errnos that mean "the agent's receive queue is full for now". */
const EAGAIN = -11
const ENOBUFS = -105
// No agent listens: after these, the next send that succeeds means it came back.
const ENOENT = -2
const ECONNREFUSED = -111
/** Messages kept while the agent's queue is full (a few hundred KiB). */
const MAX_BACKLOG = 2048
/** Retry delays (ms) while the queue stays full; back to the first one as
 * soon as a message gets through. Timers only: an unref()ed setImmediate
 * does not wake an idle event loop, so a retry scheduled with it would wait
 * for the application's next I/O, however late that comes. */
const RETRY_DELAYS_MS = [1, 1, 2, 5, 10, 20]
/** A backlog that got nothing through for this long is given up: the agent
 * is stuck, and it would no longer trust the messages' times anyway. */
const GIVE_UP_MS = 10_000

function nowMs() {
  return Number(process.hrtime.bigint() / 1_000_000n)
}

class Sender {
  constructor(socketPath = socketPathFromEnv(), options = {}) {
    this.socketPath = socketPath
    this.maxBacklog = Number.isInteger(options.maxBacklog) ? options.maxBacklog : MAX_BACKLOG
    this.giveUpMs = Number.isInteger(options.giveUpMs) ? options.giveUpMs : GIVE_UP_MS
    this.fd = -1
    this.sent = 0
    this.dropped = 0
    /** Messages that waited for room in the agent's queue at least once. */
    this.deferred = 0
    /** errno (negative) of the last failed send, for diagnostics. */
    this.lastError = 0
    this.backlog = []
    this.retry = null
    this.retryStep = 0
    /** When the backlog last got a message through (or started). */
    this.lastProgressMs = 0
    /** Sends that succeeded after sends failed for want of an agent: each
     * is an agent (re)starting, and pools re-send their state. */
    this.comebacks = 0
    this.agentGone = false
  }

  /** Whether sends can reach a socket at all (the native sender loaded). */
  get active() {
    return native !== null
  }

  /**
   * Sends one message (an object with v, kind, pool, ...) stamped with
   * `monoNs` (BigInt, default now). True if the kernel took the datagram or
   * it waits in the backlog for room in the agent's queue; false if it was
   * dropped.
   */
  send(message, monoNs = monotonicNs()) {
    try {
      return this.sendBytes(encode(message, monoNs))
    } catch (err) {
      return this._drop(0)
    }
  }

  /** Sends a message already encoded (see `send`). */
  sendBytes(bytes) {
    try {
      if (native === null) return this._drop(0)
      if (this.fd < 0) {
        const fd = native.socket()
        if (fd < 0) return this._drop(fd)
        this.fd = fd
      }
      if (bytes.length > MAX_MESSAGE_BYTES) return this._drop(0)
      if (this.backlog.length > 0) {
        // Keep the order: behind what already waits, then try to catch up.
        const kept = this._defer(bytes)
        this._flush(false)
        return kept
      }
      const n = native.sendTo(this.fd, this.socketPath, bytes)
      if (n >= 0) {
        this.sent += 1
        this._arrived()
        return true
      }
      if (n === EAGAIN || n === ENOBUFS) return this._defer(bytes)
      return this._drop(n)
    } catch (err) {
      return this._drop(0)
    }
  }

  /**
   * The agent's queue is full (Linux lets an unconnected Unix datagram
   * socket queue only net.unix.max_dgram_qlen messages, 10 by default, and a
   * busy application fills that in microseconds). Dropping here would lose
   * releases and make false leak reports, so the message waits, bounded, and
   * is retried from a timer: never blocking, never keeping the process alive.
   */
  _defer(bytes) {
    if (this.backlog.length >= this.maxBacklog) return this._drop(EAGAIN)
    if (this.backlog.length === 0) this.lastProgressMs = nowMs()
    this.backlog.push(bytes)
    this.deferred += 1
    this._schedule()
    return true
  }

  _schedule() {
    if (this.retry !== null || this.backlog.length === 0) return
    const delay = RETRY_DELAYS_MS[Math.min(this.retryStep, RETRY_DELAYS_MS.length - 1)]
    const run = () => {
      this.retry = null
      this._flush(true)
    }
    this.retry = setTimeout(run, delay)
    // Messages still waiting when the application is otherwise done are
    // not worth keeping it alive for.
    if (typeof this.retry.unref === 'function') this.retry.unref()
  }

  /** Sends what waits, oldest first, until the queue is full again. A
   * retry from the timer that got nothing through waits longer next time. */
  _flush(fromTimer) {
    try {
      let progressed = false
      while (this.backlog.length > 0) {
        const n = native.sendTo(this.fd, this.socketPath, this.backlog[0])
        if (n === EAGAIN || n === ENOBUFS) break
        this.backlog.shift()
        progressed = true
        if (n >= 0) {
          this.sent += 1
          this._arrived()
        } else this._drop(n)
      }
      if (progressed) {
        this.retryStep = 0
        this.lastProgressMs = nowMs()
      } else if (fromTimer) {
        this.retryStep += 1
        if (this.backlog.length > 0 && nowMs() - this.lastProgressMs > this.giveUpMs) {
          this.lastError = EAGAIN
          this.dropped += this.backlog.length
          this.backlog = []
        }
      }
    } catch (err) {
      this.dropped += this.backlog.length
      this.backlog = []
    }
    this._schedule()
  }

  _arrived() {
    if (this.agentGone) {
      this.agentGone = false
      this.comebacks += 1
    }
  }

  _drop(errno) {
    if (errno === ENOENT || errno === ECONNREFUSED) this.agentGone = true
    this.dropped += 1
    if (errno) this.lastError = errno
    return false
  }

  stats() {
    return {
      active: this.active,
      socket: this.socketPath,
      sent: this.sent,
      dropped: this.dropped,
      deferred: this.deferred,
      waiting: this.backlog.length,
      lastError: this.lastError,
      comebacks: this.comebacks,
    }
  }

  close() {
    if (this.retry !== null) {
      clearTimeout(this.retry)
      this.retry = null
    }
    this.dropped += this.backlog.length
    this.backlog = []
    if (this.fd >= 0 && native !== null) {
      try {
        native.close(this.fd)
      } catch (err) {
        // nothing to do
      }
    }
    this.fd = -1
  }
}

const shared = new Map()

/** One sender per socket path for the whole process. */
function senderFor(socketPath = socketPathFromEnv()) {
  let sender = shared.get(socketPath)
  if (sender === undefined) {
    sender = new Sender(socketPath)
    shared.set(socketPath, sender)
  }
  return sender
}

module.exports = {
  DEFAULT_SOCKET,
  MAX_BACKLOG,
  MAX_MESSAGE_BYTES,
  Sender,
  encode,
  monotonicNs,
  senderFor,
  socketPathFromEnv,
}
