//! The WebSocket gateway: `GET /ws?project=<id>&branch=<name>`.
//!
//! The upgrade is refused with a plain HTTP error before any socket exists
//! (401 no or bad token, 403 not a member, 404 unknown project or branch,
//! 503 draining). After it, each socket gets:
//!
//! - a **connection** ([`serve`] and its [`Connection`]): the one task that
//!   touches the socket. It decodes each frame, checks the role and sends
//!   the op to the workspace actor in the order received (so a write then a
//!   read on one socket behave), with many in flight at once; the
//!   workspace's [`Responder`] queues each answer straight back to this
//!   task, matched by `id`. Replies and events already queued are written
//!   together with one flush, so under load one system call carries many
//!   frames;
//! - a **ping actor** ([`PingActor`]) that pings every
//!   `BRANCHD_PING_INTERVAL` and closes a socket that misses two pongs.
//!
//! A request thus crosses the workspace actor and nothing else. There used
//! to be a connection *actor* here, and the hop to it and back
//! cost a cross-thread wake-up per request (see docs/performance.md), so
//! the socket task plays its part: it owns the connection's state and
//! handles one frame at a time, as the actor did.
//!
//! Nothing here makes a workspace wait on a slow client: events reach the
//! socket through a bounded queue the workspace fills with `try_send` (a
//! full queue detaches the session, and the socket is closed with a
//! reason); replies are capped by the in-flight limit; a frame the client
//! does not take within 10 s closes the socket. Every way a socket ends
//! (close, error, missed pongs, slow reader, drain, a panic) removes the
//! session through [`SessionGuard`].
//!
//! The wire format is in `docs/protocol.md`; the types in `crate::protocol`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite;

use super::AppState;
use super::auth::authenticate;
use super::error::ApiError;
use crate::cluster::{Cluster, Route};
use crate::protocol::{
    ErrorCode, Event, Op, OpError, OpResult, PROTOCOL_VERSION, Role, SessionId, Welcome, ok_frame,
};
use crate::storage::WorkspaceKey;
use crate::workspace::{Responder, SessionInfo};

/// Events queued between a workspace and one connection.
const EVENT_QUEUE: usize = 1024;
/// Requests one connection may have in flight at once.
const MAX_IN_FLIGHT: usize = 256;
/// The WebSocket layer's read buffer. It zero-fills the free part of this
/// buffer before every read, so its default (128 KiB) cost a memset of up
/// to 128 KiB per small frame; larger frames still arrive whole (the
/// buffer grows for them).
pub const READ_BUFFER: usize = 8 * 1024;
/// Pongs a client may miss before its socket is closed.
const MISSED_PONGS: u32 = 2;
/// Most frames written with one flush.
const WRITE_BATCH: usize = 64;

#[derive(Deserialize)]
pub struct WsQuery {
    project: Option<String>,
    branch: Option<String>,
    access_token: Option<String>,
}

/// The upgrade: authenticate, authorise and find the workspace, then hand
/// the socket to a connection.
pub async fn upgrade(
    State(state): State<AppState>,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match prepare(&state, query, &headers).await {
        Err(err) => err.into_response(),
        Ok(target) => match upgrade {
            Err(_) => ApiError::bad_request(
                "GET /ws takes a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
            )
            .into_response(),
            Ok(upgrade) => {
                // Frames up to twice the limit are read and answered with
                // `too_large`; beyond that the socket is closed (1009).
                let hard_limit = state.config.max_frame.saturating_mul(2);
                configured(upgrade, hard_limit)
                    .on_upgrade(move |socket| serve(socket, state, target))
            }
        },
    }
}

/// The WebSocket layer's settings for a socket taking frames up to `limit`
/// bytes.
fn configured(upgrade: WebSocketUpgrade, limit: u64) -> WebSocketUpgrade {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    upgrade
        .read_buffer_size(READ_BUFFER)
        .max_message_size(limit)
        .max_frame_size(limit)
}

#[derive(Deserialize)]
pub struct EchoQuery {
    access_token: Option<String>,
}

/// `GET /ws/echo`: a diagnostics socket that sends every binary frame
/// back unchanged (clients measure the network; the benchmarks compare an
/// op's round trip with it). Needs any valid token.
pub async fn echo(
    State(state): State<AppState>,
    query: Result<Query<EchoQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Err(err) = admit(
        &state,
        &headers,
        query.ok().and_then(|Query(q)| q.access_token),
    )
    .await
    {
        return err.into_response();
    }
    let Ok(upgrade) = upgrade else {
        return ApiError::bad_request("GET /ws/echo takes a WebSocket upgrade").into_response();
    };
    configured(upgrade, state.config.max_frame).on_upgrade(|mut socket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            let reply = match message {
                Message::Binary(bytes) => Message::Binary(bytes),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

/// Who may open a socket: a valid token (header, else `access_token`) on a
/// node that is not draining.
async fn admit(
    state: &AppState,
    headers: &HeaderMap,
    query_token: Option<String>,
) -> Result<super::auth::AuthUser, ApiError> {
    let caller = authenticate(state, &token_of(headers, query_token)?).await?;
    if *state.draining.borrow() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "this node is shutting down; connect again to reach another",
        ));
    }
    Ok(caller)
}

/// The bearer token from the Authorization header, else from `access_token`.
fn token_of(headers: &HeaderMap, query_token: Option<String>) -> Result<String, ApiError> {
    match headers.get(axum::http::header::AUTHORIZATION) {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(|t| t.trim().to_string())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            }),
        None => query_token.ok_or_else(|| {
            ApiError::unauthorized(
                "missing credentials: send `Authorization: Bearer <token>` or the access_token query parameter",
            )
        }),
    }
}

/// Who connects to what, decided before the upgrade.
struct Target {
    session: SessionInfo,
    key: WorkspaceKey,
}

async fn prepare(
    state: &AppState,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
) -> Result<Target, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let caller = admit(state, headers, query.access_token.clone()).await?;
    let project: i64 = query
        .project
        .as_deref()
        .ok_or_else(|| {
            ApiError::bad_request(
                "the project query parameter is missing: /ws?project=<id>&branch=<name>",
            )
        })?
        .parse()
        .map_err(|_| ApiError::bad_request("project must be a project id (an integer)"))?;
    let branch = query.branch.filter(|b| !b.is_empty()).ok_or_else(|| {
        ApiError::bad_request(
            "the branch query parameter is missing: /ws?project=<id>&branch=<name>",
        )
    })?;
    state
        .store
        .project(project)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("project {project} does not exist")))?;
    let role = if caller.user.is_admin {
        Role::Owner
    } else {
        state
            .store
            .member_role(project, caller.user.id)
            .await?
            .ok_or_else(|| {
                ApiError::forbidden(format!("you are not a member of project {project}"))
            })?
    };
    if !state.store.branches(project).await?.contains(&branch) {
        return Err(ApiError::not_found(format!(
            "branch {branch:?} of project {project} does not exist"
        )));
    }
    let session = SessionInfo {
        id: new_session_id(),
        user_id: caller.user.id,
        username: caller.user.username,
        display_name: caller.user.display_name,
        email: caller.user.email,
        role,
    };
    Ok(Target {
        session,
        key: WorkspaceKey::new(project, branch),
    })
}

fn new_session_id() -> SessionId {
    let mut bytes = [0u8; 12];
    // A failure of the OS random source leaves zeros; the time keeps ids apart.
    let _ = getrandom::fill(&mut bytes);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{}{:x}", hex::encode(bytes), nanos & 0xffff)
}

/// Encodes a server frame; our own types always encode.
fn encode<T: Serialize>(value: &T) -> Message {
    match rmp_serde::to_vec_named(value) {
        Ok(bytes) => Message::Binary(bytes.into()),
        Err(err) => {
            tracing::error!(error = %err, "encoding a frame failed");
            Message::Binary(Vec::new().into())
        }
    }
}

#[derive(Serialize)]
struct ErrFrame<'a> {
    id: u64,
    err: &'a OpError,
}

#[derive(Serialize)]
struct Pong<'a> {
    node: &'a str,
}

/// `{id, ok}` around an encoded `ok` map, or `{id, err}`.
fn reply_frame(id: u64, result: &Result<Vec<u8>, OpError>) -> Message {
    match result {
        Ok(ok) => Message::Binary(ok_frame(id, ok).into()),
        Err(err) => encode(&ErrFrame { id, err }),
    }
}

fn to_wire(result: OpResult) -> Result<Vec<u8>, OpError> {
    result.and_then(|reply| {
        reply
            .to_wire()
            .map_err(|e| OpError::internal("encoding a reply", e))
    })
}

/// What the socket task writes, in order of arrival.
enum Outgoing {
    /// A workspace's answer to request `id`.
    Reply(u64, OpResult),
    Frame(Message),
    /// An `error` event, then a close frame; the socket ends after it.
    Close {
        code: ErrorCode,
        close: u16,
        reason: String,
    },
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
/// one flush; false once the socket is done (gone, too slow, or closed on
/// purpose).
async fn write_queued(
    sink: &mut Sink,
    first: Outgoing,
    queue: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> bool {
    let mut frames = Vec::new();
    let mut closing = None;
    let mut next = Some(first);
    while let Some(item) = next {
        match item {
            Outgoing::Reply(id, result) => frames.push(reply_frame(id, &to_wire(result))),
            Outgoing::Frame(message) => frames.push(message),
            Outgoing::Close {
                code,
                close,
                reason,
            } => {
                closing = Some((code, close, reason));
                break;
            }
        }
        next = if frames.len() < WRITE_BATCH {
            queue.try_recv().ok()
        } else {
            None
        };
    }
    if !frames.is_empty() && !write_all(sink, frames).await {
        return false;
    }
    match closing {
        None => true,
        Some((code, close, reason)) => {
            tracing::info!(%reason, "closing the connection");
            close_with(sink, code, close, &reason).await;
            false
        }
    }
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
async fn close_with(sink: &mut Sink, code: ErrorCode, close: u16, reason: &str) {
    let event = encode(&Event::Error {
        code,
        message: reason.to_string(),
    });
    if write(sink, event).await {
        let frame = CloseFrame {
            code: close,
            reason: reason.chars().take(120).collect::<String>().into(),
        };
        let _ = write(sink, Message::Close(Some(frame))).await;
    }
}

/// Runs one socket from welcome to cleanup. This task alone touches the
/// socket: it reads and decodes frames (sending each op on its route) and
/// writes replies, events and control frames. A request thus crosses one
/// actor (the workspace) and comes straight back here.
async fn serve(socket: WebSocket, state: AppState, target: Target) {
    let (mut sink, mut stream) = socket.split();
    let Target { session, key } = target;
    let (events, mut incoming_events) = mpsc::channel::<Event>(EVENT_QUEUE);
    let registration = match state.cluster.register(session.clone(), &key, events).await {
        Ok(registration) => registration,
        Err(err) => {
            tracing::info!(workspace = %key, error = %err.message, "connection refused by the workspace");
            close_with(&mut sink, err.code, 1011, &err.message).await;
            return;
        }
    };
    let guard = SessionGuard {
        cluster: state.cluster.clone(),
        session: session.id.clone(),
        key: key.clone(),
        route: registration.route.clone(),
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
    if !write(&mut sink, encode(&welcome)).await {
        return;
    }
    tracing::info!(workspace = %key, session = %session.id, user = %session.username, "connected");

    let (outbox, mut outgoing) = mpsc::unbounded_channel::<Outgoing>();
    let mut connection = Connection {
        session,
        route: registration.route,
        outbox: outbox.clone(),
        node,
        max_frame: state.config.max_frame,
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        _guard: guard,
    };
    let pinger = Actor::spawn(
        None,
        PingActor,
        PingArgs {
            interval: state.config.ping_interval,
            outbox,
        },
    )
    .await
    .ok()
    .map(|(pinger, _)| pinger);

    let mut draining = state.draining.clone();
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Err(err)) => {
                    if too_big(&err) {
                        let reason = format!(
                            "a frame was larger than twice BRANCHD_MAX_FRAME ({} bytes); send less",
                            state.config.max_frame.saturating_mul(2)
                        );
                        close_with(&mut sink, ErrorCode::TooLarge, 1009, &reason).await;
                    }
                    break;
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(Message::Pong(_))) => {
                    if let Some(pinger) = &pinger {
                        let _ = pinger.cast(PingMsg::Pong);
                    }
                }
                Some(Ok(Message::Ping(_))) => {} // answered by the WebSocket layer
                Some(Ok(Message::Binary(bytes))) => connection.frame(&bytes),
                Some(Ok(_)) => connection.event(Event::Error {
                    code: ErrorCode::BadRequest,
                    message: "text frames are not part of the protocol: send binary MessagePack frames"
                        .into(),
                }),
            },
            Some(item) = outgoing.recv() => {
                if !write_queued(&mut sink, item, &mut outgoing).await {
                    break;
                }
            }
            event = incoming_events.recv() => match event {
                Some(event) => {
                    let mut frames = vec![encode(&event)];
                    while frames.len() < WRITE_BATCH {
                        match incoming_events.try_recv() {
                            Ok(event) => frames.push(encode(&event)),
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
                    close_with(&mut sink, ErrorCode::Unavailable, 1008, "the workspace closed this session; reconnect").await;
                    break;
                }
            },
            _ = super::until_set(&mut draining) => {
                let reconnect = encode(&Event::Reconnect {
                    reason: "this node is shutting down; connect again".into(),
                });
                if write(&mut sink, reconnect).await {
                    let frame = CloseFrame { code: 1012, reason: "node draining".into() };
                    let _ = write(&mut sink, Message::Close(Some(frame))).await;
                }
                break;
            }
        }
    }
    if let Some(pinger) = pinger {
        pinger.stop(None);
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
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let (cluster, session, route) = (
            self.cluster.clone(),
            self.session.clone(),
            self.route.clone(),
        );
        tracing::info!(workspace = %self.key, session = %session, "disconnected");
        tokio::spawn(async move { cluster.deregister(&session, &route).await });
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
    _guard: SessionGuard,
}

/// What the connection makes of one frame before it reaches a workspace.
enum Decoded {
    Ping { id: u64 },
    Op { id: u64, op: Op },
}

/// What [`decode`] reads of a frame before the op itself: its id and op
/// name, as found (their types are checked after), every other field
/// skipped unread. Reading the frame straight into its [`Op`] afterwards
/// (borrowing strings and bytes from the frame) spares the tree of
/// `rmpv::Value`s this used to build and copy for every request.
#[derive(Default)]
struct Head<'a> {
    id: Option<rmpv::ValueRef<'a>>,
    op: Option<rmpv::ValueRef<'a>>,
}

/// The text of a [`Head`] decoding error for a frame that is MessagePack
/// but not a map.
const NOT_A_MAP: &str = "a frame map";

impl<'de> Deserialize<'de> for Head<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Head<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(NOT_A_MAP)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Head<'de>, A::Error> {
                let mut head = Head::default();
                while let Some(key) = map.next_key::<rmpv::ValueRef<'de>>()? {
                    match text(&key) {
                        Some("id") => head.id = Some(map.next_value()?),
                        Some("op") => head.op = Some(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(head)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A MessagePack string's text.
fn text<'v>(value: &'v rmpv::ValueRef) -> Option<&'v str> {
    match value {
        rmpv::ValueRef::String(s) => s.as_str(),
        _ => None,
    }
}

/// Decodes one request frame: `Ping` is answered by the connection itself;
/// anything wrong comes back as the error to answer with (and the frame's
/// id, when it had a usable one).
fn decode(bytes: &[u8], max_frame: u64) -> Result<Decoded, (Option<u64>, OpError)> {
    if bytes.len() as u64 > max_frame {
        #[derive(Deserialize)]
        struct IdOnly {
            id: Option<u64>,
        }
        let id = rmp_serde::from_slice::<IdOnly>(bytes)
            .ok()
            .and_then(|f| f.id);
        return Err((
            id,
            OpError::too_large(format!(
                "the frame is {} bytes; the limit is {max_frame} (BRANCHD_MAX_FRAME)",
                bytes.len()
            )),
        ));
    }
    let head: Head = rmp_serde::from_slice(bytes).map_err(|e| {
        let message = if e.to_string().contains(NOT_A_MAP) {
            "a frame must be a MessagePack map with named fields".to_string()
        } else {
            format!("the frame is not valid MessagePack: {e}")
        };
        (None, OpError::bad_request(message))
    })?;
    let id = match head.id {
        None => None,
        Some(value) => Some(
            value
                .as_u64()
                .ok_or_else(|| (None, OpError::bad_request("id must be an unsigned integer")))?,
        ),
    };
    let op = match head.op {
        None => return Err((id, OpError::bad_request("the frame has no op"))),
        Some(ref op) => {
            text(op).ok_or_else(|| (id, OpError::bad_request("op must be a string")))?
        }
    };
    let Some(id) = id else {
        return Err((
            None,
            OpError::bad_request(format!(
                "the {op} request has no id: every request needs one"
            )),
        ));
    };
    if op == "ping" {
        return Ok(Decoded::Ping { id });
    }
    let decoded: Op = rmp_serde::from_slice(bytes).map_err(|e| {
        let detail = e.to_string();
        let message = if detail.contains("unknown variant") {
            format!("unknown op {op:?}; docs/protocol.md lists the ops")
        } else {
            format!("bad arguments for {op}: {detail}")
        };
        (Some(id), OpError::bad_request(message))
    })?;
    Ok(Decoded::Op { id, op: decoded })
}

impl Connection {
    fn event(&self, event: Event) {
        let _ = self.outbox.send(Outgoing::Frame(encode(&event)));
    }

    /// Answers a request (with its id) or, without one, sends an `error` event.
    fn answer(&self, id: Option<u64>, err: OpError) {
        match id {
            Some(id) => {
                let _ = self.outbox.send(Outgoing::Reply(id, Err(err)));
            }
            None => self.event(Event::Error {
                code: err.code,
                message: err.message,
            }),
        }
    }

    /// Decodes one binary frame and sends its op on, or answers it.
    fn frame(&mut self, bytes: &[u8]) {
        let (id, op) = match decode(bytes, self.max_frame) {
            Err((id, err)) => return self.answer(id, err),
            Ok(Decoded::Ping { id }) => {
                let pong = rmp_serde::to_vec_named(&Pong { node: &self.node })
                    .map_err(|e| OpError::internal("encoding a pong", e));
                let _ = self.outbox.send(Outgoing::Frame(reply_frame(id, &pong)));
                return;
            }
            Ok(Decoded::Op { id, op }) => (id, op),
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
        // Sent in arrival order; the workspace (here or on its owner node)
        // answers straight into the socket's queue, so many requests can be
        // in flight. Undelivered, the responder answers `unavailable` by
        // itself.
        let outbox = self.outbox.clone();
        let reply = Responder::new(move |result| {
            let _ = outbox.send(Outgoing::Reply(id, result));
            drop(permit);
        });
        self.route.send(&self.session.id, op, reply);
    }
}

pub struct PingActor;

pub struct PingArgs {
    interval: Duration,
    outbox: Outbox,
}

#[derive(ractor_cluster::RactorMessage)]
pub enum PingMsg {
    Tick,
    Pong,
}

pub struct PingState {
    outbox: Outbox,
    unanswered: u32,
}

impl Actor for PingActor {
    type Msg = PingMsg;
    type State = PingState;
    type Arguments = PingArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PingMsg>,
        args: PingArgs,
    ) -> Result<PingState, ActorProcessingErr> {
        myself.send_interval(args.interval, || PingMsg::Tick);
        Ok(PingState {
            outbox: args.outbox,
            unanswered: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<PingMsg>,
        message: PingMsg,
        state: &mut PingState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PingMsg::Pong => state.unanswered = 0,
            PingMsg::Tick => {
                if state.outbox.is_closed() {
                    // The socket is gone (its task ended without stopping us).
                    myself.stop(None);
                    return Ok(());
                }
                if state.unanswered >= MISSED_PONGS {
                    // Once: the socket task closes the socket and stops us.
                    if state.unanswered == MISSED_PONGS {
                        let _ = state.outbox.send(Outgoing::Close {
                            code: ErrorCode::Unavailable,
                            close: 1008,
                            reason: format!("no answer to {MISSED_PONGS} pings; reconnect"),
                        });
                        state.unanswered += 1;
                    }
                    return Ok(());
                }
                state.unanswered += 1;
                let _ = state
                    .outbox
                    .send(Outgoing::Frame(Message::Ping(Vec::new().into())));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::request_frame;

    const LIMIT: u64 = 1 << 20;

    fn error_of(bytes: &[u8]) -> (Option<u64>, String) {
        match decode(bytes, LIMIT) {
            Err((id, err)) => (id, err.message),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn a_request_decodes_to_its_op_with_its_bytes_intact() {
        let op = Op::WriteFile {
            path: "a/b.txt".into(),
            content: vec![0, 1, 2, 255],
            base_version: Some("v1".into()),
            force: false,
        };
        let frame = request_frame(7, &op).expect("encode");
        match decode(&frame, LIMIT) {
            Ok(Decoded::Op { id, op: decoded }) => {
                assert_eq!(id, 7);
                assert_eq!(decoded, op);
            }
            _ => panic!("expected the op back"),
        }
        assert!(matches!(
            decode(&crate::protocol::ping_frame(3), LIMIT),
            Ok(Decoded::Ping { id: 3 })
        ));
    }

    #[test]
    fn each_malformed_frame_is_named_for_what_is_wrong() {
        let msgpack = |v: serde_json::Value| rmp_serde::to_vec_named(&v).expect("encode");
        let (id, message) = error_of(&[0xc1]);
        assert_eq!(id, None);
        assert!(message.contains("not valid MessagePack"), "{message}");
        let (_, message) = error_of(&msgpack(serde_json::json!([1, 2])));
        assert!(message.contains("must be a MessagePack map"), "{message}");
        let (id, message) = error_of(&msgpack(serde_json::json!({"id": -1, "op": "save"})));
        assert_eq!(id, None);
        assert!(message.contains("unsigned integer"), "{message}");
        let (id, message) = error_of(&msgpack(serde_json::json!({"op": "save"})));
        assert_eq!(id, None);
        assert!(message.contains("the save request has no id"), "{message}");
        let (id, message) = error_of(&msgpack(serde_json::json!({"id": 4, "op": "fly"})));
        assert_eq!(id, Some(4));
        assert!(message.contains("unknown op \"fly\""), "{message}");
        let (id, message) = error_of(&msgpack(
            serde_json::json!({"id": 5, "op": "read_file", "path": 3}),
        ));
        assert_eq!(id, Some(5));
        assert!(
            message.starts_with("bad arguments for read_file"),
            "{message}"
        );
        // Fields a request does not know are skipped, as before.
        assert!(matches!(
            decode(
                &msgpack(serde_json::json!({"id": 6, "op": "lock", "x": [1]})),
                LIMIT
            ),
            Ok(Decoded::Op {
                id: 6,
                op: Op::Lock { ttl_ms: None }
            })
        ));
    }
}
