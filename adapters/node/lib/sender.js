'use strict'
// Newline-delimited JSON messages on the agent's Unix stream socket
// (docs/adapter-protocol.md, "The stream socket"), in pure JavaScript.
//
// The promises every adapter keeps: a send never blocks and never throws
// into the application. While there is no connection (the agent is absent,
// restarting, or the first connect is still under way) messages wait in a
// small bounded backlog, in order; a full backlog drops new messages and
// counts them. Once connected, a message joins a batch of lines written to
// the socket together some milliseconds later (BATCH_MS), unless the socket
// already buffers too much (an agent that stopped reading): then it
// is dropped and counted, so that Node's write buffer cannot grow without
// bound. A lost connection is re-opened with a backoff. Socket and timers are
// unref()ed: the adapter never keeps a process alive.

const net = require('node:net')
const { performance } = require('node:perf_hooks')

/** Where the agent listens unless POOLSCOPE_ADAPTER_STREAM_SOCKET says otherwise. */
const DEFAULT_SOCKET = '/run/poolscope/adapter-stream.sock'
/** The agent drops a stream whose line (without its newline) is longer. */
const MAX_MESSAGE_BYTES = 4096
/** How long a line may wait for the lines after it (ms): a busy
 * application writes the messages of many acquires in one system call, and
 * the agent reads them in one wake-up, instead of one of each per query.
 * The batch leaves at the next tick of an interval timer of this period,
 * which runs while lines come and stops at the first tick that finds none:
 * nothing per message or per turn of the event loop, and no timer made and
 * cleared per batch (Node keeps a timer list per duration, and a list made
 * and dropped a hundred times a second made every other timer of the
 * application, such as a pool's idle timers, slower to set). A batch
 * costs one write and one wake-up of the agent whatever it holds, 70 µs of
 * the application's CPU on a slow test VM: 50 ms keeps that under 0.2 % of
 * a core, and the agent still sees a waiter or a held connection within a
 * blink of a scrape. */
const BATCH_MS = 50
/** A batch this large (bytes) is written at once. */
const BATCH_MAX_BYTES = 16 * 1024
/** Messages kept while not connected (at most a few hundred KiB). */
const MAX_BACKLOG = 1024
/** Bytes Node may buffer on a connected socket before new messages are dropped. */
const MAX_WRITABLE_BYTES = 256 * 1024
/** Delays (ms) before reconnecting, one step further after each failure;
 * back to the first once a connection has lasted STABLE_MS. */
const RECONNECT_DELAYS_MS = [50, 100, 250, 500, 1000, 2000, 5000]
/** A connection that lasts this long is the agent taking us: it resets the
 * backoff and, after a failure, counts as a comeback. One lost sooner (an
 * agent at its stream limit accepts and closes at once) does neither. */
const STABLE_MS = 1000
/** A backlog that found no agent for this long is given up: the agent would
 * no longer trust the messages' times anyway (it clamps at 10 minutes). */
const GIVE_UP_MS = 60_000

function socketPathFromEnv(env = process.env) {
  const fromEnv = env.POOLSCOPE_ADAPTER_STREAM_SOCKET
  return typeof fromEnv === 'string' && fromEnv !== '' ? fromEnv : DEFAULT_SOCKET
}

/**
 * The adapter's one clock: performance.now(), milliseconds as a double, which
 * libuv reads from CLOCK_MONOTONIC (the agent's and the kernel's clock) like
 * process.hrtime. The hot path keeps its times as plain Numbers: a BigInt per
 * reading (and per difference) made every checkout measurably slower in a
 * query loop. A time becomes the agent's `mono_ns` (`monoNsAt`) only when a
 * line is written.
 */
const clockMs = () => performance.now()

/** CLOCK_MONOTONIC ns at clockMs() 0, from the tightest of a few paired
 * readings, and how far off it may be (half that pair's window). */
const [MONO_BASE_NS, MONO_BASE_SLACK_NS] = (() => {
  let best = null
  for (let i = 0; i < 32; i++) {
    const before = process.hrtime.bigint()
    const ms = performance.now()
    const after = process.hrtime.bigint()
    const window = after - before
    if (best === null || window < best[1]) best = [(before + after) / 2n - BigInt(Math.round(ms * 1e6)), window]
  }
  return [best[0], Number(best[1] / 2n) + 1]
})()

/** The agent's `mono_ns` (CLOCK_MONOTONIC ns, in full as a BigInt: a Number
 * loses precision once the machine has been up 104 days) of a clockMs() time. */
function monoNsAt(ms) {
  return MONO_BASE_NS + BigInt(Math.round(ms * 1e6))
}

/** CLOCK_MONOTONIC nanoseconds now (see `clockMs`). */
function monotonicNs() {
  return monoNsAt(performance.now())
}

/** Nanoseconds from one clockMs() time to a later one (0 if not later). */
function nsBetween(fromMs, toMs) {
  const ns = Math.round((toMs - fromMs) * 1e6)
  return ns > 0 ? ns : 0
}

/**
 * The message as JSON text. `mono_ns` (a BigInt) is written as a JSON integer
 * in full: JSON.stringify cannot write BigInts, and a Number would lose
 * precision once the machine has been up for more than 2^53 ns (104 days).
 * JSON.stringify escapes control characters, so the text holds no newline.
 */
function encodeText(message, monoNs) {
  const text = JSON.stringify(message)
  return typeof monoNs === 'bigint' && monoNs >= 0n ? `${text.slice(0, -1)},"mono_ns":${monoNs.toString()}}` : text
}

/** The message as UTF-8 bytes (see `encodeText`). */
function encode(message, monoNs) {
  return Buffer.from(encodeText(message, monoNs), 'utf8')
}

const NEWLINE = 0x0a
const DIGIT_0 = 0x30

/** Writes the non-negative integer `n` (a Number up to 2^53, or a BigInt)
 * as decimal digits at `at`; returns the end. The hot path's numbers go in
 * digit by digit: no string is made for them. */
function putUint(buf, at, n) {
  if (typeof n === 'bigint') {
    const small = Number(n)
    if (!Number.isSafeInteger(small)) return at + buf.latin1Write(n.toString(), at)
    n = small
  }
  let len = 1
  for (let x = n; x >= 10; x = Math.floor(x / 10)) len += 1
  let end = at + len
  while (n > 0x7fffffff) {
    const q = Math.floor(n / 10)
    buf[--end] = DIGIT_0 + (n - q * 10)
    n = q
  }
  let m = n | 0
  while (end > at) {
    const q = (m / 10) | 0
    buf[--end] = DIGIT_0 + (m - q * 10)
    m = q
  }
  return at + len
}

/** Copies `bytes` (a Buffer) to `buf` at `at`; returns the end. */
function putBytes(buf, at, bytes) {
  buf.set(bytes, at)
  return at + bytes.length
}

/** Room for a batch that reached BATCH_MAX_BYTES by its last line. */
function newBatchBuffer() {
  return Buffer.allocUnsafe(BATCH_MAX_BYTES + MAX_MESSAGE_BYTES + 1)
}

function nowMs() {
  return performance.now()
}

function option(value, fallback) {
  return Number.isInteger(value) && value >= 0 ? value : fallback
}

class Sender {
  /**
   * options: maxBacklog, maxWritableBytes, reconnectDelaysMs (array),
   * giveUpMs, stableMs: bounds and timings above (tests shorten them).
   */
  constructor(socketPath = socketPathFromEnv(), options = {}) {
    this.socketPath = socketPath
    this.maxBacklog = option(options.maxBacklog, MAX_BACKLOG)
    this.maxWritableBytes = option(options.maxWritableBytes, MAX_WRITABLE_BYTES)
    this.reconnectDelaysMs =
      Array.isArray(options.reconnectDelaysMs) && options.reconnectDelaysMs.length > 0
        ? options.reconnectDelaysMs
        : RECONNECT_DELAYS_MS
    this.giveUpMs = option(options.giveUpMs, GIVE_UP_MS)
    this.stableMs = option(options.stableMs, STABLE_MS)
    this.stableTimer = null
    /** null, or the socket: connecting until `connected`. */
    this.socket = null
    this.connected = false
    this.closed = false
    this.reconnectTimer = null
    this.failures = 0
    this.backlog = []
    /** When the backlog's oldest message was queued. */
    this.backlogSinceMs = 0
    /** Messages written to a connected socket. */
    this.sent = 0
    this.dropped = 0
    /** Messages that waited in the backlog for a connection. */
    this.deferred = 0
    /** Connections made, and lost (or refused). */
    this.connects = 0
    this.disconnects = 0
    /** The last error's code (ENOENT, ECONNREFUSED, EPIPE...), for diagnostics. */
    this.lastError = null
    /** Connections made after a connection failed or was lost, that lasted
     * (stableMs): each may be a new agent that knows nothing of this
     * process's pools. Pools re-send their registration and checkouts on
     * every connection after a failure (before what waited), counted or not. */
    this.comebacks = 0
    /** Lines waiting to be written together (one buffer, one system call)
     * when `batchMs` have passed since the first, or once they reach
     * BATCH_MAX_BYTES. */
    this.batchMs = option(options.batchMs, BATCH_MS)
    this.batch = newBatchBuffer()
    /** Where `openLine` lets the caller write: the batch, or (not connected)
     * `scratch`, whose line then waits in the backlog as text. */
    this.scratch = null
    this.lineBuffer = null
    this.batchBytes = 0
    this.batchLines = 0
    this.batchSocket = null
    /** When the batch's first line (or callback) came (performance.now()
     * ms), or null: nothing waits. */
    this.batchSinceMs = null
    /** The interval (or immediate, when batchMs is 0) that writes the batch. */
    this.flushTimer = null
    /** Called just before the batch is written (see `atNextWrite`). */
    this.beforeWrite = []
    this.flushNow = () => this._batchTime()
    this.tickNow = () => this._tick()
    this.everFailed = false
    this.comebackListeners = new Set()
  }

  /** Always true: the sender is pure JavaScript (kept for callers of the
   * native sender's `active`). */
  get active() {
    return true
  }

  /**
   * Sends one message (an object with v, kind, pool, ...) stamped with
   * `monoNs` (BigInt, default now). True if it was written to the socket or
   * waits in the backlog for a connection; false if it was dropped.
   */
  send(message, monoNs = monotonicNs()) {
    try {
      const text = encodeText(message, monoNs)
      return this.sendText(text, Buffer.byteLength(text))
    } catch (err) {
      return this._drop()
    }
  }

  /** Sends a message already encoded (see `send`): one line, no newline. */
  sendBytes(bytes) {
    if (!Buffer.isBuffer(bytes)) return this._drop()
    return this.sendText(bytes.toString('utf8'), bytes.length)
  }

  /**
   * Sends one line of JSON text (no newline) whose UTF-8 encoding takes
   * `bytes` bytes: the adapters' hot path, which knows the length without
   * measuring (their messages are ASCII but for the pool name).
   */
  sendText(text, bytes) {
    try {
      if (this.closed || typeof text !== 'string' || !(bytes <= MAX_MESSAGE_BYTES)) return this._drop()
      if (this.connected && this.backlog.length === 0) return this._write(text, bytes)
      return this._defer(text)
    } catch (err) {
      return this._drop()
    }
  }

  /** Adds one line to the batch, unless the socket buffers too much. */
  _write(text, bytes) {
    const socket = this.socket
    if (socket.writableLength + this.batchBytes + bytes + 1 > this.maxWritableBytes) return this._drop()
    if (this.batchLines === 0) this.batchSocket = socket
    this._pending()
    // Encoded straight into the batch's buffer (ASCII, the usual message,
    // by the cheaper latin1 copy). Whole lines only: the agent reads
    // lines, never one cut by another.
    const at = this.batchBytes
    const written = bytes === text.length ? this.batch.latin1Write(text, at) : this.batch.utf8Write(text, at)
    this.batch[at + written] = NEWLINE
    this.batchBytes = at + written + 1
    this.batchLines += 1
    this.sent += 1
    if (this.batchBytes >= BATCH_MAX_BYTES) this._writeBatch()
    return true
  }

  /**
   * The hot path's way in, for lines written as bytes: room for one line of
   * at most `maxBytes` (<= MAX_MESSAGE_BYTES) bytes, to be written into
   * `lineBuffer` from the returned offset, then `commitLine(end)`. -1 when
   * the line would be dropped (counted): nothing is to be written.
   */
  openLine(maxBytes) {
    try {
      if (this.closed || !(maxBytes <= MAX_MESSAGE_BYTES)) return this._dropLine()
      if (this.connected && this.backlog.length === 0) {
        const socket = this.socket
        if (socket.writableLength + this.batchBytes + maxBytes + 1 > this.maxWritableBytes) return this._dropLine()
        if (this.batchLines === 0) this.batchSocket = socket
        this._pending()
        this.lineBuffer = this.batch
        return this.batchBytes
      }
      this._expire()
      if (this.backlog.length >= this.maxBacklog) return this._dropLine()
      if (this.scratch === null) this.scratch = Buffer.allocUnsafe(MAX_MESSAGE_BYTES)
      this.lineBuffer = this.scratch
      return 0
    } catch (err) {
      return this._dropLine()
    }
  }

  /** The line opened by `openLine` ends at `end` (exclusive). */
  commitLine(end) {
    const buf = this.lineBuffer
    this.lineBuffer = null
    if (buf === null) return false
    if (buf === this.batch) {
      buf[end] = NEWLINE
      this.batchBytes = end + 1
      this.batchLines += 1
      this.sent += 1
      if (this.batchBytes >= BATCH_MAX_BYTES) this._writeBatch()
      return true
    }
    return this._defer(buf.utf8Slice(0, end))
  }

  /**
   * Calls `fn` just before the next batch is written (and makes sure one
   * will be), so that it can still add lines to it: the pools send there
   * the acquire_start of acquires still waiting (see Reporter#acquireStart).
   */
  atNextWrite(fn) {
    this.beforeWrite.push(fn)
    this._pending()
  }

  /** Something joined the batch: it leaves at the interval's next tick. */
  _pending() {
    if (this.closed || this.batchSinceMs !== null) return
    this.batchSinceMs = performance.now()
    if (this.batchMs === 0) {
      this.flushTimer = setImmediate(this.flushNow)
    } else if (this.flushTimer === null) {
      this.flushTimer = setInterval(this.tickNow, this.batchMs)
    } else {
      return
    }
    this.flushTimer.unref()
  }

  /** The interval's tick: the batch leaves, or, with none, the interval stops. */
  _tick() {
    if (this.batchSinceMs === null) this._stopTimer()
    else this._batchTime()
  }

  _stopTimer() {
    if (this.flushTimer !== null) {
      clearInterval(this.flushTimer)
      clearImmediate(this.flushTimer)
      this.flushTimer = null
    }
  }

  /** Nothing waits for a batch any more (an interval runs on until its next tick). */
  _batchDone() {
    if (this.batchMs === 0) this._stopTimer()
    this.batchSinceMs = null
  }

  /** The batch's time is up: what waits for it joins, then it is written. */
  _batchTime() {
    const callbacks = this.beforeWrite
    this.beforeWrite = []
    // Done before the callbacks run: one that asks for the next batch
    // again (atNextWrite) starts it.
    this._batchDone()
    for (const fn of callbacks) {
      try {
        fn()
      } catch (err) {
        // never into the application
      }
    }
    this._writeBatch()
  }

  /** Writes the batch. Lines batched for a socket lost meanwhile were not
   * sent after all. */
  _writeBatch() {
    const { batch, batchBytes, batchLines, batchSocket } = this
    this.batchBytes = 0
    this.batchLines = 0
    this.batchSocket = null
    // Written early (BATCH_MAX_BYTES) with no callback waiting: no timer
    // is needed until the next line.
    if (this.beforeWrite.length === 0) this._batchDone()
    if (batchLines === 0) return
    if (batchSocket !== this.socket || !this.connected) {
      this.sent -= batchLines
      this.dropped += batchLines
      return
    }
    try {
      batchSocket.write(batch.subarray(0, batchBytes))
      // The kernel took all of it at once (the usual case): the buffer is
      // free for the next batch. Otherwise Node still holds it.
      if (batchSocket.writableLength !== 0) this.batch = newBatchBuffer()
    } catch (err) {
      this.sent -= batchLines
      this.dropped += batchLines
      this.batch = newBatchBuffer()
    }
  }

  /** A backlog nobody took for `giveUpMs` is given up (counted). */
  _expire() {
    if (this.backlog.length > 0 && this.giveUpMs > 0 && nowMs() - this.backlogSinceMs > this.giveUpMs) {
      this.dropped += this.backlog.length
      this.backlog = []
    }
  }

  _defer(text) {
    this._expire()
    if (this.backlog.length >= this.maxBacklog) return this._drop()
    if (this.backlog.length === 0) this.backlogSinceMs = nowMs()
    this.backlog.push(text)
    this.deferred += 1
    this._connectSoon()
    return true
  }

  _drop() {
    this.dropped += 1
    return false
  }

  _dropLine() {
    this.dropped += 1
    return -1
  }

  /** Connects now if nothing is under way and no backoff is pending. */
  _connectSoon() {
    if (this.closed || this.socket !== null || this.reconnectTimer !== null) return
    this._connect()
  }

  _connect() {
    let socket
    try {
      socket = net.createConnection({ path: this.socketPath })
    } catch (err) {
      this.lastError = (err && err.code) || 'EINVAL'
      this._lost()
      return
    }
    this.socket = socket
    socket.unref()
    socket.on('connect', () => {
      if (this.socket !== socket) return
      this.connected = true
      this.connects += 1
      this._expire()
      if (this.everFailed) {
        // The agent may be new and know nothing of the pools: their state
        // (registrations, checkouts) goes first, then what waited. While the
        // backlog is set aside the listeners' messages are written at once.
        const waiting = this.backlog
        this.backlog = []
        for (const listener of this.comebackListeners) {
          try {
            listener()
          } catch (err) {
            // never into the application
          }
        }
        this.backlog = this.backlog.length === 0 ? waiting : waiting.concat(this.backlog)
      }
      this._flush()
      // The backoff starts over (and a comeback is counted) only once the
      // connection lasted: an agent at its stream limit closes at once.
      this.stableTimer = setTimeout(() => {
        this.stableTimer = null
        if (this.socket !== socket || !this.connected) return
        this.failures = 0
        if (this.everFailed) {
          this.everFailed = false
          this.comebacks += 1
        }
      }, this.stableMs)
      this.stableTimer.unref()
    })
    // The agent never writes: reading only notices its end (EOF).
    socket.on('data', () => {})
    socket.on('end', () => socket.destroy())
    socket.on('error', (err) => {
      this.lastError = (err && err.code) || 'EIO'
      // From now on messages wait in the backlog for the next connection.
      if (this.socket === socket) this.connected = false
    })
    socket.on('close', () => {
      if (this.socket !== socket) return
      this._lost()
    })
  }

  /** The connection failed or ended: what Node still buffered is lost. */
  _lost() {
    this._clearStableTimer()
    if (this.socket !== null) {
      this.disconnects += 1
      this.socket.destroy()
    }
    this.socket = null
    this.connected = false
    this.everFailed = true
    if (this.closed) return
    // Before any connection was made, reconnect only while something waits
    // (an application that never finds an agent and sends nothing costs
    // nothing); after one, also while a pool would re-send its state on
    // connecting (one attempt per 5 s at most). A stream with nothing to
    // say is not opened: the agent closes streams that stay silent.
    if (this.backlog.length === 0 && (this.connects === 0 ? this.failures === 0 : this.comebackListeners.size === 0)) return
    const delays = this.reconnectDelaysMs
    const delay = delays[Math.min(this.failures, delays.length - 1)]
    this.failures += 1
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null
      if (this.closed || this.socket !== null) return
      // Even with nothing waiting: a restarted agent then gets the pools'
      // state (a comeback) without waiting for the application's next event.
      this._expire()
      this._connect()
    }, delay)
    this.reconnectTimer.unref()
  }

  _clearStableTimer() {
    if (this.stableTimer !== null) {
      clearTimeout(this.stableTimer)
      this.stableTimer = null
    }
  }

  /** Writes what waited, oldest first, as far as the socket takes it. */
  _flush() {
    while (this.backlog.length > 0 && this.connected) {
      const text = this.backlog.shift()
      this._write(text, Buffer.byteLength(text))
    }
  }

  /** Calls `listener` after each comeback (see `comebacks`). */
  onComeback(listener) {
    this.comebackListeners.add(listener)
    return () => this.comebackListeners.delete(listener)
  }

  stats() {
    return {
      active: true,
      socket: this.socketPath,
      connected: this.connected,
      sent: this.sent,
      dropped: this.dropped,
      deferred: this.deferred,
      waiting: this.backlog.length,
      buffered: this.socket !== null && this.connected ? this.socket.writableLength + this.batchBytes : 0,
      /** A batch (or lines about to join one) waits for its time. */
      batching: this.batchSinceMs !== null,
      connects: this.connects,
      disconnects: this.disconnects,
      lastError: this.lastError,
      comebacks: this.comebacks,
    }
  }

  /** Stops: what waits is dropped (counted), the socket ended after what
   * Node buffered is written. */
  close() {
    // What waits for the batch's time goes before the end.
    this._batchTime()
    this._stopTimer()
    this.closed = true
    this._clearStableTimer()
    if (this.reconnectTimer !== null) {
      clearTimeout(this.reconnectTimer)
      this.reconnectTimer = null
    }
    this.dropped += this.backlog.length
    this.backlog = []
    if (this.socket !== null) {
      try {
        if (this.connected) this.socket.end()
        else this.socket.destroy()
      } catch (err) {
        // nothing to do
      }
    }
    this.socket = null
    this.connected = false
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
  BATCH_MS,
  DEFAULT_SOCKET,
  MAX_BACKLOG,
  MAX_MESSAGE_BYTES,
  MAX_WRITABLE_BYTES,
  STABLE_MS,
  Sender,
  encode,
  encodeText,
  MONO_BASE_SLACK_NS,
  clockMs,
  monoNsAt,
  monotonicNs,
  nsBetween,
  putBytes,
  putUint,
  senderFor,
  socketPathFromEnv,
}
