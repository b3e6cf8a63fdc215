//! A store that holds saves at a gate the test opens: the real store of the
//! test (SQLite or Postgres) behind it, every call delegated to it, except
//! that `put_snapshot` first says it has arrived and then waits until the
//! test opens the gate.
//!
//! It lets a test hold a save *inside the store*, for as long as it likes,
//! and act meanwhile, instead of hoping a save is slow enough. It is not a
//! mock and must never become one: every call, the held one included once
//! released, reaches the real database, so the test sees real behaviour.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use branchd::storage::{
    AuthSession, Backend, Claim, ClaimOutcome, Failure, Fence, JournalEntry, Member, NewSnapshot,
    NewUser, NodeRow, Project, Role, Snapshot, SnapshotMeta, Store, StoreResult, User, WipeReport,
    WorkspaceKey, WsSession,
};
use tokio::sync::watch;

/// How long a test waits for a save to reach the gate.
const ARRIVAL: Duration = Duration::from_secs(10);

/// The real store with a gate in front of `put_snapshot`.
pub struct GatedStore {
    inner: Arc<dyn Store>,
    gate: Arc<GateState>,
}

struct GateState {
    open: watch::Sender<bool>,
    /// How many `put_snapshot` calls wait at the gate right now.
    waiting: watch::Sender<usize>,
}

/// The test's side of the gate. It starts closed. Dropping it opens it, so
/// a test that fails halfway never leaves a save stuck in the store.
pub struct Gate {
    state: Arc<GateState>,
}

impl GatedStore {
    /// Wraps `inner`; the gate starts closed.
    pub fn wrap(inner: Arc<dyn Store>) -> (Arc<dyn Store>, Gate) {
        let state = Arc::new(GateState {
            open: watch::Sender::new(false),
            waiting: watch::Sender::new(0),
        });
        let store = GatedStore {
            inner,
            gate: state.clone(),
        };
        (Arc::new(store), Gate { state })
    }
}

impl GateState {
    async fn pass(&self) {
        let mut open = self.open.subscribe();
        if *open.borrow_and_update() {
            return;
        }
        let _waiting = Waiting::arrive(&self.waiting);
        // The sender lives in `self`, so this ends only when the gate opens.
        let _ = open.wait_for(|open| *open).await;
    }
}

/// One call counted as waiting at the gate, for as long as it lives: also
/// when its future is dropped before the gate opens.
struct Waiting<'a>(&'a watch::Sender<usize>);

impl<'a> Waiting<'a> {
    fn arrive(count: &'a watch::Sender<usize>) -> Waiting<'a> {
        count.send_modify(|n| *n += 1);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Gate {
    /// Waits until a `put_snapshot` call waits at the gate; fails the test
    /// after 10 s.
    pub async fn until_a_save_waits(&self) {
        let mut waiting = self.state.waiting.subscribe();
        tokio::time::timeout(ARRIVAL, waiting.wait_for(|n| *n > 0))
            .await
            .unwrap_or_else(|_| panic!("no save reached the store within {ARRIVAL:?}"))
            .expect("the gate's state lives as long as the gate");
    }

    /// How many `put_snapshot` calls wait at the gate now.
    pub fn saves_waiting(&self) -> usize {
        *self.state.waiting.borrow()
    }

    /// Lets every waiting save through, and every later one straight away.
    pub fn open(&self) {
        self.state.open.send_replace(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
    }
}

/// Implements [`Store`] for [`GatedStore`]: `backend` and `put_snapshot`
/// by hand, every other method listed here passed to the inner store as
/// is. A method added to the trait fails to compile here until it is
/// listed, which is the point: nothing is answered by the wrapper itself.
macro_rules! delegate_the_rest {
    ($(async fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty;)*) => {
        #[async_trait]
        impl Store for GatedStore {
            fn backend(&self) -> Backend {
                self.inner.backend()
            }

            async fn put_snapshot(
                &self,
                key: &WorkspaceKey,
                snapshot: NewSnapshot,
                fence: Option<&Fence>,
            ) -> StoreResult<SnapshotMeta> {
                self.gate.pass().await;
                self.inner.put_snapshot(key, snapshot, fence).await
            }

            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    self.inner.$name($($arg),*).await
                }
            )*
        }
    };
}

delegate_the_rest! {
    async fn now_ms(&self) -> StoreResult<i64>;
    async fn ready(&self) -> StoreResult<bool>;

    async fn create_user(&self, user: NewUser) -> StoreResult<User>;
    async fn user_count(&self) -> StoreResult<i64>;
    async fn user_by_id(&self, id: i64) -> StoreResult<Option<User>>;
    async fn user_by_name(&self, username: &str) -> StoreResult<Option<(User, String)>>;
    async fn list_users(&self) -> StoreResult<Vec<User>>;
    async fn set_password(&self, user_id: i64, password_hash: &str) -> StoreResult<()>;
    async fn create_auth_session(
        &self,
        token_hash: &str,
        user_id: i64,
        ttl_ms: i64,
    ) -> StoreResult<i64>;
    async fn auth_session(&self, token_hash: &str) -> StoreResult<Option<AuthSession>>;
    async fn delete_auth_session(&self, token_hash: &str) -> StoreResult<bool>;
    async fn purge_expired_auth_sessions(&self) -> StoreResult<u64>;

    async fn create_project(
        &self,
        name: &str,
        owner: i64,
        branch: &str,
        first: NewSnapshot,
    ) -> StoreResult<(Project, SnapshotMeta)>;
    async fn project(&self, id: i64) -> StoreResult<Option<Project>>;
    async fn projects_of_user(&self, user_id: i64) -> StoreResult<Vec<(Project, Role)>>;
    async fn all_projects(&self) -> StoreResult<Vec<Project>>;
    async fn delete_project(&self, id: i64) -> StoreResult<bool>;
    async fn member_role(&self, project_id: i64, user_id: i64) -> StoreResult<Option<Role>>;
    async fn members(&self, project_id: i64) -> StoreResult<Vec<Member>>;
    async fn set_member(&self, project_id: i64, user_id: i64, role: Role) -> StoreResult<()>;
    async fn remove_member(&self, project_id: i64, user_id: i64) -> StoreResult<bool>;

    async fn create_branch(
        &self,
        key: &WorkspaceKey,
        snapshot: NewSnapshot,
    ) -> StoreResult<SnapshotMeta>;
    async fn latest_snapshot(&self, key: &WorkspaceKey) -> StoreResult<Option<Snapshot>>;
    async fn snapshot(&self, key: &WorkspaceKey, version: i64) -> StoreResult<Option<Snapshot>>;
    async fn list_snapshots(&self, key: &WorkspaceKey) -> StoreResult<Vec<SnapshotMeta>>;
    async fn branches(&self, project_id: i64) -> StoreResult<Vec<String>>;

    async fn claim(
        &self,
        key: &WorkspaceKey,
        server_tag: &str,
        lease_ms: i64,
    ) -> StoreResult<ClaimOutcome>;
    async fn claim_of(&self, key: &WorkspaceKey) -> StoreResult<Option<Claim>>;
    async fn claims_of_node(&self, server_tag: &str) -> StoreResult<Vec<Claim>>;
    async fn release_claim(&self, key: &WorkspaceKey, fence: &Fence) -> StoreResult<bool>;

    async fn mark_failed(
        &self,
        key: &WorkspaceKey,
        reason: &str,
        server_tag: &str,
        for_ms: i64,
    ) -> StoreResult<()>;
    async fn failure_of(&self, key: &WorkspaceKey) -> StoreResult<Option<Failure>>;
    async fn failures(&self) -> StoreResult<Vec<Failure>>;
    async fn clear_failure(&self, key: &WorkspaceKey) -> StoreResult<bool>;

    async fn attach_session(&self, session: &WsSession) -> StoreResult<()>;
    async fn detach_session(&self, id: &str) -> StoreResult<Option<WorkspaceKey>>;
    async fn sessions_of(&self, key: &WorkspaceKey) -> StoreResult<Vec<WsSession>>;
    async fn wipe_server_tag(&self, server_tag: &str) -> StoreResult<WipeReport>;

    async fn append_journal(
        &self,
        key: &WorkspaceKey,
        fence: &Fence,
        op: &[u8],
    ) -> StoreResult<i64>;
    async fn journal_after(
        &self,
        key: &WorkspaceKey,
        after_seq: i64,
    ) -> StoreResult<Vec<JournalEntry>>;

    async fn register_node(
        &self,
        server_tag: &str,
        cluster_addr: Option<&str>,
        http_addr: Option<&str>,
    ) -> StoreResult<NodeRow>;
    async fn heartbeat(&self, server_tag: &str) -> StoreResult<bool>;
    async fn live_nodes(&self, lease_ms: i64) -> StoreResult<Vec<NodeRow>>;
    async fn remove_node(&self, server_tag: &str) -> StoreResult<bool>;
    async fn remove_node_if_stale(&self, server_tag: &str, lease_ms: i64) -> StoreResult<bool>;
    async fn nodes_with_age(&self) -> StoreResult<Vec<(NodeRow, i64)>>;
    async fn owned_claims(&self) -> StoreResult<Vec<Claim>>;
}
