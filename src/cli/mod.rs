//! Command-line interface: parse, resolve the profile, dispatch. The work is done by
//! the library; these modules read secrets, print results and pick exit codes.

mod chat;
mod commands;
mod demo;
pub mod exit;
mod messaging;
mod secrets;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "sotto", version, about = "End-to-end encrypted messenger: direct QUIC between peers, Noise inside.")]
pub struct Args {
    /// Profile directory (default: the XDG data dir, e.g. ~/.local/share/sotto).
    #[arg(long, global = true, env = "SOTTO_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// Read the identity passphrase from the first line of FILE instead of prompting.
    #[arg(long, global = true, env = "SOTTO_PASSPHRASE_FILE", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,

    /// More log output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Config file (default: the XDG config dir, e.g. ~/.config/sotto/config.toml).
    #[arg(long, global = true, env = "SOTTO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create or show this profile's identity.
    #[command(subcommand)]
    Id(IdCommand),
    /// Run a rendezvous node; prints its server address, serves until Ctrl-C.
    Rendezvous {
        /// UDP address to listen on (port 0 picks a free one).
        #[arg(long, default_value = "0.0.0.0:7070")]
        listen: SocketAddr,
        /// Directory for the node's certificate, key and accounts.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Host name or IP to put in the printed server address.
        #[arg(long, value_name = "HOST")]
        public_host: Option<String>,
        /// Connections one source address (IPv6: one /64) may hold at once.
        #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
        max_connections_per_address: u32,
        /// Connections the node holds at once from everywhere.
        #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
        max_connections: u32,
        /// Lookups (and online lists and watches) per second per source address, with a
        /// burst of ten times as many; 0 turns the limit off.
        #[arg(long, value_name = "N", default_value_t = 20)]
        lookup_rate: u32,
    },
    /// Create an account on a rendezvous node for this identity.
    Register(AccountArgs),
    /// Sign in to an existing account from this profile (binds this identity to it).
    Login(AccountArgs),
    /// Stay online: receive messages, publish signed presence, withdraw on Ctrl-C.
    Up {
        /// UDP address for direct peer sessions [default: config `listen`, else 0.0.0.0:0].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Presence record lifetime in seconds (the node caps it).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(10..=3600))]
        ttl: u64,
        /// Print events as JSON, one object per line.
        #[arg(long)]
        json: bool,
    },
    /// Send an end-to-end encrypted message (the message from stdin when absent).
    Send { user: String, message: Option<String> },
    /// Show local history, oldest first: with USER, or with everyone.
    History {
        user: Option<String>,
        /// How many of the newest messages.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: u64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Pinned contacts: fingerprint, verified, online now.
    Contacts {
        #[arg(long)]
        json: bool,
    },
    /// Verify a contact's key.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// List the users online now.
    Online {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show a user's keys and current presence, verified on this side.
    Lookup {
        user: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// JSON-RPC 2.0 for programs, one object per line (see docs/rpc.md).
    Rpc {
        /// Serve on standard input and output (the only transport).
        #[arg(long, required = true)]
        stdio: bool,
    },
    /// Full-screen chat: contacts with presence, the conversation, delivery states
    /// (uses the running `sotto up`, or goes online while open; logs to HOME/chat.log).
    Chat {
        /// Open the conversation with USER.
        user: Option<String>,
    },
    /// Run the whole flow on this machine in a temporary directory.
    Demo,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff), e.g. `sotto man | man -l -`.
    Man,
}

#[derive(Subcommand, Debug)]
pub enum IdCommand {
    /// Make a new identity (Ed25519) and Noise key (X25519), encrypted with a passphrase.
    New,
    /// Print the fingerprint and public keys (no passphrase needed).
    Show {
        #[arg(long, conflicts_with = "qr")]
        json: bool,
        /// Also draw the fingerprint as a QR code, for a phone to scan and compare.
        #[arg(long)]
        qr: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ContactCommand {
    /// Show the pair's safety number, or mark the contact verified if SAFETY_NUMBER matches.
    Verify {
        user: String,
        /// The safety number both of you see (spaces optional).
        safety_number: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct AccountArgs {
    /// Username: 3-32 characters of a-z, 0-9, '_' and '-'.
    pub user: String,
    /// The node's server address, as it printed it: sotto://HOST:PORT#sha256:HEX
    /// [default: config `server`].
    #[arg(long, value_name = "ADDRESS")]
    pub server: Option<String>,
    /// Read the account password from the first line of FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "password_stdin")]
    pub password_file: Option<PathBuf>,
    /// Read the account password from the first line of standard input.
    #[arg(long)]
    pub password_stdin: bool,
}

/// Where logs go instead of stderr: a file for the full-screen `chat`.
pub fn log_file(args: &Args) -> Option<PathBuf> {
    matches!(args.command, Command::Chat { .. }).then(|| home(args).ok().map(|h| chat::log_path(&h))).flatten()
}

pub fn init_logging(verbose: u8, quiet: bool, log_file: Option<PathBuf>) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SOTTO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("sotto={level},warn")));
    // Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org).
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match log_file {
        Some(path) => logs.with_writer(chat::log_writer(&path)).with_ansi(false).init(),
        None => logs.with_writer(std::io::stderr).with_ansi(colour).init(),
    }
}

/// Where control sockets live: `$XDG_RUNTIME_DIR/sotto`, or a per-user directory in /tmp
/// (created 0700, and refused if someone else owns it).
fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("sotto"),
        _ => std::env::temp_dir().join(format!("sotto-{}", sotto::control::own_uid())),
    }
}

fn config_path(args: &Args) -> Option<PathBuf> {
    args.config.clone().or_else(|| directories::ProjectDirs::from("", "", "sotto").map(|d| d.config_dir().join("config.toml")))
}

fn home(args: &Args) -> Result<PathBuf> {
    if let Some(h) = &args.home {
        return Ok(h.clone());
    }
    directories::ProjectDirs::from("", "", "sotto")
        .map(|d| d.data_dir().to_path_buf())
        .context("cannot find a home directory: pass --home DIR or set SOTTO_HOME")
}

pub async fn run(args: Args) -> Result<()> {
    let config = match config_path(&args) {
        Some(path) => sotto::config::Config::load(&path)?,
        None => sotto::config::Config::default(),
    };
    let ctx = commands::Context { home: home(&args)?, passphrase_file: args.passphrase_file.clone(), runtime_dir: runtime_dir(), config };
    match args.command {
        Command::Id(IdCommand::New) => commands::id_new(&ctx),
        Command::Id(IdCommand::Show { json, qr }) => commands::id_show(&ctx, json, qr),
        Command::Rendezvous { listen, data, public_host, max_connections_per_address, max_connections, lookup_rate } => {
            let limits = commands::NodeLimits { max_connections_per_address, max_connections, lookup_rate };
            commands::rendezvous(listen, data, public_host, limits).await
        }
        Command::Register(a) => commands::account(&ctx, a, commands::AccountAction::Register).await,
        Command::Login(a) => commands::account(&ctx, a, commands::AccountAction::Login).await,
        Command::Up { listen, ttl, json } => {
            let listen = listen.or(ctx.config.listen).unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
            messaging::up(&ctx, listen, ttl, json).await
        }
        Command::Send { user, message } => messaging::send(&ctx, &user, message).await,
        Command::History { user, limit, json } => messaging::history(&ctx, user.as_deref(), limit as usize, json).await,
        Command::Contacts { json } => messaging::contacts(&ctx, json).await,
        Command::Contact(ContactCommand::Verify { user, safety_number, json }) => {
            messaging::verify(&ctx, &user, safety_number.as_deref(), json).await
        }
        Command::Online { json } => messaging::online(&ctx, json).await,
        Command::Lookup { user, json } => messaging::lookup(&ctx, &user, json).await,
        Command::Rpc { .. } => messaging::rpc(&ctx).await,
        Command::Chat { user } => chat::chat(&ctx, user.as_deref()).await,
        Command::Demo => demo::run().await,
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut <Args as clap::CommandFactory>::command(), "sotto", &mut script);
            Ok(std::io::Write::write_all(&mut std::io::stdout(), &script)?)
        }
        Command::Man => Ok(clap_mangen::Man::new(<Args as clap::CommandFactory>::command()).render(&mut std::io::stdout())?),
    }
}
