//! Scoring: every detector states how surprising its observation is as a tail
//! probability `p` (the chance of seeing something at least this extreme if the
//! baseline were right). Scores and severities are derived from `p` here, in one
//! place, so a `score` of 0.9 means the same thing for a spike, a drift or a
//! frozen sensor.
//!
//! We carry `surprise = -log10(p)` rather than `p` itself: tails of 1e-40 are
//! common for blatant attacks and would underflow as plain probabilities.
//! `score = 1 - exp(-surprise / SCORE_SCALE)` is monotone in the surprise and
//! maps the contract's example (8.1 sigma, p ≈ 5e-16) to 0.97.

use serde::{Deserialize, Serialize};

/// Surprise (in decades of probability) at which the score reaches 1 - 1/e ≈ 0.63.
pub const SCORE_SCALE: f64 = 4.5;

/// Alert severity, ordered from least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// The lowercase name used in subjects and payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// Severity from a score alone: the thresholds of the README's alert section.
    pub fn from_score(score: f64) -> Severity {
        if score >= 0.99 {
            Severity::Critical
        } else if score >= 0.95 {
            Severity::High
        } else if score >= 0.85 {
            Severity::Medium
        } else if score >= 0.7 {
            Severity::Low
        } else {
            Severity::Info
        }
    }
}

impl std::str::FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "info" => Ok(Severity::Info),
            "low" => Ok(Severity::Low),
            "medium" => Ok(Severity::Medium),
            "high" => Ok(Severity::High),
            "critical" => Ok(Severity::Critical),
            other => Err(format!(
                "unknown severity `{other}` (info, low, medium, high, critical)"
            )),
        }
    }
}

/// Maps a surprise (-log10 p) to a score in 0..1.
pub fn score_from_surprise(surprise: f64) -> f64 {
    if !surprise.is_finite() {
        return if surprise > 0.0 { 1.0 } else { 0.0 };
    }
    (1.0 - (-surprise.max(0.0) / SCORE_SCALE).exp()).clamp(0.0, 1.0)
}

/// The surprise a score stands for (inverse of [`score_from_surprise`]).
pub fn surprise_from_score(score: f64) -> f64 {
    let s = score.clamp(0.0, 1.0 - 1e-15);
    -SCORE_SCALE * (1.0 - s).ln()
}

/// The surprise of a count or size `ratio` times its alerting threshold: score
/// 0.85 (`medium`) at the threshold, +10 (about one severity band) per decade
/// above it. Used where no distribution is learned well enough for a tail
/// probability (rates, volumes, fan-out, silences).
pub fn ratio_surprise(ratio: f64) -> f64 {
    surprise_from_score(0.85) + 10.0 * ratio.max(1.0).log10()
}

/// -log10 of the two-sided normal tail probability P(|Z| >= z).
///
/// Computed in log space from the Chebyshev fit of erfc (Numerical Recipes'
/// `erfcc`, fractional error below 1.2e-7 everywhere), so it stays exact far into
/// the tail where `p` itself would underflow.
pub fn normal_two_sided_surprise(z: f64) -> f64 {
    if !z.is_finite() {
        return if z.is_nan() { 0.0 } else { f64::INFINITY };
    }
    let x = z.abs() / std::f64::consts::SQRT_2;
    -ln_erfc(x) / std::f64::consts::LN_10
}

/// ln(erfc(x)) for x >= 0.
fn ln_erfc(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * x);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t.ln() - x * x + poly
}

/// The |z| whose two-sided normal tail has the given surprise (bisection; used
/// to turn a score threshold into a z threshold for explanations and tests).
pub fn z_for_surprise(surprise: f64) -> f64 {
    let (mut lo, mut hi) = (0.0_f64, 60.0_f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if normal_two_sided_surprise(mid) < surprise {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The |z| below which [`normal_two_sided_surprise`] stays under `surprise`
/// (0 when any z may reach it), so a caller can skip the tail for ordinary
/// readings. It lies 0.01 below the crossing — the surprise rises by more
/// than 0.004 over that step anywhere past z = 1, against the fit's error of
/// 1.2e-7 — so no z whose surprise reaches `surprise` falls under it.
pub fn z_floor_for_surprise(surprise: f64) -> f64 {
    if !(surprise > 0.0 && surprise.is_finite()) {
        return 0.0;
    }
    (z_for_surprise(surprise) - 0.01).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under the floor no z reaches the surprise (checked on a fine grid for
    /// the scores an operator may set), and the tail rises all the way.
    #[test]
    fn no_z_under_the_floor_reaches_the_surprise() {
        let mut last = -1.0;
        for i in 0..=600_000 {
            let z = i as f64 * 1e-4;
            let s = normal_two_sided_surprise(z);
            assert!(s >= last, "the tail falls at z = {z}");
            last = s;
        }
        for score in [0.0, 0.01, 0.3, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999_999] {
            let bar = surprise_from_score(score);
            let floor = z_floor_for_surprise(bar);
            let mut z = 0.0;
            while z < floor {
                assert!(normal_two_sided_surprise(z) < bar, "score {score}, z {z}");
                assert!(normal_two_sided_surprise(-z) < bar, "score {score}, z -{z}");
                z += 1e-4;
            }
            // And it is close: just past the crossing the bar is met.
            if bar > 0.0 {
                assert!(
                    normal_two_sided_surprise(floor + 0.02) >= bar,
                    "score {score}"
                );
            }
        }
        assert_eq!(z_floor_for_surprise(0.0), 0.0);
        assert_eq!(z_floor_for_surprise(f64::INFINITY), 0.0);
        assert_eq!(z_floor_for_surprise(f64::NAN), 0.0);
    }

    #[test]
    fn normal_tail_matches_known_values() {
        // P(|Z| >= 1.96) = 0.05, P(|Z| >= 3) = 0.0027, P(|Z| >= 6) = 1.97e-9
        assert!((normal_two_sided_surprise(1.96) - (-(0.05f64).log10())).abs() < 1e-3);
        assert!((normal_two_sided_surprise(3.0) - (-(0.0026998f64).log10())).abs() < 1e-3);
        assert!((normal_two_sided_surprise(6.0) - (-(1.973e-9f64).log10())).abs() < 1e-3);
        assert!(normal_two_sided_surprise(40.0) > 300.0);
        assert!(normal_two_sided_surprise(0.0).abs() < 1e-6);
    }

    #[test]
    fn score_is_monotone_and_bounded() {
        let mut last = -1.0;
        for i in 0..200 {
            let z = i as f64 * 0.25;
            let s = score_from_surprise(normal_two_sided_surprise(z));
            assert!((0.0..=1.0).contains(&s));
            assert!(s >= last, "score must not fall as z grows");
            last = s;
        }
        assert_eq!(score_from_surprise(f64::INFINITY), 1.0);
    }

    #[test]
    fn contract_example_is_high() {
        let s = score_from_surprise(normal_two_sided_surprise(8.1));
        assert!((s - 0.97).abs() < 0.01, "{s}");
        assert_eq!(Severity::from_score(s), Severity::High);
    }

    #[test]
    fn inverse_functions() {
        let s = surprise_from_score(0.7);
        assert!((score_from_surprise(s) - 0.7).abs() < 1e-9);
        let z = z_for_surprise(6.0);
        assert!((normal_two_sided_surprise(z) - 6.0).abs() < 1e-6);
    }
}
