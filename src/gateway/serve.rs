//! The HTTP listener: accepts TCP connections, admits each one within the
//! node's connection budget, and serves HTTP/1.1 on it with the router until
//! the node stops.
//!
//! Limits, all from the configuration:
//! - **header read timeout**: a client has this long, from the moment the
//!   connection opens or its previous response is sent, to send a request's
//!   headers in full (hyper enforces it); a half-open or slowloris
//!   connection is closed.
//! - **idle timeout**: a connection on which no byte has been read or
//!   written for this long is closed, whatever state its request is in (a
//!   body that never comes, a response nobody reads). A connection upgraded
//!   to a WebSocket leaves HTTP here: its liveness is the socket's pings.
//! - **connections**: at most `max_connections` open at once (the budget
//!   [`connection_budget`] derives from the open-file limit, so that the
//!   database and the working copies always have file descriptors left),
//!   and at most `max_per_address` from one [`ClientAddr`]. A connection
//!   beyond either is closed as soon as it is accepted, before any byte is
//!   read. WebSockets count for as long as they are open.
//! - **accept errors** (the process is out of file descriptors after all):
//!   the loop pauses, 10 ms and doubling up to 1 s, instead of spinning, and
//!   leaves waiting clients in the kernel's queue until it can take them.
//!
//! Every request carries the peer's address as axum's `ConnectInfo`. This
//! module never reads a request itself, never decides anything about routes
//! or callers, and never lets one connection hold up the accept loop.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{Service as _, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::peer::ClientAddr;
use crate::config::Config;

/// The shortest and longest pause of the accept loop after an accept error.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Refused connections are logged at most once per this interval (with a
/// count), so a flood does not become a flood of log lines.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The fewest connections an automatic budget may come to; below it the
/// node refuses to start rather than serve almost nobody.
const MIN_CONNECTION_BUDGET: u64 = 16;

/// How HTTP connections are limited (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// `None`: no limit.
    pub header_read_timeout: Option<Duration>,
    /// `None`: no limit.
    pub idle_timeout: Option<Duration>,
    pub max_connections: usize,
    /// 0: no limit per address.
    pub max_per_address: usize,
}

impl HttpLimits {
    /// The configured limits with a connection budget already worked out
    /// (see [`connection_budget`]).
    pub fn from_config(config: &Config, max_connections: usize) -> HttpLimits {
        let off_when_zero = |d: Duration| (!d.is_zero()).then_some(d);
        HttpLimits {
            header_read_timeout: off_when_zero(config.header_read_timeout),
            idle_timeout: off_when_zero(config.http_idle_timeout),
            max_connections,
            max_per_address: config.max_connections_per_address,
        }
    }
}

/// How many HTTP connections this node may hold open: `configured` if not
/// 0, else the open-file limit less `fd_reserve` (descriptors kept for the
/// database, working copies, node links and the process itself). Raises
/// the soft open-file limit to the hard one first. Fails when an automatic
/// budget would leave almost nothing for clients.
pub fn connection_budget(configured: usize, fd_reserve: u64) -> anyhow::Result<usize> {
    let limit = match raise_open_file_limit() {
        Ok(limit) => limit,
        Err(err) => {
            tracing::warn!(error = %err, "reading the open-file limit failed");
            u64::MAX
        }
    };
    let fits = limit.saturating_sub(fd_reserve);
    if configured != 0 {
        if u64::try_from(configured).unwrap_or(u64::MAX) > fits {
            tracing::warn!(
                max_connections = configured,
                open_file_limit = limit,
                fd_reserve,
                "BRANCHD_MAX_CONNECTIONS is above the open-file limit less BRANCHD_FD_RESERVE: \
                 under a flood of connections the database may run out of file descriptors"
            );
        }
        return Ok(configured);
    }
    if fits < MIN_CONNECTION_BUDGET {
        anyhow::bail!(
            "the open-file limit ({limit}) less BRANCHD_FD_RESERVE ({fd_reserve}) leaves {fits} \
             HTTP connections; raise the limit (ulimit -n, LimitNOFILE=) or lower BRANCHD_FD_RESERVE"
        );
    }
    let budget = usize::try_from(fits).unwrap_or(usize::MAX);
    tracing::info!(
        max_connections = budget,
        open_file_limit = limit,
        fd_reserve,
        "HTTP connection budget"
    );
    Ok(budget)
}

/// Raises the soft limit on open files to the hard limit (where the kernel
/// allows) and returns the soft limit in force.
fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads only the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::info!(
                from = limit.rlim_cur,
                to = raised.rlim_cur,
                "raised the open-file limit"
            );
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// Accepts and serves connections until `stopping` is cancelled; then stops
/// accepting, lets every connection finish its request in flight (idle ones
/// close at once) and returns when all have closed. Upgraded connections
/// (WebSockets) are not waited for: their tasks are the sockets' own.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stopping: CancellationToken,
) {
    let admission = Arc::new(Admission::new(&limits));
    let connections = TaskTracker::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut pause = AcceptPause::default();
    let mut refusals = RefusalLog::default();
    loop {
        let accepted = tokio::select! {
            () = stopping.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                pause.succeeded();
                accepted
            }
            // The client gave up before we took the connection: nothing to do.
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                let wait = pause.failed(&err);
                tokio::select! {
                    () = stopping.cancelled() => break,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let permit = match admission.admit(ClientAddr::of(peer.ip())) {
            Ok(permit) => permit,
            Err(refused) => {
                refusals.record(refused, peer);
                // Closed before any byte is read: the cheapest answer.
                drop(stream);
                continue;
            }
        };
        // Small frames go out at once. Without it, a reply written right
        // after an event on the same socket waits for the client's delayed
        // ACK (40 ms on Linux): Nagle's algorithm.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "setting TCP_NODELAY on a connection failed");
        }
        connections.spawn(serve_connection(
            http.clone(),
            Tracked::new(stream, permit),
            peer,
            router.clone(),
            limits.idle_timeout,
            stopping.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it closes, is upgraded, idles out or (once
/// the node stops) has finished its request in flight.
async fn serve_connection(
    http: http1::Builder,
    io: Tracked,
    peer: SocketAddr,
    router: Router,
    idle_timeout: Option<Duration>,
    stopping: CancellationToken,
) {
    let activity = io.activity.clone();
    let router = TowerToHyperService::new(router);
    let service = service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.call(request)
    });
    let connection = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        let idle_deadline = idle_timeout.map(|timeout| activity.last() + timeout);
        let idle = async {
            match idle_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(err) = ended {
                    tracing::debug!(%peer, error = %err, "HTTP connection ended with an error");
                }
                return;
            }
            () = stopping.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = idle => {
                if let Some(timeout) = idle_timeout
                    && activity.last().elapsed() >= timeout
                {
                    tracing::debug!(%peer, "closing an HTTP connection idle for {timeout:?}");
                    return;
                }
            }
        }
    }
}

/// Accept errors that concern one connection only (it went away before it
/// was taken); any other error is the node's (out of file descriptors).
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The accept loop's pause after errors: doubling while they go on.
#[derive(Debug, Default)]
struct AcceptPause {
    /// Errors in a row; 0 while accepting works.
    failures: u32,
}

impl AcceptPause {
    fn failed(&mut self, err: &io::Error) -> Duration {
        if self.failures == 0 {
            tracing::warn!(
                error = %err,
                "accepting HTTP connections failed; pausing accepts until it works again \
                 (out of file descriptors? see BRANCHD_FD_RESERVE and BRANCHD_MAX_CONNECTIONS)"
            );
        }
        self.failures = self.failures.saturating_add(1);
        ACCEPT_PAUSE_MIN
            .saturating_mul(1u32 << self.failures.saturating_sub(1).min(16))
            .min(ACCEPT_PAUSE_MAX)
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "accepting HTTP connections again");
            self.failures = 0;
        }
    }
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// The node holds `max_connections` already.
    NodeFull,
    /// The client's address holds `max_per_address` already.
    AddressFull,
}

/// Counts refusals and logs them now and then.
#[derive(Debug, Default)]
struct RefusalLog {
    since: Option<Instant>,
    node_full: u64,
    address_full: u64,
}

impl RefusalLog {
    fn record(&mut self, refused: Refused, peer: SocketAddr) {
        match refused {
            Refused::NodeFull => self.node_full += 1,
            Refused::AddressFull => self.address_full += 1,
        }
        let now = Instant::now();
        if self
            .since
            .is_some_and(|since| now.duration_since(since) < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            last_peer = %peer,
            node_full = self.node_full,
            address_full = self.address_full,
            "refused HTTP connections: the node is at BRANCHD_MAX_CONNECTIONS (node_full) or \
             one address at BRANCHD_MAX_CONNECTIONS_PER_ADDRESS (address_full)"
        );
        self.since = Some(now);
        self.node_full = 0;
        self.address_full = 0;
    }
}

/// The open connections, in all and per address.
#[derive(Debug)]
struct Admission {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_address: HashMap<ClientAddr, usize>,
}

impl Admission {
    fn new(limits: &HttpLimits) -> Admission {
        Admission {
            max_total: limits.max_connections,
            max_per_address: limits.max_per_address,
            open: Mutex::new(Open::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for one more connection from `addr`, held until the permit
    /// is dropped.
    fn admit(self: &Arc<Self>, addr: ClientAddr) -> Result<ConnectionPermit, Refused> {
        let mut open = self.lock();
        if open.total >= self.max_total {
            return Err(Refused::NodeFull);
        }
        let from_addr = open.per_address.entry(addr).or_insert(0);
        if self.max_per_address != 0 && *from_addr >= self.max_per_address {
            return Err(Refused::AddressFull);
        }
        *from_addr += 1;
        open.total += 1;
        Ok(ConnectionPermit {
            admission: self.clone(),
            addr,
        })
    }
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
struct ConnectionPermit {
    admission: Arc<Admission>,
    addr: ClientAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.per_address.get_mut(&self.addr) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.per_address.remove(&self.addr);
            }
        }
    }
}

/// When bytes last moved on a connection.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// Milliseconds after `opened`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A connection's stream, noting every byte that moves and holding the
/// connection's place in the budget for as long as the stream lives (also
/// after an upgrade).
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
    _permit: ConnectionPermit,
}

impl Tracked {
    fn new(stream: TcpStream, permit: ConnectionPermit) -> Tracked {
        Tracked {
            stream,
            activity: Arc::new(Activity::new()),
            _permit: permit,
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> ClientAddr {
        ClientAddr::of(std::net::IpAddr::from([192, 0, 2, last]))
    }

    #[test]
    fn admission_caps_each_address_and_the_node_and_frees_places_on_drop() {
        let admission = Arc::new(Admission::new(&HttpLimits {
            header_read_timeout: None,
            idle_timeout: None,
            max_connections: 3,
            max_per_address: 2,
        }));
        let a1 = admission.admit(addr(1)).expect("first from a");
        let _a2 = admission.admit(addr(1)).expect("second from a");
        assert_eq!(admission.admit(addr(1)).err(), Some(Refused::AddressFull));
        let _b1 = admission.admit(addr(2)).expect("first from b");
        assert_eq!(admission.admit(addr(3)).err(), Some(Refused::NodeFull));
        drop(a1);
        let _c1 = admission.admit(addr(3)).expect("a place was freed");
        assert_eq!(admission.lock().per_address.len(), 3);
    }

    #[test]
    fn accept_pauses_double_up_to_a_second_and_start_over_after_a_success() {
        let mut pause = AcceptPause::default();
        let err = io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<u128> = (0..9).map(|_| pause.failed(&err).as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        pause.succeeded();
        assert_eq!(pause.failed(&err), ACCEPT_PAUSE_MIN);
    }
}
