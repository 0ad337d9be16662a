use std::{collections::BTreeSet, path::PathBuf};

use serde_json::{json, Value};

use super::*;

fn ok(text: &str) -> Message {
    decode(text.as_bytes()).expect("decodes")
}

fn err(text: &str) -> Error {
    decode(text.as_bytes()).expect_err("rejected")
}

fn conn(local: Option<&str>, fd: Option<i32>) -> ConnRef {
    ConnRef {
        local_address: local.map(|a| a.parse().expect("addr")),
        fd,
        conn: None,
    }
}

#[test]
fn decodes_every_kind() {
    let m = ok(
        r#"{"v":1,"kind":"pool","pool":"orders","db_system":"postgresql","server_address":"127.0.0.1","server_port":5432,"namespace":"shop","max":15,"min_idle":5,"library":"sqlalchemy"}"#,
    );
    assert_eq!(m.pool, "orders");
    assert_eq!(
        m.body,
        Body::Pool(PoolInfo {
            db_system: Some(DbSystem::Postgresql),
            server_address: Some("127.0.0.1".into()),
            server_port: Some(5432),
            namespace: Some("shop".into()),
            max: Some(15),
            min_idle: Some(5),
            idle_max: None,
            library: Some("sqlalchemy".into()),
        })
    );
    let m = ok(r#"{"v":1,"kind":"acquire_start","pool":"p","request":7,"tid":99,"mono_ns":123}"#);
    assert_eq!(
        m.body,
        Body::AcquireStart {
            request: 7,
            tid: Some(99)
        }
    );
    assert_eq!(m.mono_ns, Some(123));
    let m = ok(
        r#"{"v":1,"kind":"acquire_end","pool":"p","request":7,"result":"ok","local_address":"127.0.0.1:40000","fd":9}"#,
    );
    assert_eq!(
        m.body,
        Body::AcquireEnd {
            request: 7,
            result: AcquireResult::Ok(conn(Some("127.0.0.1:40000"), Some(9))),
            tid: None,
            wait_ns: None,
        }
    );
    let m = ok(r#"{"v":1,"kind":"acquire_end","pool":"p","request":8,"result":"timeout"}"#);
    assert_eq!(
        m.body,
        Body::AcquireEnd {
            request: 8,
            result: AcquireResult::Timeout,
            tid: None,
            wait_ns: None,
        }
    );
    assert_eq!(
        ok(r#"{"v":1,"kind":"release","pool":"p","fd":3}"#).body,
        Body::Release(conn(None, Some(3)))
    );
    assert_eq!(
        ok(r#"{"v":1,"kind":"connection_created","pool":"p","fd":3}"#).body,
        Body::ConnectionCreated {
            conn: conn(None, Some(3)),
            tid: None
        }
    );
    assert_eq!(
        ok(r#"{"v":1,"kind":"connection_created","pool":"p","conn":4,"tid":77}"#).body,
        Body::ConnectionCreated {
            conn: ConnRef {
                conn: Some(4),
                ..ConnRef::default()
            },
            tid: Some(77)
        }
    );
    assert_eq!(
        ok(r#"{"v":1,"kind":"connection_closed","pool":"p","local_address":"[::1]:5000"}"#).body,
        Body::ConnectionClosed(conn(Some("[::1]:5000"), None))
    );
    // mariadb is its own value here; the agent reads it as mysql.
    assert_eq!(
        ok(r#"{"v":1,"kind":"pool","pool":"p","db_system":"mariadb"}"#).body,
        Body::Pool(PoolInfo {
            db_system: Some(DbSystem::Mariadb),
            ..PoolInfo::default()
        })
    );
}

#[test]
fn decodes_checkout_state() {
    let m = ok(
        r#"{"v":1,"kind":"checkout_state","pool":"orders","mono_ns":900,"checkouts":[{"local_address":"10.0.0.7:51234","fd":12,"mono_ns":500,"tid":81233},{"fd":13,"mono_ns":600},{"local_address":"[::1]:5000","mono_ns":700,"later":true}]}"#,
    );
    assert_eq!(m.mono_ns, Some(900));
    assert_eq!(
        m.body,
        Body::CheckoutState {
            checkouts: vec![
                Checkout {
                    conn: conn(Some("10.0.0.7:51234"), Some(12)),
                    mono_ns: 500,
                    tid: Some(81233)
                },
                Checkout {
                    conn: conn(None, Some(13)),
                    mono_ns: 600,
                    tid: None
                },
                Checkout {
                    conn: conn(Some("[::1]:5000"), None),
                    mono_ns: 700,
                    tid: None
                },
            ]
        }
    );
    // An empty list is a pool with nothing out.
    assert_eq!(
        ok(r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[]}"#).body,
        Body::CheckoutState { checkouts: vec![] }
    );
}

#[test]
fn rejects_bad_checkout_state() {
    for bad in [
        r#"{"v":1,"kind":"checkout_state","pool":"p"}"#,
        r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":{}}"#,
        r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{"fd":1}]}"#,
        r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{"mono_ns":1}]}"#,
        r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{"fd":-1,"mono_ns":1}]}"#,
        r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{"fd":1,"mono_ns":-1}]}"#,
        r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[7]}"#,
    ] {
        assert_eq!(err(bad).reason(), "invalid", "{bad}");
    }
    let entry = r#"{"fd":1,"mono_ns":1}"#;
    let list = |n: usize| vec![entry; n].join(",");
    let at_most = format!(
        r#"{{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{}]}}"#,
        list(MAX_CHECKOUTS_PER_MESSAGE)
    );
    assert!(
        matches!(ok(&at_most).body, Body::CheckoutState { checkouts } if checkouts.len() == MAX_CHECKOUTS_PER_MESSAGE)
    );
    let too_many = format!(
        r#"{{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{}]}}"#,
        list(MAX_CHECKOUTS_PER_MESSAGE + 1)
    );
    assert_eq!(err(&too_many).reason(), "invalid");
}

#[test]
fn ignores_unknown_fields_for_forward_compatibility() {
    let m = ok(r#"{"v":1,"kind":"release","pool":"p","fd":3,"future":{"x":1}}"#);
    assert!(matches!(m.body, Body::Release(_)));
}

#[test]
fn rejects_bad_messages_with_a_reason() {
    assert_eq!(err("not json").reason(), "malformed");
    assert_eq!(
        err(r#"{"v":2,"kind":"release","pool":"p","fd":1}"#).reason(),
        "unknown_version"
    );
    assert_eq!(
        err(r#"{"v":1,"kind":"explode","pool":"p"}"#).reason(),
        "unknown_kind"
    );
    assert_eq!(
        err(r#"{"v":1,"kind":"release","pool":"p"}"#).reason(),
        "invalid"
    );
    assert_eq!(
        err(r#"{"v":1,"kind":"release","pool":"","fd":1}"#).reason(),
        "invalid"
    );
    assert_eq!(
        err(r#"{"v":1,"kind":"release","pool":"p","fd":-1}"#).reason(),
        "invalid"
    );
    assert_eq!(
        err(r#"{"v":1,"kind":"release","pool":"p","local_address":"nope"}"#).reason(),
        "invalid"
    );
    assert_eq!(
        err(r#"{"v":1,"kind":"acquire_end","pool":"p","request":1,"result":"maybe"}"#).reason(),
        "invalid"
    );
    let big = format!(
        r#"{{"v":1,"kind":"release","pool":"{}","fd":1}}"#,
        "x".repeat(5000)
    );
    assert_eq!(err(&big).reason(), "too_large");
    assert_eq!(
        decode(&[0xff, 0xfe, 0x00]).expect_err("binary").reason(),
        "malformed"
    );
}

/// What the one-struct decoder before this crate did, kept: a failed
/// acquire names no connection, so what it says of one is not read; the
/// envelope is checked before the kind; an unknown kind is told by its tag
/// alone, even when a field the body of a known kind would refuse is there.
#[test]
fn refusals_keep_their_order() {
    assert_eq!(
        ok(r#"{"v":1,"kind":"acquire_end","pool":"p","request":1,"result":"timeout","local_address":"nope","fd":-1}"#).body,
        Body::AcquireEnd {
            request: 1,
            result: AcquireResult::Timeout,
            tid: None,
            wait_ns: None,
        }
    );
    assert_eq!(
        err(r#"{"v":1,"kind":"explode","pool":""}"#).reason(),
        "invalid"
    );
    assert_eq!(err(r#"{"v":1,"kind":"explode"}"#).reason(), "invalid");
    assert_eq!(
        err(r#"{"v":1,"kind":"explode","pool":"p","pid":-1}"#).reason(),
        "invalid"
    );
    assert_eq!(
        err(r#"{"v":1,"kind":"explode","pool":"p","fd":-1,"result":"maybe"}"#).reason(),
        "unknown_kind"
    );
    // A kind whose name is also a result or a db_system is still unknown,
    // and a known kind with an unknown result is invalid, not unknown.
    assert_eq!(
        err(r#"{"v":1,"kind":"ok","pool":"p"}"#).reason(),
        "unknown_kind"
    );
    assert_eq!(
        err(r#"{"v":1,"kind":"acquire_end","pool":"p","request":1,"result":"acquire_end"}"#)
            .reason(),
        "invalid"
    );
    let long = format!(r#"{{"v":1,"kind":"{}","pool":"p"}}"#, "k".repeat(100));
    assert_eq!(err(&long), Error::UnknownKind("k".repeat(32)));
}

#[test]
fn encoding_refuses_what_decoding_refuses() {
    let release = |pool: &str, conn: ConnRef| Message::new(pool, Body::Release(conn)).encode();
    assert_eq!(
        release("p", ConnRef::default()).map_err(|e| e.reason()),
        Err("invalid")
    );
    assert_eq!(
        release("", conn(None, Some(1))).map_err(|e| e.reason()),
        Err("invalid")
    );
    let bytes = release("p", conn(None, Some(1))).expect("encodes");
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes).expect("JSON"),
        json!({"v": 1, "kind": "release", "pool": "p", "fd": 1})
    );
    // 64 entries of the longest kind do not fit in a datagram.
    let entry = Checkout {
        conn: conn(
            Some("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            Some(i32::MAX),
        ),
        mono_ns: u64::MAX,
        tid: Some(u32::MAX),
    };
    let full = Message::new(
        "p",
        Body::CheckoutState {
            checkouts: vec![entry; MAX_CHECKOUTS_PER_MESSAGE],
        },
    );
    assert_eq!(full.encode().map_err(|e| e.reason()), Err("too_large"));
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden")
}

/// Every golden file: (file stem, its JSON).
fn golden_files() -> Vec<(String, Value)> {
    let mut files: Vec<(String, Value)> = std::fs::read_dir(golden_dir())
        .expect("golden/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable");
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()));
            let stem = p.file_stem().expect("stem").to_string_lossy().into_owned();
            (stem, json)
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

fn list<'a>(file: &'a Value, key: &str, name: &str) -> &'a Vec<Value> {
    file[key]
        .as_array()
        .unwrap_or_else(|| panic!("{name}.json has no `{key}` list"))
}

#[test]
fn golden_messages_decode_and_encode_back_the_same() {
    let mut kinds = BTreeSet::new();
    for (name, file) in golden_files() {
        for sent in list(&file, "valid", &name) {
            let bytes = serde_json::to_vec(sent).expect("JSON");
            let message = decode(&bytes).unwrap_or_else(|e| panic!("{name}.json: {sent}: {e}"));
            assert_eq!(message.body.kind(), name, "{sent} is in the wrong file");
            let again: Value =
                serde_json::from_slice(&message.encode().expect("encodes")).expect("JSON");
            assert_eq!(&again, sent, "{name}.json: encoded back differently");
            kinds.insert(name.clone());
        }
    }
    // Every kind has its file: one example of each (enough to name the
    // kind) must be there.
    let examples = [
        Body::Pool(PoolInfo::default()),
        Body::ConnectionCreated {
            conn: ConnRef::default(),
            tid: None,
        },
        Body::AcquireStart {
            request: 0,
            tid: None,
        },
        Body::AcquireEnd {
            request: 0,
            result: AcquireResult::Error,
            tid: None,
            wait_ns: None,
        },
        Body::Release(ConnRef::default()),
        Body::Checkout {
            request: 0,
            conn: ConnRef::default(),
            tid: None,
            wait_ns: None,
            use_ns: 0,
        },
        Body::Checkouts {
            conn: ConnRef::default(),
            tid: None,
            waits_ns: vec![],
            uses_ns: vec![],
        },
        Body::ConnectionClosed(ConnRef::default()),
        Body::CheckoutState { checkouts: vec![] },
        Body::HolderStack {
            conn: ConnRef::default(),
            since_ns: 0,
            stack: vec![],
        },
    ];
    // A new variant fails to compile in Body::kind until it is named
    // there; add it to this list and write its golden file.
    let named: BTreeSet<String> = examples.iter().map(|b| b.kind().to_string()).collect();
    assert_eq!(kinds, named, "golden files with examples, and kinds");
    assert!(named.iter().all(|k| is_known_kind(k)));
}

#[test]
fn golden_refusals_have_their_reason() {
    let mut seen = BTreeSet::new();
    for (name, file) in golden_files() {
        for case in list(&file, "invalid", &name) {
            let bytes = match (&case["message"], &case["text"]) {
                (Value::Null, Value::String(text)) => text.as_bytes().to_vec(),
                (message, Value::Null) => serde_json::to_vec(message).expect("JSON"),
                _ => panic!("{name}.json: {case} needs one of message or text"),
            };
            let want = case["reason"].as_str().expect("reason");
            let got = decode(&bytes).map(|_| ()).map_err(|e| e.reason());
            assert_eq!(got, Err(want), "{name}.json: {case}");
            seen.insert(want.to_string());
        }
    }
    for reason in ["malformed", "unknown_version", "unknown_kind", "invalid"] {
        assert!(seen.contains(reason), "no golden refusal for {reason}");
    }
}

/// Golden messages, and each bent every way a field can be: left out,
/// given another JSON type or an odd value, written twice; and a few
/// envelopes that are not messages.
fn bent_messages() -> Vec<Vec<u8>> {
    let odd = [
        json!(null),
        json!(true),
        json!(-1),
        json!(1.0),
        json!(u64::MAX),
        json!("x"),
        json!("ok"),
        json!(""),
        json!("127.0.0.1:1"),
        json!([1]),
        json!({"a": 1}),
    ];
    let mut out: Vec<Vec<u8>> = [
        "[1,\"release\",\"p\"]",
        " {\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":1} ",
        "{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":1,\"fd\":2}",
        "{\"v\":1,\"kind\":\"rel\\u0065ase\",\"pool\":\"p\",\"fd\":1}",
        "{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":1}x",
        "{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":01}",
        "{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":1e0}",
        "{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":-0}",
        "{\"v\":1,\"kind\":\"release\",\"pool\":\"p\\u0041\",\"fd\":1}",
        "{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":1,\"x\":{\"y\":[1]}}",
        "{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":1,\"x\":-2.5e3}",
        "{ \"v\" : 1 ,\n\t\"kind\":\"release\" , \"pool\":\"p\",\"fd\" :1\r}",
        "{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":1,}",
        "{,\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":1}",
        "{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":1",
        "{}",
        "",
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect();
    // Invalid UTF-8 in the pool name, and in a field no path reads.
    out.push(b"{\"v\":1,\"kind\":\"release\",\"pool\":\"p\xff\",\"fd\":1}".to_vec());
    out.push(b"{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":1,\"x\":\"\xc3\"}".to_vec());
    for (name, file) in golden_files() {
        let messages = list(&file, "valid", &name)
            .iter()
            .chain(list(&file, "invalid", &name).iter().map(|c| &c["message"]))
            .filter(|m| m.is_object());
        for message in messages {
            let fields = message.as_object().expect("object");
            out.push(serde_json::to_vec(message).expect("JSON"));
            // Its own fields, and those of the frequent kinds it lacks.
            let mut keys: BTreeSet<String> = fields.keys().cloned().collect();
            for extra in [
                "request",
                "result",
                "wait_ns",
                "use_ns",
                "tid",
                "fd",
                "local_address",
            ] {
                keys.insert(extra.to_string());
            }
            for key in keys {
                let mut without = fields.clone();
                without.remove(&key);
                out.push(serde_json::to_vec(&without).expect("JSON"));
                for value in &odd {
                    let mut bent = fields.clone();
                    bent.insert(key.clone(), value.clone());
                    out.push(serde_json::to_vec(&bent).expect("JSON"));
                }
                // Written twice, the first time odd.
                let text = serde_json::to_string(message).expect("JSON");
                let twice = format!(
                    "{{{}:null,{}",
                    serde_json::to_string(&key).expect("JSON"),
                    &text[1..]
                );
                out.push(twice.into_bytes());
            }
        }
    }
    out
}

#[test]
fn the_fast_path_reads_what_the_full_reading_reads() {
    let mut taken = 0;
    let all = bent_messages();
    for bytes in &all {
        let text = String::from_utf8_lossy(bytes);
        match frequent::decode(bytes) {
            // Whatever the fast path takes, the full reading takes the same.
            Some(fast) => {
                taken += 1;
                assert_eq!(decode_fully(bytes).as_ref(), Ok(&fast), "{text}");
            }
            // What it leaves, decode still reads in full.
            None => assert_eq!(decode(bytes), decode_fully(bytes), "{text}"),
        }
    }
    // The golden messages of the frequent kinds all take the fast path.
    for (name, file) in golden_files() {
        if ["pool", "checkout_state", "holder_stack", "any-kind"].contains(&name.as_str()) {
            continue;
        }
        for sent in list(&file, "valid", &name) {
            let bytes = serde_json::to_vec(sent).expect("JSON");
            assert!(frequent::decode(&bytes).is_some(), "{name}.json: {sent}");
        }
    }
    assert!(taken > 100 && taken < all.len(), "{taken} of {}", all.len());
}

#[test]
fn the_fast_path_agrees_on_randomly_damaged_messages() {
    // Every byte of every frequent golden message replaced, dropped or
    // doubled, by a fixed pseudo-random walk: whatever the fast path takes,
    // the full reading takes the same.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet = b"{}[]\":,0123456789-.eE \\tfrnulx\xff";
    let mut taken = 0;
    for (name, file) in golden_files() {
        for sent in list(&file, "valid", &name) {
            let original = serde_json::to_vec(sent).expect("JSON");
            for at in 0..original.len() {
                for _ in 0..4 {
                    let mut bytes = original.clone();
                    match random() % 3 {
                        0 => bytes[at] = alphabet[(random() % alphabet.len() as u64) as usize],
                        1 => {
                            bytes.remove(at);
                        }
                        _ => bytes.insert(at, bytes[at]),
                    }
                    if let Some(fast) = frequent::decode(&bytes) {
                        taken += 1;
                        assert_eq!(
                            decode_fully(&bytes).as_ref(),
                            Ok(&fast),
                            "{}",
                            String::from_utf8_lossy(&bytes)
                        );
                    }
                }
            }
        }
    }
    assert!(taken > 100, "{taken}");
}
