//! Fuzzes the path normaliser (`branchd::workspace::paths::WorkPath`): every
//! path a client names goes through it before anything touches the disk.
//!
//! It checks the rules `src/workspace/paths.rs` promises for every path it
//! accepts: relative, `/`-separated, no empty, `.` or `..` segment, no
//! `.git` segment in any case, no NUL or backslash, no name over
//! `MAX_SEGMENT` bytes, no longer than the limit; normalising is
//! idempotent, the parent is a valid path containing it, and the path on
//! disk stays below the root. A refusal is `too_large` exactly when the
//! raw path is over the limit, `bad_request` otherwise. It must never
//! depend on anything but the normaliser's public API.

#![no_main]

use std::path::{Component, Path};

use branchd::protocol::ErrorCode;
use branchd::workspace::paths::{MAX_SEGMENT, WorkPath};
use libfuzzer_sys::fuzz_target;

/// A root that does not exist: `resolve` then checks no component on disk,
/// and the target stays free of file-system state.
const ROOT: &str = "/nonexistent/branchd-fuzz-root";

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // The first byte chooses the limit: 0 to 2040 bytes.
    let max_len = 8 * usize::from(first);
    let Ok(raw) = std::str::from_utf8(rest) else {
        return;
    };
    let parsed = WorkPath::parse(raw, max_len);

    let path = match parsed {
        Ok(path) => path,
        Err(error) => {
            let expected = if raw.len() > max_len {
                ErrorCode::TooLarge
            } else {
                ErrorCode::BadRequest
            };
            assert_eq!(error.code, expected, "{raw:?}: {error:?}");
            if raw.len() <= max_len {
                // Under the limit, the limit plays no part.
                assert!(WorkPath::parse(raw, usize::MAX).is_err(), "{raw:?}");
            }
            return;
        }
    };

    let text = path.as_str();
    assert!(raw.len() <= max_len, "{raw:?} is over the limit {max_len}");
    assert!(text.len() <= raw.len(), "{raw:?} grew into {text:?}");
    assert_eq!(path.to_string(), text);
    assert!(!text.contains('\0'), "{text:?} holds a NUL");
    assert!(!text.contains('\\'), "{text:?} holds a backslash");
    assert!(!text.starts_with('/'), "{text:?} is absolute");
    assert_eq!(path.is_root(), text.is_empty());
    if !path.is_root() {
        for segment in text.split('/') {
            assert!(
                !segment.is_empty() && segment != "." && segment != "..",
                "{text:?} has the segment {segment:?}"
            );
            assert!(!segment.eq_ignore_ascii_case(".git"), "{text:?} names .git");
            assert!(segment.len() <= MAX_SEGMENT, "{text:?} has a name too long");
        }
    }

    // Normalising a normalised path changes nothing, under the same limit.
    assert_eq!(
        WorkPath::parse(text, max_len).ok().as_ref(),
        Some(&path),
        "{raw:?}"
    );
    assert_eq!(
        WorkPath::parse_non_root(raw, max_len).is_ok(),
        !path.is_root(),
        "{raw:?}"
    );

    let parent = path.parent();
    assert!(
        parent.contains(&path),
        "{parent:?} does not contain {path:?}"
    );
    assert!(path.contains(&path));
    assert_eq!(
        WorkPath::parse(parent.as_str(), max_len).ok().as_ref(),
        Some(&parent),
        "the parent of {path:?}"
    );
    if !path.is_root() {
        assert!(!path.contains(&parent), "{path:?} contains its parent");
    }

    let root = Path::new(ROOT);
    let on_disk = path
        .resolve(root)
        .unwrap_or_else(|e| panic!("{path:?} under a missing root: {e:?}"));
    assert!(on_disk.starts_with(root), "{on_disk:?} left the root");
    let below = on_disk
        .strip_prefix(root)
        .unwrap_or_else(|_| panic!("{on_disk:?} left the root"));
    assert!(
        below
            .components()
            .all(|c| matches!(c, Component::Normal(_))),
        "{on_disk:?} has a component that is not a plain name"
    );
    assert_eq!(
        below.components().count(),
        text.split('/').filter(|s| !s.is_empty()).count()
    );
});
