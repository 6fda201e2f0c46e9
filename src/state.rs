//! State: snapshots of everything the pipeline learned, written to disk
//! periodically and on graceful shutdown, and loaded at start, so a restart
//! does not learn from zero.
//!
//! The folder of `[state] path` (default `models/`) holds two kinds of file:
//! - `state.json`: the statistical baselines of every machine (sensors,
//!   devices, traffic, sequences, flows, query features), the alert books and
//!   the event clocks;
//! - `<machine>.model.json`, one per machine: its learned multivariate model
//!   ([`MachineFile`]: format version, machine, feature list, training
//!   window, created_at, operating modes). One file per machine so that an
//!   operator can inspect, copy or delete one machine's model (it then learns
//!   afresh) without touching the others.
//!
//! A snapshot also records the last JetStream stream sequence whose effects it
//! holds. The live runner acknowledges messages only up to a written snapshot,
//! so after a crash the consumer resumes exactly after it and the same input
//! yields the same alerts — with the same ids, which the alert stream then
//! drops as duplicates.
//!
//! Writes are atomic (a temporary file renamed over the old one). A file that
//! cannot be read as a snapshot of this format is logged, set aside as
//! `<name>.corrupt-<unix time>`, and learning starts afresh — never a crash;
//! a bad model file costs only its machine's model.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::learn::machines::MachineModel;
use crate::pipeline::PipelineState;
use crate::time::{Millis, format_rfc3339, wall_now};

/// Format version of snapshot and model files; a file of another version is set aside.
/// 2: learned models moved to one file per machine, with operating modes.
pub const FORMAT_VERSION: u32 = 2;

/// Suffix of the per-machine model files.
pub const MODEL_SUFFIX: &str = ".model.json";

/// One machine's learned model on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineFile {
    pub format_version: u32,
    pub machine: String,
    pub created_at: String,
    /// The model's features, by sensor name, in the order of its vectors
    /// (each followed, when `learn.lag` is set, by its lagged average).
    pub features: Vec<String>,
    /// Event time of the first and last training vector of the model in force.
    pub training_window: Option<TrainingWindow>,
    /// Operating modes of the model in force (0 while it learns).
    pub modes: usize,
    /// The model and what continues it; its metric ids are those of
    /// `features`, remapped on load.
    pub state: MachineModel,
}

/// First and last training vector, RFC 3339.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainingWindow {
    pub from: String,
    pub to: String,
}

/// One snapshot on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format_version: u32,
    pub created_at: String,
    /// Last JetStream stream sequence included (JetStream sources only).
    pub stream_seq: Option<u64>,
    pub pipeline: PipelineState,
}

/// Why a snapshot file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("not a twinwatch snapshot: {0}")]
    Parse(serde_json::Error),
    #[error("format version {0} (this build reads {FORMAT_VERSION})")]
    Version(u32),
}

/// Reads a snapshot file of this format and the model files beside it
/// (nothing is set aside, unreadable model files are skipped: see
/// [`StateStore::load`]).
pub fn read(path: &Path) -> Result<Checkpoint, ReadError> {
    let mut c = read_snapshot(path)?;
    for (_, m) in model_files(path) {
        if let Ok(m) = m {
            adopt(&mut c.pipeline, m);
        }
    }
    Ok(c)
}

fn read_snapshot(path: &Path) -> Result<Checkpoint, ReadError> {
    let bytes = std::fs::read(path).map_err(ReadError::Io)?;
    let c: Checkpoint = serde_json::from_slice(&bytes).map_err(ReadError::Parse)?;
    if c.format_version != FORMAT_VERSION {
        return Err(ReadError::Version(c.format_version));
    }
    Ok(c)
}

/// Reads one model file of this format.
pub fn read_model(path: &Path) -> Result<MachineFile, ReadError> {
    let bytes = std::fs::read(path).map_err(ReadError::Io)?;
    let m: MachineFile = serde_json::from_slice(&bytes).map_err(ReadError::Parse)?;
    if m.format_version != FORMAT_VERSION {
        return Err(ReadError::Version(m.format_version));
    }
    if m.features.len() != m.state.features.len() {
        return Err(ReadError::Parse(serde::de::Error::custom(
            "the feature list does not match the model",
        )));
    }
    Ok(m)
}

/// Every model file in the folder of `state_path`, read, in name order.
fn model_files(state_path: &Path) -> Vec<(PathBuf, Result<MachineFile, ReadError>)> {
    let dir = folder(state_path);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(MODEL_SUFFIX))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let m = read_model(&p);
            (p, m)
        })
        .collect()
}

fn folder(state_path: &Path) -> PathBuf {
    match state_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The model file name of a machine: its name with anything but letters,
/// digits, `-` and `_` written as `%XX`, so every name maps to its own file
/// and none escapes the folder.
pub fn model_file_name(machine: &str) -> String {
    let mut out = String::with_capacity(machine.len() + MODEL_SUFFIX.len());
    for b in machine.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str(MODEL_SUFFIX);
    out
}

/// Index of `name` in `names`, appended when missing.
fn index_of(names: &mut Vec<String>, name: &str) -> usize {
    match names.iter().position(|n| n == name) {
        Some(i) => i,
        None => {
            names.push(name.to_string());
            names.len() - 1
        }
    }
}

/// Puts a machine's model into a pipeline state, mapping its machine and
/// feature names to the state's ids (added when the state does not know them,
/// as after a lost `state.json`).
fn adopt(p: &mut PipelineState, f: MachineFile) {
    let machine = index_of(&mut p.machines, &f.machine);
    let mut m = f.state;
    m.features = f
        .features
        .iter()
        .map(|n| index_of(&mut p.metrics, n) as u32)
        .collect();
    if p.learned.len() <= machine {
        p.learned.resize(machine + 1, None);
    }
    p.learned[machine] = Some(m);
}

/// A machine's model as a file.
fn machine_file(
    p: &PipelineState,
    machine: usize,
    m: &MachineModel,
    created_at: &str,
) -> MachineFile {
    let fitted = m.model.as_ref();
    MachineFile {
        format_version: FORMAT_VERSION,
        machine: p.machines.get(machine).cloned().unwrap_or_default(),
        created_at: created_at.to_string(),
        features: m
            .features
            .iter()
            .map(|f| {
                p.metrics
                    .get(*f as usize)
                    .cloned()
                    .unwrap_or_else(|| f.to_string())
            })
            .collect(),
        training_window: fitted.map(|_| TrainingWindow {
            from: format_rfc3339(m.trained_from),
            to: format_rfc3339(m.trained_to),
        }),
        modes: fitted.map_or(0, |f| f.models.len()),
        state: m.clone(),
    }
}

/// A failure to write a snapshot.
#[derive(Debug, thiserror::Error)]
#[error("writing state snapshot {path}: {source}")]
pub struct StateError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Reads and writes snapshots at one path.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The snapshot and model files on disk, if there is anything usable.
    /// An unusable snapshot or model file is set aside; its part is learned afresh.
    pub fn load(&self) -> Option<Checkpoint> {
        let snapshot = match read_snapshot(&self.path) {
            Ok(c) => {
                info!(path = %self.path.display(), created_at = %c.created_at, machines = c.pipeline.machines.len(), "state restored");
                Some(c)
            }
            Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(ReadError::Io(e)) => {
                warn!(path = %self.path.display(), error = %e, "cannot read the state snapshot; learning afresh");
                None
            }
            Err(e) => {
                set_aside(&self.path, "state snapshot", &e.to_string());
                None
            }
        };
        let mut models = Vec::new();
        for (path, m) in model_files(&self.path) {
            match m {
                Ok(m) => models.push(m),
                Err(ReadError::Io(e)) => {
                    warn!(path = %path.display(), error = %e, "cannot read the model file; its machine learns afresh")
                }
                Err(e) => set_aside(&path, "model file", &e.to_string()),
            }
        }
        if snapshot.is_none() && models.is_empty() {
            return None;
        }
        let mut c = snapshot.unwrap_or_else(|| Checkpoint {
            format_version: FORMAT_VERSION,
            created_at: String::new(),
            stream_seq: None,
            pipeline: PipelineState::default(),
        });
        for m in models {
            info!(machine = %m.machine, created_at = %m.created_at, modes = m.modes, "learned model restored");
            adopt(&mut c.pipeline, m);
        }
        Some(c)
    }

    /// Writes a snapshot atomically, and the model file of every machine that has a model.
    pub fn save(&self, pipeline: PipelineState, stream_seq: Option<u64>) -> Result<(), StateError> {
        self.save_at(pipeline, stream_seq, wall_now())
    }

    fn save_at(
        &self,
        pipeline: PipelineState,
        stream_seq: Option<u64>,
        now: Millis,
    ) -> Result<(), StateError> {
        let err = |source| StateError {
            path: self.path.clone(),
            source,
        };
        let created_at = format_rfc3339(now);
        let dir = folder(&self.path);
        std::fs::create_dir_all(&dir).map_err(err)?;
        let mut pipeline = pipeline;
        let learned = std::mem::take(&mut pipeline.learned);
        for (i, m) in learned.iter().enumerate() {
            let Some(m) = m else { continue };
            let file = machine_file(&pipeline, i, m, &created_at);
            let path = dir.join(model_file_name(&file.machine));
            write_atomic(&path, &file).map_err(|source| StateError { path, source })?;
        }
        let c = Checkpoint {
            format_version: FORMAT_VERSION,
            created_at,
            stream_seq,
            pipeline,
        };
        write_atomic(&self.path, &c).map_err(err)
    }
}

fn write_atomic(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Renames an unusable file to `<name>.corrupt-<unix time>` and says so.
fn set_aside(path: &Path, what: &str, why: &str) {
    let aside = PathBuf::from(format!("{}.corrupt-{}", path.display(), wall_now() / 1000));
    let moved = std::fs::rename(path, &aside);
    warn!(
        path = %path.display(),
        set_aside = %aside.display(),
        moved = moved.is_ok(),
        "{what} unusable ({why}); set aside, learning afresh"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::pipeline::Pipeline;
    use crate::sim::{Factory, SimConfig};

    #[test]
    fn restored_pipeline_continues_exactly() {
        let cfg = Config::default();
        let ticks = ticks(40, 3);
        let (head, tail) = ticks.split_at(ticks.len() / 2);
        let (mut whole, first) = halfway(&cfg, head);
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("m/state.json"));
        store.save(first.snapshot(), Some(42)).unwrap();
        let c = store.load().unwrap();
        assert_eq!(c.stream_seq, Some(42));
        let mut resumed = Pipeline::restore(&cfg, c.pipeline);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for t in tail {
            a.extend(whole.process(t, 0).alerts);
            b.extend(resumed.process(t, 0).alerts);
        }
        assert!(!a.is_empty());
        assert_eq!(
            a, b,
            "a restored pipeline raises exactly the alerts of an uninterrupted one"
        );
    }

    fn ticks(minutes: i64, machines: usize) -> Vec<Vec<crate::source::Envelope>> {
        let mut f = Factory::new(SimConfig {
            duration: minutes * 60_000,
            machines,
            ..SimConfig::default()
        });
        std::iter::from_fn(|| f.next_tick()).collect()
    }

    /// Two pipelines fed `head`: one to go on, one to be saved and restored.
    fn halfway(cfg: &Config, head: &[Vec<crate::source::Envelope>]) -> (Pipeline, Pipeline) {
        let (mut whole, mut first) = (Pipeline::new(cfg), Pipeline::new(cfg));
        for t in head {
            whole.process(t, 0);
            first.process(t, 0);
        }
        (whole, first)
    }

    fn learning() -> Config {
        let mut cfg = Config::default();
        cfg.learn.enabled = true;
        cfg
    }

    #[test]
    fn learned_models_round_trip_through_their_files() {
        let cfg = learning();
        let ticks = ticks(40, 3);
        let (head, tail) = ticks.split_at(ticks.len() / 2);
        let (mut whole, first) = halfway(&cfg, head);
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let snap = first.snapshot();
        let fitted = snap
            .learned
            .iter()
            .flatten()
            .filter(|m| m.model.is_some())
            .count();
        assert_eq!(fitted, 3, "every machine has a model by then");
        store.save(snap.clone(), None).unwrap();
        // One file per machine, saying what it holds; none of it in state.json.
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
        assert_eq!(state["pipeline"]["learned"], serde_json::json!([]));
        for (i, name) in snap.machines.iter().enumerate() {
            let f = read_model(&dir.path().join(model_file_name(name))).unwrap();
            assert_eq!(f.format_version, FORMAT_VERSION);
            assert_eq!(&f.machine, name);
            assert!(!f.created_at.is_empty());
            let m = snap.learned[i].as_ref().unwrap();
            let names: Vec<&str> = m
                .features
                .iter()
                .map(|id| snap.metrics[*id as usize].as_str())
                .collect();
            assert_eq!(f.features, names);
            let w = f.training_window.unwrap();
            assert!(w.from < w.to, "{w:?}");
            assert!(f.modes >= 1);
        }
        let c = store.load().unwrap();
        for (a, b) in snap.learned.iter().zip(&c.pipeline.learned) {
            assert_eq!(
                serde_json::to_value(a).unwrap(),
                serde_json::to_value(b).unwrap(),
                "a model reads back as it was written"
            );
        }
        let mut resumed = Pipeline::restore(&cfg, c.pipeline);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for t in tail {
            a.extend(whole.process(t, 0).alerts);
            b.extend(resumed.process(t, 0).alerts);
        }
        assert_eq!(a, b, "learned models continue exactly after a restart");
    }

    #[test]
    fn a_bad_model_file_costs_only_its_machine() {
        let cfg = learning();
        let mut p = Pipeline::new(&cfg);
        for t in &ticks(20, 3) {
            p.process(t, 0);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = StateStore::new(&path);
        let snap = p.snapshot();
        store.save(snap.clone(), None).unwrap();
        let broken = dir.path().join(model_file_name(&snap.machines[1]));
        std::fs::write(&broken, b"{\"format_version\": 2, \"machine\": ").unwrap();
        let c = store.load().unwrap();
        assert!(c.pipeline.learned[0].is_some() && c.pipeline.learned[2].is_some());
        assert!(c.pipeline.learned.get(1).and_then(Option::as_ref).is_none());
        assert!(!broken.exists(), "the bad file is set aside");
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .contains(".model.json.corrupt-")
            })
            .count();
        assert_eq!(aside, 1);
        // A file of another format version is set aside too.
        let other = dir.path().join(model_file_name(&snap.machines[2]));
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&other).unwrap()).unwrap();
        v["format_version"] = serde_json::json!(FORMAT_VERSION + 1);
        std::fs::write(&other, v.to_string()).unwrap();
        let c = store.load().unwrap();
        assert!(c.pipeline.learned.get(2).and_then(Option::as_ref).is_none());
        assert!(!other.exists());
    }

    #[test]
    fn models_outlive_a_lost_snapshot() {
        let cfg = learning();
        let mut p = Pipeline::new(&cfg);
        for t in &ticks(20, 2) {
            p.process(t, 0);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let snap = p.snapshot();
        StateStore::new(&path).save(snap.clone(), None).unwrap();
        std::fs::remove_file(&path).unwrap();
        let c = StateStore::new(&path).load().unwrap();
        // Machines and features come back by name (ids may differ).
        for (i, m) in snap.learned.iter().enumerate() {
            let m = m.as_ref().unwrap();
            let j = c
                .pipeline
                .machines
                .iter()
                .position(|n| *n == snap.machines[i])
                .unwrap();
            let r = c.pipeline.learned[j].as_ref().unwrap();
            let names = |ids: &[u32], metrics: &[String]| -> Vec<String> {
                ids.iter().map(|id| metrics[*id as usize].clone()).collect()
            };
            assert_eq!(
                names(&m.features, &snap.metrics),
                names(&r.features, &c.pipeline.metrics)
            );
            assert_eq!(m.model, r.model);
        }
    }

    #[test]
    fn model_file_names_stay_in_their_folder() {
        assert_eq!(model_file_name("press-01"), "press-01.model.json");
        assert_eq!(model_file_name("../etc/x"), "%2E%2E%2Fetc%2Fx.model.json");
        assert_ne!(model_file_name("a b"), model_file_name("a_b"));
    }

    #[test]
    fn corrupt_snapshot_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{ half a snapshot").unwrap();
        let store = StateStore::new(&path);
        assert!(store.load().is_none());
        assert!(!path.exists());
        let aside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(aside.len(), 1);
        assert!(
            aside[0]
                .file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        );
        assert!(
            store.load().is_none(),
            "a missing file is simply a fresh start"
        );
    }
}
