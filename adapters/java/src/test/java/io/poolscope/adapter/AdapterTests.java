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
        aLongCheckoutSendsItsHolderStackOnceAfterItsEnd();
        shortCheckoutsAndStacksOffSendNoStack();
        stackSettingsAreReadFromTheEnvironment();
        stackFramesStartAtTheApplicationAndKeepTheLimits();
        stacksAreCapturedAtMostOncePerIntervalInTheProcess();
        aSentStackFollowsEveryStateWhileHeld();
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

    /** A number field of a JSON line (-1: none). */
    private static long number(String line, String key) {
        java.util.regex.Matcher m = java.util.regex.Pattern.compile("\"" + key + "\":(\\d+)").matcher(line);
        return m.find() ? Long.parseLong(m.group(1)) : -1;
    }

    /** The frames of a holder_stack line. */
    private static List<String> stackOf(String line) {
        int from = line.indexOf("\"stack\":[\"");
        check(from >= 0, "a stack in " + line);
        String list = line.substring(from + "\"stack\":[\"".length(), line.indexOf("\"]", from));
        return Arrays.asList(list.split("\",\""));
    }

    /** The next line of {@code kind} (skipping others, which are kept in SENT). */
    private static String nextOf(FakeAgent agent, String kind) throws InterruptedException {
        for (;;) {
            String line = agent.next();
            if (line.contains("\"kind\":\"" + kind + "\"")) {
                return line;
            }
        }
    }

    /** Lines that come within {@code ms}, all kept in SENT. */
    private static List<String> linesWithin(FakeAgent agent, long ms) throws InterruptedException {
        List<String> got = new ArrayList<>();
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(ms);
        for (;;) {
            long left = deadline - System.nanoTime();
            String line = left > 0 ? agent.lines.poll(left, TimeUnit.NANOSECONDS) : null;
            if (line == null) {
                return got;
            }
            SENT.add(line);
            got.add(line);
        }
    }

    static void aLongCheckoutSendsItsHolderStackOnceAfterItsEnd() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            long after = TimeUnit.MILLISECONDS.toNanos(300);
            Reporter r = new Reporter(agent.path, Reporter.BATCH_NANOS);
            PoolReporter pool = new PoolReporter(r, "stacks", null).withStacks(true).withStackAfterNanos(after)
                    .withStackIntervalNanos(0);
            pool.register(null);
            nextOf(agent, "pool");
            io.poolscope.stacktest.Leaker.leakFromTheTest(pool, "127.0.0.1:40300");
            String end = nextOf(agent, "acquire_end");
            long since = number(end, "mono_ns");
            String stack = nextOf(agent, "holder_stack");
            check(stack.contains("\"local_address\":\"127.0.0.1:40300\""), stack);
            eq(number(stack, "since_ns"), since, "since_ns is the acquire_end's mono_ns");
            long late = number(stack, "mono_ns") - since;
            check(late >= after && late < after + TimeUnit.MILLISECONDS.toNanos(700),
                    "sent stack_after after the checkout, within about 0.5 s more: " + late + " ns");
            List<String> frames = stackOf(stack);
            check(frames.get(0).startsWith("io.poolscope.stacktest.Leaker.leakFromTheTest(Leaker.java:"),
                    "the application's frame first: " + frames);
            check(frames.get(1).startsWith(
                    "io.poolscope.adapter.AdapterTests.aLongCheckoutSendsItsHolderStackOnceAfterItsEnd(AdapterTests.java:"),
                    "then its caller: " + frames);
            // A pool the application keeps: the ReportedPool's frames are the adapter's too.
            ReportedPool handles = ReportedPool.report("stack-handles", null, r);
            handles.reporter().withStacks(true).withStackAfterNanos(after).withStackIntervalNanos(0);
            Object handle = new Object();
            io.poolscope.stacktest.Leaker.leakAHandle(handles, handle);
            String handleEnd = nextOf(agent, "acquire_end");
            String handleStack = nextOf(agent, "holder_stack");
            check(handleStack.contains("\"pool\":\"stack-handles\",") && handleStack.contains("\"conn\":1,"),
                    handleStack);
            eq(number(handleStack, "since_ns"), number(handleEnd, "mono_ns"), "the handle's since_ns");
            check(stackOf(handleStack).get(0).startsWith("io.poolscope.stacktest.Leaker.leakAHandle(Leaker.java:"),
                    handleStack);
            // Once per checkout: nothing more while they stay out.
            for (String line : linesWithin(agent, 1200)) {
                check(!line.contains("\"kind\":\"holder_stack\""), "a second stack: " + line);
            }
            // The next checkout of the connection has a stack of its own.
            pool.release("127.0.0.1:40300");
            io.poolscope.stacktest.Leaker.leakFromTheTest(pool, "127.0.0.1:40300");
            String again = nextOf(agent, "holder_stack");
            check(number(again, "since_ns") > since, "the new checkout's: " + again);
            pool.release("127.0.0.1:40300");
            handles.release(handle);
            check(r.flush(2000), "flushed");
            eq(r.stats().dropped(), 0L, "nothing dropped");
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void shortCheckoutsAndStacksOffSendNoStack() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            long after = TimeUnit.MILLISECONDS.toNanos(200);
            Reporter r = new Reporter(agent.path, Reporter.BATCH_NANOS);
            // Interval 0: every checkout captures; only their shortness sends no stack.
            PoolReporter on = new PoolReporter(r, "short", null).withStacks(true).withStackAfterNanos(after)
                    .withStackIntervalNanos(0);
            PoolReporter off = new PoolReporter(r, "off", null).withStacks(false).withStackAfterNanos(0);
            on.register(null);
            // Short checkouts, some past a batch (their acquire_end leaves).
            for (int i = 0; i < 5; i++) {
                io.poolscope.stacktest.Leaker.leakFromTheTest(on, "127.0.0.1:40400");
                Thread.sleep(i * 30L);
                on.release("127.0.0.1:40400");
            }
            // Off: a long checkout, no stack.
            io.poolscope.stacktest.Leaker.leakFromTheTest(off, "127.0.0.1:40401");
            int ends = 0;
            for (String line : linesWithin(agent, 1000)) {
                check(!line.contains("\"kind\":\"holder_stack\""), "no stack: " + line);
                if (line.contains("\"kind\":\"acquire_end\"") && line.contains("127.0.0.1:40401")) {
                    ends++;
                }
            }
            eq(ends, 1, "the long checkout with stacks off was reported");
            off.release("127.0.0.1:40401");
            eq(on.stackDueNanos(), Long.MAX_VALUE, "no stack waits");
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void stackSettingsAreReadFromTheEnvironment() {
        for (String v : new String[] {"off", "OFF", "0", "false", " False "}) {
            check(!PoolReporter.stacksOn(v), v + " turns stacks off");
        }
        for (String v : new String[] {null, "", "on", "1", "true", "yes"}) {
            check(PoolReporter.stacksOn(v), v + " leaves them on");
        }
        eq(PoolReporter.stackAfterNanos(null), PoolReporter.DEFAULT_STACK_AFTER_NANOS, "default 1 s");
        eq(PoolReporter.stackAfterNanos("250"), 250_000_000L, "in ms");
        eq(PoolReporter.stackAfterNanos("0"), 0L, "0: as soon as the end left");
        eq(PoolReporter.stackAfterNanos("-5"), PoolReporter.DEFAULT_STACK_AFTER_NANOS, "negative");
        eq(PoolReporter.stackAfterNanos("1.5"), PoolReporter.DEFAULT_STACK_AFTER_NANOS, "not whole");
        eq(PoolReporter.stackAfterNanos("99999999999999999"), PoolReporter.DEFAULT_STACK_AFTER_NANOS, "too large");
        long interval = PoolReporter.DEFAULT_STACK_INTERVAL_NANOS;
        eq(interval, 1_000_000L, "default interval 1 ms");
        eq(PoolReporter.stackIntervalNanos(null), interval, "interval unset");
        eq(PoolReporter.stackIntervalNanos(" "), interval, "interval blank");
        eq(PoolReporter.stackIntervalNanos("250"), 250_000L, "interval in us");
        eq(PoolReporter.stackIntervalNanos(" 20 "), 20_000L, "interval, blanks around");
        eq(PoolReporter.stackIntervalNanos("0"), 0L, "interval 0: every checkout");
        eq(PoolReporter.stackIntervalNanos("-1"), interval, "negative interval");
        eq(PoolReporter.stackIntervalNanos("1.5"), interval, "interval not whole");
        eq(PoolReporter.stackIntervalNanos("1ms"), interval, "interval not a number");
        eq(PoolReporter.stackIntervalNanos("99999999999999999"), interval, "interval too large");
        run++;
    }

    /** The local addresses of the holder_stack lines among {@code lines}. */
    private static List<String> stackAddresses(List<String> lines) {
        List<String> got = new ArrayList<>();
        java.util.regex.Pattern p = java.util.regex.Pattern.compile("\"local_address\":\"([^\"]+)\"");
        for (String line : lines) {
            if (line.contains("\"kind\":\"holder_stack\"")) {
                java.util.regex.Matcher m = p.matcher(line);
                check(m.find(), line);
                got.add(m.group(1));
            }
        }
        return got;
    }

    /**
     * The capture interval: a checkout captures only if the interval has
     * passed since the process's last capture (any pool); 0 captures every
     * one. Held checkouts with stack_after 0, so that every captured stack
     * is sent.
     */
    static void stacksAreCapturedAtMostOncePerIntervalInTheProcess() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            long interval = TimeUnit.MILLISECONDS.toNanos(200);
            Reporter r = new Reporter(agent.path, Reporter.BATCH_NANOS);
            PoolReporter pool = new PoolReporter(r, "interval", null).withStacks(true).withStackAfterNanos(0)
                    .withStackIntervalNanos(interval);
            PoolReporter other = new PoolReporter(r, "interval-other", null).withStacks(true)
                    .withStackAfterNanos(0).withStackIntervalNanos(interval);
            pool.register(null);
            other.register(null);
            List<String> held = new ArrayList<>();
            // Past the interval since the earlier tests' captures.
            Thread.sleep(TimeUnit.NANOSECONDS.toMillis(interval) + 50);
            // 100 checkouts in a tight loop, then one of another pool.
            long t0 = System.nanoTime();
            for (int i = 0; i < 100; i++) {
                held.add("127.0.0.1:" + (40600 + i));
                io.poolscope.stacktest.Leaker.leakFromTheTest(pool, held.get(held.size() - 1));
            }
            io.poolscope.stacktest.Leaker.leakFromTheTest(other, "127.0.0.1:40700");
            long tight = System.nanoTime() - t0;
            // Past the interval: the next checkout (of either pool) captures.
            Thread.sleep(TimeUnit.NANOSECONDS.toMillis(interval) + 50);
            io.poolscope.stacktest.Leaker.leakFromTheTest(other, "127.0.0.1:40701");
            // Interval 0: every checkout captures, and counts for the process.
            pool.withStackIntervalNanos(0);
            long t1 = System.nanoTime();
            for (int i = 0; i < 20; i++) {
                io.poolscope.stacktest.Leaker.leakFromTheTest(pool, "127.0.0.1:" + (40710 + i));
            }
            io.poolscope.stacktest.Leaker.leakFromTheTest(other, "127.0.0.1:40730");
            long zero = System.nanoTime() - t1;
            List<String> stacks = stackAddresses(linesWithin(agent, 1500));
            List<String> tightStacks = new ArrayList<>();
            for (String a : stacks) {
                int port = Integer.parseInt(a.substring(a.lastIndexOf(':') + 1));
                if (port <= 40700) {
                    tightStacks.add(a);
                }
            }
            if (tight < interval) {
                eq(tightStacks, List.of("127.0.0.1:40600"), "of 100 checkouts within the interval, the first");
            } else {
                // A very slow machine: still at most one per interval.
                check(!tightStacks.isEmpty() && tightStacks.size() <= tight / interval + 1,
                        tightStacks.size() + " stacks in " + tight + " ns");
            }
            check(stacks.contains("127.0.0.1:40701"), "the checkout past the interval: " + stacks);
            for (int i = 0; i < 20; i++) {
                check(stacks.contains("127.0.0.1:" + (40710 + i)), "interval 0, checkout " + i + ": " + stacks);
            }
            if (zero < interval) {
                check(!stacks.contains("127.0.0.1:40730"), "another pool's checkout right after: " + stacks);
            }
            eq(stacks.size(), new java.util.HashSet<>(stacks).size(), "one stack per checkout: " + stacks);
            for (int i = 0; i < 20; i++) {
                held.add("127.0.0.1:" + (40710 + i));
            }
            for (String a : held) {
                pool.release(a);
            }
            for (String a : List.of("127.0.0.1:40700", "127.0.0.1:40701", "127.0.0.1:40730")) {
                other.release(a);
            }
            check(r.flush(2000), "flushed");
            eq(r.stats().dropped(), 0L, "nothing dropped");
        } finally {
            Files.deleteIfExists(dir);
        }
        run++;
    }

    static void stackFramesStartAtTheApplicationAndKeepTheLimits() throws Exception {
        List<StackTraceElement> trace = new ArrayList<>(List.of(
                new StackTraceElement("io.poolscope.adapter.PoolReporter", "acquireEnd", "PoolReporter.java", 10),
                new StackTraceElement("io.poolscope.adapter.hikari.InstrumentedHikariDataSource", "getConnection",
                        "InstrumentedHikariDataSource.java", 20),
                new StackTraceElement("jdk.internal.reflect.GeneratedMethodAccessor1", "invoke", null, -1),
                new StackTraceElement("java.lang.reflect.Method", "invoke", "Method.java", 568),
                new StackTraceElement("com.zaxxer.hikari.HikariDataSource", "getConnection", "HikariDataSource.java", 1),
                new StackTraceElement("com.example.Reports", "leaky", "Reports.java", 42),
                // An application frame's name with a control character.
                new StackTraceElement("com.example.Odd", "bad\nname\u0085", "Odd.java", 7),
                new StackTraceElement("com.example.Long", "m".repeat(400), "Long.java", 1)));
        for (int i = 0; i < 40; i++) {
            trace.add(new StackTraceElement("com.example.Deep", "level" + i, "Deep.java", i + 1));
        }
        StackTraceElement[] elements = trace.toArray(new StackTraceElement[0]);
        List<String> frames = HolderStacks.frames(elements);
        eq(frames.size(), HolderStacks.MAX_FRAMES, "at most 32 frames");
        eq(frames.get(0), "com.example.Reports.leaky(Reports.java:42)", "from the application's first frame");
        eq(frames.get(1), "com.example.Odd.bad\ufffdname\ufffd(Odd.java:7)", "control characters replaced");
        eq(frames.get(2).length(), HolderStacks.MAX_FRAME_CHARS, "cut to 256 characters");
        check(frames.get(2).startsWith("com.example.Long.mmm"), frames.get(2));
        eq(frames.get(31), "com.example.Deep.level28(Deep.java:29)", "the outermost kept");
        // No application frame: from the first that is not the adapter's.
        eq(HolderStacks.frames(new StackTraceElement[] {elements[0], elements[4], elements[3]}),
                List.of("com.zaxxer.hikari.HikariDataSource.getConnection(HikariDataSource.java:1)",
                        "java.lang.reflect.Method.invoke(Method.java:568)"), "no application frame");
        eq(HolderStacks.json(new StackTraceElement[0], 4096), null, "no frame, no stack");
        // 32 long frames are more than a message takes: outer ones are left out.
        StackTraceElement[] wide = new StackTraceElement[40];
        for (int i = 0; i < wide.length; i++) {
            wide[i] = new StackTraceElement("com.example.Wide", "w" + i + "x".repeat(300), "Wide.java", 1);
        }
        Throwable t = new Throwable();
        t.setStackTrace(wide);
        Path dir = Files.createTempDirectory("poolscope-java-test");
        try (FakeAgent agent = new FakeAgent(dir.resolve("stream.sock"))) {
            Reporter r = new Reporter(agent.path, 0);
            PoolReporter pool = new PoolReporter(r, "\uD83D\uDE00".repeat(128), null);
            byte[] line = pool.holderStackLine("[fd12:3456:789a:bcde:f012:3456:789a:1%enp0s31f6]:60000", 1, t, 2);
            check(line.length <= Reporter.MAX_MESSAGE_BYTES, "fits a message: " + line.length);
            List<String> sent = stackOf(text(line));
            check(sent.size() >= 10 && sent.size() < 16, sent.size() + " frames fit");
            check(sent.get(0).startsWith("com.example.Wide.w0xxx"), sent.get(0));
            r.sendLine(line);
            SENT.add(agent.next());
            // A real capture, 40 calls deep: 32 frames, the application's first.
            pool.withStacks(true).withStackAfterNanos(0).withStackIntervalNanos(0);
            io.poolscope.stacktest.Leaker.leakDeep(pool, "127.0.0.1:40500", 40);
            String stack = nextOf(agent, "holder_stack");
            List<String> deep = stackOf(stack);
            eq(deep.size(), 32, "32 frames of a deep stack");
            check(deep.get(0).startsWith("io.poolscope.stacktest.Leaker.leakFromTheTest(")
                    && deep.get(1).startsWith("io.poolscope.stacktest.Leaker.leakDeep(")
                    && deep.get(31).startsWith("io.poolscope.stacktest.Leaker.leakDeep("), deep.toString());
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

    /**
     * An agent that restarts knows no stack: every checkout_state (sent
     * directly, or at a comeback) is followed by the holder_stack of each
     * held checkout whose stack was sent, with the same since_ns and
     * frames; not once the checkout ends, nor for one whose stack is not due.
     */
    static void aSentStackFollowsEveryStateWhileHeld() throws Exception {
        Path dir = Files.createTempDirectory("poolscope-java-test");
        Path sock = dir.resolve("stream.sock");
        try {
            Reporter r = new Reporter(sock, Reporter.BATCH_NANOS);
            PoolReporter pool;
            PoolReporter notDue;
            String stack;
            try (FakeAgent agent = new FakeAgent(sock)) {
                pool = new PoolReporter(r, "resend", null).withStacks(true).withStackAfterNanos(0)
                        .withStackIntervalNanos(0).withStateIntervalNanos(0);
                pool.register(null);
                nextOf(agent, "pool");
                io.poolscope.stacktest.Leaker.leakFromTheTest(pool, "127.0.0.1:40600");
                String end = nextOf(agent, "acquire_end");
                stack = nextOf(agent, "holder_stack");
                eq(number(stack, "since_ns"), number(end, "mono_ns"), "since_ns");
                // Held, its stack not due: no stack in its states.
                notDue = new PoolReporter(r, "not-due", null).withStacks(true)
                        .withStackAfterNanos(TimeUnit.HOURS.toNanos(1)).withStackIntervalNanos(0)
                        .withStateIntervalNanos(0);
                io.poolscope.stacktest.Leaker.leakFromTheTest(notDue, "127.0.0.1:40601");
                List<String> lines = notDue.stateMessages();
                eq(lines.size(), 2, "the registration and the checkout_state, no stack: " + lines);
                // The state sent directly: the stack again right after it.
                pool.sendState();
                String state = nextOf(agent, "checkout_state");
                check(state.contains("127.0.0.1:40600"), state);
                String again = agent.next();
                check(again.contains("\"kind\":\"holder_stack\"")
                        && again.contains("\"local_address\":\"127.0.0.1:40600\""), again);
                eq(number(again, "since_ns"), number(stack, "since_ns"), "the same since_ns");
                eq(stackOf(again), stackOf(stack), "the same frames");
                check(number(again, "mono_ns") >= number(state, "mono_ns"), "sent now: " + again);
            }
            // The agent restarts: the comeback's state, then the stack.
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
            while (r.stats().connected() && System.nanoTime() < deadline) {
                pool.acquireStart();
                Thread.sleep(20);
            }
            check(!r.stats().connected(), "noticed the agent left");
            try (FakeAgent agent = new FakeAgent(sock)) {
                String line;
                do {
                    line = agent.next();
                } while (!(line.contains("\"kind\":\"checkout_state\"") && line.contains("\"pool\":\"resend\"")));
                String again = agent.next();
                check(again.contains("\"kind\":\"holder_stack\"") && again.contains("\"pool\":\"resend\""),
                        again);
                eq(number(again, "since_ns"), number(stack, "since_ns"), "the comeback's since_ns");
                eq(stackOf(again), stackOf(stack), "the comeback's frames");
                // Released: later states send no stack for it.
                pool.release("127.0.0.1:40600");
                notDue.release("127.0.0.1:40601");
                for (String l : pool.stateMessages()) {
                    check(!l.contains("\"kind\":\"holder_stack\""), "no stack after the release: " + l);
                }
                // A new checkout of the connection sends its own stack, not the old one.
                io.poolscope.stacktest.Leaker.leakFromTheTest(pool, "127.0.0.1:40600");
                String fresh = nextOf(agent, "holder_stack");
                check(number(fresh, "since_ns") > number(stack, "since_ns"), fresh);
                List<String> states = pool.stateMessages();
                String last = states.get(states.size() - 1);
                check(last.contains("\"kind\":\"holder_stack\""), last);
                eq(number(last, "since_ns"), number(fresh, "since_ns"), "the new checkout's since_ns");
                pool.release("127.0.0.1:40600");
                check(r.flush(2000), "flushed");
            }
        } finally {
            Files.deleteIfExists(sock);
            Files.deleteIfExists(dir);
        }
        run++;
    }
}
