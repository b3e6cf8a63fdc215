//! The WebSocket gateway: `GET /ws?project=<id>&branch=<name>`.
//!
//! The upgrade is refused with a plain HTTP error before any socket exists
//! (401 no or bad token, 403 not a member, 404 unknown project or branch,
//! 503 draining). After it, each socket gets:
//!
//! - a **connection actor** ([`ConnectionActor`]) that decodes frames,
//!   checks the role, hands each op to the workspace actor (in the order
//!   received, so a write then a read on one socket behave) and lets many
//!   be in flight at once, replies matched by `id`;
//! - a **ping actor** ([`PingActor`]) that pings every
//!   `BRANCHD_PING_INTERVAL` and closes a socket that misses two pongs;
//! - a reader task (socket → connection actor), a writer task (bounded
//!   queue → socket) and an event forwarder (workspace events → queue).
//!
//! Nothing here ever waits on a slow client: every frame goes through the
//! bounded queue with `try_send`, and a client whose queue is full is closed
//! with a reason. Every way a socket ends (close, error, missed pongs, slow
//! reader, drain, a panic) removes the session through [`SessionGuard`].
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
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::AppState;
use super::auth::authenticate;
use super::error::ApiError;
use crate::allocator::Allocator;
use crate::protocol::{
    ErrorCode, Event, Op, OpError, OpResult, PROTOCOL_VERSION, Role, SessionId, ok_frame,
};
use crate::storage::WorkspaceKey;
use crate::workspace::{SessionInfo, Workspace, WorkspaceMsg, needs_editor};

/// Frames queued for one socket before its client counts as too slow.
const SEND_QUEUE: usize = 1024;
/// Events queued between a workspace and one connection.
const EVENT_QUEUE: usize = 1024;
/// Requests one connection may have in flight at once.
const MAX_IN_FLIGHT: usize = 256;
/// Pongs a client may miss before its socket is closed.
const MISSED_PONGS: u32 = 2;
/// How long a request may wait for its workspace.
const OP_TIMEOUT: Duration = Duration::from_secs(120);

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
                let hard_limit =
                    usize::try_from(state.config.max_frame.saturating_mul(2)).unwrap_or(usize::MAX);
                upgrade
                    .max_message_size(hard_limit)
                    .max_frame_size(hard_limit)
                    .on_upgrade(move |socket| serve(socket, state, target))
            }
        },
    }
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
    let token = match token_of(&headers, query.ok().and_then(|Query(q)| q.access_token)) {
        Ok(token) => token,
        Err(err) => return err.into_response(),
    };
    if let Err(err) = authenticate(&state, &token).await {
        return err.into_response();
    }
    let Ok(upgrade) = upgrade else {
        return ApiError::bad_request("GET /ws/echo takes a WebSocket upgrade").into_response();
    };
    let limit = usize::try_from(state.config.max_frame).unwrap_or(usize::MAX);
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(|mut socket| async move {
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
    let token = token_of(headers, query.access_token.clone())?;
    let caller = authenticate(state, &token).await?;
    if *state.draining.borrow() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "this node is shutting down; connect again to reach another",
        ));
    }
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

/// Sends an error event and a close frame, best effort.
fn close_with(out: &mpsc::Sender<Message>, code: ErrorCode, close: u16, reason: &str) {
    let _ = out.try_send(encode(&Event::Error {
        code,
        message: reason.to_string(),
    }));
    let _ = out.try_send(Message::Close(Some(CloseFrame {
        code: close,
        reason: reason.chars().take(120).collect::<String>().into(),
    })));
}

/// Runs one socket from welcome to cleanup.
async fn serve(socket: WebSocket, state: AppState, target: Target) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut queue) = mpsc::channel::<Message>(SEND_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(message) = queue.recv().await {
            let closing = matches!(message, Message::Close(_));
            if sink.send(message).await.is_err() || closing {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let Target { session, key } = target;
    let (events, mut incoming_events) = mpsc::channel::<Event>(EVENT_QUEUE);
    let registration = match state
        .allocator
        .register(session.clone(), &key, events)
        .await
    {
        Ok(registration) => registration,
        Err(err) => {
            tracing::info!(workspace = %key, error = %err.message, "connection refused by the workspace");
            close_with(&out, err.code, 1011, &err.message);
            drop(out);
            let _ = writer.await;
            return;
        }
    };
    let guard = SessionGuard {
        allocator: state.allocator.clone(),
        session: session.id.clone(),
        key: key.clone(),
    };
    let node = state.server_tag.to_string();
    let welcome = Event::Welcome {
        protocol: PROTOCOL_VERSION,
        session: session.id.clone(),
        node: node.clone(),
        owner: state.allocator.server_tag().to_string(),
        project: key.project_id,
        branch: key.branch.clone(),
        role: session.role,
        head: registration.welcome.head.clone(),
    };
    let _ = out.try_send(encode(&welcome));
    tracing::info!(workspace = %key, session = %session.id, user = %session.username, "connected");

    let (connection, _) = match Actor::spawn(
        None,
        ConnectionActor,
        ConnectionArgs {
            session,
            key: key.clone(),
            workspace: registration.workspace,
            allocator: state.allocator.clone(),
            out: out.clone(),
            node,
            max_frame: state.config.max_frame,
            guard,
        },
    )
    .await
    {
        Ok(spawned) => spawned,
        Err(err) => {
            tracing::error!(error = %err, "starting a connection actor failed");
            close_with(
                &out,
                ErrorCode::Internal,
                1011,
                "the server could not start this connection",
            );
            return;
        }
    };
    let pinger = Actor::spawn_linked(
        None,
        PingActor,
        PingArgs {
            interval: state.config.ping_interval,
            out: out.clone(),
            connection: connection.clone(),
        },
        connection.get_cell(),
    )
    .await
    .ok()
    .map(|(pinger, _)| pinger);

    // Workspace events go straight to the queue; a full queue closes the socket.
    let forwarder = {
        let (out, connection) = (out.clone(), connection.clone());
        tokio::spawn(async move {
            while let Some(event) = incoming_events.recv().await {
                if out.try_send(encode(&event)).is_err() {
                    let _ = connection.cast(ConnectionMsg::Close {
                        code: ErrorCode::Unavailable,
                        reason: "the client is not reading fast enough; reconnect".into(),
                    });
                    return;
                }
            }
            // The workspace dropped this session (failed, killed, or it was too slow).
            let _ = connection.cast(ConnectionMsg::Close {
                code: ErrorCode::Unavailable,
                reason: "the workspace closed this session; reconnect".into(),
            });
        })
    };
    drop(out);

    let mut draining = state.draining.clone();
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(Message::Pong(_))) => {
                    if let Some(pinger) = &pinger {
                        let _ = pinger.cast(PingMsg::Pong);
                    }
                }
                Some(Ok(Message::Ping(_))) => {} // answered by the WebSocket layer
                Some(Ok(message)) => {
                    if connection.cast(ConnectionMsg::Frame(message)).is_err() {
                        break;
                    }
                }
            },
            _ = super::until_set(&mut draining) => {
                let _ = connection.cast(ConnectionMsg::Drain);
                // Keep reading until the client or the writer closes.
                while let Some(Ok(message)) = stream.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
                break;
            }
        }
        if matches!(
            connection.get_status(),
            ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
        ) {
            break;
        }
    }
    forwarder.abort();
    connection.stop(None);
    let _ = writer.await;
}

/// Removes the session (allocator and store) however the connection ends,
/// a panic of the connection actor included.
struct SessionGuard {
    allocator: Allocator,
    session: SessionId,
    key: WorkspaceKey,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let (allocator, session, key) = (
            self.allocator.clone(),
            self.session.clone(),
            self.key.clone(),
        );
        tracing::info!(workspace = %key, session = %session, "disconnected");
        tokio::spawn(async move { allocator.deregister(&session, &key).await });
    }
}

pub struct ConnectionActor;

pub struct ConnectionArgs {
    session: SessionInfo,
    key: WorkspaceKey,
    workspace: Workspace,
    allocator: Allocator,
    out: mpsc::Sender<Message>,
    node: String,
    max_frame: u64,
    guard: SessionGuard,
}

pub enum ConnectionMsg {
    /// A frame from the client (binary or text).
    Frame(Message),
    /// Close the socket with a reason (missed pongs, slow reader, ...).
    Close { code: ErrorCode, reason: String },
    /// The node is draining: tell the client to reconnect, then close.
    Drain,
}

pub struct ConnectionState {
    session: SessionInfo,
    key: WorkspaceKey,
    workspace: Workspace,
    allocator: Allocator,
    out: mpsc::Sender<Message>,
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

/// A frame's id if it has a usable one.
fn frame_id(map: &[(rmpv::Value, rmpv::Value)]) -> Result<Option<u64>, OpError> {
    match map.iter().find(|(k, _)| k.as_str() == Some("id")) {
        None => Ok(None),
        Some((_, value)) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| OpError::bad_request("id must be an unsigned integer")),
    }
}

/// Decodes a binary frame; an error comes with the id to answer, if any.
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
    let value: rmpv::Value = rmp_serde::from_slice(bytes).map_err(|e| {
        (
            None,
            OpError::bad_request(format!("the frame is not valid MessagePack: {e}")),
        )
    })?;
    let rmpv::Value::Map(map) = value else {
        return Err((
            None,
            OpError::bad_request("a frame must be a MessagePack map with named fields"),
        ));
    };
    let id = frame_id(&map).map_err(|e| (None, e))?;
    let op = match map.iter().find(|(k, _)| k.as_str() == Some("op")) {
        None => return Err((id, OpError::bad_request("the frame has no op"))),
        Some((_, op)) => op
            .as_str()
            .ok_or_else(|| (id, OpError::bad_request("op must be a string")))?
            .to_string(),
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
    let op: Op = rmpv::ext::from_value(rmpv::Value::Map(map)).map_err(|e| {
        let detail = e.to_string();
        let message = if detail.contains("unknown variant") {
            format!("unknown op {op:?}; docs/protocol.md lists the ops")
        } else {
            format!("bad arguments for {op}: {detail}")
        };
        (Some(id), OpError::bad_request(message))
    })?;
    Ok(Decoded::Op { id, op })
}

impl Actor for ConnectionActor {
    type Msg = ConnectionMsg;
    type State = ConnectionState;
    type Arguments = ConnectionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ConnectionMsg>,
        args: ConnectionArgs,
    ) -> Result<ConnectionState, ActorProcessingErr> {
        Ok(ConnectionState {
            session: args.session,
            key: args.key,
            workspace: args.workspace,
            allocator: args.allocator,
            out: args.out,
            node: args.node,
            max_frame: args.max_frame,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            _guard: args.guard,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ConnectionMsg>,
        message: ConnectionMsg,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ConnectionMsg::Frame(Message::Binary(bytes)) => state.frame(&myself, &bytes),
            ConnectionMsg::Frame(_) => state.send_event(
                Event::Error {
                    code: ErrorCode::BadRequest,
                    message:
                        "text frames are not part of the protocol: send binary MessagePack frames"
                            .into(),
                },
                &myself,
            ),
            ConnectionMsg::Close { code, reason } => {
                tracing::info!(session = %state.session.id, %reason, "closing the connection");
                close_with(&state.out, code, 1008, &reason);
                myself.stop(Some(reason));
            }
            ConnectionMsg::Drain => {
                let _ = state.out.try_send(encode(&Event::Reconnect {
                    reason: "this node is shutting down; connect again".into(),
                }));
                let _ = state.out.try_send(Message::Close(Some(CloseFrame {
                    code: 1012, // service restart
                    reason: "node draining".into(),
                })));
                myself.stop(Some("drain".into()));
            }
        }
        Ok(())
    }
}

impl ConnectionState {
    /// Queues a frame; a full queue means the client is not reading: close.
    fn send(&self, frame: Message, myself: &ActorRef<ConnectionMsg>) {
        if self.out.try_send(frame).is_err() {
            let _ = myself.cast(ConnectionMsg::Close {
                code: ErrorCode::Unavailable,
                reason: "the client is not reading fast enough; reconnect".into(),
            });
        }
    }

    fn send_event(&self, event: Event, myself: &ActorRef<ConnectionMsg>) {
        self.send(encode(&event), myself);
    }

    fn answer(&self, id: Option<u64>, err: OpError, myself: &ActorRef<ConnectionMsg>) {
        match id {
            Some(id) => self.send(reply_frame(id, &Err(err)), myself),
            None => self.send_event(
                Event::Error {
                    code: err.code,
                    message: err.message,
                },
                myself,
            ),
        }
    }

    fn frame(&mut self, myself: &ActorRef<ConnectionMsg>, bytes: &[u8]) {
        let (id, op) = match decode(bytes, self.max_frame) {
            Err((id, err)) => return self.answer(id, err, myself),
            Ok(Decoded::Ping { id }) => {
                let pong = rmp_serde::to_vec_named(&Pong { node: &self.node })
                    .map_err(|e| OpError::internal("encoding a pong", e));
                return self.send(reply_frame(id, &pong), myself);
            }
            Ok(Decoded::Op { id, op }) => (id, op),
        };
        if needs_editor(&op) && self.session.role < Role::Editor {
            let err = OpError::forbidden(format!(
                "{} needs the editor role; you are {}",
                op.name(),
                self.session.role.as_str()
            ));
            return self.answer(Some(id), err, myself);
        }
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let err = OpError::new(
                ErrorCode::Unavailable,
                format!("more than {MAX_IN_FLIGHT} requests in flight: wait for replies"),
            );
            return self.answer(Some(id), err, myself);
        };
        // The live actor of the key (a new one after a restart).
        if let Some(current) = self.allocator.get(&self.key) {
            self.workspace = current;
        }
        // Cast now, in arrival order; wait for the reply in a task so that
        // many requests can be in flight.
        let (reply, answer) = oneshot::channel::<OpResult>();
        let sent = self.workspace.actor().cast(WorkspaceMsg::Op {
            session: self.session.id.clone(),
            op,
            reply: reply.into(),
        });
        let (out, myself) = (self.out.clone(), myself.clone());
        tokio::spawn(async move {
            let result = match sent {
                Err(_) => Err(OpError::new(
                    ErrorCode::Unavailable,
                    "the workspace is restarting; retry",
                )),
                Ok(()) => match tokio::time::timeout(OP_TIMEOUT, answer).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_)) => Err(OpError::new(
                        ErrorCode::Unavailable,
                        "the workspace stopped while handling this request; retry",
                    )),
                    Err(_) => Err(OpError::new(
                        ErrorCode::Unavailable,
                        "the workspace did not answer in time; retry",
                    )),
                },
            };
            if out.try_send(reply_frame(id, &to_wire(result))).is_err() {
                let _ = myself.cast(ConnectionMsg::Close {
                    code: ErrorCode::Unavailable,
                    reason: "the client is not reading fast enough; reconnect".into(),
                });
            }
            drop(permit);
        });
    }
}

pub struct PingActor;

pub struct PingArgs {
    interval: Duration,
    out: mpsc::Sender<Message>,
    connection: ActorRef<ConnectionMsg>,
}

pub enum PingMsg {
    Tick,
    Pong,
}

pub struct PingState {
    out: mpsc::Sender<Message>,
    connection: ActorRef<ConnectionMsg>,
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
            out: args.out,
            connection: args.connection,
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
                if state.unanswered >= MISSED_PONGS {
                    let _ = state.connection.cast(ConnectionMsg::Close {
                        code: ErrorCode::Unavailable,
                        reason: format!("no answer to {MISSED_PONGS} pings; reconnect"),
                    });
                    myself.stop(None);
                    return Ok(());
                }
                state.unanswered += 1;
                let _ = state.out.try_send(Message::Ping(Vec::new().into()));
            }
        }
        Ok(())
    }
}
