//! A real Redis server on loopback for one test: Debian's `redis-server` on a port of its own,
//! with no persistence, so that nothing outlives the test.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::pebble::{free_port, which};

/// A running `redis-server`; dropping it kills the server.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    server: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub async fn start(test: &str) -> RedisServer {
        assert!(
            which("redis-server"),
            "redis-server is not installed: scripts/test installs Debian's redis-server package"
        );
        let dir = std::env::temp_dir().join(format!("bouncer-redis-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis's directory");
        let mut redis = RedisServer {
            port: free_port(),
            dir,
            server: None,
        };
        redis.restart().await;
        redis
    }

    /// The address to give `[cluster] redis`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (as a crash would) and waits until it is gone. Its data is lost.
    pub async fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill().await;
        }
    }

    /// Stops (`SIGSTOP`) or resumes (`SIGCONT`) the server: a Redis that hangs rather than dies.
    pub async fn freeze(&self, frozen: bool) {
        let pid = self
            .server
            .as_ref()
            .and_then(Child::id)
            .expect("redis-server runs");
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Starts the server again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill().await;
        let log = std::fs::File::create(self.dir.join("redis.log")).expect("redis's log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(log.try_clone().expect("redis's log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        self.server = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.command(&["PING"]).await.as_deref() != Some("+PONG") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start; its log:\n{}",
                std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends one command and gives the first line of the answer (`+PONG`, `:1`, `$5`...), or
    /// `None` when the server cannot be reached.
    pub async fn command(&self, words: &[&str]) -> Option<String> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .ok()?;
        let mut request = format!("*{}\r\n", words.len());
        for word in words {
            request.push_str(&format!("${}\r\n{word}\r\n", word.len()));
        }
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        let mut buffer = [0u8; 512];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !answer.windows(2).any(|pair| pair == b"\r\n") {
            let read = tokio::time::timeout_at(deadline, stream.read(&mut buffer))
                .await
                .ok()?
                .ok()?;
            if read == 0 {
                return None;
            }
            answer.extend_from_slice(&buffer[..read]);
        }
        let text = String::from_utf8_lossy(&answer);
        text.split("\r\n").next().map(str::to_string)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(server) = &mut self.server {
            let _ = server.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
