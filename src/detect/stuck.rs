//! Stuck: a value frozen far longer than the sensor's own variability allows.
//!
//! Every live sensor has noise, so exact repeats are rare; how rare is learned
//! per (machine, metric) as the rate `p0` of consecutive identical readings
//! (Laplace-smoothed). A run of n identical readings then has probability
//! about p0^(n-1) — coarse integer sensors, which repeat often, need far longer
//! runs than fine analog ones. A run must also last `detect.stuck.min_duration`
//! and `learned_run_factor` times the longest run seen while learning.
//!
//! Values the sensor rests at while learning (a spindle at exactly 0 rpm when
//! idle) are remembered and never called stuck.

use crate::time::Millis;

/// Most rest values remembered per sensor.
const MAX_REST_VALUES: usize = 8;

/// Run tracking for one (machine, metric).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Freeze {
    /// The previous reading (none before the first).
    pub last: Option<f64>,
    pub run_start: Millis,
    pub run_len: u32,
    /// Identical consecutive pairs, and all pairs, from runs judged normal.
    pub repeats: u64,
    pub pairs: u64,
    /// Longest run while learning, in milliseconds.
    pub longest_learned: Millis,
    pub rest_values: Vec<f64>,
}

/// A frozen run long enough to report.
#[derive(Debug, Clone, Copy)]
pub struct Frozen {
    pub value: f64,
    pub since: Millis,
    pub duration: Millis,
    pub readings: u32,
    pub longest_learned: Millis,
    pub surprise: f64,
}

impl Freeze {
    /// Learned probability that a reading repeats the previous one exactly.
    pub fn repeat_rate(&self) -> f64 {
        (self.repeats as f64 + 1.0) / (self.pairs as f64 + 2.0)
    }

    /// Observes a reading; returns the frozen run it extends when that run is
    /// long enough to report. `learning` lets runs teach what is normal.
    pub fn observe(
        &mut self,
        ts: Millis,
        x: f64,
        learning: bool,
        min_duration: Millis,
        factor: f64,
    ) -> Option<Frozen> {
        if Some(x) == self.last {
            self.run_len = self.run_len.saturating_add(1);
        } else {
            self.end_run(ts, learning, min_duration);
            self.last = Some(x);
            self.run_start = ts;
            self.run_len = 1;
            return None;
        }
        let duration = ts - self.run_start;
        if learning {
            // A run still going when learning ends is learned too (a value that never changes).
            self.longest_learned = self.longest_learned.max(duration);
            if duration >= min_duration
                && self.rest_values.len() < MAX_REST_VALUES
                && !self.rest_values.contains(&x)
            {
                self.rest_values.push(x);
            }
            return None;
        }
        if self.rest_values.contains(&x) {
            return None;
        }
        let needed = (min_duration as f64).max(factor * self.longest_learned as f64);
        if (duration as f64) < needed {
            return None;
        }
        let surprise = -((self.run_len - 1) as f64) * self.repeat_rate().log10();
        Some(Frozen {
            value: x,
            since: self.run_start,
            duration,
            readings: self.run_len,
            longest_learned: self.longest_learned,
            surprise,
        })
    }

    fn end_run(&mut self, ts: Millis, learning: bool, min_duration: Millis) {
        if self.run_len == 0 {
            return;
        }
        let duration = ts - self.run_start;
        // A run that ended on its own before it could be called stuck is normal
        // behaviour and teaches the repeat rate; so does anything while learning.
        if learning || duration < min_duration {
            self.repeats += (self.run_len - 1) as u64;
            self.pairs += self.run_len as u64;
        }
        if learning {
            self.longest_learned = self.longest_learned.max(duration);
            if let Some(last) = self.last
                && duration >= min_duration
                && self.rest_values.len() < MAX_REST_VALUES
                && !self.rest_values.contains(&last)
            {
                self.rest_values.push(last);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_noisy_sensor_is_stuck_and_rest_value_is_not() {
        let mut f = Freeze::default();
        // Learning: noisy values, plus a minute resting at exactly 0.
        for i in 0..600i64 {
            let x = if (100..160).contains(&i) {
                0.0
            } else {
                20.0 + (i % 7) as f64 * 0.1
            };
            assert!(f.observe(i * 1000, x, true, 30_000, 1.0).is_none());
        }
        assert_eq!(f.rest_values, vec![0.0]);
        // Protecting: frozen at 20.3 for two minutes.
        let mut found = None;
        for i in 600..720i64 {
            if let Some(fr) = f.observe(i * 1000, 20.3, false, 30_000, 1.0) {
                found.get_or_insert(fr);
            }
        }
        let fr = found.expect("a frozen noisy sensor is stuck");
        assert!(fr.duration >= 60_000 && fr.surprise > 10.0, "{fr:?}");
        // Resting at 0 for ten minutes is fine.
        for i in 720..1320i64 {
            assert!(f.observe(i * 1000, 0.0, false, 30_000, 1.0).is_none());
        }
    }
}
