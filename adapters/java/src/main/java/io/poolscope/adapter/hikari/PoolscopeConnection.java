package io.poolscope.adapter.hikari;

/**
 * Implemented by the wrapper around each physical connection that HikariCP
 * holds, so that the connection it hands out can be named:
 * {@code hikariConnection.unwrap(PoolscopeConnection.class)}.
 */
public interface PoolscopeConnection {
    /** The socket's local {@code "ip:port"}, or null when unknown. */
    String poolscopeLocalAddress();
}
