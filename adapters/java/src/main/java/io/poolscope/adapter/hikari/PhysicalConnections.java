package io.poolscope.adapter.hikari;

import io.poolscope.adapter.PoolReporter;
import io.poolscope.adapter.Sockets;
import java.io.PrintWriter;
import java.lang.reflect.Method;
import java.lang.reflect.Proxy;
import java.sql.Connection;
import java.sql.SQLException;
import java.sql.SQLFeatureNotSupportedException;
import java.util.logging.Logger;
import javax.sql.DataSource;

/**
 * The DataSource HikariCP opens its physical connections with: the real
 * one, and a report of each connection it opens ({@code connection_created})
 * and closes ({@code connection_closed}). Each connection is handed to
 * HikariCP behind a {@link Proxy} that implements
 * {@link PoolscopeConnection}.
 */
final class PhysicalConnections implements DataSource {
    private final DataSource delegate;
    private final PoolReporter pool;

    PhysicalConnections(DataSource delegate, PoolReporter pool) {
        this.delegate = delegate;
        this.pool = pool;
    }

    @Override
    public Connection getConnection() throws SQLException {
        return opened(delegate.getConnection());
    }

    @Override
    public Connection getConnection(String username, String password) throws SQLException {
        return opened(delegate.getConnection(username, password));
    }

    private Connection opened(Connection physical) {
        if (physical == null) {
            return null;
        }
        String local = Sockets.localAddress(physical);
        pool.connectionCreated(local);
        try {
            return (Connection) Proxy.newProxyInstance(PhysicalConnections.class.getClassLoader(),
                    new Class<?>[] {Connection.class, PoolscopeConnection.class},
                    new Physical(physical, local, pool));
        } catch (RuntimeException | LinkageError e) {
            return physical;
        }
    }

    /** Reports the close of one physical connection, once. */
    private static final class Physical extends ReportingHandler {
        Physical(Connection delegate, String local, PoolReporter pool) {
            super(delegate, local, pool);
        }

        @Override
        Object intercept(Object proxy, Method method, Object[] args) {
            String name = method.getName();
            int argc = args == null ? 0 : args.length;
            if (method.getDeclaringClass() == PoolscopeConnection.class) {
                return local;
            }
            if ((name.equals("unwrap") || name.equals("isWrapperFor")) && argc == 1
                    && args[0] instanceof Class<?> iface && iface.isInstance(proxy)) {
                return name.equals("unwrap") ? proxy : Boolean.TRUE;
            }
            if (((name.equals("close") && argc == 0) || (name.equals("abort") && argc == 1))
                    && once()) {
                // Before the socket goes: the agent still knows the connection.
                pool.connectionClosed(local);
            }
            return PASS;
        }
    }

    @Override
    public PrintWriter getLogWriter() throws SQLException {
        return delegate.getLogWriter();
    }

    @Override
    public void setLogWriter(PrintWriter out) throws SQLException {
        delegate.setLogWriter(out);
    }

    @Override
    public void setLoginTimeout(int seconds) throws SQLException {
        delegate.setLoginTimeout(seconds);
    }

    @Override
    public int getLoginTimeout() throws SQLException {
        return delegate.getLoginTimeout();
    }

    @Override
    public Logger getParentLogger() throws SQLFeatureNotSupportedException {
        return delegate.getParentLogger();
    }

    @Override
    public <T> T unwrap(Class<T> iface) throws SQLException {
        if (iface.isInstance(this)) {
            return iface.cast(this);
        }
        return delegate.unwrap(iface);
    }

    @Override
    public boolean isWrapperFor(Class<?> iface) throws SQLException {
        return iface.isInstance(this) || delegate.isWrapperFor(iface);
    }
}
