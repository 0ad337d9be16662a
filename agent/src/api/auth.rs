//! The optional bearer token of the JSON API (`[http] bearer_token` or
//! `bearer_token_file`).
//!
//! Only `/`, `/healthz` (and `/healthz/live`, `/healthz/ready`) and
//! `/metrics` are open: probes and scrapers need no secret, and the live page
//! is static (its scripts send the token they are given). Every other path,
//! unknown ones included, needs the token, so a route added later is closed
//! by default. A refusal closes the connection: a client without the token
//! must not keep one of the `max_connections` slots by keep-alive.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Router,
};

use super::PROBE_PATHS;

/// `app` with the token required where it applies; `app` itself without one.
pub fn require_token(app: Router, token: Option<String>) -> Router {
    match token {
        Some(token) => app.layer(middleware::from_fn_with_state(
            Arc::<str>::from(token),
            check,
        )),
        None => app,
    }
}

/// Paths served without the token: the live page and the probes.
pub fn is_open(path: &str) -> bool {
    path == "/" || PROBE_PATHS.contains(&path)
}

async fn check(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    let presented = bearer(&request).unwrap_or_default();
    if is_open(request.uri().path()) || same(presented.as_bytes(), token.as_bytes()) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, "Bearer realm=\"poolscope\""),
            // hyper closes the connection after a response that says so.
            (header::CONNECTION, "close"),
        ],
        "this agent's API needs `Authorization: Bearer <token>` ([http] bearer_token)\n",
    )
        .into_response()
}

/// The token of an `Authorization: Bearer ...` header.
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Equality whose time depends on the lengths only, not on where the first
/// difference is: a caller cannot find the token byte by byte.
fn same(presented: &[u8], token: &[u8]) -> bool {
    let mut diff = presented.len() ^ token.len();
    for i in 0..presented.len().max(token.len()) {
        let a = presented.get(i).copied().unwrap_or(0);
        let b = token.get(i).copied().unwrap_or(0);
        diff |= usize::from(a ^ b);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abd", b"abc"));
        assert!(!same(b"ab", b"abc"));
        assert!(!same(b"abcd", b"abc"));
        assert!(!same(b"", b"abc"));
    }

    #[test]
    fn open_paths() {
        for open in [
            "/",
            "/healthz",
            "/healthz/live",
            "/healthz/ready",
            "/metrics",
        ] {
            assert!(is_open(open));
        }
        for closed in ["/api/v1/connections", "/healthz/", "//api/v1/leaks", "/x"] {
            assert!(!is_open(closed));
        }
    }

    /// A refusal closes the connection; an authorized client keeps its own.
    #[tokio::test]
    async fn a_refused_request_closes_its_connection() {
        use std::time::Duration;
        use tokio::{
            io::{AsyncReadExt, AsyncWriteExt},
            net::{TcpListener, TcpStream},
            time::timeout,
        };
        let app = Router::new().route("/api", axum::routing::get(|| async { "api\n" }));
        let app = require_token(app, Some("t0ken".to_owned()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = super::super::listener::Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
        };
        let server = tokio::spawn(super::super::listener::run(listener, app, limits));

        let mut refused = TcpStream::connect(addr).await.expect("connect");
        refused
            .write_all(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut raw = Vec::new();
        timeout(Duration::from_secs(2), refused.read_to_end(&mut raw))
            .await
            .expect("closed by the server, not left open")
            .expect("read");
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 401"), "{text}");
        assert!(text.contains("\r\nconnection: close\r\n"), "{text}");

        // With the token, the same request leaves the connection open for
        // the next one.
        let mut kept = TcpStream::connect(addr).await.expect("connect");
        for _ in 0..2 {
            kept.write_all(b"GET /api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n\r\n")
                .await
                .expect("write");
            let mut buf = [0u8; 1024];
            let n = timeout(Duration::from_secs(2), kept.read(&mut buf))
                .await
                .expect("answered")
                .expect("read");
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(text.ends_with("api\n"), "{text}");
        }
        server.abort();
    }

    #[test]
    fn bearer_header() {
        let with = |value: &str| {
            Request::builder()
                .header(header::AUTHORIZATION, value)
                .body(axum::body::Body::empty())
                .expect("request")
        };
        assert_eq!(bearer(&with("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&with("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&with("Basic abc")), None);
        assert_eq!(bearer(&with("abc")), None);
    }
}
