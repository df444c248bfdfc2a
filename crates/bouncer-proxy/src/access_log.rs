//! The access log: one line per request, written by its own thread so that a slow stdout or disk
//! never stalls the request path. When the writer falls behind, lines are dropped and counted. A
//! log file is reopened when asked (SIGUSR1), so that logrotate can move it away.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;

use bouncer_config::AccessLogFormat;

/// Everything one access log line says about a request.
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub client: IpAddr,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub listener: &'a str,
    pub route: &'a str,
    pub backend: &'a str,
    pub total: Duration,
    pub upstream: Option<Duration>,
}

#[derive(Clone)]
pub struct AccessLog {
    format: AccessLogFormat,
    lines: Option<SyncSender<String>>,
    dropped: Counter,
    /// Set to ask the writer to reopen its file before the next batch.
    reopen: Arc<AtomicBool>,
}

/// Where the lines go.
enum Sink {
    Stdout,
    File { path: PathBuf, file: File },
}

impl AccessLog {
    /// Starts the writer thread (none when the log is off), appending to `path` when given.
    pub fn start(
        format: AccessLogFormat,
        path: Option<&Path>,
        dropped: Counter,
    ) -> std::io::Result<Self> {
        let reopen = Arc::new(AtomicBool::new(false));
        let lines = match format {
            AccessLogFormat::Off => None,
            AccessLogFormat::Json | AccessLogFormat::Common => {
                let sink = match path {
                    Some(path) => Sink::File {
                        path: path.to_path_buf(),
                        file: open_log(path)?,
                    },
                    None => Sink::Stdout,
                };
                let (sender, receiver) = sync_channel(16 * 1024);
                let flag = Arc::clone(&reopen);
                std::thread::Builder::new()
                    .name("bouncer-access-log".into())
                    .spawn(move || write_lines(receiver, sink, &flag))?;
                Some(sender)
            }
        };
        Ok(Self {
            format,
            lines,
            dropped,
            reopen,
        })
    }

    pub fn enabled(&self) -> bool {
        self.lines.is_some()
    }

    /// Asks the writer to reopen its file, which takes effect before the next line is written.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
    }

    pub fn write(&self, record: &AccessRecord<'_>) {
        let Some(lines) = &self.lines else {
            return;
        };
        let line = match self.format {
            AccessLogFormat::Json => json_line(record),
            AccessLogFormat::Common => common_line(record),
            AccessLogFormat::Off => return,
        };
        match lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

fn open_log(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn write_lines(receiver: Receiver<String>, mut sink: Sink, reopen: &AtomicBool) {
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Ok(line) = receiver.recv() {
        batch.extend_from_slice(line.as_bytes());
        // Take whatever else is already queued, so that a busy proxy writes in large batches.
        while batch.len() < 60 * 1024
            && let Ok(line) = receiver.try_recv()
        {
            batch.extend_from_slice(line.as_bytes());
        }
        match &mut sink {
            Sink::Stdout => {
                // Locked per batch only, so that other writers (the demo's messages) get a turn.
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(&batch);
                let _ = stdout.flush();
            }
            Sink::File { path, file } => {
                if reopen.swap(false, Ordering::AcqRel) {
                    match open_log(path) {
                        Ok(reopened) => {
                            *file = reopened;
                            tracing::info!(path = %path.display(), "access log reopened");
                        }
                        // The old file stays in use: lines are kept rather than lost.
                        Err(error) => {
                            tracing::error!(path = %path.display(), %error, "cannot reopen the access log; still writing to the old file");
                        }
                    }
                }
                if let Err(error) = file.write_all(&batch) {
                    tracing::error!(path = %path.display(), %error, "cannot write the access log");
                }
            }
        }
        batch.clear();
    }
}

fn json_line(record: &AccessRecord<'_>) -> String {
    let mut line = String::with_capacity(320);
    line.push_str("{\"time\":\"");
    push_rfc3339_now(&mut line);
    line.push_str("\",\"request_id\":");
    push_json_string(&mut line, record.request_id);
    let _ = write!(line, ",\"client\":\"{}\",\"method\":", record.client);
    push_json_string(&mut line, record.method);
    line.push_str(",\"host\":");
    push_json_string(&mut line, record.host);
    line.push_str(",\"path\":");
    push_json_string(&mut line, record.path);
    let _ = write!(
        line,
        ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"listener\":",
        record.status, record.bytes_in, record.bytes_out
    );
    push_json_string(&mut line, record.listener);
    line.push_str(",\"route\":");
    push_json_string(&mut line, record.route);
    line.push_str(",\"backend\":");
    push_json_string(&mut line, record.backend);
    let _ = write!(
        line,
        ",\"total_ms\":{:.3}",
        record.total.as_secs_f64() * 1000.0
    );
    match record.upstream {
        Some(upstream) => {
            let _ = write!(
                line,
                ",\"upstream_ms\":{:.3}}}",
                upstream.as_secs_f64() * 1000.0
            );
        }
        None => line.push_str(",\"upstream_ms\":null}"),
    }
    line.push('\n');
    line
}

/// The Common Log Format, with the request id, route, backend and times appended.
fn common_line(record: &AccessRecord<'_>) -> String {
    let mut line = String::with_capacity(256);
    let _ = write!(line, "{} - - [", record.client);
    push_rfc3339_now(&mut line);
    let _ = write!(
        line,
        "] \"{} {}\" {} {} host={} request_id={} listener={} route={} backend={} total_ms={:.3}",
        record.method,
        escape_common(record.path),
        record.status,
        record.bytes_out,
        escape_common(record.host),
        escape_common(record.request_id),
        record.listener,
        record.route,
        if record.backend.is_empty() {
            "-"
        } else {
            record.backend
        },
        record.total.as_secs_f64() * 1000.0,
    );
    match record.upstream {
        Some(upstream) => {
            let _ = write!(line, " upstream_ms={:.3}", upstream.as_secs_f64() * 1000.0);
        }
        None => line.push_str(" upstream_ms=-"),
    }
    line.push('\n');
    line
}

fn escape_common(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c == '"' || c == '\\' || c.is_control() || c == ' ' {
                format!("\\x{:02x}", u32::from(c)).chars().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

fn push_json_string(line: &mut String, text: &str) {
    line.push('"');
    for c in text.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(line, "\\u{:04x}", u32::from(c));
            }
            c => line.push(c),
        }
    }
    line.push('"');
}

/// Appends the current UTC time as `2026-11-28T15:17:16.123Z`.
fn push_rfc3339_now(line: &mut String) {
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(i64::try_from(seconds / 86_400).unwrap_or(0));
    let in_day = seconds % 86_400;
    let _ = write!(
        line,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60,
        since_epoch.subsec_millis()
    );
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = u32::try_from(day_of_year - (153 * month_index + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    })
    .unwrap_or(1);
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AccessRecord<'static> {
        AccessRecord {
            request_id: "abc",
            client: "127.0.0.1".parse().expect("ip"),
            method: "GET",
            host: "app.example",
            path: "/a \"b\"",
            status: 200,
            bytes_in: 0,
            bytes_out: 12,
            listener: "public",
            route: "app",
            backend: "127.0.0.1:3001",
            total: Duration::from_micros(1500),
            upstream: Some(Duration::from_micros(1000)),
        }
    }

    #[test]
    fn dates_convert_from_days_since_the_epoch() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_421), (2025, 11, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn json_lines_escape_what_the_client_sent() {
        let line = json_line(&record());
        assert!(line.ends_with('\n'));
        assert!(line.contains("\"path\":\"/a \\\"b\\\"\""), "{line}");
        assert!(
            line.contains("\"status\":200,\"bytes_in\":0,\"bytes_out\":12"),
            "{line}"
        );
        assert!(
            line.contains("\"total_ms\":1.500,\"upstream_ms\":1.000}"),
            "{line}"
        );
    }

    #[test]
    fn common_lines_hold_the_request_and_the_extras() {
        let line = common_line(&record());
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        assert!(
            line.contains("] \"GET /a\\x20\\x22b\\x22\" 200 12 host=app.example request_id=abc"),
            "{line}"
        );
    }
}
