//! The group commit behind [`SledStore`](super::SledStore): commit points, the flusher
//! thread, flushes in place, and how far durability has got (see the parent module's
//! docs).

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::journal::Disk;
use super::{Store, StoreError};

/// [`Store::flush_here`] from async code, on the runtime worker that calls it, when the
/// runtime has other workers to run everything else meanwhile; `None` on a runtime with
/// one worker, outside a runtime, when a flush is under way, or under load (see
/// [`GATHER`]).
///
/// This holds one worker for one flush (about 0.2 ms here, milliseconds on a slow
/// disk). Measured on two cores, that beats both alternatives for a lone message: the
/// flusher thread's hand-off and wake-up cost a round trip about 0.13× of its
/// baseline, and [`tokio::task::block_in_place`] (which moves the worker's queue to
/// another thread first) about as much.
pub fn flush_in_place(store: &dyn Store) -> Option<u64> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread || runtime.metrics().num_workers() < 2 || store.flushing() {
        return None;
    }
    store.flush_here()
}

/// Waits, without blocking the thread, until every write up to `point` is on disk. Only
/// the flush that decides `point` wakes the waiting task.
pub async fn durable(store: &dyn Store, point: u64) -> Result<(), StoreError> {
    match store.on_durable(point).await {
        Ok(true) => Ok(()),
        // The flush failed, or the store closed first.
        Ok(false) | Err(_) => Err(StoreError::NotDurable),
    }
}

/// How far the flusher got: every write up to `flushed` is on disk; the flush that was
/// to cover writes up to `failed` did not succeed (and no later one has yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durability {
    pub flushed: u64,
    pub failed: u64,
    /// Flushes done so far; with the write count, how many writes each flush covered.
    pub flushes: u64,
}

impl Durability {
    /// `Some(Ok)` once `point` is on disk, `Some(Err)` if its flush failed, `None` while
    /// it is still to come.
    pub fn covers(&self, point: u64) -> Option<Result<(), StoreError>> {
        if self.flushed >= point {
            Some(Ok(()))
        } else if self.failed >= point {
            Some(Err(StoreError::NotDurable))
        } else {
            None
        }
    }
}

/// How long a write nobody waits for may stay off disk before the flusher thread flushes
/// it (twice this at worst: see the parent module's docs).
pub(super) const LINGER: Duration = Duration::from_millis(100);

/// Under load, how long after one flush began the next may begin. What a flush costs
/// (waking this thread and sled's writers, the system call, waking the waiters) hardly
/// depends on what it covers; flushing back to back, as soon as each one ended, spent it
/// on a few writes each: over a quarter of all the CPU in the sustained benchmark.
/// Waiting lets each flush cover many more writes. It delays a write by this
/// much at most, and only after a flush that covered [`LOAD_WRITES`] or more, whoever
/// made them: a message on an otherwise quiet store never waits.
pub(super) const GATHER: Duration = Duration::from_millis(2);

/// A flush that covered at least this many writes means the store is under load: the
/// next flush gathers (see [`GATHER`]). A lone message counts one write where it is
/// received, and two where it is sent (stored, then marked delivered).
const LOAD_WRITES: u64 = 8;

/// How many tasks may wait in [`durable`] before those that gave up are looked for.
const PRUNE_WAKERS: usize = 1024;

/// The group-commit flusher shared by a store and its thread.
pub(super) struct Commits {
    state: Mutex<CommitState>,
    /// [`LINGER`] and [`GATHER`], except in tests.
    linger: Duration,
    gather: Duration,
    /// Wakes the flusher: something was written, or the store is closing.
    work: Condvar,
    /// Wakes blocking waiters after each flush.
    done: Condvar,
    /// Wakes the checkpoint thread: a checkpoint is wanted, or the store is closing.
    checkpoints: Condvar,
    progress: tokio::sync::watch::Sender<Durability>,
}

#[derive(Default)]
struct CommitState {
    written: u64,
    /// Highest point that should be on disk as soon as possible; writes past it may
    /// wait up to [`LINGER`] for a flush.
    urgent: u64,
    /// Highest point a flush was attempted for.
    attempted: u64,
    /// A flush is under way (by the flusher thread or in place).
    flushing: bool,
    /// The journal asked for a checkpoint (the checkpoint thread runs it).
    checkpoint: bool,
    /// The flusher thread is waiting for work: only then is it worth a wake-up call
    /// (each costs a system call, some tens of µs on a virtual machine).
    idle: bool,
    /// Threads blocked in [`Store::wait_durable`].
    waiters: usize,
    /// Tasks waiting in [`durable`], by the point each waits for: each is told once,
    /// by the flush that decides its point.
    wakers: BTreeMap<u64, Vec<oneshot::Sender<bool>>>,
    /// Registered wakers, and how many there may be before those whose task gave up
    /// are dropped (a flush that never ends would otherwise keep them all).
    registered: usize,
    prune_at: usize,
    /// When the last flush began, and how many writes it covered.
    last_flush: Option<(Instant, u64)>,
    durability: Durability,
    closing: bool,
}

impl CommitState {
    /// Under load, the time before which no flush should begin (see [`GATHER`]).
    fn gather_until(&self, gather: Duration) -> Option<Instant> {
        let (began, covered) = self.last_flush?;
        let until = began + gather;
        (covered >= LOAD_WRITES && !self.closing && until > Instant::now()).then_some(until)
    }
}

impl Commits {
    pub(super) fn new(linger: Duration, gather: Duration) -> Self {
        Self {
            state: Mutex::new(CommitState::default()),
            linger,
            gather,
            work: Condvar::new(),
            done: Condvar::new(),
            checkpoints: Condvar::new(),
            progress: tokio::sync::watch::channel(Durability::default()).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CommitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A commit point covering every write counted so far ([`Store::written`]).
    /// Whoever takes one means to wait for it: writes before it become urgent, and a
    /// waiting flusher is woken.
    pub(super) fn point(&self) -> u64 {
        let mut state = self.state();
        let point = state.written;
        if state.urgent < point {
            state.urgent = point;
            let idle = state.idle;
            drop(state);
            if idle {
                self.work.notify_one();
            }
        }
        point
    }

    /// Blocks until `point` is on disk, or its flush failed ([`Store::wait_durable`]).
    pub(super) fn wait(&self, point: u64) -> Result<(), StoreError> {
        let mut state = self.state();
        loop {
            if let Some(outcome) = state.durability.covers(point) {
                return outcome;
            }
            state.waiters += 1;
            state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
            state.waiters -= 1;
        }
    }

    pub(super) fn subscribe(&self) -> tokio::sync::watch::Receiver<Durability> {
        self.progress.subscribe()
    }

    /// Resolves to `true` once `point` is on disk, `false` if its flush failed
    /// ([`Store::on_durable`]).
    pub(super) fn on_durable(&self, point: u64) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state();
        match state.durability.covers(point) {
            Some(outcome) => _ = tx.send(outcome.is_ok()),
            None => {
                if state.registered >= state.prune_at {
                    state.wakers.retain(|_, wakers| {
                        wakers.retain(|w| !w.is_closed());
                        !wakers.is_empty()
                    });
                    state.registered = state.wakers.values().map(Vec::len).sum();
                    state.prune_at = (state.registered * 2).max(PRUNE_WAKERS);
                }
                state.registered += 1;
                state.wakers.entry(point).or_default().push(tx);
            }
        }
        rx
    }

    pub(super) fn flushing(&self) -> bool {
        self.state().flushing
    }

    /// [`Store::flush_here`]. Under load the flusher thread gathers instead.
    pub(super) fn flush_here(&self, disk: &Disk) -> Option<u64> {
        let target = {
            let mut state = self.state();
            if state.gather_until(self.gather).is_some() {
                return None;
            }
            Self::begin_flush(&mut state)?
        };
        self.flush(disk, target);
        Some(target)
    }

    /// Asks the checkpoint thread for a checkpoint of the journal.
    pub(super) fn want_checkpoint(&self) {
        self.state().checkpoint = true;
        self.checkpoints.notify_one();
    }

    /// Asks the flusher thread to flush what is left and stop, and the checkpoint thread
    /// to stop (the store runs the last checkpoint itself).
    pub(super) fn close(&self) {
        self.state().closing = true;
        self.work.notify_one();
        self.checkpoints.notify_one();
    }

    /// Counts applied writes: one for each message a batch stored (what matters for
    /// [`LOAD_WRITES`] is how many messages are moving). Nobody is woken: a
    /// write goes to disk with the next flush, the one for the next commit point taken,
    /// or after [`LINGER`] at the latest.
    pub(super) fn wrote(&self, writes: u64) {
        self.state().written += writes;
    }

    /// Marks the start of a flush covering everything applied so far, and returns that
    /// point; `None` if a flush is under way already.
    fn begin_flush(state: &mut CommitState) -> Option<u64> {
        if state.flushing {
            return None;
        }
        state.flushing = true;
        // A flush of nothing (say, a batch of resends) says nothing about load.
        if state.written > state.attempted {
            state.last_flush = Some((Instant::now(), state.written - state.attempted));
        }
        state.attempted = state.written;
        Some(state.written)
    }

    /// Flushes (the caller has begun it): syncs the journal, and publishes the outcome. A
    /// panic counts as a failed flush: on a session's worker it would otherwise leave
    /// the store marked as flushing for good, and every waiter (and `Drop`) waiting.
    fn flush(&self, disk: &Disk, target: u64) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| disk.sync())).unwrap_or_else(|_| {
            disk.journal.fail();
            Err(StoreError::NotDurable)
        });
        let mut state = self.state();
        state.flushing = false;
        match result {
            Ok(_) => {
                state.durability.flushed = state.durability.flushed.max(target);
                state.durability.flushes += 1;
            }
            Err(e) => {
                tracing::error!(error = %e, "history database flush failed");
                state.durability.failed = state.durability.failed.max(target);
            }
        }
        // Publish to async watchers under the lock, so that anyone who sees this flush
        // through the lock (a blocking waiter) also sees it through the watch.
        self.progress.send_replace(state.durability);
        let decided = state.durability.flushed.max(state.durability.failed);
        let undecided = state.wakers.split_off(&decided.saturating_add(1));
        let woken = std::mem::replace(&mut state.wakers, undecided);
        state.registered -= woken.values().map(Vec::len).sum::<usize>();
        let flushed = state.durability.flushed;
        // Points taken during a flush in place are the flusher thread's to cover.
        let more = state.urgent > state.attempted && state.idle;
        let waiters = state.waiters > 0;
        drop(state);
        for (point, wakers) in woken {
            for waker in wakers {
                let _ = waker.send(point <= flushed);
            }
        }
        if waiters {
            self.done.notify_all();
        }
        if more {
            self.work.notify_one();
        }
    }

    /// The flusher thread: flushes while there are commit points no flush has covered
    /// (under load, one flush per [`GATHER`]), then sleeps until there are more; other
    /// writes wait up to [`LINGER`]. Flushes what is left before the store closes.
    pub(super) fn run(&self, disk: &Disk) {
        loop {
            let target = {
                let mut state = self.state();
                loop {
                    let wanted = state.urgent > state.attempted || (state.closing && state.written > state.attempted);
                    if wanted && !state.flushing {
                        let Some(until) = state.gather_until(self.gather) else { break };
                        // Not idle meanwhile: points taken now need no wake-up call.
                        let wait = until.saturating_duration_since(Instant::now());
                        state = self.work.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0;
                        continue;
                    }
                    if state.closing && !state.flushing {
                        return;
                    }
                    state.idle = true;
                    let (next, timeout) = self.work.wait_timeout(state, self.linger).unwrap_or_else(|p| p.into_inner());
                    state = next;
                    state.idle = false;
                    if timeout.timed_out() && state.written > state.attempted && !state.flushing {
                        break;
                    }
                }
                Self::begin_flush(&mut state).expect("no flush under way")
            };
            self.flush(disk, target);
        }
    }

    /// The checkpoint thread: runs a checkpoint each time the journal asks for one, on a
    /// thread of its own so that flushes never wait behind one (it syncs all of sled's
    /// files, which takes milliseconds), until the store closes.
    pub(super) fn run_checkpoints(&self, disk: &Disk) {
        loop {
            {
                let mut state = self.state();
                while !state.checkpoint && !state.closing {
                    state = self.checkpoints.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                if state.closing {
                    return;
                }
                state.checkpoint = false;
            }
            checkpoint(disk);
        }
    }
}

/// Runs a checkpoint of the journal if one is due: sled's data on disk, then the
/// segment it covered is free again. A failed one is tried again when the journal next
/// asks for it (meanwhile its active segment grows).
fn checkpoint(disk: &Disk) {
    if !disk.journal.begin_checkpoint() {
        return;
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| disk.checkpoint()))
        .unwrap_or_else(|_| Err(StoreError::Corrupt("the checkpoint panicked")));
    if let Err(e) = &result {
        tracing::error!(error = %e, "history checkpoint failed");
    }
    disk.journal.end_checkpoint(result.is_ok());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakers_of_tasks_that_gave_up_are_dropped_even_if_no_flush_comes() {
        let commits = Commits::new(LINGER, GATHER);
        for _ in 0..10 * PRUNE_WAKERS {
            drop(commits.on_durable(1));
        }
        let kept = commits.on_durable(2);
        let state = commits.state();
        assert!(state.registered <= PRUNE_WAKERS + 1, "{} wakers kept", state.registered);
        assert_eq!(state.registered, state.wakers.values().map(Vec::len).sum::<usize>());
        drop(state);
        drop(kept);
    }
}
