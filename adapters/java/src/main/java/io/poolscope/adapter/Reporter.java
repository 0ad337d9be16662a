package io.poolscope.adapter;

import java.io.IOException;
import java.lang.ref.WeakReference;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

/**
 * The connection to the poolscope agent: its Unix stream socket
 * ({@code $POOLSCOPE_ADAPTER_STREAM_SOCKET}, else
 * {@value #DEFAULT_STREAM_SOCKET}), one JSON message per line. The agent
 * names the sender by the kernel's credentials of the stream (SO_PEERCRED),
 * so no message carries a pid.
 *
 * <p>Reporting never gets in the application's way: {@link #send} puts the
 * line in a bounded, ordered queue of {@value #MAX_QUEUED} messages (or
 * drops and counts it when the queue is full) and returns; one daemon
 * thread ({@code poolscope-adapter}) writes the queue to the socket, the
 * messages of {@link #BATCH_NANOS 50 ms} at a time. When
 * the agent is absent the thread drops what is queued (counted) and tries
 * again with a backoff of 100 ms doubling to 5 s, after a failed connect
 * and after a lost stream alike; the backoff starts over only once a
 * connection has lasted {@value #STABLE_NANOS} ns (an agent at its stream
 * limit accepts and closes at once). When it connects after a failure (the
 * agent came back or restarted) it first writes every pool's registration
 * and the connections it has checked out ({@code checkout_state}), then
 * what is queued. The same thread re-sends that state every
 * {@link PoolReporter#DEFAULT_STATE_INTERVAL_NANOS 30 s} for pools that have
 * connections out, so an agent that restarted while the application was
 * idle still learns of a leak that began before; and it sends the holder
 * stack of a checkout held {@code stack_after} ({@link HolderStacks}),
 * sleeping until the earliest is due rather than waking to look.
 */
public final class Reporter {
    /** Protocol version. */
    public static final int PROTOCOL_VERSION = 1;
    /** Where the agent listens unless the environment says otherwise. */
    public static final String DEFAULT_STREAM_SOCKET = "/run/poolscope/adapter-stream.sock";
    /** The environment variable naming the agent's stream socket. */
    public static final String STREAM_SOCKET_ENV = "POOLSCOPE_ADAPTER_STREAM_SOCKET";
    /** The agent drops a stream whose line is longer; such lines are not sent. */
    public static final int MAX_MESSAGE_BYTES = 4096;
    /** Messages waiting for the writer thread at most; more are dropped. */
    public static final int MAX_QUEUED = 4096;

    private static final long FIRST_BACKOFF_MS = 100;
    private static final long MAX_BACKOFF_MS = 5000;
    /** Bytes written per system call at most (whole lines). */
    private static final int WRITE_BYTES = 64 * 1024;
    /** How long the writer, woken by a first message, lets the next ones
     * join it: under load it then wakes and writes twenty times a second,
     * not once per message, and costs the application a lock and a queue
     * slot per message instead of a thread wake-up. A batch costs the
     * writer about 100 us whatever it holds (its wake-ups, the write, the
     * pools' pending lines; on a slow test VM): 10 ms windows took 1 % of
     * a core under load, 50 ms take 0.2 %. */
    static final long BATCH_NANOS = 50_000_000L;
    /** Queued messages that are written without waiting for the window
     * (a sixteenth of the queue's bound). */
    private static final int WRITE_AT_ONCE = MAX_QUEUED / 16;
    /** Longest the writer sleeps, so that periodic state is on time. */
    private static final long MAX_IDLE_WAIT_MS = 500;
    /** A connection that lasted this long resets the backoff (and, after a
     * failure, is a comeback); one lost sooner leaves both as they are. */
    static final long STABLE_NANOS = 1_000_000_000L;
    /** How often the writer checks that the agent did not close the stream. */
    private static final long PROBE_INTERVAL_NANOS = 100_000_000L;

    private static volatile Reporter defaultReporter;

    private final Path path;
    private final long batchNanos;
    private final Object lock = new Object();
    /** Lines, in order.
     * The writer takes the whole queue at once (swapping in an empty one)
     * and makes and writes its lines outside the lock, so that the
     * application's threads never wait while it does; at most
     * {@value #MAX_QUEUED} wait here, and as many again in the writer's
     * hands. */
    private ArrayDeque<byte[]> queue = new ArrayDeque<>();
    /** A pool asked for its pending lines to join the next batch. */
    private boolean pendingWanted;
    private final List<WeakReference<PoolReporter>> pools = new ArrayList<>();
    private boolean writerStarted;
    private boolean writerWaiting;

    private final AtomicLong sent = new AtomicLong();
    private final AtomicLong dropped = new AtomicLong();
    private final AtomicLong connects = new AtomicLong();
    private final AtomicLong comebacks = new AtomicLong();
    private volatile boolean connected;
    /** The last connect failed: what would be queued now is dropped at the
     * next attempt, so the pools need not make their lines. */
    private volatile boolean agentAbsent;

    /** A reporter for the agent at {@code path} (its stream socket). */
    public Reporter(Path path) {
        this(path, BATCH_NANOS);
    }

    /** As {@link #Reporter(Path)}, with another batch window (tests). */
    Reporter(Path path, long batchNanos) {
        this.path = path;
        this.batchNanos = Math.max(0, batchNanos);
    }

    /** The process's reporter for the socket the environment names. */
    public static Reporter fromEnv() {
        Reporter r = defaultReporter;
        if (r == null) {
            synchronized (Reporter.class) {
                r = defaultReporter;
                if (r == null) {
                    r = new Reporter(socketPath(System.getenv(STREAM_SOCKET_ENV)));
                    defaultReporter = r;
                }
            }
        }
        return r;
    }

    static Path socketPath(String env) {
        return Path.of(env == null || env.isEmpty() ? DEFAULT_STREAM_SOCKET : env);
    }

    public Path socketPath() {
        return path;
    }

    /** What this reporter did so far. */
    public Stats stats() {
        int queued;
        synchronized (lock) {
            queued = queue.size();
        }
        return new Stats(sent.get(), dropped.get(), queued, connects.get(), comebacks.get(), connected);
    }

    /** Counters of a {@link Reporter}. */
    public record Stats(long sent, long dropped, int queued, long connects, long comebacks, boolean connected) {
        public String toJson() {
            return new Json().put("sent", sent).put("dropped", dropped).put("queued", queued)
                    .put("connects", connects).put("comebacks", comebacks)
                    .putRaw("connected", Boolean.toString(connected)).toString();
        }
    }

    /**
     * Queues one message (a JSON object without the newline). Never blocks
     * beyond a short lock and never throws: a message that is too long, or
     * that finds the queue full, is dropped and counted.
     */
    public void send(String json) {
        try {
            byte[] bytes = json.getBytes(StandardCharsets.UTF_8);
            if (bytes.length > MAX_MESSAGE_BYTES || json.indexOf('\n') >= 0) {
                dropped.incrementAndGet();
                return;
            }
            enqueue(bytes);
        } catch (RuntimeException | Error e) {
            dropped.incrementAndGet();
        }
    }

    /** Queues a line already encoded (UTF-8, no newline); false if it was dropped (counted). */
    boolean sendLine(byte[] line) {
        try {
            if (line.length > MAX_MESSAGE_BYTES) {
                dropped.incrementAndGet();
                return false;
            }
            return enqueue(line);
        } catch (RuntimeException | Error e) {
            dropped.incrementAndGet();
            return false;
        }
    }

    /** Whether the last connect failed (see {@link #agentAbsent}). */
    boolean agentAbsent() {
        return agentAbsent;
    }

    /** Counts {@code n} messages dropped before they were made. */
    void droppedUnmade(long n) {
        dropped.addAndGet(n);
    }

    /** A pool has lines for the next batch ({@link PoolReporter#pendingLines}):
     * makes sure the writer writes one. */
    void wantPending() {
        try {
            synchronized (lock) {
                pendingWanted = true;
                if (!writerStarted) {
                    startWriter();
                } else if (writerWaiting) {
                    lock.notify();
                }
            }
        } catch (RuntimeException | Error e) {
            // The next message wakes the writer.
        }
    }

    private boolean enqueue(byte[] message) {
        synchronized (lock) {
            if (queue.size() >= MAX_QUEUED) {
                dropped.incrementAndGet();
                return false;
            }
            queue.addLast(message);
            if (!writerStarted) {
                startWriter();
            } else if (writerWaiting) {
                lock.notify();
            }
            return true;
        }
    }

    /** Waits up to {@code timeoutMs} for the queue to be written; true if it was. */
    public boolean flush(long timeoutMs) {
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(timeoutMs);
        try {
            while (System.nanoTime() < deadline) {
                synchronized (lock) {
                    if (queue.isEmpty() && !pendingWanted) {
                        return true;
                    }
                }
                Thread.sleep(5);
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
        return false;
    }

    /** Pools whose state the writer re-sends (after a comeback, periodically). */
    void watch(PoolReporter pool) {
        synchronized (lock) {
            pools.removeIf(w -> w.get() == null);
            pools.add(new WeakReference<>(pool));
        }
    }

    private void startWriter() {
        // Called with the lock held.
        writerStarted = true;
        try {
            Thread t = new Thread(this::writeLoop, "poolscope-adapter");
            t.setDaemon(true);
            t.start();
        } catch (RuntimeException | Error e) {
            // No thread: messages wait and are dropped once the queue is full.
            writerStarted = false;
        }
    }

    private List<PoolReporter> livePools() {
        List<PoolReporter> live = new ArrayList<>();
        synchronized (lock) {
            pools.removeIf(w -> w.get() == null);
            for (WeakReference<PoolReporter> w : pools) {
                PoolReporter p = w.get();
                if (p != null) {
                    live.add(p);
                }
            }
        }
        return live;
    }

    /** No agent: what is queued, and what the pools hold for the batch, is
     * given up (counted), as a datagram to an absent agent would be. */
    private void dropQueued() {
        boolean pending;
        synchronized (lock) {
            dropped.addAndGet(queue.size());
            queue.clear();
            pending = pendingWanted;
            pendingWanted = false;
        }
        if (pending) {
            dropped.addAndGet(pendingLines().size());
        }
    }

    /** Every pool's lines for this batch (see {@link PoolReporter#pendingLines}). */
    private List<byte[]> pendingLines() {
        List<byte[]> lines = new ArrayList<>();
        for (PoolReporter p : livePools()) {
            try {
                p.pendingLines(lines, batchNanos);
            } catch (RuntimeException e) {
                // One pool's bug does not keep the others' lines.
            }
        }
        return lines;
    }

    // The writer thread's own state (no other thread touches it).
    private SocketChannel channel;
    /** A connection failed or was lost, and none has lasted since. */
    private boolean failed;
    private boolean stable;
    private long backoffMs = FIRST_BACKOFF_MS;
    private long lastWriteNanos;
    private long connectedAtNanos;
    private long lastProbeNanos;
    private ByteBuffer buffer;
    private final ByteBuffer probe = ByteBuffer.allocate(256);

    /** No message queued, no pool's lines wanted, no pool to re-send. */
    private boolean nothingToSay() {
        synchronized (lock) {
            if (!queue.isEmpty() || pendingWanted) {
                return false;
            }
        }
        return livePools().isEmpty();
    }

    /** With nothing queued or wanted, waits for it (at most
     * {@code timeoutMs}); whether it waited and something came.
     * Called with the lock held. */
    private boolean awaitWork(long timeoutMs) throws InterruptedException {
        if (!queue.isEmpty() || pendingWanted) {
            return false;
        }
        writerWaiting = true;
        try {
            lock.wait(timeoutMs);
        } finally {
            writerWaiting = false;
        }
        return !queue.isEmpty() || pendingWanted;
    }

    /** How long the writer may wait for work: {@link #MAX_IDLE_WAIT_MS},
     * or less when a pool's holder stack is due sooner (at least 1 ms). */
    private long idleWaitMs(List<PoolReporter> live) {
        long wait = MAX_IDLE_WAIT_MS;
        long now = Threads.monotonicNanos();
        for (PoolReporter p : live) {
            long due = p.stackDueNanos();
            if (due != Long.MAX_VALUE) {
                long ms = Math.max(1, (due - now + 999_999L) / 1_000_000L);
                wait = Math.min(wait, ms);
            }
        }
        return wait;
    }

    private void writeLoop() {
        // Direct: a heap buffer is copied into a temporary direct one on every write.
        buffer = ByteBuffer.allocateDirect(WRITE_BYTES);
        ArrayDeque<byte[]> taken = new ArrayDeque<>();
        while (true) {
            try {
                if (channel == null) {
                    if (nothingToSay()) {
                        // A stream would say nothing, and the agent closes
                        // streams that stay silent: wait for a message or
                        // a pool to connect for.
                        synchronized (lock) {
                            awaitWork(MAX_IDLE_WAIT_MS);
                        }
                        continue;
                    }
                    if (!connect()) {
                        continue;
                    }
                }
                boolean woken;
                int queued;
                boolean pending;
                long idleWait = idleWaitMs(livePools());
                synchronized (lock) {
                    woken = awaitWork(idleWait);
                    queued = queue.size() + (pendingWanted ? 1 : 0);
                }
                // One write per batch window: woken by a first message, the
                // whole window; with messages already waiting, what is left
                // of the window since the last write. A queue filling up is
                // written at once.
                long linger = woken ? batchNanos : batchNanos - (System.nanoTime() - lastWriteNanos);
                if (queued > 0 && queued < WRITE_AT_ONCE && linger > 0) {
                    Thread.sleep(linger / 1_000_000L, (int) (linger % 1_000_000L));
                }
                synchronized (lock) {
                    ArrayDeque<byte[]> full = queue;
                    queue = taken;
                    taken = full;
                    pending = pendingWanted;
                    pendingWanted = false;
                }
                // What the pools hold for the batch goes after what was
                // queued for it (see PoolReporter#pendingLines).
                if (pending) {
                    taken.addAll(pendingLines());
                }
                if (!taken.isEmpty()) {
                    boolean written = writeTaken(taken);
                    taken.clear();
                    if (!written) {
                        // The agent went away (or dropped the stream).
                        lost();
                        continue;
                    }
                    lastWriteNanos = System.nanoTime();
                }
                long now = System.nanoTime();
                boolean lasted = now - connectedAtNanos >= STABLE_NANOS;
                if (now - lastProbeNanos >= PROBE_INTERVAL_NANOS || (lasted && !stable)) {
                    lastProbeNanos = now;
                    if (!open()) {
                        lost();
                        continue;
                    }
                    if (lasted && !stable) {
                        // Only a connection that lasts is the agent taking
                        // us: one it closed at once (its stream limit) must
                        // not cut the backoff short nor count as a comeback.
                        stable = true;
                        backoffMs = FIRST_BACKOFF_MS;
                        if (failed) {
                            failed = false;
                            comebacks.incrementAndGet();
                        }
                    }
                }
                for (PoolReporter p : livePools()) {
                    p.sendStateIfDue(now);
                    // A checkout held stack_after: its stack in the next batch.
                    p.wantStacksIfDue(Threads.monotonicNanos());
                }
            } catch (InterruptedException e) {
                // A daemon thread: nobody should interrupt it, but if
                // someone does, carry on.
                Thread.interrupted();
            } catch (RuntimeException | Error e) {
                // Never let the writer die of a bug; keep going.
                if (e instanceof VirtualMachineError vme && !(e instanceof StackOverflowError)) {
                    throw vme;
                }
            }
        }
    }

    /**
     * Connects; after a failure, writes every pool's state (registration,
     * checkouts) first, ahead of what is queued, since a new agent knows
     * nothing of the pools. False (after the backoff) if that failed.
     */
    private boolean connect() throws InterruptedException {
        SocketChannel c = null;
        try {
            c = SocketChannel.open(StandardProtocolFamily.UNIX);
            c.connect(UnixDomainSocketAddress.of(path));
        } catch (IOException | RuntimeException e) {
            closeQuietly(c);
            connected = false;
            failed = true;
            agentAbsent = true;
            // No agent: what is queued is given up, as a datagram to an
            // absent agent would be.
            dropQueued();
            backoff();
            return false;
        }
        channel = c;
        connected = true;
        agentAbsent = false;
        connects.incrementAndGet();
        connectedAtNanos = System.nanoTime();
        lastProbeNanos = connectedAtNanos;
        stable = false;
        if (failed) {
            List<byte[]> state = new ArrayList<>();
            for (PoolReporter p : livePools()) {
                try {
                    for (String line : p.stateMessages()) {
                        byte[] bytes = line.getBytes(StandardCharsets.UTF_8);
                        if (bytes.length > MAX_MESSAGE_BYTES) {
                            dropped.incrementAndGet();
                        } else {
                            state.add(bytes);
                        }
                    }
                } catch (RuntimeException e) {
                    // One pool's bug does not keep the others' state.
                }
            }
            int from = 0;
            while (from < state.size()) {
                int to = from;
                int bytes = 0;
                while (to < state.size() && bytes + state.get(to).length + 1 <= WRITE_BYTES) {
                    bytes += state.get(to).length + 1;
                    to++;
                }
                if (!write(state.subList(from, to))) {
                    dropped.addAndGet(state.size() - from);
                    lost();
                    return false;
                }
                from = to;
            }
        }
        return true;
    }

    /**
     * Writes what the writer took from the queue, in order, at most
     * {@value #WRITE_BYTES} bytes per system call. False if the stream
     * failed; what was not written is then counted as dropped.
     */
    private boolean writeTaken(ArrayDeque<byte[]> taken) {
        buffer.clear();
        int lines = 0;
        int left = taken.size();
        for (byte[] line : taken) {
            left--;
            if (line.length > MAX_MESSAGE_BYTES) {
                continue;
            }
            if (buffer.remaining() < line.length + 1) {
                if (!flushBuffer(lines)) {
                    dropped.addAndGet(lines + 1 + left);
                    return false;
                }
                lines = 0;
            }
            buffer.put(line).put((byte) '\n');
            lines++;
        }
        if (lines > 0 && !flushBuffer(lines)) {
            dropped.addAndGet(lines);
            return false;
        }
        return true;
    }

    /** Writes the buffer's {@code lines} lines and clears it; false if the stream failed. */
    private boolean flushBuffer(int lines) {
        buffer.flip();
        try {
            while (buffer.hasRemaining()) {
                channel.write(buffer);
            }
        } catch (IOException e) {
            return false;
        }
        buffer.clear();
        sent.addAndGet(lines);
        return true;
    }

    /** Writes the lines (at most {@value #WRITE_BYTES} bytes); false if the stream failed. */
    private boolean write(List<byte[]> lines) {
        buffer.clear();
        for (byte[] line : lines) {
            buffer.put(line).put((byte) '\n');
        }
        return flushBuffer(lines.size());
    }

    /** Whether the agent still holds the stream: it never writes, so a
     * read finds nothing, or the end when it closed the stream. */
    private boolean open() {
        try {
            channel.configureBlocking(false);
            try {
                int n;
                do {
                    probe.clear();
                    n = channel.read(probe);
                } while (n > 0);
                return n == 0;
            } finally {
                channel.configureBlocking(true);
            }
        } catch (IOException | RuntimeException e) {
            return false;
        }
    }

    /** The stream is lost: close it and wait before connecting again. */
    private void lost() throws InterruptedException {
        closeQuietly(channel);
        channel = null;
        connected = false;
        failed = true;
        backoff();
    }

    private void backoff() throws InterruptedException {
        long ms = backoffMs;
        backoffMs = Math.min(backoffMs * 2, MAX_BACKOFF_MS);
        Thread.sleep(ms);
    }

    private static void closeQuietly(SocketChannel channel) {
        if (channel != null) {
            try {
                channel.close();
            } catch (IOException ignored) {
                // Nothing to do.
            }
        }
    }
}
