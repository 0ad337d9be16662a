package io.poolscope.adapter.hikari;

import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import com.zaxxer.hikari.util.DriverDataSource;
import com.zaxxer.hikari.util.PropertyElf;
import io.poolscope.adapter.JdbcUrl;
import io.poolscope.adapter.PoolInfo;
import io.poolscope.adapter.PoolReporter;
import io.poolscope.adapter.Reporter;
import java.lang.reflect.Method;
import javax.sql.DataSource;

/**
 * HikariCP, reported to poolscope:
 *
 * <pre>{@code
 * HikariConfig config = new HikariConfig();
 * config.setJdbcUrl("jdbc:postgresql://db:5432/shop");
 * HikariDataSource ds = Poolscope.instrument(config, "orders");
 * }</pre>
 *
 * <p>{@link #instrument} puts a wrapper around the DataSource HikariCP opens
 * its connections with (the one the config names, or the one HikariCP would
 * build from {@code jdbcUrl}), which reports {@code connection_created} and
 * {@code connection_closed} for each physical connection, named by its
 * socket's local address; and it returns a {@link HikariDataSource} whose
 * {@code getConnection()} reports {@code acquire_start}/{@code acquire_end}
 * and hands out the connection in a wrapper whose {@code close()}
 * reports {@code release}. The pool is registered with
 * {@code maximumPoolSize} as max, {@code minimumIdle}, and the server and
 * database from the JDBC URL.
 */
public final class Poolscope {
    /** The {@code library} of the pool message. */
    public static final String LIBRARY = "HikariCP";

    private Poolscope() {}

    /**
     * Starts {@code config}'s pool (as {@code new HikariDataSource(config)}
     * does), reporting to the agent the environment names. Throws only
     * what HikariCP itself throws for the configuration.
     */
    public static HikariDataSource instrument(HikariConfig config, String poolName) {
        return instrument(config, poolName, Reporter.fromEnv());
    }

    /** As {@link #instrument(HikariConfig, String)}, reporting through {@code reporter}. */
    public static HikariDataSource instrument(HikariConfig config, String poolName, Reporter reporter) {
        PoolReporter pool = new PoolReporter(reporter, poolName, poolInfo(config));
        DataSource physical = physicalDataSource(config);
        if (physical != null) {
            config.setDataSource(new PhysicalConnections(physical, pool));
        }
        if (config.getPoolName() == null) {
            config.setPoolName(pool.name());
        }
        // Before the pool opens its first connection.
        pool.register(null);
        return new InstrumentedHikariDataSource(config, pool);
    }

    /** The registration, from the config as HikariCP will validate it. */
    static PoolInfo poolInfo(HikariConfig config) {
        int max = config.getMaximumPoolSize();
        int minIdle = config.getMinimumIdle();
        // HikariConfig.validate(): unset sizes follow each other.
        if (max < 1) {
            max = minIdle <= 0 ? 10 : minIdle;
        }
        if (minIdle < 0 || minIdle > max) {
            minIdle = max;
        }
        JdbcUrl url = JdbcUrl.parse(jdbcUrlOf(config));
        return new PoolInfo(url.dbSystem(), url.host(), url.port(), url.database(), max, minIdle,
                -1, LIBRARY);
    }

    private static String jdbcUrlOf(HikariConfig config) {
        if (config.getJdbcUrl() != null) {
            return config.getJdbcUrl();
        }
        Object ds = config.getDataSource();
        if (ds == null) {
            return null;
        }
        // Drivers' DataSources (PGSimpleDataSource, MariaDbDataSource...)
        // mostly have getUrl().
        try {
            Method getUrl = ds.getClass().getMethod("getUrl");
            Object url = getUrl.invoke(ds);
            return url instanceof String s ? s : null;
        } catch (ReflectiveOperationException | RuntimeException e) {
            return null;
        }
    }

    /**
     * The DataSource HikariCP would open connections with (PoolBase's
     * order: dataSource, dataSourceClassName, jdbcUrl), or null when it
     * cannot be made here; then HikariCP makes (or fails to make) its own
     * and only the acquires and releases are reported.
     */
    static DataSource physicalDataSource(HikariConfig config) {
        try {
            if (config.getDataSource() != null) {
                return config.getDataSource();
            }
            if (config.getDataSourceClassName() != null) {
                Class<?> c = Class.forName(config.getDataSourceClassName(), true,
                        contextLoader());
                DataSource ds = (DataSource) c.getDeclaredConstructor().newInstance();
                PropertyElf.setTargetFromProperties(ds, config.getDataSourceProperties());
                // The class name stays set: HikariCP reads it for a MySQL
                // workaround (and logs that it uses the dataSource instead).
                return ds;
            }
            if (config.getJdbcUrl() != null) {
                return new DriverDataSource(config.getJdbcUrl(), config.getDriverClassName(),
                        config.getDataSourceProperties(), config.getUsername(),
                        config.getPassword());
            }
        } catch (ReflectiveOperationException | RuntimeException | LinkageError e) {
            return null;
        }
        return null;
    }

    private static ClassLoader contextLoader() {
        ClassLoader l = Thread.currentThread().getContextClassLoader();
        return l != null ? l : Poolscope.class.getClassLoader();
    }
}
