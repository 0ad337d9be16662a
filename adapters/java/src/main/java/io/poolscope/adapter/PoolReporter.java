package io.poolscope.adapter;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Comparator;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicIntegerFieldUpdater;
import java.util.concurrent.atomic.AtomicLong;

/**
 * One pool's side of the protocol (docs/adapter-protocol.md): its name and
 * registration, request ids for acquires, and the connections it has
 * checked out now, which the {@link Reporter} re-sends when the agent comes
 * back and periodically while there are any. For any pool library; the
 * HikariCP integration ({@code io.poolscope.adapter.hikari.Poolscope})
 * drives one of these. Thread-safe; no method blocks or throws.
 *
 * <p>Connections are named by their socket's local address
 * ({@code "ip:port"}, see {@link Sockets#localAddress}); a message about a
 * connection without one (null) is not sent, since the agent could not
 * join it to a socket.
 */
public final class PoolReporter {
    /** Longest pool name (and other text) the agent takes, in characters. */
    public static final int MAX_TEXT_CHARS = 128;
    /** How often the state of a pool with connections out is re-sent. */
    public static final long DEFAULT_STATE_INTERVAL_NANOS = 30_000_000_000L;
    /** Checkouts folded into one {@code checkouts} line, at most (the
     * protocol's bound). */
    static final int MAX_FOLDED = 64;
    /** Entries per {@code checkout_state} message (the agent takes 64). */
    static final int STATE_ENTRIES_PER_MESSAGE = 32;

    private final Reporter reporter;
    private final String name;
    private final String quotedName;
    private volatile PoolInfo info;
    private final AtomicLong nextRequest = new AtomicLong(1);
    private final Map<String, Checkout> out = new ConcurrentHashMap<>();
    /** Handed-out connections whose acquire_end is not sent yet. */
    private final Map<String, HeldEnd> held = new ConcurrentHashMap<>();
    /** Per connection, the {@code checkouts} line its short checkouts are
     * folded into until the writer takes it (see {@link Folded}). */
    private final Map<String, Folded> folding = new ConcurrentHashMap<>();
    private final AtomicLong skipped = new AtomicLong();
    private volatile long stateIntervalNanos = DEFAULT_STATE_INTERVAL_NANOS;
    private volatile long lastStateNanos = System.nanoTime();

    private record Checkout(String localAddress, long sinceNanos, int tid) {}

    /** {@code name}: unique within the process, cut to 128 characters. */
    public PoolReporter(Reporter reporter, String name, PoolInfo info) {
        this.reporter = reporter;
        this.name = name == null || name.isEmpty() ? "pool" : Json.cut(name, MAX_TEXT_CHARS);
        this.quotedName = Json.quote(new StringBuilder(), this.name).toString();
        this.info = info;
        reporter.watch(this);
    }

    public String name() {
        return name;
    }

    public Reporter reporter() {
        return reporter;
    }

    /** How often the checkouts are re-sent while there are any; 0: never. */
    public PoolReporter withStateIntervalNanos(long nanos) {
        stateIntervalNanos = Math.max(0, nanos);
        return this;
    }

    /** Connections checked out now, as this adapter knows them. */
    public int checkedOut() {
        return out.size();
    }

    /** Messages not sent because no local address named the connection. */
    public long unnamed() {
        return skipped.get();
    }

    Json message(String kind, long monoNanos) {
        return new Json().put("v", Reporter.PROTOCOL_VERSION).put("kind", kind)
                .putRaw("pool", quotedName).put("mono_ns", monoNanos);
    }

    /** Sends the registration (again, with {@code info} when not null). */
    public void register(PoolInfo newInfo) {
        try {
            if (newInfo != null) {
                info = newInfo;
            }
            reporter.send(registration());
        } catch (RuntimeException e) {
            // Never into the application.
        }
    }

    private String registration() {
        Json m = message("pool", Threads.monotonicNanos());
        PoolInfo current = info;
        if (current != null) {
            current.write(m);
        }
        return m.toString();
    }

    /**
     * One acquire, from {@link #acquireStart} to its end. Its
     * {@code acquire_start} is made by the writer thread when it reaches
     * it, and only if the acquire has not ended by then: most acquires find
     * an idle connection at once and end within the writer's batch window,
     * and their {@code acquire_end} carries the wait ({@code wait_ns})
     * instead, one message instead of two. An acquire still waiting when
     * the writer comes is sent as pending, with the time it began.
     */
    public static final class Acquire implements Reporter.Deferred {
        private static final int STARTING = 0;
        private static final int START_SENT = 1;
        private static final int ENDED = 2;
        private static final AtomicIntegerFieldUpdater<Acquire> STATE =
                AtomicIntegerFieldUpdater.newUpdater(Acquire.class, "state");

        private final PoolReporter pool;
        private final long request;
        private final long startNanos;
        private final int tid;
        private volatile int state = STARTING;

        Acquire(PoolReporter pool, long request, long startNanos, int tid) {
            this.pool = pool;
            this.request = request;
            this.startNanos = startNanos;
            this.tid = tid;
        }

        /** The request id, unique in the pool. */
        public long request() {
            return request;
        }

        @Override
        public byte[] lineIfStillWanted() {
            if (!STATE.compareAndSet(this, STARTING, START_SENT)) {
                return null;
            }
            Json m = pool.message("acquire_start", startNanos).put("request", request);
            if (tid > 0) {
                m.put("tid", tid);
            }
            return m.toString().getBytes(StandardCharsets.UTF_8);
        }

        /** Ends it: true if its start was not sent (the end carries the wait). */
        boolean end() {
            return STATE.compareAndSet(this, STARTING, ENDED);
        }
    }

    /** A caller of this thread asks for a connection (see {@link Acquire}). */
    public Acquire acquireStart() {
        Acquire acquire = new Acquire(this, nextRequest.getAndIncrement(), Threads.monotonicNanos(),
                Threads.currentTid());
        reporter.sendDeferred(acquire);
        return acquire;
    }

    /** {@code acquire_end}, result ok: the calling thread got this connection. */
    public void acquireOk(Acquire acquire, String localAddress) {
        acquireEnd(acquire, "ok", localAddress);
    }

    /** {@code acquire_end}, result timeout: the pool gave up waiting. */
    public void acquireTimeout(Acquire acquire) {
        acquireEnd(acquire, "timeout", null);
    }

    /** {@code acquire_end}, result error: the pool failed, or the caller stopped waiting. */
    public void acquireError(Acquire acquire) {
        acquireEnd(acquire, "error", null);
    }

    private void acquireEnd(Acquire acquire, String result, String localAddress) {
        try {
            if (acquire == null) {
                return;
            }
            long at = Threads.monotonicNanos();
            int tid = Threads.currentTid();
            long waitNanos = acquire.end() ? Math.max(0, at - acquire.startNanos) : -1;
            boolean ok = result.equals("ok");
            if (ok && localAddress == null) {
                skipped.incrementAndGet();
                return;
            }
            if (ok) {
                // Before sending: a state re-sent from now on includes it.
                out.put(localAddress, new Checkout(localAddress, at, tid));
                HeldEnd end = new HeldEnd(acquire.request(), localAddress, tid, waitNanos, at);
                held.put(localAddress, end);
                reporter.sendDeferred(end);
                return;
            }
            Json m = message("acquire_end", at).put("request", acquire.request()).put("result", result);
            if (tid > 0) {
                m.put("tid", tid);
            }
            if (waitNanos >= 0) {
                m.put("wait_ns", waitNanos);
            }
            reporter.send(m.toString());
        } catch (RuntimeException e) {
            // Never into the application.
        }
    }

    /**
     * The {@code acquire_end} of a connection handed out, made by the writer
     * thread when it reaches it, unless the connection came back first: then
     * the checkout leaves as one {@code checkout} message from
     * {@link #release} (a short checkout, the usual one). One held over the
     * batch window is sent with its own time, so the agent sees the
     * connection in use within a window.
     */
    private final class HeldEnd implements Reporter.Deferred {
        private static final int HELD = 0;
        private static final int SENT = 1;
        private static final int FOLDED = 2;

        final long request;
        final String localAddress;
        final int tid;
        /** -1 when the acquire's start was sent. */
        final long waitNanos;
        final long atNanos;
        private final AtomicInteger state = new AtomicInteger(HELD);

        HeldEnd(long request, String localAddress, int tid, long waitNanos, long atNanos) {
            this.request = request;
            this.localAddress = localAddress;
            this.tid = tid;
            this.waitNanos = waitNanos;
            this.atNanos = atNanos;
        }

        @Override
        public byte[] lineIfStillWanted() {
            if (!state.compareAndSet(HELD, SENT)) {
                return null;
            }
            Json m = message("acquire_end", atNanos).put("request", request).put("result", "ok")
                    .put("local_address", localAddress);
            return withHolder(m).toString().getBytes(StandardCharsets.UTF_8);
        }

        /** True if the end was not sent: the release may stand for both. */
        boolean fold() {
            return state.compareAndSet(HELD, FOLDED);
        }

        Json withHolder(Json m) {
            if (tid > 0) {
                m.put("tid", tid);
            }
            if (waitNanos >= 0) {
                m.put("wait_ns", waitNanos);
            }
            return m;
        }
    }

    /**
     * {@code release}: the caller returned the connection to the pool. A
     * short checkout (its acquire_end not sent yet) is folded into the
     * connection's {@code checkouts} line, or, if its acquire_start was
     * sent, leaves as one {@code checkout} message.
     */
    public void release(String localAddress) {
        try {
            HeldEnd end = localAddress == null ? null : held.remove(localAddress);
            if (end != null && end.fold()) {
                out.remove(localAddress);
                long at = Threads.monotonicNanos();
                long use = Math.max(0, at - end.atNanos);
                if (end.waitNanos >= 0) {
                    fold(localAddress, end.waitNanos, use, end.tid, at);
                    return;
                }
                Json m = message("checkout", at).put("request", end.request)
                        .put("local_address", localAddress);
                reporter.send(end.withHolder(m).put("use_ns", use).toString());
                return;
            }
        } catch (RuntimeException e) {
            // Never into the application.
        }
        connectionMessage("release", localAddress);
    }

    /** Adds a short checkout to its connection's open {@code checkouts}
     * line, or to a new one queued now (after everything sent about the
     * connection so far). */
    private void fold(String localAddress, long waitNanos, long useNanos, int tid, long atNanos) {
        Folded line = folding.get(localAddress);
        if (line != null && line.add(waitNanos, useNanos, tid, atNanos)) {
            return;
        }
        line = new Folded(localAddress);
        line.add(waitNanos, useNanos, tid, atNanos);
        folding.put(localAddress, line);
        if (!reporter.sendDeferred(line)) {
            folding.remove(localAddress, line);
        }
    }

    /**
     * Short checkouts of one connection, folded into one {@code checkouts}
     * line (their waits and uses, the last holder and release): a busy
     * service sends a line per connection and batch instead of a message
     * per checkout. Checkouts are added until the writer takes the line
     * (or it holds {@value #MAX_FOLDED}); the line sits in the queue where
     * its first checkout was folded, so it leaves before any later message
     * about its connection (a later checkout of the connection that was
     * sent on its own came after the writer took the line).
     */
    private final class Folded implements Reporter.Deferred {
        private final String localAddress;
        private long[] waits = new long[8];
        private long[] uses = new long[8];
        private int count;
        private int tid;
        private long atNanos;
        private boolean taken;

        Folded(String localAddress) {
            this.localAddress = localAddress;
        }

        /** False once the writer took the line, or when it is full. */
        synchronized boolean add(long waitNanos, long useNanos, int holder, long at) {
            if (taken || count >= MAX_FOLDED) {
                return false;
            }
            if (count == waits.length) {
                waits = Arrays.copyOf(waits, count * 2);
                uses = Arrays.copyOf(uses, count * 2);
            }
            waits[count] = waitNanos;
            uses[count] = useNanos;
            count++;
            tid = holder;
            atNanos = at;
            return true;
        }

        @Override
        public synchronized byte[] lineIfStillWanted() {
            taken = true;
            folding.remove(localAddress, this);
            if (count == 0) {
                return null;
            }
            Json m = message("checkouts", atNanos).put("local_address", localAddress);
            if (tid > 0) {
                m.put("tid", tid);
            }
            m.putRaw("waits_ns", list(waits, count)).putRaw("uses_ns", list(uses, count));
            return m.toString().getBytes(StandardCharsets.UTF_8);
        }

        /** Never sent: later checkouts start a line of their own. */
        @Override
        public synchronized void dropped() {
            taken = true;
            folding.remove(localAddress, this);
        }

        private static StringBuilder list(long[] values, int count) {
            StringBuilder b = new StringBuilder(count * 8 + 2).append('[');
            for (int i = 0; i < count; i++) {
                if (i > 0) {
                    b.append(',');
                }
                b.append(values[i]);
            }
            return b.append(']');
        }
    }

    /** {@code connection_created}: the pool opened a connection, ready to use. */
    public void connectionCreated(String localAddress) {
        connectionMessage("connection_created", localAddress);
    }

    /** {@code connection_closed}: the pool closed or discarded the connection. */
    public void connectionClosed(String localAddress) {
        connectionMessage("connection_closed", localAddress);
    }

    private void connectionMessage(String kind, String localAddress) {
        try {
            if (localAddress == null) {
                skipped.incrementAndGet();
                return;
            }
            if (!kind.equals("connection_created")) {
                out.remove(localAddress);
                // A held acquire_end and a folded line stay queued ahead of
                // this message; a later connection on the same address
                // starts a line of its own, after it.
                held.remove(localAddress);
                folding.remove(localAddress);
            }
            reporter.send(message(kind, Threads.monotonicNanos())
                    .put("local_address", localAddress).toString());
        } catch (RuntimeException e) {
            // Never into the application.
        }
    }

    /**
     * Sends the registration and the connections checked out now
     * ({@code checkout_state}, up to 32 to a message and never more than
     * {@value Reporter#MAX_MESSAGE_BYTES} bytes), as after an agent
     * restart. The agent takes it idempotently.
     */
    public void sendState() {
        try {
            for (String line : stateMessages()) {
                reporter.send(line);
            }
        } catch (RuntimeException e) {
            // Never into the application.
        }
    }

    /**
     * The state as messages: the registration, then the checkouts, oldest
     * first, in {@code checkout_state} messages sized by their encoded
     * (UTF-8) length: a long non-ASCII pool name and long (IPv6) addresses
     * still give lines the agent takes.
     */
    List<String> stateMessages() {
        lastStateNanos = System.nanoTime();
        List<String> lines = new ArrayList<>();
        lines.add(registration());
        List<Checkout> entries = new ArrayList<>(out.values());
        if (entries.isEmpty()) {
            return lines;
        }
        entries.sort(Comparator.comparingLong(Checkout::sinceNanos));
        // One time for the whole state: when it was taken.
        String empty = message("checkout_state", Threads.monotonicNanos()).putRaw("checkouts", "").toString();
        // {...,"checkouts":  +  [ e,e,... ]  +  }
        String head = empty.substring(0, empty.length() - 1) + "[";
        int base = utf8Length(head) + 2;
        StringBuilder list = new StringBuilder();
        int count = 0;
        int bytes = base;
        for (Checkout c : entries) {
            Json e = new Json().put("local_address", c.localAddress()).put("mono_ns", c.sinceNanos());
            if (c.tid() > 0) {
                e.put("tid", c.tid());
            }
            String entry = e.toString();
            int entryBytes = utf8Length(entry);
            if (count > 0 && (count >= STATE_ENTRIES_PER_MESSAGE
                    || bytes + 1 + entryBytes > Reporter.MAX_MESSAGE_BYTES)) {
                lines.add(head + list + "]}");
                list.setLength(0);
                count = 0;
                bytes = base;
            }
            if (count > 0) {
                list.append(',');
                bytes++;
            }
            list.append(entry);
            bytes += entryBytes;
            count++;
        }
        lines.add(head + list + "]}");
        return lines;
    }

    /** Bytes of {@code text} in UTF-8 (a lone surrogate, which Json never writes, counted as 3). */
    static int utf8Length(CharSequence text) {
        int n = 0;
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            if (c < 0x80) {
                n += 1;
            } else if (c < 0x800) {
                n += 2;
            } else if (Character.isHighSurrogate(c) && i + 1 < text.length()
                    && Character.isLowSurrogate(text.charAt(i + 1))) {
                n += 4;
                i++;
            } else {
                n += 3;
            }
        }
        return n;
    }

    /** Re-sends the state if connections are out and the interval has passed. */
    void sendStateIfDue(long nowNanos) {
        long interval = stateIntervalNanos;
        if (interval > 0 && !out.isEmpty() && nowNanos - lastStateNanos >= interval) {
            sendState();
        }
    }
}
