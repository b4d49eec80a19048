//! A profile's home directory: the identity file, the remembered server and username.
//!
//! ```text
//! HOME/               mode 0700
//!   identity.sotto    mode 0600, see idfile
//!   profile.json      {"server": "...", "username": "..."}
//! ```

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::idfile::{self, Header, IdFileError, KdfParams};
use crate::keys::Identity;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    #[error("no identity in {}: run `sotto id new` first", .0.display())]
    NoIdentity(PathBuf),
    #[error("an identity already exists in {}; sotto will not overwrite it (use another --home)", .0.display())]
    IdentityExists(PathBuf),
    #[error("{}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}", path.display())]
    IdFile { path: PathBuf, source: IdFileError },
    #[error("{} is damaged: {}", .0.display(), .1)]
    BadConfig(PathBuf, String),
    #[error("this profile has no account yet: run `sotto register USER --server ADDRESS` or `sotto login USER --server ADDRESS`")]
    NoAccount,
    #[error("{} is readable by other users (mode {mode:o}); run `chmod 600 {}`", path.display(), path.display())]
    LooseMode { path: PathBuf, mode: u32 },
}

/// What a profile remembers between commands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileConfig {
    pub server: Option<String>,
    pub username: Option<String>,
}

pub struct Profile {
    home: PathBuf,
}

/// Creates `dir` (mode 0700) or, if it exists and is ours, narrows it to 0700. Refuses a
/// directory owned by another user, a path that is not a directory, and (unless
/// `follow_symlink`) a symbolic link: in a shared place such as /tmp, a directory
/// someone else made first is never used.
pub fn private_dir(dir: &Path, follow_symlink: bool) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = if follow_symlink { fs::metadata(dir)? } else { fs::symlink_metadata(dir)? };
    let refuse = |why: &str| Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{}: {why}; refusing to use it", dir.display())));
    if !meta.is_dir() {
        return refuse("not a directory");
    }
    if meta.uid() != crate::control::own_uid() {
        return refuse("owned by another user");
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ProfileError + '_ {
    move |source| ProfileError::Io { path: path.to_path_buf(), source }
}

impl Profile {
    /// Opens (creating) the profile directory and makes sure it is ours and 0700.
    pub fn open(home: &Path) -> Result<Self, ProfileError> {
        private_dir(home, true).map_err(io_err(home))?;
        Ok(Self { home: home.to_path_buf() })
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn identity_path(&self) -> PathBuf {
        self.home.join("identity.sotto")
    }

    fn config_path(&self) -> PathBuf {
        self.home.join("profile.json")
    }

    pub fn has_identity(&self) -> bool {
        self.identity_path().exists()
    }

    /// Encrypts and saves a new identity; refuses to replace one.
    pub fn create_identity(&self, identity: &Identity, passphrase: &[u8], kdf: KdfParams) -> Result<(), ProfileError> {
        let path = self.identity_path();
        if path.exists() {
            return Err(ProfileError::IdentityExists(self.home.clone()));
        }
        let sealed = idfile::seal(identity, passphrase, kdf).map_err(|source| ProfileError::IdFile { path: path.clone(), source })?;
        // Write a temporary file, then hard-link it into place: the link fails if an
        // identity appeared meanwhile, and readers never see a half-written file.
        let tmp = self.home.join(format!(".identity.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        crate::tls::write_new(&tmp, &sealed, 0o600).map_err(io_err(&tmp))?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(ProfileError::IdentityExists(self.home.clone())),
            Err(e) => Err(ProfileError::Io { path, source: e }),
        }
    }

    fn read_identity_file(&self) -> Result<Vec<u8>, ProfileError> {
        let path = self.identity_path();
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ProfileError::NoIdentity(self.home.clone())),
            Err(e) => return Err(ProfileError::Io { path, source: e }),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ProfileError::LooseMode { path, mode });
        }
        if meta.len() > 4096 {
            return Err(ProfileError::IdFile { path, source: IdFileError::NotAnIdentityFile });
        }
        fs::read(&path).map_err(io_err(&path))
    }

    /// The public half of the identity, without the passphrase.
    pub fn identity_header(&self) -> Result<Header, ProfileError> {
        let bytes = self.read_identity_file()?;
        Header::parse(&bytes).map_err(|source| ProfileError::IdFile { path: self.identity_path(), source })
    }

    pub fn unlock(&self, passphrase: &[u8]) -> Result<Identity, ProfileError> {
        let bytes = self.read_identity_file()?;
        idfile::open(&bytes, passphrase).map_err(|source| ProfileError::IdFile { path: self.identity_path(), source })
    }

    pub fn config(&self) -> Result<ProfileConfig, ProfileError> {
        let path = self.config_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ProfileError::BadConfig(path, e.to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ProfileConfig::default()),
            Err(e) => Err(ProfileError::Io { path, source: e }),
        }
    }

    /// Saves the config atomically (write a temporary file, sync, rename).
    pub fn save_config(&self, config: &ProfileConfig) -> Result<(), ProfileError> {
        let path = self.config_path();
        let tmp = self.home.join(".profile.json.tmp");
        let bytes = serde_json::to_vec_pretty(config).expect("plain struct serialises");
        let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&bytes).and_then(|_| file.sync_all()).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };

    #[test]
    fn identity_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(&dir.path().join("p")).unwrap();
        let id = Identity::generate();
        profile.create_identity(&id, b"pw", FAST).unwrap();
        let mode = fs::metadata(profile.identity_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(profile.create_identity(&Identity::generate(), b"pw", FAST), Err(ProfileError::IdentityExists(_))));
        assert_eq!(profile.unlock(b"pw").unwrap().public(), id.public());
        assert_eq!(profile.identity_header().unwrap().identity_key, *id.public().as_bytes());
        assert!(matches!(profile.unlock(b"nope"), Err(ProfileError::IdFile { source: IdFileError::WrongPassphrase, .. })));
    }

    #[test]
    fn loose_mode_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path()).unwrap();
        profile.create_identity(&Identity::generate(), b"pw", FAST).unwrap();
        fs::set_permissions(profile.identity_path(), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(profile.unlock(b"pw"), Err(ProfileError::LooseMode { .. })));
    }

    #[test]
    fn config_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path()).unwrap();
        assert_eq!(profile.config().unwrap(), ProfileConfig::default());
        let c = ProfileConfig { server: Some("sotto://x:1#sha256:00".into()), username: Some("alice".into()) };
        profile.save_config(&c).unwrap();
        assert_eq!(profile.config().unwrap(), c);
    }
}
