//! One machine's learned multivariate baseline: what its feature vectors look
//! like together, so that a vector whose every feature is plausible alone but
//! whose combination is not (a temperature flat while the current climbs)
//! stands out.
//!
//! Fitting, on vectors judged normal:
//! - **scaling**: each feature is centred on its training mean and divided by
//!   its *long-run* deviation — the training deviation inflated by
//!   √((1+ρ)/(1−ρ)) for its lag-1 autocorrelation ρ (capped). A slow signal
//!   (a temperature) seen for a few minutes shows a small deviation that its
//!   ordinary wandering soon exceeds; the inflation accounts for that wandering
//!   and keeps noisy features as they are;
//! - **PCA** (the eigendecomposition of their covariance, with linfa-linalg)
//!   on the scaled training vectors, keeping the
//!   components that explain `variance` of it: Hotelling's T² measures how far
//!   a vector is inside the model's plane (an unusual operating point), Q (SPE)
//!   how far it is off it (a broken relation between features);
//! - **max-z**: the largest scaled deviation of one feature;
//! - the **limits** of the three statistics are their largest values over the
//!   training vectors after the same smoothing the scorer applies.
//!
//! Scoring is a ratio to the limit per statistic (above 1 = beyond anything
//! seen while training), smoothed over the last `smooth` vectors, and
//! explained by per-feature contributions that sum to 1.

use linfa_linalg::eigh::Eigh;
use ndarray::{Array1, Array2, Axis};
use serde::{Deserialize, Serialize};

/// Default largest inflation of a feature's deviation for its autocorrelation.
pub const MAX_INFLATION: f64 = 20.0;

/// Why a model could not be fitted.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error("{0} training vectors are too few (at least {1})")]
    TooFew(usize, usize),
    #[error("training vectors have {0} features, expected {1}")]
    Width(usize, usize),
    #[error("PCA failed: {0}")]
    Pca(String),
}

/// How to fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitParams {
    /// Share of the scaled training variance the PCA plane keeps.
    pub variance: f64,
    /// Vectors the statistics are averaged over before they are compared with their limits.
    pub smooth: usize,
    /// Largest inflation of a feature's deviation for its autocorrelation (1 = none).
    #[serde(default = "default_inflation")]
    pub max_inflation: f64,
    /// Most operating modes looked for (1 = one model for everything).
    #[serde(default = "one")]
    pub max_modes: usize,
    /// Clusters are modes when their centres are this many summed spreads apart.
    #[serde(default = "default_separation")]
    pub mode_separation: f64,
}

fn one() -> usize {
    1
}

fn default_separation() -> f64 {
    MODE_SEPARATION
}

/// Default [`FitParams::mode_separation`]: operating points that do not overlap, not a cloud cut in pieces.
pub const MODE_SEPARATION: f64 = 3.0;

fn default_inflation() -> f64 {
    MAX_INFLATION
}

impl Default for FitParams {
    fn default() -> Self {
        FitParams {
            variance: 0.9,
            smooth: 20,
            max_inflation: MAX_INFLATION,
            max_modes: 1,
            mode_separation: MODE_SEPARATION,
        }
    }
}

/// The three statistics of one vector, each as a ratio to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Ratios {
    pub max_z: f64,
    pub t2: f64,
    pub q: f64,
}

impl Ratios {
    /// The largest of the three: above 1 is beyond anything seen while training.
    pub fn worst(&self) -> f64 {
        self.max_z.max(self.t2).max(self.q)
    }
}

/// A fitted model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub mean: Vec<f64>,
    /// Long-run deviation per feature (the divisor of the scaling).
    pub scale: Vec<f64>,
    /// Principal axes in the scaled space, one row per component.
    pub components: Vec<Vec<f64>>,
    /// Variance of the training vectors along each component.
    pub variances: Vec<f64>,
    /// Mean of the scaled training vectors (the PCA's centre).
    pub centre: Vec<f64>,
    pub limits: Limits,
    pub params: FitParams,
    pub trained_on: usize,
}

/// The largest smoothed statistics seen in training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_z: f64,
    pub t2: f64,
    pub q: f64,
}

/// Raw statistics of one vector, with the per-feature terms behind them.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub max_z: f64,
    pub t2: f64,
    pub q: f64,
    /// |scaled deviation| per feature.
    pub z: Vec<f64>,
    /// Squared residual per feature (the terms of Q).
    pub residual: Vec<f64>,
}

impl Stats {
    fn empty() -> Stats {
        Stats {
            max_z: 0.0,
            t2: 0.0,
            q: 0.0,
            z: Vec::new(),
            residual: Vec::new(),
        }
    }
}

impl Model {
    /// Fits on training vectors (rows), all of the same width.
    pub fn fit(rows: &[Vec<f64>], params: &FitParams) -> Result<Model, FitError> {
        let n = rows.len();
        let min = min_rows(params);
        if n < min {
            return Err(FitError::TooFew(n, min));
        }
        let d = rows[0].len();
        if let Some(r) = rows.iter().find(|r| r.len() != d) {
            return Err(FitError::Width(r.len(), d));
        }
        let mut x = Array2::<f64>::zeros((n, d));
        for (i, r) in rows.iter().enumerate() {
            for (j, v) in r.iter().enumerate() {
                x[[i, j]] = *v;
            }
        }
        let mean = x.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(d));
        let centred = &x - &mean;
        let mut scale = Vec::with_capacity(d);
        for j in 0..d {
            let col = centred.column(j);
            let var = col.iter().map(|v| v * v).sum::<f64>() / (n as f64 - 1.0);
            let sd = var.sqrt();
            let lag: f64 = (1..n).map(|i| col[i] * col[i - 1]).sum();
            let total: f64 = col.iter().map(|v| v * v).sum();
            let rho = if total > 0.0 {
                (lag / total).clamp(-0.99, 0.999)
            } else {
                0.0
            };
            let inflation = ((1.0 + rho) / (1.0 - rho))
                .sqrt()
                .clamp(1.0, params.max_inflation.max(1.0));
            // A constant feature gets a unit scale: any movement is news.
            scale.push(if sd > 1e-12 { sd * inflation } else { 1.0 });
        }
        let scale_a = Array1::from(scale.clone());
        let z = &centred / &scale_a;
        let centre = z.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(d));
        if z.iter().any(|v| !v.is_finite()) {
            return Err(FitError::Pca(
                "training vectors hold non-finite values".into(),
            ));
        }
        // PCA as the symmetric eigendecomposition of the scaled covariance
        // (linfa-linalg): exact, deterministic, and safe on rank-deficient
        // training data, where an iterative SVD may not converge.
        let zc = &z - &centre;
        let cov = zc.t().dot(&zc) / (n as f64 - 1.0);
        let (values, vectors) = cov.eigh().map_err(|e| FitError::Pca(e.to_string()))?;
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        let variances_all: Vec<f64> = order.iter().map(|&i| values[i].max(0.0)).collect();
        let total: f64 = variances_all.iter().sum();
        let mut k = 0;
        let mut acc = 0.0;
        while k < variances_all.len() && (k == 0 || acc < params.variance * total) {
            acc += variances_all[k];
            k += 1;
        }
        // Keep at least one dimension off the plane, so Q means something.
        let k = k.min(d.saturating_sub(1)).max(1);
        let components: Vec<Vec<f64>> = order[..k]
            .iter()
            .map(|&i| vectors.column(i).to_vec())
            .collect();
        let mut model = Model {
            mean: mean.to_vec(),
            scale,
            components,
            variances: variances_all[..k].iter().map(|v| v.max(1e-9)).collect(),
            centre: centre.to_vec(),
            limits: Limits {
                max_z: 1.0,
                t2: 1.0,
                q: 1.0,
            },
            params: params.clone(),
            trained_on: n,
        };
        // Limits: the largest smoothed statistic over the training vectors.
        let mut smoother = Smoother::new(params.smooth);
        let mut lim = Limits {
            max_z: 0.0,
            t2: 0.0,
            q: 0.0,
        };
        for r in rows {
            let s = model.stats(r);
            let m = smoother.push((s.max_z, s.t2, s.q));
            lim.max_z = lim.max_z.max(m.0);
            lim.t2 = lim.t2.max(m.1);
            lim.q = lim.q.max(m.2);
        }
        model.limits = Limits {
            max_z: lim.max_z.max(1e-9),
            t2: lim.t2.max(1e-9),
            q: lim.q.max(1e-9),
        };
        Ok(model)
    }

    /// How many features the model takes.
    pub fn width(&self) -> usize {
        self.mean.len()
    }

    /// The raw statistics of one vector.
    pub fn stats(&self, x: &[f64]) -> Stats {
        let d = self.width();
        // A missing feature counts as its training mean.
        let z: Vec<f64> = (0..d)
            .map(|j| (x.get(j).copied().unwrap_or(self.mean[j]) - self.mean[j]) / self.scale[j])
            .collect();
        let abs: Vec<f64> = z.iter().map(|v| v.abs()).collect();
        let max_z = abs.iter().cloned().fold(0.0, f64::max);
        let c: Vec<f64> = (0..d).map(|j| z[j] - self.centre[j]).collect();
        let mut t2 = 0.0;
        let mut recon = vec![0.0; d];
        for (p, var) in self.components.iter().zip(&self.variances) {
            let t: f64 = p.iter().zip(&c).map(|(a, b)| a * b).sum();
            t2 += t * t / var;
            for j in 0..d {
                recon[j] += t * p[j];
            }
        }
        let residual: Vec<f64> = (0..d).map(|j| (c[j] - recon[j]).powi(2)).collect();
        let q = residual.iter().sum();
        Stats {
            max_z,
            t2,
            q,
            z: abs,
            residual,
        }
    }
}

/// A moving mean of the three statistics over the last `n` vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Smoother {
    n: usize,
    buf: Vec<(f64, f64, f64)>,
    next: usize,
    sum: (f64, f64, f64),
}

impl Smoother {
    pub fn new(n: usize) -> Self {
        Smoother {
            n: n.max(1),
            buf: Vec::new(),
            next: 0,
            sum: (0.0, 0.0, 0.0),
        }
    }

    /// Adds a vector's three values; their means over the window so far.
    pub fn push(&mut self, v: (f64, f64, f64)) -> (f64, f64, f64) {
        if self.buf.len() < self.n {
            self.buf.push(v);
        } else {
            let old = self.buf[self.next];
            self.sum.0 -= old.0;
            self.sum.1 -= old.1;
            self.sum.2 -= old.2;
            self.buf[self.next] = v;
            self.next = (self.next + 1) % self.n;
        }
        self.sum.0 += v.0;
        self.sum.1 += v.1;
        self.sum.2 += v.2;
        let k = self.buf.len() as f64;
        (self.sum.0 / k, self.sum.1 / k, self.sum.2 / k)
    }
}

/// Scores a stream of vectors against a machine's modes.
///
/// Each vector is judged by the mode that explains it best (the smallest
/// worst ratio to that mode's limits); those ratios are then averaged over
/// the last `smooth` vectors. With one mode this is exactly the smoothed
/// statistic over its limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scorer {
    smoother: Smoother,
}

impl Scorer {
    pub fn new(modes: &Modes) -> Self {
        Scorer {
            smoother: Smoother::new(modes.params().smooth),
        }
    }

    /// The smoothed ratios of the next vector, its raw statistics under the
    /// mode that explains it best, and that mode's index.
    pub fn score(&mut self, modes: &Modes, x: &[f64]) -> (Ratios, Stats, usize) {
        let mut best: Option<(Ratios, Stats, usize)> = None;
        for (k, model) in modes.models.iter().enumerate() {
            let s = model.stats(x);
            let l = &model.limits;
            let r = Ratios {
                max_z: s.max_z / l.max_z,
                t2: s.t2 / l.t2,
                q: s.q / l.q,
            };
            if best.as_ref().is_none_or(|b| r.worst() < b.0.worst()) {
                best = Some((r, s, k));
            }
        }
        let Some((r, s, k)) = best else {
            return (Ratios::default(), Stats::empty(), 0);
        };
        let m = self.smoother.push((r.max_z, r.t2, r.q));
        (
            Ratios {
                max_z: m.0,
                t2: m.1,
                q: m.2,
            },
            s,
            k,
        )
    }
}

/// A machine's operating modes: the training vectors clustered with linfa's
/// KMeans, and a [`Model`] fitted on each cluster. A machine that runs in a
/// few distinct states (idle, production, cleaning) relates its sensors
/// differently in each; one plane through all of them would be loose
/// everywhere, and a change of mode would look like an anomaly when the
/// data of each mode is tight. One mode when the data shows no distinct
/// clusters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Modes {
    pub models: Vec<Model>,
    /// Each mode's centre in the raw feature space (for `models show`).
    pub centres: Vec<Vec<f64>>,
}

impl Modes {
    /// Finds the modes of the training vectors and fits one model per mode.
    ///
    /// The modes are the most clusters of the standardised training vectors
    /// (up to `max_modes`) that are pairwise at least `mode_separation` apart
    /// (centre distance over summed spreads), each with enough vectors to fit
    /// a model; when there are none (one continuous cloud) the machine has
    /// one mode.
    pub fn fit(rows: &[Vec<f64>], params: &FitParams) -> Result<Modes, FitError> {
        let one = Model::fit(rows, params)?;
        let single = |m: Model| Modes {
            centres: vec![m.mean.clone()],
            models: vec![m],
        };
        let min = 2 * min_rows(params);
        if params.max_modes <= 1 || rows.len() < 2 * min {
            return Ok(single(one));
        }
        let labels = clusters(rows, params, min);
        let k = labels.iter().copied().max().map_or(1, |m| m + 1);
        if k <= 1 {
            return Ok(single(one));
        }
        let mut models = Vec::with_capacity(k);
        for c in 0..k {
            let part: Vec<Vec<f64>> = rows
                .iter()
                .zip(&labels)
                .filter(|(_, l)| **l == c)
                .map(|(r, _)| r.clone())
                .collect();
            match Model::fit(&part, params) {
                Ok(m) => models.push(m),
                // A mode that cannot be modelled alone: keep the single model.
                Err(_) => return Ok(single(one)),
            }
        }
        let mut modes = Modes {
            centres: models.iter().map(|m| m.mean.clone()).collect(),
            models,
        };
        modes.calibrate(rows);
        Ok(modes)
    }

    /// Sets the limits so that, scored as live vectors are (each by its
    /// best mode, smoothed), the largest ratio over the training vectors is
    /// 1 — as a single model's limits are by construction. Vectors between
    /// modes (a machine on its way from idle to full load) belong to no
    /// cluster; without this they would look anomalous to every mode.
    fn calibrate(&mut self, rows: &[Vec<f64>]) {
        let mut scorer = Scorer::new(self);
        let mut top = Ratios::default();
        for r in rows {
            let (x, _, _) = scorer.score(self, r);
            top.max_z = top.max_z.max(x.max_z);
            top.t2 = top.t2.max(x.t2);
            top.q = top.q.max(x.q);
        }
        for m in &mut self.models {
            if top.max_z > 0.0 && top.max_z.is_finite() {
                m.limits.max_z *= top.max_z;
            }
            if top.t2 > 0.0 && top.t2.is_finite() {
                m.limits.t2 *= top.t2;
            }
            if top.q > 0.0 && top.q.is_finite() {
                m.limits.q *= top.q;
            }
        }
    }

    /// One mode, one model.
    pub fn single(model: Model) -> Modes {
        Modes {
            centres: vec![model.mean.clone()],
            models: vec![model],
        }
    }

    /// The fit parameters (the same for every mode).
    pub fn params(&self) -> &FitParams {
        &self.models[0].params
    }

    /// How many features the models take.
    pub fn width(&self) -> usize {
        self.models.first().map_or(0, Model::width)
    }

    /// Vectors trained on, over all modes.
    pub fn trained_on(&self) -> usize {
        self.models.iter().map(|m| m.trained_on).sum()
    }
}

/// The fewest vectors a model is fitted on.
fn min_rows(params: &FitParams) -> usize {
    2 * params.smooth.max(10)
}

/// Cluster labels of the rows (all 0 for one mode): KMeans (seeded, so the
/// same training data gives the same modes) on standardised features; the
/// most clusters, up to `max_modes`, that are all distinct (see
/// [`separation`]) and each big enough to fit a model on.
fn clusters(rows: &[Vec<f64>], params: &FitParams, min: usize) -> Vec<usize> {
    use linfa::DatasetBase;
    use linfa::prelude::{Fit, Predict};
    use linfa_clustering::KMeans;
    use rand_xoshiro::Xoshiro256Plus;
    use rand_xoshiro::rand_core::SeedableRng;

    let (n, d) = (rows.len(), rows[0].len());
    let mut x = Array2::<f64>::zeros((n, d));
    for (i, r) in rows.iter().enumerate() {
        for (j, v) in r.iter().enumerate() {
            x[[i, j]] = *v;
        }
    }
    let mean = x.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(d));
    let sd = x
        .std_axis(Axis(0), 0.0)
        .mapv(|s| if s > 1e-12 { s } else { 1.0 });
    let z = (&x - &mean) / &sd;
    let mut labels = vec![0usize; n];
    let data = DatasetBase::from(z.clone());
    for k in 2..=params.max_modes.min(8) {
        let fitted = KMeans::params_with_rng(k, Xoshiro256Plus::seed_from_u64(0x7477))
            .n_runs(3)
            .max_n_iterations(100)
            .tolerance(1e-4)
            .fit(&data);
        let Ok(km) = fitted else { break };
        let assigned: Vec<usize> = km.predict(&z).iter().map(|a| (*a).min(k - 1)).collect();
        let mut counts = vec![0usize; k];
        for a in &assigned {
            counts[*a] += 1;
        }
        if counts.iter().any(|&c| c < min) {
            break;
        }
        if separation(&z, &assigned, km.centroids()) >= params.mode_separation {
            labels = assigned;
        }
    }
    labels
}

/// How distinct clusters are: over every pair, the distance between their
/// centres over the sum of their spreads along the line joining them (the
/// smallest pair counts). Halves of one Gaussian cloud score ~1.3, of a
/// uniform one ~1.7; operating points with no overlap score far more.
fn separation(z: &Array2<f64>, labels: &[usize], centres: &Array2<f64>) -> f64 {
    let k = centres.nrows();
    let mut worst = f64::INFINITY;
    for a in 0..k {
        for b in a + 1..k {
            let u = &centres.row(a) - &centres.row(b);
            let dist = u.dot(&u).sqrt();
            if dist <= 0.0 {
                return 0.0;
            }
            let u = u / dist;
            let spread = |c: usize| {
                let p: Vec<f64> = z
                    .rows()
                    .into_iter()
                    .zip(labels)
                    .filter(|(_, l)| **l == c)
                    .map(|(r, _)| r.dot(&u))
                    .collect();
                let m = p.iter().sum::<f64>() / p.len().max(1) as f64;
                (p.iter().map(|v| (v - m).powi(2)).sum::<f64>() / p.len().max(1) as f64).sqrt()
            };
            worst = worst.min(dist / (spread(a) + spread(b)).max(1e-12));
        }
    }
    worst
}

/// Per-feature shares of what drove a vector's score, summing to 1: the
/// residual terms when Q is the worst ratio, the scaled deviations otherwise.
pub fn contributions(r: &Ratios, s: &Stats) -> Vec<f64> {
    let terms: Vec<f64> = if r.q >= r.max_z && r.q >= r.t2 {
        s.residual.clone()
    } else {
        s.z.iter().map(|z| z * z).collect()
    };
    let total: f64 = terms.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        let n = terms.len().max(1) as f64;
        return vec![1.0 / n; terms.len()];
    }
    terms.iter().map(|t| t / total).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two coupled features (b follows a) and a slow wandering one, with noise.
    fn plant(n: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut s = seed;
        let mut noise = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        // The slow one wanders (AR(1), phi 0.98) as a temperature does.
        let mut wander = 0.0;
        (0..n)
            .map(|i| {
                let load = ((i as f64) / 40.0).sin() * 5.0;
                let a = 50.0 + load + noise();
                let b = 20.0 + 2.0 * load + noise();
                wander = 0.98 * wander + 0.1 * noise();
                vec![a, b, 70.0 + wander]
            })
            .collect()
    }

    #[test]
    fn a_broken_relation_stands_out_and_normal_data_does_not() {
        let rows = plant(600, 7);
        let p = FitParams::default();
        let m = Modes::fit(&rows[..400], &p).unwrap();
        assert_eq!(m.models.len(), 1, "one continuous cloud is one mode");
        assert!(m.models[0].components.len() < 3);
        let mut sc = Scorer::new(&m);
        let normal: Vec<f64> = rows[400..]
            .iter()
            .map(|r| sc.score(&m, r).0.worst())
            .collect();
        let worst = normal.iter().cloned().fold(0.0, f64::max);
        assert!(worst < 1.5, "normal data scored {worst}");
        // b stops following a (flat while a climbs): every value is in range.
        let mut sc = Scorer::new(&m);
        let mut last = Ratios::default();
        let mut stats = None;
        for (i, r) in rows[400..460].iter().enumerate() {
            let mut v = r.clone();
            if i >= 20 {
                v[1] = 20.0;
            }
            let (ratios, s, _) = sc.score(&m, &v);
            last = ratios;
            stats = Some(s);
        }
        assert!(last.worst() > 2.0, "{last:?}");
        let c = contributions(&last, &stats.unwrap());
        assert!((c.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let top = c
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert!(top == 0 || top == 1, "the coupled pair drives it: {c:?}");
    }

    /// A machine with two distinct operating points whose sensors relate
    /// differently in each (b = 2a around a = 10; b = 40 − a around a = 30),
    /// switching abruptly every 60 vectors; a swings ±3 at random.
    fn two_modes(n: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = crate::sim::rng::Rng::new(seed);
        let mut noise = || rng.range(-0.5, 0.5);
        (0..n)
            .map(|i| {
                let swing = 6.0 * noise();
                if (i / 60) % 2 == 0 {
                    let a = 10.0 + swing + 0.2 * noise();
                    vec![a, 2.0 * a + 0.2 * noise(), 5.0 + 0.2 * noise()]
                } else {
                    let a = 30.0 + swing + 0.2 * noise();
                    vec![a, 40.0 - a + 0.2 * noise(), 5.0 + 0.2 * noise()]
                }
            })
            .collect()
    }

    fn params(max_modes: usize) -> FitParams {
        FitParams {
            max_modes,
            ..FitParams::default()
        }
    }

    /// The largest smoothed worst ratio over `rows`.
    fn peak(m: &Modes, rows: &[Vec<f64>]) -> f64 {
        let mut sc = Scorer::new(m);
        rows.iter()
            .map(|r| sc.score(m, r).0.worst())
            .fold(0.0, f64::max)
    }

    #[test]
    fn distinct_operating_modes_get_a_model_each() {
        let rows = two_modes(1200, 3);
        let modes = Modes::fit(&rows[..600], &params(4)).unwrap();
        assert_eq!(modes.models.len(), 2, "two operating points, two modes");
        let single = Modes::fit(&rows[..600], &params(1)).unwrap();
        assert_eq!(single.models.len(), 1);
        // Switching between the modes is normal for both.
        // Switching is far below the alert factors (5).
        assert!(peak(&modes, &rows[600..]) < 2.5);
        assert!(peak(&single, &rows[600..]) < 2.5);
        // In the first mode, b stops following a (held at its mean): each value
        // stays inside what both modes have seen.
        let broken: Vec<Vec<f64>> = rows[600..660]
            .iter()
            .map(|r| vec![r[0], 20.0, r[2]])
            .collect();
        let (m, s) = (peak(&modes, &broken), peak(&single, &broken));
        assert!(m > 3.0, "the mode's own relation is broken: {m}");
        assert!(
            m > 2.0 * s,
            "a model per mode sees it clearer than one for both: {m} vs {s}"
        );
        // The same training data gives the same modes.
        assert_eq!(modes, Modes::fit(&rows[..600], &params(4)).unwrap());
    }

    #[test]
    fn fitting_refuses_what_it_cannot_learn_from() {
        let p = FitParams::default();
        assert!(matches!(
            Model::fit(&plant(5, 1), &p),
            Err(FitError::TooFew(5, _))
        ));
        let mut rows = plant(100, 1);
        rows[50].pop();
        assert!(matches!(Model::fit(&rows, &p), Err(FitError::Width(2, 3))));
        // A constant feature does not break the fit.
        let rows: Vec<Vec<f64>> = plant(100, 2)
            .into_iter()
            .map(|mut r| {
                r[2] = 1.0;
                r
            })
            .collect();
        let m = Model::fit(&rows, &p).unwrap();
        assert!(m.stats(&rows[0]).max_z.is_finite());
    }
}
