//! The commands of issue-level features: identity, node, account, presence, lookup.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use serde_json::json;
use tokio::sync::watch;
use zeroize::Zeroizing;

use super::exit::{UntrustedError, UsageError};
use super::secrets::Source;
use sotto::address::ServerAddress;
use sotto::clock::unix_now;
use sotto::idfile::KdfParams;
use sotto::keys::{Identity, IdentityKey};
use sotto::online::{self, Event, Presence};
use sotto::profile::{Profile, ProfileConfig, ProfileError};
use sotto::rendezvous::client::{verify_lookup, RendezvousClient, VerifiedAccount};
use sotto::rendezvous::node::{Node, NodeConfig};
use sotto::tls::CertKey;
use sotto::username::Username;

/// Clock difference allowed when checking a looked-up record.
const LOOKUP_SKEW: u64 = 60;

pub struct Context {
    pub home: PathBuf,
    pub passphrase_file: Option<PathBuf>,
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

    /// The server and username this profile registered or logged in with.
    pub fn account(&self, profile: &Profile) -> Result<(ServerAddress, Username)> {
        let config = profile.config()?;
        let (Some(server), Some(user)) = (config.server, config.username) else { bail!(ProfileError::NoAccount) };
        Ok((server.parse()?, Username::parse(&user)?))
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
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

pub fn id_show(ctx: &Context, json: bool) -> Result<()> {
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
    }
    Ok(())
}

pub async fn rendezvous(listen: SocketAddr, data: PathBuf, public_host: Option<String>) -> Result<()> {
    let mut config = NodeConfig::new(listen, data);
    config.public_host = public_host;
    let node = Node::bind(config)?;
    println!("{}", node.address());
    std::io::stdout().flush()?;
    eprintln!("rendezvous node listening on {}; Ctrl-C to stop", node.local_addr()?);
    node.run(shutdown_signal()).await?;
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
    let server: ServerAddress = args.server.parse()?;
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

/// The profile's peer certificate (made on first use).
fn peer_cert(profile: &Profile) -> Result<CertKey> {
    let dir = profile.home().join("peer");
    CertKey::load_or_create(&dir, "sotto-peer").with_context(|| format!("cannot load or create the peer certificate in {}", dir.display()))
}

pub async fn up(ctx: &Context, ttl: u64) -> Result<()> {
    let profile = ctx.profile()?;
    let (server, username) = ctx.account(&profile)?;
    let identity = ctx.unlock(&profile)?;
    let cert = peer_cert(&profile)?;
    let presence = Presence { server: server.clone(), username: username.clone(), addrs: Vec::new(), cert_sha256: cert.sha256(), ttl };
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    // A closed stdout (`sotto up | head -1`) must not stop the node: ignore write errors.
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}").and_then(|_| out.flush());
    };
    online::stay_online(&identity, &presence, stopped, |event| match event {
        Event::Online { observed, expires_in } => {
            say(format!("{username} is online at {server}"));
            say(format!("the node sees this machine as {observed}; presence renews every {} s. Ctrl-C to go offline.", expires_in / 3));
        }
        Event::Republished { .. } => {}
        Event::Lost { reason, retry_in } => eprintln!("{reason}; retrying in {:.1} s", retry_in.as_secs_f32()),
        Event::Withdrawn => say(format!("{username} is offline")),
    })
    .await?;
    Ok(())
}

/// Connects and signs in with this profile's identity.
async fn signed_in(ctx: &Context) -> Result<(RendezvousClient, Username)> {
    let profile = ctx.profile()?;
    let (server, username) = ctx.account(&profile)?;
    let identity = ctx.unlock(&profile)?;
    let client = RendezvousClient::connect(&server).await?;
    client.authenticate(&identity, &username).await?;
    Ok((client, username))
}

pub async fn online(ctx: &Context, json: bool) -> Result<()> {
    let (client, _) = signed_in(ctx).await?;
    let (names, truncated) = client.online().await?;
    client.close().await;
    for name in &names {
        if json {
            println!("{}", json!({ "username": name.as_str() }));
        } else {
            println!("{name}");
        }
    }
    if names.is_empty() && !json {
        eprintln!("nobody is online");
    }
    if truncated {
        eprintln!("(the node listed only the first {})", names.len());
    }
    Ok(())
}

pub async fn lookup(ctx: &Context, user: &str, json: bool) -> Result<()> {
    let target = Username::parse(user)?;
    let (client, _) = signed_in(ctx).await?;
    let info = client.lookup(&target).await.map_err(|e| match e {
        sotto::rendezvous::client::ClientError::Refused(sotto::rendezvous::proto::Refusal::NotFound) => {
            anyhow::Error::new(UsageError(format!("no user {target} on this node")))
        }
        other => other.into(),
    })?;
    client.close().await;
    let verified = verify_lookup(info, unix_now(), LOOKUP_SKEW)
        .map_err(|e| UntrustedError(format!("the node's answer for {target} does not verify: {e}")))?;
    print_account(&verified, json);
    Ok(())
}

fn print_account(v: &VerifiedAccount, json: bool) {
    let key: &IdentityKey = &v.info.identity_key;
    if json {
        let mut out = json!({
            "username": v.info.username.as_str(),
            "fingerprint": key.fingerprint().to_string(),
            "identity_key": key.to_hex(),
            "noise_key": v.info.noise.noise_key.to_hex(),
            "online": v.presence.is_some(),
        });
        if let Some(r) = &v.presence {
            out["addrs"] = json!(r.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>());
            out["cert_sha256"] = json!(hex::encode(r.cert_sha256));
            out["seq"] = json!(r.seq);
            out["issued_at"] = json!(r.issued_at);
            out["expires_at"] = json!(r.expires_at);
        }
        println!("{out}");
        return;
    }
    println!("user          {}", v.info.username);
    println!("fingerprint   {}", key.fingerprint());
    println!("identity key  {}", key.to_hex());
    println!("noise key     {}", v.info.noise.noise_key.to_hex());
    match &v.presence {
        None => println!("presence      offline"),
        Some(r) => {
            let left = r.expires_at.saturating_sub(unix_now());
            println!("presence      online (signed record #{}, expires in {left} s)", r.seq);
            println!("peer cert     sha256:{}", hex::encode(r.cert_sha256));
            for a in &r.addrs {
                println!("address       {a}");
            }
        }
    }
}
