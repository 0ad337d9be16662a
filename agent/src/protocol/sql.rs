//! Query text: sanitizing (literals become `?`), the operation name, and the
//! text caps shared by the parsers.

use super::{DbError, ERROR_MESSAGE_MAX_CHARS, QUERY_MAX_CHARS};

/// Lexical rules that differ between servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
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
pub fn sanitize(sql: &str) -> String {
    sanitize_dialect(sql, Dialect::Standard)
}

/// Work bound: literal collapsing can shrink text a lot, so scan somewhat
/// more than the output cap, but never unboundedly.
const SCAN_OUT_MAX: usize = 4 * QUERY_MAX_CHARS;

pub(crate) fn sanitize_dialect(sql: &str, dialect: Dialect) -> String {
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
            '#' if dialect == Dialect::Mysql => {
                out.space();
                skip_line(&chars, i)
            }
            '/' if next == Some('*') => {
                out.space();
                skip_block_comment(&chars, i)
            }
            '\'' => {
                out.literal();
                skip_quoted(&chars, i, '\'', dialect == Dialect::Mysql)
            }
            '"' if dialect == Dialect::Mysql => {
                out.literal();
                skip_quoted(&chars, i, '"', true)
            }
            '"' => out.verbatim(&chars, i, skip_quoted(&chars, i, '"', false)),
            '`' if dialect == Dialect::Mysql => {
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
fn word(chars: &[char], i: usize, dialect: Dialect, out: &mut Out) -> usize {
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
        let backslash = upper == "E" || dialect == Dialect::Mysql;
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
    dialect: Dialect,
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
mod tests {
    use super::*;

    #[track_caller]
    fn same(input: &str, want: &str) {
        assert_eq!(sanitize(input), want, "input: {input:?}");
    }

    #[test]
    fn strings_become_marks() {
        same(
            "SELECT * FROM t WHERE a = 'x'",
            "SELECT * FROM t WHERE a = ?",
        );
        same("SELECT 'it''s', 'b'", "SELECT ?, ?");
        same("SELECT E'a\\'b' , x", "SELECT ? , x");
        same(
            "SELECT X'1F', B'0101', N'nat', U&'d\\0061t'",
            "SELECT ?, ?, ?, ?",
        );
        same("select e'\\\\'", "select ?");
    }

    #[test]
    fn dollar_quotes_and_placeholders() {
        same("SELECT $$a 'b' c$$, $1", "SELECT ?, $1");
        same("SELECT $fn$ body $ x $fn$ || $2", "SELECT ? || $2");
        same("SELECT a$b FROM t", "SELECT a$b FROM t");
        same("SELECT $tag$ never closed", "SELECT ?");
        same("SELECT $", "SELECT $");
    }

    #[test]
    fn numbers_but_not_identifiers() {
        same(
            "SELECT 1, 2.5, .5, 1e10, 1.5E-3, 0x1F, 0b101",
            "SELECT ?, ?, ?, ?, ?, ?, ?",
        );
        same(
            "SELECT t1.c2 FROM t1 WHERE c3 > 10",
            "SELECT t1.c2 FROM t1 WHERE c3 > ?",
        );
        same(
            "SELECT a_1, \"Tab 9\" FROM x",
            "SELECT a_1, \"Tab 9\" FROM x",
        );
    }

    #[test]
    fn negative_numbers() {
        same(
            "SELECT * FROM t WHERE a = -5",
            "SELECT * FROM t WHERE a = ?",
        );
        same("SELECT -1", "SELECT -?");
        same("VALUES (-1, -2.5)", "VALUES (?, ?)");
        same("SELECT a-1, a - 1", "SELECT a-?, a - ?");
        same("SELECT f(x)-1", "SELECT f(x)-?");
    }

    #[test]
    fn whitespace_and_comments() {
        same("  SELECT\n\t a ,\r\n b   FROM t  ", "SELECT a , b FROM t");
        same("SELECT a -- secret 42\nFROM t", "SELECT a FROM t");
        same("SELECT /* 'x' /* nested */ 7 */ a", "SELECT a");
        same("SELECT a /* never closed", "SELECT a");
    }

    #[test]
    fn in_lists_collapse() {
        same(
            "SELECT * FROM t WHERE id IN (1, 2, 3)",
            "SELECT * FROM t WHERE id IN (?)",
        );
        same(
            "SELECT * FROM t WHERE id in ('a','b')",
            "SELECT * FROM t WHERE id in (?)",
        );
        same(
            "SELECT * FROM t WHERE id IN($1, $2)",
            "SELECT * FROM t WHERE id IN($1, $2)",
        );
        same(
            "SELECT * FROM t WHERE x IN (SELECT 1)",
            "SELECT * FROM t WHERE x IN (SELECT ?)",
        );
        same("SELECT min (1, 2)", "SELECT min (?, ?)");
    }

    #[test]
    fn unterminated_quotes_do_not_panic() {
        same("SELECT 'abc", "SELECT ?");
        same("SELECT E'abc\\", "SELECT ?");
        same("SELECT \"abc", "SELECT \"abc");
        same("'", "?");
        same("x'", "?");
        same("E'", "?");
        same("", "");
    }

    #[test]
    fn long_text_is_capped() {
        let long = format!("SELECT {}", "col, ".repeat(2000));
        assert_eq!(sanitize(&long).chars().count(), QUERY_MAX_CHARS);
        let lits = format!("SELECT {}", "'x', ".repeat(100_000));
        assert_eq!(sanitize(&lits).chars().count(), QUERY_MAX_CHARS);
        let wide = "é".repeat(5000);
        assert_eq!(sanitize(&wide).chars().count(), QUERY_MAX_CHARS);
    }

    #[test]
    fn mysql_dialect() {
        let s = |q| sanitize_dialect(q, Dialect::Mysql);
        assert_eq!(s("SELECT \"secret\", 'it\\'s' # note"), "SELECT ?, ?");
        assert_eq!(
            s("SELECT `we ird` FROM t WHERE a=0xFF"),
            "SELECT `we ird` FROM t WHERE a=?"
        );
    }

    #[test]
    fn operation_names() {
        assert_eq!(operation("  select 1").as_deref(), Some("SELECT"));
        assert_eq!(operation("/* c */ (SELECT 1)").as_deref(), Some("SELECT"));
        assert_eq!(operation("-- x\nbegin").as_deref(), Some("BEGIN"));
        assert_eq!(operation("").as_deref(), None);
        assert_eq!(operation("123").as_deref(), None);
    }
}
