//! Tests of the `bouncer` binary itself: exit codes, `check`, signals, memory, descriptor exhaustion.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bouncer_testkit::{Backend, Clients, config_for, eventually, metric, pattern_body};
use http::{Request, StatusCode};
use http_body_util::BodyExt;

const BINARY: &str = env!("CARGO_BIN_EXE_bouncer");

/// A config file in a fresh directory of its own, removed when dropped.
struct ConfigFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bouncer-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bouncer.toml");
        std::fs::write(&path, text).unwrap();
        ConfigFile { dir, path }
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The proxy binary running with a config; killed when dropped.
struct RunningBinary {
    child: Child,
    public: SocketAddr,
    admin: SocketAddr,
    /// Every line the proxy wrote to stderr after its addresses.
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _config: Option<ConfigFile>,
}

impl RunningBinary {
    /// Starts `bouncer run` (through `wrapper` such as prlimit, if given) and waits until it
    /// reports both listening addresses on stderr.
    fn start(config: ConfigFile, wrapper: &[&str]) -> Self {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(BINARY);
                command
            }
            None => Command::new(BINARY),
        };
        command.args(["run", "--config"]).arg(&config.path);
        Self::spawn(command, Some(config))
    }

    /// Starts `bouncer run --takeover` with the config file at `path`, which a running process
    /// serves: the new process takes its sockets over.
    fn take_over(path: &std::path::Path) -> Self {
        let mut command = Command::new(BINARY);
        command.args(["run", "--takeover", "--config"]).arg(path);
        Self::spawn(command, None)
    }

    fn spawn(mut command: Command, config: Option<ConfigFile>) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut public = None;
        let mut admin = None;
        // Reading stderr blocks until the proxy writes; it writes these lines right after binding.
        while public.is_none() || admin.is_none() {
            let line = lines
                .next()
                .expect("the proxy reported its addresses")
                .unwrap();
            if let Some(address) = line.split("address=").nth(1) {
                let address: SocketAddr = address.trim().parse().unwrap();
                if line.contains("listener=public") {
                    public = Some(address);
                } else if line.contains("admin") {
                    admin = Some(address);
                }
            }
        }
        // Keep draining stderr so that the proxy never blocks on a full pipe.
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = std::sync::Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        RunningBinary {
            child,
            public: public.unwrap(),
            admin: admin.unwrap(),
            stderr,
            _config: config,
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// How many stderr lines contain `needle`.
    fn stderr_lines(&self, needle: &str) -> usize {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    fn wait_for_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < deadline, "the proxy did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn peak_memory_kib(&self) -> u64 {
        self.memory_kib("VmHWM:")
    }

    fn resident_memory_kib(&self) -> u64 {
        self.memory_kib("VmRSS:")
    }

    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for RunningBinary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn check_accepts_a_valid_config() {
    let config = ConfigFile::new(
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:8080\"\n[[routes]]\nupstream = \"u\"\n[upstreams.u]\nservers = [\"127.0.0.1:3001\"]\n",
    );
    let output = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(&config.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ok (1 listeners, 1 routes, 1 upstreams)"),
        "{stdout}"
    );
}

#[test]
fn check_reads_certificates_and_names_a_broken_one() {
    let config = ConfigFile::new(
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:8443\"\n[listeners.tls]\ncertificates = [{ cert = \"site.pem\", key = \"site.key\" }]\n[[routes]]\nupstream = \"u\"\n[upstreams.u]\nservers = [\"127.0.0.1:3001\"]\n",
    );
    let ca = bouncer_testkit::TestCa::new("check CA");
    let site = ca.issue(&["site.example"]);
    site.write(&config.dir, "site");
    let run = || {
        Command::new(BINARY)
            .args(["check", "-c"])
            .arg(&config.path)
            .output()
            .unwrap()
    };
    assert_eq!(run().status.code(), Some(0), "{:?}", run());
    // A key of another certificate: refused, naming both files.
    std::fs::write(
        config.dir.join("site.key"),
        ca.issue(&["x.example"]).key_pem,
    )
    .unwrap();
    let output = run();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("listeners[0].tls: the key in")
            && stderr.contains("site.key does not belong to the certificate in"),
        "{stderr}"
    );
}

#[test]
fn check_lists_every_problem_with_its_place_and_exits_1() {
    let config = ConfigFile::new(
        "[[listeners]]\nname = \"a\"\nbind = \"nowhere\"\n[[routes]]\nupstream = \"u2\"\n[upstreams.u]\nservers = [\"127.0.0.1:3001\"]\nconect_timeout = \"1s\"\n",
    );
    let output = Command::new(BINARY)
        .args(["check", "-c"])
        .arg(&config.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = config.path.display().to_string();
    for expected in [
        format!("{file}:3:8: listeners[0].bind: \"nowhere\" is not an IP address with a port"),
        format!(
            "{file}:5:12: routes[0].upstream: no upstream is named \"u2\"; did you mean \"u\"?"
        ),
        format!(
            "{file}:8:1: upstreams.u.conect_timeout: unknown key \"conect_timeout\"; did you mean \"connect_timeout\"?"
        ),
        "3 problem(s) found".to_string(),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn run_refuses_a_bad_config_and_a_missing_file() {
    let config = ConfigFile::new("[[listeners]]\n");
    let output = Command::new(BINARY)
        .args(["run", "-c"])
        .arg(&config.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("listeners[0]"));

    let output = Command::new(BINARY)
        .args(["-c", "/nonexistent/bouncer.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read config file /nonexistent/bouncer.toml"),
        "{stderr}"
    );
}

#[test]
fn a_bad_log_filter_is_an_error_on_the_command_line_and_a_warning_in_rust_log() {
    let config = ConfigFile::new(
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:8080\"\n[[routes]]\nupstream = \"u\"\n[upstreams.u]\nservers = [\"127.0.0.1:3001\"]\n",
    );
    let output = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(&config.path)
        .args(["--log", "bouncer=loud"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--log \"bouncer=loud\" is not a valid log filter"),
        "{stderr}"
    );

    // RUST_LOG may be meant for another program: the proxy says so and carries on at info.
    let output = Command::new(BINARY)
        .env("RUST_LOG", "bouncer=loud")
        .args(["check", "--config"])
        .arg(&config.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("RUST_LOG is not a valid log filter; logging at info"),
        "{stderr}"
    );
}

#[test]
fn version_and_help_read_well() {
    let output = Command::new(BINARY).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("bouncer {}", env!("CARGO_PKG_VERSION"))
    );
    let output = Command::new(BINARY).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for word in ["run", "check", "demo", "Examples:"] {
        assert!(help.contains(word), "{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let backends = Backend::start_many(1).await;
    let mut proxy = RunningBinary::start(
        ConfigFile::new(&config_for(&backends, "[server]\nshutdown_grace = \"10s\"")),
        &[],
    );
    let url = format!("http://{}/delay/500", proxy.public);
    let in_flight = tokio::spawn(async move { Clients::new().get(&url).await });
    eventually(
        Duration::from_secs(5),
        "the request reached the backend",
        || async { backends[0].count() == 1 },
    )
    .await;
    proxy.signal("TERM");
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let status = tokio::task::block_in_place(|| proxy.wait_for_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_goes_to_its_file_and_sigusr1_reopens_it_after_a_rotation() {
    let backends = Backend::start_many(1).await;
    let config = ConfigFile::new(&config_for(&backends, "").replace(
        "[access_log]\nformat = \"off\"",
        "[access_log]\nformat = \"json\"\npath = \"access.log\"",
    ));
    let log = config.dir.join("access.log");
    let rotated = config.dir.join("access.log.1");
    let proxy = RunningBinary::start(config, &[]);
    let lines_in = |path: &std::path::Path, needle: &str| {
        std::fs::read_to_string(path)
            .map(|text| text.lines().filter(|line| line.contains(needle)).count())
            .unwrap_or(0)
    };
    let clients = Clients::new();
    let answer = clients
        .get(&format!("http://{}/before-rotation", proxy.public))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    eventually(
        Duration::from_secs(5),
        "the first line is written",
        || async { lines_in(&log, "/before-rotation") == 1 },
    )
    .await;

    // What logrotate does: move the file away, then signal.
    std::fs::rename(&log, &rotated).unwrap();
    proxy.signal("USR1");
    // Until the writer reopens, a line may still go to the moved file; once the new file has a
    // line, every later one goes there.
    eventually(Duration::from_secs(5), "a new file is written", || async {
        let path = format!("http://{}/after-rotation", proxy.public);
        clients.get(&path).await;
        lines_in(&log, "/after-rotation") >= 1
    })
    .await;
    clients.get(&format!("http://{}/last", proxy.public)).await;
    eventually(
        Duration::from_secs(5),
        "the last line is in the new file",
        || async { lines_in(&log, "/last") == 1 },
    )
    .await;
    assert_eq!(
        lines_in(&rotated, "/before-rotation"),
        1,
        "the old file keeps its lines"
    );
    assert_eq!(lines_in(&rotated, "/last"), 0);
    let first = std::fs::read_to_string(&log).unwrap();
    let line = first.lines().next().unwrap();
    let parsed: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(parsed["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_and_a_broken_file_changes_nothing() {
    let backends = Backend::start_many(2).await;
    let config = ConfigFile::new(&config_for(&backends[..1], ""));
    let path = config.path.clone();
    let proxy = RunningBinary::start(config, &[]);
    let clients = Clients::new();
    let url = format!("http://{}/", proxy.public);
    assert_eq!(clients.get(&url).await.text(), "backend 0\n");

    std::fs::write(&path, config_for(&backends[1..], "")).unwrap();
    proxy.signal("HUP");
    eventually(
        Duration::from_secs(5),
        "the new backend answers",
        || async { clients.get(&url).await.text() == "backend 1\n" },
    )
    .await;

    std::fs::write(&path, "[[listeners]]\nname = 1\n").unwrap();
    proxy.signal("HUP");
    eventually(Duration::from_secs(5), "the failure is logged", || async {
        proxy.stderr_lines("config reload failed") == 1
    })
    .await;
    assert_eq!(
        clients.get(&url).await.text(),
        "backend 1\n",
        "the running config stays"
    );
    let metrics = clients
        .get(&format!("http://{}/metrics", proxy.admin))
        .await
        .text();
    assert_eq!(
        metric(&metrics, "bouncer_config_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "bouncer_config_reloads_total{result=\"failed\"}"),
        Some(1.0)
    );
}

/// What the clients saw during an upgrade.
#[derive(Default)]
struct UpgradeLoad {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// Keep-alive connections closed by the proxy after a `Connection: close` answer.
    closed_politely: AtomicUsize,
    /// HTTP/2 requests that the old process did not take up as it went away, sent again.
    retried: AtomicUsize,
    stop: std::sync::atomic::AtomicBool,
}

/// Waits up to 10 s for one answer and counts it: `None` when it failed (a request that was
/// sent and got no 200), else whether the answer said `Connection: close`. With
/// `retry_unprocessed`, a request the server never took up (see [`not_processed`]) is counted as
/// retried rather than failed, and the answer is `Some(true)`: the client moves to a new
/// connection and sends again, as browsers do.
async fn count_answer(
    load: &UpgradeLoad,
    response: impl std::future::Future<
        Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>,
    >,
    retry_unprocessed: bool,
) -> Option<bool> {
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        let response = match response.await {
            Ok(response) => response,
            Err(error) => return Err(retry_unprocessed && not_processed(&error)),
        };
        let status = response.status();
        let close = response
            .headers()
            .get(http::header::CONNECTION)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"close"));
        response.into_body().collect().await.map_err(|_| false)?;
        Ok((status, close))
    })
    .await;
    match answered {
        Ok(Ok((StatusCode::OK, close))) => {
            load.ok.fetch_add(1, Ordering::Relaxed);
            Some(close)
        }
        Ok(Err(true)) => {
            load.retried.fetch_add(1, Ordering::Relaxed);
            Some(true)
        }
        _ => {
            load.failed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Whether an HTTP/2 request failed before the server took it up, so that the client may send it
/// again (RFC 9113 section 6.8): hyper never sent it (the connection closed first), or the
/// server's GOAWAY or a refused stream says that it was not processed.
fn not_processed(error: &hyper::Error) -> bool {
    if error.is_canceled() {
        return true;
    }
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<h2::Error>())
        .is_some_and(|h2| match h2.reason() {
            Some(h2::Reason::REFUSED_STREAM) => true,
            Some(h2::Reason::NO_ERROR) => h2.is_go_away() && h2.is_remote(),
            _ => false,
        })
}

/// A new connection to `proxy`; a refused one is counted as a failure.
async fn connect_counted(proxy: SocketAddr, load: &UpgradeLoad) -> Option<tokio::net::TcpStream> {
    let connected = tokio::net::TcpStream::connect(proxy).await.ok();
    if connected.is_none() {
        load.failed.fetch_add(1, Ordering::Relaxed);
    }
    connected
}

/// A client at full speed: on one keep-alive connection at a time, opening the next one when the
/// proxy closes it after an answer; or (`fresh`) on a new connection for every request. A request
/// that was sent and got no answer, or a refused connection, is a failure.
async fn upgrade_client(proxy: SocketAddr, load: std::sync::Arc<UpgradeLoad>, fresh: bool) {
    use hyper_util::rt::TokioIo;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut sender: Option<hyper::client::conn::http1::SendRequest<bouncer_testkit::BoxBody>> =
        None;
    while !load.stop.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
        if sender.as_ref().is_none_or(|sender| sender.is_closed()) || fresh {
            if sender.take().is_some() && !fresh {
                load.closed_politely.fetch_add(1, Ordering::Relaxed);
            }
            let Some(stream) = connect_counted(proxy, &load).await else {
                return;
            };
            let Ok((new_sender, connection)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                load.failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            tokio::spawn(connection);
            sender = Some(new_sender);
        }
        let Some(current) = sender.as_mut() else {
            continue;
        };
        // A connection the proxy closed after its last answer is not an error: the next
        // request goes on a new one.
        if current.ready().await.is_err() {
            continue;
        }
        let request = Request::get("/")
            .header("host", "app")
            .body(bouncer_testkit::empty())
            .unwrap();
        match count_answer(&load, current.send_request(request), false).await {
            None => return,
            // The proxy said this answer is the connection's last: a client must not send
            // another on it (its own connection task may not have seen the close yet).
            Some(true) if !fresh => {
                sender = None;
                load.closed_politely.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {}
        }
    }
}

/// Like [`upgrade_client`], over HTTP/2 with prior knowledge: a GOAWAY from the old process
/// sends the next requests to a new connection.
async fn h2_upgrade_client(proxy: SocketAddr, load: std::sync::Arc<UpgradeLoad>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut sender: Option<hyper::client::conn::http2::SendRequest<bouncer_testkit::BoxBody>> =
        None;
    while !load.stop.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
        if sender.as_ref().is_none_or(|sender| sender.is_closed()) {
            if sender.take().is_some() {
                load.closed_politely.fetch_add(1, Ordering::Relaxed);
            }
            let Some(stream) = connect_counted(proxy, &load).await else {
                return;
            };
            let Ok((new_sender, connection)) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
            else {
                load.failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            tokio::spawn(connection);
            sender = Some(new_sender);
        }
        let Some(current) = sender.as_mut() else {
            continue;
        };
        // A connection that said GOAWAY takes no new stream: the next goes on a new one.
        if current.ready().await.is_err() {
            sender = None;
            load.closed_politely.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let request = Request::get(format!("http://{proxy}/"))
            .body(bouncer_testkit::empty())
            .unwrap();
        match count_answer(&load, current.send_request(request), true).await {
            None => return,
            // Not taken up, as the old process went away: the next request (this one again)
            // goes on a new connection.
            Some(true) => {
                sender = None;
                load.closed_politely.fetch_add(1, Ordering::Relaxed);
            }
            Some(false) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_loses_no_request_and_no_connection_attempt() {
    let backends = Backend::start_many(2).await;
    let config = ConfigFile::new(&config_for(
        &backends,
        "[server]\nupgrade_socket = \"upgrade.sock\"\nidle_timeout = \"3s\"",
    ));
    let path = config.path.clone();
    let mut old = RunningBinary::start(config, &[]);
    let status = |admin: SocketAddr| async move {
        let answer = Clients::new()
            .get(&format!("http://{admin}/api/v1/status"))
            .await;
        serde_json::from_slice::<serde_json::Value>(&answer.body).unwrap()
    };
    assert_eq!(status(old.admin).await["pid"], old.child.id());

    let load = std::sync::Arc::new(UpgradeLoad::default());
    let mut clients = Vec::new();
    for index in 0..5 {
        clients.push(tokio::spawn(upgrade_client(
            old.public,
            std::sync::Arc::clone(&load),
            index == 4,
        )));
    }
    clients.push(tokio::spawn(h2_upgrade_client(
        old.public,
        std::sync::Arc::clone(&load),
    )));
    eventually(Duration::from_secs(5), "the load runs", || async {
        load.ok.load(Ordering::Relaxed) >= 200
    })
    .await;

    // A second start without --takeover is refused: it would take the first one's place.
    let refused = Command::new(BINARY)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("--takeover"), "{said}");

    // A keep-alive connection that is idle through the takeover.
    let stream = tokio::net::TcpStream::connect(old.public).await.unwrap();
    let (mut idle, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let get = || {
        Request::get("/")
            .header("host", "app")
            .body(bouncer_testkit::empty())
            .unwrap()
    };
    assert_eq!(
        idle.send_request(get()).await.unwrap().status(),
        StatusCode::OK
    );

    let new = tokio::task::block_in_place(|| RunningBinary::take_over(&path));
    assert_eq!(new.public, old.public, "the same socket");
    eventually(
        Duration::from_secs(5),
        "the old process hands over",
        || async { old.stderr_lines("a new process took over the listening sockets") == 1 },
    )
    .await;
    // The idle connection was left open: its next request is answered, and that answer says
    // the connection closes.
    idle.ready().await.unwrap();
    let answer = idle.send_request(get()).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.headers()["connection"], "close");
    drop(answer);
    let exit = tokio::task::block_in_place(|| old.wait_for_exit(Duration::from_secs(20)));
    assert_eq!(exit.code(), Some(0), "the old process drains and exits");
    let ok_at_exit = load.ok.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(5),
        "the new process serves the load",
        || async { load.ok.load(Ordering::Relaxed) >= ok_at_exit + 200 },
    )
    .await;
    assert_eq!(status(new.admin).await["pid"], new.child.id());
    load.stop.store(true, Ordering::Release);
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(
        load.failed.load(Ordering::Relaxed),
        0,
        "no request or connection failed"
    );
    eprintln!(
        "upgrade under load: {} requests answered, {} failed, {} HTTP/2 requests not taken up and sent again, {} connections told to move on (HTTP/1 Connection: close, HTTP/2 GOAWAY)",
        load.ok.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
        load.retried.load(Ordering::Relaxed),
        load.closed_politely.load(Ordering::Relaxed)
    );
    assert!(
        load.closed_politely.load(Ordering::Relaxed) >= 5,
        "each keep-alive client, HTTP/2 included, was told to move on"
    );
    assert_eq!(
        old.stderr_lines("a new process took over the listening sockets"),
        1,
        "{:#?}",
        old.stderr.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_binary_again_and_it_takes_over() {
    let backends = Backend::start_many(1).await;
    let config = ConfigFile::new(&config_for(
        &backends,
        "[server]\nupgrade_socket = \"upgrade.sock\"",
    ));
    let mut old = RunningBinary::start(config, &[]);
    let old_pid = old.child.id();
    old.signal("USR2");
    // The successor is no child of this test: whatever happens, it is stopped at the end.
    eventually(
        Duration::from_secs(10),
        "the successor is started",
        || async { old.stderr_lines("SIGUSR2: started the new binary to take over") == 1 },
    )
    .await;
    let successor: u32 = old
        .stderr
        .lock()
        .unwrap()
        .iter()
        .find(|line| line.contains("SIGUSR2: started the new binary"))
        .and_then(|line| line.split(" pid=").nth(1))
        .and_then(|pid| pid.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .expect("the successor's pid in the log");
    let _stop_successor = StopOnDrop(successor);
    let exit = tokio::task::block_in_place(|| old.wait_for_exit(Duration::from_secs(20)));
    assert_eq!(
        exit.code(),
        Some(0),
        "the old process handed over and exited"
    );
    // The successor serves on the same sockets.
    let clients = Clients::new();
    assert_eq!(
        clients.get(&format!("http://{}/", old.public)).await.status,
        StatusCode::OK
    );
    let status = clients
        .get(&format!("http://{}/api/v1/status", old.admin))
        .await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    let new_pid = status["pid"].as_u64().unwrap();
    assert_ne!(new_pid, u64::from(old_pid));
    assert_eq!(new_pid, u64::from(successor));
}

/// Sends SIGTERM to a process this test started indirectly, when dropped.
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.0.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_proxy_says_it_is_ready_and_which_process_is_the_main_one() {
    let backends = Backend::start_many(1).await;
    let config = ConfigFile::new(&config_for(&backends, ""));
    // What systemd gives a Type=notify service: a datagram socket named in NOTIFY_SOCKET.
    let socket_path = config.dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = Command::new(BINARY)
        .args(["run", "--config"])
        .arg(&config.path)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut message = [0u8; 256];
    let received = tokio::task::block_in_place(|| notify.recv(&mut message));
    let _ = child.kill();
    let _ = child.wait();
    let length = received.expect("a notification within 10 s");
    let text = String::from_utf8_lossy(&message[..length]).into_owned();
    assert_eq!(text, format!("READY=1\nMAINPID={}", child.id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_drain_after_a_handover() {
    let backends = Backend::start_many(1).await;
    let config = ConfigFile::new(&config_for(
        &backends,
        "[server]\nupgrade_socket = \"upgrade.sock\"\nidle_timeout = \"5m\"",
    ));
    let path = config.path.clone();
    let mut old = RunningBinary::start(config, &[]);
    // An idle keep-alive connection would hold the old process for the idle timeout.
    let stream = tokio::net::TcpStream::connect(old.public).await.unwrap();
    let (mut idle, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get("/")
        .header("host", "app")
        .body(bouncer_testkit::empty())
        .unwrap();
    assert_eq!(
        idle.send_request(request).await.unwrap().status(),
        StatusCode::OK
    );
    let _new = tokio::task::block_in_place(|| RunningBinary::take_over(&path));
    eventually(
        Duration::from_secs(5),
        "the old process hands over",
        || async { old.stderr_lines("a new process took over the listening sockets") == 1 },
    )
    .await;
    old.signal("TERM");
    let exit = tokio::task::block_in_place(|| old.wait_for_exit(Duration::from_secs(10)));
    assert_eq!(exit.code(), Some(0));
    // Its last words may still be on their way through the pipe.
    eventually(Duration::from_secs(5), "the reason is logged", || async {
        old.stderr_lines("SIGTERM while draining after the handover") == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_opened_on_the_old_process_during_a_handover_still_works() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let backends = Backend::start_many(1).await;
    let config = ConfigFile::new(&config_for(
        &backends,
        "[server]\nupgrade_socket = \"upgrade.sock\"",
    ));
    let path = config.path.clone();
    let old = RunningBinary::start(config, &[]);
    // A keep-alive connection to the old process, idle through the takeover.
    let mut stream = tokio::net::TcpStream::connect(old.public).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    let head = bouncer_testkit::read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|value| value.parse().ok())
        .unwrap();
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    let _new = tokio::task::block_in_place(|| RunningBinary::take_over(&path));
    eventually(
        Duration::from_secs(5),
        "the old process hands over",
        || async { old.stderr_lines("a new process took over the listening sockets") == 1 },
    )
    .await;
    // Its next request is an upgrade: the switch keeps `Connection: upgrade`, and the tunnel works.
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let head = bouncer_testkit::read_head(&mut stream)
        .await
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
}

/// Sends the start of a request head and waits for the proxy's 408 once `header_timeout` passes.
async fn stall_a_request_head(proxy: SocketAddr) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the proxy closes a stalled head")
        .ok();
    assert!(answer.starts_with(b"HTTP/1.1 408"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filter_changes_at_run_time_through_the_admin_api() {
    let backends = Backend::start_many(1).await;
    let proxy = RunningBinary::start(
        ConfigFile::new(&config_for(
            &backends,
            "[server]\nheader_timeout = \"200ms\"",
        )),
        &[],
    );
    let admin = format!("http://{}/api/v1/log-level", proxy.admin);
    let clients = Clients::new();
    let answer = clients.get(&admin).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.text().contains("\"filter\": \"info\""),
        "{}",
        answer.text()
    );

    // At info, a stalled head is closed without a word.
    const CLOSED: &str = "closing a connection whose request headers were too slow";
    stall_a_request_head(proxy.public).await;
    let put = |filter: &str| {
        Request::put(&admin)
            .header("content-type", "application/json")
            .body(bouncer_testkit::full(format!(
                "{{\"filter\": \"{filter}\"}}"
            )))
            .unwrap()
    };
    let answer = clients.send(put("info,bouncer_proxy=debug")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(proxy.stderr_lines(CLOSED), 0, "not logged at info");

    stall_a_request_head(proxy.public).await;
    eventually(
        Duration::from_secs(5),
        "the debug line is logged",
        || async { proxy.stderr_lines(CLOSED) == 1 },
    )
    .await;
    assert!(
        clients
            .get(&admin)
            .await
            .text()
            .contains("bouncer_proxy=debug")
    );

    let answer = clients.send(put("info,[unclosed")).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text());
    assert!(
        answer.text().contains("invalid filter directive"),
        "{}",
        answer.text()
    );
    assert!(
        clients
            .get(&admin)
            .await
            .text()
            .contains("bouncer_proxy=debug"),
        "a refused filter changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_each_way_streams_through_in_bounded_memory() {
    const GIB: u64 = 1 << 30;
    let backends = Backend::start_many(1).await;
    let proxy = RunningBinary::start(
        ConfigFile::new(&config_for(
            &backends,
            "[server]\nmax_body_bytes = \"2GiB\"",
        )),
        &[],
    );
    let clients = Clients::new();
    assert_eq!(
        clients
            .get(&format!("http://{}/", proxy.public))
            .await
            .status,
        StatusCode::OK
    );
    let before = proxy.peak_memory_kib();

    let upload = Request::post(format!("http://{}/count", proxy.public))
        .body(pattern_body(GIB))
        .unwrap();
    assert_eq!(clients.send(upload).await.text(), GIB.to_string());

    let response = clients
        .http1
        .request(
            Request::get(format!("http://{}/bytes/{GIB}", proxy.public))
                .body(bouncer_testkit::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame
            .unwrap()
            .data_ref()
            .map_or(0, |data| data.len() as u64);
    }
    assert_eq!(received, GIB);

    let growth_kib = proxy.peak_memory_kib().saturating_sub(before);
    eprintln!("peak resident memory: {before} KiB before, grew by {growth_kib} KiB");
    assert!(
        growth_kib < 64 * 1024,
        "peak memory grew by {growth_kib} KiB"
    );
}

/// Sends one GET on `stream` and reads its whole answer, leaving the connection open.
async fn one_keep_alive_exchange(stream: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: idle.test\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = stream.read(&mut chunk).await.unwrap();
        assert!(read > 0, "the proxy closed a keep-alive connection");
        received.extend_from_slice(&chunk[..read]);
        let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .expect("a Content-Length")
            .trim()
            .parse()
            .unwrap();
        if received.len() >= end + 4 + length {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_cost_little_memory() {
    // The proxy raises its own descriptor limit; this side needs a descriptor for each connection
    // too, and a machine whose hard limit is low gets fewer connections (at least 500).
    let allowed = rlimit::increase_nofile_limit(2000 + 512).unwrap();
    let connections = usize::try_from(allowed.saturating_sub(512))
        .unwrap_or(usize::MAX)
        .min(2000);
    assert!(
        connections >= 500,
        "a descriptor limit of {allowed} is too low"
    );
    let backends = Backend::start_many(1).await;
    let proxy = RunningBinary::start(ConfigFile::new(&config_for(&backends, "")), &[]);
    let mut first = tokio::net::TcpStream::connect(proxy.public).await.unwrap();
    one_keep_alive_exchange(&mut first).await;
    let before = proxy.resident_memory_kib();

    let mut idle = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut stream = tokio::net::TcpStream::connect(proxy.public).await.unwrap();
        one_keep_alive_exchange(&mut stream).await;
        idle.push(stream);
    }
    // The same connections still work, once each: they were idle, not closed.
    for stream in idle.iter_mut().step_by(100) {
        one_keep_alive_exchange(stream).await;
    }
    let growth_kib = proxy.resident_memory_kib().saturating_sub(before);
    let per_connection = growth_kib as f64 / connections as f64;
    eprintln!(
        "resident memory: {before} KiB before, {growth_kib} KiB more with {connections} idle connections ({per_connection:.1} KiB each)"
    );
    // About 2 KiB each (the connection's task and state, no buffer); it was 6 KiB while idle
    // connections kept their read and write buffers and a task sized for writing an answer.
    assert!(
        per_connection < 4.0,
        "an idle connection costs {per_connection:.1} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accept_loop_survives_running_out_of_descriptors() {
    let backends = Backend::start_many(1).await;
    // With a hard limit of 64 descriptors the proxy cannot raise its own limit.
    let proxy = RunningBinary::start(
        ConfigFile::new(&config_for(&backends, "")),
        &["prlimit", "--nofile=64:64"],
    );
    let mut hogs = Vec::new();
    for _ in 0..100 {
        hogs.push(tokio::net::TcpStream::connect(proxy.public).await.unwrap());
    }
    let clients = Clients::new();
    // Every descriptor is taken: accept() fails with EMFILE, and the proxy keeps trying. The hogs
    // stay until it has said so: dropped earlier, they could free descriptors before the proxy
    // ever ran out.
    eventually(
        Duration::from_secs(10),
        "the proxy runs out of descriptors",
        || {
            let failed = proxy.stderr_lines("accept failed") > 0;
            async move { failed }
        },
    )
    .await;
    drop(hogs);
    let url = format!("http://{}/", proxy.public);
    eventually(
        Duration::from_secs(10),
        "the proxy serves again once descriptors are free",
        || {
            let clients = clients.clone();
            let url = url.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(2),
                    clients.http1.get(url.parse().unwrap()),
                )
                .await
                .is_ok_and(|result| {
                    result.is_ok_and(|response| response.status() == StatusCode::OK)
                })
            }
        },
    )
    .await;
    let scrape = format!("http://{}/metrics", proxy.admin);
    let text = clients.get(&scrape).await.text();
    let errors = metric(&text, "bouncer_accept_errors_total{listener=\"public\"}").unwrap();
    assert!(errors > 0.0, "accept errors were counted:\n{text}");
}

#[test]
fn every_example_config_is_valid() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_some_and(|extension| extension == "toml")
        {
            let output = Command::new(BINARY)
                .args(["check", "--config"])
                .arg(&path)
                .output()
                .unwrap();
            assert_eq!(
                output.status.code(),
                Some(0),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} examples found");
}
