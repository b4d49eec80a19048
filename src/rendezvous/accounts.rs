//! Accounts on the rendezvous node: sled storage and password hashing.
//!
//! Passwords are stored as argon2id PHC strings. Hashing runs on tokio's blocking
//! threads, but never more than `workers` at once and with at most `max_queued`
//! waiting, so a registration flood gets `Busy` instead of starving lookups.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::keys::{IdentityKey, NoiseBinding};
use crate::username::Username;

pub const ACCOUNT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("account database: {0}")]
    Db(#[from] sled::Error),
    #[error("account record for {0} is damaged")]
    Corrupt(String),
    #[error("the account database could not be flushed")]
    FlushTask,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub version: u8,
    pub password_phc: String,
    pub identity_key: IdentityKey,
    pub noise: NoiseBinding,
    pub created_at: u64,
    pub key_set_at: u64,
}

/// The account table, keyed by username.
#[derive(Clone)]
pub struct Accounts {
    db: sled::Db,
    tree: sled::Tree,
}

impl Accounts {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::open(dir)?;
        let tree = db.open_tree("accounts/v1")?;
        Ok(Self { db, tree })
    }

    pub fn get(&self, user: &Username) -> Result<Option<Account>, StoreError> {
        let Some(bytes) = self.tree.get(user.as_str())? else { return Ok(None) };
        postcard::from_bytes(&bytes).map(Some).map_err(|_| StoreError::Corrupt(user.to_string()))
    }

    /// `user`'s identity key and Noise binding, as a lookup answers them: the record is
    /// read in place (its password hash is not copied out), and its identity key is
    /// taken as it was checked when the account was stored (see
    /// [`IdentityKey::from_stored_bytes`]).
    pub fn public_keys(&self, user: &Username) -> Result<Option<(IdentityKey, NoiseBinding)>, StoreError> {
        /// [`Account`]'s encoding, field for field.
        #[derive(Deserialize)]
        struct Stored<'a> {
            _version: u8,
            _password_phc: &'a str,
            identity_key: [u8; 32],
            noise: NoiseBinding,
            _created_at: u64,
            _key_set_at: u64,
        }
        let Some(bytes) = self.tree.get(user.as_str())? else { return Ok(None) };
        let stored: Stored = postcard::from_bytes(&bytes).map_err(|_| StoreError::Corrupt(user.to_string()))?;
        Ok(Some((IdentityKey::from_stored_bytes(stored.identity_key), stored.noise)))
    }

    /// Creates the account; `false` if the name is taken. Durable when it returns.
    pub async fn create(&self, user: &Username, account: &Account) -> Result<bool, StoreError> {
        let bytes = postcard::to_stdvec(account).expect("postcard encodes into a Vec");
        let created = self.tree.compare_and_swap(user.as_str(), None as Option<&[u8]>, Some(bytes))?.is_ok();
        if created {
            self.flush().await?;
        }
        Ok(created)
    }

    /// Replaces `old` with `new`; `false` if the account changed meanwhile.
    pub async fn replace(&self, user: &Username, old: &Account, new: &Account) -> Result<bool, StoreError> {
        let old = postcard::to_stdvec(old).expect("postcard encodes into a Vec");
        let new = postcard::to_stdvec(new).expect("postcard encodes into a Vec");
        let swapped = self.tree.compare_and_swap(user.as_str(), Some(old), Some(new))?.is_ok();
        if swapped {
            self.flush().await?;
        }
        Ok(swapped)
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Makes every write so far durable. sled's own `flush_async` can stall for good
    /// when several run at once (spacejam/sled#1241), so the blocking flush runs on the
    /// blocking pool instead.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush()).await.map_err(|_| StoreError::FlushTask)??;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    #[error("password hashing queue is full")]
    Busy,
    #[error("password hashing failed")]
    Failed,
    #[error("argon2 refuses these password-hash cost parameters")]
    BadCost,
}

/// Argon2id cost for stored passwords.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasswordCost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl PasswordCost {
    /// OWASP's argon2id recommendation: 19 MiB, 2 iterations, 1 lane.
    pub const OWASP: PasswordCost = PasswordCost { memory_kib: 19_456, iterations: 2, parallelism: 1 };

    /// The hasher for these parameters; `None` if argon2 refuses them.
    pub fn argon2(&self) -> Option<Argon2<'static>> {
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, None).ok()?;
        Some(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// Asks the scheduler to favour every other thread of the node over this one (Linux
/// applies a thread id's nice value to that thread alone). Best effort: a process that
/// already runs nicer keeps its value.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority only read their arguments.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, HASH_NICE);
    }
}

/// The nice value of the hashing threads.
const HASH_NICE: libc::c_int = 10;

/// A password job for the hashing threads.
type HashJob = Box<dyn FnOnce() + Send>;

/// Hashes and verifies passwords on a bounded pool of its own threads, which run at a
/// lower scheduling priority (nice 10) than the rest of the node: a flood of
/// registrations then takes the CPU only when lookups and publishes leave it idle.
pub struct PasswordHasher {
    cost: PasswordCost,
    jobs: std::sync::mpsc::Sender<HashJob>,
    queued: AtomicUsize,
    max_queued: usize,
    /// A hash of a random password, verified against when the user does not exist so
    /// that "unknown user" takes as long as "wrong password".
    dummy_phc: String,
}

impl PasswordHasher {
    /// Refuses cost parameters argon2 does not accept.
    pub fn new(cost: PasswordCost, workers: usize, max_queued: usize) -> Result<Self, HashError> {
        let random: [u8; 16] = rand::random();
        let salt = SaltString::generate(&mut OsRng);
        let argon2 = cost.argon2().ok_or(HashError::BadCost)?;
        let dummy_phc = argon2.hash_password(&random, &salt).map_err(|_| HashError::BadCost)?.to_string();
        let (jobs, queue) = std::sync::mpsc::channel::<HashJob>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for _ in 0..workers.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("sotto-argon2".into())
                .spawn(move || {
                    lower_this_threads_priority();
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            // The hasher is gone.
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|_| HashError::Failed)?;
        }
        Ok(Self { cost, jobs, queued: AtomicUsize::new(0), max_queued, dummy_phc })
    }

    async fn run<T: Send + 'static>(&self, job: impl FnOnce(Argon2<'static>) -> T + Send + 'static) -> Result<T, HashError> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(HashError::Busy);
        }
        let result = async {
            let argon2 = self.cost.argon2().ok_or(HashError::BadCost)?;
            let (done, result) = tokio::sync::oneshot::channel();
            let job: HashJob = Box::new(move || {
                let _ = done.send(job(argon2));
            });
            self.jobs.send(job).map_err(|_| HashError::Failed)?;
            result.await.map_err(|_| HashError::Failed)
        }
        .await;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        result
    }

    pub async fn hash(&self, password: Zeroizing<String>) -> Result<String, HashError> {
        self.run(move |argon2| {
            let salt = SaltString::generate(&mut OsRng);
            argon2.hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|_| HashError::Failed)
        })
        .await?
    }

    /// Verifies `password` against `phc`, or against a dummy hash when `phc` is `None`
    /// (and then answers `false`), so both cases cost the same.
    pub async fn verify(&self, password: Zeroizing<String>, phc: Option<String>) -> Result<bool, HashError> {
        let real = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_phc.clone());
        let matched = self
            .run(move |argon2| {
                PasswordHash::new(&phc).map(|parsed| argon2.verify_password(password.as_bytes(), &parsed).is_ok()).unwrap_or(false)
            })
            .await?;
        Ok(real && matched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: PasswordCost = PasswordCost { memory_kib: 64, iterations: 1, parallelism: 1 };

    #[tokio::test]
    async fn hash_verify_and_dummy() {
        let h = PasswordHasher::new(CHEAP, 1, 4).unwrap();
        let phc = h.hash(Zeroizing::new("hunter22".into())).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"));
        assert!(h.verify(Zeroizing::new("hunter22".into()), Some(phc.clone())).await.unwrap());
        assert!(!h.verify(Zeroizing::new("hunter23".into()), Some(phc)).await.unwrap());
        assert!(!h.verify(Zeroizing::new("anything".into()), None).await.unwrap());
    }

    #[test]
    fn invalid_cost_is_refused_not_replaced() {
        let bad = PasswordCost { memory_kib: 1, iterations: 0, parallelism: 1 };
        assert_eq!(PasswordHasher::new(bad, 1, 1).err(), Some(HashError::BadCost));
    }

    #[test]
    fn default_cost_is_owasp() {
        let salt = SaltString::generate(&mut OsRng);
        let phc = PasswordCost::OWASP.argon2().unwrap().hash_password(b"x", &salt).unwrap().to_string();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
    }

    #[tokio::test]
    async fn queue_is_bounded() {
        let h = Arc::new(PasswordHasher::new(PasswordCost { memory_kib: 8192, iterations: 4, parallelism: 1 }, 1, 2).unwrap());
        let jobs: Vec<_> = (0..8)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move { h.hash(Zeroizing::new("password".into())).await })
            })
            .collect();
        let mut busy = 0;
        for j in jobs {
            if j.await.unwrap() == Err(HashError::Busy) {
                busy += 1;
            }
        }
        assert!(busy >= 1, "some of 8 simultaneous jobs must be refused with a queue of 2");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_runs_on_its_own_lower_priority_threads() {
        let h = PasswordHasher::new(PasswordCost { memory_kib: 64, iterations: 1, parallelism: 1 }, 2, 8).unwrap();
        // SAFETY: getpriority only reads its arguments; errno is not needed here.
        let nice_of = |tid: libc::pid_t| unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
        // SAFETY: as above.
        let ours = nice_of(unsafe { libc::gettid() });
        let (name, nice) = h
            .run(move |_| {
                let me = std::thread::current().name().map(str::to_string);
                // SAFETY: as above.
                (me, nice_of(unsafe { libc::gettid() }))
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("sotto-argon2"));
        assert!(nice >= HASH_NICE.max(ours), "hashing thread nice {nice}, the caller's {ours}");
        // SAFETY: as above.
        assert_eq!(nice_of(unsafe { libc::gettid() }), ours, "the caller's own priority is untouched");
        // And the pool still does its work.
        let phc = h.hash(Zeroizing::new("pw".into())).await.unwrap();
        assert!(h.verify(Zeroizing::new("pw".into()), Some(phc)).await.unwrap());
    }

    fn account_of(seed: u8) -> Account {
        let id = crate::presence::tests::identity(seed);
        Account {
            version: ACCOUNT_VERSION,
            password_phc: "x".into(),
            identity_key: id.public(),
            noise: id.binding(),
            created_at: 1,
            key_set_at: 1,
        }
    }

    #[tokio::test]
    async fn create_is_first_come_and_replace_is_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = Accounts::open(dir.path()).unwrap();
        let alice = Username::parse("alice").unwrap();
        let account = account_of(1);
        assert!(accounts.create(&alice, &account).await.unwrap());
        assert!(!accounts.create(&alice, &account).await.unwrap());
        let rebound = account_of(2);
        assert!(accounts.replace(&alice, &account, &rebound).await.unwrap());
        assert!(!accounts.replace(&alice, &account, &rebound).await.unwrap());
        assert_eq!(accounts.get(&alice).unwrap(), Some(rebound));
    }

    #[tokio::test]
    async fn a_lookup_reads_the_keys_the_full_record_holds() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = Accounts::open(dir.path()).unwrap();
        let bob = Username::parse("bob").unwrap();
        let account = Account {
            password_phc: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g".into(),
            created_at: u64::MAX,
            key_set_at: 300,
            ..account_of(3)
        };
        assert!(accounts.create(&bob, &account).await.unwrap());
        assert_eq!(accounts.public_keys(&bob).unwrap(), Some((account.identity_key, account.noise)));
        assert_eq!(accounts.public_keys(&Username::parse("carol").unwrap()).unwrap(), None);
        // A record cut short is an error, not a key made of whatever is there.
        let bytes = accounts.tree.get("bob").unwrap().unwrap();
        accounts.tree.insert("bob", &bytes[..bytes.len() - 2]).unwrap();
        assert!(matches!(accounts.public_keys(&bob), Err(StoreError::Corrupt(_))));
    }
}
