// old: sanitizing (literals become `?`), the operation name, and the
//! text caps shared by the parsers.

#![allow(dead_code, clippy::all)]
use super::{DbError, ERROR_MESSAGE_MAX_CHARS, QUERY_MAX_CHARS};

/// Lexical rules that differ between servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DialectOld {
    /// PostgreSQL / standard SQL: `"..."` is an identifier, backslashes are
    /// plain characters except in `E'...'`.
    Standard,
    /// MySQL: `"..."` is a string, backslashes escape in both quotes, `#`
    /// starts a comment, `` `...` `` is an identifier.
    Mysql,
}

/// Sanitizes SQL with PostgreSQL's (standard) lexical rules: every literal
/// (quoted strings with `''` escapes, `E'..'`, `B'..'`, `X'..'`, `N'..'`,
/// `U&'..'`, dollar-quoted strings, numbers with their sign, `0x..` and
/// `0b..`) becomes `?`; comments are dropped; whitespace is collapsed;
/// `$1` placeholders and identifiers (quoted or not, digits and all) stay;
/// `IN (?, ?, ?)` becomes `IN (?)`. At most [`QUERY_MAX_CHARS`] characters.
/// Unterminated quotes and comments run to the end of the text.
#[allow(dead_code)]
pub fn sanitize(sql: &str) -> String {
    sanitize_dialect(sql, DialectOld::Standard)
}

/// Work bound: literal collapsing can shrink text a lot, so scan somewhat
/// more than the output cap, but never unboundedly.
const SCAN_OUT_MAX: usize = 4 * QUERY_MAX_CHARS;

pub(crate) fn sanitize_dialect(sql: &str, dialect: DialectOld) -> String {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Out::default();
    let mut i = 0;
    while i < chars.len() && out.text.len() < SCAN_OUT_MAX {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        i = match c {
            _ if c.is_whitespace() => {
                out.space();
                i + 1
            }
            '-' if next == Some('-') => {
                out.space();
                skip_line(&chars, i)
            }
            '#' if dialect == DialectOld::Mysql => {
                out.space();
                skip_line(&chars, i)
            }
            '/' if next == Some('*') => {
                out.space();
                skip_block_comment(&chars, i)
            }
            '\'' => {
                out.literal();
                skip_quoted(&chars, i, '\'', dialect == DialectOld::Mysql)
            }
            '"' if dialect == DialectOld::Mysql => {
                out.literal();
                skip_quoted(&chars, i, '"', true)
            }
            '"' => out.verbatim(&chars, i, skip_quoted(&chars, i, '"', false)),
            '`' if dialect == DialectOld::Mysql => {
                out.verbatim(&chars, i, skip_quoted(&chars, i, '`', false))
            }
            '$' => dollar(&chars, i, &mut out),
            _ if c.is_ascii_digit() || (c == '.' && next.is_some_and(|n| n.is_ascii_digit())) => {
                out.literal();
                skip_number(&chars, i)
            }
            '-' | '+' if out.sign_allowed() && starts_number(&chars, i + 1) => {
                out.literal();
                skip_number(&chars, i + 1)
            }
            _ if is_ident_start(c) => word(&chars, i, dialect, &mut out),
            _ => {
                out.push(c);
                i + 1
            }
        };
    }
    let text = collapse_in_lists(out.text.trim());
    truncate_chars(&text, QUERY_MAX_CHARS)
}

/// Output with whitespace collapsed and knowledge of the last token.
#[derive(Default)]
struct Out {
    text: String,
    pending_space: bool,
}

impl Out {
    fn space(&mut self) {
        self.pending_space = !self.text.is_empty();
    }

    fn push(&mut self, c: char) {
        if self.pending_space {
            self.text.push(' ');
            self.pending_space = false;
        }
        self.text.push(c);
    }

    fn push_str(&mut self, s: &str) {
        for c in s.chars() {
            self.push(c);
        }
    }

    fn literal(&mut self) {
        self.push('?');
    }

    fn verbatim(&mut self, chars: &[char], from: usize, to: usize) -> usize {
        for &c in chars.get(from..to).unwrap_or_default() {
            self.push(c);
        }
        to
    }

    /// A `-` or `+` here is a sign, not an operator: nothing that could be an
    /// operand (identifier, literal, closing bracket) comes before it.
    fn sign_allowed(&self) -> bool {
        match self.text.chars().next_back() {
            None => true,
            Some(c) => !(is_ident_char(c) || matches!(c, '?' | ')' | ']' | '"' | '`')),
        }
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || (!c.is_ascii() && !c.is_whitespace())
}

fn is_ident_char(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == '$'
}

fn starts_number(chars: &[char], i: usize) -> bool {
    match chars.get(i) {
        Some(c) if c.is_ascii_digit() => true,
        Some('.') => chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()),
        _ => false,
    }
}

fn skip_line(chars: &[char], i: usize) -> usize {
    chars
        .get(i..)
        .and_then(|rest| rest.iter().position(|&c| c == '\n'))
        .map_or(chars.len(), |p| i + p + 1)
}

fn skip_block_comment(chars: &[char], i: usize) -> usize {
    // PostgreSQL nests block comments; MySQL does not, but nesting rarely
    // appears there and either way the comment is dropped.
    let mut depth = 0usize;
    let mut j = i;
    while j < chars.len() {
        match (chars[j], chars.get(j + 1)) {
            ('/', Some('*')) => {
                depth += 1;
                j += 2;
            }
            ('*', Some('/')) => {
                depth = depth.saturating_sub(1);
                j += 2;
                if depth == 0 {
                    return j;
                }
            }
            _ => j += 1,
        }
    }
    chars.len()
}

/// Index past the closing `quote` of the quoted run opening at `i`. A
/// doubled quote is an escaped one; with `backslash`, so is `\x`.
fn skip_quoted(chars: &[char], i: usize, quote: char, backslash: bool) -> usize {
    let mut j = i + 1;
    while j < chars.len() {
        let c = chars[j];
        if backslash && c == '\\' {
            j += 2;
        } else if c == quote {
            if chars.get(j + 1) == Some(&quote) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    chars.len()
}

/// Index past a number starting at `i`: decimal with fraction and exponent,
/// or `0x..`/`0b..`; letters glued to it are taken too (`1abc` is not valid
/// SQL, and splitting it would only leak half of it).
fn skip_number(chars: &[char], i: usize) -> usize {
    let mut j = i;
    let mut seen_e = false;
    while let Some(&c) = chars.get(j) {
        let take = c.is_ascii_alphanumeric()
            || c == '_'
            || (c == '.' && !seen_e)
            || ((c == '+' || c == '-')
                && seen_e
                && matches!(chars.get(j.wrapping_sub(1)), Some('e' | 'E')));
        if !take {
            break;
        }
        let hex = chars.get(i + 1).is_some_and(|x| matches!(x, 'x' | 'X'));
        if (c == 'e' || c == 'E') && !hex {
            seen_e = true;
        }
        j += 1;
    }
    j
}

/// `$1` placeholders stay; `$tag$...$tag$` is a literal.
fn dollar(chars: &[char], i: usize, out: &mut Out) -> usize {
    let mut j = i + 1;
    if chars.get(j).is_some_and(|c| c.is_ascii_digit()) {
        while chars.get(j).is_some_and(|c| c.is_ascii_digit()) {
            j += 1;
        }
        return out.verbatim(chars, i, j);
    }
    while chars.get(j).is_some_and(|&c| is_ident_char(c) && c != '$') {
        j += 1;
    }
    if chars.get(j) != Some(&'$') {
        // A lone `$`: not a quote, keep it.
        out.push('$');
        return i + 1;
    }
    let tag = chars.get(i..=j).unwrap_or_default();
    out.literal();
    let body = j + 1;
    (body..chars.len())
        .find(|&k| chars.get(k..k + tag.len()) == Some(tag))
        .map_or(chars.len(), |k| k + tag.len())
}

/// An identifier or keyword, or a prefixed string literal (`E'..'`, `X'..'`,
/// `B'..'`, `N'..'`, `U&'..'`).
fn word(chars: &[char], i: usize, dialect: DialectOld, out: &mut Out) -> usize {
    let mut j = i;
    while chars.get(j).is_some_and(|&c| is_ident_char(c)) {
        j += 1;
    }
    let w: String = chars.get(i..j).unwrap_or_default().iter().collect();
    let upper = w.to_ascii_uppercase();
    let quote_at = if upper == "U" && chars.get(j) == Some(&'&') {
        j + 1
    } else {
        j
    };
    if chars.get(quote_at) == Some(&'\'') && matches!(upper.as_str(), "E" | "X" | "B" | "N" | "U") {
        out.literal();
        let backslash = upper == "E" || dialect == DialectOld::Mysql;
        return skip_quoted(chars, quote_at, '\'', backslash);
    }
    out.push_str(&w);
    j
}

/// `IN (?, ?, ?)` → `IN (?)`, so that one statement shape is one query text.
fn collapse_in_lists(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_in_list(rest) {
        let (before, list) = rest.split_at(at);
        out.push_str(before);
        let mut marks = 0usize;
        let mut end = None;
        // The list starts at its '('.
        for (k, c) in list.char_indices().skip(1) {
            match c {
                '?' => marks += 1,
                ',' | ' ' => {}
                ')' => {
                    end = Some(k + 1);
                    break;
                }
                _ => break,
            }
        }
        match end {
            Some(end) if marks > 0 => {
                out.push_str("(?)");
                rest = list.get(end..).unwrap_or_default();
            }
            _ => {
                out.push('(');
                rest = list.get(1..).unwrap_or_default();
            }
        }
    }
    out.push_str(rest);
    out
}

/// Byte offset of the `(` of the next `IN (` or `IN(` (any case, with a
/// word boundary before `IN`).
fn find_in_list(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..bytes.len()).find_map(|k| {
        let paren = match bytes.get(k..)? {
            [i, n, b' ', b'(', ..] if is_in(*i, *n) => k + 3,
            [i, n, b'(', ..] if is_in(*i, *n) => k + 2,
            _ => return None,
        };
        let bounded = k == 0
            || bytes.get(k - 1).is_some_and(|&p| {
                !(p.is_ascii_alphanumeric() || p == b'_' || p == b'$' || p >= 0x80)
            });
        bounded.then_some(paren)
    })
}

fn is_in(i: u8, n: u8) -> bool {
    i.eq_ignore_ascii_case(&b'i') && n.eq_ignore_ascii_case(&b'n')
}

/// First SQL keyword, uppercased: the `db.operation.name`. Leading comments,
/// whitespace and brackets are passed over; `None` if there is no keyword.
pub(crate) fn operation(sql: &str) -> Option<String> {
    let chars: Vec<char> = sql.chars().take(4 * QUERY_MAX_CHARS).collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        i = if c.is_whitespace() || c == '(' || c == ';' {
            i + 1
        } else if c == '-' && next == Some('-') || c == '#' {
            skip_line(&chars, i)
        } else if c == '/' && next == Some('*') {
            skip_block_comment(&chars, i)
        } else {
            break;
        };
    }
    let word: String = chars
        .get(i..)
        .unwrap_or_default()
        .iter()
        .take_while(|c| c.is_ascii_alphabetic() || **c == '_')
        .take(32)
        .collect();
    (!word.is_empty()).then(|| word.to_ascii_uppercase())
}

/// The `operation` and `query` of a round trip from statement text as it
/// appeared on the wire (possibly cut short by the kernel's head).
pub(crate) fn describe(
    text: &[u8],
    raw: bool,
    dialect: DialectOld,
) -> (Option<String>, Option<String>) {
    let text = String::from_utf8_lossy(text);
    let query = if raw {
        truncate_chars(text.trim(), QUERY_MAX_CHARS)
    } else {
        sanitize_dialect(&text, dialect)
    };
    (operation(&text), (!query.is_empty()).then_some(query))
}

/// At most `max` characters of `s`.
pub(crate) fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => s.get(..at).unwrap_or_default().to_string(),
        None => s.to_string(),
    }
}

/// A database error with its message capped.
pub(crate) fn db_error(code: &str, message: &str) -> DbError {
    DbError {
        code: truncate_chars(code, 32),
        message: truncate_chars(message.trim(), ERROR_MESSAGE_MAX_CHARS),
    }
}

/// Bytes up to the first NUL (or all of them), and what follows the NUL.
pub(crate) fn cstr(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|&b| b == 0) {
        Some(at) => (
            bytes.get(..at).unwrap_or_default(),
            bytes.get(at + 1..).unwrap_or_default(),
        ),
        None => (bytes, &[]),
    }
}

#[cfg(test)]
mod diff {
    use super::*;
    use crate::protocol::sql::{self as new, Dialect};

    const TOKENS: &[&str] = &[
        "'", "\"", "`", "$", "$t$", "$1", "--", "/*", "*/", "\\", "\n", "0", "12", "e", "E", "x",
        "X", "0x", ".", "-", "+", "IN (", "in(", "In  (", ",", " ", "é", "\u{a0}", "\u{2003}",
        "U&'", "E'", "#", "(", ")", "?", "a", "b_", "_", "\u{b}", "日", "''", "select", "SELECT ",
        "1e-5", ".5", "\u{85}", "$$", "N'", "b'", "]", "\t", "\r\n", ";", "$a$", "ü$", "\u{fffd}",
    ];

    fn rng(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    #[test]
    fn new_sanitize_matches_old() {
        let mut x = 0x1234_5678_9abc_def1u64;
        for n in 0..400_000u64 {
            let len = (rng(&mut x) % 40) as usize;
            let mut s = String::new();
            for _ in 0..len {
                let t = TOKENS[(rng(&mut x) % TOKENS.len() as u64) as usize];
                s.push_str(t);
            }
            if n % 1000 == 0 {
                s = s.repeat(300);
            }
            for (d_old, d_new) in [
                (DialectOld::Standard, Dialect::Standard),
                (DialectOld::Mysql, Dialect::Mysql),
            ] {
                assert_eq!(
                    sanitize_dialect(&s, d_old),
                    new::sanitize_dialect(&s, d_new),
                    "{s:?} {d_new:?}"
                );
            }
            assert_eq!(operation(&s), new::operation(&s), "{s:?}");
        }
        for seed in 1..200_000u64 {
            let mut y = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let len = (rng(&mut y) % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| (rng(&mut y) >> 24) as u8 & 0xbf | if seed % 3 == 0 { 0x40 } else { 0 })
                .collect();
            let s = String::from_utf8_lossy(&bytes);
            for (d_old, d_new) in [
                (DialectOld::Standard, Dialect::Standard),
                (DialectOld::Mysql, Dialect::Mysql),
            ] {
                assert_eq!(
                    sanitize_dialect(&s, d_old),
                    new::sanitize_dialect(&s, d_new),
                    "{s:?} {d_new:?}"
                );
            }
            assert_eq!(operation(&s), new::operation(&s), "{s:?}");
        }
        let long = format!("/*{}*/ select 1", "é".repeat(5000));
        assert_eq!(operation(&long), new::operation(&long));
        let long = format!("/*{}*/ select 1", "é".repeat(1000));
        assert_eq!(operation(&long), new::operation(&long));
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use crate::protocol::sql::{self as new, Dialect};
    #[test]
    #[ignore]
    fn bench_sanitize() {
        let qs = [
            "UPDATE pgbench_accounts SET abalance = abalance + -4213 WHERE aid = 74312;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 74312;",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 74312, -4213, CURRENT_TIMESTAMP);",
            "BEGIN;", "END;",
        ];
        for round in 0..2 {
            let t = std::time::Instant::now();
            let mut n = 0;
            for _ in 0..200_000 {
                for q in qs {
                    n += sanitize_dialect(q, DialectOld::Standard).len()
                        + operation(q).map_or(0, |s| s.len());
                }
            }
            let old = t.elapsed();
            let t = std::time::Instant::now();
            let mut m = 0;
            for _ in 0..200_000 {
                for q in qs {
                    m += new::sanitize_dialect(q, Dialect::Standard).len()
                        + new::operation(q).map_or(0, |s| s.len());
                }
            }
            let newt = t.elapsed();
            assert_eq!(n, m);
            eprintln!("round {round}: old {old:?} new {newt:?}");
        }
    }
}
