//! The tests' one YAML reader: the rules files in `dashboards/`, the
//! manifests in `deploy/kubernetes` and the YAML examples of the docs, read
//! with serde_norway (YAML 1.2) into JSON values, so that tests index them
//! as they index the JSON the agent serves.
//!
//! Scalars keep their YAML types: `5` is a number, `true` a boolean, `"5"`
//! and `5m` strings; compare them with values of those types. The tools the
//! project's YAML is written for read YAML 1.1 (PyYAML, so
//! kubernetes-validate; Kubernetes' own decoder), where a plain `yes`, `on`
//! or `n` is a boolean and a plain `0644` or `1:30` an integer, while YAML
//! 1.2 reads strings there. Such a plain scalar is refused with its line,
//! so a value read here is the value those tools read; quote it to mean the
//! string, or write `true`, `false` or a plain integer. Also refused: YAML
//! tags of our own, merge keys (`<<`), which YAML 1.2 does not define, and
//! keys given twice.

use std::{fmt, path::Path};

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The one document of `text`.
pub fn parse(text: &str) -> Result<Value, String> {
    let mut docs = documents(text)?;
    match docs.len() {
        0 => Ok(Value::Null),
        1 => Ok(docs.remove(0)),
        n => Err(format!("{n} documents where one was expected")),
    }
}

/// Every document of `text` (`---` separated), empty ones left out, as
/// PyYAML's `safe_load_all` callers here always did.
pub fn documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = Node { text }.deserialize(doc).map_err(|e| e.to_string())?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The one document of the file at `path`; panics naming the file.
pub fn read(path: &Path) -> Value {
    parse(&read_text(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every (non-empty) document of the file at `path`; panics naming the file.
pub fn read_documents(path: &Path) -> Vec<Value> {
    documents(&read_text(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// What YAML 1.1 reads a plain scalar as, where YAML 1.2 (this reader) reads
/// a string: a boolean (`y`, `Yes`, `ON`, `off`, ...) or an integer (octal
/// `0644`, sexagesimal `1:30`, `1_000`, binary `0b1`).
fn yaml11_reading(plain: &str) -> Option<&'static str> {
    const BOOLS: &[&str] = &["y", "yes", "n", "no", "on", "off"];
    let lower = plain.to_ascii_lowercase();
    let same_case = plain == lower
        || plain == plain.to_ascii_uppercase()
        || plain.get(1..).is_some_and(|rest| rest == &lower[1..]);
    if BOOLS.contains(&lower.as_str()) && same_case {
        return Some("a boolean");
    }
    let digits = plain.strip_prefix(['-', '+']).unwrap_or(plain);
    let int = if let Some(bin) = digits.strip_prefix("0b") {
        !bin.is_empty() && bin.chars().all(|c| matches!(c, '0' | '1' | '_'))
    } else if let Some(hex) = digits.strip_prefix("0x") {
        !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit() || c == '_')
    } else if digits.starts_with('0') && digits.len() > 1 {
        digits.chars().all(|c| matches!(c, '0'..='7' | '_'))
    } else {
        let mut parts = digits.split(':');
        parts.next().is_some_and(|first| {
            first.starts_with(|c: char| c.is_ascii_digit())
                && (!first.starts_with('0') || first == "0")
                && first.chars().all(|c| c.is_ascii_digit() || c == '_')
        }) && parts.all(|p| {
            // `[0-5]?[0-9]`
            let b = p.as_bytes();
            b.iter().all(u8::is_ascii_digit) && (b.len() == 1 || (b.len() == 2 && b[0] <= b'5'))
        })
    };
    int.then_some("an integer")
}

/// Builds a JSON value from one YAML node. `text` is the whole input: a
/// plain scalar arrives as a slice of it (serde_norway borrows it), a quoted
/// one as the slice inside its quotes, which tells the two apart.
#[derive(Clone, Copy)]
struct Node<'t> {
    text: &'t str,
}

impl<'t> Node<'t> {
    /// The plain scalar's line, when `s` is one (a slice of the input not
    /// preceded by a quote).
    fn plain_line(&self, s: &str) -> Option<usize> {
        let start = (s.as_ptr() as usize).checked_sub(self.text.as_ptr() as usize)?;
        if start + s.len() > self.text.len() {
            return None;
        }
        let before = self.text.get(..start)?;
        if before.ends_with(['"', '\'']) {
            return None;
        }
        Some(before.matches('\n').count() + 1)
    }
}

impl<'de> DeserializeSeed<'de> for Node<'de> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'de> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("{v} has no JSON form")))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Value, E> {
        if let (Some(line), Some(reading)) = (self.plain_line(v), yaml11_reading(v)) {
            return Err(E::custom(format!(
                "line {line}: plain `{v}` is a string in YAML 1.2 but {reading} in YAML 1.1 \
                 (PyYAML, Kubernetes): quote it, or write the value unambiguously"
            )));
        }
        Ok(Value::String(v.to_string()))
    }

    /// Quoted scalars with escapes, block scalars and plain scalars over
    /// several lines: none of them a YAML 1.1 boolean or integer.
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key_seed(self)? {
            let key = match key {
                Value::String(s) if s == "<<" => {
                    return Err(de::Error::custom("merge keys (`<<`) are not YAML 1.2"))
                }
                Value::String(s) => s,
                // As JSON (and PyYAML's json.dumps) writes them.
                Value::Number(n) => n.to_string(),
                other => return Err(de::Error::custom(format!("a mapping key {other}"))),
            };
            let value = map.next_value_seed(self)?;
            if object.insert(key.clone(), value).is_some() {
                return Err(de::Error::custom(format!("key `{key}` given twice")));
            }
        }
        Ok(Value::Object(object))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        Err(de::Error::custom("YAML tags are not read here"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_keep_their_types() {
        let v = parse(
            "num: 5\nf: 0.5\nneg: -3\nt: true\nF: False\nnothing: ~\ns: \"5\"\nd: 5m\nq: 'yes'\nqq: \"on\"\n\
             hex: 0x1f\nempty:\nlist: [1, a, false]\n200: ok\n",
        )
        .expect("parses");
        assert_eq!(
            v,
            json!({
                "num": 5, "f": 0.5, "neg": -3, "t": true, "F": false, "nothing": null, "s": "5",
                "d": "5m", "q": "yes", "qq": "on", "hex": 31, "empty": null,
                "list": [1, "a", false], "200": "ok"
            })
        );
        assert_ne!(v["num"], json!("5"));
    }

    #[test]
    fn plain_scalars_yaml_1_1_reads_otherwise_are_refused() {
        for doc in [
            "a: yes\n",
            "a: No\n",
            "a: OFF\n",
            "a: y\n",
            "on: x\n",
            "a: [1, on]\n",
            "a:\n  - b\n  - n\n",
            "mode: 0644\n",
            "t: 1:30\n",
            "big: 1_000\n",
            "b: 0b1_01\n",
        ] {
            let e = parse(doc).expect_err(doc);
            assert!(e.contains("YAML 1.1"), "{doc}: {e}");
        }
        let e = parse("a: 1\nb:\n  c: yes\n").expect_err("nested");
        assert!(e.contains("line 3"), "{e}");
        // Quoted, or not a YAML 1.1 boolean or integer: strings.
        let v = parse("a: \"yes\"\nb: 'off'\nc: yess\nd: \"0644\"\ne: 12:30:00x\nf: \"y\\n\"\n")
            .expect("parses");
        assert_eq!(v["a"], "yes");
        assert_eq!(v["b"], "off");
        assert_eq!(v["c"], "yess");
        assert_eq!(v["d"], "0644");
        assert_eq!(v["e"], "12:30:00x");
        assert_eq!(v["f"], "y\n");
        // Both read these alike.
        assert_eq!(
            parse("a: 0\nb: 10\n").expect("parses"),
            json!({"a": 0, "b": 10})
        );
    }

    #[test]
    fn documents_tags_merges_and_duplicates() {
        let docs = documents("---\na: 1\n---\n---\nb: [x]\n").expect("parses");
        assert_eq!(docs, vec![json!({"a": 1}), json!({"b": ["x"]})]);
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
        assert_eq!(parse("").expect("empty"), Value::Null);
        assert!(parse("a: 1\na: 2\n").is_err());
        assert!(parse("base: &b {x: 1}\nc:\n  <<: *b\n").is_err());
        assert!(parse("a: !thing 1\n").is_err());
        assert_eq!(
            parse("base: &b [1]\nc: *b\n").expect("aliases"),
            json!({"base": [1], "c": [1]})
        );
    }
}
