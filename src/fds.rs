//! File descriptors: legate's own budget, so running out is legate's problem.
//!
//! At start the soft `RLIMIT_NOFILE` is raised to the hard limit. The data
//! path (client sockets, upstream sockets, splice pipes) then takes its fds
//! from a [`Budget`] that stops `HEADROOM` short of the limit: the admin
//! server, health probes, DNS and config reads always find fds, so `/healthz`
//! answers while the data path is full. A listener whose budget is spent stops
//! accepting (the kernel's backlog holds the app's connections); an upstream
//! connect that finds none fails as a *local* error, which never ejects an
//! endpoint or fails over. A leaf: nothing here knows about connections.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Fds kept out of the data path's reach.
const HEADROOM: usize = 64;

/// The data path's share of the fd limit.
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

/// Fds taken from the budget; given back on drop (when the fds close).
#[must_use = "the fds are given back when this is dropped"]
#[derive(Debug)]
pub struct Reserved(usize);

static BUDGET: OnceLock<Budget> = OnceLock::new();

/// The soft limit before and after [`raise_limit`], and the hard limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and sizes the budget
/// from it. Call once at start, before any connection.
pub fn raise_limit() -> io::Result<Limits> {
    let (soft_before, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let soft = rlimit::increase_nofile_limit(hard).unwrap_or(soft_before);
    init(soft);
    Ok(Limits {
        soft_before,
        soft,
        hard,
    })
}

/// Sizes the budget for a soft limit of `soft` fds (first call wins).
pub fn init(soft: u64) {
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    // Small limits keep a quarter back rather than all of it.
    let headroom = HEADROOM.min(soft / 4);
    let _ = BUDGET.set(Budget {
        limit: soft - headroom,
        used: AtomicUsize::new(0),
    });
}

fn budget() -> &'static Budget {
    // Without `init` (unit tests, `legate check`): the common default limit.
    BUDGET.get_or_init(|| Budget {
        limit: 1024 - HEADROOM,
        used: AtomicUsize::new(0),
    })
}

/// Takes `n` fds from the data path's budget, or `None` when that would pass it.
pub fn reserve(n: usize) -> Option<Reserved> {
    let b = budget();
    let before = b.used.fetch_add(n, Ordering::AcqRel);
    if before + n > b.limit {
        b.used.fetch_sub(n, Ordering::AcqRel);
        return None;
    }
    Some(Reserved(n))
}

/// The data path's fd budget.
pub fn limit() -> usize {
    budget().limit
}

/// Fds the data path holds now.
pub fn in_use() -> usize {
    budget().used.load(Ordering::Acquire)
}

/// Whether `e` is this process or host running out of something (fds,
/// memory, buffers, ephemeral ports): legate's problem, not the upstream's.
pub fn is_local(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// The error a connect reports when the budget is spent.
pub fn exhausted() -> io::Error {
    io::Error::from_raw_os_error(libc::EMFILE)
}

impl Drop for Reserved {
    fn drop(&mut self) {
        budget().used.fetch_sub(self.0, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_limit_and_come_back() {
        let spare = limit() - in_use();
        let held: Vec<Reserved> = (0..spare).filter_map(|_| reserve(1)).collect();
        assert_eq!(held.len(), spare);
        assert!(reserve(1).is_none(), "past the budget");
        drop(held);
        assert!(reserve(1).is_some(), "given back on drop");
    }

    #[test]
    fn local_errors() {
        assert!(is_local(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_local(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_local(&io::Error::from_raw_os_error(libc::ECONNREFUSED)));
    }
}
