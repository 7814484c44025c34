//! `legate inject`: adds legate to every Pod template in Kubernetes YAML.
//!
//! The sidecar is taken from the shipped manifest, `deploy/kubernetes/base/
//! deployment.yaml` (compiled in): its `legate` init container, the volume
//! that container mounts, and the Pod's `prometheus.io/*` annotations. So the
//! manifests users copy and the tool that edits their own are one source, and
//! a test holds the shipped classic variant to the same values.
//!
//! Documents are found line by line (`---` at column 0 starts one, as the YAML
//! spec says), so a document that needs no change is written back byte for
//! byte, comments included. A document that gains the sidecar is re-emitted
//! from its parsed value (as `linkerd inject` and `istioctl kube-inject` do):
//! its fields, their order and its leading comment lines are kept; comments
//! inside it are not. Injecting twice therefore changes nothing the second time.

use serde_json::{Map, Value, json};

/// The shipped Deployment whose Pod runs legate as a native sidecar.
const BASE: &str = include_str!("../deploy/kubernetes/base/deployment.yaml");

/// The container name legate is injected as.
pub const NAME: &str = "legate";

/// What to inject, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// The ConfigMap holding the route table.
    pub configmap: Option<String>,
    pub image: Option<String>,
    pub admin_port: Option<u16>,
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
    /// A regular container, for clusters without native sidecars (< 1.29).
    pub classic: bool,
    /// Replace a `legate` container or volume that differs instead of refusing.
    pub force: bool,
}

/// The pieces added to each Pod, built once from [`BASE`] and the options.
#[derive(Debug, Clone)]
pub struct Sidecar {
    container: Value,
    volume: Value,
    annotations: Map<String, Value>,
    classic: bool,
    force: bool,
}

/// Why an input cannot be injected; names the input, the document and the line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InjectError(String);

impl Sidecar {
    pub fn new(opts: &Options) -> Result<Sidecar, InjectError> {
        let bug = |what: &str| InjectError(format!("the built-in sidecar template {what}"));
        let base: Value = serde_saphyr::from_str(BASE).map_err(|e| bug(&e.to_string()))?;
        let pod = &base["spec"]["template"];
        let mut container = pod["spec"]["initContainers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == NAME))
            .cloned()
            .ok_or_else(|| bug("has no legate init container"))?;
        let volume_name = container["volumeMounts"][0]["name"].clone();
        let mut volume = pod["spec"]["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == volume_name))
            .cloned()
            .ok_or_else(|| bug("mounts no volume"))?;
        let mut annotations: Map<String, Value> = pod["metadata"]["annotations"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        annotations.retain(|k, _| k.starts_with("prometheus.io/"));

        if let Some(image) = &opts.image {
            container["image"] = json!(image);
        }
        if let Some(name) = &opts.configmap {
            volume["configMap"]["name"] = json!(name);
        }
        if let Some(port) = opts.admin_port {
            if port == 0 {
                return Err(InjectError("--admin-port must be 1-65535".to_string()));
            }
            for arg in container["args"].as_array_mut().into_iter().flatten() {
                if arg.as_str().is_some_and(|a| a.starts_with("--admin=")) {
                    *arg = json!(format!("--admin=0.0.0.0:{port}"));
                }
            }
            container["ports"][0]["containerPort"] = json!(port);
            annotations.insert("prometheus.io/port".to_string(), json!(port.to_string()));
        }
        let resources = [
            ("requests", "cpu", &opts.cpu_request),
            ("requests", "memory", &opts.memory_request),
            ("limits", "cpu", &opts.cpu_limit),
            ("limits", "memory", &opts.memory_limit),
        ];
        for (kind, resource, value) in resources {
            if let Some(v) = value {
                container["resources"][kind][resource] = json!(v);
            }
        }
        if opts.classic {
            // An ordinary container is signalled together with the app: it
            // keeps accepting for the delay while the app flushes.
            if let Some(c) = container.as_object_mut() {
                c.shift_remove("restartPolicy");
            }
            for arg in container["args"].as_array_mut().into_iter().flatten() {
                if arg == "--shutdown-delay=0s" {
                    *arg = json!("--shutdown-delay=5s");
                }
            }
        }
        Ok(Sidecar {
            container,
            volume,
            annotations,
            classic: opts.classic,
            force: opts.force,
        })
    }

    /// Injects every document of `input` (named `source` in messages).
    /// Warnings (things legate cannot fix for the user) go to `warn`.
    pub fn inject(
        &self,
        source: &str,
        input: &str,
        warn: &mut dyn FnMut(String),
    ) -> Result<String, InjectError> {
        let mut out = String::with_capacity(input.len() + 2048);
        for (n, doc) in documents(input).iter().enumerate() {
            let whose =
                |what: &str| format!("{source}: document {} (line {}): {what}", n + 1, doc.line);
            let Some(mut value) = doc.parse(input).map_err(|e| InjectError(whose(&e)))? else {
                out.push_str(doc.text);
                continue;
            };
            let mut changed = false;
            for pod in pod_templates(&mut value) {
                let at = |what: &str| whose(&format!("{} {}: {what}", pod.kind, pod.name));
                changed |= self
                    .inject_pod(pod.metadata, pod.spec, &at, warn)
                    .map_err(InjectError)?;
            }
            if !changed {
                out.push_str(doc.text);
                continue;
            }
            out.push_str(doc.marker);
            out.push_str(doc.leading_comments);
            let body = serde_saphyr::to_string(&value)
                .map_err(|e| InjectError(whose(&format!("cannot write YAML: {e}"))))?;
            out.push_str(&body);
            if !body.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(doc.end_marker);
        }
        Ok(out)
    }

    /// Adds the sidecar, its volume and the scrape annotations to one Pod
    /// template; false when everything was already there.
    fn inject_pod(
        &self,
        metadata: &mut Map<String, Value>,
        spec: &mut Map<String, Value>,
        at: &dyn Fn(&str) -> String,
        warn: &mut dyn FnMut(String),
    ) -> Result<bool, String> {
        let mut changed = false;
        let (home, away) = if self.classic {
            ("containers", "initContainers")
        } else {
            ("initContainers", "containers")
        };

        // The container: exactly one, in the right list, with our spec.
        let here = position(spec, home, NAME);
        let there = position(spec, away, NAME);
        let ours = here.is_some_and(|i| covers(&spec[home][i], &self.container)) && there.is_none();
        if !ours {
            if (here.is_some() || there.is_some()) && !self.force {
                let list = if here.is_some() { home } else { away };
                return Err(at(&format!(
                    "already has a container named \"{NAME}\" in {list} whose spec differs from the \
                     one legate injects{}; pass --force to replace it",
                    if here.is_none() && !self.classic {
                        " (a classic sidecar: inject with --classic to keep it)"
                    } else {
                        ""
                    }
                )));
            }
            for list in [home, away] {
                if let Some(i) = position(spec, list, NAME)
                    && let Some(items) = spec[list].as_array_mut()
                {
                    items.remove(i);
                }
            }
            let list = spec
                .entry(home)
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .ok_or_else(|| at(&format!("{home} is not a list")))?;
            // A native sidecar goes first: init containers after it (a
            // migration, a wait) can already use its listeners. A classic one
            // goes last, so `kubectl logs` and `exec` still default to the app.
            let index = if here.is_some() && self.force {
                here.unwrap_or(0).min(list.len())
            } else if self.classic {
                list.len()
            } else {
                0
            };
            list.insert(index, self.container.clone());
            changed = true;
        }

        // The ConfigMap volume, as a directory (never subPath).
        let volume_name = self.volume["name"].as_str().unwrap_or(NAME);
        match position(spec, "volumes", volume_name) {
            Some(i) if covers(&spec["volumes"][i], &self.volume) => {}
            Some(i) if self.force => {
                spec["volumes"][i] = self.volume.clone();
                changed = true;
            }
            Some(_) => {
                return Err(at(&format!(
                    "already has a volume named \"{volume_name}\" that is not legate's ConfigMap \
                     volume; pass --force to replace it"
                )));
            }
            None => {
                spec.entry("volumes")
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .ok_or_else(|| at("volumes is not a list"))?
                    .push(self.volume.clone());
                changed = true;
            }
        }

        // Scrape annotations, unless the app already uses them for its own metrics.
        let annotations = metadata.entry("annotations").or_insert_with(|| json!({}));
        let Some(annotations) = annotations.as_object_mut() else {
            return Err(at("metadata.annotations is not a map"));
        };
        let taken: Vec<String> = self
            .annotations
            .iter()
            .filter(|(k, v)| annotations.get(*k).is_some_and(|have| have != *v))
            .map(|(k, _)| k.clone())
            .collect();
        if taken.is_empty() {
            for (k, v) in &self.annotations {
                if annotations.get(k) != Some(v) {
                    annotations.insert(k.clone(), v.clone());
                    changed = true;
                }
            }
        } else {
            warn(at(&format!(
                "keeps its own {} (the app's metrics); scrape legate with a PodMonitor on port \
                 \"admin\" instead",
                taken.join(", ")
            )));
        }

        if spec.get("hostNetwork") == Some(&json!(true)) {
            warn(at(&format!(
                "uses hostNetwork: legate's listeners and admin port {} are the node's; two such \
                 Pods on one node collide",
                self.container["ports"][0]["containerPort"]
            )));
        }
        if self.classic
            && matches!(
                spec.get("restartPolicy").and_then(Value::as_str),
                Some("Never" | "OnFailure")
            )
        {
            warn(at(
                "runs to completion: a classic sidecar keeps the Pod running until the app calls \
                 POST /quitquitquit on legate's admin port (native sidecars need no such call)",
            ));
        }
        Ok(changed)
    }
}

/// Where a kind keeps its Pod template (metadata and spec), as a JSON
/// pointer; `None` for kinds without one (a `List` holds objects instead).
pub fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "PodTemplate" => Some("/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// A Pod template found in a document: the object at its
/// [`template_pointer`], and the kind and name of the object holding it.
pub struct Template<'a> {
    pub kind: String,
    pub name: String,
    pub value: &'a mut Value,
}

/// The Pod templates of a Kubernetes object (and of the items of a `List`).
/// Unknown kinds have none, whatever their shape.
pub fn templates(object: &mut Value) -> Vec<Template<'_>> {
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    if kind == "List" {
        return object
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .flat_map(templates)
            .collect();
    }
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or("(unnamed)")
        .to_string();
    let Some(value) = template_pointer(&kind).and_then(|at| object.pointer_mut(at)) else {
        return Vec::new();
    };
    vec![Template { kind, name, value }]
}

/// One Pod template split into the two maps injection edits.
struct PodTemplate<'a> {
    kind: String,
    name: String,
    metadata: &'a mut Map<String, Value>,
    spec: &'a mut Map<String, Value>,
}

/// The Pod templates of an object that have the shape of one (a `spec` map).
fn pod_templates(object: &mut Value) -> Vec<PodTemplate<'_>> {
    templates(object)
        .into_iter()
        .filter_map(|Template { kind, name, value }| {
            let Value::Object(template) = value else {
                return None;
            };
            // Split the borrow: metadata and spec are two entries of one map.
            template.entry("metadata").or_insert_with(|| json!({}));
            let mut metadata = None;
            let mut spec = None;
            for (k, v) in template.iter_mut() {
                match (k.as_str(), v) {
                    ("metadata", Value::Object(m)) => metadata = Some(m),
                    ("spec", Value::Object(s)) => spec = Some(s),
                    _ => {}
                }
            }
            Some(PodTemplate {
                kind,
                name,
                metadata: metadata?,
                spec: spec?,
            })
        })
        .collect()
}

/// Index of the item named `name` in the list `key` of `spec`.
fn position(spec: &Map<String, Value>, key: &str, name: &str) -> Option<usize> {
    spec.get(key)?
        .as_array()?
        .iter()
        .position(|c| c["name"] == name)
}

/// True when `have` holds everything in `want` (extra fields, such as the
/// defaults an API server adds to a manifest read back, are allowed).
fn covers(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| covers(hv, v))),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(h, w)| covers(h, w))
        }
        (h, w) => h == w,
    }
}

/// One YAML document of an input, as lines of it.
struct Document<'a> {
    /// All of its text, marker and comments included: what an untouched
    /// document is written back as.
    text: &'a str,
    /// The `---` line that opened it, or "".
    marker: &'a str,
    /// Comment and blank lines before its content, kept when it is re-emitted.
    leading_comments: &'a str,
    /// The `...` line that ended it, or "": kept too, since a document after
    /// it may start without `---`.
    end_marker: &'a str,
    /// Where its content starts, for messages (1-based, in the whole input).
    line: usize,
    /// Byte range of its content (after the marker).
    content: std::ops::Range<usize>,
}

impl Document<'_> {
    /// The document as a JSON-shaped value; `None` when it is empty or not
    /// a mapping with string keys (nothing legate touches). A syntax error is
    /// reported with the line counted in the whole input.
    fn parse(&self, input: &str) -> Result<Option<Value>, String> {
        let content = &input[self.content.clone()];
        if content
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Ok(None);
        }
        // Padding with the lines before it makes the parser's line numbers the input's.
        let mut padded = "\n".repeat(self.line.saturating_sub(1));
        padded.push_str(content);
        match serde_saphyr::from_str::<Value>(&padded) {
            Ok(v @ Value::Object(_)) => Ok(Some(v)),
            Ok(_) => Ok(None),
            Err(e) => match serde_saphyr::from_str::<serde::de::IgnoredAny>(&padded) {
                // Valid YAML that JSON cannot hold (a non-string key): not a
                // Kubernetes object, so nothing to inject; written back as is.
                Ok(_) => Ok(None),
                Err(_) => Err(format!("cannot parse YAML: {e}")),
            },
        }
    }
}

/// Splits `input` at document markers (`---` at column 0, optionally followed
/// by a space and content) and ends (`...`).
fn documents<'a>(input: &'a str) -> Vec<Document<'a>> {
    let mut docs = Vec::new();
    let mut start = 0; // of the current document's text
    let mut marker_end = 0; // end of its marker line
    let mut offset = 0;
    let mut line = 1;
    let mut start_line = 1;
    let close = |docs: &mut Vec<Document<'a>>,
                 start: usize,
                 marker_end: usize,
                 end: usize,
                 start_line: usize| {
        if end > start {
            docs.push(document(input, start, marker_end, end, start_line));
        }
    };
    for l in input.split_inclusive('\n') {
        let bare = l.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_marker {
            close(&mut docs, start, marker_end, offset, start_line);
            start = offset;
            // Content on the marker line (`--- {a: 1}`) stays in the content.
            marker_end = if bare == "---" {
                offset + l.len()
            } else {
                offset + 4
            };
            start_line = if bare == "---" { line + 1 } else { line };
        }
        offset += l.len();
        line += 1;
        if bare == "..." {
            close(&mut docs, start, marker_end, offset, start_line);
            start = offset;
            marker_end = offset;
            start_line = line;
        }
    }
    close(&mut docs, start, marker_end, offset, start_line);
    docs
}

fn document(input: &str, start: usize, marker_end: usize, end: usize, line: usize) -> Document<'_> {
    let marker_end = marker_end.clamp(start, end);
    let body = &input[marker_end..end];
    let comments_len: usize = body
        .split_inclusive('\n')
        .take_while(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        .map(str::len)
        .sum();
    // The content's first line, for messages: after the leading comments.
    let skipped = body[..comments_len].matches('\n').count();
    let last_line = body.trim_end_matches('\n').rfind('\n').map_or(0, |i| i + 1);
    let end_marker = match body[last_line..].trim_end_matches(['\n', '\r']) {
        "..." => &body[last_line..],
        _ => "",
    };
    Document {
        text: &input[start..end],
        marker: &input[start..marker_end],
        leading_comments: &body[..comments_len],
        end_marker,
        line: line + skipped,
        content: marker_end + comments_len..end,
    }
}

/// The ordering caveat of `--classic`, printed once when it is used.
pub const CLASSIC_CAVEAT: &str = "legate inject --classic: legate is an ordinary container, so \
Kubernetes starts and stops it together with the app, in no order. Make the app wait for \
http://127.0.0.1:9901/readyz before it connects (or retry), keep --shutdown-delay long enough for \
the app to finish, and have Job Pods call POST /quitquitquit when done. Kubernetes >= 1.29: drop \
--classic for a native sidecar, which has none of these caveats.";

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            configmap: None,
            image: None,
            admin_port: None,
            cpu_request: None,
            memory_request: None,
            cpu_limit: None,
            memory_limit: None,
            classic: false,
            force: false,
        }
    }

    #[test]
    fn documents_split_at_markers_and_keep_every_byte() {
        let input = "# head\na: 1\n---\n# c\nb: 2\n--- {c: 3}\n...\n---\n";
        let docs = documents(input);
        let joined: String = docs.iter().map(|d| d.text).collect();
        assert_eq!(joined, input);
        assert_eq!(docs.len(), 4);
        assert_eq!(docs[0].line, 2);
        assert_eq!(docs[1].marker, "---\n");
        assert_eq!(docs[1].leading_comments, "# c\n");
        assert_eq!(docs[1].line, 5);
        assert_eq!(&input[docs[2].content.clone()], "{c: 3}\n...\n");
        assert_eq!(docs[2].end_marker, "...\n");
        assert_eq!(docs[1].end_marker, "");
    }

    #[test]
    fn the_template_comes_from_the_shipped_manifest() {
        let sidecar = Sidecar::new(&opts()).expect("template");
        assert_eq!(sidecar.container["name"], NAME);
        assert_eq!(sidecar.container["restartPolicy"], "Always");
        assert_eq!(sidecar.volume["configMap"]["name"], "legate-routes");
        assert_eq!(sidecar.annotations["prometheus.io/port"], "9901");

        let classic = Sidecar::new(&Options {
            classic: true,
            admin_port: Some(9911),
            ..opts()
        })
        .expect("template");
        assert!(classic.container.get("restartPolicy").is_none());
        assert!(
            classic.container["args"]
                .to_string()
                .contains("--admin=0.0.0.0:9911")
        );
        assert!(
            classic.container["args"]
                .to_string()
                .contains("--shutdown-delay=5s")
        );
        assert_eq!(classic.annotations["prometheus.io/port"], "9911");
    }

    /// Pieces of manifests, whole and broken, that the property test strings together.
    const FRAGMENTS: &[&str] = &[
        "---\n",
        "--- \n",
        "...\n",
        "# a comment\n",
        "\n",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\n",
        "spec:\n  template:\n    spec:\n      containers: [{name: app, image: x}]\n",
        "spec: {template: {metadata: {annotations: {prometheus.io/port: '1'}}, spec: {containers: []}}}\n",
        "kind: Pod\nspec: {containers: [{name: legate, image: other}]}\n",
        "kind: Pod\nspec: {initContainers: 3, volumes: {a: 1}}\n",
        "kind: CronJob\nspec: {jobTemplate: {spec: {template: {spec: {}}}}}\n",
        "kind: List\nitems: [1, {kind: Pod, spec: {}}, {kind: List, items: null}]\n",
        "kind: Pod\nmetadata: {annotations: [1]}\nspec: {containers: []}\n",
        "{1: 2}\n",
        "[a, b\n",
        "key: : value\n",
        "  bad indent: x\n",
        "x: \"\\u00e9\"\n",
        "\u{feff}\n",
        "--- {kind: Pod, spec: {}}\n",
        "- one\n- two\n",
        "&a {kind: Pod, spec: *a}\n",
    ];

    /// Found by the property test: a document ended by `...` and followed by
    /// one without `---` must stay two documents once the first is injected.
    #[test]
    fn an_end_marker_survives_reinjection() {
        let sidecar = Sidecar::new(&opts()).expect("template");
        let input = "kind: Pod\nspec: {containers: []}\n...\nkind: Service\n";
        let out = sidecar.inject("input", input, &mut |_| {}).expect("inject");
        assert!(out.ends_with("...\nkind: Service\n"), "{out}");
        let again = sidecar.inject("output", &out, &mut |_| {}).expect("again");
        assert_eq!(again, out);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2048, ..Default::default() })]

        /// Whatever the input: no panic, and what inject writes, injected
        /// again, is the same bytes (or the same refusal).
        #[test]
        fn any_input_is_refused_or_injected_idempotently(
            picks in proptest::collection::vec(0..FRAGMENTS.len(), 0..12),
            force in proptest::bool::ANY,
            classic in proptest::bool::ANY,
        ) {
            let input: String = picks.iter().map(|&i| FRAGMENTS[i]).collect();
            let sidecar = Sidecar::new(&Options { force, classic, ..opts() }).expect("template");
            if let Ok(out) = sidecar.inject("input", &input, &mut |_| {}) {
                let again = sidecar.inject("output", &out, &mut |_| {}).map_err(|e| e.to_string());
                proptest::prop_assert_eq!(again, Ok(out), "input: {:?}", input);
            }
        }
    }

    #[test]
    fn covers_allows_server_defaults_but_not_changes() {
        let want = json!({ "name": "legate", "ports": [{ "containerPort": 9901 }] });
        let have = json!({ "name": "legate", "ports": [{ "containerPort": 9901, "protocol": "TCP" }], "terminationMessagePath": "/dev/termination-log" });
        assert!(covers(&have, &want));
        let other = json!({ "name": "legate", "ports": [{ "containerPort": 9902 }] });
        assert!(!covers(&other, &want));
    }
}
