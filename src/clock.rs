//! A monotonic millisecond clock that fits in an atomic: what health, pools
//! and connection watchdogs store to say "when", without a lock. A leaf.

use std::sync::LazyLock;
use std::time::Instant;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds on a monotonic clock (since the first call).
pub fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}
