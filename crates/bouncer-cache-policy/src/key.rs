//! The cache key: which parts of a request name a stored response.

use http::Method;

/// One part of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyPart {
    /// GET and HEAD share one key, so that HEAD is answered from a stored GET.
    Method,
    Host,
    /// The normalised path (so `/a/../b` and `/b` are one entry).
    Path,
    /// The query, without the ignored parameters.
    Query,
}

/// How a route builds its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub parts: Vec<KeyPart>,
    /// Query parameters left out of the key (tracking tags such as `utm_source`).
    pub ignore_query_params: Vec<String>,
}

impl Default for KeySpec {
    fn default() -> Self {
        KeySpec {
            parts: vec![
                KeyPart::Method,
                KeyPart::Host,
                KeyPart::Path,
                KeyPart::Query,
            ],
            ignore_query_params: Vec::new(),
        }
    }
}

/// What a key is made of.
#[derive(Debug, Clone, Copy)]
pub struct KeyInput<'a> {
    pub method: &'a Method,
    /// The host, lower-cased, without a default port.
    pub host: &'a str,
    pub normalised_path: &'a str,
    pub query: Option<&'a str>,
}

impl KeySpec {
    /// The key of a request. Parts are separated by a byte that none of them can hold, so that
    /// no two different requests share a key.
    pub fn key(&self, input: &KeyInput<'_>) -> String {
        let mut key = String::with_capacity(
            8 + input.host.len() + input.normalised_path.len() + input.query.map_or(0, str::len),
        );
        for part in &self.parts {
            match part {
                KeyPart::Method => {
                    let method = if input.method == Method::HEAD {
                        Method::GET.as_str()
                    } else {
                        input.method.as_str()
                    };
                    key.push_str(method);
                }
                KeyPart::Host => key.push_str(input.host),
                KeyPart::Path => key.push_str(input.normalised_path),
                KeyPart::Query => {
                    if let Some(query) = input.query {
                        self.push_query(&mut key, query);
                    }
                }
            }
            key.push('\n');
        }
        key
    }

    /// The query's parameters in their order, without the ignored ones (`?` marks a query, so
    /// that an empty query and none differ).
    fn push_query(&self, key: &mut String, query: &str) {
        key.push('?');
        let mut first = true;
        for parameter in query.split('&') {
            let name = parameter
                .split_once('=')
                .map_or(parameter, |(name, _)| name);
            if self
                .ignore_query_params
                .iter()
                .any(|ignored| ignored == name)
            {
                continue;
            }
            if !first {
                key.push('&');
            }
            first = false;
            key.push_str(parameter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(spec: &KeySpec, method: &Method, query: Option<&str>) -> String {
        spec.key(&KeyInput {
            method,
            host: "example.com",
            normalised_path: "/a",
            query,
        })
    }

    #[test]
    fn head_shares_the_get_key_and_ignored_parameters_drop_out() {
        let spec = KeySpec {
            ignore_query_params: vec!["utm_source".into()],
            ..KeySpec::default()
        };
        assert_eq!(
            key(&spec, &Method::GET, None),
            key(&spec, &Method::HEAD, None)
        );
        assert_ne!(
            key(&spec, &Method::GET, None),
            key(&spec, &Method::POST, None)
        );
        assert_eq!(
            key(&spec, &Method::GET, Some("utm_source=x&b=2")),
            key(&spec, &Method::GET, Some("b=2"))
        );
        assert_ne!(
            key(&spec, &Method::GET, Some("b=2&c=3")),
            key(&spec, &Method::GET, Some("c=3&b=2"))
        );
        assert_ne!(
            key(&spec, &Method::GET, Some("")),
            key(&spec, &Method::GET, None)
        );
    }

    #[test]
    fn parts_left_out_of_the_spec_do_not_count() {
        let spec = KeySpec {
            parts: vec![KeyPart::Path],
            ignore_query_params: vec![],
        };
        assert_eq!(
            key(&spec, &Method::GET, Some("x=1")),
            key(&spec, &Method::GET, None)
        );
    }
}
