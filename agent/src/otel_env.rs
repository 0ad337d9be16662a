//! The `key1=value1,key2=value2` form, values %-encoded (the W3C baggage
//! form), that the OpenTelemetry variables share: OTEL_RESOURCE_ATTRIBUTES
//! (a process's own, and the agent's) and OTEL_EXPORTER_OTLP_HEADERS. Pure:
//! each caller decides what a bad entry costs.

/// Why an entry could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadEntry<'a> {
    /// No `=` in it.
    NoEquals,
    /// The value of this name has a bad %-escape, or is not UTF-8.
    BadEscape(&'a str),
}

/// The list's entries, each with its 1-based position among all (empty
/// ones are skipped but counted): the name trimmed, the value trimmed and
/// decoded.
pub fn entries(text: &str) -> impl Iterator<Item = (usize, Result<(&str, String), BadEntry<'_>>)> {
    text.split(',')
        .enumerate()
        .filter(|(_, entry)| !entry.trim().is_empty())
        .map(|(index, entry)| {
            let entry = match entry.split_once('=') {
                None => Err(BadEntry::NoEquals),
                Some((name, value)) => {
                    let name = name.trim();
                    percent_decode(value.trim())
                        .map(|value| (name, value))
                        .ok_or(BadEntry::BadEscape(name))
                }
            };
            (index + 1, entry)
        })
}

/// `%XX` escapes decoded (`+` stays `+`); `None` for a bad escape or bytes
/// that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_decoded_and_numbered() {
        let read: Vec<_> = entries("a=x%2Cy, b = 2 ,,bad, c=%zz,d=%C3%A9").collect();
        assert_eq!(
            read,
            vec![
                (1, Ok(("a", "x,y".to_string()))),
                (2, Ok(("b", "2".to_string()))),
                (4, Err(BadEntry::NoEquals)),
                (5, Err(BadEntry::BadEscape("c"))),
                (6, Ok(("d", "é".to_string()))),
            ]
        );
        assert_eq!(
            entries("a=%ff").next(),
            Some((1, Err(BadEntry::BadEscape("a"))))
        );
    }
}
