package io.poolscope.adapter;

import java.nio.file.Files;
import java.nio.file.Path;

/**
 * The calling thread's OS thread id, what {@code /proc/PID/task/TID} names
 * and what the agent reports as a leak's holder. The JVM has no API for it
 * before Java 19's internal ones, so it is read once per thread from the
 * {@code /proc/thread-self} link ({@code PID/task/TID}) and cached.
 */
public final class Threads {
    private static final Path THREAD_SELF = Path.of("/proc/thread-self");
    /** 0: not read yet; -1: not available (not Linux, no /proc). */
    private static final ThreadLocal<int[]> TID = ThreadLocal.withInitial(() -> new int[1]);

    private Threads() {}

    /** The OS id of the calling thread, or -1 when it cannot be known. */
    public static int currentTid() {
        int[] cached = TID.get();
        if (cached[0] == 0) {
            cached[0] = readTid();
        }
        return cached[0];
    }

    private static int readTid() {
        try {
            return parseTid(Files.readSymbolicLink(THREAD_SELF).toString());
        } catch (Exception | LinkageError e) {
            return -1;
        }
    }

    /** {@code "1234/task/1240"} -> 1240; -1 for anything else. */
    static int parseTid(String link) {
        int slash = link.lastIndexOf('/');
        if (slash < 0 || !link.contains("/task/")) {
            return -1;
        }
        try {
            int tid = Integer.parseInt(link.substring(slash + 1));
            return tid > 0 ? tid : -1;
        } catch (NumberFormatException e) {
            return -1;
        }
    }

    /**
     * {@code CLOCK_MONOTONIC} in nanoseconds, the protocol's {@code mono_ns}:
     * on Linux, HotSpot's {@link System#nanoTime()} reads that clock.
     */
    public static long monotonicNanos() {
        return System.nanoTime();
    }
}
