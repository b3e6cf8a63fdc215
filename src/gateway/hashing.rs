//! Password hashing with a fixed budget: a few threads of its own and a
//! short, bounded queue in front of them.
//!
//! An argon2id hash takes about 19 MiB and tens of milliseconds of one core.
//! Run on the blocking pool, two hundred wrong-password logins at once meant
//! two hundred hashes at once: gigabytes, kept by the allocator afterwards.
//! Here at most `threads` hashes run at any moment, always on the same
//! threads (so the memory they reuse is bounded by the thread count), and at
//! most `queue` more wait; any request beyond that is refused at once with
//! [`HashError::Busy`] (503 `unavailable` with `Retry-After` at the HTTP
//! edge) instead of waiting in an unbounded line.
//!
//! This module only hashes and verifies. It never logs a password, never
//! blocks an async task (callers await a reply), and never decides whether a
//! login should be tried at all (that is `super::throttle`).

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use tokio::sync::{Semaphore, oneshot};

use super::error::ApiError;
use crate::protocol::ErrorCode;

/// What a caller told [`HashError::Busy`] should wait before trying again.
pub const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One unit of work for a hashing thread.
type Job = Box<dyn FnOnce() + Send>;

/// Why a hash or a verification gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// Every hashing thread is busy and the queue is full.
    #[error("every password hashing thread is busy and the queue is full")]
    Busy,
    /// The hash failed or its thread went away (a bug).
    #[error("password hashing failed: {0}")]
    Failed(String),
}

impl From<HashError> for ApiError {
    fn from(err: HashError) -> Self {
        match err {
            HashError::Busy => ApiError::new(
                ErrorCode::Unavailable,
                "too many password checks are under way on this server; retry in a moment",
            )
            .retry_after(BUSY_RETRY_AFTER),
            HashError::Failed(reason) => ApiError::internal("checking a password", reason),
        }
    }
}

/// The node's password hashing threads and their queue. Dropping the last
/// handle lets the threads end once the queue is empty.
pub struct PasswordHashing {
    jobs: Sender<Job>,
    /// One permit per hash admitted (running or waiting): `threads + queue`.
    admitted: Arc<Semaphore>,
    threads: usize,
    queue: usize,
}

impl std::fmt::Debug for PasswordHashing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHashing")
            .field("threads", &self.threads)
            .field("queue", &self.queue)
            .finish()
    }
}

impl PasswordHashing {
    /// Starts `threads` hashing threads (0: one per CPU core) with room for
    /// `queue` waiting requests.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<PasswordHashing> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            threads
        };
        let (jobs, waiting) = std::sync::mpsc::channel::<Job>();
        let waiting = Arc::new(Mutex::new(waiting));
        for index in 0..threads {
            let waiting = waiting.clone();
            std::thread::Builder::new()
                .name(format!("branchd-hash-{index}"))
                .spawn(move || work(&waiting))?;
        }
        Ok(PasswordHashing {
            jobs,
            admitted: Arc::new(Semaphore::new(threads.saturating_add(queue))),
            threads,
            queue,
        })
    }

    /// How many hashes may run at once.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// How many hashes may wait for a thread.
    pub fn queue(&self) -> usize {
        self.queue
    }

    /// Hashes a password with argon2id (a fresh random salt).
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        self.run(move || {
            Argon2::default()
                .hash_password(password.as_bytes())
                .map(|hash| hash.to_string())
                .map_err(|e| HashError::Failed(e.to_string()))
        })
        .await?
    }

    /// Checks a password against a stored hash. With no stored hash (an
    /// unknown user) it checks against a fixed one, so that the answer takes
    /// as long either way and does not reveal which usernames exist. A
    /// stored value that is not a hash matches nothing.
    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, HashError> {
        self.run(move || {
            let stored = stored.unwrap_or_else(|| decoy_hash().to_string());
            PasswordHash::new(&stored).is_ok_and(|hash| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &hash)
                    .is_ok()
            })
        })
        .await
    }

    /// Queues `work` for a hashing thread and waits for its result; refuses
    /// at once when the queue is full. A caller that stops waiting (its
    /// client went away) before a thread picks the job up costs no hash.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| HashError::Busy)?;
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            if !reply.is_closed() {
                let _ = reply.send(work());
            }
            drop(admitted);
        });
        if self.jobs.send(job).is_err() {
            return Err(HashError::Failed("the hashing threads have stopped".into()));
        }
        answer
            .await
            .map_err(|_| HashError::Failed("a hashing thread failed".into()))
    }
}

/// A hashing thread: takes one job at a time until every sender is gone.
/// A job that panics is contained: its caller gets `Failed`, the thread
/// goes on.
fn work(waiting: &Mutex<Receiver<Job>>) {
    loop {
        let next = match waiting.lock() {
            Ok(queue) => queue.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        match next {
            Ok(job) => {
                if std::panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
                    tracing::error!("a password hashing job panicked");
                }
            }
            Err(_) => return,
        }
    }
}

/// The hash unknown usernames are checked against (computed once, on a
/// hashing thread).
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| {
        Argon2::default()
            .hash_password(b"branchd decoy password")
            .map(|hash| hash.to_string())
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hashed_password_verifies_and_a_wrong_one_does_not() {
        let hashing = PasswordHashing::new(1, 4).expect("threads");
        let hash = hashing.hash("correct horse".into()).await.expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        let verify =
            |password: &str, stored: Option<String>| hashing.verify(password.to_string(), stored);
        assert_eq!(verify("correct horse", Some(hash.clone())).await, Ok(true));
        assert_eq!(verify("wrong horse", Some(hash)).await, Ok(false));
        assert_eq!(verify("anything", None).await, Ok(false));
        assert_eq!(
            verify("x", Some("not a phc string".into())).await,
            Ok(false)
        );
    }

    #[tokio::test]
    async fn beyond_the_threads_and_the_queue_a_request_is_refused_at_once() {
        let hashing = PasswordHashing::new(1, 2).expect("threads");
        // The one thread is busy until `release` is dropped...
        let (release, held) = std::sync::mpsc::channel::<()>();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut busy = Box::pin(hashing.run(move || held.recv().is_err()));
        assert!(busy.as_mut().poll(&mut cx).is_pending());
        // ...two requests wait in the queue (polled once: each has queued its job)...
        let mut queued: Vec<_> = (0..2)
            .map(|_| Box::pin(hashing.verify("guess".into(), None)))
            .collect();
        for request in &mut queued {
            assert!(request.as_mut().poll(&mut cx).is_pending());
        }
        // ...and the next one is refused without waiting.
        assert_eq!(
            hashing.verify("guess".into(), None).await,
            Err(HashError::Busy)
        );
        drop(release);
        assert_eq!(busy.await, Ok(true));
        for request in queued {
            assert_eq!(request.await, Ok(false));
        }
        assert_eq!(hashing.verify("guess".into(), None).await, Ok(false));
    }

    #[tokio::test]
    async fn a_panicking_job_fails_its_caller_and_the_thread_goes_on() {
        let hashing = PasswordHashing::new(1, 1).expect("threads");
        let failed = hashing.run(|| -> u8 { panic!("boom") }).await;
        assert!(matches!(failed, Err(HashError::Failed(_))));
        assert_eq!(hashing.run(|| 7u8).await, Ok(7));
    }
}
