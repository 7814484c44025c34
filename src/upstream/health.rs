//! Endpoint health: active probes on a timer, passive marks from real connects.
//!
//! Two independent verdicts, both atomics: `up` comes from active checks
//! (consecutive results against the `healthy`/`unhealthy` thresholds, so one
//! lost probe does not flap it), and `ejected_until` from connect failures
//! (an ejection that doubles while the endpoint keeps failing and ends on the
//! first success). An endpoint is available when it is up and not ejected.

use std::net::SocketAddr;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Cluster;
pub use crate::clock::now_ms;
use crate::config::HealthConfig;

/// First passive ejection; doubles with each further consecutive failure.
pub const EJECT_BASE: Duration = Duration::from_secs(1);
/// Longest passive ejection.
pub const EJECT_MAX: Duration = Duration::from_secs(30);

/// Live health of one endpoint.
#[derive(Debug)]
pub struct Health {
    /// Active-check verdict; stays true for clusters without `health:`.
    up: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    /// Consecutive failed connects by real connections.
    passive_failures: AtomicU32,
    /// [`now_ms`] until which new connections skip this endpoint; 0 = not ejected.
    ejected_until: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            // New endpoints are trusted until proven otherwise: a connect
            // failure still moves a connection on at once.
            up: AtomicBool::new(true),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            passive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }
}

// === impl Health ===

impl Health {
    /// Up by active checks, and how much longer a passive ejection lasts.
    pub fn state(&self, now: u64) -> (bool, Option<Duration>) {
        let until = self.ejected_until.load(Ordering::Acquire);
        let ejected = (now < until).then(|| Duration::from_millis(until - now));
        (self.up.load(Ordering::Acquire), ejected)
    }

    pub fn available(&self, now: u64) -> bool {
        self.up.load(Ordering::Acquire) && now >= self.ejected_until.load(Ordering::Acquire)
    }

    /// Forgets failed connects and the ejection they caused: the way to
    /// connect changed (TLS settings), so they say nothing about the next one.
    pub fn forget_failures(&self) {
        self.passive_failures.store(0, Ordering::Release);
        self.ejected_until.store(0, Ordering::Release);
    }

    /// A real connect succeeded: the passive ejection ends.
    pub fn connect_succeeded(&self) {
        if self.passive_failures.swap(0, Ordering::AcqRel) > 0 {
            self.ejected_until.store(0, Ordering::Release);
        }
    }

    /// A real connect failed (refused, timed out): eject for a backoff that
    /// doubles while failures continue. Failures of connects that raced into
    /// an ejection already in force do not double it again. Returns the
    /// ejection in force.
    pub fn connect_failed(&self, now: u64) -> Duration {
        // A failure breaks any streak of good probes: recovery must be re-earned.
        self.ok_streak.store(0, Ordering::Relaxed);
        let until = self.ejected_until.load(Ordering::Acquire);
        if now < until {
            return Duration::from_millis(until - now);
        }
        let failures = self.passive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        let ejection = EJECT_BASE
            .saturating_mul(1u32 << (failures - 1).min(16))
            .min(EJECT_MAX);
        self.ejected_until
            .store(now + ejection.as_millis() as u64, Ordering::Release);
        ejection
    }

    /// Records one active probe result; returns the new verdict when it changed.
    /// `healthy` good probes in a row also end a passive ejection: the
    /// endpoint has proven it accepts connections again.
    pub fn probed(&self, ok: bool, check: &HealthConfig) -> Option<bool> {
        if ok {
            self.fail_streak.store(0, Ordering::Relaxed);
            let streak = self.ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if streak >= check.healthy {
                if self.passive_failures.swap(0, Ordering::AcqRel) > 0 {
                    self.ejected_until.store(0, Ordering::Release);
                }
                if !self.up.swap(true, Ordering::AcqRel) {
                    return Some(true);
                }
            }
        } else {
            self.ok_streak.store(0, Ordering::Relaxed);
            let streak = self.fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if streak >= check.unhealthy && self.up.swap(false, Ordering::AcqRel) {
                return Some(false);
            }
        }
        None
    }
}

/// Probes every endpoint of the cluster each `interval` (±10% jitter, so many
/// sidecars do not probe in lockstep) until the cluster is dropped.
pub async fn run(cluster: Weak<Cluster>, check: HealthConfig) {
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let endpoints = c.endpoints();
        let probes = endpoints.iter().map(|e| {
            let check = &check;
            async move { (e, probe(e.addr, check).await) }
        });
        let results = futures_util::future::join_all(probes).await;
        for (endpoint, result) in results {
            endpoint.probed(result, &check, &c.name);
        }
        drop(c);
        tokio::time::sleep(jittered(check.interval.0)).await;
    }
}

/// `interval` ±10%, so many sidecars do not probe in lockstep. Saturating:
/// validation bounds intervals to an hour, but no value may panic here.
pub fn jittered(interval: Duration) -> Duration {
    let jitter = rand::random_range(0.9..1.1);
    Duration::try_from_secs_f64(interval.as_secs_f64() * jitter).unwrap_or(interval)
}

/// One probe within the timeout: a TCP connect; `GET http_path` expecting a
/// 2xx; or (`kind: postgres`) an SSLRequest answered `S` or `N`, which only a
/// live postmaster does, and needs no credentials. A failure says why.
async fn probe(addr: SocketAddr, check: &HealthConfig) -> Result<(), String> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        if check.kind == crate::config::HealthKind::Postgres {
            stream
                .write_all(&crate::postgres::wire::SSL_REQUEST_PACKET)
                .await?;
            return match stream.read_u8().await? {
                b'S' | b'N' => Ok(()),
                other => Err(std::io::Error::other(format!(
                    "SSLRequest answered {other:#04x}, not a PostgreSQL server"
                ))),
            };
        }
        let Some(path) = &check.http_path else {
            return Ok(());
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: legate-health\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        // The status line is all we need: "HTTP/1.1 200 ...".
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        if head.starts_with(b"HTTP/1.") && head[8] == b' ' && head[9] == b'2' {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "GET {path} answered {}",
                String::from_utf8_lossy(&head[..]).trim_end()
            )))
        }
    };
    match tokio::time::timeout(check.timeout.0, attempt).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(check.timeout.0)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(unhealthy: u32, healthy: u32) -> HealthConfig {
        serde_saphyr::from_str(&format!("{{ unhealthy: {unhealthy}, healthy: {healthy} }}"))
            .expect("health config")
    }

    #[test]
    fn thresholds_are_consecutive() {
        let h = Health::default();
        let c = check(3, 2);
        assert_eq!(h.probed(false, &c), None);
        assert_eq!(h.probed(false, &c), None);
        assert_eq!(
            h.probed(true, &c),
            None,
            "a success resets the failure streak"
        );
        assert_eq!(h.probed(false, &c), None);
        assert_eq!(h.probed(false, &c), None);
        assert_eq!(h.probed(false, &c), Some(false));
        assert!(!h.available(0));
        assert_eq!(h.probed(true, &c), None);
        assert_eq!(h.probed(true, &c), Some(true));
        assert!(h.available(0));
    }

    #[test]
    fn passive_ejection_grows_and_a_success_ends_it() {
        let h = Health::default();
        assert_eq!(h.connect_failed(1000), Duration::from_secs(1));
        assert_eq!(
            h.connect_failed(1000),
            Duration::from_secs(1),
            "concurrent failures do not double the ejection"
        );
        assert!(!h.available(1500));
        assert!(h.available(2000));
        assert_eq!(h.connect_failed(2000), Duration::from_secs(2));
        assert_eq!(h.connect_failed(4000), Duration::from_secs(4));
        let mut now = 8000;
        for _ in 0..10 {
            now += h.connect_failed(now).as_millis() as u64;
        }
        assert_eq!(h.connect_failed(now), EJECT_MAX);
        h.connect_succeeded();
        assert!(h.available(now));
        assert_eq!(h.connect_failed(now), Duration::from_secs(1));
    }

    #[test]
    fn good_probes_end_a_passive_ejection_after_the_threshold() {
        let h = Health::default();
        let c = check(3, 2);
        h.connect_failed(0);
        assert!(!h.available(10));
        assert_eq!(h.probed(true, &c), None);
        assert!(!h.available(10), "one good probe is not enough");
        assert_eq!(
            h.probed(true, &c),
            None,
            "still up by active checks: no verdict change"
        );
        assert!(h.available(10));
    }
}
