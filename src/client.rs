//! A Rust client for branchd's WebSocket protocol (version 1), used by the
//! integration tests and the benchmarks, and usable by any Rust program.
//!
//! [`Client::connect`] opens `/ws`, waits for the `welcome` frame and then
//! reads in the background: replies are matched to requests by `id` (so
//! many requests can be in flight), events are queued for
//! [`Client::next_event`]. It speaks only what `docs/protocol.md` says.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use crate::protocol::Welcome;
use crate::protocol::{Event, Op, OpError, Reply, request_frame};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<rmpv::Value, OpError>>>>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the upgrade with an HTTP error (401, 403, 404, 503, ...).
    #[error("refused with HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    /// The server answered the request with an error.
    #[error("{}: {}", .0.code.as_str(), .0.message)]
    Op(OpError),
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the connection is closed")]
    Closed,
}

impl ClientError {
    /// The server's error, if the server answered with one.
    pub fn op_error(&self) -> Option<&OpError> {
        match self {
            ClientError::Op(err) => Some(err),
            _ => None,
        }
    }
}

/// A frame the server sent that is neither an event nor a reply to a
/// pending request (a reply to a raw frame, for instance).
#[derive(Debug, Clone, PartialEq)]
pub enum Unmatched {
    Reply {
        id: u64,
        result: Result<rmpv::Value, OpError>,
    },
    Undecodable(Vec<u8>),
}

pub struct Client {
    sink: tokio::sync::Mutex<SplitSink<Socket, Message>>,
    pending: Pending,
    next_id: AtomicU64,
    events: mpsc::UnboundedReceiver<Event>,
    unmatched: mpsc::UnboundedReceiver<Unmatched>,
    welcome: Welcome,
    reader: tokio::task::JoinHandle<()>,
    timeout: Duration,
}

/// Percent-encodes a query value.
fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Deserialize)]
struct Frame {
    id: Option<u64>,
    event: Option<String>,
    ok: Option<rmpv::Value>,
    err: Option<rmpv::Value>,
}

/// An error reply as this client understands it. A code from a newer server
/// that this client does not know is treated like `internal`, as the
/// protocol asks, with the server's message kept.
fn read_error(err: rmpv::Value) -> OpError {
    let mut bytes = Vec::new();
    if rmpv::encode::write_value(&mut bytes, &err).is_ok()
        && let Ok(known) = rmp_serde::from_slice::<OpError>(&bytes)
    {
        return known;
    }
    let text = |key: &str| err[key].as_str().unwrap_or_default().to_string();
    OpError::new(
        crate::protocol::ErrorCode::Internal,
        format!("{} ({})", text("message"), text("code")),
    )
}

impl Client {
    /// Connects to the server at `base` (`http://host:port`) as the owner of
    /// `token`, on a branch of a project, and waits for `welcome`.
    pub async fn connect(
        base: &str,
        token: &str,
        project: i64,
        branch: &str,
    ) -> Result<Client, ClientError> {
        let url = format!(
            "{}/ws?project={project}&branch={}",
            base.replacen("http", "ws", 1),
            encode_query(branch)
        );
        let mut request = url.into_client_request()?;
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Protocol("the token is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", bearer);
        Self::open(request).await
    }

    /// Connects with a ready-made request (a browser-style `access_token`
    /// query, say).
    pub async fn open(
        request: tungstenite::handshake::client::Request,
    ) -> Result<Client, ClientError> {
        // The same small read buffer as the server (see `gateway::ws::READ_BUFFER`).
        let config = tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(crate::gateway::ws::READ_BUFFER);
        let (socket, _) = match tokio_tungstenite::connect_async_with_config(
            request,
            Some(config),
            false,
        )
        .await
        {
            Ok(connected) => connected,
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(ClientError::Refused { status, body });
            }
            Err(err) => return Err(err.into()),
        };
        let (sink, mut stream) = socket.split();
        let welcome = loop {
            match stream.next().await {
                Some(Ok(Message::Binary(bytes))) => break read_welcome(&bytes)?,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => {
                    return Err(ClientError::Protocol(format!(
                        "expected welcome, got {other:?}"
                    )));
                }
                Some(Err(err)) => return Err(err.into()),
                None => return Err(ClientError::Closed),
            }
        };
        let pending: Pending = Arc::default();
        let (events_in, events) = mpsc::unbounded_channel();
        let (unmatched_in, unmatched) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read(stream, pending.clone(), events_in, unmatched_in));
        Ok(Client {
            sink: tokio::sync::Mutex::new(sink),
            pending,
            next_id: AtomicU64::new(1),
            events,
            unmatched,
            welcome,
            reader,
            timeout: Duration::from_secs(120),
        })
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Sends `op` and waits for its reply.
    pub async fn request(&self, op: Op) -> Result<Reply, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = request_frame(id, &op).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let ok = self.exchange(id, frame).await?;
        Reply::from_wire(op.name(), &ok).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `ping`: the server tag of the node this socket is on.
    pub async fn ping(&self) -> Result<String, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ok = self.exchange(id, crate::protocol::ping_frame(id)).await?;
        ok["node"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ClientError::Protocol("ping reply without node".into()))
    }

    /// Sends an encoded request with `id` and waits for the `ok` value.
    async fn exchange(&self, id: u64, frame: Vec<u8>) -> Result<rmpv::Value, ClientError> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id, tx);
        }
        self.send_raw(Message::Binary(frame.into())).await?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Ok(ok))) => Ok(ok),
            Ok(Ok(Err(err))) => Err(ClientError::Op(err)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Protocol(format!("no reply to request {id}"))),
        }
    }

    /// Sends any frame as it is (for testing what the server does with it).
    pub async fn send_raw(&self, message: Message) -> Result<(), ClientError> {
        self.sink.lock().await.send(message).await?;
        Ok(())
    }

    /// The next event, waiting at most `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next frame that matched no request, waiting at most `timeout`.
    pub async fn next_unmatched(&mut self, timeout: Duration) -> Option<Unmatched> {
        tokio::time::timeout(timeout, self.unmatched.recv())
            .await
            .ok()
            .flatten()
    }

    /// True once the server closed the connection (or it broke).
    pub fn is_closed(&self) -> bool {
        self.reader.is_finished()
    }

    /// Closes the socket politely.
    pub async fn close(self) {
        let _ = self.sink.lock().await.send(Message::Close(None)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.reader).await;
    }
}

fn read_welcome(bytes: &[u8]) -> Result<Welcome, ClientError> {
    match rmp_serde::from_slice::<Event>(bytes) {
        Ok(Event::Welcome(welcome)) => Ok(welcome),
        Ok(Event::Error {
            code,
            message,
            retry_after_ms,
        }) => Err(ClientError::Op(OpError {
            retry_after_ms,
            ..OpError::new(code, message)
        })),
        Ok(other) => Err(ClientError::Protocol(format!(
            "expected welcome first, got {other:?}"
        ))),
        Err(err) => Err(ClientError::Protocol(format!(
            "undecodable first frame: {err}"
        ))),
    }
}

async fn read(
    mut stream: SplitStream<Socket>,
    pending: Pending,
    events: mpsc::UnboundedSender<Event>,
    unmatched: mpsc::UnboundedSender<Unmatched>,
) {
    while let Some(Ok(message)) = stream.next().await {
        let bytes = match message {
            Message::Binary(bytes) => bytes,
            Message::Close(_) => break,
            _ => continue,
        };
        let Ok(frame) = rmp_serde::from_slice::<Frame>(&bytes) else {
            let _ = unmatched.send(Unmatched::Undecodable(bytes.to_vec()));
            continue;
        };
        if frame.event.is_some() {
            match rmp_serde::from_slice::<Event>(&bytes) {
                Ok(event) => {
                    let _ = events.send(event);
                }
                Err(_) => {
                    let _ = unmatched.send(Unmatched::Undecodable(bytes.to_vec()));
                }
            }
            continue;
        }
        let Some(id) = frame.id else {
            let _ = unmatched.send(Unmatched::Undecodable(bytes.to_vec()));
            continue;
        };
        let result = match (frame.ok, frame.err) {
            (_, Some(err)) => Err(read_error(err)),
            (Some(ok), None) => Ok(ok),
            (None, None) => Ok(rmpv::Value::Nil),
        };
        let waiter = pending.lock().ok().and_then(|mut p| p.remove(&id));
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(result);
            }
            None => {
                let _ = unmatched.send(Unmatched::Reply { id, result });
            }
        }
    }
    // Wake every waiter: the connection is gone.
    if let Ok(mut pending) = pending.lock() {
        pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn unknown_error_codes_read_as_internal_and_known_ones_keep_their_details() {
        let unknown = rmpv::Value::Map(vec![
            ("code".into(), "from_the_future".into()),
            ("message".into(), "slow down".into()),
        ]);
        let err = read_error(unknown);
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(err.message.contains("slow down") && err.message.contains("from_the_future"));

        let known = rmpv::Value::Map(vec![
            ("code".into(), "conflict".into()),
            ("message".into(), "stale".into()),
            ("current_version".into(), "abc".into()),
        ]);
        let err = read_error(known);
        assert_eq!(
            (err.code, err.current_version.as_deref()),
            (ErrorCode::Conflict, Some("abc"))
        );
    }
}
