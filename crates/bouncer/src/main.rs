//! The `bouncer` command: parses the command line, sets up logging and the runtime, and hands
//! over to `bouncer-proxy`. No proxy logic lives here.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

// A request allocates a few blocks of a kilobyte or two (header maps above all), past the sizes
// that glibc's malloc serves from its per-thread caches; mimalloc serves them from per-size pages.
// It replaces `malloc` and `free` themselves (its `override` feature), so that Rust's system
// allocator reaches its plain `mi_malloc`: the crate's `GlobalAlloc` asks for every block through
// `mi_malloc_aligned`, which takes a slower path, about 150 instructions more, whenever a page's
// free list needs refilling or a block is over a kilobyte. `bench/instructions` and `bench/run`
// measure the difference (see bench/README.md).
extern crate mimalloc;

/// Bouncer: a reverse proxy with load balancing, TLS termination, DDoS mitigation and caching.
#[derive(Parser, Debug)]
#[command(
    name = "bouncer",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  bouncer demo                      start demo backends and a proxy on 127.0.0.1:8080 (HTTPS on 8443)\n  bouncer check -c bouncer.toml     validate a config file\n  bouncer run -c bouncer.toml       run the proxy (same as: bouncer -c bouncer.toml)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Run the proxy with this config file (short for `bouncer run --config FILE`).
    #[arg(short, long, value_name = "FILE", global = false)]
    config: Option<PathBuf>,

    /// Log filter, such as `info` or `bouncer_proxy=debug` (RUST_LOG works too).
    #[arg(long, value_name = "FILTER", global = true)]
    log: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run {
        /// The config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Take the listening sockets over from the Bouncer running with this config (through
        /// its `server.upgrade_socket`), which then drains and exits: an upgrade without a
        /// refused connection.
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a config file: print every problem, exit 0 if it is valid and 1 if not.
    Check {
        /// The config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Start three demo backends and a proxy in front of them, with no files needed.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: SocketAddr,
        /// Where the demo proxy listens for HTTPS, with a certificate it makes itself.
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        /// Where the demo's admin API (metrics) listens.
        #[arg(long, default_value = "127.0.0.1:9900")]
        admin: SocketAddr,
    },
}

/// This program's file, as it was when the process started: on SIGUSR2 the binary at that path
/// (by then perhaps a newer one) is started to take over.
static PROGRAM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = init_logging(cli.log.as_deref()) {
        eprintln!("bouncer: {error:#}");
        return ExitCode::FAILURE;
    }
    if let Ok(program) = std::env::current_exe() {
        let _ = PROGRAM.set(program);
    }
    let command = match (cli.command, cli.config) {
        (Some(command), _) => command,
        (None, Some(config)) => Command::Run {
            config,
            takeover: false,
        },
        (None, None) => {
            eprintln!(
                "bouncer: say what to do: `bouncer demo`, `bouncer check -c FILE` or `bouncer run -c FILE` (see --help)"
            );
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Check { config } => return check(&config),
        Command::Run { config, takeover } => run(&config, takeover),
        Command::Demo { bind, https, admin } => demo(bind, https, admin),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bouncer: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Changes the running process's log filter; kept so that the admin API can use it.
static LOG_FILTER: std::sync::OnceLock<(
    String,
    tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
)> = std::sync::OnceLock::new();

/// Sets up logging with the `--log` filter, else `RUST_LOG`, else `info`. A `--log` filter that
/// does not parse is an error; a `RUST_LOG` one, which may be meant for another program, is
/// reported and `info` is used.
fn init_logging(filter: Option<&str>) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let mut ignored_env = None;
    let (text, parsed) = match filter {
        Some(text) => {
            // The parse error's own text already holds its cause, which a chain would repeat.
            let parsed = EnvFilter::try_new(text).map_err(|error| {
                anyhow::anyhow!("--log {text:?} is not a valid log filter: {error}")
            })?;
            (text.to_string(), parsed)
        }
        None => match std::env::var(EnvFilter::DEFAULT_ENV) {
            Ok(text) => match EnvFilter::try_new(&text) {
                Ok(parsed) => (text, parsed),
                Err(error) => {
                    ignored_env = Some((text, error));
                    ("info".to_string(), EnvFilter::new("info"))
                }
            },
            Err(_) => ("info".to_string(), EnvFilter::new("info")),
        },
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(parsed);
    // Diagnostics go to stderr; stdout belongs to the access log.
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    if let Some((ignored, error)) = ignored_env {
        tracing::warn!(filter = %ignored, %error, "RUST_LOG is not a valid log filter; logging at info");
    }
    let _ = LOG_FILTER.set((text, handle));
    Ok(())
}

/// The log filter in force and the means to change it, for the admin API.
fn log_filter_control() -> Option<(String, bouncer_proxy::LogFilterSetter)> {
    let (current, handle) = LOG_FILTER.get()?;
    let handle = handle.clone();
    Some((
        current.clone(),
        Box::new(move |text| {
            let filter = EnvFilter::try_new(text).map_err(|error| error.to_string())?;
            handle.reload(filter).map_err(|error| error.to_string())
        }),
    ))
}

fn check(path: &Path) -> ExitCode {
    match bouncer_config::load(path) {
        Ok(config) => {
            // Certificates are files of their own: they are read and checked as a start would.
            let mut broken = 0;
            for (index, listener) in config.listeners.iter().enumerate() {
                if let Some(tls) = &listener.tls
                    && let Err(error) =
                        bouncer_proxy::tls::ListenerTls::new(&listener.name, tls, None, None)
                {
                    broken += 1;
                    eprintln!(
                        "{}: listeners[{index}].tls: {}",
                        path.display(),
                        error_chain(&error)
                    );
                }
            }
            for upstream in &config.upstreams {
                if let Some(tls) = &upstream.tls
                    && let Err(error) = bouncer_proxy::tls::UpstreamTls::new(tls)
                {
                    broken += 1;
                    eprintln!(
                        "{}: upstreams.{}.tls: {}",
                        path.display(),
                        upstream.name,
                        error_chain(&error)
                    );
                }
            }
            // So are IP list files; and the connection cap must fit the open-file limit.
            if let Err(error) = bouncer_proxy::protection::Protection::new(
                &config.protection,
                &config.rate_limits,
                &config.rules,
                config.cluster.as_ref(),
                None,
                None,
            ) {
                broken += 1;
                eprintln!("{}: protection: {}", path.display(), error_chain(&error));
            }
            if let Err(error) = bouncer_proxy::check_connection_budget(&config) {
                broken += 1;
                eprintln!("{}: {error}", path.display());
            }
            if broken > 0 {
                eprintln!("{}: {broken} problem(s) found", path.display());
                return ExitCode::FAILURE;
            }
            println!(
                "{}: ok ({} listeners, {} routes, {} upstreams)",
                path.display(),
                config.listeners.len(),
                config.routes.len(),
                config.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            let problems = error.problems();
            for problem in &problems {
                eprintln!("{problem}");
            }
            eprintln!("{}: {} problem(s) found", path.display(), problems.len());
            ExitCode::FAILURE
        }
    }
}

fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let runtime = if workers == 1 {
        // One worker runs fastest on a plain current-thread runtime: no work stealing, no wakeups
        // across threads.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            builder.worker_threads(workers);
        }
        builder.enable_all().build()
    };
    runtime.context("cannot start the async runtime")
}

fn run(path: &Path, takeover: bool) -> anyhow::Result<()> {
    let config = bouncer_config::load(path)
        .map_err(|error| anyhow::anyhow!("{}", error.problems().join("\n")))?;
    report_open_file_limit();
    let inherited = if takeover {
        let socket = config.server.upgrade_socket.as_deref().with_context(|| {
            format!(
                "--takeover needs server.upgrade_socket in {}, the socket the running Bouncer hands its listeners over on",
                path.display()
            )
        })?;
        Some(
            bouncer_proxy::take_over(socket)
                .context("cannot take over from the running Bouncer")?,
        )
    } else {
        None
    };
    runtime(config.server.workers)?.block_on(async {
        let options = bouncer_proxy::StartOptions {
            log_filter: log_filter_control(),
            inherited,
        };
        let mut signals = Signals::listen()?;
        let proxy = bouncer_proxy::start_with(&config, options).await?;
        notify_systemd(&format!("READY=1\nMAINPID={}", std::process::id()));
        // Only now may the process this one replaces stop: this one serves, and systemd knows it
        // as the main process.
        proxy.complete_takeover().await;
        if wait_for_shutdown_signal(&mut signals, Some(&proxy)).await? == Stop::HandedOver {
            // Dropping the proxy (with the future that owns it) closes what is left at once.
            let finishing = proxy.finish_handover();
            tokio::pin!(finishing);
            tokio::select! {
                report = &mut finishing => {
                    if report.drained {
                        tracing::info!("every connection finished after the handover; exiting");
                    } else {
                        tracing::warn!("idle timeout and grace over after the handover; closing the connections left");
                    }
                }
                _ = signals.terminate.recv() => {
                    tracing::warn!("SIGTERM while draining after the handover: closing the connections left");
                }
                _ = signals.interrupt.recv() => {
                    tracing::warn!("SIGINT while draining after the handover: closing the connections left");
                }
            }
            return Ok(());
        }
        tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: finishing in-flight requests");
        let report = proxy.shutdown().await;
        if report.drained {
            tracing::info!("all connections finished; exiting");
        } else {
            tracing::warn!("grace period over; closing the connections left");
        }
        Ok(())
    })
}

fn demo(bind: SocketAddr, https: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    runtime(0)?.block_on(async {
        let mut signals = Signals::listen()?;
        let mut demo = bouncer_proxy::demo::start(bind, https, admin).await?;
        let backends: Vec<String> = demo.backends.iter().map(ToString::to_string).collect();
        println!(
            "Bouncer demo: a proxy on http://{bind} and https://localhost:{} in front of three backends ({}).",
            https.port(),
            backends.join(", ")
        );
        println!();
        println!("Its config:\n");
        for line in demo.config_text.lines() {
            println!("    {line}");
        }
        println!();
        println!("Load balancing at work, six requests through the proxy:");
        for answer in demo.sample_requests(6).await {
            println!("    {answer}");
        }
        println!();
        println!("A backend failing without any client noticing: backend 3 crashes, twelve requests follow.");
        let show = demo.show_failover(12).await;
        for answer in &show.answers_while_down {
            println!("    {answer}");
        }
        println!(
            "    -> {} of {} requests failed: requests that found backend 3 gone went to another backend.",
            show.failed,
            show.answers_while_down.len()
        );
        match show.back_after {
            Some(after) => println!(
                "Backend {} restarted; health checks returned it to rotation after {:.1} s.",
                show.crashed,
                after.as_secs_f64()
            ),
            None => println!("Backend {} restarted, but is not back yet.", show.crashed),
        }
        println!();
        println!("A flood refused at the door: 20 addresses send as fast as they can for 3 s while a normal client asks every 100 ms.");
        let flood = demo.show_flood(20, std::time::Duration::from_secs(3)).await;
        println!(
            "    attack: {} requests; {} reached a backend (each address's first 100 and 50/s), {} were refused (429), {} connections were shut at the door; {} addresses banned",
            flood.attack_requests,
            flood.attack_reached,
            flood.attack_refused,
            flood.attack_shut_out,
            flood.banned
        );
        println!(
            "    normal client: {} of {} requests served",
            flood.client_served, flood.client_sent
        );
        println!();
        println!("Caching: the backends mark /static as cacheable for a minute.");
        let cache = demo.show_cache().await;
        for (sent, status, told) in &cache.steps {
            println!("    {sent:<26} {status}  {told}");
        }
        println!(
            "    -> the backends were asked {} times for 4 GETs: once, then again after the purge.",
            cache.fetched
        );
        println!();
        println!("Try it yourself:");
        println!("    curl -i http://{bind}/hello          # round robin over the three backends");
        println!(
            "    curl --cacert {} https://localhost:{}/hello   # HTTPS, HTTP/2 by ALPN, with the certificate the demo made",
            demo.certificate.display(),
            https.port()
        );
        println!("    curl --http2-prior-knowledge http://{bind}/h2   # HTTP/2 without TLS");
        println!(
            "    curl -i http://{bind}/static/logo.txt   # see Cache-Status: a miss, then hits"
        );
        println!("    curl -X PURGE http://{bind}/static/logo.txt   # forget it");
        println!(
            "    curl -s http://{admin}/metrics | grep bouncer_requests   # Prometheus metrics"
        );
        println!("    curl -s http://{admin}/api/v1/upstreams   # the admin API");
        println!();
        println!("The live dashboard: open http://{admin}/ in a browser.");
        println!();
        println!("Press Ctrl-C to stop.");
        if let Some((current, set)) = log_filter_control() {
            demo.proxy.set_log_filter_control(&current, set);
        }
        wait_for_shutdown_signal(&mut signals, Some(&demo.proxy)).await?;
        demo.proxy.shutdown().await;
        Ok(())
    })
}

/// Why the proxy stops.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Signal,
    /// A new process took the listening sockets over.
    HandedOver,
}

/// The signals Bouncer answers, listened for from before the proxy starts: a signal that came
/// between the start and the first wait would otherwise take its default action (most end the
/// process).
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    reopen: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    upgrade: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            reopen: signal(SignalKind::user_defined1()).context("cannot listen for SIGUSR1")?,
            hangup: signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?,
            upgrade: signal(SignalKind::user_defined2()).context("cannot listen for SIGUSR2")?,
        })
    }
}

/// Waits for SIGTERM or SIGINT, or for a new process to take over; meanwhile SIGHUP reloads the
/// config file, SIGUSR1 reopens the access log (after logrotate moved it) and SIGUSR2 starts the
/// program again to take over.
async fn wait_for_shutdown_signal(
    signals: &mut Signals,
    proxy: Option<&bouncer_proxy::RunningProxy>,
) -> anyhow::Result<Stop> {
    let handed_over = async {
        match proxy {
            Some(proxy) => proxy.handed_over().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(handed_over);
    loop {
        tokio::select! {
            _ = signals.terminate.recv() => return Ok(Stop::Signal),
            _ = signals.interrupt.recv() => return Ok(Stop::Signal),
            pid = &mut handed_over => {
                tracing::info!(new_pid = pid, "handed over to a new process: draining, then exiting");
                return Ok(Stop::HandedOver);
            }
            _ = signals.hangup.recv() => {
                if let Some(proxy) = proxy {
                    tracing::info!("SIGHUP: reloading the config file");
                    // The outcome is logged and counted by the reload itself.
                    let _ = proxy.reload_from_file().await;
                }
            }
            _ = signals.reopen.recv() => {
                if let Some(proxy) = proxy {
                    tracing::info!("SIGUSR1: reopening the access log");
                    proxy.reopen_logs();
                }
            }
            _ = signals.upgrade.recv() => {
                if let Some(proxy) = proxy {
                    start_successor(proxy);
                }
            }
        }
    }
}

/// SIGUSR2: starts the program file again (a new version, after an upgrade replaced it) with
/// `--takeover`, as a child that outlives this process; it takes the listening sockets over, and
/// this process then drains and exits.
fn start_successor(proxy: &bouncer_proxy::RunningProxy) {
    let Some(program) = PROGRAM.get() else {
        tracing::error!(
            "SIGUSR2: the program's own path is unknown; start `bouncer run --takeover` by hand"
        );
        return;
    };
    let config = proxy.config_file();
    let mut command = std::process::Command::new(program);
    command
        .args(["run", "--takeover", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null());
    // The log filter in force now, which may have been changed through the API.
    if let Some(current) = proxy.log_filter() {
        command.arg("--log").arg(current);
    }
    match command.spawn() {
        Ok(mut child) => {
            tracing::info!(
                program = %program.display(),
                pid = child.id(),
                "SIGUSR2: started the new binary to take over"
            );
            // Reaped if it fails while this process still runs, so that it leaves no zombie.
            std::thread::spawn(move || child.wait());
        }
        Err(error) => {
            tracing::error!(program = %program.display(), %error, "SIGUSR2: cannot start the new binary")
        }
    }
}

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) about this process, when it runs under it.
fn notify_systemd(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sender) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = socket.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket address.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|address| sender.send_to_addr(state.as_bytes(), &address))
        }
        None => sender.send_to(state.as_bytes(), std::path::Path::new(&socket)),
    };
    if let Err(error) = sent {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

fn report_open_file_limit() {
    // Each proxied request can hold two descriptors: the client's and the backend's.
    const COMFORTABLE: u64 = 16_384;
    match bouncer_proxy::raise_open_file_limit() {
        Ok(limit) if limit < COMFORTABLE => tracing::warn!(
            limit,
            "the open-file limit is low: at most about {} connections can be proxied at once; raise it with `ulimit -n` or LimitNOFILE=",
            limit / 2
        ),
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
}

/// An error and its causes on one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
