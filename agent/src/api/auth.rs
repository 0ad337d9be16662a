//! The optional bearer token of the JSON API (`[http] bearer_token` or
//! `bearer_token_file`).
//!
//! Only `/`, `/healthz` (and `/healthz/live`, `/healthz/ready`) and `/metrics` are open: probes and scrapers need
//! no secret, and the live page is static (its scripts send the token they
//! are given). Every other path, unknown ones included, needs the token, so
//! a route added later is closed by default.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Router,
};

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

/// Paths served without the token.
pub fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/" | "/healthz" | "/healthz/live" | "/healthz/ready" | "/metrics"
    )
}

async fn check(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    let presented = bearer(&request).unwrap_or_default();
    if is_open(request.uri().path()) || same(presented.as_bytes(), token.as_bytes()) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"poolscope\"")],
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
