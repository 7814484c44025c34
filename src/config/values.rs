//! The values written as strings in the YAML: listen addresses, endpoints,
//! name servers and durations, each parsed where it is deserialized so a bad
//! one is reported at its own line and column.

use super::*;

// === impl ListenAddr ===

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<SocketAddr>().map(ListenAddr).map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid listen address \"{s}\": expected IP:PORT, e.g. 127.0.0.1:5432 or [::1]:5432"
            ))
        })
    }
}

// === impl PortRange ===

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Port(u32),
            Range(String),
        }
        let bad = |w: &str| {
            serde::de::Error::custom(format!(
                "invalid port range \"{w}\": expected FIRST-LAST (1 to 65535), e.g. \"19100-19163\""
            ))
        };
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
        match Written::deserialize(d)? {
            Written::Port(p) => match u16::try_from(p).ok().filter(|p| *p > 0) {
                Some(p) => Ok(PortRange { first: p, last: p }),
                None => Err(bad(&p.to_string())),
            },
            Written::Range(w) => {
                let (first, last) = match w.split_once('-') {
                    Some((a, b)) => (port(a), port(b)),
                    None => (port(&w), port(&w)),
                };
                match (first, last) {
                    (Some(first), Some(last)) if first <= last => Ok(PortRange { first, last }),
                    _ => Err(bad(&w)),
                }
            }
        }
    }
}

// === impl EndpointConfig ===

impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let written = String::deserialize(d)?;
        parse_endpoint(&written)
            .map(|target| EndpointConfig {
                written: written.clone(),
                target,
            })
            .map_err(serde::de::Error::custom)
    }
}

pub(super) fn parse_endpoint(s: &str) -> Result<EndpointTarget, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(EndpointTarget::Addr(addr));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("invalid endpoint \"{s}\": expected HOST:PORT"));
    };
    let port: u16 = port.parse().map_err(|_| {
        format!("invalid endpoint \"{s}\": port \"{port}\" is not a number 0-65535")
    })?;
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(EndpointTarget::Addr(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
        )));
    }
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(format!(
            "invalid endpoint \"{s}\": write IPv6 addresses in brackets, e.g. [{host}]:{port}"
        ));
    }
    if host.parse::<Ipv4Addr>().is_err() && is_dns_name(host) {
        return Ok(EndpointTarget::Name {
            host: host.to_string(),
            port,
        });
    }
    Err(format!(
        "invalid endpoint \"{s}\": \"{host}\" is neither an IP address nor a DNS name"
    ))
}

/// RFC 1123 host names: labels of letters, digits and '-', not starting or
/// ending with '-', at most 63 characters each; one trailing dot allowed.
pub(super) fn is_dns_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    // An all-numeric last label is a mistyped IP (`1.2.3`), not a name.
    let numeric_tld = name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()));
    !name.is_empty()
        && !numeric_tld
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

// === impl NameServer ===

impl<'de> Deserialize<'de> for NameServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(NameServer(addr));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(NameServer(SocketAddr::new(ip, 53)));
        }
        Err(serde::de::Error::custom(format!(
            "invalid name server \"{s}\": expected IP or IP:PORT, e.g. 10.96.0.10:53"
        )))
    }
}

// === impl HumanDuration ===

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// `250ms`, `5s`, `1m`, `1h`, or combinations like `1m30s`. A bare number has no unit and is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let trimmed = s.trim();
    if trimmed.is_empty() || trimmed.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "invalid duration \"{s}\": give a unit, e.g. 250ms, 5s, 1m"
        ));
    }
    humantime::parse_duration(trimmed)
        .map_err(|e| format!("invalid duration \"{s}\": {e} (expected e.g. 250ms, 5s, 1m)"))
}

/// `d` in the largest unit that divides it exactly (`100000h`, `90s`,
/// `250ms`): how a person would write it, for messages about durations.
pub fn show_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_string();
    }
    if d.subsec_nanos() == 0 {
        let s = d.as_secs();
        return match s {
            s if s % 3600 == 0 => format!("{}h", s / 3600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        };
    }
    let ns = d.as_nanos();
    match ns {
        ns if ns % 1_000_000 == 0 => format!("{}ms", ns / 1_000_000),
        ns if ns % 1_000 == 0 => format!("{}us", ns / 1_000),
        ns => format!("{ns}ns"),
    }
}
