//! The configuration loader on arbitrary text. It never panics. Every file
//! it accepts has a domain and only limits it can count exactly, and every
//! file it rejects gets at least one problem naming the file.

#![no_main]

use fikra_ratelimit::config::{self, model::Node};
use fikra_ratelimit::limiter::bucket::MAX_EXACT;
use libfuzzer_sys::fuzz_target;

const SOURCE: &str = "fuzz.yaml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match config::parse(text, SOURCE) {
        Ok(domain) => {
            assert!(!domain.name.trim().is_empty(), "an accepted file has a domain");
            check_node(&domain.root);
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "a rejected file has a problem");
            for problem in &problems {
                assert_eq!(problem.file, SOURCE);
                assert!(!problem.message.is_empty(), "problem at {} has no message", problem.path);
            }
        }
    }
});

/// Checks that every limit in the tree stays within exact integer arithmetic.
fn check_node(node: &Node) {
    if let Some(rule) = &node.rule {
        for limit in &rule.limits {
            let params = limit.params;
            assert!(params.scale > 0, "{}: {params}", rule.path);
            assert!(params.tick_ms > 0, "{}: {params}", rule.path);
            let top = params.capacity_sub().checked_mul(5).and_then(|sub| sub.checked_add(params.refill_per_tick));
            assert!(top.is_some_and(|top| top < MAX_EXACT), "{}: {params} leaves exact arithmetic", rule.path);
            assert!(limit.multiplier >= 1, "{}: multiplier 0", rule.path);
        }
    }
    for key in node.children.values() {
        key.exact.values().for_each(check_node);
        key.prefixes.iter().for_each(|(_, node)| check_node(node));
        if let Some(any) = &key.any {
            check_node(any);
        }
    }
}
