package io.poolscope.testapp;

import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import com.zaxxer.hikari.HikariPoolMXBean;
import io.poolscope.adapter.Reporter;
import io.poolscope.adapter.Threads;
import io.poolscope.adapter.hikari.Poolscope;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.SQLTransientConnectionException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * The JVM adapter's integration test application (tests/tests/adapter_java.rs):
 * a fixed HikariCP pool, instrumented with {@code Poolscope.instrument},
 * driven by one JSON request per line on stdin, one JSON answer per line on
 * stdout. It writes its own truth: which thread took which connection, the
 * connection's client address as the database server sees it, and
 * HikariCP's own counters.
 *
 * <p>Environment: {@code DB} ({@code postgresql} or {@code mariadb}),
 * {@code JDBC_URL}, {@code DB_USER}, {@code POOL_NAME}, {@code POOL_MAX},
 * {@code CONNECTION_TIMEOUT_MS}, and the adapter's
 * {@code POOLSCOPE_ADAPTER_STREAM_SOCKET}.
 */
public final class PoolApp {
    private final String db;
    private final int max;
    private final HikariDataSource ds;
    private final HikariPoolMXBean mx;
    private final Map<String, Connection> held = new HashMap<>();
    private final Map<String, Thread> busy = new HashMap<>();
    private final Map<String, AtomicBoolean> busyStop = new HashMap<>();
    private final Map<String, AtomicLong> busyQueries = new HashMap<>();
    private final List<Thread> workers = new ArrayList<>();
    private final AtomicBoolean workersPaused = new AtomicBoolean();
    private final AtomicBoolean workersStop = new AtomicBoolean();
    private final AtomicLong workerCycles = new AtomicLong();
    private final AtomicLong workersHolding = new AtomicLong();
    private final AtomicLong workerErrors = new AtomicLong();

    private PoolApp() throws Exception {
        db = env("DB", "postgresql");
        max = Integer.parseInt(env("POOL_MAX", "8"));
        HikariConfig config = new HikariConfig();
        config.setJdbcUrl(env("JDBC_URL", null));
        config.setUsername(env("DB_USER", "postgres"));
        config.setPassword("");
        config.setMaximumPoolSize(max);
        config.setMinimumIdle(max);
        config.setConnectionTimeout(Long.parseLong(env("CONNECTION_TIMEOUT_MS", "1000")));
        config.setRegisterMbeans(false);
        ds = Poolscope.instrument(config, env("POOL_NAME", "java-orders"));
        mx = ds.getHikariPoolMXBean();
        // A fixed pool: wait until HikariCP has opened all of it.
        long deadline = System.nanoTime() + 30_000_000_000L;
        while (mx.getTotalConnections() < max && System.nanoTime() < deadline) {
            Thread.sleep(20);
        }
    }

    private static String env(String name, String fallback) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? fallback : v;
    }

    public static void main(String[] args) throws Exception {
        PoolApp app = new PoolApp();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        System.out.println(app.counts(new StringBuilder("{\"ok\":true,\"pid\":")
                .append(ProcessHandle.current().pid()).append(",\"tid\":").append(Threads.currentTid())
                .append(',')).append('}'));
        System.out.flush();
        String line;
        while ((line = in.readLine()) != null) {
            Map<String, String> req = parse(line);
            String answer;
            try {
                answer = app.handle(req);
            } catch (Exception e) {
                answer = "{\"ok\":false,\"error\":" + quote(e.toString()) + "}";
            }
            System.out.println(answer);
            System.out.flush();
            if ("exit".equals(req.get("op"))) {
                break;
            }
        }
        app.workersStop.set(true);
        for (Thread t : app.workers) {
            t.join(2000);
        }
        app.ds.close();
        Reporter.fromEnv().flush(2000);
    }

    private String handle(Map<String, String> req) throws Exception {
        String op = req.getOrDefault("op", "");
        String id = req.get("id");
        StringBuilder out = new StringBuilder("{\"ok\":true,");
        switch (op) {
            case "workers" -> {
                int n = Integer.parseInt(req.getOrDefault("n", "2"));
                for (int i = 0; i < n; i++) {
                    Thread t = new Thread(this::worker, "worker-" + workers.size());
                    t.setDaemon(true);
                    workers.add(t);
                    t.start();
                }
            }
            case "pause_workers" -> pauseWorkers();
            case "resume_workers" -> workersPaused.set(false);
            case "checkout" -> {
                // kind: leak (quiet), busy (queries every interval_ms), tx (BEGIN, then quiet)
                String kind = req.getOrDefault("kind", "leak");
                Connection c = kind.equals("leak") ? leakTheConnectionOnPurpose() : ds.getConnection();
                held.put(id, c);
                String local = clientAddress(c);
                if (kind.equals("tx")) {
                    c.setAutoCommit(false);
                    try (Statement s = c.createStatement()) {
                        s.execute("SELECT 1");
                    }
                } else if (kind.equals("busy")) {
                    long interval = Long.parseLong(req.getOrDefault("interval_ms", "100"));
                    AtomicBoolean stop = new AtomicBoolean();
                    AtomicLong queries = new AtomicLong();
                    Thread t = new Thread(() -> {
                        while (!stop.get()) {
                            try (Statement s = c.createStatement()) {
                                s.execute("SELECT 1");
                                queries.incrementAndGet();
                                Thread.sleep(interval);
                            } catch (Exception e) {
                                return;
                            }
                        }
                    }, "busy-" + id);
                    t.setDaemon(true);
                    t.start();
                    busy.put(id, t);
                    busyStop.put(id, stop);
                    busyQueries.put(id, queries);
                }
                out.append("\"id\":").append(quote(id)).append(",\"tid\":").append(Threads.currentTid())
                        .append(",\"local_address\":").append(quote(local)).append(',');
            }
            case "release" -> {
                AtomicBoolean stop = busyStop.remove(id);
                if (stop != null) {
                    stop.set(true);
                    busy.remove(id).join(5000);
                    out.append("\"queries\":").append(busyQueries.remove(id).get()).append(',');
                }
                Connection c = held.remove(id);
                if (c == null) {
                    throw new IllegalArgumentException("nothing held as " + id);
                }
                if (!c.getAutoCommit()) {
                    c.rollback();
                }
                c.close();
            }
            case "exhaust_and_wait" -> exhaustAndWait(out);
            case "mxbean" -> {
                // The pool as HikariCP counts it, with the workers paused so
                // that it holds still while the test asks the agent.
                pauseWorkers();
            }
            case "stats", "exit" -> {
                out.append("\"adapter\":").append(Reporter.fromEnv().stats().toJson()).append(',');
            }
            default -> throw new IllegalArgumentException("unknown op " + op);
        }
        return counts(out).append('}').toString();
    }

    /** HikariCP's counters and the workers', appended to an answer. */
    private StringBuilder counts(StringBuilder out) {
        return out.append("\"active\":").append(mx.getActiveConnections())
                .append(",\"idle\":").append(mx.getIdleConnections())
                .append(",\"total\":").append(mx.getTotalConnections())
                .append(",\"waiting\":").append(mx.getThreadsAwaitingConnection())
                .append(",\"max\":").append(max)
                .append(",\"worker_cycles\":").append(workerCycles.get())
                .append(",\"worker_errors\":").append(workerErrors.get());
    }

    /**
     * Takes the connection a {@code leak} checkout keeps: the code a leak
     * report's holder stack must name (its first application frame).
     */
    private Connection leakTheConnectionOnPurpose() throws SQLException {
        return ds.getConnection();
    }

    /** A healthy worker: borrow, query, return, in a loop. */
    private void worker() {
        while (!workersStop.get()) {
            try {
                if (workersPaused.get()) {
                    Thread.sleep(10);
                    continue;
                }
                workersHolding.incrementAndGet();
                try (Connection c = ds.getConnection(); Statement s = c.createStatement()) {
                    s.execute("SELECT 1");
                } finally {
                    workersHolding.decrementAndGet();
                }
                workerCycles.incrementAndGet();
                Thread.sleep(20);
            } catch (InterruptedException e) {
                return;
            } catch (SQLException e) {
                workerErrors.incrementAndGet();
            }
        }
    }

    private void pauseWorkers() throws InterruptedException {
        workersPaused.set(true);
        long deadline = System.nanoTime() + 5_000_000_000L;
        while (workersHolding.get() > 0 && System.nanoTime() < deadline) {
            Thread.sleep(2);
        }
        // HikariCP counts a connection idle once close() has returned it.
        while (mx.getActiveConnections() > held.size() && System.nanoTime() < deadline) {
            Thread.sleep(2);
        }
    }

    /**
     * Takes every idle connection (the workers paused), then a waiter
     * thread asks for one more and waits connectionTimeout for it; the
     * blockers go back after its answer.
     */
    @SuppressWarnings("try")
    private void exhaustAndWait(StringBuilder out) throws Exception {
        pauseWorkers();
        List<Connection> blockers = new ArrayList<>();
        try {
            while (mx.getActiveConnections() < max) {
                blockers.add(ds.getConnection());
            }
            String[] result = new String[1];
            long[] tidAndWait = new long[2];
            int activeWhileWaiting = mx.getActiveConnections();
            Thread waiter = new Thread(() -> {
                tidAndWait[0] = Threads.currentTid();
                long start = System.nanoTime();
                try (Connection c = ds.getConnection()) {
                    result[0] = "ok";
                } catch (SQLTransientConnectionException e) {
                    result[0] = "timeout";
                } catch (SQLException e) {
                    result[0] = "error: " + e;
                }
                tidAndWait[1] = (System.nanoTime() - start) / 1_000_000;
            }, "waiter");
            waiter.start();
            waiter.join();
            out.append("\"result\":").append(quote(result[0])).append(",\"tid\":").append(tidAndWait[0])
                    .append(",\"wait_ms\":").append(tidAndWait[1]).append(",\"blockers\":")
                    .append(blockers.size()).append(",\"active_while_waiting\":")
                    .append(activeWhileWaiting).append(',');
        } finally {
            for (Connection c : blockers) {
                c.close();
            }
        }
    }

    /** The connection's client address as the server sees it: the truth to compare with. */
    private String clientAddress(Connection c) throws SQLException {
        String sql = db.equals("postgresql")
                ? "SELECT host(inet_client_addr()) || ':' || inet_client_port()"
                : "SELECT host FROM information_schema.processlist WHERE id = CONNECTION_ID()";
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            return rs.next() ? rs.getString(1) : null;
        }
    }

    private static final Pattern FIELD = Pattern.compile("\"(\\w+)\"\\s*:\\s*(\"((?:[^\"\\\\]|\\\\.)*)\"|[-\\w.]+)");

    /** A flat JSON object of strings, numbers and booleans (all the requests are). */
    static Map<String, String> parse(String line) {
        Map<String, String> m = new HashMap<>();
        Matcher f = FIELD.matcher(line);
        while (f.find()) {
            m.put(f.group(1), f.group(3) != null ? f.group(3) : f.group(2));
        }
        return m;
    }

    static String quote(String s) {
        if (s == null) {
            return "null";
        }
        StringBuilder b = new StringBuilder("\"");
        for (char ch : s.toCharArray()) {
            if (ch == '"' || ch == '\\') {
                b.append('\\').append(ch);
            } else if (ch < 0x20) {
                b.append(String.format("\\u%04x", (int) ch));
            } else {
                b.append(ch);
            }
        }
        return b.append('"').toString();
    }
}
