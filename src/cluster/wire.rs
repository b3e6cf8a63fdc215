//! What nodes say to each other, and the names they find each other by.
//!
//! One message type crosses nodes: [`RouterMsg`], the messages of each
//! node's router actor. Its fields are plain bytes: MessagePack encodings of
//! the serde structs below, the same encoding the WebSocket protocol uses.
//! Keeping ractor_cluster's part down to `Vec<u8>` fields means our types
//! never need ractor's `BytesConvertable` and a new field is a serde
//! default, not a wire break. A receiver that cannot decode a message
//! answers (or logs) an error; it never panics. New variants may only be
//! added (ractor_cluster drops a variant it does not know, silently).

use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::protocol::{Event, Op, OpError, Reply, SessionId};
use crate::storage::WorkspaceKey;
use crate::workspace::{AttachInfo, Audience, SessionInfo};

/// The process-group scope and group of a workspace (`git`,
/// `{project}:{branch}`): the workspace actor joins it on its node, and the
/// node's router joins it to stand for the workspace before other nodes
/// (only the router's membership crosses node links).
pub use crate::workspace::{GROUP_SCOPE as WORKSPACE_SCOPE, group_of as workspace_group};

/// The process-group scope routers join once per node.
pub const NODE_SCOPE: &str = "branchd";

/// The group of one node's router: `router:{server_tag}`.
pub fn router_group(server_tag: &str) -> String {
    format!("router:{server_tag}")
}

/// The messages of a node's router (see `router.rs`).
#[derive(RactorClusterMessage)]
pub enum RouterMsg {
    /// Attach a session whose socket is on the caller's node
    /// ([`AttachRequest`] → [`AttachReply`]).
    #[rpc]
    Attach(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// One op of a remotely attached session ([`OpRequest`] → [`OpReply`]).
    #[rpc]
    Op(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// A remote session left ([`DetachRequest`]).
    Detach(Vec<u8>),
    /// Events for this node's sessions of a workspace served elsewhere
    /// ([`RelayedEvent`]).
    Event(Vec<u8>),
    /// Liveness: answers the number it was given.
    #[rpc]
    Ping(u64, RpcReplyPort<u64>),
    /// An operator reset a failed workspace ([`WorkspaceKey`]): forget it
    /// here too; answers whether it was failed on this node. Added after
    /// the first release: a node that does not know it drops it, and the
    /// caller reports that node as not reached.
    #[rpc]
    Reset(Vec<u8>, RpcReplyPort<bool>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachRequest {
    pub key: WorkspaceKey,
    pub session: SessionInfo,
    /// The server tag of the node holding the socket.
    pub node: String,
}

pub type AttachReply = Result<AttachInfo, OpError>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpRequest {
    pub key: WorkspaceKey,
    pub session: SessionId,
    pub op: Op,
}

pub type OpReply = Result<Reply, OpError>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetachRequest {
    pub key: WorkspaceKey,
    pub session: SessionId,
    pub node: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayedEvent {
    pub key: WorkspaceKey,
    pub audience: Audience,
    pub event: Event,
}

/// Encodes a payload. Our own serde types always encode; should one ever
/// fail, the empty payload it returns fails to decode on the other side,
/// which answers with an error instead of guessing.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

/// Decodes a payload from another node.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, OpError> {
    rmp_serde::from_slice(bytes).map_err(|e| {
        OpError::internal(
            "reading a message from another node",
            format!("{what}: {e} (are all nodes on the same version?)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Role;

    #[test]
    fn payloads_survive_the_trip() {
        let request = AttachRequest {
            key: WorkspaceKey::new(7, "main"),
            session: SessionInfo {
                id: "s1".into(),
                user_id: 3,
                username: "ada".into(),
                display_name: "Ada".into(),
                email: "ada@example.com".into(),
                role: Role::Editor,
            },
            node: "node-a".into(),
        };
        let back: AttachRequest = decode(&encode(&request), "attach").expect("decodes");
        assert_eq!(back.session, request.session);
        assert_eq!(back.key, request.key);

        let reply: OpReply = Ok(Reply::Done {});
        let back: OpReply = decode(&encode(&reply), "op reply").expect("decodes");
        assert_eq!(back, reply);

        let garbage: Result<OpReply, _> = decode(&[0xc1, 0x00], "op reply");
        assert!(garbage.is_err());
    }
}
