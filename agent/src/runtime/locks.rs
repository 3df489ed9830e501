//! Who may call libcontainer when.
//!
//! An in-process create changes process-wide state (libcontainer clears the dumpable flag while it
//! builds, and clones its helpers from this process), so it runs alone: [`exclusive`]. Everything
//! else (a create through the helper process, start, state, kill, delete) touches one container's
//! state files, cgroups and processes, so calls for different ids run side by side and only calls
//! for the same id wait for each other: [`for_id`]. One exception inside that: libcontainer reaches
//! a container's notify socket (start, and the listener of an in-process create) by changing the
//! process's working directory to the state dir and using a relative name, so two starts at once
//! can start each other's containers; those calls also hold [`cwd`]. Before this split every call took
//! one global lock, and a node given 16 replicas at once created them strictly one after another
//! while its liveness checks queued behind the creates.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Held shared by per-id calls and exclusively by in-process creates, across all `Runtime`s.
static PROCESS: RwLock<()> = RwLock::new(());

/// See [`cwd`].
static CWD: Mutex<()> = Mutex::new(());

/// Ids with a call in progress.
static BUSY: IdSet = IdSet::new();

/// Held for the whole of an in-process create: no other libcontainer call of this process runs.
pub(crate) fn exclusive() -> RwLockWriteGuard<'static, ()> {
    // The guarded data is `()`: a panic while holding it leaves nothing inconsistent in memory.
    PROCESS.write().unwrap_or_else(|e| e.into_inner())
}

/// Held, inside a [`for_id`] guard, around a libcontainer call that changes the process's working
/// directory (`Container::start`). Holders wait for nothing else, so this never deadlocks.
pub(crate) fn cwd() -> MutexGuard<'static, ()> {
    // The guarded data is `()`: a panic while holding it leaves nothing inconsistent in memory.
    CWD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Held for one call about container `id`: calls for other ids proceed, calls for `id` and
/// in-process creates wait. Never taken while holding another guard of this module: a waiting
/// [`exclusive`] blocks new shared holders, so nesting could wait on itself.
pub(crate) fn for_id(id: &str) -> IdGuard {
    // Shared first, then the id: an in-process create waiting for `exclusive` holds neither, so
    // the two orders never cross.
    let process = PROCESS.read().unwrap_or_else(|e| e.into_inner());
    BUSY.acquire(id);
    IdGuard {
        id: id.to_owned(),
        _process: process,
    }
}

/// A per-id lock; dropping it lets the next call for that id in.
#[must_use = "the lock is released when the guard is dropped"]
pub(crate) struct IdGuard {
    id: String,
    _process: RwLockReadGuard<'static, ()>,
}

impl Drop for IdGuard {
    fn drop(&mut self) {
        BUSY.release(&self.id);
    }
}

/// A set of ids plus a condition variable: a lock per id without a map of mutexes that would grow
/// with every id ever seen.
struct IdSet {
    busy: Mutex<Option<HashSet<String>>>,
    freed: Condvar,
}

impl IdSet {
    const fn new() -> Self {
        Self {
            busy: Mutex::new(None),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<HashSet<String>>> {
        // Every update is a single insert or remove: a panicking holder leaves the set consistent.
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acquire(&self, id: &str) {
        let mut busy = self.lock();
        while busy.as_ref().is_some_and(|set| set.contains(id)) {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy.get_or_insert_with(HashSet::new).insert(id.to_owned());
    }

    fn release(&self, id: &str) {
        if let Some(set) = self.lock().as_mut() {
            set.remove(id);
        }
        self.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    /// Long enough for a thread that could proceed to have done so.
    const SETTLE: Duration = Duration::from_millis(200);

    #[test]
    fn different_ids_do_not_wait_for_each_other() {
        let _a = for_id("locks-test-a");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _b = for_id("locks-test-b");
            let _ = tx.send(());
        });
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn the_same_id_waits_until_released() {
        let first = for_id("locks-test-same");
        let entered = Arc::new(AtomicBool::new(false));
        let seen = entered.clone();
        let t = std::thread::spawn(move || {
            let _second = for_id("locks-test-same");
            seen.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(SETTLE);
        assert!(!entered.load(Ordering::SeqCst), "entered while held");
        drop(first);
        assert!(t.join().is_ok());
        assert!(entered.load(Ordering::SeqCst));
    }

    #[test]
    fn exclusive_waits_for_per_id_calls_and_blocks_new_ones() {
        let held = for_id("locks-test-excl");
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let all = std::thread::spawn(move || {
            let _all = exclusive();
            let _ = entered_tx.send(());
            let _ = release_rx.recv();
        });
        assert!(
            entered.recv_timeout(SETTLE).is_err(),
            "exclusive while an id was held"
        );
        drop(held);
        assert!(entered.recv_timeout(Duration::from_secs(10)).is_ok());

        let (got_tx, got) = mpsc::channel();
        let per_id = std::thread::spawn(move || {
            let _g = for_id("locks-test-excl-other");
            let _ = got_tx.send(());
        });
        assert!(
            got.recv_timeout(SETTLE).is_err(),
            "an id while exclusive was held"
        );
        let _ = release.send(());
        assert!(got.recv_timeout(Duration::from_secs(10)).is_ok());
        assert!(all.join().is_ok() && per_id.join().is_ok());
    }
}
