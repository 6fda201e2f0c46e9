//! State: snapshots of everything the pipeline learned, written to disk
//! (`[state] path`, default `models/state.json`) periodically and on graceful
//! shutdown, and loaded at start, so a restart does not learn from zero.
//!
//! A snapshot also records the last JetStream stream sequence whose effects it
//! holds. The live runner acknowledges messages only up to a written snapshot,
//! so after a crash the consumer resumes exactly after it and the same input
//! yields the same alerts — with the same ids, which the alert stream then
//! drops as duplicates.
//!
//! Writes are atomic (a temporary file renamed over the old one). A file that
//! cannot be read as a snapshot of this format is logged, set aside as
//! `<name>.corrupt-<unix time>`, and learning starts afresh — never a crash.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::pipeline::PipelineState;
use crate::time::{Millis, format_rfc3339, wall_now};

/// Format version of snapshot files; a file of another version is set aside.
pub const FORMAT_VERSION: u32 = 1;

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

/// Reads a snapshot file of this format (nothing is set aside: see [`StateStore::load`]).
pub fn read(path: &Path) -> Result<Checkpoint, ReadError> {
    let bytes = std::fs::read(path).map_err(ReadError::Io)?;
    let c: Checkpoint = serde_json::from_slice(&bytes).map_err(ReadError::Parse)?;
    if c.format_version != FORMAT_VERSION {
        return Err(ReadError::Version(c.format_version));
    }
    Ok(c)
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

    /// The snapshot on disk, if there is a usable one.
    pub fn load(&self) -> Option<Checkpoint> {
        match read(&self.path) {
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
                self.set_aside(&e.to_string());
                None
            }
        }
    }

    fn set_aside(&self, why: &str) {
        let aside = PathBuf::from(format!(
            "{}.corrupt-{}",
            self.path.display(),
            wall_now() / 1000
        ));
        let moved = std::fs::rename(&self.path, &aside);
        warn!(
            path = %self.path.display(),
            set_aside = %aside.display(),
            moved = moved.is_ok(),
            "state snapshot unusable ({why}); set aside, learning afresh"
        );
    }

    /// Writes a snapshot atomically.
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
        let c = Checkpoint {
            format_version: FORMAT_VERSION,
            created_at: format_rfc3339(now),
            stream_seq,
            pipeline,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = PathBuf::from(format!("{}.tmp", self.path.display()));
        let bytes = serde_json::to_vec(&c).map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }
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
        let mut f = Factory::new(SimConfig {
            duration: 40 * 60_000,
            machines: 3,
            ..SimConfig::default()
        });
        let mut ticks = Vec::new();
        while let Some(t) = f.next_tick() {
            ticks.push(t);
        }
        let (head, tail) = ticks.split_at(ticks.len() / 2);
        let mut whole = Pipeline::new(&cfg);
        let mut first = Pipeline::new(&cfg);
        for t in head {
            whole.process(t, 0);
            first.process(t, 0);
        }
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
