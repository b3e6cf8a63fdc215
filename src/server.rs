//! Wires branchd together for `branchd serve`: opens the store, applies
//! migrations, makes sure an administrator exists, binds the HTTP listener,
//! starts the allocator, and runs until told to stop; then drains.
//!
//! [`Server`] is a value with an explicit [`Server::shutdown`], so the binary
//! and the integration tests start and stop the real service the same way.
//! This module decides nothing about requests: it only starts and stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::allocator::{Allocator, AllocatorSettings};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::gateway::{self, AppState, auth};
use crate::storage::{self, Store, redact_url};
use crate::workspace::WorkspaceSettings;

/// The administrator created on first start.
pub const ADMIN_USERNAME: &str = "admin";

/// How long in-flight HTTP requests get to finish after a shutdown signal.
/// Short: by then every WebSocket has been told to reconnect and closed.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How often expired login tokens are deleted.
const TOKEN_PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// Sends small frames at once. Without it, a reply written right after an
/// event on the same socket waits for the client's delayed ACK (40 ms on
/// Linux): Nagle's algorithm.
fn no_delay(stream: &mut tokio::net::TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(error = %err, "setting TCP_NODELAY on a connection failed");
    }
}

/// A running branchd node.
pub struct Server {
    local_addr: SocketAddr,
    store: Arc<dyn Store>,
    allocator: Allocator,
    cluster: Cluster,
    draining: watch::Sender<bool>,
    /// The password of the `admin` user if this start created it with a
    /// generated password; shown once, never stored in clear.
    pub generated_admin_password: Option<String>,
    stop: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    housekeeping: JoinHandle<()>,
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

        let generated_admin_password =
            ensure_admin(store.as_ref(), config.admin_password.clone()).await?;

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
        let allocator = Allocator::start(
            store.clone(),
            WorkspaceSettings::from_config(&config),
            allocator_settings,
        )
        .await
        .context("starting the allocator")?;
        let cluster = match Cluster::start(&config, store.clone(), allocator.clone()).await {
            Ok(cluster) => cluster,
            Err(err) => {
                allocator.drain().await;
                allocator.stop().await;
                return Err(err.context("joining the cluster"));
            }
        };

        let (draining, draining_seen) = watch::channel(false);
        let state = AppState {
            store: store.clone(),
            config: Arc::new(config),
            server_tag,
            allocator: allocator.clone(),
            cluster: cluster.clone(),
            draining: draining_seen,
        };
        let (stop, stopped) = watch::channel(false);
        let mut on_stop = stopped.clone();
        let http = tokio::spawn(
            axum::serve(listener.tap_io(no_delay), gateway::router(state))
                .with_graceful_shutdown(async move { gateway::until_set(&mut on_stop).await })
                .into_future(),
        );
        let housekeeping = tokio::spawn(purge_tokens(store.clone(), stopped));
        Ok(Server {
            local_addr,
            store,
            allocator,
            cluster,
            draining,
            generated_admin_password,
            stop,
            http,
            housekeeping,
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

    /// Drains: readiness turns to 503, workspaces are saved and stopped
    /// and this node's rows removed (within the drain timeout); then the
    /// HTTP server stops accepting connections and lets in-flight requests
    /// finish (up to a grace period). Returns when the server is down.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        // Readiness turns 503 and every socket is told to reconnect.
        let _ = self.draining.send(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.allocator.drain().await;
        self.allocator.stop().await;
        self.cluster.stop().await;
        let _ = self.stop.send(true);
        self.housekeeping.abort();
        let mut http = self.http;
        match tokio::time::timeout(HTTP_SHUTDOWN_GRACE, &mut http).await {
            Ok(joined) => joined.context("HTTP server task")??,
            Err(_) => {
                tracing::warn!("requests still running after the shutdown grace; stopping anyway");
                http.abort();
            }
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
    match auth::create_user(store, spec).await {
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

async fn purge_tokens(store: Arc<dyn Store>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TOKEN_PURGE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => match store.purge_expired_auth_sessions().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "purged expired login tokens"),
                Err(err) => tracing::warn!(error = %err, "purging expired login tokens failed"),
            },
            _ = gateway::until_set(&mut stopped) => return,
        }
    }
}
