//! Replayed content: an old stretch of a machine's own readings sent again
//! with fresh timestamps — and possibly fresh sequence numbers, so nothing
//! but the readings themselves gives it away.
//!
//! Each message's reading vector becomes a 32-bit fingerprint (order of the
//! keys does not matter; exact values do). A machine keeps the fingerprints of
//! its last `traffic.replay_history` distinct vectors in a ring, and an index
//! from fingerprint to position for one in four of them (the *anchors*), so the
//! memory per machine stays a few kilobytes. When an anchor re-appears, the
//! following messages are compared against the ring from that position on: a
//! run of `traffic.replay_min_run` consecutive vectors repeating the old ones
//! in their old order is a replay. Live sensor noise makes that impossible by
//! chance; a machine at rest (identical vectors) is skipped, since consecutive
//! identical vectors are not entered; runs seen while learning raise the bar,
//! and a machine whose readings repeat a whole run while learning (a periodic
//! or coarsely quantised signal) is not judged by content at all.

use std::collections::HashMap;

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
    /// Anchor fingerprint → its newest position. A seeded fast hash: this is
    /// looked up for a quarter of all messages, and SipHash made it the loop's
    /// top symbol; the per-process seed keeps crafted collisions out.
    index: HashMap<u32, u32, foldhash::fast::RandomState>,
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
            index: HashMap::default(),
            ring,
            secs,
        };
        // Re-index the anchors, oldest first, so the newest position wins.
        for pos in r.pos.saturating_sub(held)..r.pos {
            let fp = r.ring[(pos % held) as usize];
            if anchor(fp) {
                r.index.insert(fp, pos as u32);
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
            && let Some(&q) = self.index.get(&fp)
        {
            let q = pos - (pos as u32).wrapping_sub(q) as u64;
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
            let old_pos = (pos - self.ring.len() as u64) as u32;
            if anchor(old) && self.index.get(&old) == Some(&old_pos) {
                self.index.remove(&old);
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
            self.index.insert(fp, pos as u32);
        }
        self.prev = Some(fp);
        self.pos += 1;
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
        assert_eq!(back.index, r.index);
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
        assert!(r.index.len() <= 256);
        // Out of history: replaying vectors older than it is not matched.
        let mut found = false;
        for i in 0..100 {
            found |= r.observe(fingerprint(&vector(i)).unwrap(), 0, 256, 6, false)
                != ReplayVerdict::Fresh;
        }
        assert!(!found);
    }
}
