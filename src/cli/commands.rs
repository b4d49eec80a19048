//! The commands of issue-level features: identity, node, account, presence, lookup.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use zeroize::Zeroizing;

use super::secrets::Source;
use sotto::address::ServerAddress;
use sotto::idfile::KdfParams;
use sotto::keys::Identity;
use sotto::profile::{Profile, ProfileConfig, ProfileError};
use sotto::rendezvous::client::RendezvousClient;
use sotto::rendezvous::node::{Node, NodeConfig};
use sotto::username::Username;

pub struct Context {
    pub home: PathBuf,
    pub passphrase_file: Option<PathBuf>,
    pub runtime_dir: PathBuf,
    pub config: sotto::config::Config,
}

impl Context {
    pub fn profile(&self) -> Result<Profile> {
        Ok(Profile::open(&self.home)?)
    }

    fn passphrase(&self, new: bool) -> Result<Zeroizing<String>> {
        Source { file: self.passphrase_file.as_deref(), stdin: false, what: "identity passphrase" }.read(new)
    }

    pub fn unlock(&self, profile: &Profile) -> Result<Identity> {
        if !profile.has_identity() {
            bail!(ProfileError::NoIdentity(profile.home().to_path_buf()));
        }
        let passphrase = self.passphrase(false)?;
        Ok(profile.unlock(passphrase.as_bytes())?)
    }

    pub fn socket_path(&self) -> PathBuf {
        sotto::control::socket_path(&self.runtime_dir, &self.home)
    }

    /// The running node's control socket, if `sotto up` runs for this profile.
    pub async fn running_node(&self) -> Option<sotto::control::ControlClient> {
        sotto::control::ControlClient::connect(&self.socket_path()).await
    }

    /// The server and username this profile registered or logged in with.
    pub fn account(&self, profile: &Profile) -> Result<(ServerAddress, Username)> {
        let config = profile.config()?;
        let (Some(server), Some(user)) = (config.server, config.username) else { bail!(ProfileError::NoAccount) };
        Ok((server.parse()?, Username::parse(&user)?))
    }
}

/// Completes on SIGINT or SIGTERM.
/// Completes on Ctrl-C or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so a signal that comes early (say, right after the
/// node prints its address) still ends the process cleanly.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (interrupt, terminate) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()));
    async move {
        let next = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                // Without a handler this signal ends the process as it always would.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = next(interrupt) => {}
            _ = next(terminate) => {}
        }
    }
}

pub fn id_new(ctx: &Context) -> Result<()> {
    let profile = ctx.profile()?;
    if profile.has_identity() {
        bail!(ProfileError::IdentityExists(profile.home().to_path_buf()));
    }
    let passphrase = ctx.passphrase(true)?;
    let identity = Identity::generate();
    profile.create_identity(&identity, passphrase.as_bytes(), KdfParams::DEFAULT)?;
    println!("New identity saved in {}", profile.identity_path().display());
    println!("fingerprint  {}", identity.public().fingerprint());
    Ok(())
}

pub fn id_show(ctx: &Context, json: bool, qr: bool) -> Result<()> {
    let profile = ctx.profile()?;
    let header = profile.identity_header()?;
    let key = header.identity_key()?;
    let config = profile.config()?;
    if json {
        println!(
            "{}",
            json!({
                "fingerprint": key.fingerprint().to_string(),
                "identity_key": key.to_hex(),
                "noise_key": header.noise_key().to_hex(),
                "username": config.username,
                "server": config.server,
            })
        );
    } else {
        println!("fingerprint   {}", key.fingerprint());
        println!("identity key  {}", key.to_hex());
        println!("noise key     {}", header.noise_key().to_hex());
        if let (Some(user), Some(server)) = (config.username, config.server) {
            println!("account       {user} at {server}");
        }
        if qr {
            println!("\n{}", fingerprint_qr(key.fingerprint().digits())?);
        }
    }
    Ok(())
}

/// The fingerprint's digits as a QR code drawn with half-block characters.
fn fingerprint_qr(digits: &str) -> Result<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(digits.as_bytes())?;
    Ok(code.render::<Dense1x2>().quiet_zone(true).build())
}

/// The node's limits as given on the command line.
pub struct NodeLimits {
    pub max_connections_per_address: u32,
    pub max_connections: u32,
    /// Per second per source address; 0 is no limit.
    pub lookup_rate: u32,
}

pub async fn rendezvous(listen: SocketAddr, data: PathBuf, public_host: Option<String>, limits: NodeLimits) -> Result<()> {
    let mut config = NodeConfig::new(listen, data);
    config.public_host = public_host;
    config.max_connections_per_address = limits.max_connections_per_address as usize;
    config.max_connections = limits.max_connections as usize;
    config.lookup_rate = (limits.lookup_rate > 0)
        .then(|| sotto::rendezvous::limit::Rate { per_second: limits.lookup_rate, burst: limits.lookup_rate.saturating_mul(10) });
    let node = Node::bind(config)?;
    let stop = shutdown_signal();
    println!("{}", node.address());
    std::io::stdout().flush()?;
    eprintln!("rendezvous node listening on {}; Ctrl-C to stop", node.local_addr()?);
    node.run(stop).await?;
    eprintln!("rendezvous node stopped");
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AccountAction {
    Register,
    Login,
}

pub async fn account(ctx: &Context, args: super::AccountArgs, action: AccountAction) -> Result<()> {
    let username = Username::parse(&args.user)?;
    let Some(server) = args.server.as_ref().or(ctx.config.server.as_ref()) else {
        bail!(super::exit::UsageError("--server ADDRESS is required (or set `server` in the config file)".into()));
    };
    let server: ServerAddress = server.parse()?;
    let profile = ctx.profile()?;
    let identity = ctx.unlock(&profile)?;
    let password = Source { file: args.password_file.as_deref(), stdin: args.password_stdin, what: "account password" }
        .read(action == AccountAction::Register)?;
    let client = RendezvousClient::connect(&server).await?;
    let key_changed = match action {
        AccountAction::Register => {
            client.register(&identity, &username, &password).await.map_err(explain_register)?;
            false
        }
        AccountAction::Login => client.login(&identity, &username, &password).await?,
    };
    client.close().await;
    profile.save_config(&ProfileConfig { server: Some(server.to_string()), username: Some(username.to_string()) })?;
    match action {
        AccountAction::Register => println!("Registered {username} at {server}"),
        AccountAction::Login if key_changed => {
            println!("Logged in as {username} at {server}; this identity now speaks for the account.");
            println!("Contacts will see a new key for {username} and should verify it.");
        }
        AccountAction::Login => println!("Logged in as {username} at {server}"),
    }
    println!("fingerprint  {}", identity.public().fingerprint());
    Ok(())
}

fn explain_register(e: sotto::rendezvous::client::ClientError) -> anyhow::Error {
    use sotto::rendezvous::client::ClientError;
    use sotto::rendezvous::proto::Refusal;
    match e {
        ClientError::Refused(Refusal::UsernameTaken) => {
            anyhow::Error::new(e).context("choose another username, or `sotto login` if the account is yours")
        }
        other => other.into(),
    }
}
