package io.poolscope.adapter;

import java.util.ArrayList;
import java.util.List;

/**
 * Holder stacks (docs/adapter-protocol.md, "Holder stacks"): the code that
 * checked a connection out, captured at a checkout (at most one per
 * capture interval in the process, {@link #due}) and formatted only for
 * one still held {@code stack_after} later.
 *
 * <p>The capture is a {@link Throwable}: the JVM fills in its backtrace
 * natively (methods and bytecode indexes, no text) and makes the
 * {@link StackTraceElement}s only when {@link Throwable#getStackTrace()}
 * asks, which only the writer does, for a long checkout. Measured on
 * JDK 17 it costs about 25-40 ns a frame (0.8 us at 10 frames, 2 us at
 * 50), where a {@link StackWalker} limited to 16 or 40 frames costs 5 to
 * 14 us: it makes a frame object per frame it walks.
 */
final class HolderStacks {
    /** Frames in a {@code holder_stack}, at most (the protocol's bound). */
    static final int MAX_FRAMES = 32;
    /** Characters (code points) in a frame, at most. */
    static final int MAX_FRAME_CHARS = 256;

    /**
     * Classes whose frames come before the application's (innermost): the
     * adapter itself, the pool, the drivers, and the JDK's (reflection,
     * proxies) between them and the caller.
     */
    private static final String[] LIBRARIES = {
        "io.poolscope.adapter.",
        "com.zaxxer.hikari.",
        "org.postgresql.",
        "org.mariadb.",
        "com.mysql.",
        "java.",
        "javax.",
        "jdk.",
        "sun.",
        "com.sun.",
    };

    private static final String ADAPTER = LIBRARIES[0];

    /**
     * When this process last captured a stack (monotonic ns, the
     * checkout's {@code acquire_end} time), for {@link #due}. Starts 2^62 ns
     * (146 years) before the class loads, so that the first checkout is
     * due whatever the interval. Threads racing on it are harmless: two
     * captures close together, or one missed; no lock.
     */
    private static volatile long lastCaptureNanos = Threads.monotonicNanos() - (1L << 62);

    private HolderStacks() {}

    /**
     * Whether a checkout at {@code nowNanos} captures its stack: at least
     * {@code intervalNanos} since the last capture of this process (any
     * pool, any thread), or an interval of 0. When due, it is the last
     * capture from now on. One read and one comparison per checkout, one
     * store per capture: at most one capture per interval (1,000 a second
     * at the default 1 ms) whatever the checkout rate.
     */
    static boolean due(long nowNanos, long intervalNanos) {
        if (intervalNanos > 0 && nowNanos - lastCaptureNanos < intervalNanos) {
            return false;
        }
        lastCaptureNanos = nowNanos;
        return true;
    }

    /** The calling thread's stack, raw. */
    static Throwable capture() {
        try {
            return new Throwable();
        } catch (RuntimeException | OutOfMemoryError e) {
            // Never into the application: no stack for this checkout.
            return null;
        }
    }

    private static boolean library(StackTraceElement frame) {
        String c = frame.getClassName();
        for (String prefix : LIBRARIES) {
            if (c.startsWith(prefix)) {
                return true;
            }
        }
        return false;
    }

    /**
     * Where the frames to send begin: the first of the application (the
     * innermost frame of no library); with none, the first not of the
     * adapter; with none either, the innermost.
     */
    static int firstApplicationFrame(StackTraceElement[] trace) {
        for (int i = 0; i < trace.length; i++) {
            if (!library(trace[i])) {
                return i;
            }
        }
        for (int i = 0; i < trace.length; i++) {
            if (!trace[i].getClassName().startsWith(ADAPTER)) {
                return i;
            }
        }
        return 0;
    }

    /**
     * One frame as Java prints it ({@link StackTraceElement#toString()}:
     * {@code com.example.App.leak(App.java:42)}, a JDK class's with its
     * module, {@code java.base/java.lang.Thread.run(Thread.java:840)}), cut
     * to {@value #MAX_FRAME_CHARS} characters, control characters replaced.
     */
    static String frame(StackTraceElement element) {
        String text = Json.cut(element.toString(), MAX_FRAME_CHARS);
        StringBuilder b = null;
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            if (Character.isISOControl(c)) {
                if (b == null) {
                    b = new StringBuilder(text);
                }
                b.setCharAt(i, '\ufffd');
            }
        }
        return b == null ? text : b.toString();
    }

    /** The frames to send, innermost first: from the application's, at most
     * {@value #MAX_FRAMES}. */
    static List<String> frames(StackTraceElement[] trace) {
        List<String> frames = new ArrayList<>();
        if (trace == null) {
            return frames;
        }
        for (int i = firstApplicationFrame(trace); i < trace.length && frames.size() < MAX_FRAMES; i++) {
            if (trace[i] != null) {
                frames.add(frame(trace[i]));
            }
        }
        return frames;
    }

    /**
     * The frames as a JSON array of at most {@code budget} bytes (UTF-8):
     * outer frames that do not fit are left out. Null when not even the
     * innermost does, or there is none.
     */
    static CharSequence json(StackTraceElement[] trace, int budget) {
        StringBuilder out = new StringBuilder(1024).append('[');
        int bytes = 2;
        int count = 0;
        for (String f : frames(trace)) {
            StringBuilder one = Json.quote(new StringBuilder(f.length() + 2), f);
            int n = PoolReporter.utf8Length(one) + (count > 0 ? 1 : 0);
            if (bytes + n > budget) {
                break;
            }
            if (count > 0) {
                out.append(',');
            }
            out.append(one);
            bytes += n;
            count++;
        }
        return count == 0 ? null : out.append(']');
    }
}
