//! NAB scoring (Numenta Anomaly Benchmark), as NAB defines it.
//!
//! Each labelled anomaly of a series is a *window* of rows. A detector flags
//! rows; per file, the first [`probation`] rows are not scored. Inside a
//! window only the earliest flag counts, rewarded by the scaled sigmoid of
//! its relative position (−1 at the window's first row, approaching 0 at its
//! last), divided by the sigmoid at −1 so the earliest possible detection earns
//! exactly the profile's true-positive weight; a window never flagged costs
//! the false-negative weight. A flag outside every window costs the
//! false-positive weight times the sigmoid of its distance past the previous
//! window (in window widths), or the whole weight before the first window.
//! Normalised: 100 × (S − S_null) / (S_perfect − S_null), with S_null the
//! score of a detector that flags nothing and S_perfect that of one that
//! flags every window's first row and nothing else.

/// Weights of a scoring profile (NAB's `config/profiles.json`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    pub tp: f64,
    pub fp: f64,
    pub fn_: f64,
}

impl Profile {
    pub const STANDARD: Profile = Profile {
        tp: 1.0,
        fp: 0.11,
        fn_: 1.0,
    };
    pub const LOW_FP: Profile = Profile {
        tp: 1.0,
        fp: 0.22,
        fn_: 1.0,
    };
    pub const LOW_FN: Profile = Profile {
        tp: 1.0,
        fp: 0.11,
        fn_: 2.0,
    };
}

/// NAB's scaled sigmoid: 2 / (1 + e^(5y)) − 1, and −1 beyond y = 3.
pub fn scaled_sigmoid(y: f64) -> f64 {
    if y > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * y).exp()) - 1.0
    }
}

/// Rows of a file of `n` rows that are probation: min(⌊0.15 n⌋, 750).
pub fn probation(n: usize) -> usize {
    ((0.15 * n as f64).floor() as usize).min(750)
}

/// What one file scored.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FileScore {
    pub score: f64,
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
    /// Windows scored (the null and perfect scores follow from it).
    pub windows: usize,
}

/// Scores one file: `flags` per row, `windows` as inclusive row ranges, sorted.
pub fn score_file(flags: &[bool], windows: &[(usize, usize)], p: &Profile) -> FileScore {
    let skip = probation(flags.len());
    let max_tp = scaled_sigmoid(-1.0);
    let mut out = FileScore {
        windows: windows.len(),
        ..FileScore::default()
    };
    let mut detected = vec![false; windows.len()];
    let mut w = 0; // the first window not yet passed
    let mut prev: Option<(usize, usize)> = None;
    for (i, &flag) in flags.iter().enumerate() {
        while w < windows.len() && i > windows[w].1 {
            prev = Some(windows[w]);
            w += 1;
        }
        if !flag || i < skip {
            continue;
        }
        match windows.get(w) {
            Some(&(lo, hi)) if i >= lo => {
                if !detected[w] {
                    detected[w] = true;
                    let width = (hi - lo + 1) as f64;
                    let y = -((hi - i + 1) as f64) / width;
                    out.score += p.tp * scaled_sigmoid(y) / max_tp;
                    out.tp += 1;
                }
            }
            _ => {
                out.fp += 1;
                out.score += p.fp
                    * match prev {
                        None => -1.0,
                        Some((lo, hi)) => {
                            let width = (hi - lo + 1) as f64;
                            scaled_sigmoid((i - hi) as f64 / (width - 1.0).max(1.0))
                        }
                    };
            }
        }
    }
    for d in detected {
        if !d {
            out.fn_ += 1;
            out.score -= p.fn_;
        }
    }
    out
}

/// The normalised corpus score of summed file scores.
pub fn normalised(files: &[FileScore], p: &Profile) -> f64 {
    let raw: f64 = files.iter().map(|f| f.score).sum();
    let windows: usize = files.iter().map(|f| f.windows).sum();
    let null = -p.fn_ * windows as f64;
    let perfect = p.tp * windows as f64;
    if perfect == null {
        return 0.0;
    }
    100.0 * (raw - null) / (perfect - null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(n: usize, at: &[usize]) -> Vec<bool> {
        (0..n).map(|i| at.contains(&i)).collect()
    }

    #[test]
    fn one_window_with_known_scores() {
        // 100 rows (probation 15), one window over rows 50..=59.
        let w = [(50, 59)];
        let p = Profile::STANDARD;
        assert_eq!(probation(100), 15);
        // Earliest detection: exactly the true-positive weight.
        let s = score_file(&flags(100, &[50]), &w, &p);
        assert!((s.score - 1.0).abs() < 1e-12, "{s:?}");
        // Half-way: sigmoid(-0.5) / sigmoid(-1) = 0.848283 / 0.986614.
        let s = score_file(&flags(100, &[55, 56]), &w, &p);
        assert!(
            (s.score - 0.848_283_64 / 0.986_614_30).abs() < 1e-6,
            "{s:?}"
        );
        assert_eq!(
            (s.tp, s.fp),
            (1, 0),
            "only the first flag in a window counts"
        );
        // Missed: minus the false-negative weight.
        let s = score_file(&flags(100, &[]), &w, &p);
        assert_eq!(s.score, -1.0);
        // A flag before any window costs the whole false-positive weight; one
        // 11 rows past the window's end, 11/9 widths: 0.11 * sigmoid(1.222).
        let s = score_file(&flags(100, &[20, 50, 70]), &w, &p);
        let past = 0.11 * (2.0 / (1.0 + (5.0f64 * 11.0 / 9.0).exp()) - 1.0);
        assert!((s.score - (1.0 - 0.11 + past)).abs() < 1e-9, "{s:?}");
        assert_eq!((s.tp, s.fp, s.fn_), (1, 2, 0));
        // Flags in probation are not scored.
        assert_eq!(score_file(&flags(100, &[3, 50]), &w, &p).score, 1.0);
        // Normalisation: null 0, perfect 100.
        let perfect = score_file(&flags(100, &[50]), &w, &p);
        let null = score_file(&flags(100, &[]), &w, &p);
        assert!((normalised(&[perfect], &p) - 100.0).abs() < 1e-9);
        assert_eq!(normalised(&[null], &p), 0.0);
        assert_eq!(scaled_sigmoid(3.5), -1.0);
    }
}
