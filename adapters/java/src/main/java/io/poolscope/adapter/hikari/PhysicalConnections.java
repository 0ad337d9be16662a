package io.poolscope.adapter.hikari;

import io.poolscope.adapter.PoolReporter;
import io.poolscope.adapter.Sockets;
import java.io.PrintWriter;
import java.sql.Connection;
import java.sql.SQLException;
import java.sql.SQLFeatureNotSupportedException;
import java.util.concurrent.Executor;
import java.util.logging.Logger;
import javax.sql.DataSource;

/**
 * The DataSource HikariCP opens its physical connections with: the real
 * one, and a report of each connection it opens ({@code connection_created})
 * and closes ({@code connection_closed}). Each connection is handed to
 * HikariCP in a wrapper that implements {@link PoolscopeConnection}.
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
        return new Physical(physical, local, pool);
    }

    /** One physical connection: named, and its close reported once. */
    private static final class Physical extends DelegatingConnection implements PoolscopeConnection {
        private final String local;
        private final PoolReporter pool;

        Physical(Connection delegate, String local, PoolReporter pool) {
            super(delegate);
            this.local = local;
            this.pool = pool;
        }

        @Override
        public String poolscopeLocalAddress() {
            return local;
        }

        /** Before the socket goes: the agent still knows the connection. */
        private void closing() {
            if (once()) {
                pool.connectionClosed(local);
            }
        }

        @Override
        public void close() throws SQLException {
            closing();
            delegate.close();
        }

        @Override
        public void abort(Executor executor) throws SQLException {
            closing();
            delegate.abort(executor);
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
