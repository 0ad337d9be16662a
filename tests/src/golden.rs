//! The golden shapes of adapter messages (adapters/protocol/golden/): what
//! the valid examples of each kind have, so that an adapter's test can
//! refuse a message with a key, or a JSON type, no example has, or without
//! a key every example has. The Python and Node adapters' own tests do the
//! same in their languages; this one serves the adapters tested from Rust.

use std::collections::{BTreeMap, BTreeSet};

use crate::{workspace_root, Value};

/// What the examples of one kind (or the items of one of their lists) have.
#[derive(Debug, Default)]
pub struct Shape {
    types: BTreeMap<String, BTreeSet<&'static str>>,
    required: BTreeSet<String>,
    items: BTreeMap<String, Shape>,
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl Shape {
    fn of(examples: &[&serde_json::Map<String, Value>]) -> Shape {
        let mut shape = Shape::default();
        let mut lists: BTreeMap<String, Vec<&serde_json::Map<String, Value>>> = BTreeMap::new();
        for example in examples {
            for (key, value) in example.iter() {
                shape
                    .types
                    .entry(key.clone())
                    .or_default()
                    .insert(json_type(value));
                if let Value::Array(items) = value {
                    let objects = items.iter().filter_map(Value::as_object);
                    lists.entry(key.clone()).or_default().extend(objects);
                }
            }
        }
        if let Some((first, rest)) = examples.split_first() {
            shape.required = first
                .keys()
                .filter(|k| rest.iter().all(|e| e.contains_key(*k)))
                .cloned()
                .collect();
        }
        shape.items = lists
            .into_iter()
            .filter(|(_, items)| !items.is_empty())
            .map(|(key, items)| (key, Shape::of(&items)))
            .collect();
        shape
    }

    /// Why `message` does not have this shape, if it does not.
    fn mismatch(&self, message: &serde_json::Map<String, Value>, at: &str) -> Option<String> {
        let missing: Vec<_> = self
            .required
            .iter()
            .filter(|k| !message.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            return Some(format!("{at} lacks {missing:?}"));
        }
        for (key, value) in message {
            let Some(types) = self.types.get(key) else {
                return Some(format!("{at} has `{key}`, which no golden example has"));
            };
            if !types.contains(json_type(value)) {
                return Some(format!(
                    "{at}: `{key}` is a {}, golden examples give {types:?}",
                    json_type(value)
                ));
            }
            if let (Some(items), Value::Array(values)) = (self.items.get(key), value) {
                for item in values {
                    let item = item.as_object()?;
                    if let Some(why) = items.mismatch(item, &format!("{at}.{key}[]")) {
                        return Some(why);
                    }
                }
            }
        }
        None
    }
}

/// The golden shapes by kind, from the valid examples of every file.
pub fn golden_shapes() -> BTreeMap<String, Shape> {
    let dir = workspace_root().join("adapters/protocol/golden");
    let mut by_kind: BTreeMap<String, Vec<serde_json::Map<String, Value>>> = BTreeMap::new();
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let file: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        for example in file["valid"].as_array().into_iter().flatten() {
            let example = example.as_object().expect("golden examples are objects");
            let kind = example["kind"]
                .as_str()
                .expect("golden examples have a kind");
            by_kind
                .entry(kind.to_string())
                .or_default()
                .push(example.clone());
        }
    }
    by_kind
        .into_iter()
        .map(|(kind, examples)| {
            let refs: Vec<_> = examples.iter().collect();
            (kind, Shape::of(&refs))
        })
        .collect()
}

/// Asserts that every line is a message with the golden shape of its kind;
/// returns the kinds seen.
pub fn assert_golden_shapes(lines: &[String]) -> BTreeSet<String> {
    let shapes = golden_shapes();
    let mut kinds = BTreeSet::new();
    for line in lines {
        let message: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"));
        let message = message
            .as_object()
            .unwrap_or_else(|| panic!("{line} is not an object"));
        let kind = message["kind"].as_str().unwrap_or_default();
        let shape = shapes
            .get(kind)
            .unwrap_or_else(|| panic!("no golden file for the kind of {line}"));
        if let Some(why) = shape.mismatch(message, "message") {
            panic!("{why}: {line}");
        }
        kinds.insert(kind.to_string());
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_examples_have_their_own_shape_and_strangers_do_not() {
        let shapes = golden_shapes();
        assert!(shapes.len() >= 7, "{:?}", shapes.keys());
        let good =
            r#"{"v":1,"kind":"release","pool":"p","mono_ns":1,"local_address":"127.0.0.1:1"}"#;
        assert_golden_shapes(&[good.to_string()]);
        for bad in [
            r#"{"v":1,"kind":"release","pool":"p","mono_ns":1,"local_address":"127.0.0.1:1","extra":1}"#,
            r#"{"v":1,"kind":"release","pool":"p","mono_ns":"1","local_address":"127.0.0.1:1"}"#,
            r#"{"v":1,"kind":"release","mono_ns":1,"local_address":"127.0.0.1:1"}"#,
        ] {
            let refused = std::panic::catch_unwind(|| assert_golden_shapes(&[bad.to_string()]));
            assert!(refused.is_err(), "{bad} passed");
        }
    }
}
