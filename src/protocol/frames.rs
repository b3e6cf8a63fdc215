//! Frames: how requests, replies and pushes are laid out on the wire
//! (MessagePack maps), for every side that speaks the protocol: the
//! gateway, the Rust client and the benchmarks.

use super::{Op, OpKind, Reply};

impl Reply {
    /// The reply's `ok` map as sent on the wire (the variant's fields),
    /// encoded: the variant's encoding without its outer `{name: ...}`.
    pub fn to_wire(&self) -> Result<Vec<u8>, WireError> {
        let tagged = rmp_serde::to_vec_named(self).map_err(|e| WireError(e.to_string()))?;
        let mut rest: &[u8] = &tagged;
        let entries = rmp::decode::read_map_len(&mut rest).map_err(|e| WireError(e.to_string()))?;
        let name_len =
            rmp::decode::read_str_len(&mut rest).map_err(|e| WireError(e.to_string()))?;
        if entries != 1 || rest.len() < name_len as usize {
            return Err(WireError("a reply must encode as {variant: fields}".into()));
        }
        Ok(rest[name_len as usize..].to_vec())
    }

    /// Reads the `ok` map of a reply to `op` (its wire name).
    pub fn from_wire(op: &str, ok: &rmpv::Value) -> Result<Reply, WireError> {
        let variant = OpKind::parse(op)
            .map(OpKind::reply_variant)
            .ok_or_else(|| WireError(format!("{op:?} has no workspace reply")))?;
        let mut tagged = Vec::new();
        rmp::encode::write_map_len(&mut tagged, 1).map_err(|e| WireError(e.to_string()))?;
        rmp::encode::write_str(&mut tagged, variant).map_err(|e| WireError(e.to_string()))?;
        rmpv::encode::write_value(&mut tagged, ok).map_err(|e| WireError(e.to_string()))?;
        rmp_serde::from_slice(&tagged).map_err(|e| WireError(e.to_string()))
    }
}

/// A value that does not have the shape the protocol gives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("wire format: {0}")]
pub struct WireError(pub String);

/// Encodes a `ping` request frame, `{id, op: "ping"}` (not an [`Op`]:
/// the connection answers it without a workspace).
pub fn ping_frame(id: u64) -> Vec<u8> {
    let mut frame = Vec::with_capacity(16);
    // Writing to a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut frame, 2);
    let _ = rmp::encode::write_str(&mut frame, "id");
    let _ = rmp::encode::write_uint(&mut frame, id);
    let _ = rmp::encode::write_str(&mut frame, "op");
    let _ = rmp::encode::write_str(&mut frame, "ping");
    frame
}

/// Encodes a request frame: `op`'s named map with `id` added first.
pub fn request_frame(id: u64, op: &Op) -> Result<Vec<u8>, WireError> {
    let encoded = rmp_serde::to_vec_named(op).map_err(|e| WireError(e.to_string()))?;
    let mut rest: &[u8] = &encoded;
    let entries = rmp::decode::read_map_len(&mut rest).map_err(|e| WireError(e.to_string()))?;
    let mut frame = Vec::with_capacity(encoded.len() + 16);
    rmp::encode::write_map_len(&mut frame, entries + 1).map_err(|e| WireError(e.to_string()))?;
    rmp::encode::write_str(&mut frame, "id").map_err(|e| WireError(e.to_string()))?;
    rmp::encode::write_uint(&mut frame, id).map_err(|e| WireError(e.to_string()))?;
    frame.extend_from_slice(rest);
    Ok(frame)
}

/// Encodes a successful reply frame `{id, ok}` around an encoded `ok` value.
pub fn ok_frame(id: u64, ok: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ok.len() + 16);
    // Writing to a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut frame, 2);
    let _ = rmp::encode::write_str(&mut frame, "id");
    let _ = rmp::encode::write_uint(&mut frame, id);
    let _ = rmp::encode::write_str(&mut frame, "ok");
    frame.extend_from_slice(ok);
    frame
}
