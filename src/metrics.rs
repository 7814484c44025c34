//! The Prometheus metric families whose names DESIGN.md fixes as a contract.
//!
//! A leaf: everything else asks it for handles. Families are registered once in
//! one process-wide registry; label values come from config names only, so
//! cardinality is bounded by the config. Handles for a listener or cluster are
//! resolved when the routing table is compiled, so the hot path only bumps atomics.

use std::sync::{Arc, LazyLock};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every family legate exports.
pub struct Metrics {
    registry: Registry,
    pub listener_connections_total: IntCounterVec,
    pub listener_connections_active: IntGaugeVec,
    pub listener_accept_paused_total: IntCounterVec,
    pub bytes_total: IntCounterVec,
    pub upstream_connects_total: IntCounterVec,
    pub upstream_connect_seconds: HistogramVec,
    pub endpoint_healthy: IntGaugeVec,
    pub cluster_failovers_total: IntCounterVec,
    pub dns_resolutions_total: IntCounterVec,
    pub http_requests_total: IntCounterVec,
    pub http_request_seconds: HistogramVec,
    pub tls_cert_expiry: GaugeVec,
    pub config_reloads_total: IntCounterVec,
    pub config_generation: IntGauge,
    pub config_last_reload_success: Gauge,
    pub postgres_sessions_closed_total: IntCounterVec,
    pub postgres_cancels_total: IntCounterVec,
    pub postgres_held_sessions_total: IntCounterVec,
    pub postgres_fence_wait_seconds: HistogramVec,
    pub kafka_requests_total: IntCounterVec,
    pub kafka_request_seconds: HistogramVec,
}

/// Handles for one Kafka listener, resolved per API on first use (at most
/// one series per API key the client uses, under 100).
#[derive(Clone)]
pub struct KafkaMetrics {
    listener: Arc<str>,
    apis: Arc<[std::sync::OnceLock<(IntCounter, Histogram)>]>,
}

impl KafkaMetrics {
    fn api(&self, api: Option<kafka_protocol::messages::ApiKey>) -> &(IntCounter, Histogram) {
        // The last slot is every key this build does not know.
        let slot = api.map_or(self.apis.len() - 1, |a| {
            (a as usize).min(self.apis.len() - 1)
        });
        self.apis[slot].get_or_init(|| {
            let name = api.map_or_else(|| "unknown".to_string(), |a| format!("{a:?}"));
            let m = get();
            (
                m.kafka_requests_total
                    .with_label_values(&[&*self.listener, name.as_str()]),
                m.kafka_request_seconds
                    .with_label_values(&[&*self.listener, name.as_str()]),
            )
        })
    }

    pub fn requests(&self, api: Option<kafka_protocol::messages::ApiKey>) -> &IntCounter {
        &self.api(api).0
    }

    pub fn seconds(&self, api: Option<kafka_protocol::messages::ApiKey>) -> &Histogram {
        &self.api(api).1
    }
}

/// Handles for one Postgres listener.
#[derive(Clone)]
pub struct PostgresMetrics {
    /// Sessions legate closed at an idle point because they had to move.
    pub closed_idle: IntCounter,
    /// Sessions closed by the drain grace before an idle point.
    pub closed_forced: IntCounter,
    cancels: [IntCounter; 3],
    pub held_sessions: IntCounter,
    pub fence_wait_seconds: Histogram,
}

impl PostgresMetrics {
    pub fn cancels(&self, outcome: crate::postgres::cancel::Outcome) -> &IntCounter {
        use crate::postgres::cancel::Outcome;
        match outcome {
            Outcome::Routed => &self.cancels[0],
            Outcome::Unknown => &self.cancels[1],
            Outcome::Failed => &self.cancels[2],
        }
    }
}

/// The `how` label values of `legate_postgres_sessions_closed_total`.
const CLOSED_HOW: [&str; 2] = ["idle", "forced"];
/// The `result` label values of `legate_postgres_cancels_total`.
const CANCEL_RESULTS: [&str; 3] = ["routed", "unknown", "failed"];

/// One labelled series (or group of series) that exists because of a config
/// object. When a reload drops the object, its series are removed, so alerts
/// on, say, an endpoint being down end with the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Series {
    Listener(Arc<str>),
    /// An HTTP route's latency histogram.
    Route {
        listener: Arc<str>,
        route: Arc<str>,
    },
    /// An HTTP route's request counters on one cluster.
    RouteCluster {
        listener: Arc<str>,
        route: Arc<str>,
        cluster: Arc<str>,
    },
    Cluster(Arc<str>),
    Failover {
        cluster: Arc<str>,
        to: Arc<str>,
    },
    Endpoint {
        cluster: Arc<str>,
        endpoint: Arc<str>,
    },
}

/// Handles for one listener, resolved once per table compile.
#[derive(Clone)]
pub struct ListenerMetrics {
    pub connections_total: IntCounter,
    pub connections_active: IntGauge,
    /// App → backend.
    pub bytes_upstream: IntCounter,
    /// Backend → app.
    pub bytes_downstream: IntCounter,
}

/// Handles for one cluster, resolved once per table compile.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub connect_ok: IntCounter,
    pub connect_refused: IntCounter,
    pub connect_timeout: IntCounter,
    /// Any other connect error (unreachable network, no route, ...).
    pub connect_error: IntCounter,
    /// TCP connected, TLS handshake or verification failed.
    pub connect_tls_error: IntCounter,
    /// legate ran out of something (fds, memory, ports): not the endpoint's fault.
    pub connect_local_error: IntCounter,
    /// Counted once per client turned away because no endpoint of the route's
    /// clusters (primary and failover) answered.
    pub no_healthy_endpoint: IntCounter,
    pub connect_seconds: Histogram,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The `code` label values of `legate_http_requests_total`.
const CODES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// The `result` label values of `legate_upstream_connects_total`.
const CONNECT_RESULTS: [&str; 7] = [
    "ok",
    "refused",
    "timeout",
    "tls_error",
    "error",
    "local_error",
    "no_healthy_endpoint",
];

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

// === impl Metrics ===

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let listener_connections_total = IntCounterVec::new(
            Opts::new(
                "legate_listener_connections_total",
                "Connections accepted by a listener.",
            ),
            &["listener"],
        )
        .expect("static metric definition");
        let listener_connections_active = IntGaugeVec::new(
            Opts::new(
                "legate_listener_connections_active",
                "Connections currently open on a listener.",
            ),
            &["listener"],
        )
        .expect("static metric definition");
        let listener_accept_paused_total = IntCounterVec::new(
            Opts::new(
                "legate_listener_accept_paused_total",
                "Times a listener stopped accepting because it was at a limit (reason: max_connections, fds); new connections wait in the kernel backlog meanwhile.",
            ),
            &["listener", "reason"],
        )
        .expect("static metric definition");
        let bytes_total = IntCounterVec::new(
            Opts::new(
                "legate_bytes_total",
                "Bytes forwarded; direction=upstream is app to backend, downstream is backend to app.",
            ),
            &["listener", "direction"],
        )
        .expect("static metric definition");
        let upstream_connects_total = IntCounterVec::new(
            Opts::new(
                "legate_upstream_connects_total",
                "Upstream connect attempts by result.",
            ),
            &["cluster", "result"],
        )
        .expect("static metric definition");
        let upstream_connect_seconds = HistogramVec::new(
            HistogramOpts::new(
                "legate_upstream_connect_seconds",
                "Time to establish a successful upstream connection.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ]),
            &["cluster"],
        )
        .expect("static metric definition");

        let endpoint_healthy = IntGaugeVec::new(
            Opts::new(
                "legate_endpoint_healthy",
                "1 when new connections may use the endpoint (up by active checks, not ejected by failed connects).",
            ),
            &["cluster", "endpoint"],
        )
        .expect("static metric definition");
        let cluster_failovers_total = IntCounterVec::new(
            Opts::new(
                "legate_cluster_failovers_total",
                "Connections served by a failover cluster because the primary had no healthy endpoint.",
            ),
            &["cluster", "to"],
        )
        .expect("static metric definition");
        let dns_resolutions_total = IntCounterVec::new(
            Opts::new(
                "legate_dns_resolutions_total",
                "Resolutions of endpoint names by result (ok, error).",
            ),
            &["cluster", "result"],
        )
        .expect("static metric definition");
        let http_requests_total = IntCounterVec::new(
            Opts::new(
                "legate_http_requests_total",
                "HTTP requests answered, by route, cluster and status class (1xx..5xx).",
            ),
            &["listener", "route", "cluster", "code"],
        )
        .expect("static metric definition");
        let http_request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "legate_http_request_seconds",
                "Time from request to response head, by status class (code: 1xx..5xx).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["listener", "route", "code"],
        )
        .expect("static metric definition");
        let tls_cert_expiry = GaugeVec::new(
            Opts::new(
                "legate_tls_cert_expiry_timestamp_seconds",
                "When the client certificate a cluster presents (mTLS) expires, Unix time.",
            ),
            &["cluster"],
        )
        .expect("static metric definition");
        let config_reloads_total = IntCounterVec::new(
            Opts::new(
                "legate_config_reloads_total",
                "Configuration reload attempts whose content changed, by result.",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let config_generation = IntGauge::new(
            "legate_config_generation",
            "Generation of the routing table in use: 1 at start, +1 per applied reload.",
        )
        .expect("static metric definition");
        let config_last_reload_success = Gauge::new(
            "legate_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration load that was applied.",
        )
        .expect("static metric definition");
        let postgres_sessions_closed_total = IntCounterVec::new(
            Opts::new(
                "legate_postgres_sessions_closed_total",
                "Postgres sessions legate closed because they had to leave their server, by how: idle (between transactions) or forced (the drain grace ran out first).",
            ),
            &["listener", "how"],
        )
        .expect("static metric definition");
        let postgres_cancels_total = IntCounterVec::new(
            Opts::new(
                "legate_postgres_cancels_total",
                "Postgres CancelRequests, by result: routed (to the session's server), unknown (no open session has the key), failed (its server was unreachable).",
            ),
            &["listener", "result"],
        )
        .expect("static metric definition");
        let postgres_held_sessions_total = IntCounterVec::new(
            Opts::new(
                "legate_postgres_held_sessions_total",
                "New Postgres sessions held by a cut-over fence until the old target's sessions closed.",
            ),
            &["listener"],
        )
        .expect("static metric definition");
        let postgres_fence_wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "legate_postgres_fence_wait_seconds",
                "How long each held Postgres session waited at a cut-over fence.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
            &["listener"],
        )
        .expect("static metric definition");
        let kafka_requests_total = IntCounterVec::new(
            Opts::new(
                "legate_kafka_requests_total",
                "Kafka requests through a listener, by API (Produce, Fetch, Metadata, ...).",
            ),
            &["listener", "api"],
        )
        .expect("static metric definition");
        let kafka_request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "legate_kafka_request_seconds",
                "Time from a Kafka request to its response, by API.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
            &["listener", "api"],
        )
        .expect("static metric definition");
        // Both results exist from the start, so `increase()` sees the first error.
        for result in ["success", "error"] {
            config_reloads_total.with_label_values(&[result]);
        }

        for c in [
            Box::new(listener_connections_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(listener_connections_active.clone()),
            Box::new(listener_accept_paused_total.clone()),
            Box::new(bytes_total.clone()),
            Box::new(upstream_connects_total.clone()),
            Box::new(upstream_connect_seconds.clone()),
            Box::new(endpoint_healthy.clone()),
            Box::new(cluster_failovers_total.clone()),
            Box::new(dns_resolutions_total.clone()),
            Box::new(http_requests_total.clone()),
            Box::new(http_request_seconds.clone()),
            Box::new(tls_cert_expiry.clone()),
            Box::new(config_reloads_total.clone()),
            Box::new(config_generation.clone()),
            Box::new(config_last_reload_success.clone()),
            Box::new(postgres_sessions_closed_total.clone()),
            Box::new(postgres_cancels_total.clone()),
            Box::new(postgres_held_sessions_total.clone()),
            Box::new(postgres_fence_wait_seconds.clone()),
            Box::new(kafka_requests_total.clone()),
            Box::new(kafka_request_seconds.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");

        Metrics {
            registry,
            listener_connections_total,
            listener_connections_active,
            listener_accept_paused_total,
            bytes_total,
            upstream_connects_total,
            upstream_connect_seconds,
            endpoint_healthy,
            cluster_failovers_total,
            dns_resolutions_total,
            http_requests_total,
            http_request_seconds,
            tls_cert_expiry,
            config_reloads_total,
            config_generation,
            config_last_reload_success,
            postgres_sessions_closed_total,
            postgres_cancels_total,
            postgres_held_sessions_total,
            postgres_fence_wait_seconds,
            kafka_requests_total,
            kafka_request_seconds,
        }
    }

    /// Handles for the Kafka listener named `name`.
    pub fn kafka(&self, name: &str) -> KafkaMetrics {
        KafkaMetrics {
            listener: Arc::from(name),
            apis: (0..128).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    /// Handles for the Postgres listener named `name`.
    pub fn postgres(&self, name: &str) -> PostgresMetrics {
        let closed = |how: &str| {
            self.postgres_sessions_closed_total
                .with_label_values(&[name, how])
        };
        let cancels = |r: &str| self.postgres_cancels_total.with_label_values(&[name, r]);
        PostgresMetrics {
            closed_idle: closed(CLOSED_HOW[0]),
            closed_forced: closed(CLOSED_HOW[1]),
            cancels: [
                cancels(CANCEL_RESULTS[0]),
                cancels(CANCEL_RESULTS[1]),
                cancels(CANCEL_RESULTS[2]),
            ],
            held_sessions: self.postgres_held_sessions_total.with_label_values(&[name]),
            fence_wait_seconds: self.postgres_fence_wait_seconds.with_label_values(&[name]),
        }
    }

    /// Handles for the listener named `name`.
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics {
            connections_total: self.listener_connections_total.with_label_values(&[name]),
            connections_active: self.listener_connections_active.with_label_values(&[name]),
            bytes_upstream: self.bytes_total.with_label_values(&[name, "upstream"]),
            bytes_downstream: self.bytes_total.with_label_values(&[name, "downstream"]),
        }
    }

    /// Handles for the cluster named `name`.
    pub fn cluster(&self, name: &str) -> ClusterMetrics {
        let result = |r: &str| {
            debug_assert!(CONNECT_RESULTS.contains(&r));
            self.upstream_connects_total.with_label_values(&[name, r])
        };
        ClusterMetrics {
            connect_ok: result("ok"),
            connect_refused: result("refused"),
            connect_timeout: result("timeout"),
            connect_error: result("error"),
            connect_tls_error: result("tls_error"),
            connect_local_error: result("local_error"),
            no_healthy_endpoint: result("no_healthy_endpoint"),
            connect_seconds: self.upstream_connect_seconds.with_label_values(&[name]),
        }
    }

    /// Latency histograms for 1xx..5xx of one (listener, route): a 15 s 504
    /// and a 2 ms 200 do not share a histogram.
    pub fn http_seconds(&self, listener: &str, route: &str) -> [Histogram; 5] {
        CODES.map(|code| {
            self.http_request_seconds
                .with_label_values(&[listener, route, code])
        })
    }

    /// Counters for 1xx..5xx of one (listener, route, cluster).
    pub fn http_codes(&self, listener: &str, route: &str, cluster: &str) -> [IntCounter; 5] {
        CODES.map(|code| {
            self.http_requests_total
                .with_label_values(&[listener, route, cluster, code])
        })
    }

    /// Removes every series of `series` (those that do not exist are skipped).
    pub fn remove(&self, series: &Series) {
        match series {
            Series::Listener(l) => {
                let _ = self.listener_connections_total.remove_label_values(&[l]);
                let _ = self.listener_connections_active.remove_label_values(&[l]);
                for direction in ["upstream", "downstream"] {
                    let _ = self.bytes_total.remove_label_values(&[l, direction]);
                }
                for reason in ["max_connections", "fds"] {
                    let _ = self
                        .listener_accept_paused_total
                        .remove_label_values(&[l, reason]);
                }
                for code in CODES {
                    let _ = self
                        .http_requests_total
                        .remove_label_values(&[l, "none", "none", code]);
                }
                for how in CLOSED_HOW {
                    let _ = self
                        .postgres_sessions_closed_total
                        .remove_label_values(&[l, how]);
                }
                for result in CANCEL_RESULTS {
                    let _ = self
                        .postgres_cancels_total
                        .remove_label_values(&[l, result]);
                }
                let _ = self.postgres_held_sessions_total.remove_label_values(&[l]);
                let _ = self.postgres_fence_wait_seconds.remove_label_values(&[l]);
                let apis = kafka_protocol::messages::ApiKey::iter()
                    .map(|a| format!("{a:?}"))
                    .chain(["unknown".to_string()]);
                for api in apis {
                    let _ = self
                        .kafka_requests_total
                        .remove_label_values(&[&**l, api.as_str()]);
                    let _ = self
                        .kafka_request_seconds
                        .remove_label_values(&[&**l, api.as_str()]);
                }
            }
            Series::Route { listener, route } => {
                for code in CODES {
                    let _ = self
                        .http_request_seconds
                        .remove_label_values(&[listener, route, code]);
                }
            }
            Series::RouteCluster {
                listener,
                route,
                cluster,
            } => {
                for code in CODES {
                    let _ = self
                        .http_requests_total
                        .remove_label_values(&[listener, route, cluster, code]);
                }
            }
            Series::Cluster(c) => {
                for result in CONNECT_RESULTS {
                    let _ = self
                        .upstream_connects_total
                        .remove_label_values(&[c, result]);
                }
                let _ = self.upstream_connect_seconds.remove_label_values(&[c]);
                for result in ["ok", "error"] {
                    let _ = self.dns_resolutions_total.remove_label_values(&[c, result]);
                }
                let _ = self.tls_cert_expiry.remove_label_values(&[c]);
            }
            Series::Failover { cluster, to } => {
                let _ = self
                    .cluster_failovers_total
                    .remove_label_values(&[cluster, to]);
            }
            Series::Endpoint { cluster, endpoint } => {
                let _ = self
                    .endpoint_healthy
                    .remove_label_values(&[cluster, endpoint]);
            }
        }
    }

    /// Every family as the registry holds it now (the status page reads these).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a family that fails to encode is skipped.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
