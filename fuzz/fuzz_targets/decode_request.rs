//! Fuzzes the WebSocket frame decoder (`branchd::protocol::codec::decode_request`)
//! with arbitrary bytes under an arbitrary frame limit.
//!
//! It checks properties, not only the absence of panics: a frame over the
//! limit is never accepted and is refused as `too_large`; under the limit the
//! limit changes nothing; every other refusal is `bad_request`; and an
//! accepted request encodes again (as clients encode it) into a frame that
//! decodes to the same request. It must never depend on anything but the
//! decoder's public API: a target that reaches into internals breaks with them.

#![no_main]

use branchd::protocol::codec::{BadFrame, Request, decode_request};
use branchd::protocol::{ErrorCode, ping_frame, request_frame};
use libfuzzer_sys::fuzz_target;

/// The limit a fuzz input chooses with its first byte: 255 means none, any
/// other value `b` means `16 * b` bytes (0 to 4064, around the sizes
/// libFuzzer's inputs have, so both sides of the limit are reached).
fn limit_of(byte: u8) -> u64 {
    match byte {
        u8::MAX => u64::MAX,
        b => 16 * u64::from(b),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, frame)) = data.split_first() else {
        return;
    };
    let limit = limit_of(first);
    let decoded = decode_request(frame, limit);
    let too_large = frame.len() as u64 > limit;

    if too_large {
        match &decoded {
            Ok(request) => panic!(
                "a {} byte frame was accepted under a limit of {limit}: {request:?}",
                frame.len()
            ),
            Err(BadFrame { error, .. }) => assert_eq!(error.code, ErrorCode::TooLarge, "{error:?}"),
        }
        return;
    }

    // Under the limit, the limit plays no part.
    assert_eq!(decoded, decode_request(frame, u64::MAX));

    match decoded {
        Ok(request) => {
            let again = match &request {
                Request::Ping { id } => ping_frame(*id),
                Request::Op { id, op } => request_frame(*id, op)
                    .unwrap_or_else(|e| panic!("a decoded op does not encode: {e}: {op:?}")),
            };
            assert_eq!(
                decode_request(&again, u64::MAX),
                Ok(request),
                "a decoded request, encoded again, decodes to something else"
            );
        }
        Err(BadFrame { error, .. }) => {
            assert_eq!(error.code, ErrorCode::BadRequest, "{error:?}");
        }
    }
});
