#![no_main]

use libfuzzer_sys::fuzz_target;
use poolscope::protocol::{query_summary, sanitize, QuerySummary};

fuzz_target!(|data: &[u8]| {
    let sql = String::from_utf8_lossy(data);
    // Sanitized text is what the agent passes; raw text must be survived too.
    check(&sql);
    check(&sanitize(&sql));
});

/// Bounds hold, and nothing goes out that the text does not hold: every
/// word of the summary is in it (keywords in any case), and so is the
/// collection, as written.
fn check(sql: &str) {
    let Some(found) = query_summary(sql) else {
        return;
    };
    let summary = &found.summary;
    assert!(
        summary.chars().count() <= QuerySummary::MAX_CHARS,
        "{found:?}"
    );
    assert!(
        !summary.is_empty() && summary.trim() == summary,
        "{found:?}"
    );
    let upper = sql.to_ascii_uppercase();
    // (A quoted name may hold runs of spaces: empty words are no words.)
    for word in summary.split(' ').filter(|word| !word.is_empty()) {
        assert!(
            upper.contains(&word.to_ascii_uppercase()),
            "{word:?} of {found:?} is not in {sql:?}"
        );
    }
    if let Some(collection) = &found.collection {
        assert!(
            collection.chars().count() <= QuerySummary::NAME_MAX_CHARS,
            "{found:?}"
        );
        assert!(sql.contains(collection.as_str()), "{found:?} from {sql:?}");
    }
}
