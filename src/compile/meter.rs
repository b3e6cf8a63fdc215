//! How much memory a compile holds: the process's allocator, wrapped to
//! count the bytes each compile thread has allocated and not yet freed.
//!
//! Script limits on single values (string, array, map sizes) do not bound
//! what a script keeps alive in total: a map of 2,000 strings of 1 MiB is
//! within every one of them and takes 2 GB. So the compile thread's live
//! bytes are counted as it allocates ([`Meter`]), and the compiler checks
//! the count as the script runs (Rhai's progress callback, once per
//! operation) against `BRANCHD_COMPILE_MAX_MEMORY`, stopping the script
//! with a `limit` diagnostic. One operation may overshoot the limit by
//! what it allocates at once, which the per-value limits bound; the
//! functions that could make one huge value from small ones (`replace`)
//! are checked before they run (see `compile::rhai`).
//!
//! Only threads that started a [`Meter`] count anything; every other
//! allocation pays one thread-local read. This module must never allocate
//! inside the allocator, nor panic there.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting on metered threads.
pub struct Metered;

thread_local! {
    /// Whether this thread is metered.
    static ON: Cell<bool> = const { Cell::new(false) };
    /// Bytes allocated on this thread since its meter started, less those
    /// freed on it (negative when it frees what was made before).
    static LIVE: Cell<i64> = const { Cell::new(0) };
    /// The most `LIVE` has been since the meter started.
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    // `try_with`: a thread being torn down may still allocate.
    let on = ON.try_with(Cell::get).unwrap_or(false);
    if !on {
        return;
    }
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

fn signed(size: usize) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

// SAFETY: every call is passed to `System` unchanged; only a count kept in
// thread-local cells (no allocation, no panic) is added.
unsafe impl GlobalAlloc for Metered {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(signed(layout.size()));
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(signed(layout.size()));
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        count(-signed(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            count(signed(new_size) - signed(layout.size()));
        }
        moved
    }
}

/// Counting on this thread, from zero, for as long as it lives.
pub struct Meter {
    /// Not `Send`: a meter belongs to the thread it counts.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Meter {
    pub fn start() -> Meter {
        LIVE.with(|live| live.set(0));
        PEAK.with(|peak| peak.set(0));
        ON.with(|on| on.set(true));
        Meter {
            _thread: std::marker::PhantomData,
        }
    }

    /// Bytes this thread holds now that it allocated since the meter
    /// started (0 on a thread without one).
    pub fn live() -> u64 {
        u64::try_from(LIVE.try_with(Cell::get).unwrap_or(0)).unwrap_or(0)
    }

    /// The most [`Meter::live`] has been.
    pub fn peak(&self) -> u64 {
        u64::try_from(PEAK.with(Cell::get)).unwrap_or(0)
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        ON.with(|on| on.set(false));
    }
}

/// Gives memory the allocator keeps free back to the system: after a
/// compile that held much, so that one large compile does not leave the
/// process that large.
pub fn give_back() {
    // SAFETY: malloc_trim(3) only releases free memory of glibc's heap.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metered_thread_counts_what_it_holds_and_others_count_nothing() {
        std::thread::spawn(|| {
            let meter = Meter::start();
            let before = Meter::live();
            let held: Vec<u8> = vec![1; 4 << 20];
            assert!(Meter::live() >= before + (4 << 20), "{}", Meter::live());
            drop(held);
            assert!(Meter::live() < 1 << 20, "{}", Meter::live());
            assert!(meter.peak() >= 4 << 20);
            drop(meter);
            let _more: Vec<u8> = vec![1; 1 << 20];
            assert!(Meter::live() < 1 << 20, "a stopped meter counts nothing");
        })
        .join()
        .expect("the metered thread");
        let _elsewhere: Vec<u8> = vec![1; 1 << 20];
        assert_eq!(Meter::live(), 0, "an unmetered thread counts nothing");
    }
}
