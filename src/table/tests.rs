//! `carry_over` as a table of cases: no files, no sockets.

use std::path::PathBuf;

use super::*;
use crate::config::Config;

fn table(yaml: &str, generation: u64) -> RoutingTable {
    let config = Config::from_sources([(PathBuf::from("t.yaml"), Ok(yaml.to_string()))])
        .unwrap_or_else(|e| panic!("{e}"));
    compile(&config, &Default::default(), generation, None).unwrap_or_else(|e| panic!("{e}"))
}

const CLUSTERS: &str = r#"
clusters:
  - { name: old, endpoints: [ "127.0.0.1:1" ], drain_on_change: 5s }
  - { name: new, endpoints: [ "127.0.0.1:2" ], drain_on_change: 5s }
  - { name: keep, endpoints: [ "127.0.0.1:3" ] }
"#;

fn with_listener(target: &str) -> String {
    format!("listeners:\n  - {{ name: app, listen: 127.0.0.1:0, {target} }}\n{CLUSTERS}")
}

/// (case, old config, new config, what is retired: `listener→cluster` for a
/// route, `cluster/endpoint` for an endpoint)
type Case = (&'static str, String, String, &'static [&'static str]);

#[test]
fn retirements() {
    let cases: &[Case] = &[
        (
            "unchanged",
            with_listener("cluster: old"),
            with_listener("cluster: old"),
            &[],
        ),
        (
            "listener now points at another cluster",
            with_listener("cluster: old"),
            with_listener("cluster: new"),
            &["app→old"],
        ),
        (
            "cluster endpoints changed: only the endpoint that left",
            with_listener("cluster: old"),
            with_listener("cluster: old").replace("127.0.0.1:1", "127.0.0.1:9"),
            &["old/127.0.0.1:1"],
        ),
        (
            "an endpoint added (scale-out) closes nothing",
            with_listener("cluster: old"),
            with_listener("cluster: old")
                .replace("\"127.0.0.1:1\"", "\"127.0.0.1:1\", \"127.0.0.1:9\""),
            &[],
        ),
        (
            "one of two endpoints removed",
            with_listener("cluster: old")
                .replace("\"127.0.0.1:1\"", "\"127.0.0.1:1\", \"127.0.0.1:9\""),
            with_listener("cluster: old"),
            &["old/127.0.0.1:9"],
        ),
        (
            "weights change but both stay",
            with_listener("split: [ { cluster: old, weight: 9 }, { cluster: new, weight: 1 } ]"),
            with_listener("split: [ { cluster: old, weight: 1 }, { cluster: new, weight: 9 } ]"),
            &[],
        ),
        (
            "split cut over fully (weight 0)",
            with_listener("split: [ { cluster: old, weight: 9 }, { cluster: new, weight: 1 } ]"),
            with_listener("split: [ { cluster: old, weight: 0 }, { cluster: new, weight: 1 } ]"),
            &["app→old"],
        ),
        (
            "cluster without drain_on_change is left alone",
            with_listener("cluster: keep"),
            with_listener("cluster: new"),
            &[],
        ),
        (
            "removed listener drains on its own",
            with_listener("cluster: old"),
            format!(
                "listeners:\n  - {{ name: other, listen: 127.0.0.1:0, cluster: keep }}\n{CLUSTERS}"
            ),
            &[],
        ),
        (
            "connect timeout change is not a new target",
            with_listener("cluster: old"),
            with_listener("cluster: old").replace(
                "drain_on_change: 5s }\n  - { name: new",
                "drain_on_change: 5s, connect_timeout: 1s }\n  - { name: new",
            ),
            &[],
        ),
    ];
    for (case, old, new, want) in cases {
        let old = table(old, 1);
        let mut new = table(new, 2);
        let got: Vec<String> = carry_over(&old, &mut new)
            .into_iter()
            .map(|r| match (r.listener, r.endpoint) {
                (Some(l), _) => format!("{l}→{}", r.cluster),
                (None, Some(e)) => format!("{}/{e}", r.cluster),
                (None, None) => format!("?{}", r.cluster),
            })
            .collect();
        assert_eq!(got, *want, "case: {case}");
    }
}

/// A surviving route shares its token across generations, so a later change
/// still reaches connections opened several reloads ago.
#[test]
fn surviving_routes_share_their_token() {
    let g1 = table(&with_listener("cluster: old"), 1);
    let mut g2 = table(&with_listener("cluster: old"), 2);
    assert!(carry_over(&g1, &mut g2).is_empty());
    let mut g3 = table(&with_listener("cluster: new"), 3);
    let retired = carry_over(&g2, &mut g3);
    assert_eq!(retired.len(), 1);
    retired[0].token.cancel();
    let g1_route = g1.listeners[0].routes().next().unwrap();
    assert!(
        g1_route.retired.is_cancelled(),
        "generation 1's connections are told too"
    );
    let g3_route = g3.listeners[0].routes().next().unwrap();
    assert!(!g3_route.retired.is_cancelled());
}
