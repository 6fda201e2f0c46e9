//! Spike: how far a reading lands from its one-step prediction.
//!
//! The prediction is Holt's linear smoothing (a level and a trend), with
//! smoothing weights derived from time constants and the actual gap between
//! readings, so irregular sampling is handled in event time. The trend matters:
//! a temperature climbing steadily after a load change would otherwise lag a
//! plain moving average by several sigmas and look like a spike.
//!
//! Why this rather than a windowed median/MAD: it is O(1) in time and memory per
//! (machine, metric) with no buffer, it follows trends, and it becomes robust by
//! winsorizing — residuals are clipped at 4 sigma before they update the level,
//! trend and scale — so a burst of bad values moves the baseline by a bounded
//! amount, and values judged anomalous do not update it at all (the caller's
//! rule). The scale is the mean absolute residual times sqrt(pi/2), the sigma of a
//! normal with that mean absolute deviation, which one outlier cannot blow up the
//! way it does a variance.

use crate::time::Millis;

/// E|Z| for a standard normal is sqrt(2/pi); this turns a mean absolute residual into a sigma.
const MAD_TO_SIGMA: f64 = 1.253_314_137_315_5;
/// Residuals are clipped at this many sigmas before they update anything.
const CLIP_Z: f64 = 4.0;
/// Readings before the baseline is trusted enough to compute z at all.
pub const MIN_SAMPLES: u32 = 10;

/// Time constants (seconds) of the predictor, as decays.
#[derive(Debug, Clone)]
pub struct Taus {
    level: Decay,
    trend: Decay,
    /// The trend's while following a mode change (a sixth of its time constant).
    follow: Decay,
    scale: Decay,
}

impl Taus {
    pub fn new(level: f64, trend: f64, scale: f64) -> Self {
        Taus {
            level: Decay::new(level),
            trend: Decay::new(trend),
            follow: Decay::new(trend / 6.0),
            scale: Decay::new(scale),
        }
    }

    /// The trend's time constant, seconds.
    pub fn trend(&self) -> f64 {
        self.trend.tau
    }
}

/// `exp(-dt / tau)` for one time constant, remembering the last `dt` asked.
///
/// Readings at a steady rate ask with the same gap again and again, and the
/// four `exp` calls of each reading were a tenth of the ingest loop's
/// instructions (callgrind over the `pipeline` group of `benches/rooms.rs`).
/// A remembered answer is the very value `exp` gave for that gap, so the
/// baselines, and the alerts, are bit for bit what they were without it.
#[derive(Debug, Clone)]
pub struct Decay {
    tau: f64,
    /// (dt, exp(-dt / tau)) of the last call; NaN at first, equal to no dt.
    last: std::cell::Cell<(f64, f64)>,
}

impl Decay {
    pub fn new(tau: f64) -> Self {
        Decay {
            tau,
            last: std::cell::Cell::new((f64::NAN, f64::NAN)),
        }
    }

    /// The time constant, seconds.
    pub fn tau(&self) -> f64 {
        self.tau
    }

    /// The fraction of an old estimate left after `dt` seconds.
    pub fn after(&self, dt: f64) -> f64 {
        let (at, kept) = self.last.get();
        if at == dt {
            return kept;
        }
        let kept = (-dt / self.tau).exp();
        self.last.set((dt, kept));
        kept
    }
}

/// Holt level + trend with a robust residual scale.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Predictor {
    /// Readings absorbed.
    pub n: u32,
    /// Event time of the last absorbed reading.
    pub last_ts: Millis,
    /// The last absorbed value.
    pub last_value: f64,
    pub level: f64,
    /// Units per second.
    pub trend: f64,
    /// Mean absolute one-step residual.
    pub abs_residual: f64,
    /// Smallest non-zero step seen between consecutive values (sensor resolution).
    pub quantum: f64,
}

/// The weight of a new reading, `kept` being what the old estimate keeps.
fn weight(kept: f64, n: u32) -> f64 {
    // The 1/(n+1) floor makes the first readings a running mean, so a fresh
    // baseline is usable after a handful of readings instead of after tau.
    (1.0 - kept).max(1.0 / (n as f64 + 1.0))
}

impl Predictor {
    /// Seconds since the last reading, clamped to what a prediction may extrapolate.
    fn dt(&self, ts: Millis, taus: &Taus) -> f64 {
        ((ts - self.last_ts) as f64 / 1000.0).clamp(0.001, taus.trend())
    }

    /// The expected value at `ts`.
    pub fn predict(&self, ts: Millis, taus: &Taus) -> f64 {
        if self.n < 2 {
            return self.level;
        }
        self.level + self.trend * self.dt(ts, taus)
    }

    /// The sigma of a one-step residual, floored by the sensor's resolution.
    pub fn sigma(&self) -> f64 {
        let floor = (0.5 * self.quantum).max(1e-9 * self.level.abs().max(1.0));
        (self.abs_residual * MAD_TO_SIGMA).max(floor)
    }

    /// Whether enough readings were absorbed for z to mean something.
    pub fn ready(&self) -> bool {
        self.n >= MIN_SAMPLES
    }

    /// The standardized residual of `x` at `ts` (0 until ready).
    pub fn z(&self, ts: Millis, x: f64, taus: &Taus) -> f64 {
        if !self.ready() {
            return 0.0;
        }
        (x - self.predict(ts, taus)) / self.sigma()
    }

    /// Absorbs a reading. With `follow`, the machine is changing mode: the level
    /// jumps to the reading, the trend is re-estimated from the jump, and the
    /// scale is left alone so the transition does not inflate it.
    pub fn update(&mut self, ts: Millis, x: f64, taus: &Taus, follow: bool) {
        if self.n == 0 {
            *self = Predictor {
                n: 1,
                last_ts: ts,
                last_value: x,
                level: x,
                ..Predictor::default()
            };
            return;
        }
        let dt = self.dt(ts, taus);
        let step = (x - self.last_value).abs();
        if step > 0.0 && (self.quantum == 0.0 || step < self.quantum) {
            self.quantum = step;
        }
        let pred = self.predict(ts, taus);
        let sigma = self.sigma();
        let mut r = x - pred;
        if self.ready() {
            r = r.clamp(-CLIP_Z * sigma, CLIP_Z * sigma);
        }
        let old_level = self.level;
        // While following a mode change the trend must forget the ramp within
        // seconds, or it would extrapolate the ramp once the machine settles.
        let b = weight(
            if follow {
                taus.follow.after(dt)
            } else {
                taus.trend.after(dt)
            },
            self.n,
        );
        if follow {
            self.level = x;
        } else {
            let a = weight(taus.level.after(dt), self.n);
            self.level = pred + a * r;
            let s = weight(taus.scale.after(dt), self.n);
            self.abs_residual += s * (r.abs() - self.abs_residual);
        }
        if self.n >= 2 || follow {
            self.trend += b * ((self.level - old_level) / dt - self.trend);
        }
        self.n = self.n.saturating_add(1);
        self.last_ts = ts;
        self.last_value = x;
    }
}

impl Predictor {
    /// Steps over a reading judged anomalous without learning from it: the
    /// level moves to its prediction and the trend fades, so a long anomaly
    /// neither teaches the baseline nor lets an old trend run away.
    pub fn skip(&mut self, ts: Millis, taus: &Taus) {
        if self.n < 2 || ts <= self.last_ts {
            return;
        }
        let dt = self.dt(ts, taus);
        self.level = self.predict(ts, taus);
        self.trend *= taus.level.after(dt);
        self.last_ts = ts;
    }

    /// Starts the level afresh at `x` with no trend, keeping the learned scale.
    pub fn rebase(&mut self, ts: Millis, x: f64) {
        self.level = x;
        self.trend = 0.0;
        self.last_ts = ts;
        self.last_value = x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taus() -> Taus {
        Taus::new(10.0, 60.0, 300.0)
    }

    fn noise(i: u64) -> f64 {
        // Deterministic pseudo-noise in [-1, 1).
        let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ 0xD1B5_4A32_D192_ED03;
        (h >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    #[test]
    fn tracks_a_ramp_without_lag() {
        let t = taus();
        let mut p = Predictor::default();
        for i in 0..1200u64 {
            let x = 20.0 + 0.1 * i as f64 + 0.2 * noise(i);
            p.update(i as i64 * 1000, x, &t, false);
        }
        let x = 20.0 + 0.1 * 1200.0;
        let z = p.z(1_200_000, x, &t);
        assert!(
            z.abs() < 2.0,
            "a steady ramp must not look like a spike (z = {z})"
        );
        assert!((p.trend - 0.1).abs() < 0.01, "trend {}", p.trend);
    }

    #[test]
    fn spike_is_many_sigmas() {
        let t = taus();
        let mut p = Predictor::default();
        for i in 0..600u64 {
            p.update(i as i64 * 1000, 50.0 + 0.5 * noise(i), &t, false);
        }
        assert!(p.z(600_000, 60.0, &t) > 20.0);
        assert!(p.z(600_000, 50.2, &t).abs() < 2.0);
    }

    #[test]
    fn outliers_move_the_baseline_a_bounded_amount() {
        let t = taus();
        let mut p = Predictor::default();
        for i in 0..600u64 {
            p.update(i as i64 * 1000, 10.0 + noise(i), &t, false);
        }
        let sigma = p.sigma();
        let level = p.level;
        p.update(600_000, 1e9, &t, false);
        assert!((p.level - level).abs() <= CLIP_Z * sigma);
        assert!(p.sigma() < 2.0 * sigma);
    }

    /// The remembered decay is the one exp gives, whatever gap comes in
    /// whatever order, repeated or not (the alerts depend on these bits).
    #[test]
    fn a_remembered_decay_is_what_exp_gives() {
        let d = Decay::new(600.0);
        for dt in [1.0, 1.0, 0.5, 0.0, -0.0, 1.0, 1e-3, 1e-3, 3600.0, 1.0] {
            assert_eq!(
                d.after(dt).to_bits(),
                (-dt / 600.0f64).exp().to_bits(),
                "dt {dt}"
            );
        }
        // A predictor fed through the memo ends where one fed by fresh
        // decays ends: a long run with irregular gaps, some repeated.
        let a = taus();
        let (mut p, mut q) = (Predictor::default(), Predictor::default());
        let mut ts = 0;
        for i in 0..2000u64 {
            ts += [1000, 1000, 1000, 250, 2000][(i % 5) as usize];
            let x = 20.0 + 0.01 * i as f64 + noise(i);
            p.update(ts, x, &a, i % 97 == 0);
            // New time constants each time: nothing remembered, a fresh exp.
            let fresh = taus();
            q.update(ts, x, &fresh, i % 97 == 0);
        }
        assert_eq!(
            (
                p.level.to_bits(),
                p.trend.to_bits(),
                p.abs_residual.to_bits()
            ),
            (
                q.level.to_bits(),
                q.trend.to_bits(),
                q.abs_residual.to_bits()
            )
        );
    }
}
