//! The learned model of every machine, in the pipeline: vectors of each
//! machine's readings are collected while it learns, a [`Model`] is fitted
//! when its warm-up ends, and every later vector is scored against it.
//!
//! A machine's vector holds its sensors' latest values (carried forward
//! between messages), in the order of their metric ids; its features are the
//! sensors heard in the first [`FEATURES_AFTER`] of learning (sensors that
//! appear later are left to the univariate baselines). Training keeps at most
//! `learn.max_train` vectors, thinning the older ones by half whenever it is
//! full, so the whole warm-up — every operating mode the machine went
//! through — is represented. Alerts are `multivariate`, explained by the
//! contributions of the features.

use serde::{Deserialize, Serialize};

use super::model::{FitParams, Modes, Scorer, contributions};
use crate::detect::{Detail, Finding, Kind};
use crate::score::ratio_surprise;
use crate::time::Millis;

/// Sensors heard this long after a machine's first message are its features.
pub const FEATURES_AFTER: Millis = 30_000;

/// What one machine's model has learned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineModel {
    pub first_ts: Millis,
    /// Metric ids of the features, in the order they were first heard.
    pub features: Vec<u32>,
    last: Vec<Option<f64>>,
    /// Each feature's exponential average over `learn.lag` (event time): a
    /// sensor that follows another with a lag (temperature after load) is
    /// related to its average, which an instantaneous vector cannot show.
    #[serde(default)]
    lagged: Vec<f64>,
    #[serde(default)]
    lagged_ts: Millis,
    /// Training vectors kept for the next fit (at most `learn.max_train`):
    /// saved with the model, so a refit after a restart still sees every
    /// mode the machine went through before it.
    #[serde(default, with = "packed_rows")]
    buffer: Vec<Vec<f64>>,
    stride: u32,
    skipped: u32,
    /// Event time of the first and last vector the model in force was fitted on.
    pub trained_from: Millis,
    pub trained_to: Millis,
    /// The same for the vectors kept for the next fit.
    #[serde(default)]
    kept_from: Millis,
    #[serde(default)]
    kept_to: Millis,
    pub model: Option<Modes>,
    /// Why fitting failed, if it did.
    pub fit_error: Option<String>,
    /// How many times it was fitted, and when it is refitted next.
    #[serde(default)]
    pub fits: u32,
    #[serde(default)]
    next_fit: Millis,
    /// Vectors teach refits only from this time: any finding on the machine
    /// holds them back for `alerts.cooldown`, as long as an alert it raised
    /// stays open, so no refit learns from data under an open alert.
    #[serde(default)]
    teach_from: Millis,
    /// The smoothing in progress, so a restart continues it.
    #[serde(default)]
    scorer: Option<Scorer>,
}

#[derive(Debug, Clone)]
struct Params {
    enabled: bool,
    warmup: Millis,
    fit: FitParams,
    t2_factor: f64,
    q_factor: f64,
    max_train: usize,
    retrain: Millis,
    lag: Millis,
    cooldown: Millis,
}

/// Training vectors on disk: one base64 string per vector, of its values as
/// little-endian f64 — exact, and about half the size of JSON numbers.
mod packed_rows {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(rows: &[Vec<f64>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(rows.iter().map(|r| {
            let bytes: Vec<u8> = r.iter().flat_map(|v| v.to_le_bytes()).collect();
            B64.encode(bytes)
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
        let text: Vec<String> = Vec::deserialize(d)?;
        text.iter()
            .map(|t| {
                let bytes = B64.decode(t).map_err(D::Error::custom)?;
                if bytes.len() % 8 != 0 {
                    return Err(D::Error::custom(
                        "a training vector is not a whole number of f64",
                    ));
                }
                Ok(bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect())
            })
            .collect()
    }
}

/// Adds a training vector, thinning the kept ones by half when full (so
/// everything since the machine started stays represented, ever more sparsely).
fn keep(m: &mut MachineModel, x: &[f64], ts: Millis, max: usize) {
    m.skipped += 1;
    if m.skipped < m.stride {
        return;
    }
    m.skipped = 0;
    if m.buffer.is_empty() {
        m.kept_from = ts;
    }
    m.kept_to = ts;
    m.buffer.push(x.to_vec());
    if m.buffer.len() >= max {
        let kept: Vec<Vec<f64>> = m.buffer.iter().step_by(2).cloned().collect();
        m.buffer = kept;
        m.stride = m.stride.saturating_mul(2);
    }
}

/// Every machine's model.
pub struct Learned {
    p: Params,
    machines: Vec<Option<MachineModel>>,
    scratch: Vec<f64>,
}

impl Learned {
    pub fn new(cfg: &crate::config::Config) -> Self {
        let l = &cfg.learn;
        Learned {
            p: Params {
                enabled: l.enabled,
                warmup: cfg.baseline.warmup,
                fit: FitParams {
                    variance: l.variance,
                    smooth: l.smooth,
                    max_inflation: l.max_inflation,
                    max_modes: l.max_modes,
                    mode_separation: l.mode_separation,
                },
                t2_factor: l.t2_factor,
                q_factor: l.q_factor,
                max_train: l.max_train,
                retrain: l.retrain,
                lag: l.lag,
                cooldown: cfg.alerts.cooldown,
            },
            machines: Vec::new(),
            scratch: Vec::new(),
        }
    }

    pub fn snapshot(&self) -> Vec<Option<MachineModel>> {
        self.machines.clone()
    }

    pub fn restore(&mut self, machines: Vec<Option<MachineModel>>) {
        self.machines = machines;
    }

    /// A machine's model state.
    pub fn machine(&self, machine: u32) -> Option<&MachineModel> {
        self.machines.get(machine as usize).and_then(Option::as_ref)
    }

    /// Observes one message's readings (metric id, value). `trusted` messages
    /// teach while the machine learns; afterwards only those that are also
    /// `clean` (no other detector found anything in the message), judged
    /// normal by the model, and at least `alerts.cooldown` after the
    /// machine's last finding do, for the refits every `learn.retrain`.
    /// Every message with a model is scored.
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &mut self,
        machine: u32,
        machine_name: &str,
        device: u32,
        ts: Millis,
        trusted: bool,
        clean: bool,
        readings: &[(u32, f64)],
        names: &dyn Fn(u32) -> String,
        out: &mut Vec<Finding>,
    ) {
        if !self.p.enabled {
            return;
        }
        let p = &self.p;
        let m = crate::intern::entry(&mut self.machines, machine, || MachineModel {
            first_ts: ts,
            features: Vec::new(),
            last: Vec::new(),
            lagged: Vec::new(),
            lagged_ts: 0,
            buffer: Vec::new(),
            stride: 1,
            skipped: 0,
            trained_from: 0,
            trained_to: 0,
            kept_from: 0,
            kept_to: 0,
            model: None,
            fit_error: None,
            fits: 0,
            next_fit: 0,
            teach_from: 0,
            scorer: None,
        });
        let choosing = m.model.is_none() && ts < m.first_ts.saturating_add(FEATURES_AFTER);
        for &(metric, v) in readings {
            // A linear scan: a machine has a handful of features, and their
            // order must survive a restore that interns metric names afresh.
            match m.features.iter().position(|f| *f == metric) {
                Some(k) => m.last[k] = Some(v),
                None if choosing && trusted && m.features.len() < 64 => {
                    m.features.push(metric);
                    m.last.push(Some(v));
                }
                None => {}
            }
        }
        if m.features.len() < 2 || m.last.iter().any(Option::is_none) {
            return;
        }
        self.scratch.clear();
        self.scratch.extend(m.last.iter().map(|v| v.unwrap_or(0.0)));
        if p.lag > 0 {
            if m.lagged.len() != self.scratch.len() {
                m.lagged = self.scratch.clone();
                m.lagged_ts = ts;
            } else if ts > m.lagged_ts {
                let a = 1.0 - (-((ts - m.lagged_ts) as f64) / p.lag as f64).exp();
                for (l, x) in m.lagged.iter_mut().zip(&self.scratch) {
                    *l += a * (x - *l);
                }
                m.lagged_ts = ts;
            }
            self.scratch.extend_from_slice(&m.lagged);
        }
        let learning = ts < m.first_ts.saturating_add(p.warmup);
        if learning {
            if trusted && !choosing {
                keep(m, &self.scratch, ts, p.max_train);
            }
            return;
        }
        let due = match &m.model {
            None => m.fit_error.is_none(),
            Some(_) => ts >= m.next_fit,
        };
        if due && trusted {
            m.next_fit = ts.saturating_add(p.retrain);
            match Modes::fit(&m.buffer, &p.fit) {
                Ok(model) => {
                    tracing::debug!(
                        machine = %machine_name,
                        vectors = model.trained_on(),
                        features = model.width(),
                        modes = model.models.len(),
                        "multivariate model fitted"
                    );
                    m.fits += 1;
                    m.trained_from = m.kept_from;
                    m.trained_to = m.kept_to;
                    m.scorer = Some(Scorer::new(&model));
                    m.model = Some(model);
                }
                Err(e) if m.model.is_none() => m.fit_error = Some(e.to_string()),
                Err(_) => {}
            }
        }
        let Some(model) = &m.model else { return };
        let scorer = m.scorer.get_or_insert_with(|| Scorer::new(model));
        let (r, stats, mode) = scorer.score(model, &self.scratch);
        let (statistic, ratio, factor) = if r.q / p.q_factor >= r.t2 / p.t2_factor {
            ("pca_q", r.q, p.q_factor)
        } else {
            ("pca_t2", r.t2, p.t2_factor)
        };
        if ratio <= factor && clean {
            // Judged normal by every detector (this one included), with no
            // alert open on the machine: it may teach the next fit.
            if trusted && ts >= m.teach_from {
                keep(m, &self.scratch, ts, p.max_train);
            }
            return;
        }
        m.teach_from = m.teach_from.max(ts.saturating_add(p.cooldown));
        if ratio <= factor {
            return;
        }
        let shares = contributions(&r, &stats);
        // Shares of a sensor and of its lagged average are summed under the sensor's name.
        let n = m.features.len();
        let mut named: Vec<(String, f64)> = m
            .features
            .iter()
            .enumerate()
            .map(|(k, f)| {
                (
                    names(*f),
                    shares[k] + shares.get(k + n).copied().unwrap_or(0.0),
                )
            })
            .collect();
        named.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top = named.first().map(|n| n.0.clone()).unwrap_or_default();
        let modes = model.models.len();
        let in_mode = if modes > 1 {
            format!(
                " in the closest of its {modes} operating modes (mode {})",
                mode + 1
            )
        } else {
            String::new()
        };
        let text = format!(
            "{machine_name}'s sensors no longer relate as they did while it learned: {}{in_mode} is {:.1} times its largest learned value (alert from {factor}), driven by {}",
            if statistic == "pca_q" {
                "the residual off the learned plane (Q)"
            } else {
                "the distance inside the learned plane (T²)"
            },
            ratio,
            named
                .iter()
                .take(3)
                .map(|(n, w)| format!("{n} {:.0} %", w * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut f = Finding::note(
            machine,
            device,
            Kind::Multivariate,
            statistic,
            ts,
            u32::MAX - 3,
            top,
            ratio_surprise(ratio / factor),
            text,
        )
        .with_values(ratio, 1.0);
        f.detail = Detail::Multivariate {
            text: match f.detail {
                Detail::Note { text, .. } => text,
                _ => String::new(),
            },
            contributions: named,
        };
        out.push(f);
    }
}
