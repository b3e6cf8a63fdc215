//! Every knob of branchd, in one place.
//!
//! Each field is a command-line flag and a `BRANCHD_*` environment variable
//! (flags win), with a default that runs a single node on the embedded
//! SQLite store. The README's configuration table lists every variable; a
//! test keeps the two in step. This module only parses and resolves: it must
//! never open files, sockets or databases.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::storage;

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logging, shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// Log line format.
    #[arg(
        long,
        env = "BRANCHD_LOG_FORMAT",
        value_enum,
        default_value = "human",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `branchd=debug,sqlx=warn`).
    #[arg(long, env = "BRANCHD_LOG", default_value = "info", global = true)]
    pub log: String,
}

/// Where the data lives: used by every subcommand that touches the store.
#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// Database URL: `sqlite://PATH` or `postgres://USER@HOST/DB`. Falls back
    /// to `DATABASE_URL`; without either, a SQLite file `branchd.db` in the data dir.
    #[arg(long, env = "BRANCHD_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Directory for the embedded database and, by default, working copies.
    #[arg(long, env = "BRANCHD_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Most database connections this node opens for its work (`serve`
    /// opens one more, of its own, for its heartbeat).
    #[arg(long, env = "BRANCHD_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
}

impl DatabaseConfig {
    /// The database to use: the flag or `BRANCHD_DATABASE_URL`, then
    /// `DATABASE_URL`, then the embedded SQLite file.
    pub fn url(&self) -> String {
        self.database_url
            .clone()
            .filter(|url| !url.is_empty())
            .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| storage::sqlite::default_url(&self.data_dir))
    }
}

/// Everything `branchd serve` needs.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address and port of the HTTP server.
    #[arg(long, env = "BRANCHD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseConfig,

    /// Where working copies are unpacked. Default: `workspaces` in the data dir.
    #[arg(long, env = "BRANCHD_WORKSPACE_DIR")]
    pub workspace_dir: Option<PathBuf>,

    /// This node's stable identity; rows it owns carry it. Default: the host name
    /// (the pod name on Kubernetes).
    #[arg(long, env = "BRANCHD_SERVER_TAG")]
    pub server_tag: Option<String>,

    /// Password for the `admin` user created on first start. Default: a
    /// generated one, printed once.
    #[arg(long, env = "BRANCHD_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,

    /// How long a login token stays valid.
    #[arg(long, env = "BRANCHD_TOKEN_TTL", default_value = "7d", value_parser = parse_duration)]
    pub token_ttl: Duration,

    /// How often idle workspaces are looked for and collected.
    #[arg(long, env = "BRANCHD_GC_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub gc_interval: Duration,

    /// How long a workspace with no clients stays warm before it is saved and stopped.
    #[arg(long, env = "BRANCHD_IDLE_GRACE", default_value = "120s", value_parser = parse_duration)]
    pub idle_grace: Duration,

    /// How often this node renews its heartbeat in the database.
    #[arg(long, env = "BRANCHD_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// How many times a crashing workspace is restarted within the restart
    /// window before it is marked failed.
    #[arg(long, env = "BRANCHD_RESTART_LIMIT", default_value_t = 3)]
    pub restart_limit: u32,

    /// The window the restart limit counts in.
    #[arg(long, env = "BRANCHD_RESTART_WINDOW", default_value = "60s", value_parser = parse_duration)]
    pub restart_window: Duration,

    /// How long a shutdown waits for workspaces to be saved and stopped.
    #[arg(long, env = "BRANCHD_DRAIN_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How long a node's claims stay valid after its last heartbeat.
    #[arg(long, env = "BRANCHD_LEASE", default_value = "5s", value_parser = parse_duration)]
    pub lease: Duration,

    /// Largest HTTP request body accepted (JSON API).
    #[arg(long, env = "BRANCHD_MAX_REQUEST_BODY", default_value = "1MiB", value_parser = parse_size)]
    pub max_request_body: u64,

    /// Largest WebSocket frame accepted.
    #[arg(long, env = "BRANCHD_MAX_FRAME", default_value = "16MiB", value_parser = parse_size)]
    pub max_frame: u64,

    /// Largest single file a client may write.
    #[arg(long, env = "BRANCHD_MAX_FILE", default_value = "8MiB", value_parser = parse_size)]
    pub max_file: u64,

    /// Memory of the node for the contents of small files (64 KiB or less)
    /// recently read or written, at most 4 MiB of it per workspace with
    /// clients; 0 turns it off.
    #[arg(long, env = "BRANCHD_FILE_CACHE", default_value = "256MiB", value_parser = parse_size)]
    pub file_cache: u64,

    /// Largest working copy (unpacked) a snapshot may hold.
    #[arg(long, env = "BRANCHD_MAX_WORKSPACE", default_value = "1GiB", value_parser = parse_size)]
    pub max_workspace: u64,

    /// Longest path, in bytes, a client may name.
    #[arg(long, env = "BRANCHD_MAX_PATH", default_value_t = 1024)]
    pub max_path: usize,

    /// How often each WebSocket is pinged; a socket that misses two pongs is closed.
    #[arg(long, env = "BRANCHD_PING_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A workspace with unsaved changes is saved by itself this long after its last change.
    #[arg(long, env = "BRANCHD_AUTOSAVE_QUIET", default_value = "30s", value_parser = parse_duration)]
    pub autosave_quiet: Duration,

    /// ... and at least this often while changes keep coming.
    #[arg(long, env = "BRANCHD_AUTOSAVE_MAX", default_value = "5m", value_parser = parse_duration)]
    pub autosave_max: Duration,

    /// How long an edit lock lasts when the client names no ttl.
    #[arg(long, env = "BRANCHD_LOCK_TTL", default_value = "30s", value_parser = parse_duration)]
    pub lock_ttl: Duration,

    /// Longest edit lock a client may ask for.
    #[arg(long, env = "BRANCHD_MAX_LOCK_TTL", default_value = "10m", value_parser = parse_duration)]
    pub max_lock_ttl: Duration,

    /// Shared secret of the cluster. Setting it turns clustering on: the node
    /// listens on the cluster port and joins every live node in the database
    /// (which must then be Postgres). Unset: a single node.
    #[arg(long, env = "BRANCHD_CLUSTER_COOKIE", hide_env_values = true)]
    pub cluster_cookie: Option<String>,

    /// Port of the node-to-node (ractor_cluster) listener.
    #[arg(long, env = "BRANCHD_CLUSTER_PORT", default_value_t = 4370)]
    pub cluster_port: u16,

    /// Address the cluster listener binds to.
    #[arg(long, env = "BRANCHD_CLUSTER_BIND", default_value = "0.0.0.0")]
    pub cluster_bind: std::net::IpAddr,

    /// Host or IP other nodes reach this node at. Default: `POD_IP` when set
    /// (Kubernetes downward API), else the host name.
    #[arg(long, env = "BRANCHD_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,

    /// HTTP address (`host:port`) clients and peers reach this node at, shown
    /// in the `nodes` table and the cluster view. Default: the advertised
    /// host with the port of `BRANCHD_LISTEN`.
    #[arg(long, env = "BRANCHD_ADVERTISE_HTTP")]
    pub advertise_http: Option<String>,

    /// A DNS name whose addresses are peers too (a Kubernetes headless
    /// service); looked up on every membership round.
    #[arg(long, env = "BRANCHD_CLUSTER_DNS")]
    pub cluster_dns: Option<String>,

    /// This node's certificate chain (PEM) for mutual TLS on node links.
    /// With `BRANCHD_CLUSTER_TLS_KEY` and `BRANCHD_CLUSTER_TLS_CA`: every
    /// node link is TLS, and a peer must present a certificate signed by
    /// that CA (the cookie is checked too). All three or none.
    #[arg(long, env = "BRANCHD_CLUSTER_TLS_CERT")]
    pub cluster_tls_cert: Option<PathBuf>,

    /// This node's private key (PEM) for mutual TLS on node links.
    #[arg(long, env = "BRANCHD_CLUSTER_TLS_KEY")]
    pub cluster_tls_key: Option<PathBuf>,

    /// The CA certificate(s) (PEM) that peers' certificates must chain to.
    #[arg(long, env = "BRANCHD_CLUSTER_TLS_CA")]
    pub cluster_tls_ca: Option<PathBuf>,

    /// How often membership is checked: peers in the database are connected,
    /// pinged, and dropped when stale.
    #[arg(long, env = "BRANCHD_MEMBERSHIP_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub membership_interval: Duration,

    /// How long a call to another node (attach, an op, a ping) may take before
    /// the caller gives up and the client is told `unavailable`.
    #[arg(long, env = "BRANCHD_PEER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub peer_timeout: Duration,

    /// Snapshot versions kept per branch (older ones are deleted on save).
    #[arg(long, env = "BRANCHD_SNAPSHOTS_KEPT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub snapshots_kept: u32,

    /// Most compiles running at once on this node (0: one per CPU core).
    /// Further compiles wait for a free slot.
    #[arg(long, env = "BRANCHD_COMPILE_CONCURRENCY", default_value_t = 0)]
    pub compile_concurrency: usize,

    /// Longest wall time of one compile (all its files).
    #[arg(long, env = "BRANCHD_COMPILE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub compile_timeout: Duration,

    /// Most script operations per file evaluated.
    #[arg(
        long,
        env = "BRANCHD_COMPILE_MAX_OPERATIONS",
        default_value_t = 10_000_000
    )]
    pub compile_max_operations: u64,

    /// Deepest nesting of function calls in a script.
    #[arg(long, env = "BRANCHD_COMPILE_MAX_CALL_DEPTH", default_value_t = 64)]
    pub compile_max_call_depth: usize,

    /// Deepest nesting of expressions a script may be written with.
    #[arg(long, env = "BRANCHD_COMPILE_MAX_EXPR_DEPTH", default_value_t = 64)]
    pub compile_max_expr_depth: usize,

    /// Longest string a script may build.
    #[arg(long, env = "BRANCHD_COMPILE_MAX_STRING", default_value = "1MiB", value_parser = parse_size)]
    pub compile_max_string: u64,

    /// Most elements of an array a script may build (nested arrays count
    /// all their elements).
    #[arg(long, env = "BRANCHD_COMPILE_MAX_ARRAY", default_value_t = 10_000)]
    pub compile_max_array: usize,

    /// Most entries of an object map a script may build.
    #[arg(long, env = "BRANCHD_COMPILE_MAX_MAP", default_value_t = 10_000)]
    pub compile_max_map: usize,

    /// Most files one compile may reach (the entry and all it imports).
    #[arg(long, env = "BRANCHD_COMPILE_MAX_MODULES", default_value_t = 1_000)]
    pub compile_max_modules: usize,

    /// Most nodes of one shape tree.
    #[arg(
        long,
        env = "BRANCHD_COMPILE_MAX_SHAPE_NODES",
        default_value_t = 100_000
    )]
    pub compile_max_shape_nodes: u64,

    /// Most levels of one shape tree.
    #[arg(long, env = "BRANCHD_COMPILE_MAX_SHAPE_DEPTH", default_value_t = 256)]
    pub compile_max_shape_depth: u32,

    /// Most memory one compile may hold at once (everything the script
    /// builds: strings, arrays, maps, shapes, and the parsed files).
    #[arg(long, env = "BRANCHD_COMPILE_MAX_MEMORY", default_value = "256MiB", value_parser = parse_size)]
    pub compile_max_memory: u64,

    /// How long a client has to send a request's headers in full, from the
    /// moment its connection opens or its previous response was sent; then
    /// the connection is closed. 0 turns it off.
    #[arg(long, env = "BRANCHD_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// An HTTP connection (not upgraded to a WebSocket) on which no byte is
    /// read or written for this long is closed. 0 turns it off.
    #[arg(long, env = "BRANCHD_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,

    /// Most HTTP connections (WebSockets included) open at once; further
    /// ones are closed as soon as they are accepted. 0: the open-file limit
    /// less `BRANCHD_FD_RESERVE`.
    #[arg(long, env = "BRANCHD_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Most HTTP connections (WebSockets included) open at once from one
    /// client address (an IPv6 client: its /64). 0: no limit.
    #[arg(
        long,
        env = "BRANCHD_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256
    )]
    pub max_connections_per_address: usize,

    /// File descriptors kept out of the automatic connection budget, for the
    /// database, working copies, node links and the process itself.
    #[arg(long, env = "BRANCHD_FD_RESERVE", default_value_t = 256)]
    pub fd_reserve: u64,

    /// Most password hashes (logins, new users) computed at once (0: one per
    /// CPU core).
    #[arg(long, env = "BRANCHD_HASH_CONCURRENCY", default_value_t = 0)]
    pub hash_concurrency: usize,

    /// Most password hashes waiting for a free slot; further logins get 503
    /// `unavailable` at once.
    #[arg(long, env = "BRANCHD_HASH_QUEUE", default_value_t = 64)]
    pub hash_queue: usize,

    /// Failed logins of one username before each further failure pauses it
    /// (429 `rate_limited`). 0 turns this off.
    #[arg(long, env = "BRANCHD_LOGIN_FAILURES_PER_USER", default_value_t = 5)]
    pub login_failures_per_user: u32,

    /// Failed logins from one client address before each further failure
    /// pauses it (429 `rate_limited`). 0 turns this off.
    #[arg(long, env = "BRANCHD_LOGIN_FAILURES_PER_ADDRESS", default_value_t = 20)]
    pub login_failures_per_address: u32,

    /// A username's or address's failed logins are forgotten after this long
    /// without a failure.
    #[arg(long, env = "BRANCHD_LOGIN_FAILURE_WINDOW", default_value = "15m", value_parser = parse_duration)]
    pub login_failure_window: Duration,

    /// The first pause after too many failed logins; each further failure
    /// doubles it.
    #[arg(long, env = "BRANCHD_LOGIN_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub login_backoff: Duration,

    /// The longest pause after failed logins.
    #[arg(long, env = "BRANCHD_LOGIN_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub login_backoff_max: Duration,
}

/// The configuration's flags as a command of their own.
#[derive(clap::Parser)]
struct OnlyConfig {
    #[command(flatten)]
    config: Config,
}

/// [`OnlyConfig`]'s command with every environment variable unbound.
fn defaults_only() -> clap::Command {
    use clap::CommandFactory;
    OnlyConfig::command().mut_args(|arg| arg.env(None))
}

impl Config {
    /// The configuration `branchd serve` would use with no flags: defaults,
    /// overridden by any `BRANCHD_*` variables set. A starting point for
    /// tests and tools that build a server in-process.
    pub fn from_env() -> Result<Config, clap::Error> {
        use clap::Parser;
        OnlyConfig::try_parse_from(["branchd"]).map(|only| only.config)
    }

    /// The defaults alone, whatever `BRANCHD_*` variables the environment
    /// holds: what tests start from, so a developer's own settings (a
    /// `BRANCHD_LISTEN`, a cookie, a database URL) never leak into them.
    pub fn for_tests() -> Result<Config, clap::Error> {
        use clap::FromArgMatches;
        let matches = defaults_only().try_get_matches_from(["branchd"])?;
        OnlyConfig::from_arg_matches(&matches).map(|only| only.config)
    }

    /// The directory working copies are unpacked into.
    pub fn workspace_dir(&self) -> PathBuf {
        self.workspace_dir
            .clone()
            .unwrap_or_else(|| self.database.data_dir.join("workspaces"))
    }

    /// Whether this node joins a cluster (a cookie is set).
    pub fn clustered(&self) -> bool {
        self.cluster_cookie
            .as_deref()
            .is_some_and(|c| !c.is_empty())
    }

    /// The host other nodes reach this node at.
    pub fn advertise_host(&self) -> String {
        self.advertise_host
            .clone()
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("POD_IP").ok().filter(|ip| !ip.is_empty()))
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }

    /// This node's HTTP address as others should use it, given the port the
    /// listener got (which differs from `listen` when that names port 0).
    pub fn advertise_http(&self, bound_port: u16) -> String {
        self.advertise_http
            .clone()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| format!("{}:{}", self.advertise_host(), bound_port))
    }

    /// This node's cluster address as others should use it.
    pub fn advertise_cluster(&self) -> String {
        format!("{}:{}", self.advertise_host(), self.cluster_port)
    }

    /// This node's server tag: configured, or the host name.
    pub fn server_tag(&self) -> String {
        self.server_tag
            .clone()
            .filter(|tag| !tag.is_empty())
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }
}

/// Parses a duration such as `500ms`, `20s`, `2m`, `1h` or `7d`; a bare
/// number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write e.g. 500ms, 20s, 2m, 1h or 7d"))?;
    let millis_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {text:?}: use ms, s, m, h or d"
            ));
        }
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {text:?} is too large"))
}

/// Parses a size such as `512`, `64KiB`, `16MiB` or `1GiB` (K/M/G alone are
/// binary too); a bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: write e.g. 512, 64KiB, 16MiB or 1GiB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}: use B, KiB, MiB or GiB"
            ));
        }
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_configs_read_no_environment_variable() {
        use clap::CommandFactory;
        let bound = OnlyConfig::command()
            .get_arguments()
            .filter(|arg| arg.get_env().is_some())
            .count();
        assert!(bound > 30, "the flags read BRANCHD_* variables");
        let unbound: Vec<String> = defaults_only()
            .get_arguments()
            .filter_map(|arg| arg.get_env().map(|env| env.to_string_lossy().into_owned()))
            .collect();
        assert!(unbound.is_empty(), "still read: {unbound:?}");
        let config = Config::for_tests().expect("the defaults parse");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.lease, Duration::from_secs(5));
        assert!(config.cluster_cookie.is_none());
    }

    #[test]
    fn durations_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes_parse_with_binary_units_and_reject_nonsense() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("16MiB"), Ok(16 * 1024 * 1024));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
