//! Zero-downtime upgrade: a new Bouncer process takes the listening sockets over from the running
//! one through a unix socket (`server.upgrade_socket`), passing the descriptors themselves
//! (SCM_RIGHTS). Both processes then hold the same sockets, so no connection attempt is refused
//! or reset: the kernel's accept queue is never closed. Only once the new process serves does it
//! say so, and only then does the old one stop accepting; it then finishes what it has (each
//! HTTP/1 connection is closed after its next response, which says `Connection: close`, or at
//! its idle timeout; HTTP/2 connections get a GOAWAY) and exits.
//!
//! The exchange, on a stream socket: the new process sends [`HELLO`]; the old one answers with a
//! JSON line naming its listeners, carrying their descriptors in the same order; the new process
//! sends [`READY`] once it serves on them; the old one answers [`BYE`].

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

const HELLO: &[u8] = b"BOUNCER-TAKEOVER 1\n";
const READY: &[u8] = b"READY\n";
const BYE: &[u8] = b"BYE\n";
/// Listeners one handover carries at most (every `[[listeners]]` entry and the admin listener).
const MAX_SOCKETS: usize = 64;
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The name the admin listener is handed over under.
pub(crate) const ADMIN: &str = "[admin]";

/// Why a takeover failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot reach a running Bouncer at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the handover with the running Bouncer failed")]
    Exchange(#[source] io::Error),
    #[error("the running Bouncer answered something this version does not understand: {0}")]
    Protocol(String),
}

/// Listening sockets taken over from the running process, by listener name, and the line to
/// tell it when they are served.
pub struct Inherited {
    sockets: HashMap<String, TcpListener>,
    /// The old process's id, for the log.
    pub previous_pid: u32,
    channel: UnixStream,
}

impl std::fmt::Debug for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inherited")
            .field("listeners", &self.sockets.keys().collect::<Vec<_>>())
            .field("previous_pid", &self.previous_pid)
            .finish_non_exhaustive()
    }
}

/// Asks the Bouncer listening on the upgrade socket at `path` for its listening sockets. Blocks
/// (briefly): call it before serving, or on a blocking thread.
pub fn take_over(path: &Path) -> Result<Inherited, UpgradeError> {
    let channel = UnixStream::connect(path).map_err(|source| UpgradeError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let exchange = UpgradeError::Exchange;
    channel
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(exchange)?;
    (&channel).write_all(HELLO).map_err(exchange)?;
    let mut payload = vec![0u8; 64 * 1024];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        &channel,
        &mut [IoSliceMut::new(&mut payload)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|error| exchange(error.into()))?;
    let mut descriptors: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            descriptors.extend(fds);
        }
    }
    let text = String::from_utf8_lossy(&payload[..received.bytes]);
    let offer: serde_json::Value = serde_json::from_str(text.trim())
        .map_err(|_| UpgradeError::Protocol(text.trim().to_string()))?;
    let names: Vec<String> = offer["listeners"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|name| name.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if names.len() != descriptors.len() {
        return Err(UpgradeError::Protocol(format!(
            "{} listener names came with {} descriptors",
            names.len(),
            descriptors.len()
        )));
    }
    let sockets = names
        .into_iter()
        .zip(descriptors)
        .map(|(name, fd)| (name, TcpListener::from(fd)))
        .collect();
    Ok(Inherited {
        sockets,
        previous_pid: offer["pid"]
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok())
            .unwrap_or(0),
        channel,
    })
}

impl Inherited {
    /// The socket of the listener `name`, if the old process had one.
    pub(crate) fn take(&mut self, name: &str) -> Option<TcpListener> {
        self.sockets.remove(name)
    }

    /// Tells the old process that this one serves, so that it stops accepting and drains.
    pub(crate) fn ready(self) -> io::Result<()> {
        (&self.channel).write_all(READY)?;
        let mut answer = String::new();
        BufReader::new(&self.channel).read_line(&mut answer)?;
        if answer.as_bytes() != BYE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the old process answered {answer:?} instead of BYE"),
            ));
        }
        Ok(())
    }
}

/// Binds the upgrade socket at `path`. A socket file that nobody answers on is a leftover and is
/// replaced; one that a running Bouncer answers on is refused, so that a second instance started
/// by mistake does not take the first one's place (that is what `--takeover` is for).
pub(crate) fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "a running Bouncer answers on it: start with --takeover to replace that process",
            ));
        }
        std::fs::remove_file(path)?;
    }
    bind_fresh(path)
}

/// Binds the upgrade socket at `path` in place of the old process's, which keeps its own open
/// but unreachable until it exits.
pub(crate) fn bind_replacing(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    bind_fresh(path)
}

fn bind_fresh(path: &Path) -> io::Result<UnixListener> {
    // Whoever may connect may take the proxy's sockets: only its own user. The socket is made
    // under another name and moved into place once its mode says so, so that it is never
    // reachable with a looser one.
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.new", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    let placed = std::fs::set_permissions(
        &staging,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .and_then(|()| std::fs::rename(&staging, path));
    if let Err(error) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(error);
    }
    Ok(listener)
}

/// Serves takeovers on `listener` until one succeeds, and returns the new process's id: the
/// caller then stops accepting and drains. Returns `None` when the proxy stops first.
pub(crate) async fn serve(
    listener: UnixListener,
    sockets: Vec<(String, Arc<tokio::net::TcpListener>)>,
    mut lifecycle: tokio::sync::watch::Receiver<crate::listener::Lifecycle>,
) -> Option<u32> {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "cannot serve the upgrade socket; upgrades are not possible");
            return None;
        }
    };
    let sockets = Arc::new(sockets);
    loop {
        let accepted = tokio::select! {
            _ = lifecycle.wait_for(|state| *state != crate::listener::Lifecycle::Running) => return None,
            accepted = listener.accept() => accepted,
        };
        let channel = match accepted.and_then(|(channel, _)| {
            let channel = channel.into_std()?;
            channel.set_nonblocking(false)?;
            Ok(channel)
        }) {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(%error, "upgrade socket accept failed");
                continue;
            }
        };
        let offered = Arc::clone(&sockets);
        // The exchange blocks, each step bounded by a timeout.
        let outcome = tokio::task::spawn_blocking(move || {
            hand_over(&channel, &offered).map(|()| peer_pid(&channel))
        })
        .await;
        match outcome {
            Ok(Ok(pid)) => return Some(pid),
            Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::debug!("the upgrade socket was probed");
            }
            // A failed attempt changes nothing here: keep serving, and wait for the next one.
            Ok(Err(error)) => {
                tracing::warn!(%error, "a takeover attempt failed; this process keeps serving");
            }
            Err(error) => {
                tracing::warn!(%error, "a takeover attempt failed; this process keeps serving");
            }
        }
    }
}

/// The whole exchange with a new process must be done within this.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest line either side sends.
const MAX_LINE: u64 = 256;

/// Reads one line of at most [`MAX_LINE`] bytes, by `deadline`.
fn read_line(
    reader: &mut BufReader<&UnixStream>,
    deadline: std::time::Instant,
) -> io::Result<String> {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    reader.get_ref().set_read_timeout(Some(left))?;
    let mut line = String::new();
    reader.by_ref().take(MAX_LINE).read_line(&mut line)?;
    Ok(line)
}

fn hand_over(
    channel: &UnixStream,
    sockets: &[(String, Arc<tokio::net::TcpListener>)],
) -> io::Result<()> {
    let deadline = std::time::Instant::now() + EXCHANGE_TIMEOUT;
    let mut reader = BufReader::new(channel);
    let hello = read_line(&mut reader, deadline)?;
    if hello.is_empty() {
        // A process checking whether a Bouncer answers here (see `bind`).
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if hello.as_bytes() != HELLO {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a takeover request: {hello:?}"),
        ));
    }
    // The file's mode already keeps other users out; the peer's own credentials say so too.
    let peer = rustix::net::sockopt::socket_peercred(channel)?;
    if peer.uid != rustix::process::getuid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "a process of user {} asked for the sockets; only this process's user may",
                peer.uid.as_raw()
            ),
        ));
    }
    let offer = serde_json::json!({
        "pid": std::process::id(),
        "listeners": sockets.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(),
    });
    let mut line = offer.to_string();
    line.push('\n');
    let fds: Vec<_> = sockets.iter().map(|(_, socket)| socket.as_fd()).collect();
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("too many listeners to hand over at once"));
    }
    rustix::net::sendmsg(
        channel,
        &[IoSlice::new(line.as_bytes())],
        &mut control,
        SendFlags::empty(),
    )?;
    let ready = read_line(&mut reader, deadline)?;
    if ready.as_bytes() != READY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the new process did not say it serves: {ready:?}"),
        ));
    }
    (&*channel).write_all(BYE)?;
    Ok(())
}

fn peer_pid(channel: &UnixStream) -> u32 {
    rustix::net::sockopt::socket_peercred(channel)
        .map(|credentials| credentials.pid.as_raw_nonzero().get().unsigned_abs())
        .unwrap_or(0)
}
