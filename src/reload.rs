//! Hot reload: watch the config directory, and publish each new valid table.
//!
//! Triggers: inotify on the directory (not the files: the kubelet's `..data`
//! swap replaces them, and a watch on a replaced file dies), SIGHUP,
//! `POST /reload`, and a poll as a fallback for missed events. Events are
//! debounced, and a reload whose content hash did not change does nothing.
//! A reload is all or nothing: read, validate and compile off to the side, then
//! one `ArcSwap::store`. A bad config keeps the table in use, logs one error
//! naming file and line, and is counted. Each applied table is also sent on a
//! watch channel, which `lib` uses to bring the listeners in step.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{self, Config};
use crate::metrics;
use crate::shutdown::{Shutdown, Tasks};
use crate::table::{self, RoutingTable};
use crate::tls::{self, TlsClient};

/// A directory that never stops changing still reloads at least this often
/// (or every debounce, when that is longer).
const DEBOUNCE_MAX: Duration = Duration::from_secs(1);

/// How the reloader finds out about changes.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Watch the directory with inotify.
    pub watch: bool,
    /// Re-read this often regardless of events; `None` disables polling.
    pub poll_interval: Option<Duration>,
    /// Quiet time after the last file event before reloading: the kubelet's
    /// swap is several events in a row. Default 100ms.
    pub debounce: Duration,
}

/// What the admin server shows of the reload history (`GET /config`).
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub generation: u64,
    pub last_success: Option<SystemTime>,
    /// The last rejected config, until a later one is applied.
    pub last_error: Option<(String, SystemTime)>,
}

/// What one reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied { generation: u64 },
    Unchanged { generation: u64 },
    Rejected { error: String },
}

/// Asks the reloader to reload now (`POST /reload`). Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    requests: mpsc::Sender<oneshot::Sender<Outcome>>,
    pub status: Arc<Mutex<Status>>,
}

/// The first table, loaded at start, and the content hash it came from.
pub struct Initial {
    pub config: Config,
    pub tls: HashMap<String, Arc<TlsClient>>,
    pub hash: u64,
}

/// What reading the directory found, decided off the async runtime.
enum Read {
    /// Same content as the last read.
    Unchanged,
    Rejected {
        hash: u64,
        error: String,
    },
    Loaded {
        hash: u64,
        initial: Initial,
    },
}

/// Owns everything a reload changes.
struct Reloader {
    dir: PathBuf,
    tables: Arc<ArcSwap<RoutingTable>>,
    publish: watch::Sender<Arc<RoutingTable>>,
    /// Hash of the sources last read, valid or not, so an unchanged broken
    /// file is not re-reported on every poll.
    last_hash: u64,
    status: Arc<Mutex<Status>>,
    /// The directory watch; TLS file directories are added to it as configs name them.
    watcher: Option<notify::RecommendedWatcher>,
    watched: Vec<PathBuf>,
    /// Drain timers run here: ended after the shutdown's drain.
    timers: Tasks,
}

/// Loads the config directory for the first table.
pub fn load_initial(dir: &Path) -> Result<Initial, config::ConfigError> {
    let sources = config::read_sources(dir)?;
    let source_hash = hash_sources(&sources);
    let config = Config::from_sources(sources)?;
    let hash = hash_with_tls(source_hash, &config);
    let tls = tls::load_all(&config)?;
    Ok(Initial { config, tls, hash })
}

/// Starts the reloader for `dir`, whose current content is `initial` and is
/// already published in `tables` (generation 1). Returns the admin's handle and
/// the channel on which every applied table is announced.
pub fn spawn(
    dir: PathBuf,
    initial: &Initial,
    tables: Arc<ArcSwap<RoutingTable>>,
    settings: Settings,
    shutdown: Shutdown,
) -> (Handle, watch::Receiver<Arc<RoutingTable>>) {
    let current = tables.load_full();
    let m = metrics::get();
    m.config_generation.set(current.generation as i64);
    m.config_last_reload_success
        .set(unix_seconds(SystemTime::now()));
    let status = Arc::new(Mutex::new(Status {
        generation: current.generation,
        last_success: Some(SystemTime::now()),
        last_error: None,
    }));
    let (publish, applied) = watch::channel(current);
    let (requests, request_rx) = mpsc::channel(8);
    let reloader = Reloader {
        dir,
        tables,
        publish,
        last_hash: initial.hash,
        status: status.clone(),
        watcher: None,
        watched: Vec::new(),
        timers: shutdown.background_tasks(),
    };
    let tls_files = tls::files(&initial.config);
    // Owned by the shutdown: a background task, ended after the drain.
    shutdown.background_tasks().spawn(reloader.run(
        settings,
        request_rx,
        tls_files,
        shutdown.clone(),
    ));
    (Handle { requests, status }, applied)
}

// === impl Handle ===

impl Handle {
    /// Reloads now and reports what happened.
    pub async fn reload(&self) -> Outcome {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(tx).await.is_err() {
            return Outcome::Rejected {
                error: "the reloader has stopped (shutting down)".to_string(),
            };
        }
        rx.await.unwrap_or(Outcome::Rejected {
            error: "the reloader has stopped (shutting down)".to_string(),
        })
    }
}

// === impl Reloader ===

impl Reloader {
    async fn run(
        mut self,
        settings: Settings,
        mut requests: mpsc::Receiver<oneshot::Sender<Outcome>>,
        initial_tls_files: Vec<PathBuf>,
        shutdown: Shutdown,
    ) {
        // Events arrive on notify's own thread; a full channel already means
        // "something changed", so extra events are dropped, not queued.
        let (event_tx, mut events) = mpsc::channel::<()>(1);
        self.watcher = settings
            .watch
            .then(|| watch_dir(&self.dir, event_tx))
            .flatten();
        self.watch_tls_dirs(&initial_tls_files);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut poll = settings.poll_interval.map(|every| {
            let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            poll
        });

        loop {
            tokio::select! {
                Some(()) = events.recv() => {
                    debounce(&mut events, settings.debounce).await;
                    self.reload("watch").await;
                }
                Some(()) = recv_signal(&mut hup) => { self.reload("SIGHUP").await; }
                () = tick(&mut poll) => { self.reload("poll").await; }
                Some(reply) = requests.recv() => {
                    let _ = reply.send(self.reload("admin").await);
                }
                _ = shutdown.begun.cancelled() => return,
            }
        }
    }

    /// One reload attempt. Never panics, never leaves a half-applied table.
    /// The file work (reading, parsing, PEM and system roots) runs on a
    /// blocking thread: a single-threaded runtime keeps serving meanwhile.
    async fn reload(&mut self, trigger: &'static str) -> Outcome {
        let (dir, last_hash) = (self.dir.clone(), self.last_hash);
        let read = match tokio::task::spawn_blocking(move || read(&dir, last_hash)).await {
            Ok(read) => read,
            Err(e) => return self.reject(trigger, format!("reading the config failed: {e}")),
        };
        let initial = match read {
            Read::Unchanged => {
                let generation = self.tables.load().generation;
                tracing::debug!(trigger, generation, "config unchanged");
                return Outcome::Unchanged { generation };
            }
            Read::Rejected { hash, error } => {
                self.last_hash = hash;
                return self.reject(trigger, error);
            }
            Read::Loaded { hash, initial } => {
                self.last_hash = hash;
                initial
            }
        };
        let Initial { config, tls, .. } = initial;
        self.watch_tls_dirs(&tls::files(&config));

        let old = self.tables.load_full();
        let generation = old.generation + 1;
        let mut new = match table::compile(&config, &tls, generation, Some(&old)) {
            Ok(t) => t,
            Err(e) => return self.reject(trigger, e.to_string()),
        };
        let retired = table::carry_over(&old, &mut new);
        new.start();
        let new = Arc::new(new);
        self.tables.store(new.clone());
        table::retire(&old, &new);
        for r in retired {
            tracing::info!(listener = r.listener.as_deref().unwrap_or("-"), cluster = %r.cluster,
                endpoint = r.endpoint.as_deref().unwrap_or("-"), grace = ?r.grace,
                "target moved by reload: its connections close after the grace");
            // Sessions that can tell a safe moment (Postgres) leave at once.
            r.leaving.cancel();
            self.timers.spawn(async move {
                tokio::time::sleep(r.grace).await;
                r.token.cancel();
            });
        }
        self.publish.send_replace(new);

        let now = SystemTime::now();
        let m = metrics::get();
        m.config_reloads_total.with_label_values(&["success"]).inc();
        m.config_generation.set(generation as i64);
        m.config_last_reload_success.set(unix_seconds(now));
        if let Ok(mut s) = self.status.lock() {
            s.generation = generation;
            s.last_success = Some(now);
            s.last_error = None;
        }
        tracing::info!(
            trigger,
            generation,
            listeners = config.listeners.len(),
            clusters = config.clusters.len(),
            "configuration reloaded"
        );
        Outcome::Applied { generation }
    }

    /// Adds the directories of the config's TLS files to the watch (the
    /// directory, not the file: Secret volumes swap files like ConfigMaps).
    fn watch_tls_dirs(&mut self, files: &[PathBuf]) {
        let Some(watcher) = &mut self.watcher else {
            return;
        };
        for file in files {
            let Some(dir) = file.parent().map(Path::to_path_buf) else {
                continue;
            };
            if dir.as_os_str().is_empty() || self.watched.contains(&dir) || dir == self.dir {
                continue;
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => self.watched.push(dir),
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e,
                    "cannot watch a TLS directory; rotations there are seen by polling and SIGHUP"),
            }
        }
    }

    fn reject(&mut self, trigger: &'static str, error: String) -> Outcome {
        metrics::get()
            .config_reloads_total
            .with_label_values(&["error"])
            .inc();
        tracing::error!(trigger, error = %error, "configuration rejected, keeping the table in use");
        if let Ok(mut s) = self.status.lock() {
            s.last_error = Some((error.clone(), SystemTime::now()));
        }
        Outcome::Rejected { error }
    }
}

/// Reads, parses and validates `dir`, and loads its TLS files, unless the
/// content hash equals `last_hash`. Blocking: run it off the async runtime.
fn read(dir: &Path, last_hash: u64) -> Read {
    let sources = match config::read_sources(dir) {
        Ok(s) => s,
        Err(e) => {
            // Hash the error: the same broken directory is reported once.
            let mut h = DefaultHasher::new();
            e.to_string().hash(&mut h);
            let hash = h.finish();
            if hash == last_hash {
                return Read::Unchanged;
            }
            return Read::Rejected {
                hash,
                error: e.to_string(),
            };
        }
    };
    let source_hash = hash_sources(&sources);
    let parsed = Config::from_sources(sources);
    // TLS files count as content: a rotated certificate is a change.
    let hash = match &parsed {
        Ok(config) => hash_with_tls(source_hash, config),
        Err(_) => source_hash,
    };
    if hash == last_hash {
        return Read::Unchanged;
    }
    let config = match parsed {
        Ok(c) => c,
        Err(e) => {
            return Read::Rejected {
                hash,
                error: e.to_string(),
            };
        }
    };
    match tls::load_all(&config) {
        Ok(tls) => Read::Loaded {
            hash,
            initial: Initial { config, tls, hash },
        },
        Err(e) => Read::Rejected {
            hash,
            error: e.to_string(),
        },
    }
}

/// Waits until no event came for `quiet`, or [`DEBOUNCE_MAX`] (at least
/// `quiet`) passed.
async fn debounce(events: &mut mpsc::Receiver<()>, quiet: Duration) {
    let until = tokio::time::Instant::now() + DEBOUNCE_MAX.max(quiet);
    loop {
        tokio::select! {
            // Cancel-safe: a lost `recv` only loses a coalesced "changed" mark.
            Some(()) = events.recv() => {}
            _ = tokio::time::sleep(quiet) => return,
            _ = tokio::time::sleep_until(until) => return,
        }
    }
}

/// The next poll tick; never, when polling is off.
async fn tick(poll: &mut Option<tokio::time::Interval>) {
    match poll {
        Some(p) => {
            p.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn recv_signal(sig: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Watches `dir` itself (non-recursive): creations, renames and writes of its
/// entries, which covers both the kubelet's `..data` swap and in-place edits.
fn watch_dir(dir: &Path, events: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && !event.kind.is_access()
        {
            let _ = events.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config directory; relying on polling and SIGHUP");
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; relying on polling and SIGHUP");
        return None;
    }
    Some(watcher)
}

/// `hash` extended with the content of every TLS file the config names.
fn hash_with_tls(hash: u64, config: &Config) -> u64 {
    let mut h = DefaultHasher::new();
    hash.hash(&mut h);
    for path in tls::files(config) {
        path.hash(&mut h);
        match std::fs::read(&path) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.to_string().hash(&mut h),
        }
    }
    h.finish()
}

/// A hash of file names and contents (or read errors), in order.
fn hash_sources(sources: &[(PathBuf, std::io::Result<String>)]) -> u64 {
    let mut h = DefaultHasher::new();
    for (path, text) in sources {
        path.hash(&mut h);
        match text {
            Ok(t) => t.hash(&mut h),
            Err(e) => e.to_string().hash(&mut h),
        }
    }
    h.finish()
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
