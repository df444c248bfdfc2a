//! A real ACME CA on loopback: Debian's `pebble`, with `pebble-challtestsrv` as its only DNS
//! server (every name resolves to 127.0.0.1, so no lookup leaves the machine), serving its API
//! with a certificate made for it at test time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::TestCa;

/// A running pebble and its DNS server; dropping it stops both.
pub struct Pebble {
    /// The ACME directory URL.
    pub directory: String,
    /// The PEM file of the CA that signed pebble's HTTPS certificate.
    pub directory_ca: PathBuf,
    dir: PathBuf,
    dns_port: u16,
    settings: PebbleSettings,
    pebble: Option<Child>,
    _dns: Child,
}

/// Where pebble validates challenges, and what it issues.
#[derive(Debug, Clone, Copy)]
pub struct PebbleSettings {
    /// The port pebble sends http-01 checks to.
    pub http_port: u16,
    /// The port pebble sends tls-alpn-01 checks to.
    pub tls_port: u16,
    /// The lifetime of the certificates it issues.
    pub validity: Duration,
}

/// A port free on 127.0.0.1 now, for a server that cannot be told to bind port 0 and report it.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local address").port()
}

impl Pebble {
    /// Starts pebble and its DNS server and waits until pebble accepts connections.
    pub async fn start(test: &str, settings: PebbleSettings) -> Pebble {
        for program in ["pebble", "pebble-challtestsrv"] {
            assert!(
                which(program),
                "{program} is not installed: scripts/test installs Debian's pebble package"
            );
        }
        let dir =
            std::env::temp_dir().join(format!("bouncer-pebble-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("pebble's directory");
        let ca = TestCa::new("pebble test CA");
        ca.issue(&["127.0.0.1", "localhost"]).write(&dir, "pebble");
        let directory_ca = dir.join("pebble-ca.pem");
        std::fs::write(&directory_ca, &ca.cert_pem).expect("write pebble's CA");

        let dns_port = free_port();
        let dns = Command::new("pebble-challtestsrv")
            .args([
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-management",
                &format!("127.0.0.1:{}", free_port()),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start pebble-challtestsrv");

        let api_port = free_port();
        let config = format!(
            r#"{{
  "pebble": {{
    "listenAddress": "127.0.0.1:{api_port}",
    "managementListenAddress": "127.0.0.1:{management}",
    "certificate": "{dir}/pebble.pem",
    "privateKey": "{dir}/pebble.key",
    "httpPort": {http},
    "tlsPort": {tls},
    "ocspResponderURL": "",
    "externalAccountBindingRequired": false,
    "certificateValidityPeriod": {validity}
  }}
}}"#,
            management = free_port(),
            dir = dir.display(),
            http = settings.http_port,
            tls = settings.tls_port,
            validity = settings.validity.as_secs(),
        );
        std::fs::write(dir.join("pebble-config.json"), config).expect("write pebble's config");
        let mut pebble = Pebble {
            directory: format!("https://127.0.0.1:{api_port}/dir"),
            directory_ca,
            dir,
            dns_port,
            settings,
            pebble: None,
            _dns: dns,
        };
        pebble.restart().await;
        pebble
    }

    /// Stops pebble (its DNS server stays); the CA forgets every account and order.
    pub async fn stop(&mut self) {
        if let Some(mut pebble) = self.pebble.take() {
            // Killed and waited for, so that its ports are free again.
            let _ = pebble.kill().await;
        }
    }

    /// Starts pebble again on the same ports, with a new CA and no accounts.
    pub async fn restart(&mut self) {
        self.stop().await;
        let log = std::fs::File::create(self.dir.join("pebble.log")).expect("pebble's log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(self.dir.join("pebble-config.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            .args(["-strict", "false"])
            // Validation at once, no random nonce rejections, no reused authorizations: the
            // same steps every run.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log.try_clone().expect("pebble's log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start pebble");
        self.pebble = Some(child);
        let address: SocketAddr = self
            .directory
            .trim_start_matches("https://")
            .trim_end_matches("/dir")
            .parse()
            .expect("pebble's address");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(address).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pebble did not start; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What pebble logged, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }

    pub fn settings(&self) -> PebbleSettings {
        self.settings
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

pub(crate) fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
