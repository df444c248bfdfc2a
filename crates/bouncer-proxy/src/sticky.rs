//! Sticky sessions: a cookie that names the backend which served a client, so that its next
//! requests go there too. The cookie is signed with HMAC-SHA256, so a client can neither forge
//! one that names some other address nor extend its lifetime; with a shared secret it is valid
//! at every Bouncer instance and across restarts.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use http::HeaderValue;

use bouncer_config::StickyConfig;

use crate::balance::cookie_value;

pub struct StickyCookie {
    name: String,
    ttl: Option<Duration>,
    key: hmac::Key,
}

impl StickyCookie {
    pub fn new(config: &StickyConfig) -> Self {
        let key = match &config.secret {
            Some(secret) => hmac::Key::new(hmac::HMAC_SHA256, &secret.0),
            None => {
                tracing::warn!(cookie = %config.cookie, "sticky has no secret_file: cookies are signed with a key of this process alone and do not survive a restart");
                let random: [u8; 32] = rand::random();
                hmac::Key::new(hmac::HMAC_SHA256, &random)
            }
        };
        Self {
            name: config.cookie.clone(),
            ttl: config.ttl,
            key,
        }
    }

    /// The id that names the backend at `label` in cookies: keyed, so that a cookie does not tell
    /// the backend's address to whoever can guess the private address ranges.
    pub fn backend_id(&self, label: &str) -> u64 {
        let tag = hmac::sign(&self.key, format!("backend {label}").as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_be_bytes(id)
    }

    /// The backend id a valid, unexpired cookie in `headers` names.
    pub fn target(&self, headers: &http::HeaderMap) -> Option<u64> {
        let value = std::str::from_utf8(cookie_value(headers, &self.name)?).ok()?;
        let (signed, tag) = value.rsplit_once('.')?;
        let tag = decode_hex(tag)?;
        hmac::verify(&self.key, signed.as_bytes(), &tag).ok()?;
        let (id, expires) = signed.split_once('.')?;
        let expires = u64::from_str_radix(expires, 16).ok()?;
        if expires != 0 && expires < unix_now() {
            return None;
        }
        u64::from_str_radix(id, 16).ok()
    }

    /// A `Set-Cookie` value that sends the client back to backend `id`.
    pub fn set_cookie(&self, id: u64, secure: bool) -> Option<HeaderValue> {
        let expires = self
            .ttl
            .map_or(0, |ttl| unix_now().saturating_add(ttl.as_secs()));
        let signed = format!("{id:016x}.{expires:x}");
        let tag = hmac::sign(&self.key, signed.as_bytes());
        let mut cookie = format!("{}={signed}.", self.name);
        for byte in tag.as_ref() {
            let _ = write!(cookie, "{byte:02x}");
        }
        cookie.push_str("; Path=/; HttpOnly; SameSite=Lax");
        if let Some(ttl) = self.ttl {
            let _ = write!(cookie, "; Max-Age={}", ttl.as_secs());
        }
        if secure {
            cookie.push_str("; Secure");
        }
        HeaderValue::from_str(&cookie).ok()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bouncer_config::Secret;

    fn sticky(secret: &[u8], ttl: Option<Duration>) -> StickyCookie {
        StickyCookie::new(&StickyConfig {
            cookie: "route".into(),
            ttl,
            secret: Some(Secret(secret.to_vec())),
        })
    }

    fn request_with(set_cookie: &HeaderValue) -> http::HeaderMap {
        let pair = set_cookie
            .to_str()
            .ok()
            .and_then(|text| text.split(';').next())
            .unwrap_or_default();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {pair}"))
                .unwrap_or(HeaderValue::from_static("")),
        );
        headers
    }

    #[test]
    fn a_cookie_names_its_backend_at_any_instance_with_the_secret() {
        let one = sticky(b"0123456789abcdef", Some(Duration::from_secs(60)));
        let other = sticky(b"0123456789abcdef", Some(Duration::from_secs(60)));
        let cookie = one.set_cookie(0xdead_beef, false);
        let headers = request_with(cookie.as_ref().unwrap_or(&HeaderValue::from_static("")));
        assert_eq!(one.target(&headers), Some(0xdead_beef));
        assert_eq!(other.target(&headers), Some(0xdead_beef));
        assert_eq!(sticky(b"another secret!!", None).target(&headers), None);
    }

    #[test]
    fn a_changed_backend_or_expiry_breaks_the_signature() {
        let one = sticky(b"0123456789abcdef", Some(Duration::from_secs(60)));
        let Some(cookie) = one.set_cookie(7, true) else {
            panic!("no cookie");
        };
        let text = cookie.to_str().unwrap_or_default();
        assert!(
            text.contains("; Secure") && text.contains("Max-Age=60"),
            "{text}"
        );
        let forged = text.replacen("route=0000000000000007", "route=0000000000000008", 1);
        let headers =
            request_with(&HeaderValue::from_str(&forged).unwrap_or(HeaderValue::from_static("")));
        assert_eq!(one.target(&headers), None);
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_static("route=garbage"),
        );
        assert_eq!(one.target(&headers), None);
    }

    #[test]
    fn an_expired_cookie_is_ignored() {
        let one = sticky(b"0123456789abcdef", None);
        let signed = format!("{:016x}.{:x}", 5, unix_now() - 10);
        let tag = hmac::sign(&one.key, signed.as_bytes());
        let hex: String = tag
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("route={signed}.{hex}"))
                .unwrap_or(HeaderValue::from_static("")),
        );
        assert_eq!(one.target(&headers), None);
    }
}
