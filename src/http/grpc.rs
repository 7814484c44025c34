//! What legate knows of gRPC: which requests are gRPC, the deadline a call
//! carries (`grpc-timeout`), and how legate's own errors are told to a gRPC
//! client: a trailers-only response (HTTP 200, `grpc-status`, `grpc-message`),
//! because a gRPC client reads any other HTTP status as UNKNOWN or UNAVAILABLE
//! whatever happened.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

/// gRPC status codes legate answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Unknown = 2,
    DeadlineExceeded = 4,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

/// Whether the request is a gRPC call (`content-type: application/grpc`, `+proto`, ...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The call's deadline from `grpc-timeout` (at most 8 digits and a unit: H,
/// M, S, m, u, n); `None` when absent or malformed (the call then has the
/// route's timeout, as if the header were not there).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status for an error legate answered with `status`, as Envoy maps them.
pub fn code_for(status: StatusCode) -> Code {
    match status {
        StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::BAD_REQUEST => Code::Internal,
        _ => Code::Unknown,
    }
}

/// Turns legate's own error response into a trailers-only gRPC response
/// carrying `code` and `message` (percent-encoded, as the spec asks).
pub fn trailers_only<B: Default>(response: &mut Response<B>, code: Code, message: &str) {
    *response.status_mut() = StatusCode::OK;
    *response.body_mut() = B::default();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(u16::from(code as u8)));
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(encode_message(message))) {
        h.insert("grpc-message", v);
    }
}

/// Percent-encodes what the gRPC spec says a `grpc-message` may not carry raw.
fn encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.trim_end().bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(k: &'static str, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(k, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn grpc_timeouts() {
        for (v, want) in [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("60S", Some(Duration::from_secs(60))),
            ("500m", Some(Duration::from_millis(500))),
            ("99999999u", Some(Duration::from_micros(99_999_999))),
            ("7n", Some(Duration::from_nanos(7))),
            ("123456789S", None),
            ("S", None),
            ("5s", None),
            ("-5S", None),
            ("", None),
        ] {
            assert_eq!(timeout(&headers("grpc-timeout", v)), want, "{v}");
        }
    }

    #[test]
    fn grpc_content_types() {
        assert!(is_grpc(&headers("content-type", "application/grpc")));
        assert!(is_grpc(&headers("content-type", "application/grpc+proto")));
        assert!(!is_grpc(&headers("content-type", "application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            encode_message("no healthy upstream\n"),
            "no healthy upstream"
        );
        assert_eq!(encode_message("50% ünïcode"), "50%25 %C3%BCn%C3%AFcode");
    }
}
