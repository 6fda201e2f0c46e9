//! The second core: a thread that stays up to run the second half of work
//! the loop splits in two — decoding a big batch ([`crate::decode`]) and
//! observing its second shard of machines ([`crate::detect`]).
//!
//! [`Helper::join`] hands the helper one half, runs the other, and then
//! takes the first back if the helper has not started it yet. On two cores
//! shared with the NATS server and a publisher, a thread started (or woken)
//! for each batch may wait for the scheduler; the loop must not wait with
//! it. Once the helper has started, the loop waits for it to finish: what
//! the half borrows is borrowed for no longer than the call that handed it
//! over. One thread for the whole pipeline, started when first needed,
//! instead of a thread spawned per batch (a stack mapped and faulted in,
//! then unmapped, a hundred times a second on array payloads).

use std::any::Any;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

/// A half with its lifetime erased, to cross to the helper thread; it
/// returns its result boxed. Safety: [`Helper::join`] does not return while
/// the helper may run it.
type Job = Box<dyn FnOnce() -> Box<dyn Any + Send> + Send + 'static>;

#[derive(Default)]
struct State {
    /// Some caller's half is with the helper (pending, running, or its
    /// result not yet collected): another caller runs its own halves itself.
    busy: bool,
    /// A half handed over and not yet started.
    pending: Option<Job>,
    /// What the helper's half returned, or its panic.
    result: Option<std::thread::Result<Box<dyn Any + Send>>>,
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

/// The helper thread's name.
pub const HELPER_THREAD: &str = "twinwatch-helper";

/// The thread that runs second halves.
pub struct Helper {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Helper {
    /// Starts the thread; None when none can be had.
    pub fn start() -> Option<Helper> {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name(HELPER_THREAD.into())
            .spawn(move || serve(&theirs))
            .ok()?;
        Some(Helper {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `mine` on this thread and `theirs` on the helper (or here, after
    /// `mine`, if the helper had not started it, or is busy with another
    /// caller's); both results. A panic in either is resumed here once
    /// neither half runs any more.
    pub fn join<A, B: Send + 'static>(
        &self,
        mine: impl FnOnce() -> A,
        theirs: impl FnOnce() -> B + Send,
    ) -> (A, B) {
        {
            let mut s = self.shared.lock();
            if s.busy {
                drop(s);
                return (mine(), theirs());
            }
            s.busy = true;
            let job: Box<dyn FnOnce() -> Box<dyn Any + Send> + Send + '_> =
                Box::new(move || Box::new(theirs()) as Box<dyn Any + Send>);
            // Safety: the lifetime is erased only while this call runs; every
            // path out of it below either takes the job back unstarted or
            // waits until the helper has run it (and dropped it: `serve`
            // consumes it). `busy` keeps any other caller's half out until then.
            let job: Job = unsafe { std::mem::transmute(job) };
            s.pending = Some(job);
            self.shared.changed.notify_all();
        }
        // A panic in `mine` must not leave the helper with borrowed data.
        let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(mine));
        let mut s = self.shared.lock();
        let second = match s.pending.take() {
            // Taken back unstarted: the helper is free for others again.
            Some(job) => {
                s.busy = false;
                drop(s);
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
            }
            // The helper has it: wait for its result.
            None => loop {
                if let Some(r) = s.result.take() {
                    s.busy = false;
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
        let second = second
            .downcast::<B>()
            .unwrap_or_else(|_| unreachable!("a job returns its own half's result"));
        (first, *second)
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

/// The helper's loop: waits for a half, runs it, hands back what it returned.
fn serve(shared: &Shared) {
    let mut s = shared.lock();
    loop {
        if s.stop {
            return;
        }
        match s.pending.take() {
            Some(job) => {
                drop(s);
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                s = shared.lock();
                s.result = Some(r);
                shared.changed.notify_all();
            }
            None => {
                s = shared.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

/// One helper shared by the rooms of a pipeline, started the first time
/// some room splits its work (a pipeline that never sees a big batch never
/// starts one). Clones share the same helper.
#[derive(Clone, Default)]
pub struct Spare(Arc<OnceLock<Option<Helper>>>);

impl Spare {
    /// The helper; None when no thread could be had (the work then runs in one piece).
    pub fn get(&self) -> Option<&Helper> {
        self.0.get_or_init(Helper::start).as_ref()
    }
}

impl std::fmt::Debug for Spare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0.get() {
            None => "Spare(not started)",
            Some(Some(_)) => "Spare(started)",
            Some(None) => "Spare(unavailable)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_halves_run_and_return_their_results() {
        let h = Helper::start().expect("a thread");
        let mut data = vec![1u64, 2, 3, 4, 5, 6];
        for round in 0..50u64 {
            let (a, b) = data.split_at_mut(3);
            let (x, y) = h.join(
                || {
                    a.iter_mut().for_each(|v| *v += 1);
                    a.iter().sum::<u64>()
                },
                || {
                    b.iter_mut().for_each(|v| *v += 10);
                    b.iter().sum::<u64>()
                },
            );
            assert_eq!(x, 6 + 3 * (round + 1));
            assert_eq!(y, 15 + 30 * (round + 1));
        }
        assert_eq!(data, vec![51, 52, 53, 504, 505, 506]);
    }

    #[test]
    fn a_panic_in_the_helpers_half_comes_back_to_the_caller() {
        let h = Helper::start().expect("a thread");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.join(|| 1, || -> u32 { panic!("theirs") })
        }));
        assert!(r.is_err());
        // The helper is still of use after it.
        assert_eq!(h.join(|| 2, || 3), (2, 3));
    }

    #[test]
    fn callers_on_several_threads_each_get_their_own_results() {
        let h = Helper::start().expect("a thread");
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let h = &h;
                s.spawn(move || {
                    for i in 0..200u64 {
                        let mut v = vec![t; 64];
                        let (a, b) = v.split_at_mut(32);
                        let (x, y) = h.join(
                            || {
                                a.iter_mut().for_each(|x| *x += i);
                                a.iter().sum::<u64>()
                            },
                            || {
                                b.iter_mut().for_each(|x| *x += 2 * i);
                                (t, b.iter().sum::<u64>())
                            },
                        );
                        assert_eq!(x, 32 * (t + i));
                        assert_eq!(y, (t, 32 * (t + 2 * i)));
                    }
                });
            }
        });
    }

    #[test]
    fn a_spare_is_started_once_and_shared_by_its_clones() {
        let a = Spare::default();
        let b = a.clone();
        assert_eq!(format!("{a:?}"), "Spare(not started)");
        let ha = a.get().expect("a thread") as *const Helper;
        let hb = b.get().expect("a thread") as *const Helper;
        assert_eq!(ha, hb);
        assert_eq!(format!("{b:?}"), "Spare(started)");
    }
}
