//! The deployment files: every kustomization under deploy/ renders with
//! `kubectl kustomize`, `kubernetes-validate` accepts every object, the
//! custom resources it has no schema for are checked here, the ConfigMaps
//! carry a valid service and Envoy configuration, the Dockerfile builds
//! what the project tests, and the Grafana dashboard only asks for metrics
//! the service exports.
//!
//! kubectl and kubernetes-validate come from the PyPI wheels that
//! scripts/test.sh installs into .test-venv; both work offline.

#[path = "support/envoy.rs"]
mod envoy;
#[path = "support/ops.rs"]
mod ops;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use fikra_ratelimit::metrics::Metrics;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_tool(name: &str) -> PathBuf {
    let path = repo().join(".test-venv/bin").join(name);
    assert!(path.exists(), "{} is missing; run scripts/test.sh, which installs it", path.display());
    path
}

/// Lists every directory under deploy/ with a kustomization.yaml.
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("list a deploy directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.file_name().is_some_and(|name| name == "kustomization.yaml") {
                found.push(dir.to_owned());
            }
        }
    }
    let mut found = Vec::new();
    walk(&repo().join("deploy"), &mut found);
    found.sort();
    found
}

/// `kubectl kustomize DIR`, as YAML text.
fn render(dir: &Path) -> String {
    let output = Command::new(venv_tool("kubectl")).arg("kustomize").arg(dir).output().expect("run kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 manifests")
}

fn objects(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml).expect("rendered YAML parses").into_iter().filter(|v| !v.is_null()).collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among the rendered objects"))
}

fn render_overlay(path: &str) -> Vec<Value> {
    objects(&render(&repo().join(path)))
}

#[test]
fn every_kustomization_renders_and_validates() {
    let dirs = kustomizations();
    let names: Vec<String> = dirs.iter().map(|d| d.strip_prefix(repo()).unwrap_or(d).display().to_string()).collect();
    for expected in ["deploy/k8s/base", "deploy/k8s/overlays/redis", "deploy/config", "deploy/envoy"] {
        assert!(names.iter().any(|n| n == expected), "{expected} is not among {names:?}");
    }

    let dir = tempfile::tempdir().expect("a temporary directory");
    for (kustomization, name) in dirs.iter().zip(&names) {
        let file = dir.path().join(format!("{}.yaml", name.replace('/', "_")));
        fs::write(&file, render(kustomization)).expect("write the rendered manifests");
        let output = Command::new(venv_tool("kubernetes-validate"))
            .arg("--strict")
            .arg(&file)
            .output()
            .expect("run kubernetes-validate");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "kubernetes-validate rejected {name}:\n{text}");
        for line in text.lines().filter(|line| !line.starts_with("INFO")) {
            // Custom resources have no schema there; they are checked below.
            assert!(line.contains("kind ServiceMonitor"), "kubernetes-validate on {name}: {line}");
        }
    }
}

#[test]
fn service_monitor_selects_the_metrics_port() {
    for overlay in ["deploy/k8s/base", "deploy/k8s/overlays/redis"] {
        let objects = render_overlay(overlay);
        let monitor = find(&objects, "ServiceMonitor", "fikra-ratelimit");
        assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
        let selector = monitor["spec"]["selector"]["matchLabels"].as_object().expect("spec.selector.matchLabels");
        assert!(!selector.is_empty(), "{overlay}: an empty selector matches every Service");
        let endpoints = monitor["spec"]["endpoints"].as_array().expect("spec.endpoints");
        assert!(!endpoints.is_empty(), "{overlay}: no endpoints");

        let services: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Service")
            .filter(|s| selector.iter().all(|(key, value)| &s["metadata"]["labels"][key] == value))
            .collect();
        assert_eq!(services.len(), 1, "{overlay}: the selector matches {} Services", services.len());
        let ports: Vec<&str> = services[0]["spec"]["ports"]
            .as_array()
            .expect("Service ports")
            .iter()
            .filter_map(|port| port["name"].as_str())
            .collect();
        for endpoint in endpoints {
            let port = endpoint["port"].as_str().expect("endpoints[].port names a port");
            assert!(ports.contains(&port), "{overlay}: port {port} is not among the Service's {ports:?}");
            assert_eq!(endpoint["path"], "/metrics");
        }
    }
}

#[test]
fn deployment_probes_and_shutdown() {
    let objects = render_overlay("deploy/k8s/base");
    let deployment = find(&objects, "Deployment", "fikra-ratelimit");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env = |name: &str| {
        container["env"].as_array().expect("env").iter().find(|e| e["name"] == name).map(|e| e["value"].clone())
    };

    // Liveness checks only whether the process serves; readiness is gRPC health.
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(container["readinessProbe"]["grpc"]["port"], 8081);
    assert_eq!(env("FIKRA_LISTEN"), Some(Value::from("0.0.0.0:8081")));
    assert_eq!(env("FIKRA_METRICS_LISTEN"), Some(Value::from("0.0.0.0:9102")));

    // The pod's grace period covers the shutdown delay and grace.
    let seconds = |name: &str| ops_duration(env(name).and_then(|v| v.as_str().map(str::to_owned)).expect(name));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert!(seconds("FIKRA_SHUTDOWN_DELAY") + seconds("FIKRA_SHUTDOWN_GRACE") < grace as f64);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    // Selectors agree: the Deployment's pods are what the Service, the
    // PodDisruptionBudget and the NetworkPolicy select.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selects = |selector: &Value| selector.as_object().expect("a selector").iter().all(|(k, v)| &labels[k] == v);
    assert!(selects(&deployment["spec"]["selector"]["matchLabels"]));
    assert!(selects(&find(&objects, "Service", "fikra-ratelimit")["spec"]["selector"]));
    assert!(selects(&find(&objects, "PodDisruptionBudget", "fikra-ratelimit")["spec"]["selector"]["matchLabels"]));
    assert!(selects(&find(&objects, "NetworkPolicy", "fikra-ratelimit")["spec"]["podSelector"]["matchLabels"]));

    // The in-memory base runs one replica; the Redis overlay scales and
    // sets the store URL from a Secret.
    assert_eq!(find(&objects, "HorizontalPodAutoscaler", "fikra-ratelimit")["spec"]["maxReplicas"], 1);
    let redis = render_overlay("deploy/k8s/overlays/redis");
    assert!(find(&redis, "HorizontalPodAutoscaler", "fikra-ratelimit")["spec"]["maxReplicas"].as_u64() > Some(1));
    let container = &find(&redis, "Deployment", "fikra-ratelimit")["spec"]["template"]["spec"]["containers"][0];
    let url = container["env"].as_array().expect("env").iter().find(|e| e["name"] == "FIKRA_REDIS_URL").expect("FIKRA_REDIS_URL");
    assert_eq!(url["valueFrom"]["secretKeyRef"]["key"], "url");

    // The single in-memory replica serves on every core; Redis replicas on
    // one thread each.
    assert_eq!(env("FIKRA_WORKER_THREADS"), Some(Value::from("0")));
    let redis_threads = container["env"].as_array().expect("env").iter().filter(|e| e["name"] == "FIKRA_WORKER_THREADS");
    assert_eq!(redis_threads.map(|e| e["value"].clone()).collect::<Vec<_>>(), [Value::from("1")]);
}

fn ops_duration(text: String) -> f64 {
    fikra_ratelimit::cli::parse_duration(&text).expect("a duration").as_secs_f64()
}

#[test]
fn configmaps_hold_valid_configurations() {
    let objects = render_overlay("deploy/k8s/base");
    let dir = tempfile::tempdir().expect("a temporary directory");

    // The limits pass check-config, as the mounted directory.
    let limits = find(&objects, "ConfigMap", "fikra-limits")["data"].as_object().expect("fikra-limits data").clone();
    let config_dir = dir.path().join("limits");
    fs::create_dir(&config_dir).expect("create the limits directory");
    for (name, text) in &limits {
        fs::write(config_dir.join(name), text.as_str().expect("text data")).expect("write a limits file");
    }
    let (status, output) = ops::run_binary(&["check-config", &config_dir.display().to_string()]);
    assert!(status.success(), "check-config rejected the ConfigMap:\n{output}");
    assert!(output.contains("fikra"), "{output}");

    // The Deployment mounts that ConfigMap where FIKRA_CONFIG points.
    let deployment = find(&objects, "Deployment", "fikra-ratelimit");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["configMap"]["name"], "fikra-limits");
    assert_eq!(pod["containers"][0]["volumeMounts"][0]["mountPath"], "/etc/fikra/config");

    // The Envoy configuration passes envoy --mode validate.
    let envoy_yaml = find(&objects, "ConfigMap", "fikra-envoy")["data"]["envoy.yaml"].as_str().expect("envoy.yaml").to_owned();
    let envoy_path = dir.path().join("envoy.yaml");
    fs::write(&envoy_path, &envoy_yaml).expect("write envoy.yaml");
    let (valid, output) = envoy::validate_envoy_config(&envoy_path);
    assert!(valid, "envoy --mode validate rejected the ConfigMap:\n{output}");
}

#[test]
fn dockerfile_builds_what_is_tested() {
    let dockerfile = fs::read_to_string(repo().join("Dockerfile")).expect("read the Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    let stages: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage: {stages:?}");
    assert!(lines.contains(&"RUN cargo build --release --locked --bin fikra-ratelimit"), "{dockerfile}");
    assert!(
        lines.contains(&"COPY --from=build /src/target/release/fikra-ratelimit /usr/local/bin/fikra-ratelimit"),
        "{dockerfile}"
    );
    assert!(lines.contains(&r#"ENTRYPOINT ["/usr/local/bin/fikra-ratelimit"]"#), "{dockerfile}");
    let user = lines.iter().find_map(|l| l.strip_prefix("USER ")).expect("a USER line");
    assert!(!user.starts_with('0'), "the runtime user {user} is root");
    assert!(!user.starts_with("root"), "the runtime user {user} is root");

    // The build's lock file is complete: --locked needs no change.
    let metadata = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--offline", "--format-version", "1", "--no-deps"])
        .current_dir(repo())
        .output()
        .expect("run cargo metadata");
    assert!(metadata.status.success(), "cargo metadata --locked: {}", String::from_utf8_lossy(&metadata.stderr));
    let metadata: Value = serde_json::from_slice(&metadata.stdout).expect("metadata JSON");
    let bins: Vec<&str> = metadata["packages"][0]["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|t| t["kind"][0] == "bin")
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(bins.contains(&"fikra-ratelimit"), "{bins:?}");

    // The image's command, run on the binary this suite built.
    let config = repo().join("deploy/config/fikra.yaml");
    let (status, output) = ops::run_binary(&["check-config", &config.display().to_string()]);
    assert!(status.success(), "{output}");
    let (status, output) = ops::run_binary(&["serve", "--help"]);
    assert!(status.success(), "{output}");
    for variable in ["FIKRA_CONFIG", "FIKRA_LISTEN", "FIKRA_METRICS_LISTEN", "FIKRA_LOG_FORMAT"] {
        assert!(dockerfile.contains(variable), "the image sets {variable}");
        assert!(output.contains(variable), "serve reads {variable}");
    }
}

#[test]
fn dashboard_asks_only_for_exported_metrics() {
    let dashboard: Value =
        serde_json::from_str(&fs::read_to_string(repo().join("deploy/grafana/fikra-ratelimit.json")).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    let exported: BTreeSet<String> = Metrics::new().series_names().into_iter().collect();
    assert!(exported.contains("fikra_calls_total"), "{exported:?}");

    let mut asked = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let mut rest = expr;
            while let Some(start) = rest.find("fikra_") {
                let name: String = rest[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[start + name.len()..];
                asked.insert(name);
            }
        }
    }
    assert!(asked.len() >= 15, "the dashboard shows {} metrics", asked.len());
    let missing: Vec<&String> = asked.difference(&exported).collect();
    assert!(missing.is_empty(), "the dashboard asks for metrics the service does not export: {missing:?}");
}
