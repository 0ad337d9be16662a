package io.poolscope.adapter;

import java.util.Iterator;
import java.util.Map;
import java.util.WeakHashMap;
import java.util.concurrent.atomic.AtomicLong;

/**
 * A pool no integration covers (a pool the application keeps itself: SQLite
 * handles, connections whose socket a library hides), reported from its own
 * code. Connections are named by the objects the pool passes (the handle
 * itself, held weakly and compared with {@code equals}, which is identity
 * for JDBC connections), numbered by the reporter: the protocol's
 * {@code conn} id. Thread-safe; no method blocks or throws.
 *
 * <pre>{@code
 * ReportedPool report = ReportedPool.report("handles",
 *         new PoolInfo("sqlite", "/var/lib/app/app.db", -1, null, 4, -1, -1, "handle_pool"));
 * report.connectionCreated(handle);            // the pool opened it
 * PoolReporter.Acquire waiting = report.acquireStart();   // before the pool may wait
 * report.acquireOk(waiting, handle);           // or acquireTimeout / acquireError
 * report.release(handle);                      // back in the pool
 * report.connectionClosed(handle);             // closed or discarded
 * }</pre>
 */
public final class ReportedPool {
    /** Handles remembered, at most: past this the oldest not checked out
     * is forgotten (a pool that never reports closes stays bounded). */
    static final int MAX_REMEMBERED = 4096;

    private final PoolReporter pool;
    private final AtomicLong nextId = new AtomicLong(1);
    /** Handles to their connection names ({@link PoolReporter#connectionId}). */
    private final Map<Object, String> names = new WeakHashMap<>();

    private ReportedPool(PoolReporter pool) {
        this.pool = pool;
    }

    /** Registers the pool {@code name} with the agent the environment names. */
    public static ReportedPool report(String name, PoolInfo info) {
        return report(name, info, Reporter.fromEnv());
    }

    /** As {@link #report(String, PoolInfo)}, through {@code reporter}. */
    public static ReportedPool report(String name, PoolInfo info, Reporter reporter) {
        ReportedPool reported = new ReportedPool(new PoolReporter(reporter, name, info));
        reported.pool.register(null);
        return reported;
    }

    /** The protocol side of the pool: name, registration, counts. */
    public PoolReporter reporter() {
        return pool;
    }

    /** The name of {@code handle}, numbered the first time; null for null. */
    private String nameOf(Object handle) {
        if (handle == null) {
            return null;
        }
        synchronized (names) {
            String name = names.get(handle);
            if (name == null) {
                if (names.size() >= MAX_REMEMBERED) {
                    forgetOne();
                }
                name = PoolReporter.connectionId(nextId.getAndIncrement());
                names.put(handle, name);
            }
            return name;
        }
    }

    /** Forgets one handle: the first not checked out, else any. Called
     * with {@code names} held. */
    private void forgetOne() {
        Iterator<Map.Entry<Object, String>> it = names.entrySet().iterator();
        Map.Entry<Object, String> victim = null;
        while (it.hasNext()) {
            Map.Entry<Object, String> e = it.next();
            if (victim == null) {
                victim = e;
            }
            if (!pool.isOut(e.getValue())) {
                victim = e;
                break;
            }
        }
        if (victim != null) {
            names.remove(victim.getKey());
        }
    }

    /** The pool opened {@code handle}. */
    public void connectionCreated(Object handle) {
        try {
            pool.connectionCreated(nameOf(handle));
        } catch (RuntimeException e) {
            // Never into the application.
        }
    }

    /** A caller asks for a connection: call before the pool may wait. */
    public PoolReporter.Acquire acquireStart() {
        return pool.acquireStart();
    }

    /** The caller got {@code handle}. */
    public void acquireOk(PoolReporter.Acquire acquire, Object handle) {
        try {
            pool.acquireOk(acquire, nameOf(handle));
        } catch (RuntimeException e) {
            // Never into the application.
        }
    }

    /** The pool gave up waiting. */
    public void acquireTimeout(PoolReporter.Acquire acquire) {
        pool.acquireTimeout(acquire);
    }

    /** The pool failed, or the caller stopped waiting. */
    public void acquireError(PoolReporter.Acquire acquire) {
        pool.acquireError(acquire);
    }

    /** The caller gave {@code handle} back to the pool. */
    public void release(Object handle) {
        try {
            pool.release(nameOf(handle));
        } catch (RuntimeException e) {
            // Never into the application.
        }
    }

    /** The pool closed or discarded {@code handle}; it is forgotten. */
    public void connectionClosed(Object handle) {
        try {
            String name;
            synchronized (names) {
                name = handle == null ? null : names.remove(handle);
            }
            if (name != null) {
                pool.connectionClosed(name);
            }
        } catch (RuntimeException e) {
            // Never into the application.
        }
    }
}
