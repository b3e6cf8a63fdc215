//! Wire types shared by every boundary of branchd: the HTTP API, the
//! WebSocket protocol and the messages between cluster nodes.
//!
//! Everything here is plain data with serde derives. It must never depend on
//! a transport (axum, ractor) or on storage, so that the server, the tests and
//! the bench client can all use it as it is.
//!
//! [`ops`] says what a client can ask (with each op's metadata), [`replies`]
//! what it gets back, [`events`] what is pushed to it, [`errors`] how a
//! request fails, and [`frames`] how all of it is laid out on the wire.

pub mod codec;
mod errors;
mod events;
mod frames;
mod ops;
mod replies;

pub use errors::{ErrorBody, ErrorCode, OpError, OpResult};
pub use events::{Event, Welcome};
pub use frames::{WireError, ok_frame, ping_frame, request_frame};
pub use ops::{Op, OpKind, Role, SessionId};
pub use replies::{
    CommitInfo, CompileOutput, CompileStats, Diagnostic, DiagnosticKind, Doer, EntryKind,
    FileChange, LockInfo, Reply, TreeEntry,
};

/// The protocol version this server speaks, announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use serde::Serialize;

    use super::*;
    use crate::compile::shape::Shape;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
        value: &T,
    ) -> Vec<u8> {
        let bytes = rmp_serde::to_vec_named(value).expect("encode");
        let back: T = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(&back, value);
        bytes
    }

    #[test]
    fn ops_replies_and_events_travel_as_messagepack_maps_with_binary_content() {
        let content = vec![0u8, 159, 146, 150, 255];
        let op = Op::WriteFile {
            path: "a.bin".into(),
            content: content.clone(),
            base_version: None,
            force: false,
        };
        let bytes = round_trip(&op);
        // A map with the tag and named fields; the content as a bin, not an array.
        assert!(bytes.windows(10).any(|w| w == b"write_file"));
        assert!(
            bytes
                .windows(2 + content.len())
                .any(|w| w[0] == 0xc4 && w[1] == 5 && w[2..] == content[..])
        );

        round_trip(&Op::GitLog { limit: Some(5) });
        round_trip(&Op::Unlock);
        round_trip(&Reply::File {
            path: "a.bin".into(),
            content,
            version: "v".into(),
        });
        round_trip(&Event::lock_changed(
            None,
            Some(Doer {
                session: "s".into(),
                user: "u".into(),
            }),
        ));
        round_trip(&OpError::conflict("stale", Some("abc".into())));
    }

    #[test]
    fn replies_travel_as_their_fields_and_requests_carry_an_id() {
        let reply = Reply::Written {
            path: "a".into(),
            version: "v".into(),
        };
        let ok = reply.to_wire().expect("to wire");
        let value: rmpv::Value = rmp_serde::from_slice(&ok).expect("a map");
        assert_eq!(
            value,
            rmpv::Value::Map(vec![
                ("path".into(), "a".into()),
                ("version".into(), "v".into())
            ])
        );
        assert_eq!(Reply::from_wire("write_file", &value).expect("back"), reply);
        let frame: rmpv::Value = rmp_serde::from_slice(&ok_frame(7, &ok)).expect("frame");
        assert_eq!(frame["id"], rmpv::Value::from(7));
        assert_eq!(frame["ok"], value);

        let request = request_frame(9, &Op::ReadFile { path: "x".into() }).expect("request");
        let value: rmpv::Value = rmp_serde::from_slice(&request).expect("map");
        assert_eq!(value["id"], rmpv::Value::from(9));
        assert_eq!(value["op"], rmpv::Value::from("read_file"));
        assert_eq!(value["path"], rmpv::Value::from("x"));
    }

    #[test]
    fn a_compile_reply_is_its_documented_map() {
        let reply = Reply::Compiled {
            ok: true,
            diagnostics: vec![],
            output: Some(CompileOutput {
                tree: Shape::Sphere { radius: 1.0 },
                bbox: Shape::Sphere { radius: 1.0 }.bounding_box(),
            }),
            stats: CompileStats {
                files_total: 3,
                files_compiled: 1,
                files_cached: 2,
                millis: 4,
            },
        };
        let value: rmpv::Value =
            rmp_serde::from_slice(&reply.to_wire().expect("to wire")).expect("map");
        assert_eq!(value["ok"], rmpv::Value::from(true));
        assert_eq!(value["output"]["tree"]["kind"], rmpv::Value::from("sphere"));
        assert_eq!(value["output"]["bbox"]["min"][0], rmpv::Value::from(-1.0));
        assert_eq!(value["stats"]["files_cached"], rmpv::Value::from(2));
        assert_eq!(Reply::from_wire("compile", &value).expect("back"), reply);

        let failed = Diagnostic {
            file: "a.rhai".into(),
            line: 2,
            column: 5,
            message: "oops".into(),
            kind: DiagnosticKind::Syntax,
        };
        let bytes = rmp_serde::to_vec_named(&failed).expect("encode");
        let value: rmpv::Value = rmp_serde::from_slice(&bytes).expect("map");
        assert_eq!(value["kind"], rmpv::Value::from("syntax"));
        assert_eq!(value["line"], rmpv::Value::from(2));
    }

    #[test]
    fn welcome_is_one_flat_map_tagged_by_event() {
        let welcome = Event::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            session: "s".into(),
            node: "n".into(),
            owner: "n".into(),
            project: 1,
            branch: "main".into(),
            role: Role::Editor,
            head: "h".into(),
            lock: None,
        });
        let bytes = round_trip(&welcome);
        let value: rmpv::Value = rmp_serde::from_slice(&bytes).expect("map");
        assert_eq!(value["event"], rmpv::Value::from("welcome"));
        assert_eq!(value["protocol"], rmpv::Value::from(1));
        assert_eq!(value["role"], rmpv::Value::from("editor"));
        assert!(
            value
                .as_map()
                .is_some_and(|m| m.iter().all(|(k, _)| k.as_str() != Some("lock")))
        );
    }

    #[test]
    fn optional_arguments_may_be_left_out() {
        #[derive(Serialize)]
        struct Minimal<'a> {
            op: &'a str,
            path: &'a str,
        }
        let bytes = rmp_serde::to_vec_named(&Minimal {
            op: "delete_path",
            path: "x",
        })
        .expect("encode");
        let op: Op = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(
            op,
            Op::DeletePath {
                path: "x".into(),
                base_version: None
            }
        );
    }
}
