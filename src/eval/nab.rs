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

    #[test]
    fn an_open_alert_is_not_flagged_again() {
        let s = [0.1, 0.9, 0.95, 0.2, 0.9, 0.1, 0.1, 0.1, 0.99];
        let f = flags_at(&s, 0.9, 3);
        assert_eq!(
            f,
            [false, true, false, false, false, false, false, false, true]
        );
        assert_eq!(flags_at(&s, 0.9, 0).iter().filter(|f| **f).count(), 4);
    }
}

/// One NAB series with its windows as row ranges.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
    pub windows: Vec<(usize, usize)>,
}

/// Why the NAB folder could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NabError {
    #[error("{0}: not the NAB folder (expected data/ and labels/combined_windows.json)")]
    NotNab(std::path::PathBuf),
    #[error("{path}: {message}")]
    Bad {
        path: std::path::PathBuf,
        message: String,
    },
}

fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    let fmt = if s.contains('.') {
        "%Y-%m-%d %H:%M:%S%.f"
    } else {
        "%Y-%m-%d %H:%M:%S"
    };
    chrono::NaiveDateTime::parse_from_str(s, fmt)
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

/// Reads every series named in `labels/combined_windows.json`, in name order.
pub fn load(dir: &std::path::Path) -> Result<Vec<Series>, NabError> {
    use std::collections::BTreeMap;
    let labels = dir.join("labels").join("combined_windows.json");
    let text = std::fs::read_to_string(&labels).map_err(|_| NabError::NotNab(dir.to_path_buf()))?;
    let windows: BTreeMap<String, Vec<(String, String)>> =
        serde_json::from_str(&text).map_err(|e| NabError::Bad {
            path: labels.clone(),
            message: e.to_string(),
        })?;
    let mut out = Vec::with_capacity(windows.len());
    for (name, wins) in windows {
        let path = dir.join("data").join(&name);
        let bad = |message: String| NabError::Bad {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let mut times = Vec::new();
        let mut values = Vec::new();
        for (n, line) in text.lines().enumerate().skip(1) {
            if line.trim().is_empty() {
                continue;
            }
            let (t, v) = line
                .split_once(',')
                .ok_or_else(|| bad(format!("line {}: expected timestamp,value", n + 1)))?;
            times.push(parse_time(t).ok_or_else(|| bad(format!("line {}: bad timestamp", n + 1)))?);
            values.push(
                v.trim()
                    .parse::<f64>()
                    .map_err(|_| bad(format!("line {}: bad value", n + 1)))?,
            );
        }
        let mut rows = Vec::new();
        for (a, b) in &wins {
            let (Some(a), Some(b)) = (parse_time(a), parse_time(b)) else {
                return Err(bad(format!("window {a} .. {b}: bad timestamp")));
            };
            let lo = times.partition_point(|t| *t < a);
            let hi = times.partition_point(|t| *t <= b);
            if hi > lo {
                rows.push((lo, hi - 1));
            }
        }
        out.push(Series {
            name,
            values,
            windows: rows,
        });
    }
    if out.is_empty() {
        return Err(NabError::NotNab(dir.to_path_buf()));
    }
    Ok(out)
}

/// Flags of a threshold: rows scoring at or above it, except those within
/// `cooldown` rows after a flagged one — an open alert is not raised again, as
/// the live pipeline's dedup does.
pub fn flags_at(scores: &[f64], threshold: f64, cooldown: usize) -> Vec<bool> {
    let mut last: Option<usize> = None;
    scores
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if *v < threshold {
                return false;
            }
            let open = last.is_some_and(|l| i - l <= cooldown);
            last = Some(i);
            !open
        })
        .collect()
}

/// The best threshold of a profile over the corpus, and the file scores it gives.
/// `scores` are the detector's per-row anomaly scores (0..1) of each series.
pub fn best_threshold(
    series: &[Series],
    scores: &[Vec<f64>],
    p: &Profile,
    cooldown: usize,
) -> (f64, Vec<FileScore>) {
    let mut all: Vec<f64> = scores
        .iter()
        .flatten()
        .copied()
        .filter(|s| s.is_finite())
        .collect();
    all.sort_by(f64::total_cmp);
    all.dedup();
    // Candidates: up to 400 quantiles of the scores seen, and "never".
    let step = (all.len() / 400).max(1);
    let mut candidates: Vec<f64> = all.iter().step_by(step).copied().collect();
    candidates.push(f64::INFINITY);
    let mut best = (f64::INFINITY, f64::NEG_INFINITY, Vec::new());
    for t in candidates {
        let files: Vec<FileScore> = series
            .iter()
            .zip(scores)
            .map(|(s, sc)| score_file(&flags_at(sc, t, cooldown), &s.windows, p))
            .collect();
        let total: f64 = files.iter().map(|f| f.score).sum();
        if total > best.1 {
            best = (t, total, files);
        }
    }
    (best.0, best.2)
}

/// The published scoreboard (standard, low FP, low FN).
pub const SCOREBOARD: [(&str, f64, f64, f64); 10] = [
    ("ARTime", 74.9, 65.1, 80.4),
    ("Numenta HTM", 70.5, 62.6, 75.2),
    ("CAD OSE", 69.9, 67.0, 73.2),
    ("earthgecko Skyline", 58.2, 46.2, 63.9),
    ("KNN CAD", 58.0, 43.4, 64.8),
    ("Relative Entropy", 54.6, 47.6, 58.8),
    ("Random Cut Forest", 51.7, 38.4, 59.7),
    ("Twitter ADVec", 47.1, 33.6, 53.5),
    ("Windowed Gaussian", 39.6, 20.9, 47.4),
    ("Random", 11.0, 1.2, 19.5),
];

/// Per-row anomaly scores of a series from the live pipeline's per-reading
/// detectors (spike, shift, stuck, range): each row is one reading, one
/// second apart, learning over the probation rows; a row's score is the
/// highest score of what the detectors found in it (0 when nothing).
pub fn detector_scores(series: &Series, cfg: &crate::config::Config) -> Vec<f64> {
    let mut cfg = cfg.clone();
    cfg.alerts.min_score = 0.0;
    cfg.baseline.warmup = (probation(series.values.len()).max(1) as i64) * 1000;
    let mut detectors = crate::detect::Detectors::new(&cfg);
    let mut found = Vec::new();
    series
        .values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            found.clear();
            detectors.observe(0, 0, i as i64 * 1000, true, &[(0, *v)], &mut found);
            found
                .iter()
                .map(|f| crate::score::score_from_surprise(f.surprise))
                .fold(0.0, f64::max)
        })
        .collect()
}

/// Per-row scores of a series from the learned model (`learn::model`) fitted
/// on its probation rows: the smoothed max-z ratio r mapped to r / (1 + r).
pub fn model_scores(series: &Series, smooth: usize) -> Vec<f64> {
    use crate::learn::model::{FitParams, Modes, Scorer};
    let n = probation(series.values.len()).max(2 * smooth.max(10));
    let rows: Vec<Vec<f64>> = series.values.iter().map(|v| vec![*v]).collect();
    let params = FitParams {
        smooth,
        ..FitParams::default()
    };
    let Ok(model) = Modes::fit(&rows[..n.min(rows.len())], &params) else {
        return vec![0.0; rows.len()];
    };
    let mut scorer = Scorer::new(&model);
    rows.iter()
        .map(|r| {
            let x = scorer.score(&model, r).0.max_z;
            x / (1.0 + x)
        })
        .collect()
}
