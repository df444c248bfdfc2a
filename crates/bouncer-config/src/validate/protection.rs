//! `[protection]` and `[[rate_limits]]`.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use crate::diagnostics::Diagnostics;
use crate::model::*;
use crate::section::Section;

use super::{networks, relative_to};

pub(super) fn read_protection(
    d: &mut Diagnostics,
    mut section: Section,
    config_file: &Path,
) -> ProtectionConfig {
    let max_connections = section
        .integer(d, "max_connections", 1, i64::from(u32::MAX))
        .and_then(|max| u32::try_from(max).ok());
    let max_connections_per_ip = section
        .integer(d, "max_connections_per_ip", 1, i64::from(u32::MAX))
        .and_then(|max| u32::try_from(max).ok());
    let max_tracked_keys = section
        .integer(d, "max_tracked_keys", 1_000, 100_000_000)
        .and_then(|max| usize::try_from(max).ok())
        .unwrap_or(1_000_000);
    let ip = match section.table(d, "ip") {
        Some(mut lists) => {
            let files = |d: &mut Diagnostics, lists: &mut Section, key| {
                lists
                    .strings(d, key)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(name, _)| relative_to(config_file, &name))
                    .collect()
            };
            let ip = IpListsConfig {
                deny: networks(d, &mut lists, "deny"),
                deny_files: files(d, &mut lists, "deny_files"),
                allow: networks(d, &mut lists, "allow"),
                allow_files: files(d, &mut lists, "allow_files"),
            };
            lists.finish(d);
            ip
        }
        None => IpListsConfig::default(),
    };
    let auto_ban = section.table(d, "auto_ban").map(|mut auto_ban| {
        let violations = auto_ban
            .integer(d, "violations", 1, 1_000_000)
            .and_then(|count| u32::try_from(count).ok())
            .unwrap_or(20);
        let within = auto_ban.duration(
            d,
            "within",
            Duration::from_secs(10),
            Duration::from_millis(1),
        );
        let ban_for = auto_ban.duration(d, "ban_for", DEFAULT_BAN, Duration::from_secs(1));
        auto_ban.finish(d);
        AutoBanConfig {
            violations,
            within,
            ban_for,
        }
    });
    let tarpit_delay = section.duration(d, "tarpit_delay", Duration::from_secs(10), Duration::ZERO);
    let adaptive = section.table(d, "adaptive").and_then(|mut adaptive| {
        let config = read_adaptive(d, &mut adaptive);
        adaptive.finish(d);
        config
    });
    section.finish(d);
    ProtectionConfig {
        max_connections,
        max_connections_per_ip,
        max_tracked_keys,
        ip,
        auto_ban,
        tarpit_delay,
        adaptive,
    }
}

/// `[protection.adaptive]`: one trigger, and the share the limits shrink to.
fn read_adaptive(d: &mut Diagnostics, section: &mut Section) -> Option<AdaptiveConfig> {
    let enabled = section.bool(d, "enabled").unwrap_or(true);
    let p99 = section.item("trigger_backend_p99").is_some().then(|| {
        section.duration(
            d,
            "trigger_backend_p99",
            Duration::from_millis(500),
            Duration::from_millis(1),
        )
    });
    let in_flight = section
        .integer(d, "trigger_in_flight", 1, i64::from(u32::MAX))
        .and_then(|count| u32::try_from(count).ok());
    let tighten_to = section.number(d, "tighten_to", 0.001, 1.0).unwrap_or(0.25);
    let trigger = match (p99, in_flight) {
        (Some(p99), None) => AdaptiveTrigger::BackendP99(p99),
        (None, Some(count)) => AdaptiveTrigger::InFlight(count),
        _ => {
            d.report(
                section.span(),
                section.path().to_string(),
                "adaptive needs one trigger: trigger_backend_p99 = \"500ms\" or trigger_in_flight = N",
            );
            return None;
        }
    };
    enabled.then_some(AdaptiveConfig {
        trigger,
        tighten_to,
    })
}

pub(super) fn read_rules(d: &mut Diagnostics, root: &mut Section) -> Vec<RuleConfig> {
    let mut rules = Vec::new();
    let mut names = HashSet::new();
    for (index, mut section) in root.tables(d, "rules").into_iter().enumerate() {
        let name = unique_name(d, &mut section, &mut names, index, "rule");
        let when = section.table(d, "when").map(|mut when| {
            let spec = read_when(d, &mut when, &name);
            when.finish(d);
            spec
        });
        if when.is_none() {
            d.report(
                section.span(),
                section.key_path("when"),
                format!("rule \"{name}\" needs when = {{ path_regex, method, header, any }}"),
            );
        }
        let action = match section.string(d, "action") {
            None => Some(RuleAction::Deny),
            Some((action, span)) => match action.as_str() {
                "deny" => Some(RuleAction::Deny),
                "ban" => Some(RuleAction::Ban),
                "tarpit" => Some(RuleAction::Tarpit),
                "log" => Some(RuleAction::Log),
                _ => {
                    d.report(
                        span,
                        section.key_path("action"),
                        format!("\"{action}\" is not a rule action: use deny, ban, tarpit or log"),
                    );
                    None
                }
            },
        };
        section.finish(d);
        if let (Some(when), Some(action)) = (when.flatten(), action) {
            rules.push(RuleConfig { name, when, action });
        }
    }
    rules
}

/// `when = { path_regex, method, header = { NAME = REGEX }, any }`; each pattern is compiled now,
/// so that a bad one is reported with its rule.
fn read_when(
    d: &mut Diagnostics,
    when: &mut Section,
    rule: &str,
) -> Option<bouncer_rules::RuleSpec> {
    let mut valid = true;
    let path_regex = match when.string(d, "path_regex") {
        Some((text, span)) => {
            let checked = checked_pattern(d, text, span, when.key_path("path_regex"), rule);
            valid &= checked.is_some();
            checked
        }
        None => None,
    };
    let methods: Vec<String> = when
        .strings(d, "method")
        .unwrap_or_default()
        .into_iter()
        .map(|(method, _)| method.to_ascii_uppercase())
        .collect();
    let mut headers = Vec::new();
    if let Some(table) = when.table(d, "header") {
        // Its keys are header names, each with a pattern.
        for (name, item, span) in table.entries() {
            let path = format!("{}.{name}", table.path());
            let Some(text) = item.as_str() else {
                d.report(
                    span,
                    path,
                    crate::section::expected("a regular expression", item),
                );
                valid = false;
                continue;
            };
            if !bouncer_rules::is_token(name.as_bytes()) {
                d.report(span, path, format!("\"{name}\" is not a header name"));
                valid = false;
                continue;
            }
            match checked_pattern(d, text.to_string(), span, path, rule) {
                Some(text) => headers.push((name.to_ascii_lowercase(), text)),
                None => valid = false,
            }
        }
    }
    let any = when.bool(d, "any").unwrap_or(false);
    if path_regex.is_none() && methods.is_empty() && headers.is_empty() && valid {
        d.report(
            when.span(),
            when.path().to_string(),
            format!("rule \"{rule}\" has no condition: give path_regex, method or header"),
        );
        return None;
    }
    valid.then_some(bouncer_rules::RuleSpec {
        path_regex,
        methods,
        headers,
        any,
    })
}

pub(super) fn read_rate_limits(
    d: &mut Diagnostics,
    root: &mut Section,
    route_names: &[&str],
) -> Vec<RateLimitConfig> {
    let mut limits = Vec::new();
    let mut names = HashSet::new();
    for (index, mut section) in root.tables(d, "rate_limits").into_iter().enumerate() {
        let name = unique_name(d, &mut section, &mut names, index, "rate limit");
        let key = read_key(d, &mut section);
        let rate = match section.string(d, "rate") {
            Some((text, span)) => match parse_rate(&text) {
                Ok(rate) => Some(rate),
                Err(reason) => {
                    d.report(span, section.key_path("rate"), reason);
                    None
                }
            },
            None => {
                d.report(
                    section.span(),
                    section.key_path("rate"),
                    "a rate limit needs rate = \"N/s\" (or /m, /h, /d, or \"N/10s\")",
                );
                None
            }
        };
        let burst = section
            .integer(d, "burst", 1, 10_000_000)
            .and_then(|burst| u32::try_from(burst).ok());
        let routes: Vec<String> = section
            .strings(d, "routes")
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(route, span)| {
                if route_names.contains(&route.as_str()) {
                    Some(route)
                } else {
                    d.report(
                        span,
                        section.key_path("routes"),
                        format!("no route is named \"{route}\""),
                    );
                    None
                }
            })
            .collect();
        let action = match section.string(d, "action") {
            None => Some("reject".to_string()),
            Some((action, span)) if action == "reject" || action == "delay" => {
                let _ = span;
                Some(action)
            }
            Some((action, span)) => {
                d.report(
                    span,
                    section.key_path("action"),
                    format!("\"{action}\" is not a rate limit action: use \"reject\" or \"delay\""),
                );
                None
            }
        };
        let max_delay_given = section.item("max_delay").is_some();
        let max_delay = section.duration(
            d,
            "max_delay",
            Duration::from_millis(500),
            Duration::from_millis(1),
        );
        if max_delay_given && action.as_deref() == Some("reject") {
            d.report(
                section.span(),
                section.key_path("max_delay"),
                "max_delay applies only to action = \"delay\"",
            );
        }
        section.finish(d);
        let (Some(key), Some((count, period)), Some(action)) = (key, rate, action) else {
            continue;
        };
        limits.push(RateLimitConfig {
            name,
            key,
            count,
            period,
            // A second's worth of requests at once, at least one, unless told.
            burst: burst.unwrap_or_else(|| {
                let per_second = u128::from(count) * 1_000_000_000 / period.as_nanos().max(1);
                u32::try_from(per_second).unwrap_or(u32::MAX).max(1)
            }),
            routes,
            action: if action == "delay" {
                RateLimitAction::Delay { max_delay }
            } else {
                RateLimitAction::Reject
            },
        });
    }
    limits
}

/// A section's `name` (its position when it has none), reported when another of its `kind` has it.
fn unique_name(
    d: &mut Diagnostics,
    section: &mut Section,
    names: &mut HashSet<String>,
    index: usize,
    kind: &str,
) -> String {
    match section.string(d, "name") {
        Some((name, span)) => {
            if !names.insert(name.clone()) {
                d.report(
                    span,
                    section.key_path("name"),
                    format!("another {kind} is named \"{name}\""),
                );
            }
            name
        }
        None => index.to_string(),
    }
}

/// `key = "client_ip"` or a list of parts.
fn read_key(d: &mut Diagnostics, section: &mut Section) -> Option<Vec<RateKeyPart>> {
    let texts: Vec<(String, crate::section::Span)> = match section.item("key") {
        None => return Some(vec![RateKeyPart::ClientIp]),
        Some((item, _)) if item.as_str().is_some() => {
            section.string(d, "key").into_iter().collect()
        }
        Some(_) => section.strings(d, "key")?,
    };
    let mut parts = Vec::new();
    for (text, span) in texts {
        match parse_key_part(&text) {
            Ok(part) => parts.push(part),
            Err(reason) => d.report(span, section.key_path("key"), reason),
        }
    }
    (!parts.is_empty()).then_some(parts)
}

fn parse_key_part(text: &str) -> Result<RateKeyPart, String> {
    match text {
        "client_ip" => return Ok(RateKeyPart::ClientIp),
        "path" => return Ok(RateKeyPart::Path),
        "route" => return Ok(RateKeyPart::Route),
        _ => {}
    }
    if let Some(name) = text.strip_prefix("header:") {
        if bouncer_rules::is_token(name.as_bytes()) {
            return Ok(RateKeyPart::Header(name.to_ascii_lowercase()));
        }
        return Err(format!("\"{name}\" is not a header name"));
    }
    if let Some(name) = text.strip_prefix("cookie:") {
        if bouncer_rules::is_token(name.as_bytes()) {
            return Ok(RateKeyPart::Cookie(name.to_string()));
        }
        return Err(format!("\"{name}\" is not a cookie name"));
    }
    Err(format!(
        "\"{text}\" is not a key: use client_ip, header:NAME, cookie:NAME, path or route"
    ))
}

/// `"50/s"`, `"100/m"`, `"1000/h"`, `"10000/d"` or `"5/10s"`: a count and the period it is per.
pub(crate) fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let wrong = || {
        format!(
            "\"{text}\" is not a rate: write N/s, N/m, N/h, N/d or N/DURATION such as \"5/10s\""
        )
    };
    let (count, per) = text.split_once('/').ok_or_else(wrong)?;
    let count: u32 = count.trim().parse().map_err(|_| wrong())?;
    if count == 0 {
        return Err(format!(
            "\"{text}\": a rate of zero refuses everything; use a deny rule for that"
        ));
    }
    let period = match per.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86_400),
        other => crate::parse_duration(other).map_err(|_| wrong())?,
    };
    if period.is_zero() {
        return Err(wrong());
    }
    Ok((count, period))
}

/// `text` when it compiles as a rule's pattern; otherwise the problem is reported.
fn checked_pattern(
    d: &mut Diagnostics,
    text: String,
    span: crate::section::Span,
    path: String,
    rule: &str,
) -> Option<String> {
    match bouncer_rules::matcher::check_pattern(&text) {
        Ok(()) => Some(text),
        Err(error) => {
            d.report(
                span,
                path,
                format!("rule \"{rule}\": not a valid regular expression: {error}"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_read_with_their_periods() {
        assert_eq!(parse_rate("50/s"), Ok((50, Duration::from_secs(1))));
        assert_eq!(parse_rate("100/m"), Ok((100, Duration::from_secs(60))));
        assert_eq!(parse_rate("5/10s"), Ok((5, Duration::from_secs(10))));
        assert_eq!(parse_rate("1 / h"), Ok((1, Duration::from_secs(3600))));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("50").is_err());
        assert!(parse_rate("x/s").is_err());
        assert!(parse_rate("5/0s").is_err());
        assert!(parse_rate("5/fortnight").is_err());
    }
}
