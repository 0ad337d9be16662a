package io.poolscope.adapter;

/** A JSON object written field by field: all the adapter ever sends. */
final class Json {
    private final StringBuilder out = new StringBuilder(192);
    private boolean first = true;

    Json() {
        out.append('{');
    }

    private StringBuilder key(String key) {
        if (!first) {
            out.append(',');
        }
        first = false;
        return out.append('"').append(key).append("\":");
    }

    Json put(String key, long value) {
        key(key).append(value);
        return this;
    }

    /** Leaves the field out when {@code value} is null. */
    Json put(String key, String value) {
        if (value != null) {
            quote(key(key), value);
        }
        return this;
    }

    /** Appends already encoded JSON (an array or an object). */
    Json putRaw(String key, CharSequence json) {
        key(key).append(json);
        return this;
    }

    /** At most {@code max} characters (code points), as the agent counts them. */
    static String cut(String text, int max) {
        if (text == null || text.codePointCount(0, text.length()) <= max) {
            return text;
        }
        return text.substring(0, text.offsetByCodePoints(0, max));
    }

    @Override
    public String toString() {
        return out + "}";
    }

    static StringBuilder quote(StringBuilder out, String text) {
        out.append('"');
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else if (Character.isHighSurrogate(c) && i + 1 < text.length()
                            && Character.isLowSurrogate(text.charAt(i + 1))) {
                        out.append(c).append(text.charAt(++i));
                    } else if (Character.isSurrogate(c)) {
                        // A lone surrogate has no UTF-8 form.
                        out.append('\ufffd');
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        return out.append('"');
    }
}
