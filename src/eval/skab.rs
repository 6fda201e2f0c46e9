//! The SKAB protocol (Skoltech Anomaly Benchmark): reading its runs and
//! scoring a detector on them as the published leaderboard does.
//!
//! Each labelled run is a `;`-separated CSV at 1 Hz: `datetime`, eight
//! sensor columns, `anomaly`, `changepoint`. For each of the 34 runs
//! (`valve1/`, `valve2/`, `other/`; `anomaly-free/` is not part of the
//! protocol) the first [`TRAIN_ROWS`] rows are the training part and the rest
//! the test part; predictions over all test rows are summed into one
//! [`Confusion`].

use std::path::{Path, PathBuf};

use super::metrics::Confusion;

/// Rows of each run that are the training part.
pub const TRAIN_ROWS: usize = 400;

/// The folders holding the protocol's labelled runs.
const FOLDERS: [&str; 3] = ["valve1", "valve2", "other"];

/// One labelled run.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Path relative to the data folder, e.g. `valve1/0.csv`.
    pub name: String,
    /// Sensor column names, in file order.
    pub columns: Vec<String>,
    /// One row of sensor values per second.
    pub rows: Vec<Vec<f64>>,
    /// The `anomaly` label of each row.
    pub anomaly: Vec<bool>,
}

/// Why a SKAB folder could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SkabError {
    #[error(
        "{0}: no SKAB runs here (expected valve1/, valve2/ and other/ with CSV files, directly or under data/)"
    )]
    NotSkab(PathBuf),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// The runs of the protocol under `dir` (the SKAB `data/` folder or its parent),
/// in a stable order.
pub fn load(dir: &Path) -> Result<Vec<Run>, SkabError> {
    let base = if dir.join("valve1").is_dir() {
        dir.to_path_buf()
    } else if dir.join("data").join("valve1").is_dir() {
        dir.join("data")
    } else {
        return Err(SkabError::NotSkab(dir.to_path_buf()));
    };
    let mut runs = Vec::new();
    for folder in FOLDERS {
        let path = base.join(folder);
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "csv"))
            .collect();
        // valve1/2.csv before valve1/10.csv: by number where the stem is one.
        files.sort_by_key(|p| {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            (stem.parse::<u64>().unwrap_or(u64::MAX), stem.to_string())
        });
        for f in files {
            let name = format!(
                "{folder}/{}",
                f.file_name().unwrap_or_default().to_string_lossy()
            );
            runs.push(read_run(&f, name)?);
        }
    }
    if runs.is_empty() {
        return Err(SkabError::NotSkab(dir.to_path_buf()));
    }
    Ok(runs)
}

/// Reads one run.
pub fn read_run(path: &Path, name: String) -> Result<Run, SkabError> {
    let text = std::fs::read_to_string(path).map_err(|source| SkabError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_run(&text, path, name)
}

fn parse_run(text: &str, path: &Path, name: String) -> Result<Run, SkabError> {
    let bad = |line: usize, message: String| SkabError::Parse {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| bad(1, "empty file".into()))?
        .split(';')
        .map(str::trim)
        .collect();
    let anomaly_col = header
        .iter()
        .position(|h| *h == "anomaly")
        .ok_or_else(|| bad(1, "no `anomaly` column".into()))?;
    // Sensor columns: everything but the time and the two label columns.
    let sensors: Vec<usize> = (0..header.len())
        .filter(|&i| !matches!(header[i], "datetime" | "anomaly" | "changepoint"))
        .collect();
    let mut rows = Vec::new();
    let mut anomaly = Vec::new();
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(';').map(str::trim).collect();
        if fields.len() != header.len() {
            return Err(bad(
                n + 2,
                format!("{} fields, the header has {}", fields.len(), header.len()),
            ));
        }
        let num = |i: usize| {
            fields[i]
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(n + 2, format!("`{}` is not a number", fields[i])))
        };
        rows.push(
            sensors
                .iter()
                .map(|&i| num(i))
                .collect::<Result<Vec<f64>, _>>()?,
        );
        anomaly.push(num(anomaly_col)? != 0.0);
    }
    Ok(Run {
        name,
        columns: sensors.iter().map(|&i| header[i].to_string()).collect(),
        rows,
        anomaly,
    })
}

/// Runs the protocol: `detect` gets each run's training rows and all its rows
/// and returns one prediction per row; the test rows are scored.
pub fn evaluate(
    runs: &[Run],
    mut detect: impl FnMut(&Run) -> Vec<bool>,
) -> (Confusion, Vec<(String, Confusion)>) {
    let mut total = Confusion::default();
    let mut per_run = Vec::with_capacity(runs.len());
    for run in runs {
        let predicted = detect(run);
        let mut c = Confusion::default();
        for i in TRAIN_ROWS.min(run.rows.len())..run.rows.len() {
            c.add(predicted.get(i).copied().unwrap_or(false), run.anomaly[i]);
        }
        total.merge(&c);
        per_run.push((run.name.clone(), c));
    }
    (total, per_run)
}

/// How the learned model alarms on a run: fitted on its training rows, it
/// scores every row in order and alarms where a smoothed statistic exceeds
/// its limit by the given factor.
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    pub fit: crate::learn::model::FitParams,
    /// Alarm above this multiple of the largest smoothed training value of max-z, T², Q.
    pub z_factor: f64,
    pub t2_factor: f64,
    pub q_factor: f64,
}

impl Default for Detector {
    fn default() -> Self {
        Detector {
            fit: crate::learn::model::FitParams::default(),
            z_factor: 1.2,
            t2_factor: 3.0,
            q_factor: 8.0,
        }
    }
}

impl Detector {
    /// One prediction per row of `run` (the training rows included, unscored).
    pub fn predict(&self, run: &Run) -> Result<Vec<bool>, crate::learn::model::FitError> {
        use crate::learn::model::{Modes, Scorer};
        let train = &run.rows[..TRAIN_ROWS.min(run.rows.len())];
        let model = Modes::fit(train, &self.fit)?;
        let mut scorer = Scorer::new(&model);
        Ok(run
            .rows
            .iter()
            .map(|r| {
                let (x, _, _) = scorer.score(&model, r);
                x.max_z > self.z_factor || x.t2 > self.t2_factor || x.q > self.q_factor
            })
            .collect())
    }
}

/// The published leaderboard (SKAB README, outlier detection): name, F1, FAR %, MAR %.
pub const LEADERBOARD: [(&str, f64, f64, f64); 10] = [
    ("Conv-AE", 0.78, 13.55, 28.02),
    ("MSET", 0.78, 39.73, 14.13),
    ("T-squared+Q (PCA-based)", 0.76, 26.62, 24.92),
    ("LSTM-AE", 0.74, 29.96, 25.92),
    ("T-squared", 0.66, 19.21, 42.6),
    ("LSTM-VAE", 0.56, 9.13, 55.03),
    ("Vanilla LSTM", 0.54, 12.54, 59.53),
    ("MSCRED", 0.36, 49.94, 69.88),
    ("Vanilla AE", 0.39, 2.59, 75.15),
    ("Isolation forest", 0.29, 2.56, 82.89),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_parses_and_the_protocol_scores_test_rows_only() {
        let mut text = String::from("datetime;A;B;anomaly;changepoint\n");
        for i in 0..410 {
            let a = if i >= 405 { 1 } else { 0 };
            text.push_str(&format!(
                "2020-03-09 10:14:{:02};{i}.5;1e-3;{a}.0;0.0\n",
                i % 60
            ));
        }
        let run = parse_run(&text, Path::new("x.csv"), "t/x.csv".into()).unwrap();
        assert_eq!(run.columns, vec!["A", "B"]);
        assert_eq!(run.rows.len(), 410);
        assert_eq!(run.rows[3], vec![3.5, 0.001]);
        // Predicting the last 7 rows: 5 true positives, 2 false positives, 3 true negatives;
        // the training rows' predictions do not count.
        let (c, _) = evaluate(std::slice::from_ref(&run), |r| {
            (0..r.rows.len()).map(|i| !(10..403).contains(&i)).collect()
        });
        assert_eq!(
            c,
            Confusion {
                tp: 5,
                fp: 2,
                fn_: 0,
                tn: 3
            }
        );
        let err = parse_run(
            "datetime;A;anomaly\n1;x;0\n",
            Path::new("y.csv"),
            "y".into(),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "y.csv:2: `x` is not a number");
        assert!(load(Path::new("/nonexistent")).is_err());
    }
}
