//! DNS for endpoint names: resolve with hickory-resolver, re-resolve when the
//! answer's TTL runs out (clamped to `min_ttl`/`max_ttl`), keep the last good
//! addresses when resolution fails, and retry with backoff.
//!
//! One task per cluster with names, holding a `Weak<Cluster>` so it ends with
//! the cluster. It only ever replaces the cluster's endpoint set; open
//! connections are never touched by a DNS change.

use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig as HickoryConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use super::Cluster;
use crate::config::ResolverConfig;
use crate::metrics;

/// First retry after a failed resolution; doubles up to [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A resolver with legate's TTL clamps.
pub struct Dns {
    resolver: TokioResolver,
    min_ttl: Duration,
    max_ttl: Duration,
}

// === impl Dns ===

impl Dns {
    /// A resolver for `config`: its name servers, or /etc/resolv.conf (with its
    /// search domains and `ndots`) when none are given.
    pub fn new(config: &ResolverConfig) -> Result<Dns, String> {
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| format!("reading /etc/resolv.conf: {e}"))?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|ns| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = ns.0.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = ns.0.port();
                    NameServerConfig::new(ns.0.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                HickoryConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        // A dead name server must turn into "stale, retrying" within seconds,
        // not the 5 s x 2 attempts of resolv.conf defaults per name.
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.positive_min_ttl = Some(config.min_ttl.0);
        opts.positive_max_ttl = Some(config.max_ttl.0);
        opts.negative_max_ttl = Some(config.min_ttl.0);
        // Several A/AAAA records become several endpoints.
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        let resolver = builder.build().map_err(|e| e.to_string())?;
        Ok(Dns {
            resolver,
            min_ttl: config.min_ttl.0,
            max_ttl: config.max_ttl.0,
        })
    }

    /// The addresses of `host` and how long they may be used.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(Vec<SocketAddr>, Duration), String> {
        let lookup = self
            .resolver
            .lookup_ip(host)
            .await
            .map_err(|e| e.to_string())?;
        let mut addrs: Vec<SocketAddr> =
            lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("no A/AAAA records".to_string());
        }
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(std::time::Instant::now())
            .clamp(self.min_ttl, self.max_ttl);
        Ok((addrs, ttl))
    }
}

/// The last answer for one name, as `/config` and the status page show it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub name: String,
    pub port: u16,
    /// The last good addresses (kept when a refresh fails).
    pub addrs: Vec<SocketAddr>,
    /// Their TTL as clamped; the name is asked again when it runs out.
    pub ttl: Option<Duration>,
    /// When the last good answer came.
    pub at: Option<std::time::SystemTime>,
    /// Why the last attempt failed, if it did.
    pub error: Option<String>,
}

/// Keeps `cluster`'s resolved endpoints fresh until the cluster is dropped.
pub async fn run(cluster: Weak<Cluster>, dns: Dns, names: Vec<(String, u16)>) {
    // The last answer per name: its good addresses are kept when a refresh
    // fails, and it is what `/config` shows.
    let mut answers: Vec<Answer> = names
        .iter()
        .map(|(name, port)| Answer {
            name: name.clone(),
            port: *port,
            addrs: Vec::new(),
            ttl: None,
            at: None,
            error: None,
        })
        .collect();
    let hosts: Vec<std::sync::Arc<str>> = names
        .iter()
        .map(|(h, _)| std::sync::Arc::from(h.as_str()))
        .collect();
    let mut failures: u32 = 0;
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let mut next = dns.max_ttl;
        let mut failed = false;
        for answer in answers.iter_mut() {
            match dns.resolve(&answer.name, answer.port).await {
                Ok((addrs, ttl)) => {
                    metrics::get()
                        .dns_resolutions_total
                        .with_label_values(&[&c.name, "ok"])
                        .inc();
                    next = next.min(ttl);
                    answer.addrs = addrs;
                    answer.ttl = Some(ttl);
                    answer.at = Some(std::time::SystemTime::now());
                    answer.error = None;
                }
                Err(e) => {
                    metrics::get()
                        .dns_resolutions_total
                        .with_label_values(&[&c.name, "error"])
                        .inc();
                    failed = true;
                    tracing::warn!(cluster = %c.name, name = %answer.name, error = %e,
                        stale = !answer.addrs.is_empty(), "DNS resolution failed; keeping the last good addresses");
                    answer.error = Some(e);
                }
            }
        }
        let resolved: Vec<(SocketAddr, std::sync::Arc<str>)> = answers
            .iter()
            .zip(&hosts)
            .flat_map(|(a, h)| a.addrs.iter().map(move |addr| (*addr, h.clone())))
            .collect();
        c.set_resolved(&resolved);
        c.set_dns_answers(answers.clone());
        drop(c);
        if failed {
            let backoff = RETRY_BASE
                .saturating_mul(1 << failures.min(8))
                .min(RETRY_MAX);
            failures += 1;
            next = next.min(backoff);
        } else {
            failures = 0;
        }
        tokio::time::sleep(next).await;
    }
}
