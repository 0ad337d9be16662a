//! Attributes of the OTLP log records the agent emits for its reports: the
//! report's fields as the API shows them, named by the semantic
//! conventions where they name them (`process.pid`, `db.system.name`,
//! `thread.id`, `code.stacktrace`...) and `poolscope.<field>` otherwise, as
//! `telemetry_catalogue::RECORD_KEYS` says.

use std::net::SocketAddr;

use opentelemetry::logs::AnyValue;
use telemetry_catalogue as catalogue;

/// One report's record attributes.
pub fn record_attributes(report: &impl serde::Serialize) -> Vec<(String, AnyValue)> {
    let Ok(value) = serde_json::to_value(report) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    flatten("", &value, &mut out);
    out
}

fn flatten(field: &str, value: &serde_json::Value, out: &mut Vec<(String, AnyValue)>) {
    use serde_json::Value;
    let any = match value {
        Value::Null => return,
        Value::Object(map) => {
            for (key, v) in map {
                let nested = if field.is_empty() {
                    key.clone()
                } else {
                    format!("{field}.{key}")
                };
                flatten(&nested, v, out);
            }
            return;
        }
        Value::Bool(b) => AnyValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AnyValue::Int(i),
            (None, Some(f)) => AnyValue::Double(f),
            _ => AnyValue::String(n.to_string().into()),
        },
        Value::String(text) => AnyValue::String(text.clone().into()),
        // A list of strings (the holder's stack) is one string, a line
        // each, as `code.stacktrace` is written.
        Value::Array(items) => AnyValue::String(
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n")
                .into(),
        ),
    };
    for key in catalogue::record_keys(field) {
        match (catalogue::port_key(&key), &any) {
            // `address:port` is two attributes; anything else (a database
            // file, a Unix socket's path) is the address alone.
            (Some(port_key), AnyValue::String(text)) => match text.as_str().parse::<SocketAddr>() {
                Ok(address) => {
                    out.push((
                        key.into_owned(),
                        AnyValue::String(address.ip().to_string().into()),
                    ));
                    out.push((
                        port_key.to_string(),
                        AnyValue::Int(i64::from(address.port())),
                    ));
                }
                Err(_) => out.push((key.into_owned(), any.clone())),
            },
            _ => out.push((key.into_owned(), any.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::{
        detect::LeakKind,
        protocol::{DbError, DbSystem, SystemName, TxState},
        reports::{LeakReport, ReportStatus, SlowQuery},
    };
    use telemetry_catalogue::{
        Event, EVENT_ACQUIRE_SLOW, EVENT_LEAK_OPENED, EVENT_LEAK_RESOLVED, EVENT_QUERY_SLOW,
    };

    fn declared(event: &Event) -> BTreeSet<String> {
        event.attributes.iter().map(|a| a.key.to_string()).collect()
    }

    fn by_key(attributes: Vec<(String, AnyValue)>) -> BTreeMap<String, AnyValue> {
        let mut map = BTreeMap::new();
        for (key, value) in attributes {
            assert!(map.insert(key.clone(), value).is_none(), "{key} twice");
        }
        map
    }

    fn text() -> Option<String> {
        Some("x".to_string())
    }

    fn full_report() -> LeakReport {
        LeakReport {
            id: 1,
            kind: LeakKind::Leaked,
            status: ReportStatus::Resolved,
            pid: 2,
            process: "app".into(),
            cmdline: text(),
            container_id: text(),
            pool: text(),
            db_system: Some(SystemName::Read(DbSystem::Postgresql)),
            server: Some("10.0.0.5:5432".into()),
            local_address: Some("[::1]:40000".into()),
            fd: Some(3),
            generation: Some(4),
            holder_tid: Some(5),
            holder_thread: text(),
            holder_stack: Some(vec!["leak (app.py:3)".into(), "main (app.py:9)".into()]),
            connection_opened_at: text(),
            checked_out_at: text(),
            held_for_seconds: Some(1.5),
            last_activity: text(),
            last_query: text(),
            tx_state: Some(TxState::InTransaction),
            evidence: "e".into(),
            reported_at: "t".into(),
            resolved_at: text(),
            resolution: text(),
            wait_seconds: Some(0.5),
            pool_used: Some(1),
            pool_max: Some(2),
            pool_pending: Some(3),
        }
    }

    /// Every attribute a log record can carry is declared in the catalogue
    /// (which docs/metrics.md is written from), and every declared one
    /// exists: a field added to a report fails here until it is named.
    #[test]
    fn records_carry_the_attributes_the_catalogue_declares() {
        let keys: BTreeSet<String> = by_key(record_attributes(&full_report()))
            .into_keys()
            .collect();
        for event in [
            &EVENT_LEAK_OPENED,
            &EVENT_LEAK_RESOLVED,
            &EVENT_ACQUIRE_SLOW,
        ] {
            assert_eq!(keys, declared(event), "{}", event.name);
        }
        let slow = SlowQuery {
            at: "t".into(),
            pid: 2,
            process: "app".into(),
            fd: 3,
            generation: 4,
            db_system: "postgresql".into(),
            server: "127.0.0.1:5432".into(),
            namespace: text(),
            operation: text(),
            query: text(),
            duration_seconds: 1.0,
            error: Some(DbError {
                code: "42601".into(),
                message: "m".into(),
            }),
            rows: Some(1),
            tx_state: Some(TxState::Idle),
        };
        let attributes = by_key(record_attributes(&slow));
        let keys: BTreeSet<String> = attributes.keys().cloned().collect();
        assert_eq!(keys, declared(&EVENT_QUERY_SLOW));
        assert_eq!(
            attributes.get("db.response.status_code"),
            Some(&AnyValue::String("42601".into()))
        );
        assert_eq!(
            attributes.get("error.type"),
            attributes.get("db.response.status_code")
        );
    }

    #[test]
    fn records_use_the_conventions_names_and_split_addresses() {
        let attributes = by_key(record_attributes(&full_report()));
        assert_eq!(attributes.get("process.pid"), Some(&AnyValue::Int(2)));
        assert_eq!(attributes.get("thread.id"), Some(&AnyValue::Int(5)));
        assert_eq!(
            attributes.get("db.system.name"),
            Some(&AnyValue::String("postgresql".into()))
        );
        assert_eq!(
            attributes.get("server.address"),
            Some(&AnyValue::String("10.0.0.5".into()))
        );
        assert_eq!(attributes.get("server.port"), Some(&AnyValue::Int(5432)));
        assert_eq!(
            attributes.get("network.local.address"),
            Some(&AnyValue::String("::1".into()))
        );
        assert_eq!(
            attributes.get("network.local.port"),
            Some(&AnyValue::Int(40000))
        );
        assert_eq!(
            attributes.get("code.stacktrace"),
            Some(&AnyValue::String("leak (app.py:3)\nmain (app.py:9)".into()))
        );
        assert_eq!(attributes.get("poolscope.fd"), Some(&AnyValue::Int(3)));
        assert!(!attributes.contains_key("pid"));
        // A server without a port (a database file) is its address alone.
        let mut report = full_report();
        report.server = Some("/var/lib/app/app.db".into());
        let attributes = by_key(record_attributes(&report));
        assert_eq!(
            attributes.get("server.address"),
            Some(&AnyValue::String("/var/lib/app/app.db".into()))
        );
        assert!(!attributes.contains_key("server.port"));
    }
}
