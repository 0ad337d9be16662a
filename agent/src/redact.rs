//! Secrets out of command lines before they reach any output (leak reports,
//! the API, logs, OTLP, the live page).
//!
//! Command lines often carry credentials: a connection URL with a password,
//! `--password=...`, `PGPASSWORD=...` before a command run through `env`,
//! `mysql -pSECRET`, `redis-cli -a SECRET`. Pure: takes the arguments,
//! returns the text to show.

/// What stands in for a secret.
pub const REDACTED: &str = "***";

/// Words that make a `key=value` or `--key value` a secret when the key
/// contains one of them (compared case-insensitively).
const SECRET_KEYS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "pass",
    "secret",
    "token",
    "apikey",
    "api_key",
    "api-key",
    "auth",
    "credential",
    "private_key",
    "private-key",
];

/// Flags whose next argument is a secret, for any program.
const SECRET_FLAGS: &[&str] = &[
    "--password",
    "--passwd",
    "--pass",
    "--token",
    "--secret",
    "--api-key",
    "--apikey",
    "--auth",
    "--access-token",
];

/// The command line as one string, arguments joined by spaces, with every
/// secret replaced by [`REDACTED`].
pub fn command_line(args: &[String]) -> String {
    let program = args
        .first()
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_ascii_lowercase())
        .unwrap_or_default();
    let mysql_like = program.contains("mysql") || program.contains("mariadb");
    let redis_like = program.contains("redis-cli");
    let mut out: Vec<String> = Vec::with_capacity(args.len());
    let mut next_is_secret = false;
    for (i, arg) in args.iter().enumerate() {
        if next_is_secret {
            out.push(REDACTED.to_string());
            next_is_secret = false;
            continue;
        }
        if i > 0 {
            let lower = arg.to_ascii_lowercase();
            if SECRET_FLAGS.contains(&lower.as_str()) || (redis_like && arg == "-a") {
                out.push(arg.clone());
                next_is_secret = true;
                continue;
            }
            // mysql -pSECRET (an attached value; a bare -p prompts).
            if mysql_like && arg.len() > 2 && arg.starts_with("-p") && !arg.starts_with("--") {
                out.push(format!("-p{REDACTED}"));
                continue;
            }
        }
        out.push(redact_words(arg));
    }
    out.join(" ")
}

/// One argument, which may hold several space-separated words (a libpq
/// connection string): each `key=value` with a secret key and each URL's
/// password is redacted.
fn redact_words(arg: &str) -> String {
    if !arg.contains('=') && !arg.contains('@') {
        return arg.to_string();
    }
    arg.split(' ')
        .map(redact_word)
        .collect::<Vec<_>>()
        .join(" ")
}

fn redact_word(word: &str) -> String {
    if let Some(at) = url_password(word) {
        let (start, end) = at;
        return format!("{}{REDACTED}{}", &word[..start], &word[end..]);
    }
    if let Some(eq) = word.find('=') {
        let key = word[..eq].trim_start_matches('-').to_ascii_lowercase();
        if is_secret_key(&key) && eq + 1 < word.len() {
            return format!("{}={REDACTED}", &word[..eq]);
        }
        // --dsn=postgres://u:p@h/db: the URL is in the value.
        if let Some((start, end)) = url_password(&word[eq + 1..]) {
            let base = eq + 1;
            return format!("{}{REDACTED}{}", &word[..base + start], &word[base + end..]);
        }
    }
    word.to_string()
}

fn is_secret_key(key: &str) -> bool {
    !key.is_empty() && SECRET_KEYS.iter().any(|k| key.contains(k))
}

/// The byte range of the password in `scheme://user:password@host...`.
fn url_password(word: &str) -> Option<(usize, usize)> {
    let scheme_end = word.find("://")? + 3;
    let rest = &word[scheme_end..];
    // The authority ends at the first '/', '?' or '#'; its last '@' ends the
    // userinfo (passwords may contain '@' only percent-encoded, but be safe).
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let at = authority.rfind('@')?;
    let userinfo = &authority[..at];
    let colon = userinfo.find(':')?;
    if colon + 1 == userinfo.len() {
        return None;
    }
    Some((scheme_end + colon + 1, scheme_end + at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(line: &str) -> String {
        let args: Vec<String> = line.split('\u{1}').map(str::to_string).collect();
        command_line(&args)
    }

    #[test]
    fn url_passwords_are_hidden_and_the_rest_kept() {
        assert_eq!(
            redacted("python3\u{1}app.py\u{1}postgresql://orders:s3cret@db:5432/orders"),
            "python3 app.py postgresql://orders:***@db:5432/orders"
        );
        assert_eq!(
            redacted("app\u{1}--dsn=mysql://root:hunter2@127.0.0.1/x?ssl=1"),
            "app --dsn=mysql://root:***@127.0.0.1/x?ssl=1"
        );
        assert_eq!(
            redacted("app\u{1}redis://:topsecret@cache:6379/0"),
            "app redis://:***@cache:6379/0"
        );
        // No password, nothing to hide.
        assert_eq!(
            redacted("app\u{1}postgresql://orders@db/orders"),
            "app postgresql://orders@db/orders"
        );
    }

    #[test]
    fn key_value_secrets_are_hidden() {
        assert_eq!(
            redacted("env\u{1}PGPASSWORD=abc\u{1}psql\u{1}-h\u{1}db"),
            "env PGPASSWORD=*** psql -h db"
        );
        assert_eq!(
            redacted("app\u{1}--password=abc\u{1}--api-token=xyz\u{1}--port=5432"),
            "app --password=*** --api-token=*** --port=5432"
        );
        assert_eq!(
            redacted("app\u{1}host=db user=u password=abc dbname=d"),
            "app host=db user=u password=*** dbname=d"
        );
    }

    #[test]
    fn flags_whose_next_argument_is_a_secret() {
        assert_eq!(
            redacted("app\u{1}--password\u{1}abc\u{1}--user\u{1}bob"),
            "app --password *** --user bob"
        );
        assert_eq!(
            redacted("/usr/bin/redis-cli\u{1}-a\u{1}abc\u{1}GET\u{1}k"),
            "/usr/bin/redis-cli -a *** GET k"
        );
        assert_eq!(
            redacted("mysql\u{1}-uroot\u{1}-psecret\u{1}-h\u{1}db"),
            "mysql -uroot -p*** -h db"
        );
        // psql's -p is a port, not a password.
        assert_eq!(redacted("psql\u{1}-p\u{1}5432"), "psql -p 5432");
        assert_eq!(redacted("psql\u{1}-p5432"), "psql -p5432");
    }

    #[test]
    fn plain_command_lines_are_unchanged() {
        for line in [
            "python3 app.py --workers 4",
            "java -jar app.jar",
            "node server.js --port=8080",
            "",
        ] {
            let args: Vec<String> = line.split(' ').map(str::to_string).collect();
            assert_eq!(command_line(&args), line);
        }
    }

    #[test]
    fn odd_input_never_panics() {
        for line in [
            "=",
            "://",
            "a://@",
            "a://:@",
            "x=\u{1}--password",
            "-p",
            "\u{1}=",
            "ü://ü:ü@ü",
        ] {
            let args: Vec<String> = line.split('\u{1}').map(str::to_string).collect();
            let _ = command_line(&args);
        }
    }
}
