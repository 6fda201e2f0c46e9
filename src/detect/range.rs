//! Out of range: a value outside the envelope the sensor was learned in.
//!
//! The envelope is the minimum and maximum seen while learning, widened in
//! protection by readings judged normal. A value beyond it by more than a margin
//! — `detect.range.margin` of the envelope's width, and at least 4 noise sigmas —
//! is out of range. The surprise is that of a normal deviate 5 sigmas out plus
//! the excess beyond the margin in sigmas, so it grows with the excess and
//! stays comparable with spikes.

use crate::score::normal_two_sided_surprise;

/// Learned bounds for one (machine, metric).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    pub lo: f64,
    pub hi: f64,
}

impl Default for Envelope {
    fn default() -> Self {
        Envelope {
            // Finite sentinels (not infinities) so the state serializes as JSON.
            lo: f64::MAX,
            hi: f64::MIN,
        }
    }
}

/// A value beyond the envelope and its margin.
#[derive(Debug, Clone, Copy)]
pub struct Outside {
    pub lo: f64,
    pub hi: f64,
    pub margin: f64,
    /// The bound that was crossed.
    pub bound: f64,
    pub surprise: f64,
}

impl Envelope {
    pub fn learn(&mut self, x: f64) {
        self.lo = self.lo.min(x);
        self.hi = self.hi.max(x);
    }

    pub fn known(&self) -> bool {
        self.lo <= self.hi
    }

    /// Checks `x`; `sigma` is the sensor's noise sigma.
    pub fn check(&self, x: f64, sigma: f64, margin_frac: f64) -> Option<Outside> {
        if !self.known() {
            return None;
        }
        let margin = (margin_frac * (self.hi - self.lo)).max(4.0 * sigma);
        let (bound, excess) = if x > self.hi + margin {
            (self.hi, x - self.hi - margin)
        } else if x < self.lo - margin {
            (self.lo, self.lo - margin - x)
        } else {
            return None;
        };
        Some(Outside {
            lo: self.lo,
            hi: self.hi,
            margin,
            bound,
            surprise: normal_two_sided_surprise(5.0 + excess / sigma.max(f64::MIN_POSITIVE)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_and_monotone_surprise() {
        let mut e = Envelope::default();
        assert!(
            e.check(1e9, 1.0, 0.25).is_none(),
            "nothing learned, nothing judged"
        );
        for x in [10.0, 20.0, 15.0] {
            e.learn(x);
        }
        assert!(e.check(22.0, 0.1, 0.25).is_none());
        let a = e.check(23.0, 0.1, 0.25).unwrap();
        let b = e.check(30.0, 0.1, 0.25).unwrap();
        assert_eq!(a.bound, 20.0);
        assert!(b.surprise > a.surprise);
        assert!(e.check(7.0, 0.1, 0.25).is_some_and(|o| o.bound == 10.0));
    }
}
