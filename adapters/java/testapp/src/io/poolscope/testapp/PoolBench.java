package io.poolscope.testapp;

import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import io.poolscope.adapter.Reporter;
import io.poolscope.adapter.Threads;
import io.poolscope.adapter.hikari.Poolscope;
import java.io.File;
import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.concurrent.locks.LockSupport;

/**
 * The adapter bench's JVM side ({@code cargo xtask bench --only adapters},
 * xtask/src/bench/adapters.rs): one single-threaded loop over a fixed
 * HikariCP pool, then one JSON line on stdout.
 *
 * <p>{@code MODE=pairs}: {@code N} getConnection()/close() pairs, no query.
 * {@code MODE=query}: getConnection(), {@code SELECT 1}, close(), for
 * {@code SECONDS}. {@code ADAPTER=on} builds the pool with
 * {@code Poolscope.instrument(config, name)}, {@code off} with
 * {@code new HikariDataSource(config)}: the loop is the same code either
 * way. Both measure after a warm-up so
 * that the JIT has compiled the loop ({@code WARMUP} pairs, or
 * {@code WARMUP_SECONDS} of queries). CPU time is the whole process's
 * (all threads: the adapter's writer, GC, JIT), from the threads'
 * {@code schedstat} (ns).
 *
 * <p>Environment: {@code JDBC_URL}, {@code DB_USER}, {@code MODE},
 * {@code ADAPTER}, {@code N}, {@code RATE} (pairs a second at most, 0: no
 * pacing), {@code SECONDS}, {@code WARMUP},
 * {@code WARMUP_SECONDS},
 * {@code AGENT} ({@code present}: wait until the adapter is connected),
 * and the adapter's {@code POOLSCOPE_ADAPTER_STREAM_SOCKET}.
 */
public final class PoolBench {
    private static final int POOL_SIZE = 4;

    private PoolBench() {}

    private static String env(String name, String fallback) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? fallback : v;
    }

    /** A fixed pool of {@link #POOL_SIZE}, instrumented or not. */
    private static HikariDataSource pool(boolean adapter, String name) throws InterruptedException {
        HikariConfig config = new HikariConfig();
        config.setJdbcUrl(env("JDBC_URL", null));
        config.setUsername(env("DB_USER", "postgres"));
        config.setPassword("");
        config.setMaximumPoolSize(POOL_SIZE);
        config.setMinimumIdle(POOL_SIZE);
        config.setRegisterMbeans(false);
        config.setPoolName(name);
        HikariDataSource ds = adapter ? Poolscope.instrument(config, name) : new HikariDataSource(config);
        long deadline = System.nanoTime() + 30_000_000_000L;
        while (ds.getHikariPoolMXBean().getTotalConnections() < POOL_SIZE
                && System.nanoTime() < deadline) {
            Thread.sleep(10);
        }
        return ds;
    }

    /** Slices of the A/B query run, each {@value #SLICE_NANOS} ns. */
    private static final long SLICE_NANOS = 250_000_000L;

    /**
     * {@code MODE=query_ab}: the query loop over two pools in one process,
     * one plain and one instrumented, in alternating 250 ms slices (plain,
     * instrumented, instrumented, plain, ...) for {@code SECONDS} after
     * {@code WARMUP_SECONDS} on each. Two processes differ by more than
     * the 2 % the comparison must resolve (where the JIT put things, which
     * core the server's backends run on); slices of one process share all
     * that, and the order cancels a drift. Prints
     * {@code {"ab":[{plain side},{instrumented side}]}}.
     */
    private static void queryAb(boolean agent, double seconds, double warmupSeconds) throws Exception {
        // Which pool is made (and connects) first alternates between runs
        // (AB_INSTRUMENTED_FIRST): it is not to favour either side.
        HikariDataSource[] sides = new HikariDataSource[2];
        if ("1".equals(env("AB_INSTRUMENTED_FIRST", "0"))) {
            sides[1] = pool(true, "bench-java");
            sides[0] = pool(false, "bench-java-plain");
        } else {
            sides[0] = pool(false, "bench-java-plain");
            sides[1] = pool(true, "bench-java");
        }
        long deadline = System.nanoTime() + 30_000_000_000L;
        while (agent && !Reporter.fromEnv().stats().connected() && System.nanoTime() < deadline) {
            Thread.sleep(10);
        }
        for (HikariDataSource ds : sides) {
            queries(ds, Long.MAX_VALUE, System.nanoTime() + (long) (warmupSeconds * 1e9));
        }
        long[] ops = new long[2];
        long[] cpu = new long[2];
        long[] wall = new long[2];
        // The loop's own thread, apart from the adapter's writer, GC and JIT.
        java.lang.management.ThreadMXBean threads = java.lang.management.ManagementFactory.getThreadMXBean();
        long[] threadCpu = new long[2];
        long[] threadUser = new long[2];
        Reporter.Stats s0 = Reporter.fromEnv().stats();
        long slices = Math.max(4, 4 * Math.round(seconds * 1e9 / SLICE_NANOS / 4));
        for (long k = 0; k < slices; k++) {
            int side = (k % 4 == 1 || k % 4 == 2) ? 1 : 0;
            long c0 = processCpuNs();
            long tc0 = threads.getCurrentThreadCpuTime();
            long tu0 = threads.getCurrentThreadUserTime();
            long t0 = System.nanoTime();
            ops[side] += queries(sides[side], Long.MAX_VALUE, t0 + SLICE_NANOS);
            wall[side] += System.nanoTime() - t0;
            threadCpu[side] += threads.getCurrentThreadCpuTime() - tc0;
            threadUser[side] += threads.getCurrentThreadUserTime() - tu0;
            cpu[side] += processCpuNs() - c0;
        }
        Reporter.Stats s1 = Reporter.fromEnv().stats();
        for (HikariDataSource ds : sides) {
            ds.close();
        }
        StringBuilder out = new StringBuilder("{\"ab\":[");
        for (int side = 0; side < 2; side++) {
            out.append(side == 0 ? "" : ",").append("{\"ops\":").append(ops[side])
                    .append(",\"cpu_ns\":").append(cpu[side])
                    .append(",\"wall_ns\":").append(wall[side])
                    .append(",\"thread_cpu_ns\":").append(threadCpu[side])
                    .append(",\"thread_user_ns\":").append(threadUser[side]);
            if (side == 1) {
                out.append(",\"sent\":").append(s1.sent() - s0.sent())
                        .append(",\"dropped\":").append(s1.dropped() - s0.dropped())
                        .append(",\"connected\":").append(s1.connected())
                        .append(",\"sent_total\":").append(s1.sent());
            }
            out.append('}');
        }
        System.out.println(out.append("]}"));
        System.out.flush();
    }

    public static void main(String[] args) throws Exception {
        if ("query_ab".equals(env("MODE", "pairs"))) {
            queryAb("present".equals(env("AGENT", "absent")), Double.parseDouble(env("SECONDS", "5")),
                    Double.parseDouble(env("WARMUP_SECONDS", "1")));
            return;
        }
        boolean query = "query".equals(env("MODE", "pairs"));
        boolean adapter = "on".equals(env("ADAPTER", "off"));
        boolean agent = "present".equals(env("AGENT", "absent"));
        long n = Long.parseLong(env("N", "1000000"));
        double seconds = Double.parseDouble(env("SECONDS", "5"));
        long warmup = Long.parseLong(env("WARMUP", "200000"));
        long rate = Long.parseLong(env("RATE", "0"));
        double warmupSeconds = Double.parseDouble(env("WARMUP_SECONDS", "1"));

        HikariDataSource ds = pool(adapter, "bench-java");
        long deadline = System.nanoTime() + 30_000_000_000L;
        if (adapter && agent) {
            while (!Reporter.fromEnv().stats().connected() && System.nanoTime() < deadline) {
                Thread.sleep(10);
            }
        }
        if (query) {
            queries(ds, Long.MAX_VALUE, System.nanoTime() + (long) (warmupSeconds * 1e9));
        } else {
            pairs(ds, warmup, rate);
        }
        Reporter.Stats s0 = adapter ? Reporter.fromEnv().stats() : null;
        long cpu0 = processCpuNs();
        long t0 = System.nanoTime();
        long ops = query ? queries(ds, Long.MAX_VALUE, t0 + (long) (seconds * 1e9)) : pairs(ds, n, rate);
        long t1 = System.nanoTime();
        long cpu1 = processCpuNs();
        Reporter.Stats s1 = adapter ? Reporter.fromEnv().stats() : null;
        ds.close();

        StringBuilder out = new StringBuilder("{\"ops\":").append(ops)
                .append(",\"cpu_ns\":").append(cpu1 - cpu0)
                .append(",\"wall_ns\":").append(t1 - t0);
        if (s0 != null && s1 != null) {
            out.append(",\"sent\":").append(s1.sent() - s0.sent())
                    .append(",\"dropped\":").append(s1.dropped() - s0.dropped())
                    .append(",\"connected\":").append(s1.connected())
                    // Everything the agent got from this run, warm-up included.
                    .append(",\"sent_total\":").append(s1.sent());
        }
        System.out.println(out.append('}'));
        System.out.flush();
    }

    /**
     * CPU time of all the process's threads, in ns: the calling thread's
     * from its CPU clock, the others' from the first field of their
     * {@code /proc/self/task/TID/schedstat} (run time in ns, exact for a
     * thread that is not running at the moment, and within a tick for one
     * that is). {@code getProcessCpuTime()} counts in clock ticks (10 ms)
     * here, too coarse for short runs; it is the fallback.
     */
    private static long processCpuNs() {
        String self = Long.toString(Threads.currentTid());
        long total = 0;
        File[] tasks = new File("/proc/self/task").listFiles();
        if (tasks != null && !self.equals("-1")) {
            total = ManagementFactory.getThreadMXBean().getCurrentThreadCpuTime();
            for (File task : tasks) {
                if (task.getName().equals(self)) {
                    continue;
                }
                try {
                    String stat = Files.readString(Path.of(task.getPath(), "schedstat"));
                    total += Long.parseLong(stat.substring(0, stat.indexOf(' ')));
                } catch (IOException | RuntimeException e) {
                    // A thread that ended meanwhile.
                }
            }
        }
        if (total > 0) {
            return total;
        }
        var os = (com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean();
        return os.getProcessCpuTime();
    }

    /**
     * {@code n} borrow/return pairs, at most {@code rate} a second (0: as
     * fast as they go). An unpaced loop makes messages faster than any
     * writer sends them (millions a second), so most would be dropped, and
     * a drop costs less than a send; paced at a rate far above what a
     * service does, every message is sent and the CPU per pair is the cost
     * of sending it. The pacing sleeps every 64 pairs, with the adapter on
     * or off alike.
     */
    private static long pairs(HikariDataSource ds, long n, long rate) throws SQLException {
        long start = System.nanoTime();
        for (long i = 0; i < n; i++) {
            Connection c = ds.getConnection();
            c.close();
            if (rate > 0 && (i & 63) == 63) {
                long due = start + (i + 1) * 1_000_000_000L / rate;
                long ahead = due - System.nanoTime();
                if (ahead > 0) {
                    LockSupport.parkNanos(ahead);
                }
            }
        }
        return n;
    }

    /** Borrow, SELECT 1, return: {@code n} times or until {@code until} (nanoTime). */
    private static long queries(HikariDataSource ds, long n, long until) throws SQLException {
        long done = 0;
        long sum = 0;
        while (done < n) {
            try (Connection c = ds.getConnection(); Statement st = c.createStatement();
                    ResultSet rs = st.executeQuery("SELECT 1")) {
                rs.next();
                sum += rs.getInt(1);
            }
            done++;
            if ((done & 63) == 0 && System.nanoTime() >= until) {
                break;
            }
        }
        if (sum != done) {
            throw new IllegalStateException("SELECT 1 returned something else");
        }
        return done;
    }
}
