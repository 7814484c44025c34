//! The checks that need the whole directory: unique names and listen
//! addresses across files, known cluster references, and the shape of each
//! listener, route and cluster. Every problem becomes a located `Diagnostic`.

use super::*;

/// Merges the files and runs every cross-file check, pushing what is wrong.
pub(super) fn merge(
    files: Vec<(PathBuf, FileConfig)>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Config {
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    let mut listener_files = Vec::new();
    let mut cluster_files = Vec::new();
    let mut resolver: Option<(PathBuf, Spanned<ResolverConfig>)> = None;
    let first_file = files.first().map(|(p, _)| p.clone());
    for (path, file) in files {
        if let Some(r) = file.resolver {
            match &resolver {
                Some((first, at)) => diagnostics.push(Diagnostic::new(
                    &path,
                    r.referenced.line(),
                    r.referenced.column(),
                    format!(
                        "duplicate \"resolver\" section (first defined at {}:{})",
                        first.display(),
                        at.referenced.line()
                    ),
                )),
                None => resolver = Some((path.clone(), r)),
            }
        }
        for l in file.listeners {
            listener_files.push(path.clone());
            listeners.push(l);
        }
        for c in file.clusters {
            cluster_files.push(path.clone());
            clusters.push(c);
        }
    }

    let mut at = |file: &Path, loc: &Location, message: String| {
        diagnostics.push(Diagnostic::new(file, loc.line(), loc.column(), message));
    };

    let mut cluster_names: HashMap<&str, (&Path, &Location)> = HashMap::new();
    for (c, file) in clusters.iter().zip(&cluster_files) {
        let name = c.name.value.as_str();
        if let Err(why) = check_name(name) {
            at(file, &c.name.referenced, format!("field \"name\": {why}"));
        }
        if let Some(first) = first_place(&mut cluster_names, name, file, &c.name.referenced) {
            at(
                file,
                &c.name.referenced,
                format!(
                    "field \"name\": duplicate cluster name \"{name}\" (first defined at {first})"
                ),
            );
        }
        if c.endpoints.value.is_empty() {
            at(
                file,
                &c.endpoints.referenced,
                format!("field \"endpoints\": cluster \"{name}\" needs at least one endpoint"),
            );
        }
        in_range(
            &mut at,
            file,
            &c.name.referenced,
            "connect_timeout",
            c.connect_timeout.0,
            CONNECT_TIMEOUT,
        );
        in_range(
            &mut at,
            file,
            &c.name.referenced,
            "pool_idle_timeout",
            c.pool_idle_timeout.0,
            IDLE_TIMEOUT,
        );
        if let Some(grace) = c.drain_on_change {
            in_range(
                &mut at,
                file,
                &c.name.referenced,
                "drain_on_change",
                grace.0,
                DRAIN_GRACE,
            );
        }
        if let Some(h) = &c.health {
            let loc = &h.referenced;
            let h = &h.value;
            for (field, n) in [("unhealthy", h.unhealthy), ("healthy", h.healthy)] {
                if !(1..=MAX_THRESHOLD).contains(&n) {
                    at(
                        file,
                        loc,
                        format!("field \"{field}\": {n} is out of range (1 to {MAX_THRESHOLD})"),
                    );
                }
            }
            let interval_ok = in_range(
                &mut at,
                file,
                loc,
                "interval",
                h.interval.0,
                HEALTH_INTERVAL,
            );
            let timeout_ok = in_range(&mut at, file, loc, "timeout", h.timeout.0, PROBE_TIMEOUT);
            if interval_ok && timeout_ok && h.timeout.0 > h.interval.0 {
                at(
                    file,
                    loc,
                    "field \"health\": timeout must not exceed interval".to_string(),
                );
            }
            if h.kind == HealthKind::Postgres && h.http_path.is_some() {
                at(
                    file,
                    loc,
                    "field \"health\": kind postgres and http_path do not go together".to_string(),
                );
            }
            if h.http_path
                .as_ref()
                .is_some_and(|p| !p.starts_with('/') || p.contains(char::is_whitespace))
            {
                at(
                    file,
                    loc,
                    "field \"http_path\": must start with '/' and contain no spaces".to_string(),
                );
            }
        }
    }
    for (c, file) in clusters.iter().zip(&cluster_files) {
        if let Some(tls) = &c.tls {
            let (t, loc) = (&tls.value, &tls.referenced);
            if t.cert.is_some() != t.key.is_some() {
                at(
                    file,
                    loc,
                    "field \"tls\": \"cert\" and \"key\" go together (mTLS needs both)".to_string(),
                );
            }
            let has_ip_endpoint = c
                .endpoints
                .value
                .iter()
                .any(|e| matches!(e.value.target, EndpointTarget::Addr(_)));
            if t.verify && t.sni.is_none() && has_ip_endpoint {
                at(file, loc, "field \"tls\": an IP endpoint has no name to verify: set \"sni\" (or verify: false)".to_string());
            }
            if let Some(sni) = &t.sni
                && rustls_pki_types::ServerName::try_from(sni.as_str()).is_err()
            {
                at(
                    file,
                    loc,
                    format!("field \"sni\": invalid server name \"{sni}\""),
                );
            }
            if t.alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
                at(
                    file,
                    loc,
                    "field \"alpn\": protocols must be 1 to 255 bytes".to_string(),
                );
            }
        }
        let mut seen = HashSet::new();
        for f in &c.failover {
            if f.value == c.name.value {
                at(
                    file,
                    &f.referenced,
                    format!(
                        "field \"failover\": cluster \"{}\" cannot fail over to itself",
                        f.value
                    ),
                );
            } else if !cluster_names.contains_key(f.value.as_str()) {
                at(
                    file,
                    &f.referenced,
                    unknown_cluster(&f.value, &cluster_names).replacen(
                        "field \"cluster\"",
                        "field \"failover\"",
                        1,
                    ),
                );
            } else if !seen.insert(f.value.as_str()) {
                at(
                    file,
                    &f.referenced,
                    format!(
                        "field \"failover\": cluster \"{}\" is listed twice",
                        f.value
                    ),
                );
            }
        }
    }
    let ttls_ok = resolver.as_ref().is_none_or(|(file, r)| {
        let min = in_range(
            &mut at,
            file,
            &r.referenced,
            "min_ttl",
            r.value.min_ttl.0,
            TTL,
        );
        let max = in_range(
            &mut at,
            file,
            &r.referenced,
            "max_ttl",
            r.value.max_ttl.0,
            TTL,
        );
        min && max
    });
    if let Some((file, r)) = &resolver
        && ttls_ok
        && r.value.min_ttl.0 > r.value.max_ttl.0
    {
        at(
            file,
            &r.referenced,
            "field \"resolver\": min_ttl must not exceed max_ttl".to_string(),
        );
    }

    let mut listener_names: HashMap<&str, (&Path, &Location)> = HashMap::new();
    let mut listen_addrs: HashMap<SocketAddr, (&Path, &Location)> = HashMap::new();
    for (l, file) in listeners.iter().zip(&listener_files) {
        let name = l.name.value.as_str();
        if let Err(why) = check_name(name) {
            at(file, &l.name.referenced, format!("field \"name\": {why}"));
        }
        if let Some(first) = first_place(&mut listener_names, name, file, &l.name.referenced) {
            at(
                file,
                &l.name.referenced,
                format!(
                    "field \"name\": duplicate listener name \"{name}\" (first defined at {first})"
                ),
            );
        }
        let addr = l.listen.value.0;
        // Port 0 is "any free port": several listeners may ask for it.
        if addr.port() != 0
            && let Some(first) = first_place(&mut listen_addrs, addr, file, &l.listen.referenced)
        {
            at(
                file,
                &l.listen.referenced,
                format!(
                    "field \"listen\": address {addr} is already used by another listener (at {first})"
                ),
            );
        }
        let is_http = l.protocol == Protocol::Http;
        match (&l.routes, is_http) {
            (Some(routes), true) => {
                if l.cluster.is_some() || l.split.is_some() {
                    at(
                        file,
                        &routes.referenced,
                        format!(
                            "listener \"{name}\": give either \"routes\" or a listener-level \"cluster\"/\"split\", not both"
                        ),
                    );
                }
                if routes.value.is_empty() {
                    at(
                        file,
                        &routes.referenced,
                        "field \"routes\": needs at least one route".to_string(),
                    );
                }
                let mut route_names = HashSet::new();
                for (i, spanned) in routes.value.iter().enumerate() {
                    let (r, route_at) = (&spanned.value, &spanned.referenced);
                    let what = format!(
                        "route {}",
                        r.name
                            .as_ref()
                            .map_or_else(|| i.to_string(), |n| format!("\"{}\"", n.value))
                    );
                    if let Some(n) = &r.name {
                        if let Err(why) = check_name(&n.value) {
                            at(file, &n.referenced, format!("field \"name\": {why}"));
                        } else if !route_names.insert(n.value.as_str()) {
                            at(
                                file,
                                &n.referenced,
                                format!(
                                    "field \"name\": duplicate route name \"{}\" in listener \"{name}\"",
                                    n.value
                                ),
                            );
                        }
                    }
                    check_target(
                        &mut at,
                        file,
                        &what,
                        &r.cluster,
                        &r.split,
                        route_at,
                        &cluster_names,
                    );
                    check_route(&mut at, file, r, route_at, &cluster_names);
                }
            }
            (Some(routes), false) => at(
                file,
                &routes.referenced,
                format!("listener \"{name}\": \"routes\" need protocol: http"),
            ),
            (None, _) => {
                let what = format!("listener \"{name}\"");
                check_target(
                    &mut at,
                    file,
                    &what,
                    &l.cluster,
                    &l.split,
                    &l.name.referenced,
                    &cluster_names,
                );
            }
        }
        let owner = &l.name.referenced;
        if !(1..=MAX_CONNECTIONS).contains(&l.max_connections) {
            at(
                file,
                owner,
                format!(
                    "field \"max_connections\": {} is out of range (1 to {MAX_CONNECTIONS})",
                    l.max_connections
                ),
            );
        }
        if let Some(t) = l.idle_timeout {
            in_range(&mut at, file, owner, "idle_timeout", t.0, IDLE_TIMEOUT);
        }
        if is_http {
            if let Some(t) = l.header_timeout {
                in_range(&mut at, file, owner, "header_timeout", t.0, HEADER_TIMEOUT);
            }
            if let Some(t) = l.stream_idle_timeout {
                in_range(
                    &mut at,
                    file,
                    owner,
                    "stream_idle_timeout",
                    t.0,
                    IDLE_TIMEOUT,
                );
            }
            if !HEADERS_SIZE.contains(&l.max_request_headers_size) {
                at(
                    file,
                    owner,
                    format!(
                        "field \"max_request_headers_size\": {} is out of range ({} to {} bytes)",
                        l.max_request_headers_size,
                        HEADERS_SIZE.start(),
                        HEADERS_SIZE.end()
                    ),
                );
            }
        } else if l.header_timeout.is_some()
            || l.stream_idle_timeout.is_some()
            || l.max_request_headers_size != super::default_max_request_headers_size()
        {
            at(
                file,
                owner,
                format!(
                    "listener \"{name}\": header_timeout, stream_idle_timeout and max_request_headers_size are for protocol: http"
                ),
            );
        }
        match (&l.http_versions, is_http) {
            (Some(v), true) if v.value.is_empty() => at(
                file,
                &v.referenced,
                format!(
                    "listener \"{name}\": field \"http_versions\": list at least one of http1, h2c"
                ),
            ),
            (Some(v), false) => at(
                file,
                &v.referenced,
                format!("listener \"{name}\": http_versions is for protocol: http"),
            ),
            _ => {}
        }
        if l.access_log && !is_http {
            at(
                file,
                &l.name.referenced,
                format!("listener \"{name}\": access_log is for protocol: http"),
            );
        }
    }

    check_postgres(
        &listeners,
        &listener_files,
        &clusters,
        &cluster_files,
        &mut at,
    );
    check_kafka(&listeners, &listener_files, &mut at);

    if listeners.is_empty() && diagnostics.is_empty() {
        // A table without listeners would close every port the app uses.
        diagnostics.push(Diagnostic::new(
            first_file.as_deref().unwrap_or(Path::new("config")),
            0,
            0,
            "no listener is defined in any file (an empty config is never applied)".to_string(),
        ));
    }

    Config {
        resolver: resolver.map(|(_, r)| r.value).unwrap_or_default(),
        listeners,
        clusters,
        cluster_files,
    }
}

/// The PostgreSQL-specific rules. A cluster's TLS starts with an SSLRequest
/// only behind a `protocol: postgres` listener, so:
/// - a cluster with `tls:` behind a plain TCP listener on the Postgres port
///   is refused (the server would answer a ClientHello with "invalid length
///   of startup packet"), with the fix in the message;
/// - every cluster a Postgres listener reaches (targets and failover) agrees
///   on `tls:` (whether the app's SSLRequest is answered here or passed on),
///   and a cluster with `tls:` is not shared with listeners of another kind;
/// - `direct` TLS and `cutover: fenced` need a Postgres listener, and
///   `fenced` needs `drain_on_change` (the fence's upper bound).
fn check_postgres(
    listeners: &[ListenerConfig],
    listener_files: &[PathBuf],
    clusters: &[ClusterConfig],
    cluster_files: &[PathBuf],
    at: &mut impl FnMut(&Path, &Location, String),
) {
    let by_name: HashMap<&str, &ClusterConfig> = clusters
        .iter()
        .map(|c| (c.name.value.as_str(), c))
        .collect();
    // Each listener's clusters, failover chains included.
    fn reached<'a>(
        l: &'a ListenerConfig,
        by_name: &HashMap<&'a str, &'a ClusterConfig>,
    ) -> Vec<&'a str> {
        let mut names: Vec<&str> = l.cluster.iter().map(|c| c.value.as_str()).collect();
        if let Some(split) = &l.split {
            names.extend(split.value.iter().map(|s| s.cluster.value.as_str()));
        }
        let mut i = 0;
        while i < names.len() {
            if let Some(c) = by_name.get(names[i]) {
                for f in &c.failover {
                    if !names.contains(&f.value.as_str()) {
                        names.push(f.value.as_str());
                    }
                }
            }
            i += 1;
        }
        names
    }
    let mut postgres_clusters: HashSet<&str> = HashSet::new();
    let mut other_clusters: HashMap<&str, &str> = HashMap::new();
    for (l, file) in listeners.iter().zip(listener_files) {
        let names = reached(l, &by_name);
        let name = &l.name.value;
        if l.protocol == Protocol::Postgres {
            let with_tls: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| by_name.get(n).is_some_and(|c| c.tls.is_some()))
                .collect();
            if !with_tls.is_empty() && with_tls.len() != names.len() {
                at(
                    file,
                    &l.name.referenced,
                    format!(
                        "listener \"{name}\": its clusters must all have tls: or none ({} have it, the others do not)",
                        with_tls.join(", ")
                    ),
                );
            }
            postgres_clusters.extend(names);
            continue;
        }
        let port_5432 = l.listen.value.0.port() == 5432;
        for n in names {
            other_clusters.entry(n).or_insert(name);
            let Some(c) = by_name.get(n) else { continue };
            let endpoint_5432 = c.endpoints.value.iter().any(|e| match &e.value.target {
                EndpointTarget::Addr(a) => a.port() == 5432,
                EndpointTarget::Name { port, .. } => *port == 5432,
            });
            if l.protocol == Protocol::Tcp && c.tls.is_some() && (port_5432 || endpoint_5432) {
                at(
                    file,
                    &l.name.referenced,
                    format!(
                        "listener \"{name}\": cluster \"{n}\" has tls: on the PostgreSQL port, which needs protocol: postgres (PostgreSQL starts TLS with an SSLRequest, not a ClientHello)"
                    ),
                );
            }
        }
    }
    for (c, file) in clusters.iter().zip(cluster_files) {
        let n = c.name.value.as_str();
        let postgres = postgres_clusters.contains(n);
        if let Some(tls) = &c.tls {
            if postgres && let Some(other) = other_clusters.get(n) {
                at(
                    file,
                    &tls.referenced,
                    format!(
                        "cluster \"{n}\": has tls: and serves both a postgres listener and listener \"{other}\" (TLS starts differently for each): use two clusters"
                    ),
                );
            }
            if tls.value.direct && other_clusters.contains_key(n) {
                at(
                    file,
                    &tls.referenced,
                    format!(
                        "field \"direct\": is for clusters behind protocol: postgres listeners, and listener \"{}\" is not one",
                        other_clusters[n]
                    ),
                );
            }
            if tls.value.direct && !tls.value.alpn.is_empty() {
                at(
                    file,
                    &tls.referenced,
                    "field \"direct\": sets ALPN to postgresql itself; remove \"alpn\"".to_string(),
                );
            }
        }
        if c.cutover == Cutover::Fenced {
            if let Some(other) = other_clusters.get(n) {
                at(
                    file,
                    &c.name.referenced,
                    format!(
                        "cluster \"{n}\": cutover: fenced is for clusters behind protocol: postgres listeners, and listener \"{other}\" is not one"
                    ),
                );
            }
            if c.drain_on_change.is_none() {
                at(
                    file,
                    &c.name.referenced,
                    format!(
                        "cluster \"{n}\": cutover: fenced needs drain_on_change (the longest the fence holds new sessions)"
                    ),
                );
            }
        }
    }
}

/// Kafka listeners have `broker_ports` (and only they do): at most
/// [`MAX_BROKER_PORTS`] of them, clear of every other listener's port and
/// range on the same IP.
fn check_kafka(
    listeners: &[ListenerConfig],
    listener_files: &[PathBuf],
    at: &mut impl FnMut(&Path, &Location, String),
) {
    let mut taken: Vec<(std::net::IpAddr, u16, u16, &str)> = listeners
        .iter()
        .map(|l| {
            let a = l.listen.value.0;
            (a.ip(), a.port(), a.port(), l.name.value.as_str())
        })
        .filter(|(_, port, _, _)| *port != 0)
        .collect();
    for (l, file) in listeners.iter().zip(listener_files) {
        let name = &l.name.value;
        match (&l.broker_ports, l.protocol == Protocol::Kafka) {
            (None, true) => at(
                file,
                &l.name.referenced,
                format!(
                    "listener \"{name}\": protocol: kafka needs broker_ports (e.g. \"19100-19163\"), the ports legate advertises for the brokers"
                ),
            ),
            (Some(r), false) => at(
                file,
                &r.referenced,
                format!("listener \"{name}\": broker_ports is for protocol: kafka"),
            ),
            (Some(r), true) => {
                let PortRange { first, last } = r.value;
                let count = u32::from(last) - u32::from(first) + 1;
                if count > MAX_BROKER_PORTS {
                    at(
                        file,
                        &r.referenced,
                        format!(
                            "field \"broker_ports\": {count} ports is more than {MAX_BROKER_PORTS}"
                        ),
                    );
                }
                let ip = l.listen.value.0.ip();
                for (other_ip, lo, hi, other) in &taken {
                    if *other_ip == ip && *lo <= last && first <= *hi {
                        at(
                            file,
                            &r.referenced,
                            format!(
                                "field \"broker_ports\": {first}-{last} overlaps listener \"{other}\" on {ip}"
                            ),
                        );
                    }
                }
                taken.push((ip, first, last, name));
            }
            (None, false) => {}
        }
    }
}

/// The range a duration may take: outside it a value cannot be scheduled
/// safely (an interval of 1ns spins a core, one of 2^64 s overflows the clock).
pub(super) type DurationRange = (Duration, Duration);

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

pub(super) const HEALTH_INTERVAL: DurationRange = (ms(10), secs(HOUR));
pub(super) const PROBE_TIMEOUT: DurationRange = (ms(1), secs(HOUR));
pub(super) const CONNECT_TIMEOUT: DurationRange = (ms(1), secs(300));
pub(super) const DRAIN_GRACE: DurationRange = (Duration::ZERO, secs(DAY));
pub(super) const TTL: DurationRange = (ms(100), secs(DAY));
/// 0 is "no route timeout" (long gRPC calls, streams that answer late).
pub(super) const ROUTE_TIMEOUT: DurationRange = (Duration::ZERO, secs(DAY));
pub(super) const GRPC_TIMEOUT: DurationRange = (ms(1), secs(DAY));
pub(super) const HEADER_TIMEOUT: DurationRange = (ms(10), secs(HOUR));
pub(super) const IDLE_TIMEOUT: DurationRange = (ms(10), secs(7 * DAY));
/// Split weights: a sum of up to 1,000 entries stays far below u64's range.
pub(super) const MAX_WEIGHT: u32 = 1_000_000;
pub(super) const MAX_THRESHOLD: u32 = 1000;
pub(super) const MAX_RETRIES: u32 = 10;
pub(super) const MAX_CONNECTIONS: u32 = 1_000_000;
/// Brokers one Kafka listener can advertise (a port each).
pub(super) const MAX_BROKER_PORTS: u32 = 1024;
/// hyper cannot buffer less than 8 KiB for a head.
pub(super) const HEADERS_SIZE: std::ops::RangeInclusive<u32> = 8192..=1024 * 1024;

/// Whether `value` of `field` lies in `range`; reports it when it does not.
fn in_range(
    at: &mut impl FnMut(&Path, &Location, String),
    file: &Path,
    loc: &Location,
    field: &str,
    value: Duration,
    (min, max): DurationRange,
) -> bool {
    if value >= min && value <= max {
        return true;
    }
    let show = super::show_duration;
    at(
        file,
        loc,
        format!(
            "field \"{field}\": {} is out of range ({} to {})",
            show(value),
            show(min),
            show(max)
        ),
    );
    false
}

/// Records where `key` is first seen; for a later occurrence returns that
/// first place as `file:line`, for "duplicate ... (first defined at ...)".
fn first_place<'a, K: std::hash::Hash + Eq>(
    seen: &mut HashMap<K, (&'a Path, &'a Location)>,
    key: K,
    file: &'a Path,
    loc: &'a Location,
) -> Option<String> {
    match seen.get(&key) {
        Some((first_file, first)) => Some(format!("{}:{}", first_file.display(), first.line())),
        None => {
            seen.insert(key, (file, loc));
            None
        }
    }
}

pub(super) fn unknown_cluster(name: &str, known: &HashMap<&str, (&Path, &Location)>) -> String {
    let mut names: Vec<&str> = known.keys().copied().collect();
    names.sort_unstable();
    format!(
        "field \"cluster\": unknown cluster \"{name}\" (defined clusters: {})",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )
}

/// Exactly one of `cluster` and `split`, each naming known clusters.
pub(super) fn check_target(
    at: &mut impl FnMut(&Path, &Location, String),
    file: &Path,
    what: &str,
    cluster: &Option<Spanned<String>>,
    split: &Option<Spanned<Vec<SplitConfig>>>,
    owner: &Location,
    cluster_names: &HashMap<&str, (&Path, &Location)>,
) {
    match (cluster, split) {
        (Some(c), None) => {
            if !cluster_names.contains_key(c.value.as_str()) {
                at(
                    file,
                    &c.referenced,
                    unknown_cluster(&c.value, cluster_names),
                );
            }
        }
        (None, Some(split)) => {
            if split.value.is_empty() {
                at(
                    file,
                    &split.referenced,
                    "field \"split\": needs at least one { cluster, weight }".to_string(),
                );
            } else if let Some(s) = split.value.iter().find(|s| s.weight > MAX_WEIGHT) {
                at(
                    file,
                    &s.cluster.referenced,
                    format!(
                        "field \"weight\": {} is out of range (0 to {MAX_WEIGHT})",
                        s.weight
                    ),
                );
            } else if split.value.iter().all(|s| s.weight == 0) {
                at(
                    file,
                    &split.referenced,
                    "field \"split\": at least one weight must be above 0".to_string(),
                );
            }
            let mut seen = HashSet::new();
            for s in &split.value {
                if !cluster_names.contains_key(s.cluster.value.as_str()) {
                    at(
                        file,
                        &s.cluster.referenced,
                        unknown_cluster(&s.cluster.value, cluster_names),
                    );
                } else if !seen.insert(s.cluster.value.as_str()) {
                    at(
                        file,
                        &s.cluster.referenced,
                        format!(
                            "field \"cluster\": cluster \"{}\" appears twice in this split",
                            s.cluster.value
                        ),
                    );
                }
            }
        }
        (Some(_), Some(split)) => at(
            file,
            &split.referenced,
            format!("{what}: set either \"cluster\" or \"split\", not both"),
        ),
        (None, None) => at(
            file,
            owner,
            format!("{what}: missing field \"cluster\" (or \"split\")"),
        ),
    }
}

/// The HTTP-specific parts of a route: match, rewrite, headers, mirror, timeout.
pub(super) fn check_route(
    at: &mut impl FnMut(&Path, &Location, String),
    file: &Path,
    r: &RouteConfig,
    loc: &Location,
    cluster_names: &HashMap<&str, (&Path, &Location)>,
) {
    let m = &r.matches;
    if let Some(host) = &m.host {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        if bare.is_empty() || bare.contains(['*', '/', ' ']) {
            at(
                file,
                loc,
                format!(
                    "field \"host\": invalid host pattern \"{host}\": use an exact host or *.suffix"
                ),
            );
        }
    }
    for (field, path) in [("path_prefix", &m.path_prefix), ("path", &m.path)] {
        if path.as_ref().is_some_and(|p| !p.starts_with('/')) {
            at(file, loc, format!("field \"{field}\": must start with '/'"));
        }
    }
    if m.path.is_some() && m.path_prefix.is_some() {
        at(
            file,
            loc,
            "field \"match\": give \"path\" or \"path_prefix\", not both".to_string(),
        );
    }
    if let Some(method) = &m.method
        && http::Method::from_bytes(method.as_bytes()).is_err()
    {
        at(
            file,
            loc,
            format!("field \"method\": invalid method \"{method}\""),
        );
    }
    for (name, want) in &m.headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            at(
                file,
                loc,
                format!("field \"headers\": invalid header name \"{name}\""),
            );
        }
        match want {
            HeaderMatchConfig::Present(false) => at(
                file,
                loc,
                format!(
                    "field \"headers\": \"{name}: false\" is not a condition: give a value, or true for \"present\""
                ),
            ),
            HeaderMatchConfig::Exact(v) if http::HeaderValue::from_str(v).is_err() => at(
                file,
                loc,
                format!("field \"headers\": invalid value for \"{name}\""),
            ),
            _ => {}
        }
    }
    if let Some(rw) = &r.rewrite {
        if rw.value.path_prefix.is_some() && m.path_prefix.is_none() {
            at(
                file,
                &rw.referenced,
                "field \"rewrite\": path_prefix needs match.path_prefix (the part it replaces)"
                    .to_string(),
            );
        }
        if rw
            .value
            .path_prefix
            .as_ref()
            .is_some_and(|p| !p.starts_with('/'))
        {
            at(
                file,
                &rw.referenced,
                "field \"path_prefix\": must start with '/'".to_string(),
            );
        }
        if rw
            .value
            .host
            .as_ref()
            .is_some_and(|h| http::HeaderValue::from_str(h).is_err() || h.is_empty())
        {
            at(
                file,
                &rw.referenced,
                "field \"host\": invalid host".to_string(),
            );
        }
    }
    for ops in [&r.request_headers, &r.response_headers] {
        for (name, value) in &ops.add {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                at(
                    file,
                    loc,
                    format!("field \"add\": invalid header \"{name}: {value}\""),
                );
            }
        }
        for name in &ops.remove {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                at(
                    file,
                    loc,
                    format!("field \"remove\": invalid header name \"{name}\""),
                );
            }
        }
    }
    if let Some(t) = r.timeout {
        in_range(at, file, loc, "timeout", t.0, ROUTE_TIMEOUT);
    }
    if let Some(t) = r.max_grpc_timeout {
        in_range(at, file, loc, "max_grpc_timeout", t.0, GRPC_TIMEOUT);
    }
    if r.retries > MAX_RETRIES {
        at(
            file,
            loc,
            format!(
                "field \"retries\": {} is out of range (0 to {MAX_RETRIES})",
                r.retries
            ),
        );
    }
    if let Some(mirror) = &r.mirror {
        if !cluster_names.contains_key(mirror.value.cluster.as_str()) {
            at(
                file,
                &mirror.referenced,
                unknown_cluster(&mirror.value.cluster, cluster_names).replacen(
                    "field \"cluster\"",
                    "field \"mirror\"",
                    1,
                ),
            );
        }
        if !(0.0..=100.0).contains(&mirror.value.percent) {
            at(
                file,
                &mirror.referenced,
                "field \"percent\": must be between 0 and 100".to_string(),
            );
        }
    }
}

/// Names become metric label values and log fields: keep them plain.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name must not be empty".to_string());
    }
    if name.len() > 128 {
        return Err("name must be at most 128 characters".to_string());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "invalid name \"{name}\": use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}
