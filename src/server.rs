//! Wires branchd together for `branchd serve`: opens the store, applies
//! migrations, makes sure an administrator exists, binds the HTTP listener,
//! starts the allocator, and runs until told to stop; then drains.
//!
//! [`Server`] is a value with an explicit [`Server::shutdown`], so the binary
//! and the integration tests start and stop the real service the same way.
//! Every task it starts is tracked by one [`Shutdown`]; stopping is the
//! order in which its signals are given and its tasks waited for.
//! This module decides nothing about requests: it only starts and stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::allocator::{Allocator, AllocatorSettings};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::gateway::hashing::PasswordHashing;
use crate::gateway::serve::{HttpLimits, connection_budget};
use crate::gateway::throttle::{LoginThrottle, ThrottlePolicy};
use crate::gateway::{self, AppState, auth};
use crate::shutdown::{Shutdown, TaskGroup};
use crate::storage::{self, Store, redact_url};
use crate::workspace::WorkspaceSettings;

/// The administrator created on first start.
pub const ADMIN_USERNAME: &str = "admin";

/// How long in-flight HTTP requests (and any other task still running)
/// get to finish once the drain is done. Short: by then every WebSocket has
/// been told to reconnect and closed.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The longest the drain waits for open sockets to have said `reconnect`
/// before it stops their workspaces (which would close them with a plain
/// `unavailable`). It normally takes milliseconds; a client too slow to
/// take two frames does not hold up the saves.
const SOCKETS_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How often expired login tokens are deleted.
const TOKEN_PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// A running branchd node.
pub struct Server {
    local_addr: SocketAddr,
    store: Arc<dyn Store>,
    allocator: Allocator,
    cluster: Cluster,
    /// The password of the `admin` user if this start created it with a
    /// generated password; shown once, never stored in clear.
    pub generated_admin_password: Option<String>,
    shutdown: Shutdown,
    sockets: TaskGroup,
    http: JoinHandle<()>,
}

impl Server {
    /// Opens the store, applies migrations, creates the administrator if no
    /// user exists, and starts serving HTTP on `config.listen`.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let data_dir = &config.database.data_dir;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data dir {}", data_dir.display()))?;
        let workspace_dir = config.workspace_dir();
        std::fs::create_dir_all(&workspace_dir)
            .with_context(|| format!("creating the workspace dir {}", workspace_dir.display()))?;
        let url = config.database.url();
        let store = storage::open(&url, config.database.db_max_connections)
            .await
            .with_context(|| format!("opening the database {}", redact_url(&url)))?;
        tracing::info!(database = %redact_url(&url), backend = ?store.backend(), "store ready");

        let hashing = Arc::new(
            PasswordHashing::new(config.hash_concurrency, config.hash_queue)
                .context("starting the password hashing threads")?,
        );
        let generated_admin_password =
            ensure_admin(store.as_ref(), &hashing, config.admin_password.clone()).await?;

        let max_connections = connection_budget(config.max_connections, config.fd_reserve)?;
        let http_limits = HttpLimits::from_config(&config, max_connections);
        let logins = Arc::new(LoginThrottle::new(ThrottlePolicy::from_config(&config)));
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let server_tag: Arc<str> = config.server_tag().into();
        tracing::info!(%local_addr, server_tag = %server_tag, "listening");

        let mut allocator_settings = AllocatorSettings::from_config(&config);
        if config.clustered() {
            allocator_settings.http_addr = Some(config.advertise_http(local_addr.port()));
            allocator_settings.cluster_addr = Some(config.advertise_cluster());
        } else {
            allocator_settings.http_addr = Some(local_addr.to_string());
        }
        let shutdown = Shutdown::new();
        let mut workspaces = WorkspaceSettings::from_config(&config);
        // Saves and compiles run in the background: shutdown waits for them.
        workspaces.tasks = shutdown.tracker().clone();
        let allocator = Allocator::start(store.clone(), workspaces, allocator_settings, &shutdown)
            .await
            .context("starting the allocator")?;
        let cluster =
            match Cluster::start(&config, store.clone(), allocator.clone(), &shutdown).await {
                Ok(cluster) => cluster,
                Err(err) => {
                    allocator.drain().await;
                    allocator.stop().await;
                    shutdown.begin_stop();
                    return Err(err.context("joining the cluster"));
                }
            };

        let sockets = shutdown.group();
        let state = AppState {
            store: store.clone(),
            config: Arc::new(config),
            server_tag,
            allocator: allocator.clone(),
            cluster: cluster.clone(),
            shutdown: shutdown.clone(),
            sockets: sockets.clone(),
            hashing,
            logins,
        };
        let http = shutdown.spawn(gateway::serve::serve(
            listener,
            gateway::router(state),
            http_limits,
            shutdown.stopping().clone(),
        ));
        shutdown.spawn_until_stopped(purge_tokens(store.clone()));
        Ok(Server {
            local_addr,
            store,
            allocator,
            cluster,
            generated_admin_password,
            shutdown,
            sockets,
            http,
        })
    }

    /// The address the HTTP server is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// Drains: readiness turns to 503 and every socket is told to
    /// reconnect; once they have, workspaces are saved and stopped and this
    /// node's rows removed (within the drain timeout); the node leaves the
    /// cluster; then every background task is told to stop and the HTTP
    /// server lets in-flight requests finish (up to a grace period).
    /// Returns when every task the server started has ended, or the grace
    /// is up.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.begin_drain();
        if let Err(open) = self.sockets.wait(SOCKETS_CLOSE_WAIT).await {
            tracing::warn!(
                open,
                "sockets still closing after {SOCKETS_CLOSE_WAIT:?}; saving anyway"
            );
        }
        self.allocator.drain().await;
        self.allocator.stop().await;
        self.cluster.stop().await;
        self.shutdown.begin_stop();
        if let Err(running) = self.shutdown.wait(HTTP_SHUTDOWN_GRACE).await {
            tracing::warn!(
                running,
                "requests still running after the shutdown grace; stopping anyway"
            );
            self.http.abort();
        } else {
            self.http.await.context("HTTP server task")?;
        }
        tracing::info!("server stopped");
        Ok(())
    }
}

/// Creates the `admin` user when the store has no user at all. Returns the
/// password if it was generated. Two nodes starting at once on an empty
/// database race benignly: the loser sees the winner's user and moves on.
async fn ensure_admin(
    store: &dyn Store,
    hashing: &PasswordHashing,
    password: Option<String>,
) -> anyhow::Result<Option<String>> {
    if store.user_count().await? > 0 {
        return Ok(None);
    }
    let spec = auth::UserSpec {
        username: ADMIN_USERNAME.to_string(),
        password: password.filter(|p| !p.is_empty()),
        admin: true,
        ..Default::default()
    };
    match auth::create_user(store, hashing, spec).await {
        Ok((user, generated)) => {
            tracing::info!(user = %user.username, "created the first administrator");
            Ok(generated)
        }
        Err(err) if err.code == crate::protocol::ErrorCode::Conflict => Ok(None),
        Err(err) => Err(anyhow::anyhow!(
            "creating the admin user: {} (check BRANCHD_ADMIN_PASSWORD)",
            err.message
        )),
    }
}

/// Deletes expired login tokens every hour, until the node stops (one
/// DELETE: cutting it off halfway leaves nothing half done).
async fn purge_tokens(store: Arc<dyn Store>) {
    let mut tick = tokio::time::interval(TOKEN_PURGE_INTERVAL);
    loop {
        tick.tick().await;
        match store.purge_expired_auth_sessions().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "purged expired login tokens"),
            Err(err) => tracing::warn!(error = %err, "purging expired login tokens failed"),
        }
    }
}
