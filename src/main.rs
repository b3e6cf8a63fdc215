//! The `branchd` command: a thin CLI over the library. See `branchd --help`.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use branchd::config::{Config, DatabaseConfig, LogConfig, LogFormat};
use branchd::gateway::auth;
use branchd::gateway::hashing::PasswordHashing;
use branchd::server::{ADMIN_USERNAME, Server};
use branchd::storage::{self, redact_url};

/// branchd keeps one live git working copy per (project, branch) and serves
/// it to editor clients.
#[derive(Parser)]
#[command(name = "branchd", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the HTTP API) until SIGINT or SIGTERM.
    ///
    /// With no options it keeps everything under ./data (SQLite) and listens
    /// on 127.0.0.1:8080. On first start it creates the user `admin` and
    /// prints its password once (or takes BRANCHD_ADMIN_PASSWORD).
    Serve(Box<Config>),
    /// Apply database migrations and exit (serve also applies them at start).
    Migrate(DatabaseConfig),
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user and print a generated password.
    Add {
        /// The login name: letters, digits, '.', '_' or '-'.
        name: String,
        /// Make the user an administrator.
        #[arg(long)]
        admin: bool,
        /// Shown as git commit author (default: the name).
        #[arg(long)]
        display_name: Option<String>,
        /// Used as git commit email (default: NAME@branchd.invalid).
        #[arg(long)]
        email: Option<String>,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// Give a user a new generated password (printed); their login tokens are revoked.
    Passwd {
        name: String,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// List users.
    List {
        #[command(flatten)]
        database: DatabaseConfig,
    },
}

fn init_logging(log: &LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&log.log)
        .with_context(|| format!("BRANCHD_LOG / --log {:?} is not a valid filter", log.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = init_logging(&cli.log) {
        eprintln!("branchd: {err:#}");
        return ExitCode::from(2);
    }
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("branchd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(config) => serve(*config).await,
        Command::Migrate(database) => {
            open_store(&database).await?;
            println!("migrations applied to {}", redact_url(&database.url()));
            Ok(())
        }
        Command::User { command } => user(command).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = Server::start(config).await?;
    if let Some(password) = &server.generated_admin_password {
        println!("branchd: created user {ADMIN_USERNAME:?} with password: {password}");
        println!(
            "branchd: this password is shown only once; change it with `branchd user passwd {ADMIN_USERNAME}`"
        );
    }
    println!("branchd: listening on http://{}", server.local_addr());
    shutdown_signal().await?;
    tracing::info!("shutdown signal received");
    server.shutdown().await
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("listening for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

async fn open_store(
    database: &DatabaseConfig,
) -> anyhow::Result<std::sync::Arc<dyn storage::Store>> {
    let url = database.url();
    storage::open(&url, database.db_max_connections)
        .await
        .with_context(|| format!("opening the database {}", redact_url(&url)))
}

async fn user(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add {
            name,
            admin,
            display_name,
            email,
            database,
        } => {
            let store = open_store(&database).await?;
            let spec = auth::UserSpec {
                username: name,
                password: None,
                display_name,
                email,
                admin,
            };
            let hashing = PasswordHashing::new(1, 1)?;
            let (user, password) = auth::create_user(store.as_ref(), &hashing, spec)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            println!("created user {:?} (id {})", user.username, user.id);
            if let Some(password) = password {
                println!("password: {password}");
            }
            Ok(())
        }
        UserCommand::Passwd { name, database } => {
            let store = open_store(&database).await?;
            let (user, _) = store
                .user_by_name(&name)
                .await?
                .with_context(|| format!("no user named {name:?}"))?;
            let password = auth::generate_password()?;
            let hash = PasswordHashing::new(1, 1)?.hash(password.clone()).await?;
            store.set_password(user.id, &hash).await?;
            println!("new password for {:?}: {password}", user.username);
            Ok(())
        }
        UserCommand::List { database } => {
            let store = open_store(&database).await?;
            for user in store.list_users().await? {
                let admin = if user.is_admin { " (admin)" } else { "" };
                println!("{}\t{}\t{}{admin}", user.id, user.username, user.email);
            }
            Ok(())
        }
    }
}
