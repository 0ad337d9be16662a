package io.poolscope.adapter.hikari;

import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import io.poolscope.adapter.PoolReporter;
import java.sql.Connection;
import java.sql.SQLException;
import java.sql.SQLTransientConnectionException;

/**
 * A {@link HikariDataSource} whose {@link #getConnection()} reports the
 * wait ({@code acquire_start}/{@code acquire_end}: ok, timeout on
 * {@link SQLTransientConnectionException}, error otherwise) and hands out
 * the connection in a wrapper whose first {@code close()} reports
 * {@code release}. Everything else is HikariCP's own (MXBeans, close,
 * configuration).
 */
public final class InstrumentedHikariDataSource extends HikariDataSource {
    private final PoolReporter pool;

    InstrumentedHikariDataSource(HikariConfig config, PoolReporter pool) {
        super(config);
        this.pool = pool;
    }

    /** This pool's reporter. */
    public PoolReporter poolReporter() {
        return pool;
    }

    @Override
    public Connection getConnection() throws SQLException {
        PoolReporter.Acquire request = pool.acquireStart();
        Connection connection;
        try {
            connection = super.getConnection();
        } catch (SQLTransientConnectionException e) {
            pool.acquireTimeout(request);
            throw e;
        } catch (SQLException | RuntimeException | Error e) {
            pool.acquireError(request);
            throw e;
        }
        String local = localAddressOf(connection);
        pool.acquireOk(request, local);
        return local == null ? connection : new HandedOut(connection, local, pool);
    }

    /** The local address of a connection HikariCP handed out (its proxy of our wrapper). */
    static String localAddressOf(Connection connection) {
        try {
            if (connection != null && connection.isWrapperFor(PoolscopeConnection.class)) {
                return connection.unwrap(PoolscopeConnection.class).poolscopeLocalAddress();
            }
        } catch (SQLException | RuntimeException e) {
            return null;
        }
        return null;
    }

    /** Reports the connection's return to the pool, once, before it happens. */
    private static final class HandedOut extends DelegatingConnection {
        private final String local;
        private final PoolReporter pool;

        HandedOut(Connection delegate, String local, PoolReporter pool) {
            super(delegate);
            this.local = local;
            this.pool = pool;
        }

        @Override
        public void close() throws SQLException {
            if (once()) {
                // Before HikariCP puts it back: once it is back, another
                // thread may take it, and its acquire_end must come after
                // this release.
                pool.release(local);
            }
            delegate.close();
        }


    }
}
