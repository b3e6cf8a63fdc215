//! One open WebSocket, from welcome to cleanup: the socket task, its
//! outbox, writes and close.
//!
//! Each socket gets:
//!
//! - a **connection** ([`serve`] and its [`Connection`]): the one task that
//!   touches the socket. It decodes each frame, checks the role and sends
//!   the op to the workspace actor in the order received (so a write then a
//!   read on one socket behave), with many in flight at once; the
//!   workspace's [`Responder`] queues each answer straight back to this
//!   task, matched by `id`. Replies and events already queued are written
//!   together with one flush, so under load one system call carries many
//!   frames;
//! - a **keepalive** ([`Keepalive`], an arm of the same task's `select!`)
//!   that pings every `BRANCHD_PING_INTERVAL` and closes a socket that
//!   misses two pongs.
//!
//! A request thus crosses the workspace actor and nothing else. DESIGN.md
//! draws a connection *actor* here; it was one, and the hop to it and back
//! cost a cross-thread wake-up per request (see docs/performance.md), so
//! the socket task plays its part: it owns the connection's state and
//! handles one frame at a time, as the actor did.
//!
//! Nothing here makes a workspace wait on a slow client: events reach the
//! socket through a bounded queue the workspace fills with `try_send` (a
//! full queue detaches the session, and the socket is closed with a
//! reason); replies are capped by the in-flight limit and by the
//! connection's [`ReplyBudget`] (a request whose answer could be large is
//! sent on only while the bytes its answer may take fit; until then the
//! socket reads nothing more: backpressure, not buffering); a frame the
//! client does not take within 10 s closes the socket. Every way a socket ends
//! (close, error, missed pongs, slow reader, drain, a panic) removes the
//! session through [`SessionGuard`].
//!
//! Who may open a socket is decided before it exists (`super::ws`); how
//! frames are read and written is `crate::protocol::codec`. This module
//! must never block on a client while holding a workspace's attention.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite;

use super::AppState;
use crate::cluster::{Cluster, Route};
use crate::protocol::codec::{self, Request};
use crate::protocol::{
    ErrorCode, Event, Op, OpError, OpKind, OpResult, PROTOCOL_VERSION, SessionId, Welcome,
};
use crate::storage::WorkspaceKey;
use crate::workspace::{Responder, SessionInfo};

/// Events queued between a workspace and one connection.
const EVENT_QUEUE: usize = 1024;
/// Requests one connection may have in flight at once.
const MAX_IN_FLIGHT: usize = 256;
/// Pongs a client may miss before its socket is closed.
const MISSED_PONGS: u32 = 2;
/// Most frames written with one flush.
const WRITE_BATCH: usize = 64;
/// What a reply that is not large (see [`OpKind::large_reply`]) counts
/// against the reply budget: a few fields, a path and a version.
const SMALL_REPLY: u64 = 8 * 1024;

/// Who connects to what, decided before the upgrade.
pub struct Target {
    pub session: SessionInfo,
    pub key: WorkspaceKey,
}

/// A server frame as a WebSocket message.
fn binary(frame: Vec<u8>) -> Message {
    Message::Binary(frame.into())
}

/// What the socket task writes, in order of arrival.
enum Outgoing {
    /// A workspace's answer to request `id`, and what it was counted
    /// against the reply budget.
    Reply(u64, OpResult, u64),
    Frame(Message),
}

/// The socket task's queue. Unbounded, yet bounded in practice: replies are
/// capped by the in-flight limit, other frames are rare control frames.
type Outbox = mpsc::UnboundedSender<Outgoing>;

/// How long one frame may take to reach a client before it counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// Writes one frame; false if the client is gone or too slow to take it.
async fn write(sink: &mut Sink, message: Message) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await,
        Ok(Ok(()))
    )
}

/// Writes frames with one flush; false if the client is gone or too slow
/// to take them.
async fn write_all(sink: &mut Sink, frames: Vec<Message>) -> bool {
    let sending = async {
        for frame in frames {
            sink.feed(frame).await?;
        }
        sink.flush().await
    };
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, sending).await,
        Ok(Ok(()))
    )
}

/// Writes `first` and whatever the connection has queued behind it with
/// one flush. Returns the reply budget the written replies held, or `None`
/// once the client is gone or too slow.
async fn write_queued(
    sink: &mut Sink,
    first: Outgoing,
    queue: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> Option<u64> {
    let mut frames = Vec::new();
    let mut held = 0u64;
    let mut next = Some(first);
    while let Some(item) = next {
        frames.push(match item {
            Outgoing::Reply(id, result, cost) => {
                held = held.saturating_add(cost);
                binary(codec::reply_frame(id, result))
            }
            Outgoing::Frame(message) => message,
        });
        next = if frames.len() < WRITE_BATCH {
            queue.try_recv().ok()
        } else {
            None
        };
    }
    write_all(sink, frames).await.then_some(held)
}

/// Whether reading failed because a frame or message was over the
/// WebSocket layer's size limit (the socket can still say why it closes).
fn too_big(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(tungstenite::Error::Capacity(_)) = cause.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Writes an `error` event and a close frame, best effort.
async fn close_with(sink: &mut Sink, err: OpError, close: u16) {
    let reason: String = err.message.chars().take(120).collect();
    let event = binary(codec::encode(&Event::from(err)));
    if write(sink, event).await {
        let frame = CloseFrame {
            code: close,
            reason: reason.into(),
        };
        let _ = write(sink, Message::Close(Some(frame))).await;
    }
}

/// Runs one socket from welcome to cleanup. This task alone touches the
/// socket: it reads frames (handing each to its [`Connection`]), pings, and
/// writes replies, events and control frames. A request thus crosses one
/// actor (the workspace) and comes straight back here.
pub(super) async fn serve(socket: WebSocket, state: AppState, target: Target) {
    let (mut sink, mut stream) = socket.split();
    let Target { session, key } = target;
    let (events, mut incoming_events) = mpsc::channel::<Event>(EVENT_QUEUE);
    let registration = match state.cluster.register(session.clone(), &key, events).await {
        Ok(registration) => registration,
        Err(err) => {
            let err = OpError::from(err); // the edge: what the client is told
            tracing::info!(workspace = %key, error = %err.message, "connection refused by the workspace");
            close_with(&mut sink, err, 1011).await;
            return;
        }
    };
    let guard = SessionGuard {
        cluster: state.cluster.clone(),
        session: session.id.clone(),
        key: key.clone(),
        route: registration.route.clone(),
        tasks: state.sockets.clone(),
    };
    let node = state.server_tag.to_string();
    let welcome = Event::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        session: session.id.clone(),
        node: node.clone(),
        owner: registration.owner.clone(),
        project: key.project_id,
        branch: key.branch.clone(),
        role: session.role,
        head: registration.welcome.head.clone(),
        lock: registration.welcome.lock.clone(),
    });
    if !write(&mut sink, binary(codec::encode(&welcome))).await {
        return;
    }
    tracing::info!(workspace = %key, session = %session.id, user = %session.username, "connected");

    let (outbox, mut outgoing) = mpsc::unbounded_channel::<Outgoing>();
    let mut connection = Connection {
        session,
        route: registration.route,
        outbox,
        node,
        max_frame: state.config.max_frame,
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        budget: ReplyBudget::for_frames(state.config.max_frame),
        held_back: None,
        _guard: guard,
    };
    let mut keepalive = Keepalive::new(state.config.ping_interval);

    let draining = state.shutdown.draining().clone().cancelled_owned();
    tokio::pin!(draining);
    loop {
        tokio::select! {
            // A request held back for the reply budget stops all reading
            // (it keeps its place in line) until written replies free
            // enough of the budget.
            frame = stream.next(), if connection.held_back.is_none() => match frame {
                Some(Err(err)) => {
                    if too_big(&err) {
                        let reason = format!(
                            "a frame was larger than twice BRANCHD_MAX_FRAME ({} bytes); send less",
                            state.config.max_frame.saturating_mul(2)
                        );
                        close_with(&mut sink, OpError::too_large(reason), 1009).await;
                    }
                    break;
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(Message::Pong(_))) => keepalive.pong(),
                Some(Ok(Message::Ping(_))) => {} // answered by the WebSocket layer
                Some(Ok(Message::Binary(bytes))) => connection.frame(&bytes),
                Some(Ok(_)) => connection.event(Event::error(
                    ErrorCode::BadRequest,
                    "text frames are not part of the protocol: send binary MessagePack frames",
                )),
            },
            Some(item) = outgoing.recv() => {
                let Some(freed) = write_queued(&mut sink, item, &mut outgoing).await else {
                    break;
                };
                connection.freed(freed);
            }
            event = incoming_events.recv() => match event {
                Some(event) => {
                    let mut frames = vec![binary(codec::encode(&event))];
                    while frames.len() < WRITE_BATCH {
                        match incoming_events.try_recv() {
                            Ok(event) => frames.push(binary(codec::encode(&event))),
                            Err(_) => break,
                        }
                    }
                    if !write_all(&mut sink, frames).await {
                        break;
                    }
                }
                None => {
                    // The workspace dropped this session: it failed, was
                    // killed, or could not hand it events fast enough.
                    close_with(&mut sink, OpError::new(ErrorCode::Unavailable, "the workspace closed this session; reconnect"), 1008).await;
                    break;
                }
            },
            _ = keepalive.ticks.tick() => match keepalive.due(connection.held_back.is_some()) {
                Ping::Send => {
                    if !write(&mut sink, Message::Ping(Vec::new().into())).await {
                        break;
                    }
                }
                Ping::GiveUp => {
                    let reason = format!("no answer to {MISSED_PONGS} pings; reconnect");
                    tracing::info!(%reason, "closing the connection");
                    close_with(&mut sink, OpError::new(ErrorCode::Unavailable, reason), 1008).await;
                    break;
                }
            },
            _ = &mut draining => {
                let reconnect = binary(codec::encode(&Event::Reconnect {
                    reason: "this node is shutting down; connect again".into(),
                }));
                if write(&mut sink, reconnect).await {
                    let frame = CloseFrame { code: 1012, reason: "node draining".into() };
                    let _ = write(&mut sink, Message::Close(Some(frame))).await;
                }
                break;
            }
        }
    }
    drop(connection); // the session guard removes the session
    let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
}

/// Removes the session (allocator and store) however the connection ends,
/// a panic of the socket task included.
struct SessionGuard {
    cluster: Cluster,
    session: SessionId,
    key: WorkspaceKey,
    route: Route,
    tasks: crate::shutdown::TaskGroup,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let (cluster, session, route) = (
            self.cluster.clone(),
            self.session.clone(),
            self.route.clone(),
        );
        tracing::info!(workspace = %self.key, session = %session, "disconnected");
        self.tasks
            .spawn(async move { cluster.deregister(&session, &route).await });
    }
}

/// One socket's side of the protocol: who is connected, where their ops
/// go, and the queue back to the socket.
struct Connection {
    session: SessionInfo,
    route: Route,
    outbox: Outbox,
    node: String,
    max_frame: u64,
    in_flight: Arc<Semaphore>,
    budget: ReplyBudget,
    /// A request that waits for the reply budget; while it waits, the
    /// socket reads nothing more.
    held_back: Option<HeldBack>,
    _guard: SessionGuard,
}

/// A request read and checked, waiting for room in the reply budget.
struct HeldBack {
    id: u64,
    op: Op,
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl Connection {
    fn event(&self, event: Event) {
        let _ = self
            .outbox
            .send(Outgoing::Frame(binary(codec::encode(&event))));
    }

    /// Answers a request (with its id) or, without one, sends an `error` event.
    fn answer(&self, id: Option<u64>, err: OpError) {
        match id {
            Some(id) => {
                let _ = self.outbox.send(Outgoing::Reply(id, Err(err), 0));
            }
            None => self.event(Event::from(err)),
        }
    }

    /// Decodes one binary frame and sends its op on, or answers it.
    fn frame(&mut self, bytes: &[u8]) {
        let (id, op) = match codec::decode_request(bytes, self.max_frame) {
            Err(bad) => return self.answer(bad.id, bad.error),
            Ok(Request::Ping { id }) => {
                let pong = codec::pong_frame(id, &self.node);
                let _ = self.outbox.send(Outgoing::Frame(binary(pong)));
                return;
            }
            Ok(Request::Op { id, op }) => (id, op),
        };
        if let Err(message) = op.kind().authorize(self.session.role) {
            return self.answer(Some(id), OpError::forbidden(message));
        }
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let err = OpError::new(
                ErrorCode::Unavailable,
                format!("more than {MAX_IN_FLIGHT} requests in flight: wait for replies"),
            );
            return self.answer(Some(id), err);
        };
        let held = HeldBack { id, op, permit };
        if let Err(held) = self.dispatch(held) {
            self.held_back = Some(held);
        }
    }

    /// Sends a request on if the reply budget has room for its answer;
    /// gives it back otherwise.
    fn dispatch(&mut self, held: HeldBack) -> Result<(), HeldBack> {
        let cost = self.budget.cost(held.op.kind());
        if !self.budget.reserve(cost) {
            return Err(held);
        }
        let HeldBack { id, op, permit } = held;
        // Sent in arrival order; the workspace (here or on its owner node)
        // answers straight into the socket's queue, so many requests can be
        // in flight. Undelivered, the responder answers `unavailable` by
        // itself.
        let outbox = self.outbox.clone();
        let reply = Responder::new(move |result| {
            let _ = outbox.send(Outgoing::Reply(id, result, cost));
            drop(permit);
        });
        self.route.send(&self.session.id, op, reply);
        Ok(())
    }

    /// Gives back the budget of replies written, and sends on the request
    /// held back if it now fits.
    fn freed(&mut self, bytes: u64) {
        self.budget.release(bytes);
        if let Some(held) = self.held_back.take()
            && let Err(held) = self.dispatch(held)
        {
            self.held_back = Some(held);
        }
    }
}

/// The bytes of answers one connection may have coming at once: each
/// request sent on reserves what its answer could take (a frame for a
/// [large](OpKind::large_reply) one, [`SMALL_REPLY`] otherwise) until that
/// answer is written to the socket. A request that does not fit waits, and
/// the socket reads nothing behind it, so a client that asks faster than
/// it reads is slowed down instead of filling the server's memory.
#[derive(Debug)]
struct ReplyBudget {
    /// Twice the frame limit: two large answers in flight, one being
    /// written while the next is made.
    limit: u64,
    large: u64,
    reserved: u64,
}

impl ReplyBudget {
    fn for_frames(max_frame: u64) -> ReplyBudget {
        ReplyBudget {
            limit: max_frame.saturating_mul(2),
            large: max_frame,
            reserved: 0,
        }
    }

    fn cost(&self, kind: OpKind) -> u64 {
        if kind.large_reply() {
            self.large
        } else {
            SMALL_REPLY
        }
    }

    /// Takes `cost` from the budget if it fits. A connection with nothing
    /// reserved may always send one request on, however large, so no
    /// setting can stall it for good.
    fn reserve(&mut self, cost: u64) -> bool {
        let fits = self.reserved == 0 || self.reserved.saturating_add(cost) <= self.limit;
        if fits {
            self.reserved = self.reserved.saturating_add(cost);
        }
        fits
    }

    fn release(&mut self, cost: u64) {
        self.reserved = self.reserved.saturating_sub(cost);
    }
}

/// The socket's side of pinging: a tick every `BRANCHD_PING_INTERVAL`
/// (an arm of the socket task's `select!`; a ping actor per socket measured
/// dearer, see docs/performance.md) and a count of pings unanswered.
struct Keepalive {
    ticks: tokio::time::Interval,
    unanswered: u32,
}

/// What a tick asks of the socket.
#[derive(Debug, PartialEq, Eq)]
enum Ping {
    Send,
    /// `MISSED_PONGS` pings went unanswered: close the socket.
    GiveUp,
}

impl Keepalive {
    fn new(interval: Duration) -> Keepalive {
        let interval = interval.max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        // A socket task busy writing for a while pings once, not in a burst.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Keepalive {
            ticks,
            unanswered: 0,
        }
    }

    fn pong(&mut self) {
        self.unanswered = 0;
    }

    /// What to do at a tick. While reads are `paused` (backpressure), a
    /// pong could not be seen, so none counts as missed: the client is
    /// meanwhile taking replies, or the write timeout ends the socket.
    fn due(&mut self, paused: bool) -> Ping {
        if paused {
            self.unanswered = 0;
        }
        if self.unanswered >= MISSED_PONGS {
            return Ping::GiveUp;
        }
        self.unanswered += 1;
        Ping::Send
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_is_given_up_after_missed_pongs_and_kept_while_it_answers() {
        let mut keepalive = Keepalive::new(Duration::from_secs(1));
        assert_eq!(keepalive.due(false), Ping::Send);
        keepalive.pong();
        for _ in 0..MISSED_PONGS {
            assert_eq!(keepalive.due(false), Ping::Send);
        }
        assert_eq!(keepalive.due(false), Ping::GiveUp);
        // Reads paused: pongs cannot be seen, so none is missed.
        assert_eq!(keepalive.due(true), Ping::Send);
    }

    #[test]
    fn the_reply_budget_holds_two_large_answers_and_many_small_ones() {
        let mut budget = ReplyBudget::for_frames(1024 * 1024);
        let large = budget.cost(OpKind::ReadFile);
        let small = budget.cost(OpKind::WriteFile);
        assert_eq!((large, small), (1024 * 1024, SMALL_REPLY));
        assert!(budget.reserve(large));
        assert!(budget.reserve(large));
        assert!(!budget.reserve(large), "a third large answer waits");
        assert!(!budget.reserve(small), "so does anything behind it");
        budget.release(large);
        assert!(budget.reserve(large));
        budget.release(2 * large);
        for _ in 0..MAX_IN_FLIGHT {
            assert!(budget.reserve(small), "small answers fit by the hundred");
        }
    }

    #[test]
    fn an_empty_budget_lets_one_request_through_whatever_its_size() {
        let mut budget = ReplyBudget::for_frames(10);
        assert!(budget.reserve(1 << 40));
        assert!(!budget.reserve(1));
        budget.release(1 << 40);
        assert!(budget.reserve(1));
    }
}
