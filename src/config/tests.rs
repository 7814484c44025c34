use super::*;

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| vars.get(name).cloned()
}

#[test]
fn interpolation_cases() {
    let cases: &[(&str, &str)] = &[
        ("plain $ sign and $HOME", "plain $ sign and $HOME"),
        ("${A}", "alpha"),
        ("x${A}y${B}z", "xalphaybetaz"),
        ("${UNSET:-fallback}", "fallback"),
        ("${A:-fallback}", "alpha"),
        ("${UNSET:-}", ""),
        ("${EMPTY:-fallback}", "fallback"),
        ("${EMPTY-fallback}", ""),
        ("${UNSET-fallback}", "fallback"),
        ("${A-fallback}", "alpha"),
        ("${EMPTY}", ""),
        ("$${A}", "${A}"),
        ("héllo ${A} wörld", "héllo alpha wörld"),
        ("a: ${A} # uses ${UNSET}\n", "a: alpha # uses ${UNSET}\n"),
        ("# ${UNSET}\nb: \"#${A}\"\n", "# ${UNSET}\nb: \"#alpha\"\n"),
        ("c: x#${A}\n", "c: x#alpha\n"),
    ];
    let env = env(&[("A", "alpha"), ("B", "beta"), ("EMPTY", "")]);
    for (input, want) in cases {
        assert_eq!(
            interpolate(input, &env).as_deref().ok(),
            Some(*want),
            "{input}"
        );
    }
}

#[test]
fn interpolation_errors_point_at_the_variable() {
    let env = env(&[]);
    let d = interpolate("a: 1\nb: x ${MISSING}\n", &env).unwrap_err();
    assert_eq!((d.line, d.column), (2, 6));
    assert!(d.message.contains("\"MISSING\" is not set"));

    let d = interpolate("a: ${OPEN\n", &env).unwrap_err();
    assert!(d.message.contains("unterminated"));

    let d = interpolate("a: ${1BAD}\n", &env).unwrap_err();
    assert!(d.message.contains("invalid variable name"));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
    assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    for bad in ["", "5", "1.5", "5 parsecs", "-1s"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn endpoints() {
    let addr = |s: &str| Ok(EndpointTarget::Addr(s.parse().unwrap()));
    let name = |h: &str, port| {
        Ok(EndpointTarget::Name {
            host: h.to_string(),
            port,
        })
    };
    assert_eq!(parse_endpoint("10.0.0.7:5432"), addr("10.0.0.7:5432"));
    assert_eq!(parse_endpoint("[::1]:80"), addr("[::1]:80"));
    assert_eq!(parse_endpoint("localhost:6379"), addr("127.0.0.1:6379"));
    assert_eq!(
        parse_endpoint("db.internal:5432"),
        name("db.internal", 5432)
    );
    assert_eq!(
        parse_endpoint("db.prod.svc.cluster.local.:5432"),
        name("db.prod.svc.cluster.local.", 5432)
    );
    assert!(parse_endpoint("::1:80").unwrap_err().contains("brackets"));
    assert!(parse_endpoint("localhost").is_err());
    assert!(parse_endpoint("localhost:70000").is_err());
    assert!(parse_endpoint("bad host:1").is_err());
    assert!(parse_endpoint("-x.example:1").is_err());
    assert!(parse_endpoint("1.2.3:80").is_err());
    assert!(parse_endpoint("a..b:80").is_err());
}

#[test]
fn key_at_line_finds_mapping_keys() {
    let text = "clusters:\n  - name: db\n    connect_timeout: 5x\n  - [1]\n";
    assert_eq!(key_at_line(text, 1), Some("clusters"));
    assert_eq!(key_at_line(text, 2), Some("name"));
    assert_eq!(key_at_line(text, 3), Some("connect_timeout"));
    assert_eq!(key_at_line(text, 4), None);
    assert_eq!(key_at_line(text, 0), None);
    assert_eq!(key_at_line(text, 99), None);
}

#[test]
fn names_are_plain() {
    assert!(check_name("orders-db.v2_x").is_ok());
    assert!(check_name("").is_err());
    assert!(check_name("has space").is_err());
    assert!(check_name("quote\"").is_err());
}

#[test]
fn durations_are_shown_as_written() {
    for (d, want) in [
        (Duration::ZERO, "0s"),
        (Duration::from_secs(100_000 * 3600), "100000h"),
        (Duration::from_secs(90), "90s"),
        (Duration::from_secs(120), "2m"),
        (Duration::from_millis(250), "250ms"),
        (Duration::from_nanos(1), "1ns"),
        (Duration::from_secs(u64::MAX), "18446744073709551615s"),
    ] {
        assert_eq!(show_duration(d), want);
    }
}
