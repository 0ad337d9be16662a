//! Every metric, span and event poolscope exports, declared once.
//!
//! The agent builds its OpenTelemetry instruments from these declarations
//! (name, kind, unit, description, buckets) and names their attributes with
//! the [`attr`] keys; `cargo xtask docs` writes the tables of
//! `docs/metrics.md` from them, and CI fails when the document drifts. Pure
//! data and text, so that xtask can use it without building the agent.
//!
//! Adding a metric: declare it here (and list it in [`INSTRUMENTS`]), build
//! it in the agent with the helper for its kind, run `cargo xtask docs`.

mod markdown;

pub use markdown::{render_tables, update_document, GENERATED_BEGIN, GENERATED_END};

/// Attribute keys, one constant each, so that a key is spelled once.
pub mod attr {
    pub const CODE_STACKTRACE: &str = "code.stacktrace";
    pub const CONTAINER_ID: &str = "container.id";
    pub const DB_CONNECTION_POOL_NAME: &str = "db.client.connection.pool.name";
    pub const DB_CONNECTION_STATE: &str = "db.client.connection.state";
    pub const DB_NAMESPACE: &str = "db.namespace";
    pub const DB_OPERATION_NAME: &str = "db.operation.name";
    pub const DB_QUERY_TEXT: &str = "db.query.text";
    pub const DB_RESPONSE_STATUS_CODE: &str = "db.response.status_code";
    pub const DB_SYSTEM_NAME: &str = "db.system.name";
    pub const ERROR_TYPE: &str = "error.type";
    pub const K8S_NAMESPACE_NAME: &str = "k8s.namespace.name";
    pub const K8S_POD_NAME: &str = "k8s.pod.name";
    pub const K8S_POD_UID: &str = "k8s.pod.uid";
    pub const KIND: &str = "kind";
    pub const NETWORK_TRANSPORT: &str = "network.transport";
    pub const PROBE: &str = "probe";
    pub const PROCESS_EXECUTABLE_NAME: &str = "process.executable.name";
    pub const PROCESS_PID: &str = "process.pid";
    pub const REASON: &str = "reason";
    pub const RESULT: &str = "result";
    pub const SERVER_ADDRESS: &str = "server.address";
    pub const SERVER_PORT: &str = "server.port";
    pub const SIGNAL: &str = "signal";
}

/// What kind of instrument, as OpenTelemetry names it. Prometheus shows
/// gauges and up-down counters alike as `gauge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    UpDownCounter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The Prometheus `# TYPE`.
    pub fn prometheus_type(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::UpDownCounter | Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// When an attribute is present (the semantic conventions' levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// On every data point.
    Required,
    /// Only when the condition holds, e.g. "only on errors".
    Conditional(&'static str),
}

/// One attribute of an instrument: its key, and the values it takes there.
#[derive(Debug, Clone, Copy)]
pub struct Attribute {
    pub key: &'static str,
    /// The values, or what they are, for the reader ("" when the key says it).
    pub values: &'static str,
    pub requirement: Requirement,
}

const fn required(key: &'static str, values: &'static str) -> Attribute {
    Attribute {
        key,
        values,
        requirement: Requirement::Required,
    }
}

const fn when(key: &'static str, values: &'static str, condition: &'static str) -> Attribute {
    Attribute {
        key,
        values,
        requirement: Requirement::Conditional(condition),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Instrument {
    /// The OpenTelemetry name.
    pub name: &'static str,
    pub kind: Kind,
    /// UCUM unit (`s`, `By`) or an annotation such as `{connection}`.
    pub unit: &'static str,
    /// What it measures: the instrument's description (Prometheus' HELP)
    /// and the document's "meaning".
    pub description: &'static str,
    pub attributes: &'static [Attribute],
    /// Histogram bucket bounds.
    pub buckets: Option<&'static [f64]>,
    /// A Prometheus name where the exporter's derivation is wrong for it.
    pub prometheus_name_override: Option<&'static str>,
}

impl Instrument {
    /// The name Prometheus shows: what the OpenTelemetry exporter derives
    /// (dots to underscores, unit suffix, `_total` for counters), unless
    /// overridden.
    pub fn prometheus_name(&self) -> String {
        match self.prometheus_name_override {
            Some(name) => name.to_string(),
            None => self.derived_prometheus_name(),
        }
    }

    /// The name the OpenTelemetry Prometheus exporter gives it.
    pub fn derived_prometheus_name(&self) -> String {
        let mut name = self.name.replace('.', "_");
        match self.unit {
            "s" => name.push_str("_seconds"),
            "By" => name.push_str("_bytes"),
            _ => {}
        }
        if self.kind == Kind::Counter {
            name.push_str("_total");
        }
        name
    }

    /// The attribute `key` declared for this instrument.
    pub fn attribute(&self, key: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.key == key)
    }
}

const fn instrument(
    name: &'static str,
    kind: Kind,
    unit: &'static str,
    description: &'static str,
    attributes: &'static [Attribute],
) -> Instrument {
    Instrument {
        name,
        kind,
        unit,
        description,
        attributes,
        buckets: None,
        prometheus_name_override: None,
    }
}

const fn histogram(
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    attributes: &'static [Attribute],
    buckets: &'static [f64],
) -> Instrument {
    Instrument {
        buckets: Some(buckets),
        ..instrument(name, Kind::Histogram, unit, description, attributes)
    }
}

/// Connect durations, seconds.
pub const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
];

/// Database client durations, seconds, as the semantic conventions
/// recommend.
pub const OPERATION_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];

/// Connection lifetimes and use times span milliseconds to days.
pub const LIFETIME_BUCKETS: &[f64] = &[
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

const PID: Attribute = required(attr::PROCESS_PID, "");
const POOL: Attribute = required(attr::DB_CONNECTION_POOL_NAME, "");
const POOL_ATTRIBUTES: &[Attribute] = &[POOL, PID];
const CONNECT_ATTRIBUTES: &[Attribute] = &[
    required(attr::RESULT, "ok, refused, timed_out, unreachable, error"),
    required(attr::NETWORK_TRANSPORT, "tcp, unix"),
];
const PLACEMENT_CONDITION: &str = "when the process runs in a container";
/// A (process, server) series; the placement is one value per process.
const PROCESS_SERVER_ATTRIBUTES: &[Attribute] = &[
    PID,
    required(attr::PROCESS_EXECUTABLE_NAME, ""),
    required(attr::SERVER_ADDRESS, ""),
    when(attr::SERVER_PORT, "", "on TCP"),
    when(attr::CONTAINER_ID, "", PLACEMENT_CONDITION),
    when(attr::K8S_POD_UID, "", PLACEMENT_CONDITION),
    when(attr::K8S_POD_NAME, "", PLACEMENT_CONDITION),
    when(attr::K8S_NAMESPACE_NAME, "", PLACEMENT_CONDITION),
];
const PROBE_ATTRIBUTES: &[Attribute] = &[required(
    attr::PROBE,
    "the kernel program, e.g. `sock_recv_length`",
)];

pub const CONNECTS: Instrument = instrument(
    "poolscope.connects",
    Kind::Counter,
    "{connect}",
    "connect() calls by their final outcome; a non-blocking connect counts when its handshake ends",
    CONNECT_ATTRIBUTES,
);
pub const CONNECT_DURATION: Instrument = histogram(
    "poolscope.connect.duration",
    "s",
    "from connect() to the end of the TCP handshake (or the failure)",
    CONNECT_ATTRIBUTES,
    CONNECT_BUCKETS,
);
pub const CONNECTION_OPEN: Instrument = instrument(
    "poolscope.connection.open",
    Kind::Gauge,
    "{connection}",
    "open connections (connecting, established or peer-closed) per process and server",
    PROCESS_SERVER_ATTRIBUTES,
);
pub const CONNECTION_CLOSE_WAIT: Instrument = instrument(
    "poolscope.connection.close_wait",
    Kind::Gauge,
    "{connection}",
    "connections whose server hung up (TCP CLOSE_WAIT) while the process still holds the fd",
    PROCESS_SERVER_ATTRIBUTES,
);
pub const CONNECTION_LIFETIME: Instrument = histogram(
    "poolscope.connection.lifetime",
    "s",
    "from connect() to close, for connections the agent saw open (not those seeded from /proc)",
    &[required(attr::NETWORK_TRANSPORT, "tcp, unix")],
    LIFETIME_BUCKETS,
);
pub const OPERATION_DURATION: Instrument = histogram(
    "db.client.operation.duration",
    "s",
    "one database round trip: from the first byte of the request to the end of its response \
     (PostgreSQL ReadyForQuery, MySQL's final OK/ERR/EOF, the complete RESP reply), not to the \
     response's first byte",
    &[
        required(attr::DB_SYSTEM_NAME, "postgresql, mysql, redis"),
        when(
            attr::DB_OPERATION_NAME,
            "SELECT, COMMIT, GET...: known SQL keywords and at most 256 Redis command names",
            "when recognized",
        ),
        required(attr::SERVER_ADDRESS, ""),
        when(attr::SERVER_PORT, "", "on TCP"),
        when(
            attr::ERROR_TYPE,
            "SQLSTATE, MySQL error number, Redis error prefix",
            "only on errors",
        ),
    ],
    OPERATION_BUCKETS,
);
pub const QUERIES_SLOW: Instrument = instrument(
    "poolscope.queries.slow",
    Kind::Counter,
    "{query}",
    "round trips that took `[queries] slow_threshold_ms` or longer (the slow-query reports, \
     counted before any log budget), for a slow-query rate alert",
    &[
        required(attr::DB_SYSTEM_NAME, "postgresql, mysql, redis"),
        when(
            attr::DB_OPERATION_NAME,
            "SELECT, COMMIT, GET...: as on db.client.operation.duration",
            "when recognized",
        ),
        required(attr::SERVER_ADDRESS, ""),
        when(attr::SERVER_PORT, "", "on TCP"),
    ],
);
pub const CONNECTION_COUNT: Instrument = Instrument {
    // Prometheus reserves a `_count` suffix for histograms and summaries.
    prometheus_name_override: Some("db_client_connections"),
    ..instrument(
        "db.client.connection.count",
        Kind::UpDownCounter,
        "{connection}",
        "connections of each pool by state. Adapter pools: used = handed out and not returned. \
         Inferred pools (no adapter; named `address:port/database`): used = a transaction is open \
         or a request awaits its response",
        &[POOL, required(attr::DB_CONNECTION_STATE, "used, idle"), PID],
    )
};
pub const CONNECTION_MAX: Instrument = instrument(
    "db.client.connection.max",
    Kind::UpDownCounter,
    "{connection}",
    "most connections the pool allows (adapter `max`)",
    POOL_ATTRIBUTES,
);
pub const CONNECTION_IDLE_MAX: Instrument = instrument(
    "db.client.connection.idle.max",
    Kind::UpDownCounter,
    "{connection}",
    "most idle connections the pool keeps (adapter `idle_max`)",
    POOL_ATTRIBUTES,
);
pub const CONNECTION_IDLE_MIN: Instrument = instrument(
    "db.client.connection.idle.min",
    Kind::UpDownCounter,
    "{connection}",
    "fewest idle connections the pool keeps (adapter `min_idle`)",
    POOL_ATTRIBUTES,
);
pub const CONNECTION_PENDING_REQUESTS: Instrument = instrument(
    "db.client.connection.pending_requests",
    Kind::UpDownCounter,
    "{connection}",
    "acquires waiting for a connection (adapter pools)",
    POOL_ATTRIBUTES,
);
pub const CONNECTION_TIMEOUTS: Instrument = instrument(
    "db.client.connection.timeouts",
    Kind::Counter,
    "{timeout}",
    "acquires that timed out (adapter pools)",
    POOL_ATTRIBUTES,
);
pub const CONNECTION_WAIT_TIME: Instrument = histogram(
    "db.client.connection.wait_time",
    "s",
    "from a caller asking the pool for a connection to getting one",
    &[
        POOL,
        PID,
        when(
            attr::ERROR_TYPE,
            "timeout, error",
            "only when the acquire failed",
        ),
    ],
    OPERATION_BUCKETS,
);
pub const CONNECTION_USE_TIME: Instrument = histogram(
    "db.client.connection.use_time",
    "s",
    "from the pool handing a connection out to getting it back",
    POOL_ATTRIBUTES,
    LIFETIME_BUCKETS,
);
pub const CONNECTION_CREATE_TIME: Instrument = histogram(
    "db.client.connection.create_time",
    "s",
    "from connect() (seen in the kernel) to the adapter reporting the connection ready",
    POOL_ATTRIBUTES,
    OPERATION_BUCKETS,
);
const LEAK_KINDS: &str =
    "leaked, slow_holder, idle_in_transaction, close_wait, abandoned, slow_acquire, held_too_long";
pub const LEAK_REPORTS: Instrument = instrument(
    "poolscope.leak.reports",
    Kind::Counter,
    "{report}",
    "reports opened",
    &[required(attr::KIND, LEAK_KINDS)],
);
pub const REPORTS_UNPUBLISHED: Instrument = instrument(
    "poolscope.reports.unpublished",
    Kind::Counter,
    "{report}",
    "report log lines (leak, slow-acquire and slow-query lines) held back because one process \
     caused more than 30 in a minute, or all together more than 600; the reports themselves stay \
     in the API and still go out as OTLP events (bounded by the OTLP queue, which keeps a quarter \
     for leak reports), and the log says once a minute how many lines were held back per process",
    &[required(attr::REASON, "process_budget, global_budget")],
);
pub const LEAK_OPEN: Instrument = instrument(
    "poolscope.leak.open",
    Kind::UpDownCounter,
    "{report}",
    "reports open now",
    &[
        required(attr::KIND, LEAK_KINDS),
        PID,
        when(attr::DB_CONNECTION_POOL_NAME, "", "when known"),
    ],
);
pub const ADAPTER_CONNECTIONS_BOUND: Instrument = instrument(
    "poolscope.adapter.connections.bound",
    Kind::Counter,
    "{connection}",
    "connections an adapter named by its own id alone, with the thread that connected them, \
     judged against the kernel's connects (docs/adapter-protocol.md): tied to their socket when \
     exactly one fits, else left known by the adapter's word",
    &[required(
        attr::RESULT,
        "bound, ambiguous (no single socket fits, or the kernel dropped events meanwhile), \
         refused (no room to wait for the evidence)",
    )],
);
pub const ADAPTER_MESSAGES: Instrument = instrument(
    "poolscope.adapter.messages",
    Kind::Counter,
    "{message}",
    "messages received from pool adapters (datagrams, and lines of the stream socket); a \
     stream refused at accept counts as one rejected message",
    &[
        required(attr::RESULT, "accepted, rejected"),
        when(
            attr::REASON,
            "too_large, malformed, unknown_version, unknown_kind, invalid, unknown_sender, \
             spoofed_pid, sender_not_allowed, sender_exited, silent_stream (a stream that \
             sent no line within 10 s of its accept), and the fair-share bounds pool_limit, \
             pending_limit, early_event_limit, named_connection_limit (adapter-named connections), \
             and stream_limit (too many open streams)",
            "only when rejected",
        ),
    ],
);
pub const EXPORT_BATCHES: Instrument = instrument(
    "poolscope.export.batches",
    Kind::Counter,
    "{batch}",
    "OTLP export requests, after the exporter's own retries (only when OTLP is configured); \
     metrics go out as two requests per interval, the pool histograms \
     (`db.client.connection.wait_time`, `.use_time`, `.create_time`) being a request of their own",
    &[
        required(attr::SIGNAL, "metrics, logs"),
        required(attr::RESULT, "ok, failed"),
    ],
);
pub const EXPORT_DROPPED: Instrument = instrument(
    "poolscope.export.dropped",
    Kind::Counter,
    "{event}",
    "events (OTLP log records) dropped because the bounded queue was full or their batch failed \
     after retries",
    &[required(attr::SIGNAL, "logs")],
);
pub const EXPORT_QUEUED: Instrument = instrument(
    "poolscope.export.queued",
    Kind::UpDownCounter,
    "{event}",
    "events waiting in the bounded OTLP queue",
    &[required(attr::SIGNAL, "logs")],
);
pub const POOL_SERIES_FORGOTTEN: Instrument = instrument(
    "poolscope.telemetry.pool_series.forgotten",
    Kind::Counter,
    "{pool}",
    "pools whose histogram series (`db.client.connection.wait_time`, `.use_time`, \
     `.create_time`) were dropped because their process exited",
    &[],
);
pub const POOL_SERIES_RESETS: Instrument = instrument(
    "poolscope.telemetry.pool_series.resets",
    Kind::Counter,
    "{reset}",
    "times the pool histograms were rebuilt to drop those series; each one restarts every live \
     pool's histograms from zero (a counter reset)",
    &[],
);
pub const PROTOCOL_LOST: Instrument = instrument(
    "poolscope.protocol.lost",
    Kind::Counter,
    "{event}",
    "times a connection's protocol parser lost its framing (malformed or truncated bytes); it \
     resynchronises at the next recognizable message",
    &[],
);
pub const KERNEL_EVENTS: Instrument = instrument(
    "poolscope.kernel.events",
    Kind::Counter,
    "{event}",
    "events read from the kernel ring buffer",
    &[],
);
pub const KERNEL_EVENTS_UNMATCHED: Instrument = instrument(
    "poolscope.kernel.events.unmatched",
    Kind::Counter,
    "{event}",
    "events about no connection the agent tracks (late events of a replaced fd, closes of \
     sockets never seen open), and `checkout_state` entries the agent refused \
     (docs/adapter-protocol.md)",
    &[],
);
pub const KERNEL_EVENTS_MALFORMED: Instrument = instrument(
    "poolscope.kernel.events.malformed",
    Kind::Counter,
    "{event}",
    "ring-buffer records that could not be decoded",
    &[],
);
pub const KERNEL_EVENTS_DROPPED: Instrument = instrument(
    "poolscope.kernel.events.dropped",
    Kind::Counter,
    "{event}",
    "events the kernel could not hand over because the ring buffer was full",
    &[],
);
pub const KERNEL_CONNECTIONS_UNTRACKED: Instrument = instrument(
    "poolscope.kernel.connections.untracked",
    Kind::Counter,
    "{connection}",
    "connections the kernel could not track because its connection maps (131,072 entries, never \
     evicting) were full",
    &[],
);
pub const KERNEL_SOCKET_IO_UNATTRIBUTED: Instrument = instrument(
    "poolscope.kernel.socket_io.unattributed",
    Kind::Counter,
    "{call}",
    "socket sends and receives of processes that track a connection which the socket data path \
     could not attribute to an fd (io_uring, sendfile, sendmmsg): their bytes are not parsed",
    &[],
);
pub const KERNEL_CONNECTS_UNATTRIBUTED: Instrument = instrument(
    "poolscope.kernel.connects.unattributed",
    Kind::Counter,
    "{connection}",
    "TCP connects not made by connect() (io_uring, TCP Fast Open): no fd names them, so they are \
     not tracked",
    &[],
);
pub const PROBE_RUN_TIME: Instrument = instrument(
    "poolscope.probe.run_time",
    Kind::Counter,
    "s",
    "time the kernel spent running each program (BPF run-time statistics; kernel 5.8+). Off by \
     default, since the statistics cost a little on every run: `--probe-stats` or \
     `[kernel] probe_stats = true`",
    PROBE_ATTRIBUTES,
);
pub const PROBE_RUNS: Instrument = instrument(
    "poolscope.probe.runs",
    Kind::Counter,
    "{run}",
    "times each kernel program ran; run_time / runs is the cost per event",
    PROBE_ATTRIBUTES,
);
pub const KERNEL_RINGBUF_PENDING: Instrument = instrument(
    "poolscope.kernel.ringbuf.pending",
    Kind::Gauge,
    "By",
    "bytes waiting in the ring buffer at the last sample (the highest over CPUs)",
    &[],
);
pub const KERNEL_RINGBUF_SIZE: Instrument = instrument(
    "poolscope.kernel.ringbuf.size",
    Kind::Gauge,
    "By",
    "size of the ring buffer (`kernel.ring_buffer_bytes`)",
    &[],
);

/// Every instrument, in the order of the reference table.
pub const INSTRUMENTS: &[&Instrument] = &[
    &CONNECTS,
    &CONNECT_DURATION,
    &CONNECTION_OPEN,
    &CONNECTION_CLOSE_WAIT,
    &CONNECTION_LIFETIME,
    &OPERATION_DURATION,
    &QUERIES_SLOW,
    &CONNECTION_COUNT,
    &CONNECTION_MAX,
    &CONNECTION_IDLE_MAX,
    &CONNECTION_IDLE_MIN,
    &CONNECTION_PENDING_REQUESTS,
    &CONNECTION_TIMEOUTS,
    &CONNECTION_WAIT_TIME,
    &CONNECTION_USE_TIME,
    &CONNECTION_CREATE_TIME,
    &LEAK_REPORTS,
    &REPORTS_UNPUBLISHED,
    &LEAK_OPEN,
    &ADAPTER_MESSAGES,
    &ADAPTER_CONNECTIONS_BOUND,
    &EXPORT_BATCHES,
    &EXPORT_DROPPED,
    &EXPORT_QUEUED,
    &POOL_SERIES_FORGOTTEN,
    &POOL_SERIES_RESETS,
    &PROTOCOL_LOST,
    &KERNEL_EVENTS,
    &KERNEL_EVENTS_UNMATCHED,
    &KERNEL_EVENTS_MALFORMED,
    &KERNEL_EVENTS_DROPPED,
    &KERNEL_CONNECTIONS_UNTRACKED,
    &KERNEL_SOCKET_IO_UNATTRIBUTED,
    &KERNEL_CONNECTS_UNATTRIBUTED,
    &PROBE_RUN_TIME,
    &PROBE_RUNS,
    &KERNEL_RINGBUF_PENDING,
    &KERNEL_RINGBUF_SIZE,
];

/// The declared instrument whose Prometheus name is `name`.
pub fn by_prometheus_name(name: &str) -> Option<&'static Instrument> {
    INSTRUMENTS
        .iter()
        .copied()
        .find(|i| i.prometheus_name() == name)
}

/// An OTLP log record the agent emits for an event.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// The record's `event_name`.
    pub name: &'static str,
    pub when: &'static str,
    pub severity: &'static str,
    /// The record's attributes: the report's fields as the API shows them,
    /// nested objects flattened with dots.
    pub attributes: &'static [Attribute],
}

const WHEN_KNOWN: &str = "when known";
/// A leak, slow-holder or slow-acquire report (`GET /api/v1/leaks`).
const REPORT_ATTRIBUTES: &[Attribute] = &[
    required("id", "the report's number"),
    required("kind", LEAK_KINDS),
    required("status", "open, resolved"),
    required("pid", ""),
    required("process", "executable name"),
    when(
        "cmdline",
        "redacted unless configured otherwise",
        WHEN_KNOWN,
    ),
    when("container_id", "", "when the process runs in a container"),
    when("pool", "", "adapter or inferred pools"),
    when(
        "db_system",
        "postgresql, mysql, redis, or the name an adapter declared (sqlite...)",
        WHEN_KNOWN,
    ),
    when(
        "server",
        "address:port (what the pool declared, e.g. a database file, for connections without a socket)",
        WHEN_KNOWN,
    ),
    when("local_address", "", "TCP connections"),
    when("fd", "", "reports about one connection with a socket"),
    when("generation", "", "reports about one connection with a socket"),
    when("holder_tid", "", "when the adapter said which thread"),
    when(
        "holder_thread",
        "the thread's name",
        "when the adapter said which thread",
    ),
    when(
        attr::CODE_STACKTRACE,
        "the code that checked the connection out, one frame per line, innermost first (the API's `holder_stack`)",
        "when the adapter sent the holder's stack",
    ),
    when(
        "connection_opened_at",
        "RFC 3339",
        "reports about one connection",
    ),
    when("checked_out_at", "RFC 3339", "adapter pools"),
    when("held_for_seconds", "", "adapter pools"),
    when("last_activity", "RFC 3339", "reports about one connection"),
    when("last_query", "sanitized", WHEN_KNOWN),
    when("tx_state", "idle, in_transaction, failed", WHEN_KNOWN),
    required("evidence", "why the rule fired, in words"),
    required("reported_at", "RFC 3339"),
    when("resolved_at", "RFC 3339", "resolved reports"),
    when("resolution", "why it resolved", "resolved reports"),
    when("wait_seconds", "", "slow acquires"),
    when("pool_used", "", "slow acquires"),
    when("pool_max", "", "slow acquires, when the pool said"),
    when("pool_pending", "", "slow acquires"),
];

pub const EVENT_LEAK_OPENED: Event = Event {
    name: "poolscope.leak.opened",
    when: "a leak report opens (`kind` says which rule)",
    severity: "WARN (INFO for `slow_holder`)",
    attributes: REPORT_ATTRIBUTES,
};
pub const EVENT_LEAK_RESOLVED: Event = Event {
    name: "poolscope.leak.resolved",
    when: "it resolves (`resolution` says why)",
    severity: "INFO",
    attributes: REPORT_ATTRIBUTES,
};
pub const EVENT_ACQUIRE_SLOW: Event = Event {
    name: "poolscope.acquire.slow",
    when: "a pool acquire waited past the threshold",
    severity: "WARN",
    attributes: REPORT_ATTRIBUTES,
};
pub const EVENT_QUERY_SLOW: Event = Event {
    name: "poolscope.query.slow",
    when: "a round trip took longer than the slow-query threshold; body = sanitized query",
    severity: "INFO",
    attributes: &[
        required("at", "RFC 3339"),
        required("pid", ""),
        required("process", "executable name"),
        required("fd", ""),
        required("generation", ""),
        required("db_system", "postgresql, mysql, redis"),
        required("server", "address:port"),
        when("namespace", "the database", WHEN_KNOWN),
        when("operation", "SELECT, GET...", "when recognized"),
        when("query", "sanitized", "when the parser saw it"),
        required("duration_seconds", ""),
        when(
            "error.code",
            "SQLSTATE, MySQL error number, Redis error prefix",
            "only on errors",
        ),
        when("error.message", "", "only on errors"),
        when("rows", "", "when the server said"),
        when("tx_state", "idle, in_transaction, failed", WHEN_KNOWN),
    ],
};

pub const EVENTS: &[&Event] = &[
    &EVENT_LEAK_OPENED,
    &EVENT_LEAK_RESOLVED,
    &EVENT_ACQUIRE_SLOW,
    &EVENT_QUERY_SLOW,
];

/// A span the agent emits.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    /// What the span's name is.
    pub name: &'static str,
    pub when: &'static str,
    pub attributes: &'static [Attribute],
}

/// One database round trip as a client span (`[otlp] query_spans`).
pub const QUERY_SPAN: Span = Span {
    name: "the operation (`SELECT`, `GET`...), else the database system",
    when: "every round trip, with `[otlp] query_spans = true`; status error on a database error",
    attributes: &[
        required(attr::DB_SYSTEM_NAME, "postgresql, mysql, redis"),
        when(attr::DB_OPERATION_NAME, "", "when recognized"),
        when(attr::DB_QUERY_TEXT, "sanitized", "when the parser saw it"),
        when(attr::DB_NAMESPACE, "", "when the parser saw it"),
        required(attr::SERVER_ADDRESS, ""),
        when(attr::SERVER_PORT, "", "on TCP"),
        when(
            attr::ERROR_TYPE,
            "SQLSTATE, MySQL error number, Redis error prefix",
            "only on errors",
        ),
        when(
            attr::DB_RESPONSE_STATUS_CODE,
            "same as `error.type`",
            "only on errors",
        ),
        PID,
    ],
};

pub const SPANS: &[&Span] = &[&QUERY_SPAN];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_follow_the_conventions() {
        let mut seen = std::collections::HashSet::new();
        for i in INSTRUMENTS {
            assert!(seen.insert(i.name), "{} declared twice", i.name);
            assert!(
                i.name.starts_with("poolscope.") || i.name.starts_with("db.client."),
                "{}: signals of our own live under poolscope.*",
                i.name
            );
            assert_eq!(
                i.buckets.is_some(),
                i.kind == Kind::Histogram,
                "{}: buckets belong to histograms",
                i.name
            );
            let mut keys = std::collections::HashSet::new();
            for a in i.attributes {
                assert!(keys.insert(a.key), "{}: {} twice", i.name, a.key);
            }
        }
    }

    #[test]
    fn buckets_ascend() {
        for i in INSTRUMENTS {
            if let Some(b) = i.buckets {
                assert!(b.windows(2).all(|w| w[0] < w[1]), "{}", i.name);
            }
        }
    }

    #[test]
    fn prometheus_names_are_derived_like_the_exporter_does() {
        assert_eq!(CONNECTS.prometheus_name(), "poolscope_connects_total");
        assert_eq!(
            CONNECT_DURATION.prometheus_name(),
            "poolscope_connect_duration_seconds"
        );
        assert_eq!(
            PROBE_RUN_TIME.prometheus_name(),
            "poolscope_probe_run_time_seconds_total"
        );
        assert_eq!(
            KERNEL_RINGBUF_SIZE.prometheus_name(),
            "poolscope_kernel_ringbuf_size_bytes"
        );
        assert_eq!(CONNECTION_COUNT.prometheus_name(), "db_client_connections");
        assert_eq!(
            by_prometheus_name("db_client_connection_max").map(|i| i.name),
            Some("db.client.connection.max")
        );
    }
}
