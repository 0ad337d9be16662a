package io.poolscope.adapter.hikari;

import io.poolscope.adapter.PoolReporter;
import java.lang.reflect.InvocationHandler;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.sql.Connection;
import java.util.concurrent.atomic.AtomicBoolean;

/**
 * A connection proxy's handler: calls go to the delegate, except what
 * {@link #intercept} answers itself; it reports one thing about the
 * connection (named {@link #local}) at most once ({@link #once}).
 */
abstract class ReportingHandler implements InvocationHandler {
    /** {@link #intercept}'s answer for "call the delegate". */
    static final Object PASS = new Object();

    final Connection delegate;
    final String local;
    final PoolReporter pool;
    private final AtomicBoolean reported = new AtomicBoolean();

    ReportingHandler(Connection delegate, String local, PoolReporter pool) {
        this.delegate = delegate;
        this.local = local;
        this.pool = pool;
    }

    /** True the first time only. */
    final boolean once() {
        return reported.compareAndSet(false, true);
    }

    /** Answers (or reports before) a call; {@link #PASS} to call the delegate. */
    abstract Object intercept(Object proxy, Method method, Object[] args);

    @Override
    public final Object invoke(Object proxy, Method method, Object[] args) throws Throwable {
        if (method.getDeclaringClass() == Object.class) {
            // A proxy is its own object; its text is the delegate's.
            return switch (method.getName()) {
                case "equals" -> proxy == args[0];
                case "hashCode" -> System.identityHashCode(proxy);
                default -> delegate.toString();
            };
        }
        Object answer = intercept(proxy, method, args);
        if (answer != PASS) {
            return answer;
        }
        try {
            return method.invoke(delegate, args);
        } catch (InvocationTargetException e) {
            throw e.getCause();
        }
    }
}
