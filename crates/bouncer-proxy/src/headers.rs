//! Header work at the proxy boundary: hop-by-hop removal, the forwarding headers, the request id,
//! and the one place that decides which address the client has.

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use bouncer_config::{ListenerConfig, canonical_ip};
use bouncer_rules::is_token;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Removes the headers that describe one hop (RFC 9110 section 7.6.1), including every header the
/// `Connection` header names. `keep_upgrade` keeps `Upgrade` and `Connection: upgrade` for a
/// WebSocket handshake; `TE: trailers` is kept because it is end-to-end in meaning (gRPC needs it).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names tells which are present; most messages carry none, or only
    // `Connection: keep-alive`, and then nothing is hashed or allocated.
    let mut present = HopByHop::default();
    for name in headers.keys() {
        present.note(name);
    }
    if present == HopByHop::default() {
        return;
    }
    if present.connection {
        // Names listed in `Connection` other than those removed below anyway. `close` and
        // `keep-alive` are options, not names, and the usual case.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                let usual = token.is_empty()
                    || token.eq_ignore_ascii_case(b"close")
                    || token.eq_ignore_ascii_case(b"keep-alive")
                    || token.eq_ignore_ascii_case(b"upgrade")
                    || token.eq_ignore_ascii_case(b"te");
                if !usual && let Ok(name) = HeaderName::from_bytes(token) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    if present.keep_alive {
        headers.remove(&KEEP_ALIVE);
    }
    if present.transfer_encoding {
        headers.remove(header::TRANSFER_ENCODING);
        // A length beside a transfer coding does not describe the message, and a sender must not
        // pass it on (RFC 9112 section 6.3); the next hop frames the message afresh.
        headers.remove(header::CONTENT_LENGTH);
    }
    if present.upgrade && !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    if present.te {
        let te_is_trailers = headers
            .get(header::TE)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"trailers"));
        if !te_is_trailers {
            headers.remove(header::TE);
        }
    }
    if present.proxy {
        let proxy_headers: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy_headers {
            headers.remove(name);
        }
    }
}

/// Which hop-by-hop headers a message has.
#[derive(Debug, Default, PartialEq, Eq)]
struct HopByHop {
    connection: bool,
    keep_alive: bool,
    transfer_encoding: bool,
    upgrade: bool,
    te: bool,
    proxy: bool,
}

impl HopByHop {
    fn note(&mut self, name: &HeaderName) {
        if name == header::CONNECTION {
            self.connection = true;
        } else if name == KEEP_ALIVE {
            self.keep_alive = true;
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if name == header::UPGRADE {
            self.upgrade = true;
        } else if name == header::TE {
            self.te = true;
        } else if name.as_str().starts_with("proxy-") {
            self.proxy = true;
        }
    }
}

/// Who the client is, decided once per request from the socket peer, the listener's trusted
/// proxies and the forwarding headers; every later feature (logs, limits, bans) uses this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress {
    /// The client as best known: the socket peer, or what a trusted proxy reported.
    pub ip: IpAddr,
    /// The TCP peer the request came from.
    pub peer: SocketAddr,
    /// Whether the peer is a trusted proxy whose forwarding headers are believed.
    pub peer_trusted: bool,
}

impl ClientAddress {
    pub fn resolve(peer: SocketAddr, listener: &ListenerConfig, headers: &HeaderMap) -> Self {
        let peer_ip = canonical_ip(peer.ip());
        let peer_trusted = !listener.trusted_proxies.is_empty() && listener.trusts(peer_ip);
        let ip = if peer_trusted {
            client_from_forwarded_for(listener, headers).unwrap_or(peer_ip)
        } else {
            peer_ip
        };
        Self {
            ip,
            peer,
            peer_trusted,
        }
    }
}

/// Walks `X-Forwarded-For` from the right, skipping trusted proxies; the first untrusted address is
/// the client. Addresses further left were written by that client and cannot be believed.
fn client_from_forwarded_for(listener: &ListenerConfig, headers: &HeaderMap) -> Option<IpAddr> {
    let mut last_trusted = None;
    let mut values: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .collect();
    values.reverse();
    for entry in values {
        let ip = parse_forwarded_ip(entry.trim())?;
        let ip = canonical_ip(ip);
        if !listener.trusts(ip) {
            return Some(ip);
        }
        last_trusted = Some(ip);
    }
    last_trusted
}

/// Accepts `1.2.3.4`, `1.2.3.4:5678`, `::1` and `[::1]:5678`.
fn parse_forwarded_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim_matches('"');
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(address.ip());
    }
    text.strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|inner| inner.parse().ok())
}

/// What the forwarding headers say about this hop.
pub struct ForwardingFacts<'a> {
    pub client: &'a ClientAddress,
    /// The socket peer's address as a header value (made once per connection).
    pub peer: &'a HeaderValue,
    /// The socket peer as a `Forwarded` node, `for=...` (made once per connection).
    pub forwarded_for: &'a [u8],
    /// The host as the client sent it (`Host` or `:authority`), port included.
    pub host: &'a HeaderValue,
    pub scheme: &'static str,
    pub version: http::Version,
}

/// The socket peer's address as it appears in `X-Forwarded-For`.
pub fn peer_header(peer: SocketAddr) -> HeaderValue {
    let ip = canonical_ip(peer.ip());
    // An IP address's text is always a valid header value.
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The socket peer as the `for=` parameter of `Forwarded`; RFC 7239 section 6 wants IPv6 addresses
/// quoted and bracketed.
pub fn forwarded_for(peer: SocketAddr) -> bytes::Bytes {
    match canonical_ip(peer.ip()) {
        IpAddr::V4(v4) => format!("for={v4}").into(),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\"").into(),
    }
}

/// Sets `X-Forwarded-For`, `-Proto`, `-Host`, `Forwarded` and `Via`. From a trusted peer the chain
/// is extended; from anyone else whatever the client sent is dropped, so that it cannot forge its
/// address.
pub fn set_forwarding_headers(headers: &mut HeaderMap, facts: &ForwardingFacts<'_>) {
    let scheme = HeaderValue::from_static(facts.scheme);
    if facts.client.peer_trusted {
        append_comma_separated(headers, &X_FORWARDED_FOR, facts.peer);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), scheme);
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST.clone(), facts.host.clone());
        }
    } else {
        headers.insert(X_FORWARDED_FOR.clone(), facts.peer.clone());
        headers.insert(X_FORWARDED_PROTO.clone(), scheme);
        headers.insert(X_FORWARDED_HOST.clone(), facts.host.clone());
    }

    let mut forwarded = BytesMut::with_capacity(facts.forwarded_for.len() + facts.host.len() + 24);
    write_forwarded(&mut forwarded, facts);
    if let Ok(value) = HeaderValue::from_maybe_shared(forwarded.freeze()) {
        if facts.client.peer_trusted {
            append_comma_separated(headers, &header::FORWARDED, &value);
        } else {
            // Whatever an untrusted client sent is replaced.
            headers.insert(header::FORWARDED, value);
        }
    }
    append_comma_separated(
        headers,
        &header::VIA,
        &HeaderValue::from_static(via(facts.version)),
    );
}

/// This hop's `Forwarded` element: `for=...;host=...;proto=...`.
fn write_forwarded(out: &mut impl BufMut, facts: &ForwardingFacts<'_>) {
    let host = facts.host.as_bytes();
    out.put_slice(facts.forwarded_for);
    if is_token(host) {
        out.put_slice(b";host=");
        out.put_slice(host);
    } else {
        out.put_slice(b";host=\"");
        out.put_slice(host);
        out.put_slice(b"\"");
    }
    out.put_slice(b";proto=");
    out.put_slice(facts.scheme.as_bytes());
}

/// This hop's `Via` element.
fn via(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_2 => "2 bouncer",
        http::Version::HTTP_10 => "1.0 bouncer",
        _ => "1.1 bouncer",
    }
}

/// The forwarding fields and the request id of a request from a peer that is not trusted, kept
/// out of its map: whoever writes the request writes them too. Five insertions into the map, each
/// a hash and a probe, are then spared. Only for a request whose map has none of these fields, so
/// that nothing the client sent needs replacing or extending (the lean server says so, see
/// `LeanFacts`).
pub struct DeferredFields<'a> {
    pub facts: ForwardingFacts<'a>,
    pub request_id: &'a HeaderValue,
}

impl DeferredFields<'_> {
    /// Writes the fields as request field lines, as `put_in` would put them in the map. The
    /// fixed parts go in few pieces: each piece is a call to `memcpy`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let facts = &self.facts;
        let (scheme, host) = (facts.scheme.as_bytes(), facts.host.as_bytes());
        out.reserve(160 + facts.peer.len() + 2 * host.len() + self.request_id.len());
        out.extend_from_slice(b"x-forwarded-for: ");
        out.extend_from_slice(facts.peer.as_bytes());
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(scheme);
        out.extend_from_slice(b"\r\nx-forwarded-host: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\nforwarded: ");
        write_forwarded(out, facts);
        out.extend_from_slice(b"\r\nvia: ");
        out.extend_from_slice(via(facts.version).as_bytes());
        out.extend_from_slice(b"\r\nx-request-id: ");
        out.extend_from_slice(self.request_id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// Puts the fields in `headers`, for a writer that knows only the map. Once: a request that
    /// comes back unsent, to go elsewhere, keeps them (and `Via` would otherwise grow).
    pub fn put_in(&self, headers: &mut HeaderMap) {
        if headers.contains_key(&X_REQUEST_ID) {
            return;
        }
        set_forwarding_headers(headers, &self.facts);
        headers.insert(X_REQUEST_ID.clone(), self.request_id.clone());
    }
}

/// Joins every existing value of `name` and `addition` into one comma-separated value; when
/// there is none, `addition` is inserted as it is, without copying.
fn append_comma_separated(headers: &mut HeaderMap, name: &HeaderName, addition: &HeaderValue) {
    let mut existing = match headers.entry(name) {
        header::Entry::Vacant(vacant) => {
            vacant.insert(addition.clone());
            return;
        }
        header::Entry::Occupied(occupied) => occupied,
    };
    let mut joined = BytesMut::with_capacity(128);
    for value in existing.iter() {
        joined.extend_from_slice(value.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(addition.as_bytes());
    if let Ok(value) = HeaderValue::from_maybe_shared(joined.freeze()) {
        existing.insert(value);
    }
}

/// A request id as sent by a trusted peer is kept when it is sane; otherwise a fresh one is made.
pub fn request_id(headers: &HeaderMap, peer_trusted: bool) -> HeaderValue {
    if peer_trusted
        && let Some(existing) = headers.get(&X_REQUEST_ID)
        && !existing.is_empty()
        && existing.len() <= 200
        && existing.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return existing.clone();
    }
    new_request_id()
}

/// Request ids are cut from a per-thread block of memory: one allocation serves many requests, and
/// each id is a shared slice, so the copies in the request, the response and the log are free.
const REQUEST_ID_BLOCK: usize = 32 * 128;

thread_local! {
    static REQUEST_ID_BUFFER: std::cell::RefCell<BytesMut> =
        std::cell::RefCell::new(BytesMut::new());
}

fn new_request_id() -> HeaderValue {
    let id: u128 = rand::random();
    let mut text = [0u8; 32];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (index, byte) in text.iter_mut().enumerate() {
        let nibble = (id >> (124 - 4 * index)) & 0xf;
        *byte = HEX[nibble as usize];
    }
    let shared = REQUEST_ID_BUFFER.with_borrow_mut(|buffer| {
        if buffer.capacity() < text.len() {
            *buffer = BytesMut::with_capacity(REQUEST_ID_BLOCK);
        }
        buffer.extend_from_slice(&text);
        buffer.split_to(text.len()).freeze()
    });
    // Hex digits are always a valid header value.
    HeaderValue::from_maybe_shared(shared).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(trusted: &[&str]) -> ListenerConfig {
        ListenerConfig {
            name: "public".into(),
            bind: "127.0.0.1:0".parse().expect("addr"),
            trusted_proxies: trusted
                .iter()
                .map(|net| net.parse().expect("net"))
                .collect(),
            proxy_protocol: false,
            tls: None,
            redirect_to_https: None,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic x"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("transfer-encoding", "chunked"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut map, false);
        assert_eq!(map.len(), 1, "{map:?}");
        assert_eq!(map["x-kept"], "yes");

        let mut map = headers(&[("te", "trailers")]);
        remove_hop_by_hop(&mut map, false);
        assert_eq!(map["te"], "trailers");
    }

    #[test]
    fn an_untrusted_client_cannot_forge_its_address() {
        let peer: SocketAddr = "203.0.113.9:4000".parse().expect("addr");
        let mut map = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("forwarded", "for=1.1.1.1"),
            ("x-forwarded-proto", "https"),
        ]);
        let client = ClientAddress::resolve(peer, &listener(&["10.0.0.0/8"]), &map);
        assert_eq!(client.ip, peer.ip());
        set_forwarding_headers(
            &mut map,
            &ForwardingFacts {
                client: &client,
                peer: &peer_header(peer),
                forwarded_for: &forwarded_for(peer),
                host: &HeaderValue::from_static("app.example"),
                scheme: "http",
                version: http::Version::HTTP_11,
            },
        );
        assert_eq!(map["x-forwarded-for"], "203.0.113.9");
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(map["x-forwarded-host"], "app.example");
        assert_eq!(
            map["forwarded"],
            "for=203.0.113.9;host=app.example;proto=http"
        );
        assert_eq!(map["via"], "1.1 bouncer");
    }

    #[test]
    fn a_trusted_proxy_extends_the_chain() {
        let peer: SocketAddr = "10.0.0.2:4000".parse().expect("addr");
        let mut map = headers(&[
            ("x-forwarded-for", "198.51.100.7, 10.0.0.5"),
            ("forwarded", "for=198.51.100.7"),
        ]);
        let client = ClientAddress::resolve(peer, &listener(&["10.0.0.0/8"]), &map);
        assert_eq!(client.ip, "198.51.100.7".parse::<IpAddr>().expect("ip"));
        assert!(client.peer_trusted);
        set_forwarding_headers(
            &mut map,
            &ForwardingFacts {
                client: &client,
                peer: &peer_header(peer),
                forwarded_for: &forwarded_for(peer),
                host: &HeaderValue::from_static("h"),
                scheme: "https",
                version: http::Version::HTTP_2,
            },
        );
        assert_eq!(map["x-forwarded-for"], "198.51.100.7, 10.0.0.5, 10.0.0.2");
        assert_eq!(
            map["forwarded"],
            "for=198.51.100.7, for=10.0.0.2;host=h;proto=https"
        );
        assert_eq!(map["via"], "2 bouncer");
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let peer: SocketAddr = "10.0.0.2:4000".parse().expect("addr");
        let map = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7")]);
        let client = ClientAddress::resolve(peer, &listener(&["10.0.0.0/8"]), &map);
        assert_eq!(client.ip, "198.51.100.7".parse::<IpAddr>().expect("ip"));
        let garbage = headers(&[("x-forwarded-for", "not-an-ip")]);
        let client = ClientAddress::resolve(peer, &listener(&["10.0.0.0/8"]), &garbage);
        assert_eq!(client.ip, peer.ip());
    }

    #[test]
    fn fresh_request_ids_are_distinct_hex_across_buffer_blocks() {
        let count = 3 * REQUEST_ID_BLOCK / 32 + 5;
        let ids: std::collections::HashSet<Vec<u8>> = (0..count)
            .map(|_| new_request_id().as_bytes().to_vec())
            .collect();
        assert_eq!(ids.len(), count);
        assert!(
            ids.iter()
                .all(|id| id.len() == 32 && id.iter().all(u8::is_ascii_hexdigit))
        );
    }

    #[test]
    fn request_ids_are_kept_only_from_trusted_peers() {
        let map = headers(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&map, true), "abc-123");
        let fresh = request_id(&map, false);
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, request_id(&map, false));
    }
}
