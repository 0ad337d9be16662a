'use strict'
// Holder stacks (docs/adapter-protocol.md, "Holder stacks"): which code took
// a connection that is still out `stack_after` later.
//
// At a checkout the hook captures the stack of its caller with
// Error.captureStackTrace on a plain object: V8 keeps the frames raw (code
// and position, no text) and formats them only when `stack` is read, which
// the reporter does only for a checkout still held `stack_after` later. The
// capture is what a capturing checkout pays: V8 walking at most CAPTURE_FRAMES
// frames, which for optimized code means decoding where inlined functions
// are (about 4 µs per checkout in a tight pg.Pool loop on the test VM,
// bench/stack_cost.js); the formatting happens for long checkouts only.
//
// The formatting reads the frames as V8's CallSite objects, through an
// Error.prepareStackTrace of its own set only for that read (the
// application's, if any, is put back: it is never called for our captures
// and never replaced for its own errors).
//
// The captures are spaced: a checkout captures only if at least the
// capture interval (default 1 ms, POOLSCOPE_ADAPTER_STACK_INTERVAL_US, the
// `stackIntervalUs` option) has passed since the last capture in this
// process, by any pool; otherwise it keeps no stack and its checkout sends
// no holder_stack. At most 1,000 captures a second by default, so their CPU
// is bounded (4 µs x 1,000/s = 0.4 % of a core at most) whatever the
// checkout rate; an application that checks out fewer connections than
// that gets a stack for every checkout. The check is one clock read, one
// comparison and one store (`lastCapture`).

const path = require('node:path')
const { clockMs } = require('./sender')

/** The protocol's bounds: frames per stack, characters per frame. */
const MAX_STACK_FRAMES = 32
const MAX_FRAME_CHARS = 256
/** Frames captured (Error.stackTraceLimit while capturing): the pool
 * library's between the hook and the caller (pg-pool's query: 1, mysql2's
 * promise wrapper: 3) and at least 9 of the application's. The capture's
 * cost is V8 walking these frames: about 0.7 µs for each frame of
 * optimized code on the test VM, so a deep synchronous stack is cut here;
 * a checkout made in an async function resumed by the microtask queue has
 * a short stack (its callers are async frames, cheap to add). */
const CAPTURE_FRAMES = 12
/** How long a checkout is held before its stack is sent (ms). */
const DEFAULT_STACK_AFTER_MS = 1000
/** The least time between two captures in this process (µs). */
const DEFAULT_STACK_INTERVAL_US = 1000

/** When the last capture was made (clockMs), by any pool of this process:
 * module state, shared by every reporter (the interval is each pool's, the
 * time is not). One per JavaScript thread: a worker_threads Worker loads
 * its own copy and spaces its own captures. The pg and mysql hooks read and
 * write `ms` inline (see `captureDue`). */
const lastCapture = { ms: -Infinity }

/** The pool libraries and drivers whose frames above the application's
 * first one are left out (also under pnpm's node_modules/.pnpm/...). */
const LIBRARY_FILE = /[\\/]node_modules[\\/](?:pg-pool|pg|pg-native|pg-cursor|mysql2|mysql|generic-pool)[\\/]/
/** Any package's files: an ORM's or a query builder's frames (knex,
 * sequelize...) above the application's are left out too, when the stack
 * has a frame of the application's own. */
const PACKAGE_FILE = /[\\/]node_modules[\\/]/
/** This adapter's own files. */
const ADAPTER_DIR = `${__dirname}${path.sep}`

/** POOLSCOPE_ADAPTER_STACKS: on unless `off`, `0` or `false`. */
function stacksFromEnv(env = process.env) {
  const value = env.POOLSCOPE_ADAPTER_STACKS
  return !(typeof value === 'string' && /^\s*(off|0|false)\s*$/i.test(value))
}

/** POOLSCOPE_ADAPTER_STACK_AFTER_MS (milliseconds, a whole number), else
 * DEFAULT_STACK_AFTER_MS. */
function stackAfterFromEnv(env = process.env) {
  return wholeNumber(env.POOLSCOPE_ADAPTER_STACK_AFTER_MS) ?? DEFAULT_STACK_AFTER_MS
}

/** POOLSCOPE_ADAPTER_STACK_INTERVAL_US (microseconds, a whole number; 0:
 * capture at every checkout), else DEFAULT_STACK_INTERVAL_US. */
function stackIntervalFromEnv(env = process.env) {
  return wholeNumber(env.POOLSCOPE_ADAPTER_STACK_INTERVAL_US) ?? DEFAULT_STACK_INTERVAL_US
}

/** A whole number of at least 0 (a number or its text), else undefined. */
function wholeNumber(value) {
  const n = typeof value === 'string' && value.trim() !== '' ? Number(value) : value
  return Number.isSafeInteger(n) && n >= 0 ? n : undefined
}

/** A `stackSkip` option: a RegExp of more files to leave out (an
 * application's own pool code), without the flags that make `test` keep
 * state. */
function skipOption(value) {
  if (!(value instanceof RegExp)) return null
  try {
    return new RegExp(value.source, value.flags.replace(/[gy]/g, ''))
  } catch (err) {
    return null
  }
}

/**
 * Whether a checkout now may capture: at least `intervalMs` since the last
 * capture in this process (which it then becomes). Two pools racing (a
 * capture each, close together) is harmless. The pg and mysql hooks do the
 * same inline.
 */
function captureDue(intervalMs) {
  const now = clockMs()
  if (now - lastCapture.ms < intervalMs) return false
  lastCapture.ms = now
  return true
}

/**
 * The stack of the caller of `hook` (a function running now; the frames
 * from it inward are left out), as a capture object whose `stack` V8
 * formats only when read; null if it cannot be had. The hot path: no text.
 *
 * The pg and mysql hooks do the same in their own body rather than call
 * this: V8 walks every frame from the top, and a frame more (this one, when
 * not inlined) cost 0.7 µs per checkout in the pairs benchmark.
 */
function captureStack(hook) {
  const limit = Error.stackTraceLimit
  const holder = {}
  try {
    Error.stackTraceLimit = CAPTURE_FRAMES
    Error.captureStackTrace(holder, hook)
    Error.stackTraceLimit = limit
  } catch (err) {
    return failedCapture(limit)
  }
  return holder
}

/** A capture that threw (an application that froze Error.stackTraceLimit,
 * say): the limit put back if it can be; null. */
function failedCapture(limit) {
  try {
    if (Error.stackTraceLimit !== limit) Error.stackTraceLimit = limit
  } catch (err) {
    // never into the application
  }
  return null
}

const structured = (_, sites) => sites

/** The raw frames of a capture: V8's CallSites (through our own
 * prepareStackTrace, the application's put back after), or, when the
 * application's cannot be set aside, the text it made. */
function rawStack(holder) {
  const had = Object.prototype.hasOwnProperty.call(Error, 'prepareStackTrace')
  const saved = Error.prepareStackTrace
  let swapped = false
  try {
    Error.prepareStackTrace = structured
    swapped = Error.prepareStackTrace === structured
  } catch (err) {
    swapped = false
  }
  try {
    return holder.stack
  } catch (err) {
    return undefined
  } finally {
    if (swapped) {
      try {
        if (had) Error.prepareStackTrace = saved
        else delete Error.prepareStackTrace
      } catch (err) {
        // never into the application
      }
    }
  }
}

/** One frame: its text (V8's form without "at ") and its file (or null). */
function frameOfSite(site) {
  let text = ''
  let file = null
  try {
    text = String(site)
    const f = typeof site.getFileName === 'function' ? site.getFileName() : null
    file = typeof f === 'string' && f !== '' ? f : null
  } catch (err) {
    // a frame that cannot be read is left out
  }
  return { text, file }
}

/** The frames of V8's text form ("    at fn (file:line:col)"). */
function framesOfText(text) {
  const out = []
  for (const line of text.split('\n')) {
    const m = /^\s*at (.+)$/.exec(line)
    if (m === null) continue
    const where = /\(([^()]+?):\d+(?::\d+)?\)$/.exec(m[1]) || /^([^\s()]+?):\d+(?::\d+)?$/.exec(m[1])
    out.push({ text: m[1], file: where ? where[1] : null })
  }
  return out
}

function isInternal(file) {
  return file !== null && (file.startsWith('node:internal') || file.startsWith('internal/'))
}

/** Whether a frame is code that uses the pool: a file, not Node's, not a
 * pool library's, not this adapter's (nor `skip`'s). */
function isCaller(frame, skip) {
  const file = frame.file
  if (file === null || file.startsWith('node:') || file.startsWith('internal/')) return false
  if (LIBRARY_FILE.test(file) || file.startsWith(ADAPTER_DIR)) return false
  return skip === null || !skip.test(file)
}

/** Whether a frame is the application's own: a caller outside node_modules. */
function isApplication(frame, skip) {
  return isCaller(frame, skip) && !PACKAGE_FILE.test(frame.file)
}

/** A frame's text as the protocol takes it: control characters (and lone
 * surrogates) replaced, at most MAX_FRAME_CHARS characters. */
function cleanFrame(text) {
  // eslint-disable-next-line no-control-regex
  const clean = text.replace(/[\u0000-\u001f\u007f-\u009f]/g, '?').replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, '\ufffd')
  if (clean.length <= MAX_FRAME_CHARS) return clean
  const chars = Array.from(clean)
  return chars.length > MAX_FRAME_CHARS ? chars.slice(0, MAX_FRAME_CHARS).join('') : clean
}

/**
 * The frames of a capture as the `holder_stack` message sends them:
 * innermost first, from the application's first frame (the pool
 * libraries', other packages', this adapter's and Node's own above it left
 * out; Node's internals left out everywhere), at most MAX_STACK_FRAMES of
 * at most MAX_FRAME_CHARS characters. With no frame of the application's
 * own, from the first frame of another package (an ORM called from a
 * framework); with none of those either, every frame but Node's
 * internals. null if nothing is left.
 */
function formatStack(holder, skip = null) {
  if (holder === null || typeof holder !== 'object') return null
  const raw = rawStack(holder)
  let frames
  if (Array.isArray(raw)) frames = raw.map(frameOfSite)
  else if (typeof raw === 'string') frames = framesOfText(raw)
  else return null
  let first = frames.findIndex((f) => isApplication(f, skip))
  if (first < 0) first = frames.findIndex((f) => isCaller(f, skip))
  if (first < 0) first = 0
  const out = []
  for (let i = first; i < frames.length && out.length < MAX_STACK_FRAMES; i++) {
    if (isInternal(frames[i].file) || frames[i].text === '') continue
    out.push(cleanFrame(frames[i].text))
  }
  return out.length > 0 ? out : null
}

module.exports = {
  CAPTURE_FRAMES,
  DEFAULT_STACK_AFTER_MS,
  DEFAULT_STACK_INTERVAL_US,
  MAX_FRAME_CHARS,
  MAX_STACK_FRAMES,
  captureDue,
  captureStack,
  failedCapture,
  formatStack,
  lastCapture,
  skipOption,
  stackAfterFromEnv,
  stackIntervalFromEnv,
  stacksFromEnv,
  wholeNumber,
}
