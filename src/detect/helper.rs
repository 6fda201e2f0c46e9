//! A thread that stays up to observe the second shard of a big batch (see
//! [`super::Detectors::observe_batch`]).
//!
//! The loop hands it the shard, observes its own, and then takes the second
//! shard back if the helper has not started it yet. On two cores shared with
//! the NATS server and a publisher, a thread started (or woken) for each batch
//! may wait for the scheduler; the loop must not wait with it. Once the
//! helper has started, the loop waits for it to finish: the shard's machine
//! states are borrowed for no longer than the call that handed them over.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::{Shard, ShardFound};

/// A [`Shard`] with its lifetime erased, to cross to the helper thread.
/// Safety: [`Helper::observe`] does not return while the helper may use it.
struct Erased(Shard<'static>);

// Safety: the shard's parts are Send (or Sync where shared read-only) and
// each is used by one thread at a time, as `Helper::observe` arranges.
unsafe impl Send for Erased {}

#[derive(Default)]
struct State {
    /// A shard handed over and not yet started.
    pending: Option<Erased>,
    /// What the helper found, or its panic.
    result: Option<std::thread::Result<ShardFound>>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock is held leaves nothing half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The thread that observes second shards.
pub(super) struct Helper {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Helper {
    /// Starts the thread; None when none can be had.
    pub fn start() -> Option<Helper> {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("twinwatch-shard".into())
            .spawn(move || serve(&theirs))
            .ok()?;
        Some(Helper {
            shared,
            thread: Some(thread),
        })
    }

    /// Observes `mine` on this thread and `theirs` on the helper (or here,
    /// after `mine`, if the helper had not started it); both shards' findings.
    pub fn observe(&self, mine: Shard<'_>, theirs: Shard<'_>) -> [ShardFound; 2] {
        // Safety: the lifetime is erased only while this call runs; every
        // path out of it below either takes the shard back unstarted or
        // waits until the helper has finished with it.
        let erased = Erased(unsafe { std::mem::transmute::<Shard<'_>, Shard<'static>>(theirs) });
        {
            let mut s = self.shared.lock();
            s.pending = Some(erased);
            self.shared.changed.notify_all();
        }
        // A panic in `mine` must not leave the helper with borrowed state.
        let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mine.run()));
        let mut s = self.shared.lock();
        let second = match s.pending.take() {
            Some(Erased(theirs)) => {
                drop(s);
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| theirs.run()))
            }
            // The helper has it: wait for what it found.
            None => loop {
                if let Some(r) = s.result.take() {
                    break r;
                }
                s = self
                    .shared
                    .changed
                    .wait(s)
                    .unwrap_or_else(|e| e.into_inner());
            },
        };
        let first = first.unwrap_or_else(|e| std::panic::resume_unwind(e));
        let second = second.unwrap_or_else(|e| std::panic::resume_unwind(e));
        [first, second]
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The helper's loop: waits for a shard, observes it, hands back what it found.
fn serve(shared: &Shared) {
    let mut s = shared.lock();
    loop {
        if s.stop {
            return;
        }
        match s.pending.take() {
            Some(Erased(shard)) => {
                drop(s);
                let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.run()));
                s = shared.lock();
                s.result = Some(found);
                shared.changed.notify_all();
            }
            None => {
                s = shared.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}
