package io.poolscope.adapter;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Comparator;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicIntegerFieldUpdater;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicLongFieldUpdater;

/**
 * One pool's side of the protocol (docs/adapter-protocol.md): its name and
 * registration, request ids for acquires, and the connections it has
 * checked out now, which the {@link Reporter} re-sends when the agent comes
 * back and periodically while there are any. For any pool library; the
 * HikariCP integration ({@code io.poolscope.adapter.hikari.Poolscope})
 * drives one of these. Thread-safe; no method blocks or throws.
 *
 * <p>Connections are named by their socket's local address
 * ({@code "ip:port"}, see {@link Sockets#localAddress}), or by an id of the
 * pool's own ({@link #connectionId}) when it has no socket the adapter can
 * see; a message about a connection without either (null) is not sent.
 */
public final class PoolReporter {
    /** Longest pool name (and other text) the agent takes, in characters. */
    public static final int MAX_TEXT_CHARS = 128;
    /** How often the state of a pool with connections out is re-sent. */
    public static final long DEFAULT_STATE_INTERVAL_NANOS = 30_000_000_000L;
    /** Checkouts folded into one {@code checkouts} line, at most (the
     * protocol's bound). */
    static final int MAX_FOLDED = 64;
    /** Connections remembered with nothing out or waiting, at most: a pool
     * that reports no closes, its connections' addresses changing, keeps
     * no more than this many (the writer forgets idle ones past it). */
    static final int MAX_IDLE_CONNS = 1024;
    /** Entries per {@code checkout_state} message (the agent takes 64). */
    static final int STATE_ENTRIES_PER_MESSAGE = 32;
    /** Threads with a waiting slot of their own in this pool, at most;
     * the acquires of others go to the shared set. */
    static final int MAX_THREAD_SLOTS = 4096;
    /** Turns holder stacks off with {@code off}, {@code 0} or {@code false}. */
    public static final String STACKS_ENV = "POOLSCOPE_ADAPTER_STACKS";
    /** How long a checkout is held before its stack is sent, in ms. */
    public static final String STACK_AFTER_ENV = "POOLSCOPE_ADAPTER_STACK_AFTER_MS";
    /** {@code stack_after} unless the environment says otherwise. */
    public static final long DEFAULT_STACK_AFTER_NANOS = 1_000_000_000L;
    /** The least time between two captures in this process, in whole
     * microseconds (see {@link HolderStacks#due}). */
    public static final String STACK_INTERVAL_ENV = "POOLSCOPE_ADAPTER_STACK_INTERVAL_US";
    /** The capture interval unless the environment says otherwise: 1 ms,
     * at most 1,000 captures a second in the process. */
    public static final long DEFAULT_STACK_INTERVAL_NANOS = 1_000_000L;
    private static final boolean STACKS_FROM_ENV = stacksOn(env(STACKS_ENV));
    private static final long STACK_AFTER_FROM_ENV = stackAfterNanos(env(STACK_AFTER_ENV));
    private static final long STACK_INTERVAL_FROM_ENV = stackIntervalNanos(env(STACK_INTERVAL_ENV));

    private final Reporter reporter;
    private final String name;
    private final String quotedName;
    private volatile PoolInfo info;
    private final AtomicLong nextRequest = new AtomicLong(1);
    /** The pool's connections by local address, checked out or not: a
     * connection's entry stays between checkouts, so that a checkout adds
     * and removes no map entry; its close drops it. */
    private final Map<String, Conn> conns = new ConcurrentHashMap<>();
    /**
     * Where acquires that have not ended wait for the writer to look at
     * them: mostly in their thread's slot (a JDBC acquire blocks its
     * thread, so a thread waits for one connection of a pool at a time),
     * which costs a checkout two writes to memory its thread already has
     * instead of adding to and removing from a shared set; the rest (a
     * second acquire of one thread, threads past {@link #MAX_THREAD_SLOTS})
     * in {@link #waiting}.
     */
    private final ThreadLocal<Slot> slot = ThreadLocal.withInitial(this::newSlot);
    private final Set<Slot> slots = ConcurrentHashMap.newKeySet();
    /** Acquires whose {@code acquire_start} is not sent, that have not
     * ended, and that are in no thread's slot. */
    private final Set<Acquire> waiting = ConcurrentHashMap.newKeySet();
    /** Whether the writer's next batch will call {@link #pendingLines}. */
    private final AtomicBoolean pendingScheduled = new AtomicBoolean();
    private final AtomicLong skipped = new AtomicLong();
    private volatile long stateIntervalNanos = DEFAULT_STATE_INTERVAL_NANOS;
    private volatile long lastStateNanos = System.nanoTime();
    /** Whether checkouts capture their caller's stack (see {@link HolderStacks}). */
    private volatile boolean stacks = STACKS_FROM_ENV;
    private volatile long stackAfterNanos = STACK_AFTER_FROM_ENV;
    private volatile long stackIntervalNanos = STACK_INTERVAL_FROM_ENV;
    /** When the earliest stack not sent yet is due, as the writer last
     * saw the checkouts ({@link #pendingLines}); {@link Long#MAX_VALUE}:
     * none. Written by the writer only. */
    private volatile long stackDueNanos = Long.MAX_VALUE;

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

    /** Whether checkouts capture their caller's stack, sent as
     * {@code holder_stack} for a checkout held {@code stack_after}
     * ({@link #withStackAfterNanos}); default: on unless
     * {@value #STACKS_ENV} is {@code off}, {@code 0} or {@code false}. */
    public PoolReporter withStacks(boolean on) {
        stacks = on;
        return this;
    }

    /** {@code stack_after}: how long a checkout is held before its stack
     * is sent; default {@value #STACK_AFTER_ENV} ms, else 1 s. */
    public PoolReporter withStackAfterNanos(long nanos) {
        stackAfterNanos = Math.max(0, nanos);
        return this;
    }

    /** The least time since the last capture of this process (any pool,
     * any thread) for a checkout of this pool to capture its stack; a
     * checkout sooner captures nothing and sends no {@code holder_stack}.
     * 0: every checkout captures. Default {@value #STACK_INTERVAL_ENV}
     * microseconds, else 1 ms. */
    public PoolReporter withStackIntervalNanos(long nanos) {
        stackIntervalNanos = Math.max(0, nanos);
        return this;
    }

    private static String env(String name) {
        try {
            return System.getenv(name);
        } catch (RuntimeException e) {
            return null;
        }
    }

    /** {@value #STACKS_ENV}: off with {@code off}, {@code 0}, {@code false}
     * (any case, blanks around); on otherwise, unset included. */
    static boolean stacksOn(String env) {
        if (env == null) {
            return true;
        }
        String v = env.trim().toLowerCase(java.util.Locale.ROOT);
        return !(v.equals("off") || v.equals("0") || v.equals("false"));
    }

    /** {@value #STACK_AFTER_ENV} in ns: whole milliseconds, 0 or more;
     * anything else is the default. */
    static long stackAfterNanos(String env) {
        if (env == null || env.isBlank()) {
            return DEFAULT_STACK_AFTER_NANOS;
        }
        try {
            long ms = Long.parseLong(env.trim());
            return ms >= 0 && ms <= Long.MAX_VALUE / 1_000_000L ? ms * 1_000_000L : DEFAULT_STACK_AFTER_NANOS;
        } catch (NumberFormatException e) {
            return DEFAULT_STACK_AFTER_NANOS;
        }
    }

    /** {@value #STACK_INTERVAL_ENV} in ns: whole microseconds, 0 or more;
     * anything else is the default. */
    static long stackIntervalNanos(String env) {
        if (env == null || env.isBlank()) {
            return DEFAULT_STACK_INTERVAL_NANOS;
        }
        try {
            long us = Long.parseLong(env.trim());
            return us >= 0 && us <= Long.MAX_VALUE / 1_000L ? us * 1_000L : DEFAULT_STACK_INTERVAL_NANOS;
        } catch (NumberFormatException e) {
            return DEFAULT_STACK_INTERVAL_NANOS;
        }
    }

    /** Connections checked out now, as this adapter knows them. */
    public int checkedOut() {
        int n = 0;
        for (Conn c : conns.values()) {
            synchronized (c) {
                if (!c.closed && c.sinceNanos >= 0) {
                    n++;
                }
            }
        }
        return n;
    }

    /** Connections remembered now (checked out or not). */
    int remembered() {
        return conns.size();
    }

    /** Threads with a slot where the writer looks (see {@link #slot}). */
    int threadSlots() {
        return slots.size();
    }

    /** Messages not sent because no local address named the connection. */
    public long unnamed() {
        return skipped.get();
    }

    /** What names a connection known by an id of the pool's own rather than
     * by its socket (a handle with no socket, a library that hides it): use
     * it wherever a local address goes. Ids are unique within the pool
     * while their connection lives. */
    public static String connectionId(long id) {
        return ID_PREFIX + id;
    }

    /** Local addresses never start with it ({@code ip:port}, {@code [v6]:port}). */
    private static final String ID_PREFIX = "#";

    /** m, naming the connection {@code name}: its local address, or the
     * id {@link #connectionId} made into it. */
    static Json named(Json m, String name) {
        if (name.startsWith(ID_PREFIX)) {
            try {
                return m.put("conn", Long.parseLong(name.substring(ID_PREFIX.length())));
            } catch (NumberFormatException e) {
                // Not one of ours: sent as given, for the agent to refuse.
            }
        }
        return m.put("local_address", name);
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
     * {@code acquire_start} is sent by the writer's next batch, and only if
     * the acquire has not ended by then: most acquires find an idle
     * connection at once and end first, and their {@code acquire_end}
     * carries the wait ({@code wait_ns}) instead, one message instead of
     * two. An acquire still waiting then is sent as pending, with the time
     * it began.
     */
    public static final class Acquire {
        private static final int STARTING = 0;
        private static final int START_SENT = 1;
        private static final int ENDED = 2;
        private static final AtomicIntegerFieldUpdater<Acquire> STATE =
                AtomicIntegerFieldUpdater.newUpdater(Acquire.class, "state");
        private static final AtomicLongFieldUpdater<Acquire> REQUEST =
                AtomicLongFieldUpdater.newUpdater(Acquire.class, "request");

        private final AtomicLong requests;
        private final long startNanos;
        private final Slot slot;
        /** 0 until a message names it: folded checkouts never do, and take
         * no id from the pool's shared counter. */
        private volatile long request;
        private volatile int state = STARTING;

        Acquire(AtomicLong requests, long startNanos, Slot slot) {
            this.requests = requests;
            this.startNanos = startNanos;
            this.slot = slot;
        }

        /** The request id, unique in the pool. */
        public long request() {
            long r = request;
            if (r != 0) {
                return r;
            }
            long fresh = requests.getAndIncrement();
            return REQUEST.compareAndSet(this, 0, fresh) ? fresh : request;
        }

        /** The writer sends its start: true if it had not ended. */
        boolean startSent() {
            return STATE.compareAndSet(this, STARTING, START_SENT);
        }

        /** Ends it: true if its start was not sent (the end carries the wait). */
        boolean end() {
            return STATE.compareAndSet(this, STARTING, ENDED);
        }
    }

    /** One thread's place for its waiting acquire in this pool, and its OS
     * thread id (read once). Written by its thread, read by the writer. */
    private static final class Slot {
        final Thread owner;
        final int tid;
        /** In the pool's slots, where the writer looks. */
        final boolean registered;
        volatile Acquire waiting;

        Slot(Thread owner, int tid, boolean registered) {
            this.owner = owner;
            this.tid = tid;
            this.registered = registered;
        }
    }

    /** The calling thread's slot, registered unless there are too many
     * (then it is its own, unseen by the writer, and its acquires go to
     * {@link #waiting}). */
    private Slot newSlot() {
        boolean room = slots.size() < MAX_THREAD_SLOTS;
        Slot s = new Slot(Thread.currentThread(), Threads.currentTid(), room);
        if (room) {
            slots.add(s);
        }
        return s;
    }

    /** The calling thread's OS id, from its slot when the acquire is its own. */
    private static int tidFor(Acquire acquire) {
        Slot s = acquire.slot;
        return s.owner == Thread.currentThread() ? s.tid : Threads.currentTid();
    }

    /**
     * One connection of the pool (by local address) and what of it waits
     * for the writer's next batch: the {@code acquire_end} of its checkout
     * ({@code held}), and its short checkouts since the last batch, folded
     * (their waits and uses, the last holder, the last release). Guarded by
     * its monitor: one application thread at a time holds a connection, and
     * the writer looks at it once per batch.
     */
    private static final class Conn {
        final String localAddress;
        /** Handed out at, or -1 while in the pool. */
        long sinceNanos = -1;
        int tid;
        /** Whether the checkout's acquire_end waits for the batch. */
        boolean held;
        Acquire heldAcquire;
        /** The held acquire_end's wait, or -1 when the acquire's start was sent. */
        long heldWait = -1;
        /** The stack of the code that took it (checked out now), until its
         * {@code holder_stack} is made; null with stacks off. */
        Throwable stack;
        /** The frames (a JSON array) of the checkout's {@code holder_stack}
         * once made, re-sent after every {@code checkout_state} of the
         * checkout (an agent restarted meanwhile knows no stack); dropped
         * with the checkout. At most 4 KB. */
        String sentFrames;
        long[] waits = new long[8];
        long[] uses = new long[8];
        int folded;
        int foldTid;
        long foldAtNanos;
        /** Closed: dropped from the pool's connections. */
        boolean closed;

        Conn(String localAddress) {
            this.localAddress = localAddress;
        }
    }

    private Conn conn(String localAddress) {
        Conn c = conns.get(localAddress);
        return c != null ? c : conns.computeIfAbsent(localAddress, Conn::new);
    }

    /** A caller of this thread asks for a connection (see {@link Acquire}). */
    public Acquire acquireStart() {
        try {
            Slot s = slot.get();
            Acquire acquire = new Acquire(nextRequest, Threads.monotonicNanos(), s);
            if (s.waiting == null && s.registered) {
                s.waiting = acquire;
            } else {
                waiting.add(acquire);
            }
            schedulePending();
            return acquire;
        } catch (RuntimeException e) {
            // Never into the application; the end of a null acquire is not reported.
            return null;
        }
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
            int tid = tidFor(acquire);
            long waitNanos = acquire.end() ? Math.max(0, at - acquire.startNanos) : -1;
            Slot s = acquire.slot;
            if (s.waiting == acquire) {
                s.waiting = null;
            } else {
                waiting.remove(acquire);
            }
            boolean ok = result.equals("ok");
            if (ok && localAddress == null) {
                skipped.incrementAndGet();
                return;
            }
            if (ok) {
                // Only raw frames (no text): formatted only if it is held
                // stack_after. Not with no agent to send it to, nor within
                // the interval since the process's last capture (bounds
                // the captures' CPU whatever the checkout rate).
                Throwable stack = stacks && !reporter.agentAbsent() && HolderStacks.due(at, stackIntervalNanos)
                        ? HolderStacks.capture()
                        : null;
                // Its acquire_end waits for the batch: if the connection
                // comes back first (a short checkout, the usual one) the
                // pair is folded into the connection's checkouts line.
                for (;;) {
                    Conn c = conn(localAddress);
                    synchronized (c) {
                        if (c.closed) {
                            // Forgotten meanwhile (closed, or idle past
                            // MAX_IDLE_CONNS): a new entry.
                            continue;
                        }
                        if (c.held) {
                            sendHeldNow(c);
                        }
                        c.sinceNanos = at;
                        c.tid = tid;
                        c.held = true;
                        c.heldAcquire = acquire;
                        c.heldWait = waitNanos;
                        c.stack = stack;
                        c.sentFrames = null;
                    }
                    schedulePending();
                    return;
                }
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
     * {@code release}: the caller returned the connection to the pool. A
     * short checkout (its acquire_end not sent yet) is folded into the
     * connection's {@code checkouts} line, or, if its acquire_start was
     * sent, leaves as one {@code checkout} message.
     */
    public void release(String localAddress) {
        try {
            if (localAddress == null) {
                skipped.incrementAndGet();
                return;
            }
            Conn c = conns.get(localAddress);
            if (c != null) {
                long at = Threads.monotonicNanos();
                synchronized (c) {
                    if (!c.closed && c.held) {
                        Acquire held = takeHeld(c);
                        long use = Math.max(0, at - c.sinceNanos);
                        int tid = c.tid;
                        returned(c);
                        if (c.heldWait >= 0) {
                            fold(c, c.heldWait, use, tid, at);
                            return;
                        }
                        // Its folded checkouts came before it.
                        sendFoldedNow(c);
                        Json m = named(message("checkout", at).put("request", held.request()), localAddress);
                        reporter.send(withHolder(m, tid, -1).put("use_ns", use).toString());
                        return;
                    }
                    if (!c.closed) {
                        returned(c);
                        sendFoldedNow(c);
                        reporter.send(named(message("release", at), localAddress).toString());
                        return;
                    }
                }
            }
        } catch (RuntimeException e) {
            // Never into the application.
        }
        connectionMessage("release", localAddress);
    }

    /** c's held checkout's acquire, no longer held (nor kept: it keeps
     * its thread's slot). Called with c's monitor held. */
    private static Acquire takeHeld(Conn c) {
        Acquire held = c.heldAcquire;
        c.held = false;
        c.heldAcquire = null;
        return held;
    }

    /** Called with c's monitor held. */
    private void returned(Conn c) {
        c.sinceNanos = -1;
        c.stack = null;
        c.sentFrames = null;
    }

    /** A short checkout of c, folded into its next {@code checkouts} line
     * (sent at once when it holds {@value #MAX_FOLDED}). Called with c's
     * monitor held. */
    private void fold(Conn c, long waitNanos, long useNanos, int tid, long atNanos) {
        int n = c.folded;
        if (n == c.waits.length) {
            c.waits = Arrays.copyOf(c.waits, n * 2);
            c.uses = Arrays.copyOf(c.uses, n * 2);
        }
        c.waits[n] = waitNanos;
        c.uses[n] = useNanos;
        c.folded = n + 1;
        c.foldTid = tid;
        c.foldAtNanos = atNanos;
        if (c.folded >= MAX_FOLDED) {
            sendFoldedNow(c);
        } else if (n == 0) {
            schedulePending();
        }
    }

    /** c's folded checkouts as one {@code checkouts} line (null if none),
     * and forgotten. Called with c's monitor held. */
    private byte[] foldedLine(Conn c) {
        int n = c.folded;
        if (n == 0) {
            return null;
        }
        c.folded = 0;
        Json m = named(message("checkouts", c.foldAtNanos), c.localAddress);
        if (c.foldTid > 0) {
            m.put("tid", c.foldTid);
        }
        m.putRaw("waits_ns", list(c.waits, n)).putRaw("uses_ns", list(c.uses, n));
        return m.toString().getBytes(StandardCharsets.UTF_8);
    }

    /** c's held acquire_end as a line, and no longer held. Called with c's monitor held. */
    private byte[] heldLine(Conn c) {
        Acquire held = takeHeld(c);
        Json m = named(message("acquire_end", c.sinceNanos).put("request", held.request()).put("result", "ok"),
                c.localAddress);
        return withHolder(m, c.tid, c.heldWait).toString().getBytes(StandardCharsets.UTF_8);
    }

    /** Queues c's folded line now, ahead of a message about c. Called with c's monitor held. */
    private void sendFoldedNow(Conn c) {
        if (c.folded > 0 && reporter.agentAbsent()) {
            // It would be dropped: not made (lines made only to be dropped
            // more than doubled the adapter's cost per checkout with no agent).
            c.folded = 0;
            reporter.droppedUnmade(1);
            return;
        }
        byte[] line = foldedLine(c);
        if (line != null) {
            reporter.sendLine(line);
        }
    }

    /** Queues c's folded line and held acquire_end now. Called with c's monitor held. */
    private void sendHeldNow(Conn c) {
        sendFoldedNow(c);
        if (c.held) {
            reporter.sendLine(heldLine(c));
        }
    }

    private static Json withHolder(Json m, int tid, long waitNanos) {
        if (tid > 0) {
            m.put("tid", tid);
        }
        if (waitNanos >= 0) {
            m.put("wait_ns", waitNanos);
        }
        return m;
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

    /** Makes sure the writer's next batch calls {@link #pendingLines}. */
    private void schedulePending() {
        if (!pendingScheduled.get() && pendingScheduled.compareAndSet(false, true)) {
            reporter.wantPending();
        }
    }

    /** An acquire's start, or a checkout's held end (of the acquire), at its time. */
    private record Pending(long atNanos, Acquire start, Conn conn, Acquire held) {}

    /** The start of {@code a} (null: none) if it is still to be sent. */
    private static void addIfStarting(List<Pending> events, Acquire a) {
        if (a != null && a.state == Acquire.STARTING) {
            events.add(new Pending(a.startNanos, a, null, null));
        }
    }

    /**
     * What waits for the batch, called by the writer as it writes one (after
     * the lines queued for it): every connection's folded checkouts, then,
     * in the order they happened, the starts of acquires still waiting and
     * the ends of checkouts still out, so that the agent sees the pool as a
     * waiter saw it. With nobody waiting, a checkout handed out less than a
     * batch window ago stays held for the next batch: most end before it
     * and fold (a busy loop is mid-query at every batch, and would
     * otherwise send an acquire_end and a release per batch); one that
     * lasts is sent a batch later.
     */
    void pendingLines(List<byte[]> lines, long batchNanos) {
        if (!pendingScheduled.compareAndSet(true, false)) {
            return;
        }
        List<Pending> events = new ArrayList<>();
        for (Slot s : slots) {
            if (!s.owner.isAlive()) {
                // Nobody waits on a dead thread.
                slots.remove(s);
                continue;
            }
            addIfStarting(events, s.waiting);
        }
        for (Acquire a : waiting) {
            addIfStarting(events, a);
        }
        long youngFrom = events.isEmpty() ? Threads.monotonicNanos() - batchNanos : Long.MAX_VALUE;
        boolean kept = false;
        boolean prune = conns.size() > MAX_IDLE_CONNS;
        for (Conn c : conns.values()) {
            synchronized (c) {
                if (c.closed) {
                    continue;
                }
                if (prune && c.sinceNanos < 0 && !c.held && c.folded == 0) {
                    c.closed = true;
                    conns.remove(c.localAddress, c);
                    continue;
                }
                byte[] line = foldedLine(c);
                if (line != null) {
                    lines.add(line);
                }
                if (c.held) {
                    if (c.sinceNanos >= youngFrom) {
                        kept = true;
                    } else {
                        events.add(new Pending(c.sinceNanos, null, c, c.heldAcquire));
                    }
                }
            }
        }
        events.sort(Comparator.comparingLong(Pending::atNanos));
        for (Pending e : events) {
            Acquire a = e.start();
            if (a != null) {
                if (a.startSent()) {
                    waiting.remove(a);
                    Json m = message("acquire_start", a.startNanos).put("request", a.request());
                    if (a.slot.tid > 0) {
                        m.put("tid", a.slot.tid);
                    }
                    lines.add(m.toString().getBytes(StandardCharsets.UTF_8));
                }
                continue;
            }
            Conn c = e.conn();
            synchronized (c) {
                // Still the same checkout, still held.
                if (c.held && !c.closed && c.heldAcquire == e.held()) {
                    lines.add(heldLine(c));
                }
            }
        }
        if (kept) {
            schedulePending();
        }
        stackLines(lines);
    }

    /**
     * The {@code holder_stack} of every checkout held {@code stack_after}
     * whose {@code acquire_end} has left (in an earlier batch, or in this
     * one's lines, which come first), each once; and when the next is due.
     * With no agent, the stacks wait for one (after the state a new
     * stream begins with).
     */
    private void stackLines(List<byte[]> lines) {
        long now = Threads.monotonicNanos();
        long after = stackAfterNanos;
        boolean absent = reporter.agentAbsent();
        long due = Long.MAX_VALUE;
        for (Conn c : conns.values()) {
            Throwable stack;
            long since;
            synchronized (c) {
                stack = c.stack;
                if (stack == null || c.closed || c.sinceNanos < 0 || c.held) {
                    // A held end: its batch comes first, and looks again.
                    continue;
                }
                since = c.sinceNanos;
                long at = since + after;
                if (at - now > 0 || absent) {
                    due = Math.min(due, at);
                    continue;
                }
                c.stack = null;
            }
            // Formatted without the connection's monitor: its holder may
            // return it meanwhile (then the agent drops the stack, as of
            // a checkout no longer held).
            String[] frames = new String[1];
            byte[] line = holderStackLine(c.localAddress, since, stack, now, frames);
            if (line != null) {
                lines.add(line);
                synchronized (c) {
                    // Kept for the states to come, if still the same checkout.
                    if (!c.closed && c.sinceNanos == since) {
                        c.sentFrames = frames[0];
                    }
                }
            }
        }
        stackDueNanos = due;
    }

    /** The {@code holder_stack} line of a checkout (null: no frame to send). */
    byte[] holderStackLine(String name, long sinceNanos, Throwable stack, long atNanos) {
        return holderStackLine(name, sinceNanos, stack, atNanos, new String[1]);
    }

    /** The same, its frames (a JSON array) put in {@code frames[0]}. */
    private byte[] holderStackLine(String name, long sinceNanos, Throwable stack, long atNanos, String[] frames) {
        String head = holderStackHead(name, sinceNanos, atNanos);
        int budget = Reporter.MAX_MESSAGE_BYTES - utf8Length(head) - 2;
        CharSequence json = HolderStacks.json(stack.getStackTrace(), budget);
        if (json == null) {
            return null;
        }
        frames[0] = json.toString();
        String line = head.substring(0, head.length() - 1) + frames[0] + "}";
        return line.getBytes(StandardCharsets.UTF_8);
    }

    /** A {@code holder_stack} line of frames made before, or null if it
     * no longer fits (its time has more digits). */
    private String holderStackLine(String name, long sinceNanos, String frames, long atNanos) {
        String head = holderStackHead(name, sinceNanos, atNanos);
        String line = head.substring(0, head.length() - 1) + frames + "}";
        return utf8Length(line) <= Reporter.MAX_MESSAGE_BYTES ? line : null;
    }

    /** {@code {...,"stack":}}: the frames go before its last brace. */
    private String holderStackHead(String name, long sinceNanos, long atNanos) {
        return named(message("holder_stack", atNanos), name).put("since_ns", sinceNanos).putRaw("stack", "")
                .toString();
    }

    /** When the earliest stack not sent is due (monotonic ns), or
     * {@link Long#MAX_VALUE}: how long the writer may sleep. */
    long stackDueNanos() {
        return stackDueNanos;
    }

    /** Has the writer's next batch make the stacks due by {@code nowNanos}. */
    void wantStacksIfDue(long nowNanos) {
        long due = stackDueNanos;
        if (due != Long.MAX_VALUE && due - nowNanos <= 0) {
            stackDueNanos = Long.MAX_VALUE;
            schedulePending();
        }
    }

    /** Whether the connection {@code name} is checked out now. */
    boolean isOut(String name) {
        Conn c = conns.get(name);
        if (c == null) {
            return false;
        }
        synchronized (c) {
            return !c.closed && c.sinceNanos >= 0;
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
            long at = Threads.monotonicNanos();
            String line = named(message(kind, at), localAddress).toString();
            // Only a close ends the entry: a release of a connection this
            // pool does not remember (never handed out through it, or
            // forgotten) must not drop a newer entry on the same address.
            Conn c = kind.equals("connection_closed") ? conns.remove(localAddress) : null;
            if (c == null) {
                reporter.send(line);
                return;
            }
            // What waits for the batch about it goes first; a later
            // connection on the same address is a new entry.
            synchronized (c) {
                sendHeldNow(c);
                returned(c);
                c.closed = true;
                reporter.send(line);
            }
        } catch (RuntimeException e) {
            // Never into the application.
        }
    }

    /**
     * Sends the registration and the connections checked out now
     * ({@code checkout_state}, up to 32 to a message and never more than
     * {@value Reporter#MAX_MESSAGE_BYTES} bytes), as after an agent
     * restart, then the {@code holder_stack} of each of them whose stack
     * was sent. The agent takes it idempotently.
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
     * still give lines the agent takes; then the {@code holder_stack} again
     * (same {@code since_ns} and frames) of each checkout whose stack was
     * sent. A checkout whose stack is not due yet sends it when due.
     */
    List<String> stateMessages() {
        lastStateNanos = System.nanoTime();
        List<String> lines = new ArrayList<>();
        lines.add(registration());
        List<long[]> entries = new ArrayList<>();
        List<String> addresses = new ArrayList<>();
        List<String> sentFrames = new ArrayList<>();
        for (Conn c : conns.values()) {
            synchronized (c) {
                if (!c.closed && c.sinceNanos >= 0) {
                    entries.add(new long[] {c.sinceNanos, c.tid, addresses.size()});
                    addresses.add(c.localAddress);
                    sentFrames.add(c.sentFrames);
                }
            }
        }
        if (entries.isEmpty()) {
            return lines;
        }
        entries.sort(Comparator.comparingLong(e -> e[0]));
        // One time for the whole state: when it was taken.
        String empty = message("checkout_state", Threads.monotonicNanos()).putRaw("checkouts", "").toString();
        // {...,"checkouts":  +  [ e,e,... ]  +  }
        String head = empty.substring(0, empty.length() - 1) + "[";
        int base = utf8Length(head) + 2;
        StringBuilder list = new StringBuilder();
        int count = 0;
        int bytes = base;
        for (long[] c : entries) {
            Json e = named(new Json(), addresses.get((int) c[2])).put("mono_ns", c[0]);
            if (c[1] > 0) {
                e.put("tid", c[1]);
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
        // Then the stacks already sent of these checkouts, again: an agent
        // that restarted has none (one that did not replaces each).
        long at = Threads.monotonicNanos();
        for (long[] c : entries) {
            String frames = sentFrames.get((int) c[2]);
            if (frames != null) {
                String line = holderStackLine(addresses.get((int) c[2]), c[0], frames, at);
                if (line != null) {
                    lines.add(line);
                }
            }
        }
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
        if (interval > 0 && nowNanos - lastStateNanos >= interval && checkedOut() > 0) {
            sendState();
        }
    }
}
