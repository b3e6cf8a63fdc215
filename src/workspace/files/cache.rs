//! The memory that keeps small files' contents: the node's pool
//! ([`CachePool`], `BRANCHD_FILE_CACHE`) and one working copy's share of it
//! ([`FileCache`]). Only [`super::Files`] fills and empties a cache, so it
//! stays exact; this module never reads or writes a file itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::workspace::paths::WorkPath;

/// Largest file whose content is kept in memory: the cache is for the many
/// small source files an editor reads again and again, not for big ones,
/// which one read would let push everything else out.
pub(super) const CACHE_MAX_FILE: usize = 64 * 1024;

/// Most bytes one working copy keeps, so that a few busy workspaces do not
/// take the whole pool.
pub const CACHE_PER_WORKSPACE: usize = 4 * 1024 * 1024;

/// The node's memory for kept file contents (`BRANCHD_FILE_CACHE`): every
/// working copy reserves what it keeps from here and gives it back when it
/// drops an entry, releases its cache or stops.
#[derive(Debug)]
pub struct CachePool {
    limit: usize,
    used: AtomicUsize,
}

impl CachePool {
    pub fn new(limit: u64) -> Arc<CachePool> {
        Arc::new(CachePool {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes reserved by every working copy of the node.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Contents of small files by path, within [`CACHE_PER_WORKSPACE`] and
/// what the pool grants. When a new entry does not fit, entries are
/// dropped in the map's own (arbitrary) order until it does: no
/// bookkeeping per read, and good enough when the hot set fits, the case
/// it is for.
pub(super) struct FileCache {
    pool: Arc<CachePool>,
    /// Bytes this cache holds (all reserved from the pool).
    used: usize,
    contents: HashMap<String, Vec<u8>>,
}

impl FileCache {
    pub(super) fn new(pool: Arc<CachePool>) -> FileCache {
        FileCache {
            pool,
            used: 0,
            contents: HashMap::new(),
        }
    }

    /// Bytes this cache holds.
    pub(super) fn used(&self) -> usize {
        self.used
    }

    pub(super) fn get(&self, path: &str) -> Option<&Vec<u8>> {
        self.contents.get(path)
    }

    /// Drops one entry, any; false if there was none.
    fn drop_one(&mut self) -> bool {
        match self.contents.keys().next().cloned() {
            Some(victim) => {
                self.remove(&victim);
                true
            }
            None => false,
        }
    }

    pub(super) fn insert(&mut self, path: &str, content: &[u8]) {
        self.remove(path);
        let size = content.len();
        if size > CACHE_MAX_FILE {
            return;
        }
        while self.used + size > CACHE_PER_WORKSPACE && self.drop_one() {}
        // Over the node's pool: make room with this cache's own entries;
        // with none left, the file is simply not kept.
        while !self.pool.reserve(size) {
            if !self.drop_one() {
                return;
            }
        }
        self.used += size;
        self.contents.insert(path.to_string(), content.to_vec());
    }

    pub(super) fn remove(&mut self, path: &str) {
        if let Some(old) = self.contents.remove(path) {
            self.used -= old.len();
            self.pool.release(old.len());
        }
    }

    /// Drops `path` and everything below it (everything, for the root).
    pub(super) fn forget(&mut self, path: &WorkPath) {
        let mut freed = 0;
        self.contents.retain(|p, content| {
            let gone = path.contains_str(p);
            if gone {
                freed += content.len();
            }
            !gone
        });
        self.used -= freed;
        self.pool.release(freed);
    }

    pub(super) fn clear(&mut self) {
        self.contents = HashMap::new();
        self.pool.release(self.used);
        self.used = 0;
    }
}

impl Drop for FileCache {
    /// A stopped (or crashed) workspace gives its bytes back to the pool.
    fn drop(&mut self) {
        self.clear();
    }
}
