//! The server's frame codec: reading a client's request frame into its id
//! and [`Op`], and encoding the reply, error and pong frames that answer it.
//!
//! It owns what a malformed frame is called (the messages docs/protocol.md
//! lists under "Frames the server cannot use"). It works on bytes only and
//! must never know the transport (the gateway wraps the bytes in WebSocket
//! messages) nor a workspace.

use serde::{Deserialize, Serialize};

use super::{Op, OpError, OpKind, OpResult, ok_frame};

/// A request frame the server can act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// `{id, op: "ping"}`: answered by the connection, without a workspace.
    Ping {
        id: u64,
    },
    Op {
        id: u64,
        op: Op,
    },
}

/// A frame the server cannot use: the error to answer with, and the
/// frame's id when it had a usable one (without one, the answer is an
/// `error` event).
#[derive(Debug, PartialEq, Eq)]
pub struct BadFrame {
    pub id: Option<u64>,
    pub error: OpError,
}

impl BadFrame {
    fn new(id: Option<u64>, message: impl Into<String>) -> BadFrame {
        BadFrame {
            id,
            error: OpError::bad_request(message),
        }
    }
}

/// What [`decode_request`] reads of a frame before the op itself: its id
/// and op name, as found (their types are checked after), every other field
/// skipped unread. Reading the frame straight into its [`Op`] afterwards
/// (borrowing strings and bytes from the frame) spares the tree of
/// `rmpv::Value`s this used to build and copy for every request.
#[derive(Default)]
struct Head<'a> {
    id: Option<rmpv::ValueRef<'a>>,
    op: Option<rmpv::ValueRef<'a>>,
}

impl<'de> Deserialize<'de> for Head<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Head<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a frame map")
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

/// The deepest nesting of maps and arrays a frame may have, the frame's
/// own map included. A request needs three levels (`git_commit`'s
/// `paths`); the rest is room for fields a later client may add.
/// Decoding recurses once per level, and the decoder's own limit (1024)
/// let a frame of a few hundred bytes overflow the stack of the thread
/// decoding it, which aborts the whole process.
pub const MAX_FRAME_DEPTH: usize = 32;

/// Reads a value from a frame, refusing nesting beyond [`MAX_FRAME_DEPTH`].
fn from_frame<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut decoder = rmp_serde::Deserializer::from_read_ref(bytes);
    // The decoder refuses the level at which its count reaches zero.
    decoder.set_max_depth(MAX_FRAME_DEPTH + 1);
    T::deserialize(&mut decoder)
}

/// Reads a frame's [`Head`]. Whether the frame is a map is read from its
/// first byte (the MessagePack marker), so that "not a map" and "not
/// MessagePack" are told apart by what the bytes are, not by a decoder's
/// wording.
fn read_head(bytes: &[u8]) -> Result<Head<'_>, BadFrame> {
    let invalid = |e: rmp_serde::decode::Error| match e {
        rmp_serde::decode::Error::DepthLimitExceeded => BadFrame::new(
            None,
            format!("the frame nests maps and arrays more than {MAX_FRAME_DEPTH} levels deep"),
        ),
        e => BadFrame::new(None, format!("the frame is not valid MessagePack: {e}")),
    };
    let is_map = matches!(
        bytes.first().map(|&b| rmp::Marker::from_u8(b)),
        Some(rmp::Marker::FixMap(_) | rmp::Marker::Map16 | rmp::Marker::Map32)
    );
    if !is_map {
        return Err(match from_frame::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => BadFrame::new(None, "a frame must be a MessagePack map with named fields"),
            Err(e) => invalid(e),
        });
    }
    // A map's keys and values are read as any MessagePack value, so the
    // only ways this fails are bytes that are not MessagePack and nesting
    // that is too deep.
    from_frame(bytes).map_err(invalid)
}

/// Decodes one request frame of at most `max_frame` bytes. Each step knows
/// what it checks (size, shape, id, op name, then the op's arguments), so
/// the error says what is wrong without reading another error's text.
pub fn decode_request(bytes: &[u8], max_frame: u64) -> Result<Request, BadFrame> {
    if bytes.len() as u64 > max_frame {
        #[derive(Deserialize)]
        struct IdOnly {
            id: Option<u64>,
        }
        let id = from_frame::<IdOnly>(bytes).ok().and_then(|f| f.id);
        return Err(BadFrame {
            id,
            error: OpError::too_large(format!(
                "the frame is {} bytes; the limit is {max_frame} (BRANCHD_MAX_FRAME)",
                bytes.len()
            )),
        });
    }
    let head = read_head(bytes)?;
    let id = match head.id {
        None => None,
        Some(value) => Some(
            value
                .as_u64()
                .ok_or_else(|| BadFrame::new(None, "id must be an unsigned integer"))?,
        ),
    };
    let name = match head.op {
        None => return Err(BadFrame::new(id, "the frame has no op")),
        Some(ref op) => text(op).ok_or_else(|| BadFrame::new(id, "op must be a string"))?,
    };
    let Some(id) = id else {
        return Err(BadFrame::new(
            None,
            format!("the {name} request has no id: every request needs one"),
        ));
    };
    if name == "ping" {
        return Ok(Request::Ping { id });
    }
    let Some(kind) = OpKind::parse(name) else {
        return Err(BadFrame::new(
            Some(id),
            format!("unknown op {name:?}; docs/protocol.md lists the ops"),
        ));
    };
    // The op is known, so whatever fails from here is its arguments.
    let op = from_frame::<Op>(bytes)
        .map_err(|e| BadFrame::new(Some(id), format!("bad arguments for {}: {e}", kind.name())))?;
    Ok(Request::Op { id, op })
}

/// Encodes a server frame (an event, say); our own types always encode.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    match rmp_serde::to_vec_named(value) {
        Ok(bytes) => bytes,
        Err(err) => {
            tracing::error!(error = %err, "encoding a frame failed");
            Vec::new()
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
fn answer_frame(id: u64, result: &Result<Vec<u8>, OpError>) -> Vec<u8> {
    match result {
        Ok(ok) => ok_frame(id, ok),
        Err(err) => encode(&ErrFrame { id, err }),
    }
}

/// The frame answering request `id` with a workspace's result.
pub fn reply_frame(id: u64, result: OpResult) -> Vec<u8> {
    let wire = result.and_then(|reply| {
        reply
            .to_wire()
            .map_err(|e| OpError::internal("encoding a reply", e))
    });
    answer_frame(id, &wire)
}

/// The frame answering `ping` request `id`: `{id, ok: {node}}`.
pub fn pong_frame(id: u64, node: &str) -> Vec<u8> {
    let pong = rmp_serde::to_vec_named(&Pong { node })
        .map_err(|e| OpError::internal("encoding a pong", e));
    answer_frame(id, &pong)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::request_frame;

    const LIMIT: u64 = 1 << 20;

    fn error_of(bytes: &[u8]) -> (Option<u64>, String) {
        match decode_request(bytes, LIMIT) {
            Err(BadFrame { id, error }) => (id, error.message),
            Ok(request) => panic!("expected an error, got {request:?}"),
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
        match decode_request(&frame, LIMIT) {
            Ok(Request::Op { id, op: decoded }) => {
                assert_eq!(id, 7);
                assert_eq!(decoded, op);
            }
            _ => panic!("expected the op back"),
        }
        assert!(matches!(
            decode_request(&crate::protocol::ping_frame(3), LIMIT),
            Ok(Request::Ping { id: 3 })
        ));
    }

    #[test]
    fn a_git_log_limit_may_be_any_unsigned_integer() {
        let frame = rmp_serde::to_vec_named(
            &serde_json::json!({"id": 1, "op": "git_log", "limit": u64::MAX}),
        )
        .expect("encode");
        match decode_request(&frame, LIMIT) {
            Ok(Request::Op {
                op: Op::GitLog { limit },
                ..
            }) => assert_eq!(limit, Some(u64::MAX)),
            other => panic!("expected git_log, got {other:?}"),
        }
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
        let (id, message) = error_of(&msgpack(serde_json::json!({"id": 8})));
        assert_eq!((id, message.as_str()), (Some(8), "the frame has no op"));
        let (id, message) = error_of(&msgpack(serde_json::json!({"id": 9, "op": 1})));
        assert_eq!((id, message.as_str()), (Some(9), "op must be a string"));
        let (id, message) = error_of(&[]);
        assert_eq!(id, None);
        assert!(message.contains("not valid MessagePack"), "{message}");
        // A map cut short is not MessagePack, though it starts like a map.
        let (id, message) = error_of(&[0x82, 0xa2, b'i']);
        assert_eq!(id, None);
        assert!(message.contains("not valid MessagePack"), "{message}");
        // Fields a request does not know are skipped, as before.
        assert!(matches!(
            decode_request(
                &msgpack(serde_json::json!({"id": 6, "op": "lock", "x": [1]})),
                LIMIT
            ),
            Ok(Request::Op {
                id: 6,
                op: Op::Lock { ttl_ms: None }
            })
        ));
    }

    /// `{id: 1, op: "save", x: [[[...]]]}`, `x` nested `depth` arrays deep.
    fn nested_frame(depth: usize) -> Vec<u8> {
        let mut frame = vec![0x83, 0xa2, b'i', b'd', 1, 0xa2, b'o', b'p'];
        frame.extend_from_slice(&[0xa4, b's', b'a', b'v', b'e', 0xa1, b'x']);
        frame.extend(std::iter::repeat_n(0x91, depth)); // an array of one
        frame.push(0xc0); // nil
        frame
    }

    #[test]
    fn deep_nesting_is_refused_without_exhausting_the_stack() {
        // Before the limit, a frame nested 1000 deep overflowed a 2 MiB
        // stack (a tokio worker's) in a debug build, aborting the process.
        let decoded = std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(|| {
                let frames = [nested_frame(1000), nested_frame(MAX_FRAME_DEPTH)];
                frames.map(|frame| decode_request(&frame, LIMIT))
            })
            .expect("thread")
            .join()
            .expect("decoding within the stack");
        let [deep, too_deep] = decoded;
        for refused in [deep, too_deep] {
            let Err(BadFrame { id, error }) = refused else {
                panic!("expected a refusal, got {refused:?}");
            };
            assert_eq!(id, None);
            assert_eq!(
                error.message,
                "the frame nests maps and arrays more than 32 levels deep"
            );
        }
        assert!(matches!(
            // The frame's map and 31 arrays: exactly the limit.
            decode_request(&nested_frame(MAX_FRAME_DEPTH - 1), LIMIT),
            Ok(Request::Op {
                id: 1,
                op: Op::Save
            })
        ));
    }

    #[test]
    fn a_known_op_with_bad_arguments_is_never_called_unknown() {
        use strum::IntoEnumIterator;
        for kind in crate::protocol::OpKind::iter() {
            let frame = rmp_serde::to_vec_named(
                &serde_json::json!({"id": 1, "op": kind.name(), "path": [], "entry": [], "name": [], "from": [], "message": []}),
            )
            .expect("encode");
            match decode_request(&frame, LIMIT) {
                Ok(_) => {}
                Err(BadFrame { id, error }) => {
                    assert_eq!(id, Some(1));
                    assert!(
                        error
                            .message
                            .starts_with(&format!("bad arguments for {}: ", kind.name())),
                        "{}",
                        error.message
                    );
                }
            }
        }
    }
}
