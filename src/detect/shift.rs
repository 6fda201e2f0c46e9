//! Shift: a level that moved and stayed, or creeps — two-sided CUSUM.
//!
//! The reference is a slow exponential average of the sensor (time constant
//! `baseline.reference_tau`); the statistic accumulates standardized
//! deviations from it beyond a slack of `detect.shift.slack` sigmas (Page's
//! CUSUM). A slow drift that the short-term predictor follows, and that never
//! looks like a spike, still separates from the slow reference and accumulates
//! here. The sigma is the sensor's usual deviation from its reference in steady
//! operation, never less than its one-step noise.
//!
//! Each standardized deviation is clipped at `slack + 3` before it accumulates,
//! so a short spike (the spike detector's business) cannot cross the decision
//! interval on its own; only a deviation that persists can.
//!
//! Surprise: a shift is reported once the statistic C reaches the decision
//! interval h (`detect.shift.threshold`), where h sets the false-alarm rate (the
//! run length to a false alarm grows as exp(2kh)). Its surprise is that of the
//! lowest alerting score at C = h and grows in proportion to C/h, so a drift
//! that keeps going escalates.
//!
//! After a mode change the reference is re-anchored on the settled level
//! (see [`super::mode`]), since the old level is no longer the right reference.

use crate::time::Millis;

const MAD_TO_SIGMA: f64 = 1.253_314_137_315_5;
/// Steady readings needed before the learned deviation replaces the fallback.
const MIN_DEVIATIONS: u32 = 60;

/// Reference level and CUSUM accumulators for one (machine, metric).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Drift {
    pub reference: f64,
    /// Mean absolute deviation from the reference in steady operation.
    pub abs_deviation: f64,
    pub deviations: u32,
    pub up: f64,
    pub down: f64,
    /// When the current accumulation started (for explanations).
    pub since: Millis,
    pub anchored: bool,
}

/// A CUSUM reading: the statistic, its direction and when it started.
#[derive(Debug, Clone, Copy)]
pub struct Cusum {
    pub statistic: f64,
    pub upward: bool,
    pub since: Millis,
    pub reference: f64,
    pub sigma: f64,
}

impl Drift {
    /// The sigma deviations are measured in.
    pub fn sigma(&self, noise_sigma: f64) -> f64 {
        if self.deviations < MIN_DEVIATIONS {
            return 2.0 * noise_sigma;
        }
        (self.abs_deviation * MAD_TO_SIGMA).max(noise_sigma)
    }

    /// Starts afresh from `level` (first reading, or a settled mode change).
    pub fn anchor(&mut self, level: f64, ts: Millis) {
        self.reference = level;
        self.up = 0.0;
        self.down = 0.0;
        self.since = ts;
        self.anchored = true;
    }

    /// What the statistic would be after `x` (without committing it).
    pub fn peek(&self, ts: Millis, x: f64, noise_sigma: f64, slack: f64) -> Cusum {
        let sigma = self.sigma(noise_sigma);
        let u = ((x - self.reference) / sigma).clamp(-slack - 3.0, slack + 3.0);
        let up = (self.up + u - slack).max(0.0);
        let down = (self.down - u - slack).max(0.0);
        let upward = up >= down;
        let since = if (upward && self.up == 0.0) || (!upward && self.down == 0.0) {
            ts
        } else {
            self.since
        };
        Cusum {
            statistic: up.max(down),
            upward,
            since,
            reference: self.reference,
            sigma,
        }
    }

    /// -log10 of the tail probability of a statistic; zero below the decision interval.
    pub fn surprise(statistic: f64, threshold: f64) -> f64 {
        if statistic < threshold {
            return 0.0;
        }
        crate::score::surprise_from_score(0.7) * statistic / threshold
    }

    /// Commits `x`: accumulates, then lets the reference follow slowly;
    /// `kept` is what the old reference keeps, `exp(-dt / tau)` for the gap
    /// since the last reading. Only readings judged normal in steady operation
    /// come here, so the deviation estimate learns from them too.
    pub fn update(&mut self, ts: Millis, x: f64, kept: f64, noise_sigma: f64, slack: f64) {
        let c = self.peek(ts, x, noise_sigma, slack);
        let sigma = c.sigma;
        let u = ((x - self.reference) / sigma).clamp(-slack - 3.0, slack + 3.0);
        let was_zero = self.up == 0.0 && self.down == 0.0;
        self.up = (self.up + u - slack).max(0.0);
        self.down = (self.down - u - slack).max(0.0);
        if was_zero {
            self.since = ts;
        }
        let a = 1.0 - kept;
        let dev = (x - self.reference).abs().min(4.0 * sigma);
        let w = a.max(1.0 / (self.deviations as f64 + 1.0));
        self.abs_deviation += w * (dev - self.abs_deviation);
        self.deviations = self.deviations.saturating_add(1);
        self.reference += a * (x - self.reference);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reference with a 600 s time constant keeps after 1 s.
    fn kept() -> f64 {
        (-1.0f64 / 600.0).exp()
    }

    #[test]
    fn a_slow_drift_accumulates_and_noise_does_not() {
        let mut d = Drift::default();
        d.anchor(50.0, 0);
        let mut worst_noise: f64 = 0.0;
        for i in 1..1800i64 {
            let x = 50.0 + if i % 2 == 0 { 0.2 } else { -0.2 };
            let c = d.peek(i * 1000, x, 0.2, 2.0);
            worst_noise = worst_noise.max(c.statistic);
            d.update(i * 1000, x, kept(), 0.2, 2.0);
        }
        assert!(worst_noise < 1.0, "{worst_noise}");
        assert_eq!(Drift::surprise(worst_noise, 20.0), 0.0);
        let mut hit = None;
        for i in 0..600i64 {
            let x = 50.0 + 0.02 * i as f64;
            let c = d.peek((1800 + i) * 1000, x, 0.2, 2.0);
            if c.statistic > 20.0 && hit.is_none() {
                hit = Some(i);
                assert!(c.upward);
            }
            d.update((1800 + i) * 1000, x, kept(), 0.2, 2.0);
        }
        let hit = hit.expect("a drift of 12 units over 10 minutes must be found");
        assert!(hit < 300, "found after {hit} s");
    }

    #[test]
    fn a_short_spike_does_not_cross_the_interval() {
        let mut d = Drift::default();
        d.anchor(0.0, 0);
        for i in 1..120i64 {
            d.update(i * 1000, 0.0, kept(), 1.0, 2.0);
        }
        for i in 120..124i64 {
            let c = d.peek(i * 1000, 50.0, 1.0, 2.0);
            assert!(c.statistic < 20.0);
            d.update(i * 1000, 50.0, kept(), 1.0, 2.0);
        }
        assert!(Drift::surprise(40.0, 20.0) > Drift::surprise(20.0, 20.0));
    }
}
