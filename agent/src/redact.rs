//! Secrets out of command lines before they reach any output (leak reports,
//! the API, logs, OTLP, the live page).
//!
//! Command lines often carry credentials: a connection URL with a password
//! or a `password=` query parameter, `--password=...`, `--db-password X`,
//! `PGPASSWORD=...` before a command run through `env`, `mysql -pSECRET`,
//! `redis-cli -a SECRET`. Pure: takes the arguments, returns the text to
//! show. The rules, which err toward hiding too much:
//! - a `key=value` whose key holds one of [`SECRET_KEYS`] shows `key=***`,
//!   and so does each such pair in a value's query (after `?`, `&` or `;`:
//!   `jdbc:postgresql://h/db?user=u&password=x`);
//! - a URL's `user:password@` shows `user:***@`;
//! - a flag without `=` whose name holds one of [`SECRET_KEYS`]
//!   (`--password`, `--client-secret`, `--requirepass`) hides the next
//!   argument;
//! - the program is the first argument that is neither a wrapper from
//!   [`WRAPPERS`] (with its options and arguments) nor a `K=V`, so
//!   `sudo redis-cli -a X` and `env PGPASSWORD=x mysql -pX` are the programs'
//!   own: `-pX` for mysql and mariadb, `-a X` for redis-cli;
//! - an argument with spaces (`sh -c "..."`, a libpq connection string) has
//!   its words redacted by these same rules; shell quoting is not parsed.

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

/// Programs that run another: its name, its options that take the next
/// argument as their value, and how many arguments it takes before the
/// program (`timeout 30 psql`, `taskset 0x3 psql`, `chrt -f 10 psql`).
/// Options are skipped up to the first argument not starting with `-` (or
/// after `--`).
const WRAPPERS: &[(&str, &[&str], usize)] = &[
    (
        "env",
        &["-u", "--unset", "-C", "--chdir", "-S", "--split-string"],
        0,
    ),
    (
        "sudo",
        &[
            "-u",
            "--user",
            "-g",
            "--group",
            "-C",
            "--close-from",
            "-D",
            "--chdir",
            "-h",
            "--host",
            "-p",
            "--prompt",
            "-r",
            "--role",
            "-t",
            "--type",
            "-T",
            "--command-timeout",
            "-U",
            "--other-user",
        ],
        0,
    ),
    ("doas", &["-u", "-C"], 0),
    ("nice", &["-n", "--adjustment"], 0),
    ("nohup", &[], 0),
    ("setsid", &[], 0),
    ("exec", &["-a"], 0),
    ("timeout", &["-s", "--signal", "-k", "--kill-after"], 1),
    (
        "ionice",
        &[
            "-c",
            "--class",
            "-n",
            "--classdata",
            "-p",
            "--pid",
            "-P",
            "--pgid",
            "-u",
            "--uid",
        ],
        0,
    ),
    ("taskset", &[], 1),
    (
        "chrt",
        &[
            "-T",
            "--sched-runtime",
            "-P",
            "--sched-period",
            "-D",
            "--sched-deadline",
        ],
        1,
    ),
    (
        "stdbuf",
        &["-i", "--input", "-o", "--output", "-e", "--error"],
        0,
    ),
];

/// The command line as one string, arguments joined by spaces, with every
/// secret replaced by [`REDACTED`].
pub fn command_line(args: &[String]) -> String {
    command_args(args).join(" ")
}

/// Each argument as it may be shown.
pub fn command_args<S: AsRef<str>>(args: &[S]) -> Vec<String> {
    let program = program_index(args);
    let name = program
        .and_then(|p| args.get(p))
        .map(|p| basename(p.as_ref()))
        .unwrap_or_default();
    let mysql_like = name.contains("mysql") || name.contains("mariadb");
    let redis_like = name.contains("redis-cli");
    let mut out: Vec<String> = Vec::with_capacity(args.len());
    let mut next_is_secret = false;
    for (i, arg) in args.iter().enumerate() {
        let arg = arg.as_ref();
        if next_is_secret {
            out.push(REDACTED.to_string());
            next_is_secret = false;
            continue;
        }
        // The program's own flags: a wrapper's `-a` or `-p` is not theirs.
        let programs = program.is_some_and(|p| i > p);
        // mysql -pSECRET (an attached value; a bare -p prompts). First, as
        // `-psecret` would otherwise read as a secret flag of its own.
        if mysql_like
            && programs
            && arg.len() > 2
            && arg.starts_with("-p")
            && !arg.starts_with("--")
        {
            out.push(format!("-p{REDACTED}"));
            continue;
        }
        if is_secret_flag(arg) || (redis_like && programs && arg == "-a") {
            out.push(arg.to_string());
            next_is_secret = true;
            continue;
        }
        out.push(redact_words(arg));
    }
    out
}

/// The lowercase file name of a path.
fn basename(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase()
}

/// Where the program is: past the wrappers (with their options and
/// arguments) and `K=V` assignments; `None` when nothing is left.
fn program_index<S: AsRef<str>>(args: &[S]) -> Option<usize> {
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        let arg = arg.as_ref();
        let name = basename(arg);
        let Some(&(_, valued, positional)) = WRAPPERS.iter().find(|w| w.0 == name) else {
            if is_assignment(arg) {
                i += 1;
                continue;
            }
            return Some(i);
        };
        i += 1;
        while let Some(option) = args.get(i).map(AsRef::as_ref) {
            if option == "--" {
                i += 1;
                break;
            }
            if !option.starts_with('-') || option.len() == 1 {
                break;
            }
            i += if valued.contains(&option) { 2 } else { 1 };
        }
        i += positional;
    }
    None
}

/// `NAME=value`, as `env` and `sudo` take them before the program.
fn is_assignment(arg: &str) -> bool {
    arg.find('=')
        .is_some_and(|eq| eq > 0 && !arg.starts_with('-') && !arg[..eq].contains('/'))
}

/// `--db-password`, `-pass`, `--requirepass`: a flag (no `=`, no space)
/// whose name is a secret key, so its value is the next argument.
fn is_secret_flag(arg: &str) -> bool {
    arg.starts_with('-')
        && !arg.contains(['=', ' '])
        && is_secret_key(&arg.trim_start_matches('-').to_ascii_lowercase())
}

/// One argument. With spaces (a libpq connection string, `sh -c "..."`) its
/// words are redacted as a command line of their own; without, as a word.
fn redact_words(arg: &str) -> String {
    if arg.contains(' ') {
        let words: Vec<&str> = arg.split(' ').collect();
        return command_args(&words).join(" ");
    }
    redact_word(arg)
}

/// One word: `key=value` with a secret key, else a value's URL password
/// and query parameters.
fn redact_word(word: &str) -> String {
    if !word.contains('=') && !word.contains('@') {
        return word.to_string();
    }
    if let Some(eq) = word.find('=') {
        let key = &word[..eq];
        // A plain key (`--dsn`, `PGPASSWORD`), not a URL up to its query.
        if !key.contains([':', '/', '?', '&', ';']) {
            let secret = is_secret_key(&key.trim_start_matches('-').to_ascii_lowercase());
            if secret && eq + 1 < word.len() {
                return format!("{key}={REDACTED}");
            }
            return format!("{key}={}", redact_value(&word[eq + 1..]));
        }
    }
    redact_value(word)
}

/// A value: the password of its URL and every secret parameter of its query
/// (`?a=1&password=x`, `;password=x` for JDBC's SQL Server form).
fn redact_value(value: &str) -> String {
    let value = match url_password(value) {
        Some((start, end)) => format!("{}{REDACTED}{}", &value[..start], &value[end..]),
        None => value.to_string(),
    };
    if !value.contains('=') {
        return value;
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value.as_str();
    loop {
        let end = rest.find(['?', '&', ';']).unwrap_or(rest.len());
        let (param, tail) = rest.split_at(end);
        match param.split_once('=') {
            Some((key, v)) if !v.is_empty() && is_secret_key(&key.to_ascii_lowercase()) => {
                out.push_str(key);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(param),
        }
        // The separator (one ASCII byte) and what follows it.
        let Some(separator) = tail.chars().next() else {
            return out;
        };
        out.push(separator);
        rest = &tail[separator.len_utf8()..];
    }
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
    fn secret_query_parameters_are_hidden() {
        assert_eq!(
            redacted("java\u{1}--url=jdbc:postgresql://h/db?user=u&password=secret&ssl=true"),
            "java --url=jdbc:postgresql://h/db?user=u&password=***&ssl=true"
        );
        assert_eq!(
            redacted("app\u{1}postgresql://h/db?password=x"),
            "app postgresql://h/db?password=***"
        );
        assert_eq!(
            redacted("app\u{1}postgresql://h/db?sslmode=require&PASSWORD=x&application_name=a"),
            "app postgresql://h/db?sslmode=require&PASSWORD=***&application_name=a"
        );
        // The URL's password and a query secret together.
        assert_eq!(
            redacted("app\u{1}--dsn=mysql://root:pw@h/x?ssl=1&auth_token=t"),
            "app --dsn=mysql://root:***@h/x?ssl=1&auth_token=***"
        );
        // JDBC's SQL Server form separates parameters with `;`.
        assert_eq!(
            redacted("app\u{1}jdbc:sqlserver://h;user=sa;password=x;encrypt=true"),
            "app jdbc:sqlserver://h;user=sa;password=***;encrypt=true"
        );
        // A secret key's whole value goes, `&` and all.
        assert_eq!(redacted("app\u{1}--password=a&b;c?d"), "app --password=***");
        // Nothing secret in the query, nothing changed.
        assert_eq!(
            redacted("app\u{1}--url=http://h/x?a=1&b=&c"),
            "app --url=http://h/x?a=1&b=&c"
        );
    }

    #[test]
    fn any_flag_named_like_a_secret_hides_its_value() {
        assert_eq!(
            redacted("app\u{1}--db-password\u{1}X\u{1}--port\u{1}5432"),
            "app --db-password *** --port 5432"
        );
        assert_eq!(
            redacted("app\u{1}--client-secret\u{1}X"),
            "app --client-secret ***"
        );
        assert_eq!(
            redacted("redis-server\u{1}--requirepass\u{1}X\u{1}--port\u{1}6379"),
            "redis-server --requirepass *** --port 6379"
        );
        assert_eq!(redacted("openssl\u{1}-PASS\u{1}X"), "openssl -PASS ***");
        // The last argument has nothing after it to hide.
        assert_eq!(redacted("app\u{1}--token"), "app --token");
    }

    #[test]
    fn wrapped_programs_keep_their_own_rules() {
        assert_eq!(redacted("env\u{1}mysql\u{1}-psecret"), "env mysql -p***");
        assert_eq!(
            redacted("/usr/bin/sudo\u{1}redis-cli\u{1}-a\u{1}X\u{1}GET\u{1}k"),
            "/usr/bin/sudo redis-cli -a *** GET k"
        );
        assert_eq!(
            redacted("env\u{1}PGPASSWORD=x\u{1}psql\u{1}-p\u{1}5432"),
            "env PGPASSWORD=*** psql -p 5432"
        );
        assert_eq!(
            redacted("env\u{1}-i\u{1}MYSQL_HOST=db\u{1}mysql\u{1}-psecret"),
            "env -i MYSQL_HOST=db mysql -p***"
        );
        // Options with values, positional arguments and chains of wrappers.
        assert_eq!(
            redacted("sudo\u{1}-u\u{1}redis\u{1}nice\u{1}-n\u{1}10\u{1}redis-cli\u{1}-a\u{1}X"),
            "sudo -u redis nice -n 10 redis-cli -a ***"
        );
        assert_eq!(
            redacted("timeout\u{1}-s\u{1}KILL\u{1}30\u{1}mysql\u{1}-pX"),
            "timeout -s KILL 30 mysql -p***"
        );
        assert_eq!(
            redacted(
                "nohup\u{1}taskset\u{1}-c\u{1}0-3\u{1}ionice\u{1}-c\u{1}3\u{1}mariadb\u{1}-pX"
            ),
            "nohup taskset -c 0-3 ionice -c 3 mariadb -p***"
        );
        assert_eq!(
            redacted("chrt\u{1}-f\u{1}10\u{1}exec\u{1}--\u{1}mysql\u{1}-pX"),
            "chrt -f 10 exec -- mysql -p***"
        );
        // A wrapper's own -p or -a is not the program's: sudo -p is a prompt,
        // ionice -p a pid.
        assert_eq!(
            redacted("sudo\u{1}-p\u{1}x\u{1}psql\u{1}-p5432"),
            "sudo -p x psql -p5432"
        );
        assert_eq!(redacted("ionice\u{1}-p42"), "ionice -p42");
        // Nothing but wrappers.
        assert_eq!(redacted("env\u{1}A=1"), "env A=1");
    }

    #[test]
    fn the_words_of_one_argument_follow_the_same_rules() {
        assert_eq!(
            redacted("sh\u{1}-c\u{1}mysql -uroot -psecret -h db"),
            "sh -c mysql -uroot -p*** -h db"
        );
        assert_eq!(
            redacted("sh\u{1}-c\u{1}exec redis-cli --requirepass X  -a Y"),
            "sh -c exec redis-cli --requirepass ***  -a ***"
        );
        assert_eq!(
            redacted("bash\u{1}-c\u{1}PGPASSWORD=x psql -p 5432 postgresql://h/d?password=y"),
            "bash -c PGPASSWORD=*** psql -p 5432 postgresql://h/d?password=***"
        );
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
            "?=&=;=",
            "a=?ü=ü&",
            "env\u{1}-u",
            "timeout",
            "sudo\u{1}--\u{1}",
            "sh\u{1}-c\u{1} --token ",
            "x://h?password=",
        ] {
            let args: Vec<String> = line.split('\u{1}').map(str::to_string).collect();
            let _ = command_line(&args);
        }
    }
}
