//! A profile's home directory: the identity file, the remembered server and username.
//!
//! ```text
//! HOME/               mode 0700; refused if open to others once it holds anything
//!   identity.sotto    mode 0600, see idfile; refused if group or others may access it
//!   profile.json      {"server": "...", "username": "..."}, mode 0600
//!   db/               the history (sled), mode 0700
//!   peer/             the peer certificate (0600 key, see tls), mode 0700
//! ```
//!
//! Directories are created 0700 and files 0600 from the start (the binary also runs
//! with umask 077), never created open and narrowed afterwards.

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
    /// A directory open to other users, not ours, or not a directory (see [`private_dir`]).
    #[error(transparent)]
    UnsafeDir(io::Error),
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

/// Why [`private_dir`] or [`private_subdir`] refused a directory; the message names the
/// path and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UnsafeDir(String);

fn unsafe_dir(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, UnsafeDir(message))
}

/// True if `e` is a refusal of [`private_dir`] or [`private_subdir`] (not an I/O failure).
pub fn is_unsafe_dir(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<UnsafeDir>())
}

/// Creates `dir` (and missing parents) with mode 0700, or checks an existing one.
///
/// Refuses a directory owned by another user, a path that is not a directory, and
/// (unless `follow_symlink`) a symbolic link: in a shared place such as /tmp, a directory
/// someone else made first is never used. An existing directory that group or others
/// may access is narrowed to 0700 while it is empty (sotto is taking it into use), and
/// refused once it holds anything: what is in it may have been read or replaced, so the
/// user looks, then runs the `chmod` the error names (as ssh does for its keys).
pub fn private_dir(dir: &Path, follow_symlink: bool) -> io::Result<()> {
    let mode = checked_dir(dir, follow_symlink)?;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let loose = || {
        unsafe_dir(format!(
            "{} is open to other users (mode {mode:o}) and holds files they may have read or replaced; check them, then run `chmod 700 {}`",
            dir.display(),
            dir.display()
        ))
    };
    if fs::read_dir(dir)?.next().is_some() {
        return Err(loose());
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    // Nothing can appear once it is 0700; something that appeared before is refused,
    // and the directory is left as it was found.
    if fs::read_dir(dir)?.next().is_some() {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
        return Err(loose());
    }
    Ok(())
}

/// Like [`private_dir`] for a directory inside one it checked: created 0700, or narrowed
/// to 0700 whatever it holds, since no other user could reach it through its parent
/// (sled creates its directories with the umask's mode). Follows a symbolic link.
pub fn private_subdir(dir: &Path) -> io::Result<()> {
    let mode = checked_dir(dir, true)?;
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Creates `dir` 0700 if missing; checks that it is a directory of ours; its mode.
fn checked_dir(dir: &Path, follow_symlink: bool) -> io::Result<u32> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = if follow_symlink { fs::metadata(dir)? } else { fs::symlink_metadata(dir)? };
    let refuse = |why: &str| Err(unsafe_dir(format!("{}: {why}; refusing to use it", dir.display())));
    if meta.file_type().is_symlink() {
        return refuse("a symbolic link");
    }
    if !meta.is_dir() {
        return refuse("not a directory");
    }
    if meta.uid() != crate::control::own_uid() {
        return refuse("owned by another user");
    }
    Ok(meta.permissions().mode() & 0o7777)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ProfileError + '_ {
    move |source| ProfileError::Io { path: path.to_path_buf(), source }
}

impl Profile {
    /// Opens (creating) the profile directory and makes sure it is ours and 0700 (see
    /// [`private_dir`]: a profile open to others is refused, not silently narrowed).
    pub fn open(home: &Path) -> Result<Self, ProfileError> {
        private_dir(home, true).map_err(|e| if is_unsafe_dir(&e) { ProfileError::UnsafeDir(e) } else { io_err(home)(e) })?;
        Ok(Self { home: home.to_path_buf() })
    }

    /// The history database's directory, `HOME/db`: created 0700, or narrowed to 0700.
    pub fn history_dir(&self) -> Result<PathBuf, ProfileError> {
        let dir = self.home.join("db");
        private_subdir(&dir).map_err(|e| if is_unsafe_dir(&e) { ProfileError::UnsafeDir(e) } else { io_err(&dir)(e) })?;
        Ok(dir)
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
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(profile.identity_path(), fs::Permissions::from_mode(mode)).unwrap();
            let e = profile.unlock(b"pw").unwrap_err();
            assert!(matches!(e, ProfileError::LooseMode { .. }), "{e}");
            assert!(e.to_string().contains(&format!("chmod 600 {}", profile.identity_path().display())), "{e}");
            assert!(matches!(profile.identity_header(), Err(ProfileError::LooseMode { .. })), "not even the public half");
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_and_directories_are_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("a").join("p");
        let profile = Profile::open(&home).unwrap();
        assert_eq!((mode_of(&home), mode_of(home.parent().unwrap())), (0o700, 0o700));
        profile.create_identity(&Identity::generate(), b"pw", FAST).unwrap();
        profile.save_config(&ProfileConfig::default()).unwrap();
        assert_eq!(mode_of(&profile.identity_path()), 0o600);
        assert_eq!(mode_of(&home.join("profile.json")), 0o600);
        assert_eq!(mode_of(&profile.history_dir().unwrap()), 0o700);
    }

    #[test]
    fn a_profile_directory_open_to_others_is_refused_once_it_holds_an_identity() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("p");
        Profile::open(&home).unwrap().create_identity(&Identity::generate(), b"pw", FAST).unwrap();
        for mode in [0o755, 0o750, 0o701, 0o777] {
            fs::set_permissions(&home, fs::Permissions::from_mode(mode)).unwrap();
            let e = Profile::open(&home).err().expect("a loose profile directory is refused");
            assert!(matches!(e, ProfileError::UnsafeDir(_)), "{e}");
            let shown = e.to_string();
            assert!(shown.contains(&format!("chmod 700 {}", home.display())), "{shown}");
            assert!(shown.contains(&format!("mode {mode:o}")), "{shown}");
            assert_eq!(mode_of(&home), mode, "left as it was found, for the user to look at");
        }
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(Profile::open(&home).is_ok(), "accepted once the user ran the chmod");
    }

    #[test]
    fn an_empty_directory_open_to_others_is_narrowed() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("p");
        fs::create_dir(&home).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
        Profile::open(&home).unwrap();
        assert_eq!(mode_of(&home), 0o700);
    }

    #[test]
    fn what_is_not_a_directory_of_ours_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(Profile::open(&file), Err(ProfileError::UnsafeDir(_)) | Err(ProfileError::Io { .. })));
        let target = dir.path().join("target");
        fs::create_dir(&target).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = private_dir(&link, false).unwrap_err();
        assert!(is_unsafe_dir(&e) && e.to_string().contains("symbolic link"), "{e}");
        assert!(private_dir(&link, true).is_ok(), "a profile may be a symbolic link to a directory");
        if crate::control::own_uid() == 0 {
            // Only root can make a directory for someone else.
            let theirs = dir.path().join("theirs");
            fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = Profile::open(&theirs).err().expect("another user's directory is refused");
            assert!(e.to_string().contains("owned by another user"), "{e}");
        }
    }

    #[test]
    fn the_history_directory_is_narrowed_inside_a_private_profile() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path()).unwrap();
        let db = dir.path().join("db");
        // As sled leaves it under umask 022, in profiles made before sotto created it.
        fs::create_dir(&db).unwrap();
        fs::write(db.join("conf"), b"x").unwrap();
        fs::set_permissions(&db, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(profile.history_dir().unwrap(), db);
        assert_eq!(mode_of(&db), 0o700);
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
