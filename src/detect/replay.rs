//! Replayed content: an old stretch of a machine's own readings sent again
//! with fresh timestamps — and possibly fresh sequence numbers, so nothing
//! but the readings themselves gives it away.
//!
//! Each message's reading vector becomes a 32-bit fingerprint (order of the
//! keys does not matter; exact values do). A machine keeps the fingerprints of
//! its last `traffic.replay_history` distinct vectors in a ring, and an index
//! from fingerprint to ring slot for one in four of them (the *anchors*), so the
//! memory per machine stays a few kilobytes (about 6 KB at the default history
//! of 1,024: the ring 4 KB, the index 2 KB). When an anchor re-appears, the
//! following messages are compared against the ring from that position on: a
//! run of `traffic.replay_min_run` consecutive vectors repeating the old ones
//! in their old order is a replay. Live sensor noise makes that impossible by
//! chance; a machine at rest (identical vectors) is skipped, since consecutive
//! identical vectors are not entered; runs seen while learning raise the bar,
//! and a machine whose readings repeat a whole run while learning (a periodic
//! or coarsely quantised signal) is not judged by content at all.

use serde::{Deserialize, Serialize};

use crate::time::Millis;

/// A replayed vector must be at least this many distinct vectors old.
const MIN_AGE: u64 = 16;
/// Ring slots that share one recorded event time.
const BLOCK: usize = 16;

/// The fingerprint of a reading vector (metric id, value), independent of order.
pub fn fingerprint(readings: &[(u32, f64)]) -> Option<u32> {
    if readings.is_empty() {
        return None;
    }
    let mut acc: u64 = 0;
    for &(metric, value) in readings {
        let v = if value == 0.0 { 0 } else { value.to_bits() };
        acc = acc.wrapping_add(mix((metric as u64) << 32 ^ v.rotate_left(17) ^ v));
    }
    Some((mix(acc) >> 32) as u32)
}

/// A 64-bit finalizer (murmur3's): every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn anchor(fp: u32) -> bool {
    fp & 3 == 0
}

/// A run of re-appearing vectors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Run {
    next: u64,
    len: u32,
    origin: u64,
    reported: bool,
}

/// What the index says about a message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReplayVerdict {
    Fresh,
    /// A replay was recognised with this message: `len` vectors so far,
    /// repeating those `behind` vectors back, first seen at `original`.
    Detected {
        len: u32,
        behind: u64,
        original: Millis,
    },
    /// The message continues a replay already reported.
    Replaying,
}

/// Fingerprints of one machine's recent reading vectors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(into = "Packed", from = "Packed")]
pub struct ReplayIndex {
    ring: Vec<u32>,
    /// Event time of the first entry of each block of [`BLOCK`] ring slots,
    /// in seconds after `base` (enough to say when a replayed stretch was sent).
    secs: Vec<u32>,
    base: Millis,
    pos: u64,
    /// Anchor fingerprint → the ring slot of its newest entry.
    index: Anchors,
    prev: Option<u32>,
    run: Option<Run>,
    /// Longest run seen while learning: live data that repeats itself this much is normal.
    pub learned_longest: u32,
}

/// How a [`ReplayIndex`] is saved: the ring as base64 of little-endian
/// words (about a third of the size of a JSON list), the index rebuilt on load.
#[derive(Serialize, Deserialize)]
struct Packed {
    ring: String,
    secs: String,
    base: Millis,
    pos: u64,
    prev: Option<u32>,
    run: Option<Run>,
    learned_longest: u32,
}

fn pack(words: &[u32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unpack(text: &str) -> Vec<u32> {
    use base64::Engine as _;
    // A damaged snapshot loses the history, not the process.
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_default();
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl From<ReplayIndex> for Packed {
    fn from(r: ReplayIndex) -> Packed {
        Packed {
            ring: pack(&r.ring),
            secs: pack(&r.secs),
            base: r.base,
            pos: r.pos,
            prev: r.prev,
            run: r.run,
            learned_longest: r.learned_longest,
        }
    }
}

impl From<Packed> for ReplayIndex {
    fn from(p: Packed) -> ReplayIndex {
        let ring = unpack(&p.ring);
        let mut secs = unpack(&p.secs);
        secs.resize(ring.len().div_ceil(BLOCK), 0);
        let held = ring.len() as u64;
        let mut r = ReplayIndex {
            base: p.base,
            pos: if held == 0 { 0 } else { p.pos.max(held) },
            prev: p.prev,
            run: p.run,
            learned_longest: p.learned_longest,
            index: Anchors::default(),
            ring,
            secs,
        };
        // Re-index the anchors, oldest first, so the newest position wins.
        for pos in r.pos.saturating_sub(held)..r.pos {
            let slot = (pos % held) as usize;
            let fp = r.ring[slot];
            if anchor(fp) {
                r.index.insert(&r.ring, fp, slot as u32);
            }
        }
        if r.run.is_some_and(|run| r.pos - run.next.min(r.pos) > held) {
            r.run = None;
        }
        r
    }
}

impl ReplayIndex {
    /// Looks at one message's fingerprint and enters it.
    pub fn observe(
        &mut self,
        fp: u32,
        ts: Millis,
        history: usize,
        min_run: u32,
        learning: bool,
    ) -> ReplayVerdict {
        if self.prev == Some(fp) {
            return match self.run {
                Some(r) if r.reported => ReplayVerdict::Replaying,
                _ => ReplayVerdict::Fresh,
            };
        }
        let pos = self.pos;
        let held = self.ring.len() as u64;
        if let Some(run) = &mut self.run {
            let inside = run.next < pos && pos - run.next <= held;
            if inside && self.ring[(run.next % held) as usize] == fp {
                run.len += 1;
                run.next += 1;
            } else {
                self.run = None;
            }
        }
        if self.run.is_none()
            && anchor(fp)
            && let Some(slot) = self.index.get(&self.ring, fp)
        {
            // The newest position written to that slot (the ring is not
            // empty, so `pos` >= 1 and >= `held`).
            let q = pos - 1 - (pos - 1 - slot as u64) % held;
            if pos - q >= MIN_AGE && pos - q <= held {
                self.run = Some(Run {
                    next: q + 1,
                    len: 1,
                    origin: q,
                    reported: false,
                });
            }
        }
        self.enter(fp, ts, history);
        let Some(run) = &mut self.run else {
            return ReplayVerdict::Fresh;
        };
        if learning {
            self.learned_longest = self.learned_longest.max(run.len);
            return ReplayVerdict::Fresh;
        }
        if run.reported {
            return ReplayVerdict::Replaying;
        }
        // A machine whose live readings repeated themselves for a whole run
        // while learning (a periodic or coarsely quantised signal) cannot be
        // judged this way; shorter chance runs raise the bar.
        if self.learned_longest >= min_run {
            return ReplayVerdict::Fresh;
        }
        let needed = min_run.max(self.learned_longest.saturating_mul(2).saturating_add(1));
        if run.len < needed {
            return ReplayVerdict::Fresh;
        }
        run.reported = true;
        let held = self.ring.len() as u64;
        let block = (run.origin % held) as usize / BLOCK;
        let original = self.base + self.secs[block] as Millis * 1000;
        ReplayVerdict::Detected {
            len: run.len,
            behind: pos - run.origin - (run.len as u64 - 1),
            original,
        }
    }

    fn enter(&mut self, fp: u32, ts: Millis, history: usize) {
        let pos = self.pos;
        if self.ring.is_empty() {
            self.base = ts;
        }
        let secs = ((ts - self.base).max(0) / 1000).min(u32::MAX as Millis) as u32;
        let slot = if self.ring.len() < history {
            self.ring.push(fp);
            self.ring.len() - 1
        } else {
            let slot = (pos % self.ring.len() as u64) as usize;
            let old = self.ring[slot];
            if anchor(old) {
                // Only if this was its newest entry (the ring still holds it).
                self.index.remove(&self.ring, old, slot as u32);
            }
            self.ring[slot] = fp;
            slot
        };
        if slot.is_multiple_of(BLOCK) {
            let block = slot / BLOCK;
            if self.secs.len() <= block {
                self.secs.resize(block + 1, 0);
            }
            self.secs[block] = secs;
        }
        if anchor(fp) {
            self.index.insert(&self.ring, fp, slot as u32);
        }
        self.prev = Some(fp);
        self.pos += 1;
    }
}

/// An empty slot of [`Anchors::table`].
const EMPTY: u32 = u32::MAX;

/// Anchor fingerprint → ring slot of its newest entry: an open-addressed
/// table (linear probing) of slot numbers alone, the keys read from the ring
/// they point into, at most half full. 4 bytes a slot: about 2 KB a machine at
/// the default history, where a hash map of (fingerprint, position) pairs held
/// 4.6 KB (at 10,000 machines, 26 MB less). Probes start at a hash seeded per
/// process: fingerprints are of readings a sender chooses, and crafted ones
/// must not pile up in one probe run.
#[derive(Debug, Clone, Default)]
struct Anchors {
    table: Vec<u32>,
    len: usize,
}

fn probe_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        use std::hash::BuildHasher;
        foldhash::fast::RandomState::default().hash_one(0x7477_u64)
    })
}

impl Anchors {
    fn home(&self, fp: u32) -> usize {
        let h = (fp as u64 ^ probe_seed()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 32) as usize & (self.table.len() - 1)
    }

    /// Where in the table `fp`'s entry is (one entry per fingerprint).
    fn find(&self, ring: &[u32], fp: u32) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let mask = self.table.len() - 1;
        let mut i = self.home(fp);
        // Never full, so an empty slot ends every probe.
        loop {
            let slot = self.table[i];
            if slot == EMPTY {
                return None;
            }
            if ring.get(slot as usize) == Some(&fp) {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The ring slot of `fp`'s newest entry.
    fn get(&self, ring: &[u32], fp: u32) -> Option<u32> {
        self.find(ring, fp).map(|i| self.table[i])
    }

    /// Points `fp`, just written to `ring[slot]`, to that slot.
    fn insert(&mut self, ring: &[u32], fp: u32, slot: u32) {
        if let Some(i) = self.find(ring, fp) {
            self.table[i] = slot;
            return;
        }
        if (self.len + 1) * 2 > self.table.len() {
            self.grow(ring);
        }
        self.place(slot, fp);
        self.len += 1;
    }

    fn place(&mut self, slot: u32, fp: u32) {
        let mask = self.table.len() - 1;
        let mut i = self.home(fp);
        while self.table[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.table[i] = slot;
    }

    fn grow(&mut self, ring: &[u32]) {
        let size = (self.table.len() * 2).max(16);
        let old = std::mem::replace(&mut self.table, vec![EMPTY; size]);
        for slot in old.into_iter().filter(|&s| s != EMPTY) {
            self.place(slot, ring[slot as usize]);
        }
    }

    /// Drops `fp`'s entry if it points to `slot` (called while the ring
    /// still holds `fp` there).
    fn remove(&mut self, ring: &[u32], fp: u32, slot: u32) {
        let Some(mut hole) = self.find(ring, fp) else {
            return;
        };
        if self.table[hole] != slot {
            return;
        }
        self.len -= 1;
        // Backward shift: each later entry of the probe run moves into the
        // hole unless its home lies cyclically after the hole, up to itself.
        let mask = self.table.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let s = self.table[j];
            if s == EMPTY {
                break;
            }
            let home = self.home(ring[s as usize]);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.table[hole] = s;
                hole = j;
            }
        }
        self.table[hole] = EMPTY;
    }

    /// Every (fingerprint, slot) entry, sorted (for tests).
    #[cfg(test)]
    fn entries(&self, ring: &[u32]) -> Vec<(u32, u32)> {
        let mut e: Vec<(u32, u32)> = self
            .table
            .iter()
            .filter(|&&s| s != EMPTY)
            .map(|&s| (ring[s as usize], s))
            .collect();
        e.sort_unstable();
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(i: u64) -> [(u32, f64); 3] {
        // Noisy-looking values that never repeat by themselves.
        let x = (i as f64 * 0.6543).sin() * 10.0 + i as f64 * 0.001;
        [(0, 70.0 + x), (1, 2.0 + x / 7.0), (2, 1200.0 + 3.0 * x)]
    }

    #[test]
    fn fingerprints_ignore_order_and_see_values() {
        let a = [(0, 1.5), (1, 2.5)];
        let b = [(1, 2.5), (0, 1.5)];
        let c = [(0, 1.5), (1, 2.51)];
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
        assert_eq!(fingerprint(&[]), None);
    }

    #[test]
    fn a_replayed_stretch_is_recognised_and_live_data_is_not() {
        let mut r = ReplayIndex::default();
        let mut ts = 0;
        for i in 0..600 {
            ts += 1000;
            let fp = fingerprint(&vector(i)).unwrap();
            assert_eq!(r.observe(fp, ts, 1024, 6, i < 300), ReplayVerdict::Fresh);
        }
        // A machine at rest: identical vectors are skipped, never a replay.
        for _ in 0..50 {
            ts += 1000;
            let fp = fingerprint(&[(0, 22.0), (1, 0.0), (2, 0.0)]).unwrap();
            assert_eq!(r.observe(fp, ts, 1024, 6, false), ReplayVerdict::Fresh);
        }
        // Vectors 200..260 sent again with fresh timestamps.
        let mut detected = None;
        let mut replaying = 0;
        for i in 200..260 {
            ts += 1000;
            match r.observe(fingerprint(&vector(i)).unwrap(), ts, 1024, 6, false) {
                ReplayVerdict::Detected { len, original, .. } => {
                    detected = Some((i, len, original))
                }
                ReplayVerdict::Replaying => replaying += 1,
                ReplayVerdict::Fresh => {}
            }
        }
        let (at, len, original) = detected.expect("replay recognised");
        assert!(at < 220, "recognised after {} vectors", at - 200);
        assert!(len >= 6);
        // The original of the run's first vector was entered at (its index + 1) s;
        // the time kept is its block of 16's.
        let first = at - len as u64 + 1;
        assert!(
            (original - (first as Millis / 16 * 16 + 1) * 1000).abs() <= 1000,
            "{original}"
        );
        assert_eq!(replaying as u64, 259 - at);
    }

    #[test]
    fn periodic_live_data_switches_the_check_off() {
        let mut r = ReplayIndex::default();
        let mut found = 0;
        for i in 0..2000u64 {
            let v = vector(i % 17);
            found += (r.observe(
                fingerprint(&v).unwrap(),
                i as Millis * 1000,
                1024,
                6,
                i < 60,
            ) != ReplayVerdict::Fresh) as u32;
        }
        assert_eq!(found, 0);
        assert!(r.learned_longest >= 6);
    }

    #[test]
    fn a_saved_index_recognises_the_same_replay() {
        let mut r = ReplayIndex::default();
        for i in 0..1500u64 {
            r.observe(
                fingerprint(&vector(i)).unwrap(),
                1000 + i as Millis * 1000,
                1024,
                6,
                i < 300,
            );
        }
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.len() < 7_000, "{} bytes", json.len());
        let mut back: ReplayIndex = serde_json::from_str(&json).unwrap();
        assert_eq!(back.index.entries(&back.ring), r.index.entries(&r.ring));
        let mut a = Vec::new();
        let mut b = Vec::new();
        for i in 900..940u64 {
            let fp = fingerprint(&vector(i)).unwrap();
            a.push(r.observe(fp, 2_000_000 + i as Millis, 1024, 6, false));
            b.push(back.observe(fp, 2_000_000 + i as Millis, 1024, 6, false));
        }
        assert_eq!(a, b);
        assert!(
            a.iter()
                .any(|v| matches!(v, ReplayVerdict::Detected { .. }))
        );
    }

    /// The index as a map rebuilt from the ring: each anchor's newest slot.
    fn brute_force(r: &ReplayIndex) -> Vec<(u32, u32)> {
        let held = r.ring.len() as u64;
        let mut newest = std::collections::BTreeMap::new();
        for pos in r.pos.saturating_sub(held)..r.pos {
            let slot = (pos % held) as u32;
            let fp = r.ring[slot as usize];
            if anchor(fp) {
                newest.insert(fp, slot);
            }
        }
        newest.into_iter().collect()
    }

    #[test]
    fn the_index_holds_each_anchors_newest_slot_through_evictions() {
        // Few distinct fingerprints, all anchors (as a sender choosing its
        // readings could make them): entries are updated, evicted and
        // shifted back all the time.
        let mut r = ReplayIndex::default();
        let mut x: u64 = 0x9e37_79b9;
        for i in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let fp = ((x % 300) as u32) << 2;
            r.observe(fp, i as Millis * 1000, 256, 6, false);
            if i % 7 == 0 || i > 19_900 {
                assert_eq!(r.index.entries(&r.ring), brute_force(&r), "after {i}");
            }
        }
        assert!(r.index.table.len() >= 2 * r.index.len, "at most half full");
    }

    #[test]
    fn history_is_bounded() {
        let mut r = ReplayIndex::default();
        for i in 0..10_000 {
            r.observe(
                fingerprint(&vector(i)).unwrap(),
                i as Millis * 1000,
                256,
                6,
                false,
            );
        }
        assert_eq!(r.ring.len(), 256);
        assert!(r.index.len <= 256);
        assert!(r.index.table.len() <= 512, "at most half full, once grown");
        // Out of history: replaying vectors older than it is not matched.
        let mut found = false;
        for i in 0..100 {
            found |= r.observe(fingerprint(&vector(i)).unwrap(), 0, 256, 6, false)
                != ReplayVerdict::Fresh;
        }
        assert!(!found);
    }
}
