//! Rules built from arbitrary patterns either compile or are refused with the rule's index, and
//! matching arbitrary requests never panics; a rule that matched is one whose conditions hold.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Case {
    path_patterns: Vec<Option<String>>,
    header_pattern: Option<String>,
    any: bool,
    method: String,
    path: String,
    agent: Vec<u8>,
}

fuzz_target!(|case: Case| {
    let specs: Vec<bouncer_rules::RuleSpec> = case
        .path_patterns
        .iter()
        .take(8)
        .map(|pattern| bouncer_rules::RuleSpec {
            path_regex: pattern.clone(),
            methods: vec!["GET".into()],
            headers: case
                .header_pattern
                .iter()
                .map(|pattern| ("user-agent".to_string(), pattern.clone()))
                .collect(),
            any: case.any,
        })
        .collect();
    let rules = match bouncer_rules::RuleSet::new(&specs) {
        Ok(rules) => rules,
        Err(error) => {
            assert!(error.rule < specs.len().max(1));
            return;
        }
    };
    let agent = case.agent.clone();
    let headers = move |name: &str, visit: &mut dyn FnMut(&[u8])| {
        if name == "user-agent" {
            visit(&agent);
        }
    };
    if let Some(index) = rules.first_match(&bouncer_rules::RuleInput {
        method: &case.method,
        path: &case.path,
        headers: &headers,
    }) {
        let spec = &specs[index];
        if !spec.any {
            assert_eq!(case.method, "GET");
        }
    }
});
