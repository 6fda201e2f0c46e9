//! Traffic baselines of one device (or one machine): how many messages per
//! event-time window, how far apart, how large, and how its clock sits
//! against arrival time. Each learns while its owner learns and keeps
//! adapting slowly on what it judges normal; each says when a new observation
//! departs. O(1) per message, no allocation.

use serde::{Deserialize, Serialize};

use crate::time::{Millis, window_start};

/// Windows a rate must have seen before it judges.
const MIN_BUCKETS: u32 = 6;
/// Slowest learning rate of the running means (about the last 50 observations).
const MIN_ALPHA: f64 = 0.02;

fn alpha(n: u32) -> f64 {
    (1.0 / (n as f64 + 1.0)).max(MIN_ALPHA)
}

/// Messages per event-time window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    bucket: Millis,
    count: u32,
    /// Messages in a full window: mean and mean absolute deviation.
    pub counts: Running,
    flooded: bool,
    started: bool,
}

/// What a rate found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateFinding {
    /// The current window already holds `count` messages against a usual `mean`.
    Flood {
        count: u32,
        mean: f64,
        threshold: f64,
    },
    /// The window that just closed held only `count` messages against a usual `mean`.
    Drop {
        count: u32,
        mean: f64,
        threshold: f64,
    },
}

impl Rate {
    /// Counts one message at `ts`. `learn` lets full windows update the
    /// baseline; `judge` lets it report.
    pub fn observe(
        &mut self,
        ts: Millis,
        size: Millis,
        factor: f64,
        learn: bool,
        judge: bool,
    ) -> Option<RateFinding> {
        let bucket = window_start(ts, size);
        let mut found = None;
        if !self.started {
            // The first window is partial: it is counted but never learned.
            self.started = true;
            self.bucket = bucket;
        } else if bucket > self.bucket {
            let count = self.count;
            let ready = self.counts.n >= MIN_BUCKETS;
            let threshold = self.counts.mean / factor;
            if judge && ready && self.counts.mean >= 5.0 && (count as f64) < threshold && count > 0
            {
                found = Some(RateFinding::Drop {
                    count,
                    mean: self.counts.mean,
                    threshold,
                });
            }
            if learn && !self.flooded && found.is_none() && self.count_is_full(bucket, size) {
                self.counts.learn(count as f64);
            }
            self.bucket = bucket;
            self.count = 0;
            self.flooded = false;
        } else if bucket < self.bucket {
            // Out of order: its window is gone; it does not count.
            return None;
        }
        self.count = self.count.saturating_add(1);
        if judge && self.counts.n >= MIN_BUCKETS && !self.flooded {
            let threshold = self.flood_threshold(factor);
            if self.count as f64 > threshold {
                self.flooded = true;
                found = Some(RateFinding::Flood {
                    count: self.count,
                    mean: self.counts.mean,
                    threshold,
                });
            }
        }
        found
    }

    /// A window is learned only when the next one follows it directly (a
    /// silence in between is judged by the silence check, not averaged in).
    fn count_is_full(&self, next: Millis, size: Millis) -> bool {
        next - self.bucket == size
    }

    /// Whether the current window has gone past the flood threshold: the
    /// messages beyond it are excess, not the device's usual data.
    pub fn flooding(&self) -> bool {
        self.flooded
    }

    /// More than `factor` times the usual count, and well beyond its jitter.
    pub fn flood_threshold(&self, factor: f64) -> f64 {
        let c = &self.counts;
        (factor * c.mean).max(c.mean + 6.0 * c.dev.max(1.0)) + 2.0
    }
}

/// Gaps between consecutive messages, for the silence check.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gaps {
    /// Event time of the newest message.
    pub last: Millis,
    /// Longest gap seen while learning.
    pub longest: Millis,
    pub mean: f64,
    pub n: u32,
    /// A silence was reported and the device has not spoken since.
    pub silent: bool,
}

impl Gaps {
    /// Notes a message at `ts`; returns the gap it closed.
    pub fn observe(&mut self, ts: Millis, learn: bool) -> Millis {
        if self.n == 0 && self.last == 0 {
            self.last = ts;
            self.n = 1;
            return 0;
        }
        if ts <= self.last {
            return 0;
        }
        let gap = ts - self.last;
        self.last = ts;
        if learn && !self.silent {
            self.longest = self.longest.max(gap);
            self.mean += alpha(self.n) * (gap as f64 - self.mean);
            self.n = self.n.saturating_add(1);
        }
        self.silent = false;
        gap
    }

    /// How long a gap must be to be a silence.
    pub fn silence_threshold(&self, after: Millis, factor: f64) -> Millis {
        after.max((self.longest as f64 * factor) as Millis)
    }
}

/// A running mean and mean absolute deviation: the first observations weigh
/// equally, then each counts [`MIN_ALPHA`] (about the last 50). Used for
/// message counts, payload sizes and flow volumes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Running {
    pub mean: f64,
    pub dev: f64,
    pub n: u32,
}

impl Running {
    /// Robust z of a payload size (the deviation floored at 2 % of the mean
    /// and 4 bytes, since payloads of one device often differ by a digit or two only).
    pub fn size_z(&self, bytes: f64) -> Option<f64> {
        if self.n < 30 {
            return None;
        }
        let sigma = (1.25 * self.dev).max(0.02 * self.mean).max(4.0);
        Some((bytes - self.mean) / sigma)
    }

    pub fn learn(&mut self, x: f64) {
        let a = alpha(self.n);
        if self.n == 0 {
            self.mean = x;
        } else {
            self.dev += a * ((x - self.mean).abs() - self.dev);
            self.mean += a * (x - self.mean);
        }
        self.n = self.n.saturating_add(1);
    }
}

/// The offset of a device's clock: `ts - received_at`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Skew {
    pub offset: f64,
    pub n: u32,
}

impl Skew {
    /// How far an offset departs from the learned one (from zero before any).
    pub fn departure(&self, offset: Millis) -> f64 {
        offset as f64 - if self.n == 0 { 0.0 } else { self.offset }
    }

    pub fn learn(&mut self, offset: Millis) {
        self.offset += alpha(self.n) * (offset as f64 - self.offset);
        self.n = self.n.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `per_window` messages per 10 s window for `windows` windows from `t0`.
    fn feed(
        r: &mut Rate,
        t0: Millis,
        windows: i64,
        per_window: i64,
        judge: bool,
    ) -> Vec<RateFinding> {
        let mut out = Vec::new();
        for w in 0..windows {
            for k in 0..per_window {
                let ts = t0 + w * 10_000 + k * 10_000 / per_window;
                out.extend(r.observe(ts, 10_000, 3.0, true, judge));
            }
        }
        out
    }

    #[test]
    fn flood_and_drop_against_the_learned_rate() {
        let mut r = Rate::default();
        assert!(feed(&mut r, 0, 60, 10, false).is_empty());
        assert!((r.counts.mean - 10.0).abs() < 0.5, "{}", r.counts.mean);
        // Normal jitter (9..11 per window) is quiet.
        for w in 60..120 {
            let n = 9 + (w % 3);
            for k in 0..n {
                assert_eq!(
                    r.observe(w * 10_000 + k * 900, 10_000, 3.0, true, true),
                    None
                );
            }
        }
        // Ten times the rate: one flood finding in the window, raised as it crosses.
        let found = feed(&mut r, 120 * 10_000, 1, 100, true);
        assert_eq!(found.len(), 1);
        assert!(matches!(found[0], RateFinding::Flood { count, .. } if count < 40));
        // Next window: a trickle of 2 closes as a drop when the window after starts.
        r.observe(121 * 10_000, 10_000, 3.0, true, true);
        r.observe(121 * 10_000 + 5_000, 10_000, 3.0, true, true);
        let closed = r.observe(122 * 10_000, 10_000, 3.0, true, true);
        assert!(
            matches!(closed, Some(RateFinding::Drop { count: 2, .. })),
            "{closed:?}"
        );
    }

    #[test]
    fn gaps_and_sizes() {
        let mut g = Gaps::default();
        for i in 0..100 {
            g.observe(1_000 + i * 1_000 + (i % 3) * 50, true);
        }
        assert!(g.longest >= 1_000 && g.longest <= 1_200);
        assert_eq!(g.silence_threshold(30_000, 5.0), 30_000);
        assert_eq!(g.observe(500, true), 0, "old messages close no gap");

        let mut s = Running::default();
        for i in 0..100 {
            s.learn(180.0 + (i % 5) as f64);
        }
        assert!(s.size_z(183.0).unwrap().abs() < 1.0);
        assert!(s.size_z(1800.0).unwrap() > 100.0);

        let mut k = Skew::default();
        assert_eq!(k.departure(90_000), 90_000.0);
        for _ in 0..50 {
            k.learn(3_000);
        }
        assert!(k.departure(3_010).abs() < 50.0);
    }
}
