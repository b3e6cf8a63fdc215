//! SQLite under file-descriptor exhaustion (issue 17, item 13).
//!
//! When SQLite cannot open a file read-write for any reason but "is a
//! directory" (`EMFILE` included), its unix VFS opens it read-only instead.
//! Under fd exhaustion that second open can succeed (another thread closed
//! a socket in between), and the connection is then read-only for the rest
//! of its life: every write on it fails with `attempt to write a readonly
//! database`, and a pool keeps it, so the node stays read-only until it
//! restarts. These tests make the read-write open fail exactly once, the
//! way `EMFILE` does, through SQLite's own hook for replacing system calls
//! (`xSetSystemCall`), and check that the store never keeps such a
//! connection.
//!
//! The hook is process-wide: this file is its own test binary, and the
//! fault only ever hits the one file a test names. It must never leave a
//! fault armed past its test.

use std::ffi::{CStr, c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use branchd::storage::{NewUser, SqlStore, Store, sqlite};

type OpenFn = unsafe extern "C" fn(*const c_char, c_int, c_int) -> c_int;

/// SQLite's own `open`, replaced by [`faulty_open`].
static REAL_OPEN: OnceLock<OpenFn> = OnceLock::new();
/// The file whose next read-write open fails with `EMFILE`, if any.
static ARMED: Mutex<Option<PathBuf>> = Mutex::new(None);
/// Tests take turns: the fault is process-wide.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

unsafe extern "C" fn faulty_open(path: *const c_char, flags: c_int, mode: c_int) -> c_int {
    // SAFETY: SQLite passes a NUL-terminated path.
    let name = unsafe { CStr::from_ptr(path) }
        .to_string_lossy()
        .into_owned();
    let fail = {
        let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
        let hit =
            armed.as_deref() == Some(Path::new(&name)) && flags & libc::O_ACCMODE == libc::O_RDWR;
        if hit {
            *armed = None;
        }
        hit
    };
    if fail {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = libc::EMFILE };
        return -1;
    }
    let real = REAL_OPEN.get().expect("installed before use");
    // SAFETY: the arguments are SQLite's, passed on unchanged.
    unsafe { real(path, flags, mode) }
}

/// Puts [`faulty_open`] in front of the default VFS's `open` (once).
fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // SAFETY: the default VFS lives for the whole process; the system
        // call pointers SQLite hands out and takes have `open`'s signature
        // for the name "open".
        unsafe {
            let vfs = libsqlite3_sys::sqlite3_vfs_find(std::ptr::null());
            assert!(!vfs.is_null(), "no default SQLite VFS");
            let get = (*vfs)
                .xGetSystemCall
                .expect("the unix VFS has xGetSystemCall");
            let set = (*vfs)
                .xSetSystemCall
                .expect("the unix VFS has xSetSystemCall");
            let real = get(vfs, c"open".as_ptr()).expect("SQLite has an open call");
            let real: OpenFn = std::mem::transmute::<unsafe extern "C" fn(), OpenFn>(real);
            let _ = REAL_OPEN.set(real);
            let ours = std::mem::transmute::<OpenFn, unsafe extern "C" fn()>(faulty_open);
            assert_eq!(set(vfs, c"open".as_ptr(), Some(ours)), 0, "replacing open");
        }
    });
}

fn arm(path: PathBuf) {
    *ARMED.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
}

fn fired() -> bool {
    ARMED.lock().unwrap_or_else(|p| p.into_inner()).is_none()
}

fn user(name: &str) -> NewUser {
    NewUser {
        username: name.into(),
        display_name: name.into(),
        email: format!("{name}@branchd.invalid"),
        password_hash: "not a real hash".into(),
        is_admin: false,
    }
}

/// Opens a second store on a database another store keeps open (as the
/// pool's older connections do), while the read-write open of `file` (the
/// database or its WAL) fails once with `EMFILE`; then writes through it.
async fn a_write_after_a_failed_open_of(file: &str) {
    let _turn = ONE_AT_A_TIME.lock().await;
    install();
    let dir = tempfile::tempdir().expect("temp dir");
    let dir_path = std::fs::canonicalize(dir.path()).expect("canonical temp dir");
    let url = sqlite::default_url(&dir_path);
    let first = SqlStore::connect(&url, 1).await.expect("open");
    first.migrate().await.expect("migrate");
    first
        .create_user(user("before"))
        .await
        .expect("a write before the fault");

    arm(dir_path.join(file));
    // One connection: the pool must open another rather than keep this one.
    let second = SqlStore::connect(&url, 1).await.expect("open again");
    assert!(fired(), "the store never opened {file}");
    let written = second.create_user(user("after")).await;
    arm_nothing();
    if let Err(err) = written {
        panic!("a write after {file} was opened read-only once failed: {err}");
    }
    second
        .create_user(user("later"))
        .await
        .expect("and the writes after it");
    second.close().await;
    first.close().await;
}

fn arm_nothing() {
    *ARMED.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

#[tokio::test]
async fn a_connection_whose_wal_opened_read_only_is_never_used() {
    a_write_after_a_failed_open_of("branchd.db-wal").await;
}

#[tokio::test]
async fn a_connection_whose_database_opened_read_only_is_never_used() {
    a_write_after_a_failed_open_of("branchd.db").await;
}
