package io.poolscope.adapter;

import java.lang.reflect.Field;
import java.lang.reflect.Modifier;
import java.net.Inet6Address;
import java.net.InetAddress;
import java.net.Socket;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;

/**
 * Names a JDBC connection by its TCP socket's local address, which is how
 * the agent joins adapter messages to the sockets it sees in the kernel.
 *
 * <p>JDBC has no API for a connection's socket, so it is found by a bounded
 * breadth-first search through the driver's own fields for a
 * {@link java.net.Socket}: pgjdbc keeps it three fields down
 * ({@code PgConnection.queryExecutor -> QueryExecutorBase.pgStream ->
 * PGStream.connection}), MariaDB Connector/J 2.x two
 * ({@code MariaDbConnection.protocol -> AbstractConnectProtocol.socket}),
 * MySQL Connector/J 8 four ({@code session -> protocol -> socketConnection
 * -> mysqlSocket}). The path found for a connection class is remembered,
 * so later connections of that class cost a few field reads. Fields of JDK
 * classes (java.*, javax.*, sun.*, jdk.*) are not entered: the module
 * system closes them, and a driver's socket is never behind one.
 */
public final class Sockets {
    /** Fields followed from the connection at most. */
    static final int MAX_DEPTH = 5;
    /** Objects looked into at most, per search. */
    static final int MAX_OBJECTS = 256;

    private static final Map<Class<?>, List<Field>> PATHS = new ConcurrentHashMap<>();
    private static final Map<Class<?>, Field[]> FIELDS = new ConcurrentHashMap<>();

    private Sockets() {}

    /**
     * The local {@code "ip:port"} of the TCP socket inside {@code connection}
     * (the driver's connection object, not a pool's proxy), or null when
     * none is found (a Unix-socket connection, an unknown driver).
     */
    public static String localAddress(Object connection) {
        try {
            Socket socket = findSocket(connection);
            return socket == null ? null : format(socket);
        } catch (RuntimeException | LinkageError e) {
            return null;
        }
    }

    static String format(Socket socket) {
        InetAddress ip = socket.getLocalAddress();
        int port = socket.getLocalPort();
        if (ip == null || port <= 0 || !socket.isBound()) {
            return null;
        }
        String host = ip.getHostAddress();
        if (ip instanceof Inet6Address) {
            int zone = host.indexOf('%');
            if (zone >= 0) {
                host = host.substring(0, zone);
            }
            return "[" + host + "]:" + port;
        }
        return host + ":" + port;
    }

    static Socket findSocket(Object root) {
        if (root == null) {
            return null;
        }
        List<Field> known = PATHS.get(root.getClass());
        if (known != null) {
            Object value = follow(root, known);
            if (value instanceof Socket s) {
                return s;
            }
        }
        return search(root);
    }

    private static Object follow(Object from, List<Field> path) {
        Object value = from;
        for (Field f : path) {
            if (value == null) {
                return null;
            }
            try {
                value = f.get(value);
            } catch (IllegalAccessException | IllegalArgumentException e) {
                return null;
            }
        }
        return value;
    }

    private record Step(Object value, Step parent, Field field, int depth) {
        List<Field> path() {
            ArrayList<Field> fields = new ArrayList<>();
            for (Step s = this; s.field != null; s = s.parent) {
                fields.add(0, s.field);
            }
            return fields;
        }
    }

    private static Socket search(Object root) {
        ArrayDeque<Step> todo = new ArrayDeque<>();
        Map<Object, Boolean> seen = new IdentityHashMap<>();
        todo.add(new Step(root, null, null, 0));
        seen.put(root, Boolean.TRUE);
        int looked = 0;
        while (!todo.isEmpty() && looked < MAX_OBJECTS) {
            Step step = todo.poll();
            looked++;
            if (step.depth >= MAX_DEPTH) {
                continue;
            }
            for (Field f : fieldsOf(step.value.getClass())) {
                Object value;
                try {
                    value = f.get(step.value);
                } catch (IllegalAccessException | IllegalArgumentException e) {
                    continue;
                }
                if (value == null || seen.put(value, Boolean.TRUE) != null) {
                    continue;
                }
                Step next = new Step(value, step, f, step.depth + 1);
                if (value instanceof Socket s) {
                    if (s.isConnected()) {
                        PATHS.putIfAbsent(root.getClass(), List.copyOf(next.path()));
                        return s;
                    }
                    continue;
                }
                if (worthEntering(value.getClass())) {
                    todo.add(next);
                }
            }
        }
        return null;
    }

    /** Objects of drivers' own classes; not JDK ones, arrays or enums. */
    static boolean worthEntering(Class<?> c) {
        if (c.isArray() || c.isEnum() || c.isPrimitive()) {
            return false;
        }
        String n = c.getName();
        return !(n.startsWith("java.") || n.startsWith("javax.") || n.startsWith("jdk.")
                || n.startsWith("sun.") || n.startsWith("com.sun.") || n.startsWith("org.slf4j.")
                || n.startsWith("com.zaxxer.hikari."));
    }

    /** The instance fields of {@code c} and its superclasses that can be read. */
    private static Field[] fieldsOf(Class<?> c) {
        return FIELDS.computeIfAbsent(c, cls -> {
            List<Field> fields = new ArrayList<>();
            for (Class<?> k = cls; k != null && k != Object.class; k = k.getSuperclass()) {
                if (!worthEntering(k)) {
                    break;
                }
                for (Field f : k.getDeclaredFields()) {
                    Class<?> t = f.getType();
                    if (Modifier.isStatic(f.getModifiers()) || t.isPrimitive() || t == String.class) {
                        continue;
                    }
                    try {
                        f.setAccessible(true);
                        fields.add(f);
                    } catch (RuntimeException e) {
                        // Closed by its module: not ours to read.
                    }
                }
            }
            return fields.toArray(new Field[0]);
        });
    }
}
