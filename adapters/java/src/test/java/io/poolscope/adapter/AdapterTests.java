package io.poolscope.adapter;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.channels.Channels;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

/**
 * The adapter's unit tests, without a test framework: {@code java -cp ...
 * io.poolscope.adapter.AdapterTests} exits 0 and prints {@code ok N tests}
 * when all pass. They need no agent, database or kernel: a Unix stream
 * socket of their own stands in for the agent.
 */
public final class AdapterTests {
    private static int run;

    /** Every message a fake agent received, in order. */
    private static final List<String> SENT = new ArrayList<>();

    /**
     * With a path as its argument, also writes every message the tests saw
     * sent there, one per line, for the golden-shape check of the Rust
     * test that runs these (tests/tests/adapter_java.rs).
     */
    public static void main(String[] args) throws Exception {
        jsonEscapesAndCuts();
        jdbcUrlsAreRead();
        tidsAreReadFromProcThreadSelf();
        socketsAreFoundInDriverFields();
        messagesArriveAsLinesInOrder();
        aWaitingAcquireIsSentAsPending();
        shortCheckoutsFoldInLinesOf64BeforeTheClose();
        aYoungCheckoutStaysHeldThroughABatchUnlessSomeoneWaits();
        idleConnectionsPastTheBoundAreForgotten();
        waitersOfEveryThreadAreSeen();
        aReporterWithNothingToSayOpensNoStream();
        noAgentDropsAndComebackResendsState();
        aFoldedLineDroppedWithoutAnAgentTakesNoMoreCheckouts();
        stateComesBeforeTheBacklogAfterAComeback();
        aStreamClosedAtAcceptIsRetriedWithBackoff();
        stateLinesFitWithLongNamesAndIpv6();
        aHandRolledPoolNamesItsHandlesById();
        if (args.length > 0) {
            Files.write(Path.of(args[0]), SENT, StandardCharsets.UTF_8);
        }
        System.out.println("ok " + run + " tests");
    }

    private static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    private static void eq(Object got, Object want, String what) {
        if (got == null ? want != null : !got.equals(want)) {
            throw new AssertionError(what + ": got " + got + ", want " + want);
        }
    }

    private static void waitFor(java.util.function.BooleanSupplier ok, String what) throws InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
        while (!ok.getAsBoolean()) {
            if (System.nanoTime() > deadline) {
                throw new AssertionError("timed out: " + what);
            }
            Thread.sleep(10);
        }
    }

    static void jsonEscapesAndCuts() {
        String s = new Json().put("a", "q\"\\\n\u0001é\uD83D\uDE00").put("n", 5).put("none", (String) null).toString();
        eq(s, "{\"a\":\"q\\\"\\\\\\n\\u0001é\uD83D\uDE00\",\"n\":5}", "escaped JSON");
        eq(new Json().put("lone", "x\uD800y").toString(), "{\"lone\":\"x\uFFFDy\"}", "lone surrogate");
        String emoji = "\uD83D\uDE00".repeat(200);
        String cut = Json.cut(emoji, 128);
        eq(cut.codePointCount(0, cut.length()), 128, "cut by code points");
        run++;
    }

    static void jdbcUrlsAreRead() {
        eq(JdbcUrl.parse("jdbc:postgresql://127.0.0.1:5433/shop?ssl=false"),
                new JdbcUrl("postgresql", "127.0.0.1", 5433, "shop"), "pg url");
        eq(JdbcUrl.parse("jdbc:postgresql://db/shop"), new JdbcUrl("postgresql", "db", 5432, "shop"), "default port");
        eq(JdbcUrl.parse("jdbc:mariadb://a:3307,b:3308/app"), new JdbcUrl("mysql", "a", 3307, "app"), "failover list");
        eq(JdbcUrl.parse("jdbc:mysql://[::1]:3310/x"), new JdbcUrl("mysql", "::1", 3310, "x"), "ipv6");
        eq(JdbcUrl.parse("jdbc:postgresql:shop"), new JdbcUrl("postgresql", "localhost", 5432, "shop"), "short form");
        eq(JdbcUrl.parse("jdbc:h2:mem:x"), JdbcUrl.UNKNOWN, "other systems");
        eq(JdbcUrl.parse("jdbc:postgresql://h:notaport/db"), JdbcUrl.UNKNOWN, "garbage is unknown, no exception");
        eq(JdbcUrl.parse(null), JdbcUrl.UNKNOWN, "null");
        run++;
    }

    static void tidsAreReadFromProcThreadSelf() throws Exception {
        eq(Threads.parseTid("123/task/456"), 456, "parsed");
        eq(Threads.parseTid("self"), -1, "not a task link");
        int main = Threads.currentTid();
        check(main > 0, "a tid on Linux");
        eq(Threads.currentTid(), main, "cached");
        check(Files.isDirectory(Path.of("/proc/self/task/" + main)), "the tid is one of our tasks");
        int[] other = new int[1];
        Thread t = new Thread(() -> other[0] = Threads.currentTid());
        t.start();
        t.join();
        check(other[0] > 0 && other[0] != main, "another thread, another tid: " + other[0]);
        run++;
    }

    /** Stand-ins for drivers' classes: pgjdbc-like (3 deep) and MariaDB-like (2). */
    static final class Stream {
        final Object padding = new ArrayList<>(List.of("x"));
        Socket connection;
    }

    static final class Executor {
        Stream pgStream;
    }

    static final class PgLike {
        final Executor queryExecutor = new Executor();
        final PgLike self = this;
    }

    static final class Protocol {
        Socket socket;
    }

    static final class MariaLike {
        Object protocol;
    }

    static void socketsAreFoundInDriverFields() throws Exception {
        try (ServerSocket server = new ServerSocket(0, 4, InetAddress.getLoopbackAddress());
                Socket a = new Socket(InetAddress.getLoopbackAddress(), server.getLocalPort());
                Socket b = new Socket(InetAddress.getLoopbackAddress(), server.getLocalPort())) {
            PgLike pg = new PgLike();
            pg.queryExecutor.pgStream = new Stream();
            pg.queryExecutor.pgStream.connection = a;
            eq(Sockets.localAddress(pg), "127.0.0.1:" + a.getLocalPort(), "pgjdbc-like");
            // The path is remembered per class and read again for the next one.
            PgLike pg2 = new PgLike();
            pg2.queryExecutor.pgStream = new Stream();
            pg2.queryExecutor.pgStream.connection = b;
            eq(Sockets.localAddress(pg2), "127.0.0.1:" + b.getLocalPort(), "second of a class");
            MariaLike m = new MariaLike();
            Protocol p = new Protocol();
            p.socket = b;
            m.protocol = p;
            eq(Sockets.localAddress(m), "127.0.0.1:" + b.getLocalPort(), "mariadb-like");
            eq(Sockets.localAddress(new MariaLike()), null, "no socket");
            eq(Sockets.localAddress(null), null, "null");
        }
        run++;
    }

    /** A stand-in agent: accepts streams and collects their lines. */
    static final class FakeAgent implements AutoCloseable {
        final Path path;
        final ServerSocketChannel server;
        final LinkedBlockingQueue<String> lines = new LinkedBlockingQueue<>();
        final List<SocketChannel> accepted = new ArrayList<>();

        FakeAgent(Path path) throws Exception {
            this.path = path;
            Files.deleteIfExists(path);
            server = ServerSocketChannel.open(StandardProtocolFamily.UNIX);
            server.bind(UnixDomainSocketAddress.of(path));
            Thread t = new Thread(this::acceptLoop, "fake-agent");
            t.setDaemon(true);
            t.start();
        }

        private void acceptLoop() {
            try {
                while (true) {
                    SocketChannel c = server.accept();
                    synchronized (accepted) {
                        accepted.add(c);
                    }
                    Thread r = new Thread(() -> {
                        try (BufferedReader in = new BufferedReader(new InputStreamReader(
                                Channels.newInputStream(c), StandardCharsets.UTF_8))) {
                            String line;
                            while ((line = in.readLine()) != null) {
                                lines.add(line);
                            }
                        } catch (Exception e) {
                            // Closed.
                        }
                    });
                    r.setDaemon(true);
                    r.start();
                }
            } catch (Exception e) {
                // Closed.
            }
        }

        String next() throws InterruptedException {
            String line = lines.poll(5, TimeUnit.SECONDS);
            if (line == null) {
                throw new AssertionError("no line from the adapter within 5 s");
            }
            SENT.add(line);
            return line;
        }

        /** Whether no line comes within {@code ms}. */
        boolean pollNothing(long ms) throws InterruptedException {
            String line = lines.poll(ms, TimeUnit.MILLISECONDS);
            if (line != null) {
                SENT.add(line);
            }
            return line == null;
        }

        /** The agent drops every stream it holds (as for a line too long). */
        void dropStreams() throws java.io.IOException {
            synchronized (accepted) {
                for (SocketChannel c : accepted) {
                    c.close();
                }
                accepted.clear();
            }
        }

        @Override
        public void close() throws java.io.IOException {
            server.close();
            synchronized (accepted) {
                for (SocketChannel c : accepted) {
                    c.close();
                }
            }
            Files.deleteIfExists(path);
        }
    }

    static void messagesArriveAsLinesInOrder() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            // A batch window far longer than the calls below take: the
            // acquires end before the writer reaches their starts.
            Reporter r = new Reporter(agent.path, 500_000_000L);
            PoolReporter pool = new PoolReporter(r, "orders",
                    new PoolInfo("postgresql", "127.0.0.1", 5432, "shop", 8, 8, -1, "HikariCP"));
            pool.register(null);
            String pm = agent.next();
            check(pm.startsWith("{\"v\":1,\"kind\":\"pool\",\"pool\":\"orders\",\"mono_ns\":"), pm);
            check(pm.endsWith(",\"db_system\":\"postgresql\",\"server_address\":\"127.0.0.1\","
                    + "\"server_port\":5432,\"namespace\":\"shop\",\"max\":8,\"min_idle\":8,\"library\":\"HikariCP\"}"), pm);
            pool.connectionCreated("127.0.0.1:40000");
            for (int i = 0; i < 2; i++) {
                PoolReporter.Acquire req = pool.acquireStart();
                pool.acquireOk(req, "127.0.0.1:40000");
                pool.release("127.0.0.1:40000");
            }
            PoolReporter.Acquire req3 = pool.acquireStart();
            pool.acquireTimeout(req3);
            pool.acquireOk(pool.acquireStart(), null);
            pool.connectionClosed("127.0.0.1:40000");
            int tid = Threads.currentTid();
            // # is mono_ns, * another number.
            String[] want = {
                "\"kind\":\"connection_created\",\"pool\":\"orders\",\"mono_ns\":#,\"local_address\":\"127.0.0.1:40000\"}",
                // Folded: no acquire_start, the wait in the acquire_end.
                // Its request id is the pool's first: folded checkouts take none.
                "\"kind\":\"acquire_end\",\"pool\":\"orders\",\"mono_ns\":#,\"request\":1,\"result\":\"timeout\",\"tid\":" + tid + ",\"wait_ns\":*}",
                // Acquired and released within the batch window, twice: one
                // checkouts line (no acquire_start, no separate end and
                // release, no request ids), a wait and a use for each, sent
                // before the connection's close (the last acquire's end named no
                // connection: nothing at all).
                "\"kind\":\"checkouts\",\"pool\":\"orders\",\"mono_ns\":#,\"local_address\":\"127.0.0.1:40000\",\"tid\":" + tid + ",\"waits_ns\":[*,*],\"uses_ns\":[*,*]}",
                "\"kind\":\"connection_closed\",\"pool\":\"orders\",\"mono_ns\":#,\"local_address\":\"127.0.0.1:40000\"}",
            };
            long[] ns = new long[want.length];
            for (int i = 0; i < want.length; i++) {
                String w = want[i];
                String line = agent.next();
                String regex = ("\\Q{\"v\":1," + w + "\\E").replace("#", "\\E(\\d+)\\Q").replace("*", "\\E\\d+\\Q");
                java.util.regex.Matcher m = java.util.regex.Pattern.compile(regex).matcher(line);
                check(m.matches(), line + " is not " + w);
                ns[i] = Long.parseLong(m.group(1));
            }
            // The connection's own messages in order of their times (the
            // timeout, about no connection, is sent at once; the folded
            // line waits for the close or the batch).
            check(ns[0] <= ns[2] && ns[2] <= ns[3] && ns[2] <= ns[1], "mono_ns in order: " + Arrays.toString(ns));
            eq(pool.unnamed(), 1L, "the unnamed acquire is counted");
            check(r.flush(2000), "flushed");
            eq(r.stats().dropped(), 0L, "nothing dropped");
            // Too long: dropped, never sent (the agent would drop the stream).
            r.send("{\"x\":\"" + "a".repeat(5000) + "\"}");
            eq(r.stats().dropped(), 1L, "oversized dropped");
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void aWaitingAcquireIsSentAsPending() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            // No batch window: the writer takes the start at once.
            Reporter r = new Reporter(agent.path, 0);
            PoolReporter pool = new PoolReporter(r, "orders", null);
            PoolReporter.Acquire waiting = pool.acquireStart();
            String start = agent.next();
            int tid = Threads.currentTid();
            check(start.startsWith("{\"v\":1,\"kind\":\"acquire_start\",\"pool\":\"orders\",\"mono_ns\":")
                    && start.endsWith(",\"request\":1,\"tid\":" + tid + "}"), start);
            pool.acquireOk(waiting, "127.0.0.1:40002");
            String end = agent.next();
            check(end.contains("\"kind\":\"acquire_end\"") && end.contains("\"request\":1,")
                    && !end.contains("wait_ns"), "its start was sent, so no wait_ns: " + end);
            // Its end was sent too: the return is a plain release.
            pool.release("127.0.0.1:40002");
            String release = agent.next();
            check(release.contains("\"kind\":\"release\"") && release.endsWith("\"local_address\":\"127.0.0.1:40002\"}"),
                    release);
            eq(pool.checkedOut(), 0, "returned");
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void shortCheckoutsFoldInLinesOf64BeforeTheClose() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            // A long window: every checkout below is short.
            Reporter r = new Reporter(agent.path, 500_000_000L);
            PoolReporter pool = new PoolReporter(r, "orders", null);
            // An acquire whose start was sent (still waiting when the writer
            // came), then given back within a window: one checkout message,
            // with its request id and no wait of its own.
            PoolReporter.Acquire waited = pool.acquireStart();
            check(r.flush(2000), "the start written");
            String start = agent.next();
            check(start.contains("\"kind\":\"acquire_start\"") && start.contains("\"request\":1"), start);
            pool.acquireOk(waited, "127.0.0.1:40003");
            pool.release("127.0.0.1:40003");
            String checkout = agent.next();
            check(checkout.contains("\"kind\":\"checkout\"") && checkout.contains("\"request\":1,")
                    && checkout.contains("\"use_ns\":") && !checkout.contains("wait_ns"), checkout);
            for (int i = 0; i < 150; i++) {
                pool.acquireOk(pool.acquireStart(), "127.0.0.1:40003");
                pool.release("127.0.0.1:40003");
            }
            pool.connectionClosed("127.0.0.1:40003");
            // A new connection on the same address, within the same window.
            pool.acquireOk(pool.acquireStart(), "127.0.0.1:40003");
            pool.release("127.0.0.1:40003");
            int folded = 0;
            int lines = 0;
            for (;;) {
                String line = agent.next();
                if (line.contains("\"kind\":\"connection_closed\"")) {
                    break;
                }
                check(line.contains("\"kind\":\"checkouts\"") && line.contains("\"local_address\":\"127.0.0.1:40003\""), line);
                int waits = line.substring(line.indexOf("\"waits_ns\":[")).split("]")[0].split(",").length;
                int uses = line.substring(line.indexOf("\"uses_ns\":[")).split("]")[0].split(",").length;
                eq(uses, waits, "a use per wait");
                check(waits <= PoolReporter.MAX_FOLDED, "at most 64 in a line: " + waits);
                folded += waits;
                lines++;
            }
            eq(folded, 150, "every checkout folded, once, before the close");
            check(lines >= 3, "lines of at most 64: " + lines);
            String after = agent.next();
            check(after.contains("\"kind\":\"checkouts\"") && after.contains("\"waits_ns\":[")
                    && after.substring(after.indexOf("\"waits_ns\":[")).split("]")[0].split(",").length == 1,
                    "the new connection's checkout in a line of its own, after the close: " + after);
            eq(r.stats().dropped(), 0L, "nothing dropped");
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

    /** A test of a pool's batches: {@code body} calls pendingLines itself. */
    private interface OwnBatches {
        void run(PoolReporter pool) throws Exception;
    }

    /** Runs {@code body} with a pool whose writer, its window a minute,
     * sleeps through the test after the registration. */
    private static void withOwnBatches(OwnBatches body) throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            Reporter r = new Reporter(agent.path, 60_000_000_000L);
            PoolReporter pool = new PoolReporter(r, "p", null);
            pool.register(null);
            check(agent.next().contains("\"kind\":\"pool\""), "registered");
            body.run(pool);
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void aYoungCheckoutStaysHeldThroughABatchUnlessSomeoneWaits() throws Exception {
        withOwnBatches(pool -> {
            long window = 10_000_000L;
            List<byte[]> lines = new ArrayList<>();
            pool.acquireOk(pool.acquireStart(), "127.0.0.1:40010");
            pool.pendingLines(lines, window);
            eq(lines.size(), 0, "handed out less than a window ago: held for the next batch");
            pool.release("127.0.0.1:40010");
            pool.pendingLines(lines, window);
            eq(lines.size(), 1, "then folded");
            check(text(lines.get(0)).contains("\"kind\":\"checkouts\""), text(lines.get(0)));
            lines.clear();
            pool.acquireOk(pool.acquireStart(), "127.0.0.1:40011");
            Thread.sleep(20);
            pool.pendingLines(lines, window);
            eq(lines.size(), 1, "older than a window: sent");
            check(text(lines.get(0)).contains("\"kind\":\"acquire_end\"")
                    && text(lines.get(0)).contains("127.0.0.1:40011"), text(lines.get(0)));
            lines.clear();
            // A waiter: every held end goes first, however young.
            pool.acquireOk(pool.acquireStart(), "127.0.0.1:40012");
            PoolReporter.Acquire waiter = pool.acquireStart();
            pool.pendingLines(lines, window);
            eq(lines.size(), 2, "the held end and the waiter's start");
            check(text(lines.get(0)).contains("\"kind\":\"acquire_end\"")
                    && text(lines.get(0)).contains("127.0.0.1:40012"), text(lines.get(0)));
            check(text(lines.get(1)).contains("\"kind\":\"acquire_start\"")
                    && text(lines.get(1)).contains("\"request\":" + waiter.request()), text(lines.get(1)));
        });
    }

    static void idleConnectionsPastTheBoundAreForgotten() throws Exception {
        withOwnBatches(pool -> {
            // A window longer than the test: a checkout out stays held.
            long window = 60_000_000_000L;
            // A pool that reports no closes while its connections' ports change.
            int n = PoolReporter.MAX_IDLE_CONNS + 100;
            for (int i = 0; i < n; i++) {
                String local = "127.0.0.1:" + (20000 + i);
                pool.acquireOk(pool.acquireStart(), local);
                pool.release(local);
            }
            List<byte[]> lines = new ArrayList<>();
            pool.pendingLines(lines, window);
            eq(lines.size(), n, "every connection's folded checkout sent");
            eq(pool.remembered(), n, "kept until their lines left");
            pool.acquireOk(pool.acquireStart(), "127.0.0.1:40100");
            pool.pendingLines(lines, window);
            eq(pool.remembered(), 1, "the idle ones forgotten, the one out kept");
            eq(pool.checkedOut(), 1, "one out");
            // A forgotten connection comes back: a new entry, reported as usual.
            pool.acquireOk(pool.acquireStart(), "127.0.0.1:20005");
            pool.release("127.0.0.1:20005");
            lines.clear();
            pool.pendingLines(lines, window);
            check(lines.size() == 1 && text(lines.get(0)).contains("\"kind\":\"checkouts\"")
                    && text(lines.get(0)).contains("127.0.0.1:20005"), lines.size() + " lines");
        });
    }

    static void waitersOfEveryThreadAreSeen() throws Exception {
        withOwnBatches(pool -> {
            long window = 60_000_000_000L;
            List<byte[]> lines = new ArrayList<>();
            // Two threads waiting at once, and a second acquire of one
            // thread while its first waits (its thread's slot is taken).
            PoolReporter.Acquire[] theirs = new PoolReporter.Acquire[1];
            int[] theirTid = new int[1];
            java.util.concurrent.CountDownLatch started = new java.util.concurrent.CountDownLatch(1);
            java.util.concurrent.CountDownLatch done = new java.util.concurrent.CountDownLatch(1);
            Thread other = new Thread(() -> {
                theirs[0] = pool.acquireStart();
                theirTid[0] = Threads.currentTid();
                started.countDown();
                try {
                    done.await();
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
            });
            other.start();
            started.await();
            PoolReporter.Acquire first = pool.acquireStart();
            PoolReporter.Acquire second = pool.acquireStart();
            pool.pendingLines(lines, window);
            eq(lines.size(), 3, "three starts");
            String all = lines.stream().map(AdapterTests::text).reduce("", String::concat);
            for (PoolReporter.Acquire a : List.of(theirs[0], first, second)) {
                check(all.contains("\"request\":" + a.request() + ","), a.request() + " in " + all);
            }
            check(all.contains("\"tid\":" + theirTid[0] + "}"), "the other thread's tid: " + all);
            // Their ends carry no wait (the starts were sent); then nothing waits.
            pool.acquireError(second);
            pool.acquireError(first);
            done.countDown();
            other.join();
            lines.clear();
            pool.acquireStart();
            pool.pendingLines(lines, window);
            eq(lines.size(), 1, "a new wait of this thread, in its slot again");
            lines.clear();
            pool.pendingLines(lines, window);
            eq(lines.size(), 0, "its start is sent once");
            eq(pool.threadSlots(), 1, "the dead thread's slot dropped (nobody waits on a dead thread)");
        });
    }

    static void aReporterWithNothingToSayOpensNoStream() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            Reporter r = new Reporter(agent.path, 0);
            // The agent closes streams that stay silent: none is opened
            // before there is something to say.
            Thread.sleep(700);
            eq(r.stats().connects(), 0L, "no pool, no message: no stream");
            PoolReporter pool = new PoolReporter(r, "orders", null);
            pool.register(null);
            check(agent.next().contains("\"kind\":\"pool\""), "registered");
            eq(r.stats().connects(), 1L, "the registration connects");
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

    private static String text(byte[] line) {
        return new String(line, StandardCharsets.UTF_8);
    }

    static void noAgentDropsAndComebackResendsState() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        Path sock = dir.resolve("stream.sock");
        Reporter r = new Reporter(sock);
        PoolReporter pool = new PoolReporter(r, "p", new PoolInfo("mysql", null, -1, null, 2, 1, -1, "HikariCP"))
                .withStateIntervalNanos(0);
        // No agent: the application goes on, messages are dropped.
        pool.register(null);
        PoolReporter.Acquire req = pool.acquireStart();
        pool.acquireOk(req, "127.0.0.1:40001");
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
        // The registration and the checkout's acquire_end (its start folded
        // into it), once it is older than a batch window.
        while (r.stats().dropped() < 2 && System.nanoTime() < deadline) {
            Thread.sleep(10);
        }
        Thread.sleep(300);
        eq(r.stats().dropped(), 2L, "dropped without an agent");
        eq(pool.checkedOut(), 1, "the checkout is remembered");
        try (FakeAgent agent = new FakeAgent(sock)) {
            // The writer retries with backoff and, once connected, sends the state.
            String reg = agent.next();
            check(reg.contains("\"kind\":\"pool\",\"pool\":\"p\""), reg);
            String state = agent.next();
            check(state.contains("\"kind\":\"checkout_state\"")
                    && state.contains("\"checkouts\":[{\"local_address\":\"127.0.0.1:40001\",\"mono_ns\":"), state);
            // A comeback once the connection lasted.
            waitFor(() -> r.stats().comebacks() == 1L, "one comeback");
            // The agent restarts: a write fails, the next connect is a comeback.
        }
        deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
        while (r.stats().connected() && System.nanoTime() < deadline) {
            pool.acquireStart();
            Thread.sleep(20);
        }
        check(!r.stats().connected(), "noticed the agent left");
        try (FakeAgent agent = new FakeAgent(sock)) {
            String line;
            do {
                line = agent.next();
            } while (!line.contains("\"kind\":\"checkout_state\""));
            check(line.contains("127.0.0.1:40001"), line);
            waitFor(() -> r.stats().comebacks() == 2L, "second comeback");
            pool.release("127.0.0.1:40001");
            eq(pool.checkedOut(), 0, "released");
        } finally {
            Files.deleteIfExists(sock);
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void aFoldedLineDroppedWithoutAnAgentTakesNoMoreCheckouts() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        Path sock = dir.resolve("stream.sock");
        Reporter r = new Reporter(sock);
        PoolReporter pool = new PoolReporter(r, "p", null).withStateIntervalNanos(0);
        // No agent: a short checkout's line is queued, then dropped.
        pool.acquireOk(pool.acquireStart(), "127.0.0.1:40004");
        pool.release("127.0.0.1:40004");
        waitFor(() -> r.stats().dropped() >= 1L && r.stats().queued() == 0, "dropped without an agent");
        try (FakeAgent agent = new FakeAgent(sock)) {
            waitFor(() -> r.stats().connected(), "connected");
            // A checkout after the agent came: its own line, not the dropped one.
            pool.acquireOk(pool.acquireStart(), "127.0.0.1:40004");
            pool.release("127.0.0.1:40004");
            String line;
            do {
                line = agent.next();
            } while (!line.contains("\"kind\":\"checkouts\""));
            check(line.contains("\"local_address\":\"127.0.0.1:40004\"")
                    && line.substring(line.indexOf("\"waits_ns\":[")).split("]")[0].split(",").length == 1, line);
        } finally {
            Files.deleteIfExists(sock);
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void stateComesBeforeTheBacklogAfterAComeback() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            Reporter r = new Reporter(agent.path);
            PoolReporter pool = new PoolReporter(r, "ordered", new PoolInfo("postgresql", null, -1, null, 4, 1, -1, "HikariCP"))
                    .withStateIntervalNanos(0);
            pool.register(null);
            pool.acquireOk(pool.acquireStart(), "127.0.0.1:40100");
            // The registration and the acquire (its start folded into its
            // end, unless this thread was slower than the batch window).
            String first;
            do {
                first = agent.next();
                check(first.contains("\"pool\":\"ordered\""), "first stream");
            } while (!first.contains("\"kind\":\"acquire_end\""));
            // The agent drops the stream: the writer notices without a write.
            agent.dropStreams();
            waitFor(() -> !r.stats().connected(), "noticed the stream closed");
            // Queued while the writer waits to reconnect.
            for (int i = 0; i < 5; i++) {
                pool.connectionCreated("127.0.0.1:" + (41000 + i));
            }
            String reg = agent.next();
            check(reg.contains("\"kind\":\"pool\",\"pool\":\"ordered\""), "registration first: " + reg);
            String state = agent.next();
            check(state.contains("\"kind\":\"checkout_state\"") && state.contains("127.0.0.1:40100"),
                    "then the checkouts: " + state);
            for (int i = 0; i < 5; i++) {
                String line = agent.next();
                check(line.contains("\"kind\":\"connection_created\"")
                        && line.contains("127.0.0.1:" + (41000 + i)), "then the backlog, in order: " + line);
            }
            waitFor(() -> r.stats().comebacks() == 1L, "a comeback");
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void aStreamClosedAtAcceptIsRetriedWithBackoff() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        Path sock = dir.resolve("stream.sock");
        // An agent at its stream limit: the kernel completes connect(), the
        // agent closes the stream at once.
        int[] accepts = new int[1];
        try (ServerSocketChannel server = ServerSocketChannel.open(StandardProtocolFamily.UNIX)) {
            server.bind(UnixDomainSocketAddress.of(sock));
            Thread t = new Thread(() -> {
                try {
                    while (true) {
                        server.accept().close();
                        synchronized (accepts) {
                            accepts[0]++;
                        }
                    }
                } catch (Exception e) {
                    // Closed.
                }
            }, "refusing-agent");
            t.setDaemon(true);
            t.start();
            Reporter r = new Reporter(sock);
            PoolReporter pool = new PoolReporter(r, "refused", null).withStateIntervalNanos(0);
            pool.register(null);
            pool.acquireOk(pool.acquireStart(), "127.0.0.1:40200");
            long started = System.nanoTime();
            long slowest = 0;
            while (System.nanoTime() - started < TimeUnit.MILLISECONDS.toNanos(2000)) {
                long before = System.nanoTime();
                pool.acquireStart();
                slowest = Math.max(slowest, System.nanoTime() - before);
                Thread.sleep(1);
            }
            long connects = r.stats().connects();
            int accepted;
            synchronized (accepts) {
                accepted = accepts[0];
            }
            check(connects >= 2 && connects <= 6, "a handful of connects in 2 s, not a spin: " + r.stats().toJson());
            check(accepted <= 6, "accepted " + accepted);
            check(slowest < TimeUnit.MILLISECONDS.toNanos(100), "send never blocks: slowest " + slowest + " ns");
            eq(r.stats().comebacks(), 0L, "a stream closed at once is no comeback");
            check(r.stats().queued() <= Reporter.MAX_QUEUED, "bounded");
        } finally {
            Files.deleteIfExists(sock);
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void stateLinesFitWithLongNamesAndIpv6() throws Exception {
        // 128 characters, none ASCII: 4 bytes each in UTF-8.
        String name = "\uD83D\uDE00".repeat(64) + "\u00e9\u4e2d".repeat(32);
        eq(name.codePointCount(0, name.length()), 128, "a 128-character name");
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            Reporter r = new Reporter(agent.path);
            PoolReporter pool = new PoolReporter(r, name, null).withStateIntervalNanos(0);
            eq(pool.name(), name, "not cut");
            List<String> want = new ArrayList<>();
            for (int i = 0; i < 64; i++) {
                String addr = String.format("[fd12:3456:789a:bcde:f012:3456:789a:%04x%%enp0s31f6abcdef]:%d", i, 60000 + i);
                want.add(addr);
                pool.acquireOk(pool.acquireStart(), addr);
            }
            List<String> lines = pool.stateMessages();
            int got = 0;
            for (String line : lines) {
                int bytes = line.getBytes(StandardCharsets.UTF_8).length;
                check(bytes <= Reporter.MAX_MESSAGE_BYTES, "line of " + bytes + " bytes");
                eq(PoolReporter.utf8Length(line), bytes, "utf8Length");
                if (line.contains("\"kind\":\"checkout_state\"")) {
                    int at = 0;
                    int entries = 0;
                    while ((at = line.indexOf("\"local_address\":\"", at)) >= 0) {
                        at += "\"local_address\":\"".length();
                        String addr = line.substring(at, line.indexOf('"', at));
                        eq(addr, want.get(got), "checkout " + got);
                        got++;
                        entries++;
                    }
                    check(entries >= 1 && entries <= 32, entries + " entries");
                }
            }
            eq(got, 64, "every checkout");
            check(lines.size() > 3, "more than 2 checkout_state lines: the bytes, not 32 entries, split them");
            // Sent: none is dropped, all reach the agent.
            long droppedBefore = r.stats().dropped();
            pool.sendState();
            check(r.flush(5000), "flushed");
            eq(r.stats().dropped(), droppedBefore, "nothing dropped");
            int states = 0;
            String line;
            while ((line = agent.lines.poll(1, TimeUnit.SECONDS)) != null) {
                if (line.contains("\"kind\":\"checkout_state\"")) {
                    states++;
                }
            }
            eq(states, lines.size() - 1, "all checkout_state lines arrived");
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void aHandRolledPoolNamesItsHandlesById() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            // No batch window: the writer takes a start at once.
            Reporter r = new Reporter(agent.path, 0);
            ReportedPool report = ReportedPool.report("handles",
                    new PoolInfo("sqlite", "/tmp/app.db", -1, null, 2, -1, -1, "handle_pool"), r);
            String pm = agent.next();
            check(pm.endsWith(",\"db_system\":\"sqlite\",\"server_address\":\"/tmp/app.db\",\"max\":2,"
                    + "\"library\":\"handle_pool\"}"), pm);
            Object a = new Object();
            Object b = new Object();
            report.connectionCreated(a);
            report.connectionCreated(b);
            String created = agent.next();
            check(created.contains("\"kind\":\"connection_created\"") && created.endsWith(",\"conn\":1}"), created);
            created = agent.next();
            check(created.endsWith(",\"conn\":2}"), created);
            PoolReporter.Acquire waiting = report.acquireStart();
            check(agent.next().contains("\"kind\":\"acquire_start\""), "the start");
            report.acquireOk(waiting, b);
            String end = agent.next();
            check(end.contains("\"kind\":\"acquire_end\"") && end.contains(",\"conn\":2,")
                    && !end.contains("local_address"), end);
            List<String> state = report.reporter().stateMessages();
            eq(state.size(), 2, "the registration and one checkout_state");
            check(state.get(1).contains("\"checkouts\":[{\"conn\":2,\"mono_ns\":"), state.get(1));
            report.release(b);
            String release = agent.next();
            check(release.contains("\"kind\":\"release\"") && release.endsWith(",\"conn\":2}"), release);
            report.connectionClosed(a);
            report.connectionClosed(a);
            String closed = agent.next();
            check(closed.contains("\"kind\":\"connection_closed\"") && closed.endsWith(",\"conn\":1}"), closed);
            // A malformed system is left out rather than refused by the agent.
            ReportedPool.report("other", new PoolInfo("SQL Server", null, -1, null, -1, -1, -1, null), r);
            String other = agent.next();
            check(other.contains("\"pool\":\"other\"") && !other.contains("db_system"), other);
            check(r.flush(2000), "flushed");
            eq(r.stats().dropped(), 0L, "nothing dropped; the second close was not sent");
            check(agent.pollNothing(200), "the second close sent nothing");
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

}
