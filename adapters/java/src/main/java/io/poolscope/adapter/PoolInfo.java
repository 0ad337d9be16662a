package io.poolscope.adapter;

/**
 * What a pool is, for its {@code pool} message. Every field is optional
 * (null or negative: left out).
 *
 * @param dbSystem {@code db.system.name} of the semantic conventions:
 *     {@code postgresql}, {@code mysql}, {@code sqlite}... (1 to 32 of
 *     {@code a-z0-9._}; anything else is left out)
 * @param serverAddress the database server's host
 * @param serverPort its port
 * @param namespace the database
 * @param max most connections the pool opens
 * @param minIdle fewest idle connections it keeps
 * @param idleMax most idle connections it keeps
 * @param library the pool library, e.g. {@code HikariCP}
 */
public record PoolInfo(String dbSystem, String serverAddress, int serverPort, String namespace,
        int max, int minIdle, int idleMax, String library) {

    /** The names the agent takes. */
    private static final java.util.regex.Pattern SYSTEM_NAME = java.util.regex.Pattern.compile("[a-z0-9._]{1,32}");

    /** Writes the fields of a {@code pool} message. */
    void write(Json json) {
        if (dbSystem != null && SYSTEM_NAME.matcher(dbSystem).matches()) {
            json.put("db_system", dbSystem);
        }
        json.put("server_address", Json.cut(serverAddress, PoolReporter.MAX_TEXT_CHARS));
        if (serverPort > 0 && serverPort <= 65535) {
            json.put("server_port", serverPort);
        }
        json.put("namespace", Json.cut(namespace, PoolReporter.MAX_TEXT_CHARS));
        if (max >= 0) {
            json.put("max", max);
        }
        if (minIdle >= 0) {
            json.put("min_idle", minIdle);
        }
        if (idleMax >= 0) {
            json.put("idle_max", idleMax);
        }
        json.put("library", Json.cut(library, PoolReporter.MAX_TEXT_CHARS));
    }
}
