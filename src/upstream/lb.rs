//! Load-balancing policies: pure choices over a list of candidate endpoints.
//!
//! No I/O and no state but the caller's round-robin cursor; `failover` calls
//! `pick` again with the failed endpoint removed when a connect fails.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Endpoint;
use crate::config::LbPolicy;

/// Index into `candidates` (never empty) of the endpoint to try.
pub fn pick(
    policy: LbPolicy,
    candidates: &[Arc<Endpoint>],
    cursor: &AtomicUsize,
    client: IpAddr,
) -> usize {
    let n = candidates.len();
    debug_assert!(n > 0);
    if n == 1 {
        return 0;
    }
    match policy {
        LbPolicy::RoundRobin => cursor.fetch_add(1, Ordering::Relaxed) % n,
        LbPolicy::LeastConn => {
            let least = candidates.iter().map(|e| e.active()).min().unwrap_or(0);
            let tied = candidates.iter().filter(|e| e.active() == least).count();
            let mut nth = rand::random_range(0..tied);
            candidates
                .iter()
                .position(|e| {
                    if e.active() != least {
                        return false;
                    }
                    if nth == 0 {
                        return true;
                    }
                    nth -= 1;
                    false
                })
                .unwrap_or(0)
        }
        LbPolicy::Random => {
            // Power of two choices: as good as least-conn without scanning all.
            let a = rand::random_range(0..n);
            let b = (a + rand::random_range(1..n)) % n;
            if candidates[b].active() < candidates[a].active() {
                b
            } else {
                a
            }
        }
        LbPolicy::Hash => {
            // Rendezvous hashing: the highest score wins, so removing one
            // endpoint only moves the clients that were on it.
            let score = |e: &Endpoint| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                client.hash(&mut h);
                e.addr.hash(&mut h);
                h.finish()
            };
            candidates
                .iter()
                .enumerate()
                .max_by_key(|(_, e)| score(e))
                .map_or(0, |(i, _)| i)
        }
    }
}
