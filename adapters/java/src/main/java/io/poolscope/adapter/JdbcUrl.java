package io.poolscope.adapter;

import java.util.Locale;

/**
 * What a pool's {@code pool} message says about its server, read from a
 * JDBC URL: {@code jdbc:postgresql://host:port/db?...},
 * {@code jdbc:mariadb://...}, {@code jdbc:mysql://...} (the first host of
 * a failover list; IPv6 in brackets).
 *
 * @param dbSystem {@code postgresql} or {@code mysql} (MariaDB speaks the
 *     MySQL protocol), null for other URLs
 * @param host the server's host, or null
 * @param port its port (the system's default when the URL has none), or -1
 * @param database the database, or null
 */
public record JdbcUrl(String dbSystem, String host, int port, String database) {

    static final JdbcUrl UNKNOWN = new JdbcUrl(null, null, -1, null);

    /** Never throws: an unreadable URL gives what could be read. */
    public static JdbcUrl parse(String url) {
        if (url == null) {
            return UNKNOWN;
        }
        try {
            return parseOrThrow(url.trim());
        } catch (RuntimeException e) {
            return UNKNOWN;
        }
    }

    private static JdbcUrl parseOrThrow(String url) {
        String lower = url.toLowerCase(Locale.ROOT);
        String system;
        int defaultPort;
        if (lower.startsWith("jdbc:postgresql:")) {
            system = "postgresql";
            defaultPort = 5432;
        } else if (lower.startsWith("jdbc:mariadb:") || lower.startsWith("jdbc:mysql:")) {
            system = "mysql";
            defaultPort = 3306;
        } else {
            return UNKNOWN;
        }
        int slashes = url.indexOf("//");
        if (slashes < 0) {
            // jdbc:postgresql:dbname: localhost, default port.
            String rest = url.substring(url.indexOf(':', 5) + 1);
            return new JdbcUrl(system, "localhost", defaultPort, emptyToNull(cutParams(rest)));
        }
        String rest = url.substring(slashes + 2);
        int pathStart = indexOfAny(rest, "/?");
        String hosts = pathStart < 0 ? rest : rest.substring(0, pathStart);
        String database = null;
        if (pathStart >= 0 && rest.charAt(pathStart) == '/') {
            database = emptyToNull(cutParams(rest.substring(pathStart + 1)));
        }
        String first = hosts.split(",", 2)[0];
        // MySQL's address=(host=..)(port=..) form is not read.
        if (first.startsWith("address=") || first.startsWith("(")) {
            return new JdbcUrl(system, null, -1, database);
        }
        int at = first.lastIndexOf('@');
        if (at >= 0) {
            first = first.substring(at + 1);
        }
        String host;
        int port = defaultPort;
        if (first.startsWith("[")) {
            int close = first.indexOf(']');
            host = first.substring(1, close);
            String after = first.substring(close + 1);
            if (after.startsWith(":") && after.length() > 1) {
                port = Integer.parseInt(after.substring(1));
            }
        } else {
            int colon = first.lastIndexOf(':');
            if (colon >= 0) {
                host = first.substring(0, colon);
                port = Integer.parseInt(first.substring(colon + 1));
            } else {
                host = first;
            }
        }
        if (host.isEmpty()) {
            host = "localhost";
        }
        return new JdbcUrl(system, host, port, database);
    }

    private static String cutParams(String s) {
        int end = indexOfAny(s, "?;&");
        return end < 0 ? s : s.substring(0, end);
    }

    private static int indexOfAny(String s, String chars) {
        for (int i = 0; i < s.length(); i++) {
            if (chars.indexOf(s.charAt(i)) >= 0) {
                return i;
            }
        }
        return -1;
    }

    private static String emptyToNull(String s) {
        return s == null || s.isEmpty() ? null : s;
    }
}
