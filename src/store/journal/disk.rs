//! The journal's files on the file system: how a sync reaches the device, whether the
//! file system writes over blocks in place, and the checkpoint that brings sled's own
//! files to disk ([`Disk`]).

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::Journal;
use crate::store::StoreError;

pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Waits until the bytes `[from, to)` are written back to the device.
pub(super) fn sync_range(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let (offset, len) = (i64::try_from(from).unwrap_or(i64::MAX), i64::try_from(to - from).unwrap_or(i64::MAX));
        // SAFETY: a plain system call on a descriptor this `File` owns and keeps open.
        if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOSYS) {
            return Err(e);
        }
    }
    let _ = (from, to);
    file.sync_data()
}

/// Whether the file system under `dir` writes over allocated blocks in place, so that
/// writing bytes back is all it takes to make an overwrite durable: ext2/3/4 (unless
/// mounted `data=journal`, where data goes through the file system's journal first) and
/// tmpfs. XFS and the copy-on-write file systems may need a log commit for an overwrite
/// (a reflinked copy shares its blocks), so they get `fdatasync`.
#[cfg(target_os = "linux")]
#[allow(clippy::unnecessary_cast)]
pub(super) fn overwrites_in_place(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const EXT: i64 = 0xEF53;
    const TMPFS: i64 = 0x0102_1994;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: `statfs` fills the zeroed struct it is given; the path is NUL-terminated.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
        return false;
    }
    match fs.f_type as i64 {
        TMPFS => true,
        EXT => {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            std::fs::canonicalize(dir)
                .is_ok_and(|dir| mount_options(&mounts, &dir).is_some_and(|o| !o.split(',').any(|o| o == "data=journal")))
        }
        _ => false,
    }
}

/// The file system options (the last field of `/proc/self/mountinfo`) of the mount
/// `path` is on: the one with the longest mount point that holds it.
#[cfg(target_os = "linux")]
fn mount_options<'m>(mountinfo: &'m str, path: &Path) -> Option<&'m str> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let point = unescape_mount_point(line.split(' ').nth(4)?);
            let (_, after) = line.split_once(" - ")?;
            let options = after.split(' ').nth(2)?;
            path.starts_with(&point).then_some((point.as_os_str().len(), options))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, options)| options)
}

/// A mount point as `/proc/self/mountinfo` writes it: space, tab, newline and backslash
/// as octal escapes.
#[cfg(target_os = "linux")]
fn unescape_mount_point(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(not(target_os = "linux"))]
pub(super) fn overwrites_in_place(_: &Path) -> bool {
    false
}

/// The history database's files: sled, and the journal in front of it.
pub(in crate::store) struct Disk {
    pub(in crate::store) db: sled::Db,
    pub(in crate::store) journal: Journal,
    dir: PathBuf,
    /// sled's other files (its blob files, `conf`, snapshots), by path and length, as
    /// they were when last synced.
    synced: Mutex<HashSet<(PathBuf, u64)>>,
}

impl Disk {
    pub(in crate::store) fn new(db: sled::Db, journal: Journal, dir: &Path) -> Self {
        Self { db, journal, dir: dir.to_path_buf(), synced: Mutex::new(HashSet::new()) }
    }

    /// Makes every record appended so far durable ([`Journal::sync`]).
    pub(in crate::store) fn sync(&self) -> Result<(), StoreError> {
        self.journal.sync()
    }

    /// Puts everything applied to sled so far on disk, sled's way and then all the way:
    /// sled's flush writes its log out, but does not sync the file's size or make the
    /// device write back its cache, and never syncs the files it writes beside its log
    /// (a value or a node too large for the log goes to a blob file of its own). Here
    /// the log is synced, and every other file of sled's that is new or has changed
    /// length since the last checkpoint, and the directories.
    pub(in crate::store) fn checkpoint(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        File::open(self.dir.join("db")).and_then(|f| f.sync_all()).map_err(StoreError::Io)?;
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = HashSet::new();
        for dir in [self.dir.clone(), self.dir.join("blobs")] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::Io(e)),
            };
            for entry in entries {
                let entry = entry.map_err(StoreError::Io)?;
                let name = entry.file_name();
                // The log is synced above; the journal's segments are the journal's.
                if name == "db" || name.to_string_lossy().starts_with("journal-") {
                    continue;
                }
                let path = entry.path();
                // A file sled removed meanwhile is no longer needed.
                let len = match std::fs::metadata(&path) {
                    Ok(meta) if meta.is_file() => meta.len(),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::Io(e)),
                };
                let key = (path, len);
                if !synced.contains(&key) {
                    match File::open(&key.0).and_then(|f| f.sync_all()) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(StoreError::Io(e)),
                    }
                }
                now.insert(key);
            }
            sync_dir(&dir).map_err(StoreError::Io)?;
        }
        *synced = now;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn the_mount_a_path_is_on_is_the_longest_that_holds_it() {
        let mounts = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n\
                      30 22 8:2 / /home rw shared:2 - ext4 /dev/sda2 rw,data=journal\n\
                      31 22 0:5 / /home/a\\040b rw shared:3 - tmpfs tmpfs rw,size=10k\n";
        assert_eq!(mount_options(mounts, Path::new("/var/lib")), Some("rw,errors=remount-ro"));
        assert_eq!(mount_options(mounts, Path::new("/home/alice/.local")), Some("rw,data=journal"));
        assert_eq!(mount_options(mounts, Path::new("/home/a b/x")), Some("rw,size=10k"));
        assert_eq!(mount_options(mounts, Path::new("/homework")), Some("rw,errors=remount-ro"), "a prefix of the name is not the mount");
        assert_eq!(unescape_mount_point("/a\\040b\\134c\\09"), PathBuf::from("/a b\\c\\09"));
    }
}
