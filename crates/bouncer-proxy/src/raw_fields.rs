//! A backend's response fields kept as the bytes read, for an answer that nothing in the proxy
//! reads on its way to an HTTP/1.1 client.
//!
//! Building a `HeaderMap` from a response head and encoding it back was about a sixth of the
//! proxy's work per proxied request (`bench/instructions`): for every field a name lookup, a
//! hash, a value check and a slot, all undone when the answer is written. When the answer goes
//! from a lean backend connection to the lean HTTP/1 server and no cache keeps it, nothing needs
//! the map. The fields the proxy acts on are read while the head is parsed: the framing,
//! `Connection` and the request id are left out (the proxy writes its own), `Date` and HSTS are
//! noted and kept. The lines kept are written out as they came. Only lines already in the form this proxy writes are kept so (`name: value` and CRLF,
//! each byte validated by `httparse` as the map's types would); a head with a line in any other
//! form, or with a field that needs the map's work (see `h1client`), gets a map as before.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::headers::X_REQUEST_ID;

/// Runs of contiguous kept lines held without an allocation; a head whose kept lines are split
/// in more runs than this gets a map.
const MAX_RUNS: usize = 6;

/// Whether a field goes on to the client as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Keep,
    /// Read by the proxy, which writes what the client needs of it itself.
    Drop,
}

/// Where the kept lines lie in a head: each run a whole number of `name: value\r\n` lines, as
/// start and end offsets (a head is far smaller than `u32::MAX` bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FieldRuns {
    runs: [[u32; 2]; MAX_RUNS],
    count: usize,
}

impl FieldRuns {
    /// The runs of the lines of `fields` (which `httparse` found in `head`) that `fate` keeps.
    /// `None` when `fate` says that the head needs a map (it is asked about every field, in
    /// order, until then), when a kept line is not in the canonical form, or when the kept lines
    /// make more runs than are held.
    pub(crate) fn of(
        head: &[u8],
        fields: &[httparse::Header<'_>],
        mut fate: impl FnMut(&[u8], &[u8]) -> Option<Fate>,
    ) -> Option<Self> {
        let base = head.as_ptr() as usize;
        // Where a slice of `head` starts; `None` for one that is not within it.
        let offset = |slice: &[u8]| {
            (slice.as_ptr() as usize)
                .checked_sub(base)
                .filter(|&start| start + slice.len() <= head.len())
        };
        let mut runs = Self {
            runs: [[0; 2]; MAX_RUNS],
            count: 0,
        };
        for field in fields {
            if fate(field.name.as_bytes(), field.value)? == Fate::Drop {
                continue;
            }
            let name_start = offset(field.name.as_bytes())?;
            let name_end = name_start + field.name.len();
            let value_start = offset(field.value)?;
            let value_end = value_start + field.value.len();
            let canonical = value_start == name_end + 2
                && head.get(name_end..value_start) == Some(b": ".as_slice())
                && head.get(value_end..value_end + 2) == Some(b"\r\n".as_slice());
            if !canonical {
                return None;
            }
            let line = [name_start as u32, (value_end + 2) as u32];
            match runs.runs[..runs.count].last_mut() {
                Some(run) if run[1] == line[0] => run[1] = line[1],
                _ if runs.count == MAX_RUNS => return None,
                _ => {
                    runs.runs[runs.count] = line;
                    runs.count += 1;
                }
            }
        }
        Some(runs)
    }
}

/// A response's fields as the bytes read, less those the proxy read and left out.
pub(crate) struct RawFields {
    head: Bytes,
    runs: FieldRuns,
    /// The backend sent a `Date`, which the answer then carries instead of the proxy's.
    pub has_date: bool,
    /// The backend sent a `Strict-Transport-Security`, which wins over the listener's.
    pub has_hsts: bool,
    /// The request id the proxy adds, kept here rather than in the response's map, which then
    /// usually stays empty and costs nothing.
    pub request_id: Option<HeaderValue>,
}

impl RawFields {
    /// The fields of `head` (the bytes the runs were found in) that `runs` keeps.
    pub(crate) fn new(head: Bytes, runs: FieldRuns, has_date: bool, has_hsts: bool) -> Self {
        Self {
            head,
            runs,
            has_date,
            has_hsts,
            request_id: None,
        }
    }

    /// The kept lines, a run at a time.
    pub(crate) fn runs(&self) -> impl Iterator<Item = &[u8]> {
        self.runs.runs[..self.runs.count]
            .iter()
            .map(|&[start, end]| &self.head[start as usize..end as usize])
    }

    /// Writes the kept lines and the request id, each ending in CRLF.
    pub(crate) fn write_to(&self, out: &mut BytesMut) {
        for run in self.runs() {
            out.extend_from_slice(run);
        }
        if let Some(request_id) = &self.request_id {
            out.extend_from_slice(b"x-request-id: ");
            out.extend_from_slice(request_id.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Appends the kept fields to `headers`, for an answer that something other than the lean
    /// server writes after all. The values stay slices of the bytes read.
    pub(crate) fn append_to(&self, headers: &mut HeaderMap) {
        for &[start, end] in &self.runs.runs[..self.runs.count] {
            let mut at = start as usize;
            let end = end as usize;
            while at < end {
                let line = &self.head[at..end];
                // Every line was checked to be `name: value\r\n`, and a name has no colon.
                let (Some(colon), Some(line_end)) = (
                    line.iter().position(|&b| b == b':'),
                    line.windows(2).position(|pair| pair == b"\r\n"),
                ) else {
                    break;
                };
                let name = HeaderName::from_bytes(&line[..colon]);
                let value =
                    HeaderValue::from_maybe_shared(self.head.slice(at + colon + 2..at + line_end));
                if let (Ok(name), Ok(value)) = (name, value) {
                    headers.append(name, value);
                }
                at += line_end + 2;
            }
        }
        if let Some(request_id) = &self.request_id {
            headers.append(X_REQUEST_ID.clone(), request_id.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runs of `text`'s fields, keeping all but those named in `dropped`.
    fn runs_of(text: &str, dropped: &[&str]) -> Option<Vec<String>> {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Response::new(&mut slots);
        parsed.parse(text.as_bytes()).expect("a valid head");
        let runs = FieldRuns::of(text.as_bytes(), parsed.headers, |name, _| {
            Some(
                if dropped
                    .iter()
                    .any(|dropped| name.eq_ignore_ascii_case(dropped.as_bytes()))
                {
                    Fate::Drop
                } else {
                    Fate::Keep
                },
            )
        })?;
        let raw = RawFields::new(Bytes::from(text.to_owned()), runs, false, false);
        Some(
            raw.runs()
                .map(|run| String::from_utf8_lossy(run).into_owned())
                .collect(),
        )
    }

    #[test]
    fn kept_lines_are_found_in_runs_between_those_dropped() {
        let head = "HTTP/1.1 200 OK\r\nServer: s\r\nDate: d\r\nContent-Length: 5\r\n\
                    ETag: \"e\"\r\nConnection: close\r\nX-Empty: \r\n\r\nbody";
        assert_eq!(
            runs_of(head, &["content-length", "connection"]).expect("canonical"),
            [
                "Server: s\r\nDate: d\r\n",
                "ETag: \"e\"\r\n",
                "X-Empty: \r\n"
            ]
        );
        assert_eq!(
            runs_of(head, &[]).expect("canonical"),
            [&head[17..head.len() - 6]]
        );
        let none: Vec<String> = Vec::new();
        assert_eq!(runs_of("HTTP/1.1 204 No Content\r\n\r\n", &[]), Some(none));
    }

    #[test]
    fn lines_in_another_form_or_too_many_runs_need_a_map() {
        // No space, two spaces, a trailing space (which `httparse` trims), a bare LF.
        for odd in [
            "HTTP/1.1 200 OK\r\nA:1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nA:  1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nA: 1 \r\n\r\n",
            "HTTP/1.1 200 OK\r\nA: 1\nB: 2\r\n\r\n",
        ] {
            assert_eq!(runs_of(odd, &[]), None, "{odd:?}");
        }
        // A line in another form that is dropped does not matter.
        assert_eq!(
            runs_of("HTTP/1.1 200 OK\r\nA: 1\r\nB:2\r\n\r\n", &["b"]),
            Some(vec!["A: 1\r\n".to_owned()])
        );
        let split: String = (0..MAX_RUNS + 1)
            .map(|i| format!("K{i}: v\r\nD: x\r\n"))
            .collect();
        assert_eq!(
            runs_of(&format!("HTTP/1.1 200 OK\r\n{split}\r\n"), &["d"]),
            None
        );
        let fewer: String = (0..MAX_RUNS)
            .map(|i| format!("K{i}: v\r\nD: x\r\n"))
            .collect();
        assert_eq!(
            runs_of(&format!("HTTP/1.1 200 OK\r\n{fewer}\r\n"), &["d"]).map(|runs| runs.len()),
            Some(MAX_RUNS)
        );
    }

    #[test]
    fn kept_fields_go_into_a_map_as_they_came() {
        let text = "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Drop: 1\r\nSet-Cookie: b=2\r\n\
                    X-Empty: \r\nContent-Type: text/plain; charset=utf-8\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut parsed = httparse::Response::new(&mut slots);
        parsed.parse(text.as_bytes()).expect("a valid head");
        let runs = FieldRuns::of(text.as_bytes(), parsed.headers, |name, _| {
            Some(if name == b"X-Drop" {
                Fate::Drop
            } else {
                Fate::Keep
            })
        })
        .expect("canonical");
        let mut raw = RawFields::new(Bytes::from(text), runs, false, false);
        raw.request_id = Some(HeaderValue::from_static("id-1"));
        let mut written = BytesMut::new();
        raw.write_to(&mut written);
        assert_eq!(
            &written[..],
            b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Empty: \r\n\
              Content-Type: text/plain; charset=utf-8\r\nx-request-id: id-1\r\n"
        );
        let mut headers = HeaderMap::new();
        raw.append_to(&mut headers);
        let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(headers["x-empty"], "");
        assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
        assert!(!headers.contains_key("x-drop"));
        assert_eq!(headers["x-request-id"], "id-1");
        assert_eq!(headers.len(), 5);
    }
}
