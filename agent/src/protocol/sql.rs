//! Query text: sanitizing (literals become `?`), the operation name, and the
//! text caps shared by the parsers.

use std::borrow::Cow;

use super::{DbError, QueryText, ERROR_MESSAGE_MAX_CHARS, QUERY_MAX_CHARS};

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

/// Works on the text's bytes: every character that steers the lexer is
/// ASCII, and UTF-8 never repeats an ASCII byte inside a longer character,
/// so multi-byte characters are decoded only where their class matters
/// (whitespace or part of a word). One `String` is allocated for the
/// output, plus one more when an `IN` list is collapsed.
pub(crate) fn sanitize_dialect(sql: &str, dialect: Dialect) -> String {
    let bytes = sql.as_bytes();
    let mut out = Out {
        text: String::with_capacity(sql.len().min(SCAN_OUT_MAX + 4)),
        pending_space: false,
        saw_in: false,
    };
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if out.text.len() >= SCAN_OUT_MAX {
            break;
        }
        let next = bytes.get(i + 1).copied();
        i = match b {
            _ if !b.is_ascii() => {
                let c = char_at(sql, i);
                if c.is_whitespace() {
                    out.space();
                    i + c.len_utf8()
                } else {
                    word(sql, i, dialect, &mut out)
                }
            }
            _ if is_ascii_space(b) => {
                out.space();
                i + 1
            }
            b'-' if next == Some(b'-') => {
                out.space();
                skip_line(bytes, i)
            }
            b'#' if dialect == Dialect::Mysql => {
                out.space();
                skip_line(bytes, i)
            }
            b'/' if next == Some(b'*') => {
                out.space();
                skip_block_comment(bytes, i)
            }
            b'\'' => {
                out.literal();
                skip_quoted(bytes, i, b'\'', dialect == Dialect::Mysql)
            }
            b'"' if dialect == Dialect::Mysql => {
                out.literal();
                skip_quoted(bytes, i, b'"', true)
            }
            b'"' => out.verbatim(sql, i, skip_quoted(bytes, i, b'"', false)),
            b'`' if dialect == Dialect::Mysql => {
                out.verbatim(sql, i, skip_quoted(bytes, i, b'`', false))
            }
            b'$' => dollar(sql, i, &mut out),
            _ if b.is_ascii_digit() || (b == b'.' && next.is_some_and(|n| n.is_ascii_digit())) => {
                out.literal();
                skip_number(bytes, i)
            }
            b'-' | b'+' if out.sign_allowed() && starts_number(bytes, i + 1) => {
                out.literal();
                skip_number(bytes, i + 1)
            }
            _ if b.is_ascii_alphabetic() || b == b'_' => word(sql, i, dialect, &mut out),
            _ => {
                out.push(char::from(b));
                i + 1
            }
        };
    }
    let mut text = out.text;
    trim_in_place(&mut text);
    if out.saw_in && find_in_list(&text).is_some() {
        text = collapse_in_lists(&text);
    }
    truncate_in_place(&mut text, QUERY_MAX_CHARS);
    text
}

/// The character starting at byte `i` (a boundary); U+FFFD if none, which
/// the callers treat as one byte of a word.
fn char_at(s: &str, i: usize) -> char {
    s.get(i..)
        .and_then(|rest| rest.chars().next())
        .unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// ASCII bytes that `char::is_whitespace` takes: TAB, LF, VT, FF, CR, space.
fn is_ascii_space(b: u8) -> bool {
    matches!(b, b'\t'..=b'\r' | b' ')
}

/// `str::trim` without a new allocation.
fn trim_in_place(text: &mut String) {
    let end = text.trim_end().len();
    text.truncate(end);
    let start = text.len() - text.trim_start().len();
    if start > 0 {
        text.drain(..start);
    }
}

/// Keeps at most `max` characters of `text`.
fn truncate_in_place(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    if let Some((at, _)) = text.char_indices().nth(max) {
        text.truncate(at);
    }
}

/// Output with whitespace collapsed and knowledge of the last token.
struct Out {
    text: String,
    pending_space: bool,
    /// An `IN` keyword went out: there may be a list to collapse.
    saw_in: bool,
}

impl Out {
    fn space(&mut self) {
        self.pending_space = !self.text.is_empty();
    }

    fn flush_space(&mut self) {
        if self.pending_space {
            self.text.push(' ');
            self.pending_space = false;
        }
    }

    fn push(&mut self, c: char) {
        self.flush_space();
        self.text.push(c);
    }

    fn push_str(&mut self, s: &str) {
        if !s.is_empty() {
            self.flush_space();
            self.text.push_str(s);
        }
    }

    fn literal(&mut self) {
        self.push('?');
    }

    /// Copies `sql[from..to]` as it is; returns `to`.
    fn verbatim(&mut self, sql: &str, from: usize, to: usize) -> usize {
        let s = sql.get(from..to).unwrap_or_default();
        // A quoted identifier may hold what looks like an `IN` list.
        self.saw_in |= s.contains('(');
        self.push_str(s);
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

fn starts_number(bytes: &[u8], i: usize) -> bool {
    match bytes.get(i) {
        Some(b) if b.is_ascii_digit() => true,
        Some(b'.') => bytes.get(i + 1).is_some_and(u8::is_ascii_digit),
        _ => false,
    }
}

fn skip_line(bytes: &[u8], i: usize) -> usize {
    bytes
        .get(i..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        .map_or(bytes.len(), |p| i + p + 1)
}

fn skip_block_comment(bytes: &[u8], i: usize) -> usize {
    // PostgreSQL nests block comments; MySQL does not, but nesting rarely
    // appears there and either way the comment is dropped.
    let mut depth = 0usize;
    let mut j = i;
    while let Some(&b) = bytes.get(j) {
        match (b, bytes.get(j + 1)) {
            (b'/', Some(b'*')) => {
                depth += 1;
                j += 2;
            }
            (b'*', Some(b'/')) => {
                depth = depth.saturating_sub(1);
                j += 2;
                if depth == 0 {
                    return j;
                }
            }
            _ => j += 1,
        }
    }
    bytes.len()
}

/// Index past the closing `quote` of the quoted run opening at `i`. A
/// doubled quote is an escaped one; with `backslash`, so is `\x`. (A
/// backslash before a multi-byte character skips only its first byte; the
/// others cannot be taken for a quote.)
fn skip_quoted(bytes: &[u8], i: usize, quote: u8, backslash: bool) -> usize {
    let mut j = i + 1;
    while let Some(&b) = bytes.get(j) {
        if backslash && b == b'\\' {
            j += 2;
        } else if b == quote {
            if bytes.get(j + 1) == Some(&quote) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    bytes.len()
}

/// Index past a number starting at `i`: decimal with fraction and exponent,
/// or `0x..`/`0b..`; letters glued to it are taken too (`1abc` is not valid
/// SQL, and splitting it would only leak half of it).
fn skip_number(bytes: &[u8], i: usize) -> usize {
    let hex = matches!(bytes.get(i + 1), Some(b'x' | b'X'));
    let mut j = i;
    let mut seen_e = false;
    while let Some(&b) = bytes.get(j) {
        let take = b.is_ascii_alphanumeric()
            || b == b'_'
            || (b == b'.' && !seen_e)
            || ((b == b'+' || b == b'-')
                && seen_e
                && matches!(bytes.get(j.wrapping_sub(1)), Some(b'e' | b'E')));
        if !take {
            break;
        }
        if (b == b'e' || b == b'E') && !hex {
            seen_e = true;
        }
        j += 1;
    }
    j
}

/// Index past the identifier characters from `i` on; `$` ends the run
/// unless `dollar`.
fn ident_end(sql: &str, i: usize, dollar: bool) -> usize {
    let bytes = sql.as_bytes();
    let mut j = i;
    while let Some(&b) = bytes.get(j) {
        if b.is_ascii() {
            if !(b.is_ascii_alphanumeric() || b == b'_' || (dollar && b == b'$')) {
                break;
            }
            j += 1;
        } else {
            let c = char_at(sql, j);
            if c.is_whitespace() {
                break;
            }
            j += c.len_utf8();
        }
    }
    j
}

/// `$1` placeholders stay; `$tag$...$tag$` is a literal.
fn dollar(sql: &str, i: usize, out: &mut Out) -> usize {
    let bytes = sql.as_bytes();
    let mut j = i + 1;
    if bytes.get(j).is_some_and(u8::is_ascii_digit) {
        while bytes.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        return out.verbatim(sql, i, j);
    }
    let j = ident_end(sql, j, false);
    if bytes.get(j) != Some(&b'$') {
        // A lone `$`: not a quote, keep it.
        out.push('$');
        return i + 1;
    }
    let tag = sql.get(i..=j).unwrap_or("$");
    out.literal();
    let body = j + 1;
    sql.get(body..)
        .and_then(|rest| rest.find(tag))
        .map_or(sql.len(), |k| body + k + tag.len())
}

/// An identifier or keyword, or a prefixed string literal (`E'..'`, `X'..'`,
/// `B'..'`, `N'..'`, `U&'..'`).
fn word(sql: &str, i: usize, dialect: Dialect, out: &mut Out) -> usize {
    let bytes = sql.as_bytes();
    let j = ident_end(sql, i, true).max(i + 1);
    let w = sql.get(i..j).unwrap_or_default();
    let prefix = match w.as_bytes() {
        [p] => p.to_ascii_uppercase(),
        _ => 0,
    };
    let quote_at = if prefix == b'U' && bytes.get(j) == Some(&b'&') {
        j + 1
    } else {
        j
    };
    if bytes.get(quote_at) == Some(&b'\'') && matches!(prefix, b'E' | b'X' | b'B' | b'N' | b'U') {
        out.literal();
        let backslash = prefix == b'E' || dialect == Dialect::Mysql;
        return skip_quoted(bytes, quote_at, b'\'', backslash);
    }
    out.saw_in |= w.eq_ignore_ascii_case("in");
    out.push_str(w);
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
    // Only the first 4 * QUERY_MAX_CHARS characters are looked at.
    const LOOK_MAX: usize = 4 * QUERY_MAX_CHARS;
    let sql = if sql.len() <= LOOK_MAX {
        sql
    } else {
        let end = sql
            .char_indices()
            .nth(LOOK_MAX)
            .map_or(sql.len(), |(at, _)| at);
        sql.get(..end).unwrap_or(sql)
    };
    let bytes = sql.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let next = bytes.get(i + 1).copied();
        i = match b {
            b'(' | b';' => i + 1,
            _ if is_ascii_space(b) => i + 1,
            b'-' if next == Some(b'-') => skip_line(bytes, i),
            b'#' => skip_line(bytes, i),
            b'/' if next == Some(b'*') => skip_block_comment(bytes, i),
            _ if !b.is_ascii() && char_at(sql, i).is_whitespace() => i + char_at(sql, i).len_utf8(),
            _ => break,
        };
    }
    let word = bytes.get(i..).unwrap_or_default();
    let len = word
        .iter()
        .take(32)
        .take_while(|b| b.is_ascii_alphabetic() || **b == b'_')
        .count();
    let word = word.get(..len).unwrap_or_default();
    (!word.is_empty()).then(|| String::from_utf8_lossy(word).to_ascii_uppercase())
}

/// The `operation` and `query` of a round trip from statement text as it
/// appeared on the wire (possibly cut short by the kernel's head). The
/// query is sanitized when shown, not here.
pub(crate) fn describe(
    text: &[u8],
    raw: bool,
    dialect: Dialect,
) -> (Option<String>, Option<QueryText>) {
    let text = match std::str::from_utf8(text) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(text),
    };
    let operation = operation(&text);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return (operation, None);
    }
    // What sanitizing reads at most: the rest could never be shown.
    let kept = truncate_chars(trimmed, if raw { QUERY_MAX_CHARS } else { SCAN_OUT_MAX });
    let query = if raw {
        QueryText::shown_as_is(kept)
    } else {
        QueryText::sql(kept, dialect)
    };
    (operation, Some(query))
}

/// At most `max` characters of `s`.
pub(crate) fn truncate_chars(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
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

/// A server's error message without the values it quotes. Servers echo
/// the offending input: PostgreSQL `invalid input syntax for type integer:
/// "..."`, MySQL `Duplicate entry '...'` and `near '...rest of the query'`,
/// Redis `with args beginning with: '...'`; that is query literals. Quotes
/// inside the echoed text need not pair, so everything from the first quote
/// to the last one becomes `?` (identifiers in quotes go too: the SQLSTATE or
/// error number still says what went wrong).
pub(crate) fn sanitize_error_message(message: &str) -> String {
    let is_quote = |c: char| c == '\'' || c == '"' || c == '`';
    let Some(first) = message.find(is_quote) else {
        return message.to_string();
    };
    let last = message.rfind(is_quote).unwrap_or(first);
    // A lone quote (a message cut short inside one): hide to the end.
    let rest = if last > first {
        message.get(last + 1..).unwrap_or_default()
    } else {
        ""
    };
    format!("{}?{rest}", message.get(..first).unwrap_or_default())
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

/// `db.query.summary` and `db.collection.name` of one SQL statement, as
/// [`query_summary`] reads them from its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuerySummary {
    /// Operations and the tables (or procedure) they work on, in the order
    /// written: `SELECT users`, `INSERT shipping_details SELECT orders`.
    /// At most [`QuerySummary::MAX_CHARS`] characters, never cut inside a
    /// word.
    pub summary: String,
    /// The one table the statement works on, as written (`public.users`,
    /// `"Users"`); `None` when it names several, none, or one that could
    /// not be read with certainty.
    pub collection: Option<String>,
}

impl QuerySummary {
    /// The conventions' cap on `db.query.summary`.
    pub const MAX_CHARS: usize = 255;
    /// Cap on one table or procedure name as written (schema and quotes
    /// included). PostgreSQL and MySQL identifiers stop at 63 bytes and 64
    /// characters, so only schema-qualified names can be longer; such a
    /// name is left out rather than cut (a cut name would name another
    /// table).
    pub const NAME_MAX_CHARS: usize = 64;
}

/// Bytes of the text read: enough for the head of any statement, and a
/// bound on the work per round trip.
const SUMMARY_SCAN_MAX: usize = 1024;
/// Brackets followed in depth; deeper text ends the reading.
const NESTING_MAX: usize = 16;
/// Common table expressions remembered (so that `FROM cte` is not taken
/// for a table).
const CTE_NAMES_MAX: usize = 8;

/// `db.query.summary` and `db.collection.name` from SQL text, which should
/// be sanitized already (see [`sanitize`]): the conventions' "Generating a
/// summary of the query", operations and their targets in the order they
/// are written. Subqueries count as operations of their own (`SELECT
/// SELECT orders customers`); the bodies of `WITH` queries are read like
/// subqueries, and the statement after them gives its own operation, with
/// references to the `WITH` names left out (they are not tables).
///
/// Operation keywords are uppercased, like `db.operation.name`, which the
/// conventions ask the summary to match; names are kept as written,
/// quotes and schema included. Only keywords and identifiers go out, never
/// string, number or dollar-quoted literals, whatever the input. `None`
/// when the statement does not start with a keyword known here; a known
/// statement whose targets are not understood gives its operation alone.
/// Reads only the first statement, and at most its first KiB: with a
/// longer text, or deeper nesting than followed, no collection is claimed.
pub fn query_summary(sql: &str) -> Option<QuerySummary> {
    let mut end = sql.len().min(SUMMARY_SCAN_MAX);
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    let text = sql.get(..end).unwrap_or_default();
    let mut reader = SummaryReader::new(text, end < sql.len());
    reader.run();
    reader.finish()
}

/// One token of SQL text: words, quoted identifiers and the punctuation
/// that steers the reading; everything else (literals, placeholders,
/// operators) is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a str),
    Quoted,
    Open,
    Close,
    Comma,
    Semicolon,
    Other,
}

/// What the next tokens mean at one bracket depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A statement's first keyword comes next (the start, or just inside a
    /// bracket, where it may be a subquery).
    Statement,
    /// Inside a clause that names no table (select list, conditions,
    /// assignments): only `FROM`, `JOIN` and `SELECT` matter.
    Skip,
    /// The next name is a table (after `FROM`, `JOIN`, `INTO`, `UPDATE`...).
    Target(TargetKind),
    /// After a table: an alias, `,` for another table, or a keyword.
    AfterTarget(TargetKind),
    /// The next name is a procedure (`CALL`, `EXEC`).
    Procedure,
    /// After `WITH` (or a `,` between its queries): a query's name.
    CteName,
    /// After a `WITH` query's name: its column list, `AS`, then its body.
    CteAs { seen_as: bool },
    /// After a `WITH` query's body: `,` and another, or the statement.
    AfterCte,
    /// Nothing more to learn from this statement.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetKind {
    /// A name followed by `(` is a function (`FROM unnest(?)`), not a table.
    Read,
    /// A name followed by `(` is a table and its column list (`INSERT INTO
    /// t (a, b)`, `COPY t (a)`).
    Write,
}

/// The reading state of one bracket depth.
#[derive(Debug, Clone, Copy)]
struct Frame {
    mode: Mode,
    /// A query (`SELECT`, `UPDATE`, `DELETE`...) started at this depth, so
    /// `FROM` and `JOIN` name tables here (and not, say, in
    /// `extract(epoch FROM t)`).
    query: bool,
}

/// Tables seen so far, for `db.collection.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tables<'a> {
    None,
    One(&'a str),
    Several,
}

/// How a statement begins, from its first keyword.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Truncate,
    Copy,
    Table,
    Procedure,
    With,
    /// A known statement whose targets are not read (`BEGIN`, `CREATE`...).
    Alone,
}

/// What to do after a token.
enum Step {
    /// Read on from this byte.
    Next(usize),
    Stop,
    /// The statement does not start with a known keyword.
    Unknown,
}

struct SummaryReader<'a> {
    text: &'a str,
    /// The text is the head of a longer one: its last token may be cut.
    cut: bool,
    summary: String,
    summary_chars: usize,
    /// Something did not fit: nothing more goes into the summary, so that
    /// what is there stays in order.
    summary_full: bool,
    any_operation: bool,
    tables: Tables<'a>,
    /// A table name could not be read with certainty.
    unsure: bool,
    ctes: [&'a str; CTE_NAMES_MAX],
    cte_count: usize,
    frame: Frame,
    outer: [Frame; NESTING_MAX],
    depth: usize,
    /// The previous word was `DISTINCT` (`IS DISTINCT FROM x` names no table).
    after_distinct: bool,
}

impl<'a> SummaryReader<'a> {
    fn new(text: &'a str, cut: bool) -> Self {
        let start = Frame {
            mode: Mode::Statement,
            query: false,
        };
        SummaryReader {
            text,
            cut,
            summary: String::new(),
            summary_chars: 0,
            summary_full: false,
            any_operation: false,
            tables: Tables::None,
            unsure: cut,
            ctes: [""; CTE_NAMES_MAX],
            cte_count: 0,
            frame: start,
            outer: [start; NESTING_MAX],
            depth: 0,
            after_distinct: false,
        }
    }

    fn run(&mut self) {
        let mut i = 0;
        while let Some((token, start, end)) = self.next_token(i) {
            let step = self.step(token, start, end);
            self.after_distinct =
                matches!(token, Token::Word(w) if w.eq_ignore_ascii_case("DISTINCT"));
            match step {
                Step::Next(next) => i = next,
                Step::Stop => return,
                Step::Unknown => {
                    self.any_operation = false;
                    return;
                }
            }
        }
    }

    fn finish(self) -> Option<QuerySummary> {
        if !self.any_operation {
            return None;
        }
        let collection = match self.tables {
            Tables::One(name) if !self.unsure => Some(name.to_string()),
            _ => None,
        };
        Some(QuerySummary {
            summary: self.summary,
            collection,
        })
    }

    /// The token starting at or after `i`, with its start and end; `None`
    /// at the end of the text, or at a token the cut may have shortened.
    fn next_token(&self, i: usize) -> Option<(Token<'a>, usize, usize)> {
        let text = self.text;
        let bytes = text.as_bytes();
        let mut i = i;
        loop {
            let b = *bytes.get(i)?;
            let next = bytes.get(i + 1).copied();
            i = match b {
                _ if is_ascii_space(b) => i + 1,
                b'-' if next == Some(b'-') => skip_line(bytes, i),
                b'/' if next == Some(b'*') => skip_block_comment(bytes, i),
                _ if !b.is_ascii() && char_at(text, i).is_whitespace() => {
                    i + char_at(text, i).len_utf8()
                }
                _ => break,
            };
        }
        let b = *bytes.get(i)?;
        let (token, end) = match b {
            b'(' => (Token::Open, i + 1),
            b')' => (Token::Close, i + 1),
            b',' => (Token::Comma, i + 1),
            b';' => (Token::Semicolon, i + 1),
            b'"' | b'`' => (
                Token::Quoted,
                quoted_part_end(bytes, i).map_or(bytes.len(), |(end, _)| end),
            ),
            // A string literal (not in sanitized text, but never echo one).
            b'\'' => (Token::Other, skip_quoted(bytes, i, b'\'', false)),
            b'$' => (Token::Other, dollar_end(text, i)),
            _ if b.is_ascii_digit() => (Token::Other, skip_number(bytes, i)),
            _ if starts_unquoted_part(text, i) => {
                let end = ident_end(text, i, true);
                (Token::Word(text.get(i..end).unwrap_or_default()), end)
            }
            _ => (Token::Other, i + char_at(text, i).len_utf8()),
        };
        if self.cut && end >= bytes.len() {
            return None;
        }
        Some((token, i, end))
    }

    fn step(&mut self, token: Token<'a>, start: usize, end: usize) -> Step {
        match token {
            // Empty statements before the first one.
            Token::Semicolon if !self.any_operation && self.frame.mode == Mode::Statement => {
                return Step::Next(end);
            }
            Token::Semicolon => return Step::Stop,
            Token::Open => return self.open(end),
            Token::Close => {
                if let Some(depth) = self.depth.checked_sub(1) {
                    self.depth = depth;
                    if let Some(frame) = self.outer.get(depth) {
                        self.frame = *frame;
                    }
                }
                return Step::Next(end);
            }
            _ => {}
        }
        match self.frame.mode {
            Mode::Statement => self.statement(token, end),
            Mode::Skip => {
                if let Token::Word(word) = token {
                    self.clause_keyword(word);
                }
                Step::Next(end)
            }
            Mode::Target(kind) => self.target(kind, token, start, end),
            Mode::AfterTarget(kind) => self.after_target(kind, token, start, end),
            Mode::Procedure => {
                if let Some(name_end) = self.name(token, start) {
                    let name = self.text.get(start..name_end).unwrap_or_default();
                    if name.chars().count() <= QuerySummary::NAME_MAX_CHARS {
                        self.push_summary(name);
                    }
                }
                Step::Stop
            }
            Mode::CteName => self.cte_name(token, start, end),
            Mode::CteAs { seen_as } => {
                self.frame.mode = match token {
                    Token::Word(w) if w.eq_ignore_ascii_case("AS") => Mode::CteAs { seen_as: true },
                    Token::Word(w)
                        if seen_as
                            && (w.eq_ignore_ascii_case("NOT")
                                || w.eq_ignore_ascii_case("MATERIALIZED")) =>
                    {
                        Mode::CteAs { seen_as }
                    }
                    _ => Mode::Skip,
                };
                Step::Next(end)
            }
            Mode::AfterCte => {
                if token == Token::Comma {
                    self.frame.mode = Mode::CteName;
                    Step::Next(end)
                } else {
                    self.frame.mode = Mode::Statement;
                    self.statement(token, end)
                }
            }
            Mode::Done => Step::Stop,
        }
    }

    /// An opening bracket: remember where to resume after it, and read its
    /// inside as a possible subquery.
    fn open(&mut self, end: usize) -> Step {
        let (resume, inside) = match self.frame.mode {
            Mode::Statement | Mode::CteName => (Mode::Skip, Mode::Statement),
            // `FROM (SELECT ...) alias`: an anonymous table.
            Mode::Target(kind) => (Mode::AfterTarget(kind), Mode::Statement),
            // A `WITH` query's column list, then its body.
            Mode::CteAs { seen_as: false } => (Mode::CteAs { seen_as: false }, Mode::Skip),
            Mode::CteAs { seen_as: true } => (Mode::AfterCte, Mode::Statement),
            Mode::Procedure => (Mode::Done, Mode::Skip),
            mode => (mode, Mode::Statement),
        };
        let Some(slot) = self.outer.get_mut(self.depth) else {
            self.unsure = true;
            return Step::Stop;
        };
        *slot = Frame {
            mode: resume,
            query: self.frame.query,
        };
        self.depth += 1;
        self.frame = Frame {
            mode: inside,
            query: false,
        };
        Step::Next(end)
    }

    /// A statement's first token: its operation, or not one.
    fn statement(&mut self, token: Token<'a>, end: usize) -> Step {
        let nested = self.depth > 0 || self.any_operation;
        let opening = match token {
            Token::Word(word) => opening(word, nested).map(|o| (word, o)),
            _ => None,
        };
        let Some((word, opening)) = opening else {
            if self.any_operation {
                self.frame.mode = Mode::Skip;
                return Step::Next(end);
            }
            return Step::Unknown;
        };
        if opening == Opening::With {
            self.frame.mode = Mode::CteName;
            return Step::Next(end);
        }
        self.push_operation(word);
        let (mode, query) = match opening {
            Opening::Select | Opening::Delete => (Mode::Skip, true),
            Opening::Insert | Opening::Merge => (Mode::Target(TargetKind::Write), true),
            Opening::Update => (Mode::Target(TargetKind::Read), true),
            Opening::Truncate | Opening::Table => (Mode::Target(TargetKind::Read), false),
            Opening::Copy => (Mode::Target(TargetKind::Write), false),
            Opening::Procedure => (Mode::Procedure, false),
            Opening::With | Opening::Alone => (Mode::Done, false),
        };
        self.frame = Frame { mode, query };
        Step::Next(end)
    }

    /// A keyword inside a clause: the ones that start naming tables, or a
    /// subquery.
    fn clause_keyword(&mut self, word: &'a str) {
        let is = |k: &str| word.eq_ignore_ascii_case(k);
        if is("SELECT") {
            self.push_operation(word);
            self.frame = Frame {
                mode: Mode::Skip,
                query: true,
            };
        } else if self.frame.query
            && ((is("FROM") && !self.after_distinct) || is("JOIN") || is("STRAIGHT_JOIN"))
        {
            self.frame.mode = Mode::Target(TargetKind::Read);
        } else {
            self.frame.mode = Mode::Skip;
        }
    }

    /// Where a table name is expected.
    fn target(&mut self, kind: TargetKind, token: Token<'a>, start: usize, end: usize) -> Step {
        if let Token::Word(word) = token {
            if is_target_modifier(word) {
                return Step::Next(end);
            }
            if is_reserved(word) {
                self.clause_keyword(word);
                return Step::Next(end);
            }
        }
        let Some(name_end) = self.name(token, start) else {
            if matches!(token, Token::Word(_) | Token::Quoted) {
                // A name, but unreadable (an unterminated quote, or control
                // characters): a table all the same, of unknown name.
                self.unsure = true;
                self.frame.mode = Mode::AfterTarget(kind);
            } else {
                self.frame.mode = Mode::Skip;
            }
            return Step::Next(end);
        };
        self.frame.mode = Mode::AfterTarget(kind);
        let name = self.text.get(start..name_end).unwrap_or_default();
        let function = kind == TargetKind::Read && self.next_byte(name_end) == Some(b'(');
        if function || self.is_cte(name) {
            return Step::Next(name_end);
        }
        if name.chars().count() > QuerySummary::NAME_MAX_CHARS {
            self.unsure = true;
            return Step::Next(name_end);
        }
        self.push_summary(name);
        self.tables = match self.tables {
            Tables::None => Tables::One(name),
            Tables::One(first) if first == name => Tables::One(first),
            _ => Tables::Several,
        };
        Step::Next(name_end)
    }

    /// After a table name.
    fn after_target(
        &mut self,
        kind: TargetKind,
        token: Token<'a>,
        start: usize,
        end: usize,
    ) -> Step {
        match token {
            Token::Comma => self.frame.mode = Mode::Target(kind),
            Token::Word(word) if word.eq_ignore_ascii_case("AS") => {}
            // `DELETE FROM t USING u`, `MERGE INTO t USING s`, and `JOIN u
            // USING (id)`, where the bracket is read as an anonymous table.
            Token::Word(word) if word.eq_ignore_ascii_case("USING") => {
                self.frame.mode = Mode::Target(TargetKind::Read);
            }
            Token::Word(word) if is_reserved(word) => self.clause_keyword(word),
            // An alias.
            Token::Word(_) | Token::Quoted => {
                return Step::Next(self.name(token, start).unwrap_or(end));
            }
            _ => self.frame.mode = Mode::Skip,
        }
        Step::Next(end)
    }

    fn cte_name(&mut self, token: Token<'a>, start: usize, end: usize) -> Step {
        if let Token::Word(word) = token {
            if word.eq_ignore_ascii_case("RECURSIVE") {
                return Step::Next(end);
            }
            if is_reserved(word) {
                self.frame.mode = Mode::Skip;
                return Step::Next(end);
            }
        }
        let Some(name_end) = self.name(token, start) else {
            self.frame.mode = Mode::Skip;
            return Step::Next(end);
        };
        match self.ctes.get_mut(self.cte_count) {
            Some(slot) => {
                *slot = self.text.get(start..name_end).unwrap_or_default();
                self.cte_count += 1;
            }
            // Uses of this one would be taken for a table.
            None => self.unsure = true,
        }
        self.frame.mode = Mode::CteAs { seen_as: false };
        Step::Next(name_end)
    }

    /// End of the (possibly qualified) name starting at `start`; `None` if
    /// there is none, or a part is unreadable.
    fn name(&self, token: Token<'a>, start: usize) -> Option<usize> {
        if !matches!(token, Token::Word(_) | Token::Quoted) {
            return None;
        }
        let end = name_end(self.text, start)?;
        // A name the cut may have shortened is not the name.
        (!self.cut || end < self.text.len()).then_some(end)
    }

    fn is_cte(&self, name: &str) -> bool {
        self.ctes
            .iter()
            .take(self.cte_count)
            .any(|cte| cte.eq_ignore_ascii_case(name))
    }

    /// The next byte after `i` that is not ASCII whitespace.
    fn next_byte(&self, i: usize) -> Option<u8> {
        let bytes = self.text.as_bytes();
        bytes
            .get(i..)?
            .iter()
            .copied()
            .find(|&b| !is_ascii_space(b))
    }

    fn push_operation(&mut self, keyword: &str) {
        self.any_operation = true;
        self.push_summary(keyword);
        if !self.summary_full {
            // Keywords are ASCII (they matched a list), so this is in place.
            let len = self.summary.len();
            if let Some(last) = self.summary.get_mut(len.saturating_sub(keyword.len())..) {
                last.make_ascii_uppercase();
            }
        }
    }

    /// Appends `word`, space-separated, if it fits whole.
    fn push_summary(&mut self, word: &str) {
        if self.summary_full || word.is_empty() {
            return;
        }
        let chars = word.chars().count();
        let space = usize::from(self.summary_chars > 0);
        if self.summary_chars + space + chars > QuerySummary::MAX_CHARS {
            self.summary_full = true;
            return;
        }
        if space > 0 {
            self.summary.push(' ');
        } else {
            // Room for the usual summary at once, rather than growing it.
            self.summary.reserve(64);
        }
        self.summary.push_str(word);
        self.summary_chars += space + chars;
    }
}

/// How a statement starting with `word` begins; `nested` when it is not
/// the text's first statement keyword (a subquery, or after `WITH`), where
/// only queries may start.
fn opening(word: &str, nested: bool) -> Option<Opening> {
    let word = Upper::new(word);
    let opening = match word.get() {
        b"SELECT" => Opening::Select,
        b"INSERT" => Opening::Insert,
        b"UPDATE" => Opening::Update,
        b"DELETE" => Opening::Delete,
        b"MERGE" => Opening::Merge,
        b"WITH" => Opening::With,
        _ if nested => return None,
        // MySQL's; `replace(` in an expression is a function.
        b"REPLACE" => Opening::Insert,
        b"TRUNCATE" => Opening::Truncate,
        b"COPY" => Opening::Copy,
        b"TABLE" => Opening::Table,
        b"CALL" | b"EXEC" | b"EXECUTE" => Opening::Procedure,
        b"ABORT" | b"ALTER" | b"ANALYZE" | b"ANALYSE" | b"BEGIN" | b"CHECKPOINT" | b"CLOSE"
        | b"CLUSTER" | b"COMMENT" | b"COMMIT" | b"CREATE" | b"DEALLOCATE" | b"DECLARE"
        | b"DESC" | b"DESCRIBE" | b"DISCARD" | b"DO" | b"DROP" | b"END" | b"EXPLAIN" | b"FETCH"
        | b"FLUSH" | b"GRANT" | b"HANDLER" | b"KILL" | b"LISTEN" | b"LOAD" | b"LOCK" | b"MOVE"
        | b"NOTIFY" | b"OPTIMIZE" | b"PREPARE" | b"REASSIGN" | b"REFRESH" | b"REINDEX"
        | b"RELEASE" | b"RENAME" | b"REPAIR" | b"RESET" | b"REVOKE" | b"ROLLBACK"
        | b"SAVEPOINT" | b"SECURITY" | b"SET" | b"SHOW" | b"START" | b"UNLISTEN" | b"UNLOCK"
        | b"USE" | b"VACUUM" | b"VALUES" | b"XA" => Opening::Alone,
        _ => return None,
    };
    Some(opening)
}

/// Words between a table keyword and the table: `FROM ONLY t`, `INSERT
/// IGNORE INTO t`, `TRUNCATE TABLE t`, `JOIN LATERAL (...)`.
fn is_target_modifier(word: &str) -> bool {
    matches!(
        Upper::new(word).get(),
        b"INTO"
            | b"ONLY"
            | b"LATERAL"
            | b"TABLE"
            | b"IGNORE"
            | b"LOW_PRIORITY"
            | b"HIGH_PRIORITY"
            | b"DELAYED"
            | b"QUICK"
    )
}

/// Keywords that end a table list or cannot be an alias (a table so named
/// must be quoted anyway).
fn is_reserved(word: &str) -> bool {
    matches!(
        Upper::new(word).get(),
        b"SELECT"
            | b"FROM"
            | b"WHERE"
            | b"JOIN"
            | b"STRAIGHT_JOIN"
            | b"INNER"
            | b"LEFT"
            | b"RIGHT"
            | b"FULL"
            | b"OUTER"
            | b"CROSS"
            | b"NATURAL"
            | b"ON"
            | b"USING"
            | b"SET"
            | b"VALUES"
            | b"GROUP"
            | b"ORDER"
            | b"HAVING"
            | b"LIMIT"
            | b"OFFSET"
            | b"FETCH"
            | b"FOR"
            | b"UNION"
            | b"EXCEPT"
            | b"INTERSECT"
            | b"RETURNING"
            | b"WINDOW"
            | b"AS"
            | b"WITH"
            | b"INTO"
            | b"DEFAULT"
            | b"WHEN"
            | b"THEN"
            | b"ELSE"
            | b"END"
            | b"AND"
            | b"OR"
            | b"NOT"
            | b"NULL"
            | b"IS"
            | b"IN"
            | b"LIKE"
            | b"BETWEEN"
            | b"CASE"
            | b"DUAL"
            | b"TO"
            | b"LOCK"
    )
}

/// A word in ASCII uppercase, on the stack, to match keywords without
/// allocating; words longer than any keyword here match none.
struct Upper {
    bytes: [u8; Upper::MAX],
    len: usize,
}

impl Upper {
    const MAX: usize = 16;

    fn new(word: &str) -> Upper {
        let mut bytes = [0; Upper::MAX];
        if word.len() > Upper::MAX {
            return Upper { bytes, len: 0 };
        }
        for (to, from) in bytes.iter_mut().zip(word.bytes()) {
            *to = from.to_ascii_uppercase();
        }
        Upper {
            bytes,
            len: word.len(),
        }
    }

    fn get(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

/// Whether an unquoted identifier starts at `i`.
fn starts_unquoted_part(text: &str, i: usize) -> bool {
    match text.as_bytes().get(i) {
        Some(&b) if b.is_ascii() => b.is_ascii_alphabetic() || b == b'_',
        Some(_) => !char_at(text, i).is_whitespace(),
        None => false,
    }
}

/// End of the quoted identifier (`"..."` or `` `...` ``, doubled quotes
/// inside) opening at `i`, and whether it is free of control characters;
/// `None` if it is not closed.
fn quoted_part_end(bytes: &[u8], i: usize) -> Option<(usize, bool)> {
    let quote = *bytes.get(i)?;
    let mut clean = true;
    let mut j = i + 1;
    loop {
        let b = *bytes.get(j)?;
        if b == quote {
            if bytes.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return Some((j + 1, clean));
        }
        clean &= !b.is_ascii_control();
        j += 1;
    }
}

/// End of the name starting at `i`: identifier parts, quoted or not, joined
/// by `.` with nothing between (`public.users`, `"S"."T"`, `` `db`.`t` ``).
/// `None` if no readable part starts there.
fn name_end(text: &str, i: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let part_end = |at: usize| -> Option<usize> {
        match bytes.get(at) {
            Some(b'"' | b'`') => match quoted_part_end(bytes, at)? {
                (end, true) => Some(end),
                (_, false) => None,
            },
            _ if starts_unquoted_part(text, at) => Some(ident_end(text, at, true)),
            _ => None,
        }
    };
    let mut end = part_end(i)?;
    while bytes.get(end) == Some(&b'.') {
        match part_end(end + 1) {
            Some(next) => end = next,
            None => break,
        }
    }
    Some(end)
}

/// End of what starts with `$` at `i`: a dollar-quoted literal (to its
/// closing tag), or a `$1` placeholder.
fn dollar_end(text: &str, i: usize) -> usize {
    let bytes = text.as_bytes();
    let tagged = !bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
    let tag_end = ident_end(text, i + 1, false);
    if tagged && bytes.get(tag_end) == Some(&b'$') {
        let tag = text.get(i..=tag_end).unwrap_or("$");
        let body = tag_end + 1;
        return text
            .get(body..)
            .and_then(|rest| rest.find(tag))
            .map_or(text.len(), |k| body + k + tag.len());
    }
    let digits = bytes.get(i + 1..).map_or(0, |rest| {
        rest.iter().take_while(|b| b.is_ascii_digit()).count()
    });
    i + 1 + digits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn described_queries_are_kept_as_sent_and_shown_sanitized() {
        let sql = b"SELECT * FROM users WHERE email = 'ann@example.com' AND id = 42";
        let (operation, query) = describe(sql, false, Dialect::Standard);
        assert_eq!(operation.as_deref(), Some("SELECT"));
        let query = query.expect("a query");
        let shown = "SELECT * FROM users WHERE email = ? AND id = ?";
        assert_eq!(query.text(), shown);
        // Every way out is the shown text, serialization included.
        assert_eq!(
            serde_json::to_string(&query).expect("json"),
            format!("{shown:?}")
        );
        let mut copy = QueryText::shown_as_is("x".repeat(300));
        copy.clone_from(&query);
        assert_eq!(copy.text(), shown);
        // Raw on request.
        let (_, raw) = describe(sql, true, Dialect::Standard);
        assert!(raw.expect("raw").text().contains("ann@example.com"));
        // Nothing but space: no query.
        assert_eq!(describe(b"  \n ", false, Dialect::Standard).1, None);
    }

    #[track_caller]
    fn same(input: &str, want: &str) {
        assert_eq!(sanitize(input), want, "input: {input:?}");
    }

    #[test]
    fn error_messages_lose_what_they_quote() {
        for (message, want) in [
            (
                "invalid input syntax for type integer: \"s3cret\"",
                "invalid input syntax for type integer: ?",
            ),
            (
                "Duplicate entry 'bob@example.com' for key 'users.email'",
                "Duplicate entry ?",
            ),
            // MySQL echoes the rest of the query, quotes and all.
            (
                "You have an error in your SQL syntax; check the manual near ''s3cret', 'x' at line 1",
                "You have an error in your SQL syntax; check the manual near ? at line 1",
            ),
            (
                "ERR unknown command 'AUTHX', with args beginning with: 's3cret' ",
                "ERR unknown command ? ",
            ),
            // Cut short inside a quote: hidden to the end.
            ("value \"s3cret", "value ?"),
            ("division by zero", "division by zero"),
            ("", ""),
            ("'", "?"),
            ("ü\"ü\"ü", "ü?ü"),
        ] {
            assert_eq!(sanitize_error_message(message), want, "{message:?}");
        }
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

    #[track_caller]
    fn summary_of(sql: &str) -> Option<(String, Option<String>)> {
        query_summary(sql).map(|s| (s.summary, s.collection))
    }

    /// The summary and collection of `sql` once sanitized (PostgreSQL rules).
    #[track_caller]
    fn summarized(sql: &str, summary: &str, collection: Option<&str>) {
        let got = summary_of(&sanitize(sql));
        let want = Some((summary.to_string(), collection.map(str::to_string)));
        assert_eq!(got, want, "input: {sql:?}");
    }

    #[track_caller]
    fn summarized_mysql(sql: &str, summary: &str, collection: Option<&str>) {
        let got = summary_of(&sanitize_dialect(sql, Dialect::Mysql));
        let want = Some((summary.to_string(), collection.map(str::to_string)));
        assert_eq!(got, want, "input: {sql:?}");
    }

    #[test]
    fn summaries_of_the_conventions_examples() {
        summarized(
            "SELECT *\nFROM   wuser_table\nWHERE  username = 'jdoe'",
            "SELECT wuser_table",
            Some("wuser_table"),
        );
        summarized(
            "INSERT INTO shipping_details\n (order_id,\n address)\nSELECT order_id,\n address\n\
             FROM orders\nWHERE order_id = 42",
            "INSERT shipping_details SELECT orders",
            None,
        );
        summarized(
            "SELECT *\nFROM songs,\n artists\nWHERE songs.artist_id == artists.id",
            "SELECT songs artists",
            None,
        );
        summarized(
            "SELECT order_date\nFROM (SELECT *\n FROM orders o\n JOIN customers c\n \
             ON o.customer_id = c.customer_id)",
            "SELECT SELECT orders customers",
            None,
        );
        // The conventions' `'artists'` is a string in PostgreSQL and MySQL:
        // sanitized to `?`, and never echoed.
        summarized(
            "SELECT *\nFROM \"song list\",\n 'artists'",
            "SELECT \"song list\"",
            Some("\"song list\""),
        );
        // Operations are uppercased as db.operation.name is; procedures are
        // not collections.
        summarized(
            "call some_stored_procedure",
            "CALL some_stored_procedure",
            None,
        );
        summarized(
            "EXECUTE some_stored_procedure",
            "EXECUTE some_stored_procedure",
            None,
        );
    }

    #[test]
    fn summaries_of_everyday_statements() {
        // pgbench's TPC-B-like script.
        summarized(
            "UPDATE pgbench_accounts SET abalance = abalance + -12 WHERE aid = 7;",
            "UPDATE pgbench_accounts",
            Some("pgbench_accounts"),
        );
        summarized(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
            "SELECT pgbench_accounts",
            Some("pgbench_accounts"),
        );
        summarized(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
             VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP);",
            "INSERT pgbench_history",
            Some("pgbench_history"),
        );
        summarized("END;", "END", None);
        summarized(
            "delete from sessions where id = $1",
            "DELETE sessions",
            Some("sessions"),
        );
        summarized(
            "SELECT count(*) FROM t LEFT OUTER JOIN u USING (id) CROSS JOIN v",
            "SELECT t u v",
            None,
        );
        summarized(
            "SELECT a FROM t1 AS x, t2 y WHERE x.id = y.id ORDER BY a LIMIT 5",
            "SELECT t1 t2",
            None,
        );
        // A self-join works on one table.
        summarized(
            "SELECT * FROM t a JOIN t b ON a.p = b.id",
            "SELECT t t",
            Some("t"),
        );
        summarized(
            "DELETE FROM t WHERE id IN (SELECT id FROM u WHERE x > 3)",
            "DELETE t SELECT u",
            None,
        );
        summarized(
            "UPDATE t SET a = (SELECT max(b) FROM u) FROM v WHERE t.id = v.id",
            "UPDATE t SELECT u v",
            None,
        );
        summarized(
            "SELECT * FROM a UNION ALL SELECT * FROM b",
            "SELECT a SELECT b",
            None,
        );
        summarized(
            "(SELECT 1 FROM a) UNION (SELECT 2 FROM a)",
            "SELECT a SELECT a",
            Some("a"),
        );
        summarized("SELECT 1", "SELECT", None);
        summarized("SELECT now()", "SELECT", None);
        summarized("TRUNCATE TABLE a, b", "TRUNCATE a b", None);
        summarized("TABLE users", "TABLE users", Some("users"));
        summarized("VALUES (1, 2)", "VALUES", None);
    }

    #[test]
    fn from_that_names_no_table() {
        summarized(
            "SELECT extract(epoch FROM created) FROM t",
            "SELECT t",
            Some("t"),
        );
        summarized(
            "SELECT substring(name FROM 2 FOR 3), trim(both FROM x) FROM t",
            "SELECT t",
            Some("t"),
        );
        summarized(
            "SELECT * FROM t WHERE a IS DISTINCT FROM b AND c IS NOT DISTINCT FROM d",
            "SELECT t",
            Some("t"),
        );
        // Table functions are not tables.
        summarized(
            "SELECT * FROM generate_series(1, 10) g JOIN t ON t.id = g",
            "SELECT t",
            Some("t"),
        );
        summarized("SELECT * FROM unnest($1::int[])", "SELECT", None);
        summarized("SELECT * FROM (VALUES (1), (2)) v(a)", "SELECT", None);
        summarized("SELECT * FROM ONLY parent", "SELECT parent", Some("parent"));
        summarized(
            "SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.t = t.id) x",
            "SELECT t SELECT u",
            None,
        );
    }

    #[test]
    fn updates_inside_inserts_and_selects_are_not_statements() {
        summarized(
            "INSERT INTO t (id, n) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n \
             RETURNING id",
            "INSERT t",
            Some("t"),
        );
        summarized_mysql(
            "INSERT INTO t (a) VALUES (1) ON DUPLICATE KEY UPDATE a = VALUES(a)",
            "INSERT t",
            Some("t"),
        );
        summarized(
            "SELECT * FROM jobs WHERE state = 'new' FOR UPDATE SKIP LOCKED",
            "SELECT jobs",
            Some("jobs"),
        );
        summarized(
            "MERGE INTO stock s USING deliveries d ON s.item = d.item \
             WHEN MATCHED THEN UPDATE SET qty = s.qty + d.qty \
             WHEN NOT MATCHED THEN INSERT (item, qty) VALUES (d.item, d.qty)",
            "MERGE stock deliveries",
            None,
        );
        summarized(
            "MERGE INTO stock USING (SELECT * FROM deliveries) d ON true \
             WHEN MATCHED THEN DELETE",
            "MERGE stock SELECT deliveries",
            None,
        );
    }

    #[test]
    fn with_queries_are_read_and_their_names_left_out() {
        summarized(
            "WITH recent AS (SELECT * FROM orders WHERE at > now() - interval '1 day') \
             SELECT * FROM recent JOIN customers c ON c.id = recent.customer",
            "SELECT orders SELECT customers",
            None,
        );
        summarized(
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 9) \
             SELECT sum(n) FROM r",
            "SELECT SELECT SELECT",
            None,
        );
        summarized(
            "WITH gone AS (DELETE FROM queue WHERE done RETURNING *), \
             \"Kept\" AS NOT MATERIALIZED (SELECT 1) \
             INSERT INTO archive SELECT * FROM gone",
            "DELETE queue SELECT INSERT archive SELECT",
            None,
        );
        summarized(
            "WITH x AS (SELECT * FROM t) DELETE FROM t WHERE id IN (SELECT id FROM x)",
            "SELECT t DELETE t SELECT",
            Some("t"),
        );
    }

    #[test]
    fn quoting_and_schemas_as_written() {
        summarized(
            "SELECT * FROM public.users WHERE id = 1",
            "SELECT public.users",
            Some("public.users"),
        );
        summarized(
            "UPDATE \"Sales\".\"Order Items\" SET n = 1",
            "UPDATE \"Sales\".\"Order Items\"",
            Some("\"Sales\".\"Order Items\""),
        );
        summarized(
            "SELECT * FROM \"we\"\"ird\" w",
            "SELECT \"we\"\"ird\"",
            Some("\"we\"\"ird\""),
        );
        summarized("SELECT * FROM Ünïcödé", "SELECT Ünïcödé", Some("Ünïcödé"));
        summarized_mysql(
            "SELECT * FROM `shop`.`order` o WHERE o.note = \"x\"",
            "SELECT `shop`.`order`",
            Some("`shop`.`order`"),
        );
        summarized_mysql(
            "INSERT IGNORE INTO `t` SET a = 'x'",
            "INSERT `t`",
            Some("`t`"),
        );
        summarized_mysql("REPLACE INTO t VALUES (1)", "REPLACE t", Some("t"));
        summarized_mysql(
            "UPDATE LOW_PRIORITY t1, t2 SET t1.a = t2.a WHERE t1.id = t2.id",
            "UPDATE t1 t2",
            None,
        );
        summarized_mysql(
            "DELETE t1 FROM t1 INNER JOIN t2 ON t1.id = t2.id",
            "DELETE t1 t2",
            None,
        );
        summarized_mysql("SELECT 1 FROM DUAL", "SELECT", None);
        summarized_mysql("CALL shop.refresh(?)", "CALL shop.refresh", None);
        summarized_mysql("SHOW TABLES", "SHOW", None);
        summarized("COPY t (a, b) FROM STDIN", "COPY t", Some("t"));
        summarized(
            "COPY (SELECT * FROM t) TO STDOUT",
            "COPY SELECT t",
            Some("t"),
        );
    }

    #[test]
    fn statements_not_understood() {
        for sql in [
            "",
            "   ",
            "?",
            "42",
            "hello world",
            "(foo)",
            "$1",
            "'x'",
            "\"t\"",
        ] {
            assert_eq!(query_summary(sql), None, "{sql:?}");
        }
        // Known statements whose targets are not read give their keyword.
        summarized("begin", "BEGIN", None);
        summarized("CREATE TABLE t (id int)", "CREATE", None);
        summarized("SET search_path = app", "SET", None);
        summarized(";; SELECT 1", "SELECT", None);
        // Only the first statement is read.
        summarized("SELECT * FROM a; DELETE FROM b", "SELECT a", Some("a"));
        summarized("SELECT FROM", "SELECT", None);
        summarized("INSERT INTO", "INSERT", None);
    }

    #[test]
    fn summaries_hold_no_literals() {
        // Raw text, should it ever get here: strings, dollar quotes and
        // numbers never go out, only keywords and identifiers.
        for sql in [
            "SELECT * FROM 'secret'",
            "SELECT * FROM $q$secret$q$",
            "SELECT * FROM t WHERE a = 'secret' OR b = $$secret$$",
            "INSERT INTO t VALUES ('secret', 12345)",
            "CALL 'secret'()",
            "UPDATE 12345 SET a = 'secret'",
            "SELECT * FROM \"unterminated secret",
            "SELECT * FROM \"sec\nret\"",
        ] {
            if let Some(s) = query_summary(sql) {
                for secret in ["secret", "12345", "'"] {
                    assert!(!s.summary.contains(secret), "{sql:?} -> {s:?}");
                    assert!(
                        !s.collection.as_deref().unwrap_or_default().contains(secret),
                        "{sql:?} -> {s:?}"
                    );
                }
            }
        }
        // A name that cannot be read is a table all the same: no collection.
        assert_eq!(
            summary_of("SELECT * FROM a JOIN \"b"),
            Some(("SELECT a".to_string(), None))
        );
    }

    #[test]
    fn summaries_and_names_are_bounded() {
        // A name longer than a server takes is left out, not cut, and
        // leaves the collection unknown.
        let long = "n".repeat(QuerySummary::NAME_MAX_CHARS + 1);
        summarized(&format!("SELECT * FROM {long}"), "SELECT", None);
        let longest = "n".repeat(QuerySummary::NAME_MAX_CHARS);
        summarized(
            &format!("SELECT * FROM {longest}"),
            &format!("SELECT {longest}"),
            Some(&longest),
        );
        // The summary stops before the first word that does not fit whole.
        let tables: Vec<String> = (0..40).map(|k| format!("table_{k:02}")).collect();
        let sql = format!("SELECT * FROM {}", tables.join(", "));
        let s = query_summary(&sql).expect("a summary");
        assert!(s.summary.chars().count() <= QuerySummary::MAX_CHARS);
        assert!(s.summary.chars().count() > QuerySummary::MAX_CHARS - 10);
        assert!(s.summary.ends_with(|c: char| c.is_ascii_digit()), "{s:?}");
        assert_eq!(s.collection, None);
        let cut_at = s.summary.matches(' ').count();
        assert_eq!(s.summary, format!("SELECT {}", tables[..cut_at].join(" ")));
        // Wide names: the cap counts characters; after the first word that
        // does not fit, nothing goes in, even a word that would.
        let wide = "é".repeat(62);
        let sql = format!("SELECT * FROM {wide} JOIN {wide} x JOIN {wide} y JOIN {wide} z JOIN b");
        let s = query_summary(&sql).expect("a summary");
        assert_eq!(s.summary, format!("SELECT {wide} {wide} {wide}"));
        assert_eq!(s.collection, None);
    }

    #[test]
    fn only_the_head_is_read() {
        // A table past the first KiB is not seen, so no collection is
        // claimed for a longer text.
        let columns = "col, ".repeat(300);
        let sql = format!("SELECT {columns} a FROM t");
        assert_eq!(summary_of(&sql), Some(("SELECT".to_string(), None)));
        // A name cut by the bound is not taken for a shorter one.
        let pad = " ".repeat(SUMMARY_SCAN_MAX - "SELECT * FROM ab".len() + 1);
        let sql = format!("SELECT * FROM{pad}abcdef");
        assert_eq!(summary_of(&sql), Some(("SELECT".to_string(), None)));
        // Multi-byte characters across the bound.
        let sql = format!("SELECT * FROM t WHERE a = {}", "é".repeat(2000));
        assert_eq!(summary_of(&sql), Some(("SELECT t".to_string(), None)));
    }

    #[test]
    fn deep_or_broken_text_does_not_panic() {
        let deep = format!("SELECT {} 1 FROM t", "(".repeat(100));
        assert_eq!(summary_of(&deep), Some(("SELECT".to_string(), None)));
        let nested = format!(
            "{}SELECT * FROM t{}",
            "(SELECT * FROM ".repeat(10),
            ")".repeat(10)
        );
        let s = query_summary(&nested).expect("a summary");
        assert!(s.summary.starts_with("SELECT SELECT"), "{s:?}");
        for sql in [
            ")))) SELECT",
            "SELECT ))) FROM t",
            "SELECT * FROM t (((",
            "WITH",
            "WITH x",
            "WITH x AS",
            "WITH x AS (",
            "WITH x AS (SELECT 1),",
            "CALL",
            "SELECT * FROM t.",
            "SELECT * FROM .t",
            "SELECT * FROM t..u",
            "SELECT * FROM \"",
            "SELECT * FROM `",
            "SELECT $",
            "SELECT $a",
            "SELECT /* never closed",
            "SELECT 'x",
            "\u{2003}SELECT\u{2003}*\u{2003}FROM\u{2003}t",
        ] {
            if let Some(s) = query_summary(sql) {
                assert!(s.summary.starts_with(char::is_alphabetic), "{sql:?}: {s:?}");
            }
        }
        // A CTE more than the ones remembered: its name might be taken for
        // a table, so no collection.
        let ctes: Vec<String> = (0..=CTE_NAMES_MAX)
            .map(|k| format!("c{k} AS (SELECT 1)"))
            .collect();
        let sql = format!("WITH {} SELECT * FROM c{CTE_NAMES_MAX}", ctes.join(", "));
        let s = query_summary(&sql).expect("a summary");
        assert_eq!(s.collection, None);
        assert!(
            s.summary.ends_with(&format!("SELECT c{CTE_NAMES_MAX}")),
            "{s:?}"
        );
    }
}
