//! The Kafka responses legate changes, decoded and re-encoded with
//! `kafka-protocol` (generated from Kafka's own message schemas, every
//! version): Metadata, FindCoordinator and DescribeCluster get each broker's
//! host and port replaced by legate's; ApiVersions gets those three APIs
//! capped at the highest version legate can decode, so a newer client or
//! broker negotiates down instead of sending a response legate cannot read.
//!
//! `kafka-protocol` sizes a decoded array from the count on the wire before
//! reading its elements, so a corrupt count could ask for gigabytes. Every
//! array it is given here is checked first against the bytes that remain
//! ([`Peek`]); Metadata is not decoded past its broker list at all (topics
//! and partitions are copied as they came).

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, DescribeClusterResponse, FindCoordinatorResponse,
    MetadataResponse, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, Message, StrBytes};

/// Where a broker is reachable through legate.
pub struct Local {
    pub host: String,
    pub port: i32,
}

/// Maps a broker (node id, advertised host and port) to its local address.
pub trait Brokers {
    fn local(&mut self, node_id: i32, host: &str, port: i32) -> Result<Local, String>;
}

/// Why a response could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("cannot decode {api:?} v{version} response: {reason}")]
    Decode {
        api: ApiKey,
        version: i16,
        reason: String,
    },
    #[error("cannot encode {api:?} v{version} response: {reason}")]
    Encode {
        api: ApiKey,
        version: i16,
        reason: String,
    },
    #[error("no local port for broker {node_id}: {reason}")]
    NoPort { node_id: i32, reason: String },
}

/// Whether responses to `api` go through [`rewrite`].
pub fn is_rewritten(api: ApiKey) -> bool {
    matches!(
        api,
        ApiKey::Metadata | ApiKey::FindCoordinator | ApiKey::DescribeCluster | ApiKey::ApiVersions
    )
}

/// The highest version legate decodes for each API it rewrites.
fn highest(api_key: i16) -> Option<i16> {
    match ApiKey::try_from(api_key).ok()? {
        ApiKey::Metadata => Some(MetadataResponse::VERSIONS.max),
        ApiKey::FindCoordinator => Some(FindCoordinatorResponse::VERSIONS.max),
        ApiKey::DescribeCluster => Some(DescribeClusterResponse::VERSIONS.max),
        _ => None,
    }
}

/// Rewrites one response. `frame` is the response without its size prefix
/// (correlation id first); the result is the same, to be prefixed with its
/// new size. `Ok(None)`: nothing to change, send `frame` as it is.
pub fn rewrite(
    api: ApiKey,
    version: i16,
    frame: Bytes,
    brokers: &mut impl Brokers,
) -> Result<Option<Bytes>, RewriteError> {
    let header_version = api.response_header_version(version);
    let mut buf = frame;
    let decode_error = |reason: String| RewriteError::Decode {
        api,
        version,
        reason,
    };
    let header = ResponseHeader::decode(&mut buf, header_version)
        .map_err(|e| decode_error(e.to_string()))?;
    let mut out = BytesMut::with_capacity(buf.len() + 64);
    let encode_error = |reason: String| RewriteError::Encode {
        api,
        version,
        reason,
    };
    header
        .encode(&mut out, header_version)
        .map_err(|e| encode_error(e.to_string()))?;
    match api {
        ApiKey::Metadata => {
            // throttle_time_ms (v3+), then the brokers; the rest as it is.
            let flexible = version >= 9;
            if version >= 3 {
                let throttle = take(&mut buf, 4).map_err(decode_error)?;
                out.extend_from_slice(&throttle);
            }
            let count = read_count(&mut buf, flexible).map_err(decode_error)?;
            write_count(&mut out, count, flexible);
            for _ in 0..count {
                let mut b = MetadataResponseBroker::decode(&mut buf, version)
                    .map_err(|e| decode_error(e.to_string()))?;
                relocate(brokers, b.node_id.0, &mut b.host, &mut b.port)?;
                b.encode(&mut out, version)
                    .map_err(|e| encode_error(e.to_string()))?;
            }
            out.extend_from_slice(&buf);
        }
        ApiKey::FindCoordinator => {
            if version >= 4 {
                // throttle_time_ms, then the coordinators.
                let mut p = Peek(&buf[..]);
                p.skip(4).map_err(decode_error)?;
                p.count(true).map_err(decode_error)?;
            }
            let mut m = FindCoordinatorResponse::decode(&mut buf, version)
                .map_err(|e| decode_error(e.to_string()))?;
            // v0-3 answer one key in the top-level fields; v4+ a list.
            if version < 4 && m.error_code == 0 {
                relocate(brokers, m.node_id.0, &mut m.host, &mut m.port)?;
            }
            for c in m.coordinators.iter_mut().filter(|c| c.error_code == 0) {
                relocate(brokers, c.node_id.0, &mut c.host, &mut c.port)?;
            }
            m.encode(&mut out, version)
                .map_err(|e| encode_error(e.to_string()))?;
        }
        ApiKey::DescribeCluster => {
            // throttle, error code, message, endpoint type (v1+), cluster
            // id, controller id: then the brokers.
            let mut p = Peek(&buf[..]);
            p.skip(6).map_err(decode_error)?;
            p.compact_string().map_err(decode_error)?;
            if version >= 1 {
                p.skip(1).map_err(decode_error)?;
            }
            p.compact_string().map_err(decode_error)?;
            p.skip(4).map_err(decode_error)?;
            p.count(true).map_err(decode_error)?;
            let mut m = DescribeClusterResponse::decode(&mut buf, version)
                .map_err(|e| decode_error(e.to_string()))?;
            for b in &mut m.brokers {
                relocate(brokers, b.broker_id.0, &mut b.host, &mut b.port)?;
            }
            m.encode(&mut out, version)
                .map_err(|e| encode_error(e.to_string()))?;
        }
        ApiKey::ApiVersions => {
            // An old broker answers an unsupported version in v0; leave
            // whatever does not decode alone (it names no broker).
            let mut p = Peek(&buf[..]);
            if p.skip(2).and_then(|()| p.count(version >= 3)).is_err() {
                return Ok(None);
            }
            let Ok(mut m) = ApiVersionsResponse::decode(&mut buf, version) else {
                return Ok(None);
            };
            let mut changed = false;
            for a in &mut m.api_keys {
                if let Some(max) = highest(a.api_key)
                    && a.max_version > max
                {
                    a.max_version = max;
                    changed = true;
                }
            }
            if !changed {
                return Ok(None);
            }
            m.encode(&mut out, version)
                .map_err(|e| encode_error(e.to_string()))?;
        }
        _ => return Ok(None),
    }
    Ok(Some(out.freeze()))
}

/// Reads ahead in a response to check an array's count before
/// `kafka-protocol` allocates for it.
struct Peek<'a>(&'a [u8]);

impl Peek<'_> {
    fn skip(&mut self, n: usize) -> Result<(), String> {
        if self.0.len() < n {
            return Err("truncated".to_string());
        }
        self.0 = &self.0[n..];
        Ok(())
    }

    fn varint(&mut self) -> Result<u32, String> {
        let (value, used) = varint(self.0)?;
        self.0 = &self.0[used..];
        Ok(value)
    }

    /// A compact (nullable) string: its length + 1, then its bytes.
    fn compact_string(&mut self) -> Result<(), String> {
        let n = self.varint()?;
        self.skip(n.saturating_sub(1) as usize)
    }

    /// An array count no larger than the bytes left (an element takes one
    /// byte at least).
    fn count(&mut self, compact: bool) -> Result<u32, String> {
        let n = if compact {
            self.varint()?.saturating_sub(1)
        } else {
            if self.0.len() < 4 {
                return Err("truncated".to_string());
            }
            let n = i32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]]);
            self.0 = &self.0[4..];
            u32::try_from(n).unwrap_or(0)
        };
        if n as usize > self.0.len() {
            return Err(format!("array of {n} elements in {} bytes", self.0.len()));
        }
        Ok(n)
    }
}

/// An unsigned varint (7 bits a byte, at most 5 bytes): value, bytes used.
fn varint(bytes: &[u8]) -> Result<(u32, usize), String> {
    let mut value: u32 = 0;
    for (i, b) in bytes.iter().take(5).enumerate() {
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err("invalid varint".to_string())
}

fn take(buf: &mut Bytes, n: usize) -> Result<Bytes, String> {
    if buf.len() < n {
        return Err("truncated".to_string());
    }
    Ok(buf.split_to(n))
}

/// An array count, checked against what remains; a null array counts 0.
fn read_count(buf: &mut Bytes, compact: bool) -> Result<u32, String> {
    let mut p = Peek(&buf[..]);
    let n = p.count(compact)?;
    let used = buf.len() - p.0.len();
    let _ = buf.split_to(used);
    Ok(n)
}

fn write_count(out: &mut BytesMut, n: u32, compact: bool) {
    if compact {
        let mut v = n + 1;
        while v >= 0x80 {
            out.extend_from_slice(&[(v as u8) | 0x80]);
            v >>= 7;
        }
        out.extend_from_slice(&[v as u8]);
    } else {
        out.extend_from_slice(&(n as i32).to_be_bytes());
    }
}

/// Replaces one broker's advertised address with its local one.
fn relocate(
    brokers: &mut impl Brokers,
    node_id: i32,
    host: &mut StrBytes,
    port: &mut i32,
) -> Result<(), RewriteError> {
    let local = brokers
        .local(node_id, host, *port)
        .map_err(|reason| RewriteError::NoPort { node_id, reason })?;
    *host = StrBytes::from_string(local.host);
    *port = local.port;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::BrokerId;
    use kafka_protocol::messages::find_coordinator_response::Coordinator;
    use proptest::prelude::*;

    struct Ports;
    impl Brokers for Ports {
        fn local(&mut self, node_id: i32, _host: &str, _port: i32) -> Result<Local, String> {
            Ok(Local {
                host: "127.0.0.1".to_string(),
                port: 19100 + node_id,
            })
        }
    }

    fn frame<M: Encodable>(api: ApiKey, version: i16, m: &M) -> Vec<u8> {
        let mut out = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(7)
            .encode(&mut out, api.response_header_version(version))
            .unwrap();
        m.encode(&mut out, version).unwrap();
        out.to_vec()
    }

    fn decoded<M: Decodable>(api: ApiKey, version: i16, bytes: &[u8]) -> M {
        let mut buf = Bytes::copy_from_slice(bytes);
        let h = ResponseHeader::decode(&mut buf, api.response_header_version(version)).unwrap();
        assert_eq!(h.correlation_id, 7);
        M::decode(&mut buf, version).unwrap()
    }

    fn broker(id: i32, host: &str, port: i32) -> MetadataResponseBroker {
        MetadataResponseBroker::default()
            .with_node_id(BrokerId(id))
            .with_host(StrBytes::from_string(host.to_string()))
            .with_port(port)
    }

    #[test]
    fn metadata_brokers_are_rewritten_in_every_version() {
        for version in MetadataResponse::VERSIONS.min..=MetadataResponse::VERSIONS.max {
            let m = MetadataResponse::default().with_brokers(vec![
                broker(1, "b1.kafka", 9092),
                broker(2, "b2.kafka", 9093),
            ]);
            let bytes = frame(ApiKey::Metadata, version, &m);
            let out = rewrite(
                ApiKey::Metadata,
                version,
                Bytes::from(bytes.clone()),
                &mut Ports,
            )
            .unwrap()
            .unwrap();
            let back: MetadataResponse = decoded(ApiKey::Metadata, version, &out);
            let addrs: Vec<(String, i32)> = back
                .brokers
                .iter()
                .map(|b| (b.host.to_string(), b.port))
                .collect();
            assert_eq!(
                addrs,
                vec![("127.0.0.1".into(), 19101), ("127.0.0.1".into(), 19102)],
                "v{version}"
            );
        }
    }

    #[test]
    fn coordinators_are_rewritten_in_every_version() {
        for version in FindCoordinatorResponse::VERSIONS.min..=FindCoordinatorResponse::VERSIONS.max
        {
            let mut m = FindCoordinatorResponse::default();
            if version < 4 {
                m = m
                    .with_node_id(BrokerId(3))
                    .with_host(StrBytes::from_static_str("c.kafka"))
                    .with_port(9092);
            } else {
                m = m.with_coordinators(vec![
                    Coordinator::default()
                        .with_key(StrBytes::from_static_str("group"))
                        .with_node_id(BrokerId(3))
                        .with_host(StrBytes::from_static_str("c.kafka"))
                        .with_port(9092),
                ]);
            }
            let bytes = frame(ApiKey::FindCoordinator, version, &m);
            let out = rewrite(
                ApiKey::FindCoordinator,
                version,
                Bytes::from(bytes.clone()),
                &mut Ports,
            )
            .unwrap()
            .unwrap();
            let back: FindCoordinatorResponse = decoded(ApiKey::FindCoordinator, version, &out);
            let (host, port) = if version < 4 {
                (back.host.to_string(), back.port)
            } else {
                (
                    back.coordinators[0].host.to_string(),
                    back.coordinators[0].port,
                )
            };
            assert_eq!((host.as_str(), port), ("127.0.0.1", 19103), "v{version}");
        }
    }

    #[test]
    fn describe_cluster_brokers_are_rewritten_in_every_version() {
        use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
        for version in DescribeClusterResponse::VERSIONS.min..=DescribeClusterResponse::VERSIONS.max
        {
            let m = DescribeClusterResponse::default()
                .with_error_message(Some(StrBytes::from_static_str("none")))
                .with_cluster_id(StrBytes::from_static_str("cluster-a"))
                .with_brokers(
                    (1..=3)
                        .map(|id| {
                            DescribeClusterBroker::default()
                                .with_broker_id(BrokerId(id))
                                .with_host(StrBytes::from_string(format!("b{id}.kafka")))
                                .with_port(9092)
                        })
                        .collect(),
                );
            let bytes = frame(ApiKey::DescribeCluster, version, &m);
            let out = rewrite(
                ApiKey::DescribeCluster,
                version,
                Bytes::from(bytes.clone()),
                &mut Ports,
            )
            .unwrap()
            .unwrap();
            let back: DescribeClusterResponse = decoded(ApiKey::DescribeCluster, version, &out);
            let ports: Vec<i32> = back.brokers.iter().map(|b| b.port).collect();
            assert_eq!(ports, vec![19101, 19102, 19103], "v{version}");
            assert_eq!(back.cluster_id.as_str(), "cluster-a", "v{version}");
        }
    }

    #[test]
    fn api_versions_are_capped_at_what_legate_decodes() {
        use kafka_protocol::messages::api_versions_response::ApiVersion;
        let m = ApiVersionsResponse::default().with_api_keys(vec![
            ApiVersion::default()
                .with_api_key(ApiKey::Metadata as i16)
                .with_max_version(99),
            ApiVersion::default()
                .with_api_key(ApiKey::Produce as i16)
                .with_max_version(99),
        ]);
        let bytes = frame(ApiKey::ApiVersions, 3, &m);
        let out = rewrite(
            ApiKey::ApiVersions,
            3,
            Bytes::from(bytes.clone()),
            &mut Ports,
        )
        .unwrap()
        .unwrap();
        let back: ApiVersionsResponse = decoded(ApiKey::ApiVersions, 3, &out);
        assert_eq!(back.api_keys[0].max_version, MetadataResponse::VERSIONS.max);
        assert_eq!(back.api_keys[1].max_version, 99, "other APIs untouched");
    }

    /// Responses captured from a real broker (Tansu), every version it
    /// answers (`LEGATE_CAPTURE_FIXTURES=1 cargo test --test kafka real_broker`
    /// writes them): each rewrites, and decodes back with every broker moved.
    #[test]
    fn captured_broker_responses_replay() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kafka");
        let mut replayed = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let Some((api, version)) = name.rsplit_once("_v") else {
                continue;
            };
            let version: i16 = version.parse().unwrap();
            let frame = std::fs::read(&path).unwrap();
            match api {
                "metadata" => {
                    let out = rewrite(
                        ApiKey::Metadata,
                        version,
                        Bytes::from(frame.clone()),
                        &mut Ports,
                    )
                    .unwrap()
                    .unwrap();
                    let m: MetadataResponse = decoded(ApiKey::Metadata, version, &out);
                    assert!(!m.brokers.is_empty(), "{name}");
                    for b in &m.brokers {
                        assert_eq!(
                            (b.host.as_str(), b.port),
                            ("127.0.0.1", 19100 + b.node_id.0),
                            "{name}"
                        );
                    }
                }
                "find_coordinator" => {
                    let out = rewrite(
                        ApiKey::FindCoordinator,
                        version,
                        Bytes::from(frame.clone()),
                        &mut Ports,
                    )
                    .unwrap()
                    .unwrap();
                    let m: FindCoordinatorResponse =
                        decoded(ApiKey::FindCoordinator, version, &out);
                    let (host, port, node) = if version < 4 {
                        (m.host.to_string(), m.port, m.node_id.0)
                    } else {
                        let c = &m.coordinators[0];
                        (c.host.to_string(), c.port, c.node_id.0)
                    };
                    assert_eq!((host.as_str(), port), ("127.0.0.1", 19100 + node), "{name}");
                }
                _ => continue,
            }
            replayed += 1;
        }
        assert!(replayed >= 10, "fixtures replayed: {replayed}");
    }

    proptest! {
        /// Garbage for a rewritten response is an error, never a panic.
        #[test]
        fn garbage_is_refused_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                          version in 0i16..16) {
            for api in [ApiKey::Metadata, ApiKey::FindCoordinator, ApiKey::DescribeCluster, ApiKey::ApiVersions] {
                let _ = rewrite(api, version, Bytes::from(bytes.clone()), &mut Ports);
            }
        }
    }
}
