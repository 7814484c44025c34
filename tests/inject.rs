//! `legate inject`: the sidecar added to every Pod template of a corpus of
//! real-world manifests (tests/fixtures/inject), nothing else changed, a
//! second run byte-for-byte the same, and clear refusals. `.ci/run` validates
//! every output with `kubernetes-validate --strict` offline.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/inject")
        .join(name)
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs `legate inject ARGS` with `stdin`: (exit code, stdout, stderr).
fn inject(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run legate inject");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("legate inject");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn inject_ok(args: &[&str], stdin: &str) -> String {
    let (code, stdout, stderr) = inject(args, stdin);
    assert_eq!(code, 0, "{stderr}");
    stdout
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The documents of a YAML stream (empty ones dropped).
fn parse(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// The Pod templates (metadata + spec) of an object, as inject finds them.
fn pods(object: &mut Value) -> Vec<&mut Value> {
    legate::inject::templates(object)
        .into_iter()
        .map(|t| t.value)
        .collect()
}

/// Removes what inject adds (legate's container, its volume, the scrape
/// annotations) and the lists and maps that leaves empty.
fn strip(object: &mut Value) {
    for pod in pods(object) {
        if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
            for list in ["initContainers", "containers", "volumes"] {
                if let Some(items) = spec.get_mut(list).and_then(Value::as_array_mut) {
                    items.retain(|c| c["name"] != "legate" && c["name"] != "legate-routes");
                    if items.is_empty() {
                        spec.shift_remove(list);
                    }
                }
            }
        }
        if let Some(metadata) = pod.get_mut("metadata").and_then(Value::as_object_mut)
            && let Some(a) = metadata
                .get_mut("annotations")
                .and_then(Value::as_object_mut)
        {
            a.retain(|k, _| !k.starts_with("prometheus.io/"));
            if a.is_empty() {
                metadata.shift_remove("annotations");
            }
        }
    }
}

/// The one legate container of a Pod: (list it is in, index, container).
fn legate(pod: &Value) -> (&'static str, usize, &Value) {
    let mut found = Vec::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in pod["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if c["name"] == "legate" {
                found.push((list, i, c));
            }
        }
    }
    assert_eq!(found.len(), 1, "exactly one legate container in {pod:#}");
    found.remove(0)
}

const CORPUS: &[&str] = &[
    "deployment.yaml",
    "multi-container.yaml",
    "init-containers.yaml",
    "daemonset-hostnetwork.yaml",
    "cronjob.yaml",
    "job.yaml",
    "replicaset.yaml",
    "pod.yaml",
    "list.yaml",
    "unknown-kinds.yaml",
];

/// Every Pod template gains a native sidecar, its ConfigMap volume and the
/// scrape annotations; every other field and document is as it was; a
/// second injection is byte-for-byte the first.
#[test]
fn corpus_gets_a_native_sidecar_and_nothing_else_changes() {
    let mut pods_seen = 0;
    for name in CORPUS {
        let path = fixture(name);
        let input = read(&path);
        let output = inject_ok(&["-f", path.to_str().expect("path")], "");
        let (before, after) = (parse(&input), parse(&output));
        assert_eq!(before.len(), after.len(), "{name}: documents kept");
        for (mut b, mut a) in before.into_iter().zip(after) {
            for pod in pods(&mut a) {
                pods_seen += 1;
                let (list, index, c) = legate(pod);
                assert_eq!(
                    (list, index),
                    ("initContainers", 0),
                    "{name}: native, first"
                );
                assert_eq!(c["restartPolicy"], "Always", "{name}");
                assert_eq!(c["startupProbe"]["httpGet"]["path"], "/readyz");
                assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
                assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
                assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
                assert_eq!(c["volumeMounts"][0]["mountPath"], "/etc/legate");
                assert!(c["volumeMounts"][0].get("subPath").is_none());
                let volume = pod["spec"]["volumes"]
                    .as_array()
                    .and_then(|v| v.iter().find(|v| v["name"] == "legate-routes"))
                    .unwrap_or_else(|| panic!("{name}: no legate-routes volume"));
                assert_eq!(volume["configMap"]["name"], "legate-routes");
                if *name != "pod.yaml" {
                    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], "9901");
                }
            }
            let a_kind = a["kind"].clone();
            strip(&mut a);
            strip(&mut b);
            assert_eq!(a, b, "{name}: {a_kind} changed beyond the sidecar");
        }
        let again = inject_ok(&[], &output);
        assert!(
            again == output,
            "{name}: a second injection changed:\n{again}"
        );
    }
    assert_eq!(pods_seen, 10, "one Pod template per corpus file");
}

/// Documents without a Pod template come out byte for byte, comments and
/// quoting included (a YAML 1.1 `yes` in an unknown kind stays as written).
#[test]
fn documents_without_pods_are_written_back_verbatim() {
    let input = read(&fixture("unknown-kinds.yaml"));
    let output = inject_ok(&[], &input);
    let widget_start = input.find("kind: Widget").expect("a Widget");
    let widget = &input[input[..widget_start].rfind("---").expect("marker")..];
    let widget = &widget[..widget[3..].find("\n---").expect("next marker") + 4];
    assert!(output.contains(widget), "Widget kept verbatim:\n{output}");
    assert!(output.contains("shuffle: yes"), "{output}");

    let multi = read(&fixture("multi-container.yaml"));
    let output = inject_ok(&[], &multi);
    let service = &multi[multi.find("kind: Service").expect("a Service")..];
    let service = &service[..service.find("\n---").expect("next document")];
    assert!(output.contains(service), "Service kept verbatim:\n{output}");
    // The leading comment of a document that gained the sidecar is kept.
    let first_comment = multi.lines().next().expect("a line");
    assert!(output.starts_with(first_comment), "{output}");
}

/// YAML that does not parse: exit 1, stdout empty, the file, document and line named.
#[test]
fn unparsable_yaml_names_document_and_line() {
    let path = fixture("bad.yaml");
    let (code, stdout, stderr) = inject(&["-f", path.to_str().expect("path")], "");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stdout.is_empty(),
        "nothing half-injected is written: {stdout}"
    );
    assert!(stderr.contains("bad.yaml: document 2"), "{stderr}");
    assert!(stderr.contains("line 19"), "{stderr}");

    let (code, _, stderr) = inject(&["-f", "/nonexistent/app.yaml"], "");
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/app.yaml"), "{stderr}");
}

/// Several files (and stdin as `-`) are one stream of documents.
#[test]
fn several_files_and_stdin_make_one_stream() {
    let (job, pod) = (fixture("job.yaml"), fixture("pod.yaml"));
    let joined = inject_ok(&["-f", job.to_str().expect("path"), "-f", "-"], &read(&pod));
    let docs = parse(&joined);
    assert_eq!(docs.len(), 2, "{joined}");
    assert_eq!(docs[0]["kind"], "Job");
    assert_eq!(docs[1]["kind"], "Pod");
    assert_eq!(inject_ok(&[], &joined), joined);
}

/// A Pod read back from the API server (`kubectl get -o yaml`) carries the
/// defaults it filled in: that is still legate's sidecar, not a different one.
#[test]
fn server_defaults_do_not_make_an_injected_pod_different() {
    let injected = inject_ok(&[], APP);
    let mut pod = parse(&injected).remove(0);
    let legate = &mut pod["spec"]["initContainers"][0];
    legate["imagePullPolicy"] = json!("IfNotPresent");
    legate["terminationMessagePath"] = json!("/dev/termination-log");
    legate["terminationMessagePolicy"] = json!("File");
    legate["ports"][0]["protocol"] = json!("TCP");
    legate["readinessProbe"]["timeoutSeconds"] = json!(1);
    legate["readinessProbe"]["successThreshold"] = json!(1);
    pod["spec"]["volumes"][0]["configMap"]["defaultMode"] = json!(420);
    pod["status"] = json!({ "phase": "Running" });
    let from_server = serde_saphyr::to_string(&pod).expect("yaml");
    assert_eq!(inject_ok(&[], &from_server), from_server);
}

const APP: &str = "apiVersion: v1
kind: Pod
metadata:
  name: app
spec:
  containers:
    - name: app
      image: ghcr.io/example/app:1
";

/// A Pod that already has a `legate` container or volume that is not ours:
/// refused with a clear error unless --force, which replaces them.
#[test]
fn a_different_legate_is_refused_unless_forced() {
    let theirs = APP.replace(
        "  containers:\n",
        "  initContainers:\n    - name: legate\n      image: ghcr.io/example/legate:0.0.1\n  containers:\n",
    );
    let (code, stdout, stderr) = inject(&[], &theirs);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("Pod app: already has a container named \"legate\"")
            && stderr.contains("--force"),
        "{stderr}"
    );
    let forced = inject_ok(&["--force"], &theirs);
    let doc = &parse(&forced)[0];
    let (list, _, c) = legate(doc);
    assert_eq!(list, "initContainers");
    assert_eq!(c["image"], "ghcr.io/example/legate:0.1.0");
    assert_eq!(inject_ok(&[], &forced), forced, "forced output is stable");

    // A classic sidecar met by a native injection: told about --classic.
    let classic = inject_ok(&["--classic"], APP);
    let (code, _, stderr) = inject(&[], &classic);
    assert_eq!(code, 1);
    assert!(stderr.contains("--classic"), "{stderr}");
    let moved = inject_ok(&["--force"], &classic);
    assert_eq!(legate(&parse(&moved)[0]).0, "initContainers");

    let volume = format!("{APP}  volumes:\n    - name: legate-routes\n      emptyDir: {{}}\n");
    let (code, _, stderr) = inject(&[], &volume);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("volume named \"legate-routes\""),
        "{stderr}"
    );
    let forced = inject_ok(&["--force"], &volume);
    let volumes = &parse(&forced)[0]["spec"]["volumes"];
    assert_eq!(
        volumes,
        &json!([{ "name": "legate-routes", "configMap": { "name": "legate-routes" } }])
    );
}

#[test]
fn options_set_image_configmap_port_and_resources() {
    let out = inject_ok(
        &[
            "--image=registry.local/legate:1.2.3",
            "--configmap=orders-routes",
            "--admin-port=9911",
            "--cpu-request=10m",
            "--memory-request=20Mi",
            "--cpu-limit=200m",
            "--memory-limit=40Mi",
        ],
        APP,
    );
    let pod = &parse(&out)[0];
    let (_, _, c) = legate(pod);
    assert_eq!(c["image"], "registry.local/legate:1.2.3");
    assert!(
        c["args"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("--admin=0.0.0.0:9911")))
    );
    assert_eq!(c["ports"][0]["containerPort"], 9911);
    assert_eq!(
        c["resources"],
        json!({ "requests": { "cpu": "10m", "memory": "20Mi" }, "limits": { "memory": "40Mi", "cpu": "200m" } })
    );
    assert_eq!(
        pod["spec"]["volumes"][0]["configMap"]["name"],
        "orders-routes"
    );
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], "9911");

    let (code, _, stderr) = inject(&["--admin-port=0"], APP);
    assert_eq!(code, 1, "{stderr}");
}

/// --classic: a regular container, last (kubectl's default container stays
/// the app), no restartPolicy, a shutdown delay, and the caveat printed.
#[test]
fn classic_is_a_regular_container_with_the_caveat() {
    let (code, out, stderr) = inject(&["--classic"], APP);
    assert_eq!(code, 0, "{stderr}");
    let pod = &parse(&out)[0];
    let (list, index, c) = legate(pod);
    assert_eq!((list, index), ("containers", 1));
    assert!(c.get("restartPolicy").is_none());
    assert!(
        c["args"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("--shutdown-delay=5s")))
    );
    assert!(
        stderr.contains("POST /quitquitquit") && stderr.contains("1.29"),
        "{stderr}"
    );
}

/// One source of truth: the shipped manifests are what inject writes. The
/// base Deployment without its sidecar, injected, is the base Deployment; the
/// classic variant, injected with --classic, is the classic variant.
#[test]
fn shipped_manifests_are_what_inject_writes() {
    for (file, args) in [
        ("deploy/kubernetes/base/deployment.yaml", &[][..]),
        (
            "deploy/kubernetes/classic-sidecar/deployment.yaml",
            &["--classic"][..],
        ),
    ] {
        let shipped: Vec<Value> = parse(&read(&repo(file)));
        let mut bare = shipped.clone();
        for doc in &mut bare {
            strip(doc);
        }
        let stream: String = bare
            .iter()
            .map(|d| serde_saphyr::to_string(d).expect("yaml"))
            .collect::<Vec<_>>()
            .join("---\n");
        let injected = parse(&inject_ok(args, &stream));
        assert_eq!(injected, shipped, "{file} differs from what inject writes");
    }
}
