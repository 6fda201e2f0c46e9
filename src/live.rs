//! Live runner: drives the pipeline from a long-running source (NATS) into a
//! sink, with state snapshots and graceful shutdown.
//!
//! Per batch: decode → detect → dead letters and alerts published → sink
//! flushed. Without state snapshots the batch is then committed to the source
//! (acknowledged). With snapshots, the pipeline's state is written every
//! `state.interval` (and whenever input pauses), and only then is everything
//! up to it committed: the acknowledged stream position and the saved state
//! always agree, so a process killed at any instant resumes exactly where its
//! state says, re-raising the same alerts with the same ids.
//!
//! Shutdown (SIGTERM or Ctrl-C sets the watch): stop taking input, push what is
//! in hand through the pipeline, publish and flush, write the state, commit.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::pipeline::{Pipeline, RunError};
use crate::sink::Sink;
use crate::source::Source;
use crate::state::StateStore;

/// Counters of one live run.
#[derive(Debug, Default, Clone, Copy)]
pub struct LiveSummary {
    pub batches: u64,
    pub checkpoints: u64,
}

/// Where and how often the state is saved.
pub struct Checkpoints<'a> {
    pub store: &'a StateStore,
    pub interval: Duration,
}

/// Runs until the source ends or `shutdown` becomes true.
pub async fn run_live<S: Source, K: Sink>(
    pipeline: &mut Pipeline,
    source: &mut S,
    sink: &mut K,
    checkpoints: Option<Checkpoints<'_>>,
    mut features: Option<&mut crate::features::FeatureStage>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<LiveSummary, RunError> {
    let mut summary = LiveSummary::default();
    let mut uncommitted = false;
    let mut next_checkpoint = Instant::now()
        + checkpoints
            .as_ref()
            .map_or(Duration::MAX / 4, |c| c.interval);
    let mut stopping = *shutdown.borrow();
    if stopping {
        source.stop();
    }
    loop {
        pipeline.poll_registry();
        let batch = if stopping {
            source.next_batch().await?
        } else {
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        info!("shutting down: finishing the messages in hand");
                        stopping = true;
                        source.stop();
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(next_checkpoint), if uncommitted => {
                    // Input paused with work not yet acknowledged: checkpoint now.
                    if let Some(c) = &checkpoints {
                        checkpoint(pipeline, source, c, &mut summary).await?;
                        uncommitted = false;
                        next_checkpoint = Instant::now() + c.interval;
                    }
                    continue;
                }
                b = source.next_batch() => b?,
            }
        };
        let Some(batch) = batch else { break };
        if batch.is_empty() {
            continue;
        }
        crate::pipeline::deliver(pipeline, &batch, sink, &mut features).await?;
        summary.batches += 1;
        match &checkpoints {
            None => source.commit().await?,
            Some(c) => {
                uncommitted = true;
                if Instant::now() >= next_checkpoint {
                    checkpoint(pipeline, source, c, &mut summary).await?;
                    uncommitted = false;
                    next_checkpoint = Instant::now() + c.interval;
                }
            }
        }
    }
    crate::pipeline::finish(pipeline, sink, &mut features).await?;
    match &checkpoints {
        Some(c) => checkpoint(pipeline, source, c, &mut summary).await?,
        None => source.commit().await?,
    }
    Ok(summary)
}

async fn checkpoint<S: Source>(
    pipeline: &Pipeline,
    source: &mut S,
    c: &Checkpoints<'_>,
    summary: &mut LiveSummary,
) -> Result<(), RunError> {
    match c.store.save(pipeline.snapshot(), source.position()) {
        Ok(()) => {
            summary.checkpoints += 1;
            debug!(position = ?source.position(), "state saved");
            source.commit().await?;
        }
        // Without a snapshot the messages stay unacknowledged and are delivered
        // again after a restart; processing goes on.
        Err(e) => warn!(error = %e, "state snapshot failed; messages stay unacknowledged"),
    }
    Ok(())
}
