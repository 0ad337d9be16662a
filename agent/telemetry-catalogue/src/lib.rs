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
mod prometheus;

pub use markdown::{render_tables, update_document, GENERATED_BEGIN, GENERATED_END};
pub use prometheus::{prometheus_label_name, prometheus_metric_name};

/// Attribute keys, one constant each, so that a key is spelled once.
pub mod attr {
    pub const CODE_STACKTRACE: &str = "code.stacktrace";
    pub const CONTAINER_ID: &str = "container.id";
    pub const DB_COLLECTION_NAME: &str = "db.collection.name";
    pub const DB_CONNECTION_POOL_NAME: &str = "db.client.connection.pool.name";
    pub const DB_CONNECTION_STATE: &str = "db.client.connection.state";
    pub const DB_NAMESPACE: &str = "db.namespace";
    pub const DB_OPERATION_NAME: &str = "db.operation.name";
    pub const DB_QUERY_SUMMARY: &str = "db.query.summary";
    pub const DB_QUERY_TEXT: &str = "db.query.text";
    pub const DB_RESPONSE_RETURNED_ROWS: &str = "db.response.returned_rows";
    pub const DB_RESPONSE_STATUS_CODE: &str = "db.response.status_code";
    pub const DB_SYSTEM_NAME: &str = "db.system.name";
    pub const ERROR_TYPE: &str = "error.type";
    pub const HOST_NAME: &str = "host.name";
    pub const K8S_CONTAINER_NAME: &str = "k8s.container.name";
    pub const K8S_NAMESPACE_NAME: &str = "k8s.namespace.name";
    pub const K8S_POD_NAME: &str = "k8s.pod.name";
    pub const K8S_POD_UID: &str = "k8s.pod.uid";
    pub const KIND: &str = "kind";
    pub const NETWORK_LOCAL_ADDRESS: &str = "network.local.address";
    pub const NETWORK_LOCAL_PORT: &str = "network.local.port";
    pub const NETWORK_TRANSPORT: &str = "network.transport";
    pub const PROBE: &str = "probe";
    pub const PROCESS_COMMAND_ARGS: &str = "process.command_args";
    pub const PROCESS_COMMAND_LINE: &str = "process.command_line";
    pub const PROCESS_EXECUTABLE_NAME: &str = "process.executable.name";
    pub const PROCESS_PID: &str = "process.pid";
    pub const REASON: &str = "reason";
    pub const RESULT: &str = "result";
    pub const SERVER_ADDRESS: &str = "server.address";
    pub const SERVER_PORT: &str = "server.port";
    pub const SERVICE_INSTANCE_ID: &str = "service.instance.id";
    pub const SERVICE_NAME: &str = "service.name";
    pub const SIGNAL: &str = "signal";
    pub const THREAD_ID: &str = "thread.id";
    pub const THREAD_NAME: &str = "thread.name";
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
    /// Only when configured (`[metrics.attributes."<metric>"] add`), and
    /// then when the condition holds.
    OptIn(&'static str),
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

const fn opt_in(key: &'static str, values: &'static str, condition: &'static str) -> Attribute {
    Attribute {
        key,
        values,
        requirement: Requirement::OptIn(condition),
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
    /// Recorded per observed application, under that application's own
    /// resource ([`RESOURCE_ATTRIBUTES`]); else the agent's own signal,
    /// under the agent's resource (`service.name=poolscope`).
    pub per_application: bool,
}

impl Instrument {
    /// The name Prometheus shows, on the agent's own `/metrics` and on an
    /// OTLP -> Prometheus path alike: see [`prometheus_metric_name`].
    pub fn prometheus_name(&self) -> String {
        prometheus_metric_name(self.name, self.unit, self.kind)
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
        per_application: false,
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

/// An instrument of each application's own.
const fn of_application(instrument: Instrument) -> Instrument {
    Instrument {
        per_application: true,
        ..instrument
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
/// The database of a round trip, bounded: a client names the database it
/// asks for.
const NAMESPACE: Attribute = when(
    attr::DB_NAMESPACE,
    "the database (PostgreSQL, MySQL) or index (Redis `SELECT`); at most 16 per server, the \
     rest `_OTHER`",
    "when the parser saw it",
);
const POOL: Attribute = required(attr::DB_CONNECTION_POOL_NAME, "");
const POOL_ATTRIBUTES: &[Attribute] = &[POOL];
const CONNECT_ATTRIBUTES: &[Attribute] = &[
    required(attr::RESULT, "ok, refused, timed_out, unreachable, error"),
    required(attr::NETWORK_TRANSPORT, "tcp, unix"),
];
/// A server an application talks to (the application is the resource).
const SERVER_ATTRIBUTES: &[Attribute] = &[
    required(attr::SERVER_ADDRESS, ""),
    when(attr::SERVER_PORT, "", "on TCP"),
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
pub const CONNECTION_OPEN: Instrument = of_application(instrument(
    "poolscope.connection.open",
    Kind::Gauge,
    "{connection}",
    "open connections (connecting, established or peer-closed) per process and server",
    SERVER_ATTRIBUTES,
));
pub const CONNECTION_CLOSE_WAIT: Instrument = of_application(instrument(
    "poolscope.connection.close_wait",
    Kind::Gauge,
    "{connection}",
    "connections whose server hung up (TCP CLOSE_WAIT) while the process still holds the fd",
    SERVER_ATTRIBUTES,
));
pub const CONNECTION_LIFETIME: Instrument = histogram(
    "poolscope.connection.lifetime",
    "s",
    "from connect() to close, for connections the agent saw open (not those seeded from /proc)",
    &[required(attr::NETWORK_TRANSPORT, "tcp, unix")],
    LIFETIME_BUCKETS,
);
pub const OPERATION_DURATION: Instrument = of_application(histogram(
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
        NAMESPACE,
        required(attr::SERVER_ADDRESS, ""),
        when(attr::SERVER_PORT, "", "on TCP"),
        when(
            attr::DB_RESPONSE_STATUS_CODE,
            "SQLSTATE, MySQL error number, Redis error prefix",
            "only on errors",
        ),
        when(
            attr::ERROR_TYPE,
            "the same as `db.response.status_code`",
            "only on errors",
        ),
        opt_in(
            attr::DB_COLLECTION_NAME,
            "the one table a SQL statement works on; at most 256 names, the rest `_OTHER`",
            "when the statement names exactly one",
        ),
        opt_in(
            attr::DB_QUERY_SUMMARY,
            "the operation and its tables, e.g. `SELECT orders customers`; at most 1,024 \
             summaries, the rest `_OTHER`",
            "when the parser saw the statement",
        ),
    ],
    OPERATION_BUCKETS,
));
pub const QUERIES_SLOW: Instrument = of_application(instrument(
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
        NAMESPACE,
        required(attr::SERVER_ADDRESS, ""),
        when(attr::SERVER_PORT, "", "on TCP"),
    ],
));
// Prometheus's linter would rather a gauge did not end in `_count`; the
// conventions' name is kept because it is what every OTLP -> Prometheus path
// gives it, so that dashboards work on both paths.
pub const CONNECTION_COUNT: Instrument = of_application(instrument(
    "db.client.connection.count",
    Kind::UpDownCounter,
    "{connection}",
    "connections of each pool by state. Adapter pools: used = handed out and not returned. \
     Inferred pools (no adapter; named `address:port/database`): used = a transaction is open \
     or a request awaits its response",
    &[POOL, required(attr::DB_CONNECTION_STATE, "used, idle")],
));
pub const CONNECTION_MAX: Instrument = of_application(instrument(
    "db.client.connection.max",
    Kind::UpDownCounter,
    "{connection}",
    "most connections the pool allows (adapter `max`)",
    POOL_ATTRIBUTES,
));
pub const CONNECTION_IDLE_MAX: Instrument = of_application(instrument(
    "db.client.connection.idle.max",
    Kind::UpDownCounter,
    "{connection}",
    "most idle connections the pool keeps (adapter `idle_max`)",
    POOL_ATTRIBUTES,
));
pub const CONNECTION_IDLE_MIN: Instrument = of_application(instrument(
    "db.client.connection.idle.min",
    Kind::UpDownCounter,
    "{connection}",
    "fewest idle connections the pool keeps (adapter `min_idle`)",
    POOL_ATTRIBUTES,
));
pub const CONNECTION_PENDING_REQUESTS: Instrument = of_application(instrument(
    "db.client.connection.pending_requests",
    Kind::UpDownCounter,
    "{request}",
    "acquires waiting for a connection (adapter pools)",
    POOL_ATTRIBUTES,
));
pub const CONNECTION_TIMEOUTS: Instrument = of_application(instrument(
    "db.client.connection.timeouts",
    Kind::Counter,
    "{timeout}",
    "acquires that timed out (adapter pools)",
    POOL_ATTRIBUTES,
));
pub const CONNECTION_WAIT_TIME: Instrument = of_application(histogram(
    "db.client.connection.wait_time",
    "s",
    "from a caller asking the pool for a connection to getting one",
    &[
        POOL,
        when(
            attr::ERROR_TYPE,
            "timeout, error",
            "only when the acquire failed",
        ),
    ],
    OPERATION_BUCKETS,
));
pub const CONNECTION_USE_TIME: Instrument = of_application(histogram(
    "db.client.connection.use_time",
    "s",
    "from the pool handing a connection out to getting it back",
    POOL_ATTRIBUTES,
    LIFETIME_BUCKETS,
));
pub const CONNECTION_CREATE_TIME: Instrument = of_application(histogram(
    "db.client.connection.create_time",
    "s",
    "from connect() (seen in the kernel) to the adapter reporting the connection ready",
    POOL_ATTRIBUTES,
    OPERATION_BUCKETS,
));
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
pub const LEAK_OPEN: Instrument = of_application(instrument(
    "poolscope.leak.open",
    Kind::UpDownCounter,
    "{report}",
    "reports open now",
    &[
        required(attr::KIND, LEAK_KINDS),
        when(attr::DB_CONNECTION_POOL_NAME, "", "when known"),
    ],
));
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
     metrics go out as one request per interval for the agent's own, and one per application \
     (each under its own resource)",
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
pub const APPLICATIONS: Instrument = instrument(
    "poolscope.telemetry.applications",
    Kind::UpDownCounter,
    "{application}",
    "observed processes whose pool, connection, query and leak metrics go out under a resource of \
     their own (one per process; docs/metrics.md \"One resource per application\"); a process's \
     series leave /metrics 60 s after it exits (OTLP sends them once more at the exit)",
    &[],
);
pub const APPLICATIONS_FOLDED: Instrument = instrument(
    "poolscope.telemetry.applications.folded",
    Kind::Counter,
    "{application}",
    "processes whose metrics went out under the shared `service.name=_other` resource because \
     `[tracking] max_applications` processes had resources of their own",
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
pub const KERNEL_TLS_CALLS_UNATTRIBUTED: Instrument = instrument(
    "poolscope.kernel.tls_calls.unattributed",
    Kind::Counter,
    "{call}",
    "TLS library reads and writes, by processes that track a connection, whose connection could \
     not be told (the call moved no bytes on a socket and its session never did, or its \
     connection ended) or that could not be remembered: their plaintext is not read",
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
    &APPLICATIONS,
    &APPLICATIONS_FOLDED,
    &PROTOCOL_LOST,
    &KERNEL_EVENTS,
    &KERNEL_EVENTS_UNMATCHED,
    &KERNEL_EVENTS_MALFORMED,
    &KERNEL_EVENTS_DROPPED,
    &KERNEL_CONNECTIONS_UNTRACKED,
    &KERNEL_SOCKET_IO_UNATTRIBUTED,
    &KERNEL_CONNECTS_UNATTRIBUTED,
    &KERNEL_TLS_CALLS_UNATTRIBUTED,
    &PROBE_RUN_TIME,
    &PROBE_RUNS,
    &KERNEL_RINGBUF_PENDING,
    &KERNEL_RINGBUF_SIZE,
];

/// A resource attribute of each observed application.
#[derive(Debug, Clone, Copy)]
pub struct ResourceAttribute {
    pub attribute: Attribute,
    /// Also a label of the application's series on `/metrics` (what
    /// Prometheus's `promote_resource_attributes` gives on the OTLP path).
    pub label: bool,
}

const fn resource(attribute: Attribute, label: bool) -> ResourceAttribute {
    ResourceAttribute { attribute, label }
}

const IN_CONTAINER: &str = "when the process runs in a container";
const IN_POD: &str = "when the process runs in a Kubernetes pod (names from the kubelet's log \
                      directory, `[tracking] pod_logs_dir`)";
const DECLARED: &str = "when the process's OTEL_RESOURCE_ATTRIBUTES says";
const WORKLOAD: &str = "in a pod of a controller of that kind, or when the process's \
                        OTEL_RESOURCE_ATTRIBUTES says";
const FROM_API: &str = "the Kubernetes API server's answer for the process's pod (`[kubernetes] \
                        api`, the pod's controller owner), which replaces every workload key the \
                        process declares; else the process's OTEL_RESOURCE_ATTRIBUTES";
const ONE_PROCESS: &str = "on every application but the shared `_other` one";

/// The resource of each observed application (one per process), for the
/// [`Instrument::per_application`] instruments. Beyond these, a process's
/// own `OTEL_RESOURCE_ATTRIBUTES` entries are kept (at most 32, except the
/// keys the agent sets from the kernel: `process.*`, `host.*`, `container.id`,
/// `k8s.pod.*`, `k8s.namespace.name`, `k8s.container.name`; and the workload
/// keys when the Kubernetes API server named the pod's workload).
pub const RESOURCE_ATTRIBUTES: &[ResourceAttribute] = &[
    resource(
        required(
            attr::SERVICE_NAME,
            "the process's OTEL_SERVICE_NAME, else `service.name` of its OTEL_RESOURCE_ATTRIBUTES, \
             else its Kubernetes workload (`k8s.deployment.name`, `k8s.replicaset.name`, \
             `k8s.statefulset.name`, `k8s.daemonset.name`, `k8s.cronjob.name`, `k8s.job.name`, \
             the first there is), else its container's name, else its executable's name (`unknown_service` if /proc could \
             not be read); `_other` for the processes past `[tracking] max_applications`",
        ),
        true,
    ),
    resource(
        when(
            attr::SERVICE_INSTANCE_ID,
            "from OTEL_RESOURCE_ATTRIBUTES, else `<namespace>.<pod>.<container>` in Kubernetes, \
             else `<host.name>:<pid>`",
            ONE_PROCESS,
        ),
        true,
    ),
    resource(when("service.namespace", "", DECLARED), true),
    resource(when("service.version", "", DECLARED), true),
    resource(when("deployment.environment.name", "", DECLARED), true),
    resource(when(attr::PROCESS_PID, "", ONE_PROCESS), true),
    resource(
        when(
            attr::PROCESS_EXECUTABLE_NAME,
            "the kernel's comm",
            "when /proc could be read (not on `_other`)",
        ),
        true,
    ),
    resource(
        when(
            attr::PROCESS_COMMAND_ARGS,
            "redacted like report command lines",
            "only with `[tracking] resource_command_args = true`",
        ),
        false,
    ),
    resource(required(attr::HOST_NAME, "the agent's host (NODE_NAME in a DaemonSet)"), false),
    resource(when(attr::CONTAINER_ID, "", IN_CONTAINER), true),
    resource(when(attr::K8S_POD_UID, "", IN_POD), true),
    resource(when(attr::K8S_POD_NAME, "", IN_POD), true),
    resource(when(attr::K8S_NAMESPACE_NAME, "", IN_POD), true),
    resource(
        when(
            attr::K8S_CONTAINER_NAME,
            "",
            "in a pod, when the kubelet's `containers` log directory (beside `pod_logs_dir`) names it",
        ),
        true,
    ),
    resource(
        when(
            "k8s.deployment.name",
            FROM_API,
            "in a pod of a Deployment (its ReplicaSet is named `<deployment>-<pod-template-hash>`), or when the process's OTEL_RESOURCE_ATTRIBUTES says",
        ),
        true,
    ),
    resource(
        when(
            "k8s.replicaset.name",
            FROM_API,
            "in a pod of a ReplicaSet (a Deployment's too), or when the process's OTEL_RESOURCE_ATTRIBUTES says",
        ),
        true,
    ),
    resource(when("k8s.statefulset.name", FROM_API, WORKLOAD), true),
    resource(when("k8s.daemonset.name", FROM_API, WORKLOAD), true),
    resource(
        when(
            "k8s.job.name",
            FROM_API,
            "in a pod of a Job (a CronJob's too), or when the process's OTEL_RESOURCE_ATTRIBUTES says",
        ),
        true,
    ),
    resource(
        when(
            "k8s.cronjob.name",
            FROM_API,
            "in a pod of a CronJob's Job (named `<cronjob>-<scheduled minute>`), or when the process's OTEL_RESOURCE_ATTRIBUTES says",
        ),
        true,
    ),
];

/// The agent's own resource, for every other instrument (events and spans
/// go out under their process's resource): `service.name` (poolscope unless OTEL_SERVICE_NAME or
/// OTEL_RESOURCE_ATTRIBUTES say otherwise), `service.version`,
/// `host.name`, and what OTEL_RESOURCE_ATTRIBUTES adds.
pub const AGENT_RESOURCE_ATTRIBUTES: &[Attribute] = &[
    required(
        attr::SERVICE_NAME,
        "poolscope, unless the agent's OTEL_SERVICE_NAME says",
    ),
    required("service.version", "the agent's version"),
    required(
        attr::HOST_NAME,
        "NODE_NAME in a DaemonSet, else the kernel's hostname",
    ),
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
    /// named as [`record_keys`] says.
    pub attributes: &'static [Attribute],
}

const WHEN_KNOWN: &str = "when known";
/// Fields of the agent's own, without a semantic convention: the API's
/// field name under `poolscope.`.
macro_rules! own {
    ($field:literal) => {
        concat!("poolscope.", $field)
    };
}

/// How an API report's field is named in an OTLP log record: by the
/// semantic conventions where they name it, else `poolscope.<field>`
/// ([`record_keys`]). `server` and `local_address` (`address:port`) become
/// two attributes each, the address and the port.
pub const RECORD_KEYS: &[(&str, &str)] = &[
    ("pid", attr::PROCESS_PID),
    ("process", attr::PROCESS_EXECUTABLE_NAME),
    ("cmdline", attr::PROCESS_COMMAND_LINE),
    ("container_id", attr::CONTAINER_ID),
    ("pool", attr::DB_CONNECTION_POOL_NAME),
    ("db_system", attr::DB_SYSTEM_NAME),
    ("server", attr::SERVER_ADDRESS),
    ("local_address", attr::NETWORK_LOCAL_ADDRESS),
    ("holder_tid", attr::THREAD_ID),
    ("holder_thread", attr::THREAD_NAME),
    ("holder_stack", attr::CODE_STACKTRACE),
    ("last_query", attr::DB_QUERY_TEXT),
    ("query", attr::DB_QUERY_TEXT),
    ("namespace", attr::DB_NAMESPACE),
    ("operation", attr::DB_OPERATION_NAME),
    ("error.code", attr::DB_RESPONSE_STATUS_CODE),
    // The conventions' error.type repeats the status code when there is one.
    ("error.code", attr::ERROR_TYPE),
    ("rows", attr::DB_RESPONSE_RETURNED_ROWS),
];

/// The port attribute that goes with an address attribute of [`RECORD_KEYS`].
pub fn port_key(address_key: &str) -> Option<&'static str> {
    match address_key {
        attr::SERVER_ADDRESS => Some(attr::SERVER_PORT),
        attr::NETWORK_LOCAL_ADDRESS => Some(attr::NETWORK_LOCAL_PORT),
        _ => None,
    }
}

/// The log record keys of an API field (nested fields joined with dots):
/// its conventions' names, else `poolscope.<field>`.
pub fn record_keys(field: &str) -> Vec<std::borrow::Cow<'static, str>> {
    let named: Vec<_> = RECORD_KEYS
        .iter()
        .filter(|(f, _)| *f == field)
        .map(|(_, key)| std::borrow::Cow::Borrowed(*key))
        .collect();
    if named.is_empty() {
        vec![std::borrow::Cow::Owned(format!("poolscope.{field}"))]
    } else {
        named
    }
}

/// A leak, slow-holder or slow-acquire report (`GET /api/v1/leaks`).
const REPORT_ATTRIBUTES: &[Attribute] = &[
    required(own!("id"), "the report's number"),
    required(own!("kind"), LEAK_KINDS),
    required(own!("status"), "open, resolved"),
    PID,
    required(attr::PROCESS_EXECUTABLE_NAME, ""),
    when(
        attr::PROCESS_COMMAND_LINE,
        "redacted unless configured otherwise",
        WHEN_KNOWN,
    ),
    when(attr::CONTAINER_ID, "", "when the process runs in a container"),
    when(attr::DB_CONNECTION_POOL_NAME, "", "adapter or inferred pools"),
    when(
        attr::DB_SYSTEM_NAME,
        "postgresql, mysql, redis, or the name an adapter declared (sqlite...)",
        WHEN_KNOWN,
    ),
    when(
        attr::SERVER_ADDRESS,
        "the server's address (what the pool declared, e.g. a database file, for connections \
         without a socket)",
        WHEN_KNOWN,
    ),
    when(attr::SERVER_PORT, "", "TCP servers"),
    when(attr::NETWORK_LOCAL_ADDRESS, "", "TCP connections"),
    when(attr::NETWORK_LOCAL_PORT, "", "TCP connections"),
    when(own!("fd"), "", "reports about one connection with a socket"),
    when(
        own!("generation"),
        "",
        "reports about one connection with a socket",
    ),
    when(attr::THREAD_ID, "", "when the adapter said which thread"),
    when(
        attr::THREAD_NAME,
        "",
        "when the adapter said which thread",
    ),
    when(
        attr::CODE_STACKTRACE,
        "the code that checked the connection out, one frame per line, innermost first (the API's `holder_stack`)",
        "when the adapter sent the holder's stack",
    ),
    when(
        own!("connection_opened_at"),
        "RFC 3339",
        "reports about one connection",
    ),
    when(own!("checked_out_at"), "RFC 3339", "adapter pools"),
    when(own!("held_for_seconds"), "", "adapter pools"),
    when(
        own!("last_activity"),
        "RFC 3339",
        "reports about one connection",
    ),
    when(attr::DB_QUERY_TEXT, "the last statement, sanitized", WHEN_KNOWN),
    when(own!("tx_state"), "idle, in_transaction, failed", WHEN_KNOWN),
    required(own!("evidence"), "why the rule fired, in words"),
    required(own!("reported_at"), "RFC 3339"),
    when(own!("resolved_at"), "RFC 3339", "resolved reports"),
    when(own!("resolution"), "why it resolved", "resolved reports"),
    when(own!("wait_seconds"), "", "slow acquires"),
    when(own!("pool_used"), "", "slow acquires"),
    when(own!("pool_max"), "", "slow acquires, when the pool said"),
    when(own!("pool_pending"), "", "slow acquires"),
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
        required(own!("at"), "RFC 3339"),
        PID,
        required(attr::PROCESS_EXECUTABLE_NAME, ""),
        required(own!("fd"), ""),
        required(own!("generation"), ""),
        required(attr::DB_SYSTEM_NAME, "postgresql, mysql, redis"),
        required(attr::SERVER_ADDRESS, ""),
        when(attr::SERVER_PORT, "", "TCP servers"),
        when(attr::DB_NAMESPACE, "the database", WHEN_KNOWN),
        when(attr::DB_OPERATION_NAME, "SELECT, GET...", "when recognized"),
        when(attr::DB_QUERY_TEXT, "sanitized", "when the parser saw it"),
        required(own!("duration_seconds"), ""),
        when(
            attr::DB_RESPONSE_STATUS_CODE,
            "SQLSTATE, MySQL error number, Redis error prefix",
            "only on errors",
        ),
        when(
            attr::ERROR_TYPE,
            "the same as `db.response.status_code`",
            "only on errors",
        ),
        // The conventions' error.message is deprecated in favour of
        // domain-specific ones, and databases have none yet.
        when(
            own!("error.message"),
            "the server's message",
            "only on errors",
        ),
        when(attr::DB_RESPONSE_RETURNED_ROWS, "", "when the server said"),
        when(own!("tx_state"), "idle, in_transaction, failed", WHEN_KNOWN),
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
        assert_eq!(
            CONNECTION_COUNT.prometheus_name(),
            "db_client_connection_count"
        );
        assert_eq!(
            by_prometheus_name("db_client_connection_max").map(|i| i.name),
            Some("db.client.connection.max")
        );
    }
}
