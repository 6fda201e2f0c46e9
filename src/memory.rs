//! How the process holds its memory: glibc's allocator set up for a
//! long-running stream processor, and handing back what a query run freed.
//!
//! glibc gives each thread that allocates while others hold the lock an arena
//! of its own, up to eight per core, and keeps what a thread frees in that
//! thread's arena. The loop's workers, the NATS client and the query thread
//! each peak at different moments, so the process held the sum of their
//! peaks: at 10,000 machines × 8 sensors, 70–90 MB freed but resident beside
//! 150–200 MB in use. One arena per core shares the free memory between the
//! threads (the per-thread caches still serve small blocks without a lock);
//! a trim after a query run, every few seconds at most, hands back the pages
//! of what was freed and not reused (its tables, the windows it read).
//!
//! Blocks of [`MMAP_THRESHOLD`] and more get mappings of their own, handed
//! back whole when freed (see the constant for why glibc's own moving
//! threshold is not kept).
//!
//! Users who tune glibc themselves (`MALLOC_ARENA_MAX`,
//! `MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`) keep their setting: [`tune`]
//! then leaves the allocator alone.

/// Environment variables through which glibc takes the same settings.
const USER_SETTINGS: [&str; 3] = [
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_THRESHOLD_",
    "GLIBC_TUNABLES",
];

/// Blocks at least this large are mapped on their own. glibc starts at
/// 128 KB but raises its threshold to the size of each mapped block freed
/// (up to 32 MB), after which the batches' columns and a query run's tables
/// come from the heap, and what they leave free between blocks still in use
/// stays resident. Fixed here, at 10,000 machines × 8 sensors the heap held
/// free fell from 46–71 MB to 25–40 MB and the peak from 276–298 MB to
/// 271–272 MB (`twinwatch bench --machines 10000 --sensors 8`, in turn).
pub const MMAP_THRESHOLD: usize = 256 * 1024;

/// What [`tune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// Arenas limited to this many (one per core), and blocks of
    /// [`MMAP_THRESHOLD`] and more mapped on their own (unless glibc
    /// refused that alone: then its moving threshold stands).
    Arenas(usize),
    /// The user's own setting was found in the environment and kept.
    UserSetting,
    /// Not glibc, or glibc refused: the allocator's defaults stand.
    Untouched,
}

/// Limits glibc to one arena per core and fixes its mmap threshold. Call it
/// first thing in `main`, before any other thread starts: an arena a thread
/// already has stays its own.
pub fn tune() -> Tuning {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let Some(arenas) = arenas(|v| std::env::var_os(v).is_some(), cores) else {
        return Tuning::UserSetting;
    };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let n = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt takes two integers and changes a setting of the
        // allocator under its own lock.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, n) } == 1 {
            map_large_blocks();
            return Tuning::Arenas(arenas);
        }
    }
    let _ = arenas;
    Tuning::Untouched
}

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`]; whether glibc took it.
fn map_large_blocks() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and changes a setting of the
        // allocator under its own lock.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// The arenas to ask for on `cores` cores; `None` when the environment
/// (`is_set` says which variables are) already tells glibc.
fn arenas(is_set: impl Fn(&str) -> bool, cores: usize) -> Option<usize> {
    if USER_SETTINGS.iter().any(|v| is_set(v)) {
        return None;
    }
    Some(cores.max(1))
}

/// How often [`Releaser::after_work`] hands free pages back. A trim costs
/// little itself, but a page handed back and used again soon is faulted in
/// again (zeroed): trimmed after each of a busy minute's hundreds of query
/// runs, the default bench lost about a tenth of its rate.
pub const RELEASE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Hands free pages back to the kernel now and then, from a thread whose
/// work frees a lot at once (the query stage, after a run).
#[derive(Debug)]
pub struct Releaser {
    every: std::time::Duration,
    last: std::time::Instant,
}

impl Default for Releaser {
    fn default() -> Self {
        Releaser::every(RELEASE_EVERY)
    }
}

impl Releaser {
    /// Releases at most once per `every`, the first time `every` after now.
    pub fn every(every: std::time::Duration) -> Self {
        Releaser {
            every,
            last: std::time::Instant::now(),
        }
    }

    /// After a piece of work: releases when `every` has passed since the
    /// last time; says whether it did.
    pub fn after_work(&mut self) -> bool {
        if self.last.elapsed() < self.every {
            return false;
        }
        release_free();
        self.last = std::time::Instant::now();
        true
    }
}

/// Hands the free pages every arena holds back to the kernel (the blocks stay
/// the allocator's; a page is faulted in again when one is reused). It walks
/// every arena under its lock, a millisecond or so.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reads and changes the allocator's own lists
    // under each arena's lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_arena_per_core_unless_the_user_tunes_glibc() {
        assert_eq!(arenas(|_| false, 2), Some(2));
        assert_eq!(arenas(|_| false, 0), Some(1));
        assert_eq!(arenas(|v| v == "MALLOC_ARENA_MAX", 2), None);
        assert_eq!(arenas(|v| v == "GLIBC_TUNABLES", 8), None);
        assert_eq!(arenas(|v| v == "MALLOC_MMAP_THRESHOLD_", 2), None);
    }

    #[test]
    fn a_releaser_releases_once_its_interval_has_passed() {
        let mut hourly = Releaser::every(std::time::Duration::from_secs(3600));
        assert!(!hourly.after_work());
        let mut always = Releaser::every(std::time::Duration::ZERO);
        assert!(always.after_work());
        assert!(always.after_work());
    }

    fn rss_anon_mb() -> f64 {
        crate::bench::status_mb("RssAnon:")
    }

    /// Once a large block is freed, glibc's own threshold would rise to its
    /// size and serve the blocks below it from the heap, where freed ones
    /// stay resident under a block still held; fixed, they are unmapped.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn large_blocks_freed_leave_the_resident_set_at_once() {
        assert!(map_large_blocks());
        drop(std::hint::black_box(vec![1u8; 8 << 20]));
        let mut blocks: Vec<Vec<u8>> = (1..=128).map(|i| vec![i as u8; 512 * 1024]).collect();
        // Under the threshold, so from the heap: above the blocks, were they
        // there too (a small one could fill a gap below them).
        let pin = vec![1u8; 200 * 1024];
        let held = rss_anon_mb();
        blocks.clear();
        let freed = rss_anon_mb();
        drop(std::hint::black_box(pin));
        // 64 MB freed; other tests of this binary allocate meanwhile: a margin.
        assert!(
            held - freed > 48.0,
            "resident {held:.0} MB held, {freed:.0} MB once freed"
        );
    }

    /// Small blocks freed below one still held stay resident (glibc can only
    /// shrink the top of a heap by itself); released, their pages go back.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn released_free_blocks_leave_the_resident_set() {
        // 96 MB in 2 KB blocks (far below the mmap threshold), each written.
        let mut blocks: Vec<Vec<u8>> = (0..48 * 1024).map(|i| vec![i as u8; 2048]).collect();
        let pin = vec![1u8; 2048];
        let held = rss_anon_mb();
        blocks.clear();
        blocks.shrink_to_fit();
        let freed = rss_anon_mb();
        release_free();
        let released = rss_anon_mb();
        drop(std::hint::black_box(pin));
        // Other tests of this binary allocate meanwhile: a margin.
        assert!(
            freed - released > 48.0,
            "resident {held:.0} MB held, {freed:.0} MB freed, {released:.0} MB released"
        );
    }
}
