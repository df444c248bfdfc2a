//! Conformance with RFC 9111 (HTTP caching), RFC 5861 (stale-while-revalidate, stale-if-error),
//! RFC 9110's conditional and range requests as a cache answers them, and RFC 9211
//! (Cache-Status): one test per rule, named after its section.
//!
//! Header values that start with `@` are dates: `@-60` is an HTTP-date one minute before the
//! test's reference time `T0`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bouncer_cache_policy::policy::HEURISTIC_MAX;
use bouncer_cache_policy::{
    CacheStatus, Exchange, Forward, Freshness, NotStorable, RangeAnswer, RequestDirectives,
    ResponseDirectives, Reuse, StoreOptions, invalidate, is_error_status, may_serve_stale_on_error,
    may_store, range, reuse, secondary_key, validation, variant_matches, vary_fields,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

/// The reference time of every test.
fn t(offset: i64) -> SystemTime {
    let base = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    if offset >= 0 {
        base + Duration::from_secs(offset.unsigned_abs())
    } else {
        base - Duration::from_secs(offset.unsigned_abs())
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let value = match value.strip_prefix('@') {
            Some(offset) => httpdate::fmt_http_date(t(offset.parse().unwrap())),
            None => (*value).to_string(),
        };
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(&value).unwrap(),
        );
    }
    map
}

fn store(
    method: Method,
    request: &[(&str, &str)],
    status: u16,
    response: &[(&str, &str)],
    options: StoreOptions,
) -> Result<(), NotStorable> {
    let request_headers = headers(request);
    let response_headers = headers(response);
    may_store(
        &Exchange {
            method: &method,
            request_headers: &request_headers,
            status: StatusCode::from_u16(status).unwrap(),
            response_headers: &response_headers,
        },
        &RequestDirectives::parse(&request_headers),
        &ResponseDirectives::parse(&response_headers),
        &options,
        t(0),
    )
}

macro_rules! storing {
    ($($name:ident: $method:ident [$($request:expr),*] $status:literal [$($response:expr),*] $(, $options:expr)? => $expected:expr;)*) => {$(
        #[test]
        fn $name() {
            #[allow(unused_mut, unused_assignments)]
            let mut options = StoreOptions::default();
            $(options = $options;)?
            assert_eq!(
                store(Method::$method, &[$($request),*], $status, &[$($response),*], options),
                $expected
            );
        }
    )*};
}

storing! {
    rfc9111_3_a_get_200_with_max_age_is_stored: GET [] 200 [("cache-control", "max-age=60")] => Ok(());
    rfc9111_3_only_get_responses_are_stored: POST [] 200 [("cache-control", "max-age=60")] => Err(NotStorable::Method);
    rfc9111_3_head_responses_are_not_stored_the_get_answers_head: HEAD [] 200 [("cache-control", "max-age=60")] => Err(NotStorable::Method);
    rfc9111_3_a_partial_206_is_not_stored: GET [] 206 [("cache-control", "max-age=60")] => Err(NotStorable::Status);
    rfc9111_3_a_304_is_not_stored_as_such: GET [] 304 [("cache-control", "max-age=60")] => Err(NotStorable::Status);
    rfc9111_5_2_1_5_a_request_no_store_keeps_the_response_out: GET [("cache-control", "no-store")] 200 [("cache-control", "max-age=60")] => Err(NotStorable::RequestNoStore);
    rfc9111_5_2_2_5_a_response_no_store_is_not_stored: GET [] 200 [("cache-control", "max-age=60, no-store")] => Err(NotStorable::NoStore);
    rfc9111_5_2_directive_names_are_case_insensitive: GET [] 200 [("cache-control", "Max-Age=60, NO-STORE")] => Err(NotStorable::NoStore);
    rfc9111_5_2_directives_on_several_lines_all_count: GET [] 200 [("cache-control", "max-age=60"), ("cache-control", "no-store")] => Err(NotStorable::NoStore);
    rfc9111_5_2_2_7_private_is_not_stored_by_a_shared_cache: GET [] 200 [("cache-control", "private, max-age=60")] => Err(NotStorable::Private);
    rfc9111_5_2_2_7_a_qualified_private_is_not_stored_either: GET [] 200 [("cache-control", "private=\"set-cookie\", max-age=60")] => Err(NotStorable::Private);
    rfc9111_5_2_2_3_must_understand_with_a_known_status_overrides_no_store: GET [] 200 [("cache-control", "must-understand, no-store, max-age=60")] => Ok(());
    rfc9111_5_2_2_3_must_understand_with_an_unknown_status_is_not_stored: GET [] 299 [("cache-control", "must-understand, no-store, max-age=60")] => Err(NotStorable::MustUnderstand);
    rfc9111_3_5_a_request_with_authorization_is_not_stored_by_default: GET [("authorization", "Bearer x")] 200 [("cache-control", "max-age=60")] => Err(NotStorable::Authorization);
    rfc9111_3_5_authorization_with_public_is_stored: GET [("authorization", "Bearer x")] 200 [("cache-control", "public, max-age=60")] => Ok(());
    rfc9111_3_5_authorization_with_s_maxage_is_stored: GET [("authorization", "Bearer x")] 200 [("cache-control", "s-maxage=60")] => Ok(());
    rfc9111_3_5_authorization_with_must_revalidate_is_stored: GET [("authorization", "Bearer x")] 200 [("cache-control", "must-revalidate, max-age=60")] => Ok(());
    rfc9111_7_3_set_cookie_is_not_stored_unless_configured: GET [] 200 [("cache-control", "max-age=60"), ("set-cookie", "id=1")] => Err(NotStorable::SetCookie);
    rfc9111_7_3_set_cookie_is_stored_when_configured: GET [] 200 [("cache-control", "max-age=60"), ("set-cookie", "id=1")], StoreOptions { store_set_cookie: true, default_ttl: None } => Ok(());
    rfc9111_4_1_vary_star_is_not_stored_since_it_never_matches: GET [] 200 [("cache-control", "max-age=60"), ("vary", "*")] => Err(NotStorable::Vary);
    rfc9111_3_a_response_without_freshness_or_heuristic_status_is_not_stored: GET [] 302 [("location", "/x")] => Err(NotStorable::NoFreshness);
    rfc9111_3_explicit_freshness_makes_other_statuses_storable: GET [] 302 [("location", "/x"), ("cache-control", "max-age=60")] => Ok(());
    rfc9111_4_2_2_a_heuristically_cacheable_status_with_last_modified_is_stored: GET [] 200 [("date", "@0"), ("last-modified", "@-86400")] => Ok(());
    rfc9111_3_a_200_with_nothing_to_reuse_it_by_is_not_stored: GET [] 200 [("content-type", "text/plain")] => Err(NotStorable::NoFreshness);
    rfc9111_5_3_expires_makes_a_response_storable: GET [] 200 [("date", "@0"), ("expires", "@60")] => Ok(());
    rfc9111_5_2_2_4_no_cache_with_a_validator_is_stored_for_revalidation: GET [] 200 [("cache-control", "no-cache"), ("etag", "\"v1\""), ("last-modified", "@-60")] => Ok(());
    rfc9111_5_2_2_9_public_with_a_validator_is_storable: GET [] 200 [("cache-control", "public"), ("etag", "\"v1\"")] => Ok(());
    rfc9111_3_a_configured_default_ttl_is_a_cache_extension: GET [] 200 [("content-type", "text/plain")], StoreOptions { store_set_cookie: false, default_ttl: Some(Duration::from_secs(60)) } => Ok(());
}

fn freshness(status: u16, response: &[(&str, &str)]) -> Freshness {
    Freshness::new(
        StatusCode::from_u16(status).unwrap(),
        &headers(response),
        t(0),
        t(0),
        None,
    )
}

macro_rules! lifetime {
    ($($name:ident: $status:literal [$($response:expr),*] => $seconds:expr;)*) => {$(
        #[test]
        fn $name() {
            assert_eq!(
                freshness($status, &[$($response),*]).lifetime,
                Duration::from_secs($seconds)
            );
        }
    )*};
}

lifetime! {
    rfc9111_4_2_1_s_maxage_wins_over_max_age_for_a_shared_cache: 200 [("cache-control", "max-age=60, s-maxage=120")] => 120;
    rfc9111_4_2_1_max_age_wins_over_expires: 200 [("cache-control", "max-age=60"), ("date", "@0"), ("expires", "@3600")] => 60;
    rfc9111_4_2_1_expires_minus_date_without_max_age: 200 [("date", "@0"), ("expires", "@300")] => 300;
    rfc9111_4_2_1_expires_counts_from_date_not_from_arrival: 200 [("date", "@-100"), ("expires", "@200")] => 300;
    rfc9111_5_3_an_invalid_expires_such_as_0_is_in_the_past: 200 [("date", "@0"), ("expires", "0")] => 0;
    rfc9111_4_2_1_two_expires_lines_make_the_response_stale: 200 [("date", "@0"), ("expires", "@300"), ("expires", "@600")] => 0;
    rfc9111_4_2_1_the_first_max_age_counts: 200 [("cache-control", "max-age=60, max-age=10")] => 60;
    rfc9111_4_2_1_an_invalid_max_age_makes_the_response_stale: 200 [("cache-control", "max-age=soon")] => 0;
    rfc9111_1_2_2_a_huge_delta_seconds_is_two_to_the_31: 200 [("cache-control", "max-age=99999999999999999999")] => 1 << 31;
    rfc9111_4_2_2_heuristic_freshness_is_a_tenth_since_last_modification: 200 [("date", "@0"), ("last-modified", "@-36000")] => 3600;
    rfc9111_4_2_2_heuristic_freshness_is_capped: 200 [("date", "@0"), ("last-modified", "@-100000000")] => HEURISTIC_MAX.as_secs();
    rfc9111_4_2_2_no_heuristic_for_a_status_not_heuristically_cacheable: 302 [("date", "@0"), ("last-modified", "@-36000")] => 0;
    rfc9111_4_2_2_no_heuristic_when_the_response_has_explicit_freshness: 200 [("cache-control", "max-age=5"), ("date", "@0"), ("last-modified", "@-36000")] => 5;
    rfc9111_4_2_1_a_missing_date_is_the_time_of_arrival: 200 [("expires", "@90")] => 90;
}

#[test]
fn rfc9111_4_2_2_a_heuristic_lifetime_is_marked_as_such() {
    let heuristic = freshness(200, &[("date", "@0"), ("last-modified", "@-36000")]);
    assert!(heuristic.heuristic);
    assert!(!freshness(200, &[("cache-control", "max-age=5")]).heuristic);
}

#[test]
fn rfc9111_4_2_3_age_adds_the_age_header_the_round_trip_and_the_time_in_cache() {
    // Sent at T0, answered at T0+2 with Age: 10: it was at least 12 s old on arrival.
    let stored = Freshness::new(
        StatusCode::OK,
        &headers(&[
            ("date", "@2"),
            ("age", "10"),
            ("cache-control", "max-age=60"),
        ]),
        t(0),
        t(2),
        None,
    );
    assert_eq!(stored.corrected_initial_age, Duration::from_secs(12));
    assert_eq!(stored.age(t(7)), Duration::from_secs(17));
    assert_eq!(stored.ttl_seconds(t(7)), 43);
    assert_eq!(stored.ttl_seconds(t(100)), -50);
}

#[test]
fn rfc9111_4_2_3_apparent_age_comes_from_date() {
    let stored = Freshness::new(
        StatusCode::OK,
        &headers(&[("date", "@-30"), ("cache-control", "max-age=60")]),
        t(0),
        t(0),
        None,
    );
    assert_eq!(stored.age(t(0)), Duration::from_secs(30));
}

#[test]
fn rfc9111_4_2_3_a_date_in_the_future_gives_no_negative_age() {
    let stored = Freshness::new(
        StatusCode::OK,
        &headers(&[("date", "@500"), ("cache-control", "max-age=60")]),
        t(0),
        t(0),
        None,
    );
    assert_eq!(stored.age(t(0)), Duration::ZERO);
}

#[test]
fn rfc9111_5_1_an_invalid_age_is_ignored() {
    let stored = Freshness::new(
        StatusCode::OK,
        &headers(&[("age", "old"), ("cache-control", "max-age=60")]),
        t(0),
        t(0),
        None,
    );
    assert_eq!(stored.age(t(0)), Duration::ZERO);
}

/// Reuse of a response stored at T0 with `response` headers, for a request with `request`
/// headers at T0 + `at` seconds.
fn reuse_at(response: &[(&str, &str)], request: &[(&str, &str)], at: i64) -> Reuse {
    let stored = freshness(200, response);
    reuse(&stored, &RequestDirectives::parse(&headers(request)), t(at))
}

macro_rules! reusing {
    ($($name:ident: [$($response:expr),*] [$($request:expr),*] at $at:literal => $expected:ident;)*) => {$(
        #[test]
        fn $name() {
            assert_eq!(reuse_at(&[$($response),*], &[$($request),*], $at), Reuse::$expected);
        }
    )*};
}

reusing! {
    rfc9111_4_2_a_fresh_response_is_reused: [("cache-control", "max-age=60")] [] at 30 => Fresh;
    rfc9111_4_2_4_a_stale_response_is_revalidated: [("cache-control", "max-age=60")] [] at 61 => Revalidate;
    rfc9111_4_2_the_response_is_stale_once_its_age_equals_its_lifetime: [("cache-control", "max-age=60")] [] at 60 => Revalidate;
    rfc9111_5_2_2_4_no_cache_is_revalidated_even_when_fresh: [("cache-control", "no-cache, max-age=60")] [] at 1 => Revalidate;
    rfc9111_5_2_1_4_a_request_no_cache_revalidates: [("cache-control", "max-age=60")] [("cache-control", "no-cache")] at 1 => Revalidate;
    rfc9111_5_4_a_pragma_no_cache_request_without_cache_control_revalidates: [("cache-control", "max-age=60")] [("pragma", "no-cache")] at 1 => Revalidate;
    rfc9111_5_4_pragma_is_ignored_when_cache_control_is_present: [("cache-control", "max-age=60")] [("pragma", "no-cache"), ("cache-control", "max-stale")] at 1 => Fresh;
    rfc9111_5_2_1_1_a_request_max_age_below_the_age_revalidates: [("cache-control", "max-age=60")] [("cache-control", "max-age=10")] at 20 => Revalidate;
    rfc9111_5_2_1_1_a_request_max_age_above_the_age_reuses: [("cache-control", "max-age=60")] [("cache-control", "max-age=30")] at 20 => Fresh;
    rfc9111_5_2_1_3_min_fresh_wants_that_much_freshness_left: [("cache-control", "max-age=60")] [("cache-control", "min-fresh=50")] at 20 => Revalidate;
    rfc9111_5_2_1_3_min_fresh_met_reuses: [("cache-control", "max-age=60")] [("cache-control", "min-fresh=30")] at 20 => Fresh;
    rfc9111_5_2_1_2_max_stale_without_a_value_accepts_any_staleness: [("cache-control", "max-age=60")] [("cache-control", "max-stale")] at 6000 => StaleAccepted;
    rfc9111_5_2_1_2_max_stale_accepts_that_much_staleness: [("cache-control", "max-age=60")] [("cache-control", "max-stale=10")] at 65 => StaleAccepted;
    rfc9111_5_2_1_2_max_stale_exceeded_revalidates: [("cache-control", "max-age=60")] [("cache-control", "max-stale=10")] at 80 => Revalidate;
    rfc9111_5_2_2_2_must_revalidate_forbids_serving_stale: [("cache-control", "max-age=60, must-revalidate")] [("cache-control", "max-stale")] at 61 => Revalidate;
    rfc9111_5_2_2_8_proxy_revalidate_forbids_a_shared_cache_serving_stale: [("cache-control", "max-age=60, proxy-revalidate")] [("cache-control", "max-stale")] at 61 => Revalidate;
    rfc9111_5_2_2_10_s_maxage_implies_proxy_revalidate: [("cache-control", "s-maxage=60")] [("cache-control", "max-stale")] at 61 => Revalidate;
    rfc5861_3_stale_while_revalidate_serves_stale_within_its_window: [("cache-control", "max-age=60, stale-while-revalidate=30")] [] at 80 => StaleWhileRevalidate;
    rfc5861_3_past_the_stale_while_revalidate_window_it_revalidates: [("cache-control", "max-age=60, stale-while-revalidate=30")] [] at 91 => Revalidate;
    rfc5861_3_stale_while_revalidate_yields_to_must_revalidate: [("cache-control", "max-age=60, stale-while-revalidate=30, must-revalidate")] [] at 80 => Revalidate;
}

fn stale_on_error(response: &[(&str, &str)], request: &[(&str, &str)], at: i64) -> bool {
    let stored = freshness(200, response);
    may_serve_stale_on_error(&stored, &RequestDirectives::parse(&headers(request)), t(at))
}

#[test]
fn rfc5861_4_stale_if_error_serves_stale_within_its_window_when_the_backend_fails() {
    let response = [("cache-control", "max-age=60, stale-if-error=300")];
    assert!(stale_on_error(&response, &[], 300));
    assert!(!stale_on_error(&response, &[], 400));
}

#[test]
fn rfc5861_4_a_request_stale_if_error_works_too() {
    let response = [("cache-control", "max-age=60")];
    assert!(!stale_on_error(&response, &[], 100));
    assert!(stale_on_error(
        &response,
        &[("cache-control", "stale-if-error=60")],
        100
    ));
}

#[test]
fn rfc5861_4_stale_if_error_yields_to_must_revalidate() {
    let response = [(
        "cache-control",
        "max-age=60, stale-if-error=300, must-revalidate",
    )];
    assert!(!stale_on_error(&response, &[], 100));
}

#[test]
fn rfc5861_4_errors_are_500_502_503_and_504() {
    for status in [500, 502, 503, 504] {
        assert!(is_error_status(StatusCode::from_u16(status).unwrap()));
    }
    for status in [200, 404, 501, 505] {
        assert!(!is_error_status(StatusCode::from_u16(status).unwrap()));
    }
}

fn not_modified(request: &[(&str, &str)], stored: &[(&str, &str)]) -> bool {
    validation::not_modified(&headers(request), &headers(stored), t(0))
}

#[test]
fn rfc9110_13_1_2_if_none_match_uses_weak_comparison() {
    let stored = [("etag", "W/\"v1\"")];
    assert!(not_modified(&[("if-none-match", "\"v1\"")], &stored));
    assert!(not_modified(
        &[("if-none-match", "\"v0\", W/\"v1\"")],
        &stored
    ));
    assert!(!not_modified(&[("if-none-match", "\"v2\"")], &stored));
}

#[test]
fn rfc9110_13_1_2_if_none_match_star_matches_any_stored_response() {
    assert!(not_modified(&[("if-none-match", "*")], &[]));
}

#[test]
fn rfc9110_13_2_2_if_none_match_takes_precedence_over_if_modified_since() {
    let stored = [("etag", "\"v1\""), ("last-modified", "@-100")];
    assert!(!not_modified(
        &[("if-none-match", "\"v2\""), ("if-modified-since", "@0")],
        &stored
    ));
}

#[test]
fn rfc9110_13_1_3_if_modified_since_compares_with_last_modified() {
    let stored = [("last-modified", "@-100")];
    assert!(not_modified(&[("if-modified-since", "@-100")], &stored));
    assert!(not_modified(&[("if-modified-since", "@0")], &stored));
    assert!(!not_modified(&[("if-modified-since", "@-200")], &stored));
    assert!(!not_modified(
        &[("if-modified-since", "yesterday")],
        &stored
    ));
}

#[test]
fn rfc9111_4_3_2_without_last_modified_the_stored_date_is_used() {
    let stored = [("date", "@-50")];
    assert!(not_modified(&[("if-modified-since", "@-50")], &stored));
    assert!(!not_modified(&[("if-modified-since", "@-60")], &stored));
}

#[test]
fn rfc9110_15_4_5_a_304_carries_the_validators_and_caching_fields() {
    let stored = headers(&[
        ("etag", "\"v1\""),
        ("cache-control", "max-age=60"),
        ("vary", "accept-encoding"),
        ("date", "@0"),
        ("content-type", "text/html"),
        ("content-length", "10"),
    ]);
    let answer = validation::not_modified_headers(&stored);
    for kept in ["etag", "cache-control", "vary", "date"] {
        assert!(answer.contains_key(kept), "{kept}");
    }
    assert!(!answer.contains_key("content-length"));
    assert!(!answer.contains_key("content-type"));
}

#[test]
fn rfc9111_4_3_1_revalidation_sends_the_stored_validators() {
    let conditions =
        validation::revalidation_headers(&headers(&[("etag", "\"v1\""), ("last-modified", "@-9")]));
    let names: Vec<&str> = conditions.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["if-none-match", "if-modified-since"]);
    assert_eq!(conditions[0].1, "\"v1\"");
}

#[test]
fn rfc9111_3_2_a_304_updates_the_stored_fields_but_not_content_length() {
    let mut stored = headers(&[
        ("cache-control", "max-age=60"),
        ("date", "@0"),
        ("content-length", "10"),
        ("content-type", "text/plain"),
        ("x-old", "1"),
        ("age", "100"),
    ]);
    let answer = headers(&[
        ("cache-control", "max-age=120"),
        ("date", "@100"),
        ("content-length", "0"),
        ("connection", "x-hop"),
        ("x-hop", "a"),
        ("keep-alive", "timeout=5"),
    ]);
    validation::freshen(&mut stored, &answer);
    assert_eq!(stored["cache-control"], "max-age=120");
    assert_eq!(stored["content-length"], "10");
    assert_eq!(stored["content-type"], "text/plain");
    assert_eq!(stored["x-old"], "1");
    assert!(!stored.contains_key("x-hop"));
    assert!(!stored.contains_key("keep-alive"));
    assert!(!stored.contains_key("connection"));
    // The first response's age does not outlive its validation.
    assert!(!stored.contains_key("age"));
}

#[test]
fn rfc9111_4_3_4_a_304_updates_the_response_its_validator_names() {
    let stored = headers(&[("etag", "\"v1\"")]);
    assert!(validation::selects_stored(
        &headers(&[("etag", "\"v1\"")]),
        &stored
    ));
    assert!(!validation::selects_stored(
        &headers(&[("etag", "\"v2\"")]),
        &stored
    ));
    assert!(validation::selects_stored(&HeaderMap::new(), &stored));
}

#[test]
fn rfc9111_4_1_a_stored_variant_answers_only_requests_with_the_same_vary_fields() {
    let response = headers(&[("vary", "Accept-Encoding")]);
    let fields = vary_fields(&response).unwrap();
    let stored = secondary_key(&fields, &headers(&[("accept-encoding", "gzip")]));
    assert!(variant_matches(
        &fields,
        &stored,
        &headers(&[("accept-encoding", "gzip"), ("accept-language", "fr")])
    ));
    assert!(!variant_matches(
        &fields,
        &stored,
        &headers(&[("accept-encoding", "br")])
    ));
    assert!(!variant_matches(&fields, &stored, &HeaderMap::new()));
}

#[test]
fn rfc9111_4_1_vary_values_are_normalised() {
    let fields = vary_fields(&headers(&[("vary", "accept-language")])).unwrap();
    let stored = secondary_key(&fields, &headers(&[("accept-language", "fr,  en")]));
    assert!(variant_matches(
        &fields,
        &stored,
        &headers(&[("accept-language", "fr"), ("accept-language", "en")])
    ));
}

fn invalidated(method: Method, status: u16, response: &[(&str, &str)]) -> Vec<String> {
    invalidate::invalidated_paths(
        &method,
        StatusCode::from_u16(status).unwrap(),
        "example.com",
        "/items/7",
        &headers(response),
    )
}

#[test]
fn rfc9111_4_4_a_successful_unsafe_method_invalidates_its_target() {
    assert_eq!(invalidated(Method::POST, 200, &[]), ["/items/7"]);
    assert_eq!(invalidated(Method::DELETE, 204, &[]), ["/items/7"]);
    assert_eq!(invalidated(Method::PUT, 303, &[]), ["/items/7"]);
    assert_eq!(invalidated(Method::PATCH, 200, &[]), ["/items/7"]);
}

#[test]
fn rfc9111_4_4_location_and_content_location_of_the_same_origin_are_invalidated() {
    assert_eq!(
        invalidated(
            Method::POST,
            201,
            &[
                ("location", "http://example.com/items/8"),
                ("content-location", "9")
            ]
        ),
        ["/items/7", "/items/8", "/items/9"]
    );
}

#[test]
fn rfc9111_4_4_other_origins_are_never_invalidated() {
    assert_eq!(
        invalidated(
            Method::POST,
            201,
            &[
                ("location", "https://other.example/items/8"),
                ("content-location", "//other.example/x")
            ]
        ),
        ["/items/7"]
    );
}

#[test]
fn rfc9111_4_4_an_error_response_invalidates_nothing() {
    assert!(invalidated(Method::POST, 500, &[]).is_empty());
    assert!(invalidated(Method::DELETE, 404, &[]).is_empty());
}

#[test]
fn rfc9111_4_4_safe_methods_invalidate_nothing() {
    assert!(invalidated(Method::GET, 200, &[]).is_empty());
    assert!(invalidated(Method::HEAD, 200, &[]).is_empty());
}

fn range_of(request: &[(&str, &str)], stored: &[(&str, &str)]) -> RangeAnswer {
    range::evaluate(&headers(request), &headers(stored), 1000)
}

#[test]
fn rfc9110_14_1_2_byte_ranges_first_last_open_and_suffix() {
    let partial = |first, last| RangeAnswer::Partial { first, last };
    assert_eq!(range_of(&[("range", "bytes=0-99")], &[]), partial(0, 99));
    assert_eq!(range_of(&[("range", "bytes=500-")], &[]), partial(500, 999));
    assert_eq!(range_of(&[("range", "bytes=-100")], &[]), partial(900, 999));
    assert_eq!(range_of(&[("range", "bytes=-5000")], &[]), partial(0, 999));
    assert_eq!(
        range_of(&[("range", "bytes=990-5000")], &[]),
        partial(990, 999)
    );
    assert_eq!(
        partial(0, 99).content_range(1000).as_deref(),
        Some("bytes 0-99/1000")
    );
}

#[test]
fn rfc9110_15_5_17_a_range_past_the_end_is_unsatisfiable() {
    assert_eq!(
        range_of(&[("range", "bytes=1000-")], &[]),
        RangeAnswer::Unsatisfiable
    );
    assert_eq!(
        range_of(&[("range", "bytes=-0")], &[]),
        RangeAnswer::Unsatisfiable
    );
    assert_eq!(
        RangeAnswer::Unsatisfiable.content_range(1000).as_deref(),
        Some("bytes */1000")
    );
}

#[test]
fn rfc9110_14_2_an_unusable_range_is_ignored() {
    for ignored in [
        "items=0-9",
        "bytes=9-5",
        "bytes=a-b",
        "bytes=0-1,5-6",
        "bytes",
    ] {
        assert_eq!(
            range_of(&[("range", ignored)], &[]),
            RangeAnswer::Full,
            "{ignored}"
        );
    }
}

#[test]
fn rfc9110_13_1_5_if_range_needs_a_strong_match() {
    let stored = [("etag", "\"v1\""), ("last-modified", "@-100")];
    let partial = RangeAnswer::Partial { first: 0, last: 9 };
    assert_eq!(
        range_of(&[("range", "bytes=0-9"), ("if-range", "\"v1\"")], &stored),
        partial
    );
    assert_eq!(
        range_of(&[("range", "bytes=0-9"), ("if-range", "\"v0\"")], &stored),
        RangeAnswer::Full
    );
    assert_eq!(
        range_of(&[("range", "bytes=0-9"), ("if-range", "W/\"v1\"")], &stored),
        RangeAnswer::Full
    );
    assert_eq!(
        range_of(&[("range", "bytes=0-9"), ("if-range", "@-100")], &stored),
        partial
    );
    assert_eq!(
        range_of(&[("range", "bytes=0-9"), ("if-range", "@-99")], &stored),
        RangeAnswer::Full
    );
}

#[test]
fn rfc9211_2_cache_status_names_its_cache_and_parameters() {
    let hit = CacheStatus {
        hit: true,
        ttl: Some(12),
        ..CacheStatus::default()
    };
    assert_eq!(hit.to_field_value("Bouncer"), "Bouncer; hit; ttl=12");
    let revalidated = CacheStatus {
        forward: Some(Forward::Stale),
        forward_status: Some(304),
        ttl: Some(60),
        stored: true,
        ..CacheStatus::default()
    };
    assert_eq!(
        revalidated.to_field_value("Bouncer"),
        "Bouncer; fwd=stale; fwd-status=304; ttl=60; stored"
    );
    for (forward, token) in [
        (Forward::Bypass, "bypass"),
        (Forward::UriMiss, "uri-miss"),
        (Forward::VaryMiss, "vary-miss"),
        (Forward::Miss, "miss"),
        (Forward::Stale, "stale"),
        (Forward::Request, "request"),
    ] {
        assert_eq!(forward.token(), token);
    }
}
