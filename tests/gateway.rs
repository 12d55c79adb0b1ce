//! Envoy gateway configuration: checks that need no rate-limit service.
//!
//! The rate-limit cluster points at a closed port here, so every check fails and
//! Envoy applies its failure mode. What runs before the rate-limit filter (the
//! API key check, the tier stripping, the token estimate) is observed through
//! the headers that reach the stand-in upstream.

#[path = "support/envoy.rs"]
mod envoy;

use envoy::{Envoy, EnvoyOptions, Upstream};
use serde_json::Value;

// === Configuration files ===

#[test]
fn deployed_config_is_valid() {
    let (valid, output) = envoy::validate_envoy_config(&envoy::repo_root().join(envoy::DEPLOYED_ENVOY_CONFIG));
    assert!(valid, "envoy --mode validate rejected the deployed configuration:\n{output}");
}

#[test]
fn test_config_is_valid() {
    for failure_mode_deny in [true, false] {
        let options = EnvoyOptions {
            failure_mode_deny,
            ..EnvoyOptions::new(8000, 8081)
        };
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, envoy::render_envoy_config(&options, 8080, 9901)).expect("write envoy.yaml");

        let (valid, output) = envoy::validate_envoy_config(&path);
        assert!(valid, "envoy --mode validate rejected the test configuration:\n{output}");
    }
}

/// The test configuration must run the deployed flow, so the parts that make
/// the flow are compared line by line.
#[test]
fn test_config_matches_deployed_flow() {
    let deployed = read_repo_file(envoy::DEPLOYED_ENVOY_CONFIG);
    let test = read_repo_file(envoy::ENVOY_TEMPLATE);

    for filter in ["fikra.gateway_headers", "fikra.token_estimate"] {
        let marker = format!("- name: {filter}");
        assert_eq!(
            yaml_item(&test, &marker),
            yaml_item(&deployed, &marker),
            "Lua filter {filter} differs between the two configurations"
        );
    }

    // The timeout and the failure mode are meant to differ.
    let ratelimit_filter = |config: &str| -> Vec<String> {
        without_comments(yaml_item(config, "- name: envoy.filters.http.ratelimit"))
            .into_iter()
            .filter(|line| !line.trim_start().starts_with("timeout:"))
            .filter(|line| !line.trim_start().starts_with("failure_mode_deny:"))
            .collect()
    };
    assert_eq!(
        ratelimit_filter(&test),
        ratelimit_filter(&deployed),
        "the rate-limit filter differs between the two configurations"
    );

    assert_eq!(
        without_comments(lines_between(&test, "stat_prefix:", "http_filters:")),
        without_comments(lines_between(&deployed, "stat_prefix:", "http_filters:")),
        "the connection manager settings differ between the two configurations"
    );

    assert_eq!(
        filter_names(&test),
        [
            "fikra.gateway_headers",
            "fikra.test_auth",
            "fikra.token_estimate",
            "envoy.filters.http.ratelimit",
            "envoy.filters.http.router"
        ]
    );
    assert_eq!(
        filter_names(&deployed),
        [
            "fikra.gateway_headers",
            "fikra.token_estimate",
            "envoy.filters.http.ratelimit",
            "envoy.filters.http.router"
        ]
    );
}

// === Requests through Envoy ===

#[tokio::test]
async fn missing_api_key_gets_401() {
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(EnvoyOptions::new(upstream.port(), envoy::free_port())).await;

    let cases: [(&str, &[(&str, &str)]); 3] = [
        ("no x-api-key", &[]),
        ("empty x-api-key", &[("x-api-key", "")]),
        ("two x-api-key headers", &[("x-api-key", "trusted-a"), ("x-api-key", "trusted-b")]),
    ];
    for (case, headers) in cases {
        let response = envoy.request("POST", "/v1/chat/completions", headers, b"{}").await;

        assert_eq!(response.status, 401, "{case}: {}", response.text());
        assert_eq!(response.header("content-type"), Some("application/json"), "{case}");
        let body: Value = serde_json::from_slice(&response.body).expect("401 body is JSON");
        assert_eq!(body["error"]["code"], "missing_api_key", "{case}");
        assert_eq!(body["error"]["status"], 401, "{case}");
    }

    assert_eq!(upstream.served_count().await, 0, "a request without a key reached the upstream");
    assert_eq!(
        envoy.stat("cluster.fikra_ratelimit.upstream_rq_total").await.unwrap_or(0),
        0,
        "a request without a key reached the rate-limit service"
    );
}

#[tokio::test]
async fn unreachable_service_fails_closed() {
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(EnvoyOptions::new(upstream.port(), envoy::free_port())).await;

    let response = envoy.request("POST", "/v1/chat/completions", &[("x-api-key", "trusted-a")], b"{}").await;

    assert_eq!(response.status, 500, "{}", response.text());
    assert_eq!(upstream.served_count().await, 0);
    assert_eq!(envoy.stat("cluster.llm_api.ratelimit.error").await, Some(1));
}

#[tokio::test]
async fn tier_header_comes_from_auth_layer() {
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(fail_open(&upstream)).await;

    let cases = [
        // (API key, x-fikra-tier sent by the client, tier expected upstream)
        ("trusted-a", None, Some("trusted")),
        ("trusted-a", Some("unverified"), Some("trusted")),
        ("unverified-a", Some("trusted"), Some("unverified")),
        ("gold-a", None, Some("gold")),
        ("plain-key", Some("trusted"), None),
        ("plain-key", None, None),
    ];
    for (key, client_tier, expected_tier) in cases {
        let mut headers = vec![("x-api-key", key)];
        if let Some(tier) = client_tier {
            headers.push(("x-fikra-tier", tier));
        }

        let received = forwarded_headers(&envoy, &headers, b"{}").await;

        let tiers: Vec<&str> = received["x-fikra-tier"]
            .as_array()
            .map(|values| values.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(
            tiers,
            expected_tier.into_iter().collect::<Vec<_>>(),
            "key {key} with client tier {client_tier:?}"
        );
    }
}

#[tokio::test]
async fn token_estimate_from_request_body() {
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(fail_open(&upstream)).await;

    // Estimate = ceil(prompt characters / 4) + max_tokens (default 1024).
    let cases: [(&str, &str, u64); 12] = [
        (
            "chat with max_tokens",
            r#"{"messages":[{"role":"user","content":"hello world!"}],"max_tokens":100}"#,
            3 + 100,
        ),
        (
            "chat without max_tokens",
            r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#,
            3 + 1024,
        ),
        (
            "text parts count, image parts do not",
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},{"role":"assistant","content":null}],"max_tokens":0}"#,
            2,
        ),
        ("max_completion_tokens", r#"{"prompt":"abcd","max_completion_tokens":7}"#, 1 + 7),
        ("prompt array", r#"{"prompt":["abcd","efgh",5],"max_tokens":10.9}"#, 2 + 10),
        (
            "characters, not bytes",
            "{\"prompt\":\"\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\\u00e9\\\"\\n\",\"max_tokens\":1}",
            2 + 1,
        ),
        ("negative max_tokens", r#"{"max_tokens":-5}"#, 1024),
        ("string max_tokens", r#"{"max_tokens":"50"}"#, 1024),
        ("huge max_tokens is capped", r#"{"max_tokens":1e30}"#, 1_000_000_000),
        ("not JSON counts the whole body", "abcdefghijklmnopq", 5 + 1024),
        ("JSON array counts the whole body", "[1,2]", 2 + 1024),
        ("no body", "", 1024),
    ];
    for (case, body, expected) in cases {
        let received = forwarded_headers(&envoy, &[("x-api-key", "plain-key")], body.as_bytes()).await;

        assert_eq!(
            received["x-fikra-token-estimate"],
            serde_json::json!([expected.to_string()]),
            "{case}"
        );
    }
}

#[tokio::test]
async fn client_gateway_headers_are_replaced() {
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(fail_open(&upstream)).await;

    let headers = [
        ("x-api-key", "plain-key"),
        ("x-fikra-token-estimate", "1"),
        ("x-request-id", "chosen-by-client"),
    ];
    let received = forwarded_headers(&envoy, &headers, br#"{"max_tokens":5}"#).await;

    assert_eq!(received["x-fikra-token-estimate"], serde_json::json!(["5"]));
    let request_ids = received["x-request-id"].as_array().expect("x-request-id reaches the upstream");
    assert_eq!(request_ids.len(), 1);
    assert_ne!(request_ids[0], "chosen-by-client", "Envoy kept the client's request id");
}

// === Helpers ===

/// Options with a closed rate-limit port and fail-open, so requests reach the upstream.
fn fail_open(upstream: &Upstream) -> EnvoyOptions {
    EnvoyOptions {
        failure_mode_deny: false,
        ..EnvoyOptions::new(upstream.port(), envoy::free_port())
    }
}

/// Sends a request through Envoy and returns the request headers the upstream
/// received, as {name: [values]}.
async fn forwarded_headers(envoy: &Envoy, headers: &[(&str, &str)], body: &[u8]) -> Value {
    let response = envoy.request("POST", "/v1/chat/completions", headers, body).await;
    assert_eq!(response.status, 200, "{}", response.text());

    let completion: Value = serde_json::from_slice(&response.body).expect("upstream body is JSON");
    completion["received"]["headers"].clone()
}

fn read_repo_file(path: &str) -> String {
    std::fs::read_to_string(envoy::repo_root().join(path)).unwrap_or_else(|error| panic!("cannot read {path}: {error}"))
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Returns the YAML sequence item that starts with the line containing `marker`:
/// that line and the lines after it up to the next line indented no deeper,
/// without trailing blank lines.
fn yaml_item(config: &str, marker: &str) -> Vec<String> {
    let lines: Vec<&str> = config.lines().collect();
    let start = lines
        .iter()
        .position(|line| line.trim_start().starts_with(marker))
        .unwrap_or_else(|| panic!("no line starts with {marker:?}"));
    let depth = indentation(lines[start]);

    let mut item: Vec<String> = vec![lines[start].to_owned()];
    for line in &lines[start + 1..] {
        if !line.trim().is_empty() && indentation(line) <= depth {
            break;
        }
        item.push((*line).to_owned());
    }
    while item.last().is_some_and(|line| line.trim().is_empty()) {
        item.pop();
    }
    item
}

/// Returns the lines after the first line containing `start` and before the
/// next line containing `end`.
fn lines_between(config: &str, start: &str, end: &str) -> Vec<String> {
    config
        .lines()
        .skip_while(|line| !line.contains(start))
        .skip(1)
        .take_while(|line| !line.contains(end))
        .map(str::to_owned)
        .collect()
}

fn without_comments(lines: Vec<String>) -> Vec<String> {
    lines
        .into_iter()
        .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
        .collect()
}

fn filter_names(config: &str) -> Vec<String> {
    lines_between(config, "http_filters:", "clusters:")
        .iter()
        .filter(|line| indentation(line) == 10)
        .filter_map(|line| line.trim_start().strip_prefix("- name: "))
        .map(str::to_owned)
        .collect()
}
