//! Request-pattern rules: which rule, if any, a request matches. All rules' patterns for one part
//! of the request are compiled together into one `RegexSet`, so that a request is scanned once per
//! part however many rules there are.

use regex::{RegexSet, RegexSetBuilder};

/// One rule's conditions, as the config gives them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSpec {
    pub path_regex: Option<String>,
    /// Methods, upper case; empty for any.
    pub methods: Vec<String>,
    /// Header names (lower case) with a pattern each, matched against every value.
    pub headers: Vec<(String, String)>,
    /// Whether one condition suffices; otherwise all must hold.
    pub any: bool,
}

/// A pattern that does not compile, with the rule it belongs to.
#[derive(Debug, thiserror::Error)]
#[error("rule {rule}: {field}: {source}")]
pub struct RuleError {
    pub rule: usize,
    pub field: String,
    #[source]
    pub source: regex::Error,
}

/// Patterns longer than this when compiled are refused, so that a config cannot make matching
/// slow or large.
const SIZE_LIMIT: usize = 4 << 20;

/// Checks one pattern as a rule would compile it.
pub fn check_pattern(pattern: &str) -> Result<(), regex::Error> {
    regex::RegexBuilder::new(pattern)
        .size_limit(SIZE_LIMIT)
        .build()
        .map(drop)
}

/// The rules, compiled.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<CompiledRule>,
    paths: RegexSet,
    /// For each rule with a path pattern, its index in `paths`.
    path_slot: Vec<Option<usize>>,
    /// Per header name: the patterns of every rule on it, and which rule each belongs to.
    headers: Vec<HeaderPatterns>,
}

#[derive(Debug)]
struct CompiledRule {
    methods: Vec<String>,
    any: bool,
    /// Conditions this rule has: path, methods, and how many headers.
    has_path: bool,
    header_count: usize,
}

#[derive(Debug)]
struct HeaderPatterns {
    name: String,
    set: RegexSet,
    /// The rule of each pattern in `set`.
    owners: Vec<usize>,
}

/// Calls its second argument with every value of the header named by its first (lower case).
pub type HeaderValues<'a> = &'a dyn Fn(&str, &mut dyn FnMut(&[u8]));

/// What a rule looks at in a request.
pub struct RuleInput<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: HeaderValues<'a>,
}

impl RuleSet {
    pub fn new(specs: &[RuleSpec]) -> Result<RuleSet, RuleError> {
        let mut path_patterns = Vec::new();
        let mut path_slot = Vec::with_capacity(specs.len());
        let mut headers: Vec<(String, Vec<String>, Vec<usize>)> = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            match &spec.path_regex {
                Some(pattern) => {
                    check_pattern(pattern).map_err(|source| RuleError {
                        rule: index,
                        field: "path_regex".into(),
                        source,
                    })?;
                    path_slot.push(Some(path_patterns.len()));
                    path_patterns.push(pattern.clone());
                }
                None => path_slot.push(None),
            }
            for (name, pattern) in &spec.headers {
                check_pattern(pattern).map_err(|source| RuleError {
                    rule: index,
                    field: format!("header.{name}"),
                    source,
                })?;
                match headers.iter_mut().find(|(known, _, _)| known == name) {
                    Some((_, patterns, owners)) => {
                        patterns.push(pattern.clone());
                        owners.push(index);
                    }
                    None => headers.push((name.clone(), vec![pattern.clone()], vec![index])),
                }
            }
        }
        let build = |patterns: &[String]| {
            RegexSetBuilder::new(patterns)
                .size_limit(SIZE_LIMIT * patterns.len().max(1))
                .build()
        };
        let paths = build(&path_patterns).map_err(|source| RuleError {
            rule: 0,
            field: "path_regex".into(),
            source,
        })?;
        let headers = headers
            .into_iter()
            .map(|(name, patterns, owners)| {
                let set = build(&patterns).map_err(|source| RuleError {
                    rule: owners[0],
                    field: format!("header.{name}"),
                    source,
                })?;
                Ok(HeaderPatterns { name, set, owners })
            })
            .collect::<Result<Vec<_>, RuleError>>()?;
        Ok(RuleSet {
            rules: specs
                .iter()
                .map(|spec| CompiledRule {
                    methods: spec.methods.clone(),
                    any: spec.any,
                    has_path: spec.path_regex.is_some(),
                    header_count: spec.headers.len(),
                })
                .collect(),
            paths,
            path_slot,
            headers,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule (in config order) that `request` matches.
    pub fn first_match(&self, request: &RuleInput<'_>) -> Option<usize> {
        if self.rules.is_empty() {
            return None;
        }
        let path_hits = self.paths.matches(request.path);
        // How many of each rule's header conditions hold.
        let mut header_hits = vec![0usize; self.rules.len()];
        for patterns in &self.headers {
            let mut matched = vec![false; patterns.owners.len()];
            (request.headers)(&patterns.name, &mut |value| {
                if let Ok(text) = std::str::from_utf8(value) {
                    for slot in patterns.set.matches(text).iter() {
                        matched[slot] = true;
                    }
                }
            });
            for (slot, hit) in matched.into_iter().enumerate() {
                if hit {
                    header_hits[patterns.owners[slot]] += 1;
                }
            }
        }
        self.rules.iter().enumerate().find_map(|(index, rule)| {
            let mut held = 0;
            let mut total = 0;
            if rule.has_path {
                total += 1;
                if self.path_slot[index].is_some_and(|slot| path_hits.matched(slot)) {
                    held += 1;
                }
            }
            if !rule.methods.is_empty() {
                total += 1;
                if rule.methods.iter().any(|method| method == request.method) {
                    held += 1;
                }
            }
            total += rule.header_count;
            held += header_hits[index];
            let matched = if rule.any {
                held > 0
            } else {
                total > 0 && held == total
            };
            matched.then_some(index)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: Option<&str>, methods: &[&str], headers: &[(&str, &str)], any: bool) -> RuleSpec {
        RuleSpec {
            path_regex: path.map(str::to_string),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            headers: headers
                .iter()
                .map(|(n, p)| (n.to_string(), p.to_string()))
                .collect(),
            any,
        }
    }

    fn check(
        rules: &RuleSet,
        method: &str,
        path: &str,
        agent: Option<&'static str>,
    ) -> Option<usize> {
        let headers = move |name: &str, visit: &mut dyn FnMut(&[u8])| {
            if let ("user-agent", Some(agent)) = (name, agent) {
                visit(agent.as_bytes());
            }
        };
        rules.first_match(&RuleInput {
            method,
            path,
            headers: &headers,
        })
    }

    #[test]
    fn any_rules_need_one_condition_and_all_rules_need_every_one() {
        let rules = RuleSet::new(&[
            spec(
                Some(r"^/(wp-admin|wp-login\.php|\.env|\.git)"),
                &["GET", "POST"],
                &[("user-agent", "(?i)(sqlmap|nikto|masscan)")],
                true,
            ),
            spec(Some("^/admin"), &["POST"], &[], false),
        ])
        .expect("rules compile");
        assert_eq!(check(&rules, "GET", "/wp-login.php", None), Some(0));
        assert_eq!(check(&rules, "PUT", "/index", Some("Nikto/2.1")), Some(0));
        // Method alone holds for the first rule (any): GET is listed.
        assert_eq!(check(&rules, "GET", "/index", Some("curl")), Some(0));
        assert_eq!(check(&rules, "POST", "/admin/users", None), Some(0));
        assert_eq!(check(&rules, "DELETE", "/admin/users", None), None);
        assert_eq!(check(&rules, "DELETE", "/index", Some("curl/8")), None);
    }

    #[test]
    fn all_conditions_must_hold_without_any() {
        let rules = RuleSet::new(&[spec(
            Some("^/login"),
            &["POST"],
            &[("user-agent", "bot")],
            false,
        )])
        .expect("rules compile");
        assert_eq!(check(&rules, "POST", "/login", Some("evil bot")), Some(0));
        assert_eq!(check(&rules, "POST", "/login", Some("browser")), None);
        assert_eq!(check(&rules, "GET", "/login", Some("evil bot")), None);
        assert_eq!(check(&rules, "POST", "/login", None), None);
    }

    #[test]
    fn bad_patterns_name_their_rule() {
        let error = RuleSet::new(&[
            spec(Some("^/ok"), &[], &[], false),
            spec(None, &[], &[("user-agent", "(unclosed")], false),
        ])
        .expect_err("a bad pattern");
        assert_eq!(error.rule, 1);
        assert_eq!(error.field, "header.user-agent");
    }

    #[test]
    fn many_rules_compile_into_one_scan() {
        let specs: Vec<RuleSpec> = (0..500)
            .map(|index| spec(Some(&format!("^/blocked/{index}$")), &[], &[], false))
            .collect();
        let rules = RuleSet::new(&specs).expect("rules compile");
        assert_eq!(check(&rules, "GET", "/blocked/377", None), Some(377));
        assert_eq!(check(&rules, "GET", "/blocked/377/x", None), None);
    }
}
