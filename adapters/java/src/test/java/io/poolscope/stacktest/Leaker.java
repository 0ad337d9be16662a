package io.poolscope.stacktest;

import io.poolscope.adapter.PoolReporter;
import io.poolscope.adapter.ReportedPool;

/**
 * The application side of the holder stack tests: a package of its own, so
 * that its frames are the application's (the adapter drops the frames of
 * {@code io.poolscope.adapter}, the unit tests' package, above the first
 * frame of the application).
 */
public final class Leaker {
    private Leaker() {}

    /** Checks {@code local} out of {@code pool} and keeps it. */
    public static void leakFromTheTest(PoolReporter pool, String local) {
        pool.acquireOk(pool.acquireStart(), local);
    }

    /** Checks {@code handle} out of {@code pool} and keeps it. */
    public static void leakAHandle(ReportedPool pool, Object handle) {
        pool.acquireOk(pool.acquireStart(), handle);
    }

    /** {@link #leakFromTheTest}, {@code depth} calls deep. */
    public static void leakDeep(PoolReporter pool, String local, int depth) {
        if (depth <= 0) {
            leakFromTheTest(pool, local);
        } else {
            leakDeep(pool, local, depth - 1);
        }
    }
}
