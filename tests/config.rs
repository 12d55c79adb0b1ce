//! Configuration loading and the `check-config` command.

use std::path::Path;
use std::process::Command;

use fikra_ratelimit::config;

const BIN: &str = env!("CARGO_BIN_EXE_fikra-ratelimit");

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write test file");
}

#[test]
fn shipped_config_is_valid() {
    let output = Command::new(BIN).args(["check-config", "deploy/config/fikra.yaml"]).output().expect("run check-config");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("fikra"));

    let limits = config::load(&["deploy/config/fikra.yaml".into()]).expect("valid");
    let domain = limits.domain("fikra").expect("fikra domain");
    assert_eq!(domain.tiers.len(), 2);
    assert_eq!(domain.tiers[domain.default_tier.expect("default")].display_name, "Unverified Tier");
}

#[test]
fn check_config_lists_every_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        dir.path(),
        "bad.yaml",
        "
domain: llm
tiers:
  - name: unverified
descriptors:
  - key: api_key
    meter: bytes
    rate_limit: {unit: fortnight, requests_per_unit: -3}
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 5, burst: 0}
  - key: blocked
    rate_limit: {unit: minute, requests_per_unit: 0, burst: 3}
",
    );
    let output = Command::new(BIN).arg("check-config").arg(dir.path().join("bad.yaml")).output().expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(!output.status.success());
    for expected in [
        "bad.yaml: tiers: no default tier",
        "bad.yaml: entry_roles.tier:",
        "bad.yaml: descriptors[0].meter: unknown meter `bytes`",
        "bad.yaml: descriptors[0].rate_limit.unit: unknown unit `fortnight`",
        "bad.yaml: descriptors[0].rate_limit.requests_per_unit: the limit -3 is negative",
        "bad.yaml: descriptors[1].rate_limit.burst: 0 is out of range",
        "bad.yaml: descriptors[2].rate_limit.burst: a limit of 0 never refills",
    ] {
        assert!(stderr.contains(expected), "missing `{expected}` in:\n{stderr}");
    }
}

#[test]
fn yaml_syntax_error_names_the_file() {
    let problems = config::parse("domain: llm\ndescriptors: [\n", "broken.yaml").expect_err("syntax error");
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].file, "broken.yaml");
    assert!(problems[0].message.starts_with("invalid YAML"), "{}", problems[0].message);
}

#[test]
fn unknown_field_is_rejected() {
    let problems = config::parse("domain: llm\ndescriptors:\n  - key: a\n    rate_limt: {}\n", "typo.yaml").expect_err("typo");
    assert!(problems[0].message.contains("rate_limt"), "{}", problems[0].message);
}

#[test]
fn envoy_ratelimit_file_loads_unchanged() {
    let text = "
domain: edge
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10
  - key: path
    value: /login*
    detailed_metric: true
    rate_limit:
      name: login
      unit: MINUTE
      requests_per_unit: 5
  - key: user
    value: admin
    rate_limit:
      unlimited: true
";
    let domain = config::parse(text, "edge.yaml").expect("envoyproxy/ratelimit format");
    assert_eq!(domain.name, "edge");
}

#[test]
fn limit_beyond_exact_range_is_refused() {
    let text = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 5000000000000000}\n";
    let problems = config::parse(text, "huge.yaml").expect_err("inexact");
    assert_eq!(problems[0].path, "descriptors[0].rate_limit");
    assert!(problems[0].message.contains("cannot be counted exactly"), "{}", problems[0].message);

    let trillion = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, requests_per_unit: 1000000000000}\n";
    config::parse(trillion, "trillion.yaml").expect("10^12 per window is accepted");
}

#[test]
fn directory_skips_hidden_entries_and_rejects_duplicates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("..2026_12_04_00_00_00.000000001");
    std::fs::create_dir(&data).expect("data dir");
    write(&data, "a.yaml", "domain: a\n");
    std::os::unix::fs::symlink(&data, dir.path().join("..data")).expect("..data link");
    std::os::unix::fs::symlink(dir.path().join("..data/a.yaml"), dir.path().join("a.yaml")).expect("file link");
    write(dir.path(), ".hidden.yaml", "domain: a\n");

    let limits = config::load(&[dir.path().to_owned()]).expect("ConfigMap layout loads once");
    assert_eq!(limits.domains.len(), 1);

    write(dir.path(), "b.yaml", "domain: a\n");
    let error = config::load(&[dir.path().to_owned()]).expect_err("duplicate domain");
    assert!(error.to_string().contains("domain `a` is already defined"), "{error}");
}

#[test]
fn serve_refuses_invalid_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "bad.yaml", "domain: llm\ndescriptors:\n  - key: k\n    rate_limit: {requests_per_unit: 1}\n");
    let output = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.path())
        .output()
        .expect("run serve");
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(!output.status.success());
    assert!(stderr.contains("descriptors[0].rate_limit.unit: the unit is missing"), "{stderr}");
}
