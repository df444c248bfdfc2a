//! A real headless Chromium (Debian's `chromium`, which `scripts/test` installs), driven over the
//! Chrome DevTools Protocol: open a page, evaluate script in it, take a screenshot.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium with its own profile directory; killed and cleaned up when dropped.
pub struct Browser {
    child: Child,
    profile: PathBuf,
    /// `127.0.0.1:PORT` of its DevTools endpoint.
    devtools: String,
}

/// One page (tab) of the browser.
pub struct Page {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium; panics with a clear message when it is not installed.
    pub async fn start(name: &str) -> Browser {
        let program = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|program| crate::pebble::which(program))
            .expect("Chromium is not installed: scripts/test installs Debian's chromium package");
        let profile =
            std::env::temp_dir().join(format!("bouncer-chromium-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&profile).expect("a profile directory");
        // The flags keep a headless Chromium from reaching out to the network by itself.
        let mut child = Command::new(program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--window-size=1400,1500",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start Chromium");
        let stderr = child.stderr.take().expect("Chromium's stderr");
        // Chromium names its DevTools address on stderr once it listens.
        let (sender, receiver) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut sender = Some(sender);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(address) = line
                    .split("ws://")
                    .nth(1)
                    .and_then(|rest| rest.split('/').next())
                    && let Some(sender) = sender.take()
                {
                    let _ = sender.send(address.to_string());
                }
            }
        });
        let devtools = tokio::time::timeout(CALL_TIMEOUT, receiver)
            .await
            .expect("Chromium's DevTools address within 30 s")
            .expect("Chromium printed its DevTools address");
        Browser {
            child,
            profile,
            devtools,
        }
    }

    /// Opens `url` in a new page.
    pub async fn open(&self, url: &str) -> Page {
        let answer = crate::Clients::new()
            .send(
                http::Request::put(format!("http://{}/json/new?{url}", self.devtools))
                    .body(crate::empty())
                    .expect("a request"),
            )
            .await;
        let target: Value = serde_json::from_slice(&answer.body).expect("a DevTools target");
        let address = target["webSocketDebuggerUrl"]
            .as_str()
            .expect("the page's DevTools socket");
        let (socket, _) = tokio_tungstenite::connect_async(address)
            .await
            .expect("connect to the page's DevTools socket");
        Page { socket, next_id: 1 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Page {
    /// Calls a DevTools method and returns its result; panics on a protocol error.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .expect("send to DevTools");
        let answer = tokio::time::timeout(CALL_TIMEOUT, async {
            while let Some(message) = self.socket.next().await {
                let Ok(Message::Text(text)) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
                // Events have no id; answers to this call carry its id.
                if value["id"].as_u64() == Some(id) {
                    return value;
                }
            }
            panic!("the DevTools socket closed");
        })
        .await
        .expect("a DevTools answer within 30 s");
        if let Some(error) = answer.get("error") {
            panic!("{method} failed: {error}");
        }
        answer["result"].clone()
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    pub async fn evaluate(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is true, or panics naming `what` after `deadline`. While
    /// the page is still loading the expression may throw, which counts as false.
    pub async fn wait_for(&mut self, deadline: Duration, what: &str, expression: &str) {
        let start = tokio::time::Instant::now();
        let guarded = format!(
            "(() => {{ try {{ return ({expression}); }} catch (error) {{ return false; }} }})()"
        );
        loop {
            if self.evaluate(&guarded).await == Value::Bool(true) {
                return;
            }
            assert!(
                start.elapsed() < deadline,
                "{what}: not within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG screenshot of the page to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let result = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let data = result["data"].as_str().expect("screenshot data");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot's directory");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}
