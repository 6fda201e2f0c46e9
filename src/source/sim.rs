//! Simulator source: the simulated factory ([`crate::sim`]) as a source, in
//! process, optionally paced so that simulated time runs `speed` times faster
//! than the wall clock (for `demo`), or as fast as the pipeline takes it.

use std::time::{Duration, Instant};

use super::{Envelope, Source, SourceError};
use crate::sim::Factory;

/// Feeds the pipeline from a [`Factory`].
pub struct SimSource {
    factory: Factory,
    /// Simulated milliseconds per wall millisecond; `None` = no pacing.
    speed: Option<f64>,
    started: Option<(Instant, i64)>,
    batch: usize,
}

impl SimSource {
    pub fn new(factory: Factory, speed: Option<f64>) -> Self {
        SimSource {
            factory,
            speed,
            started: None,
            batch: 2048,
        }
    }
}

impl Source for SimSource {
    async fn next_batch(&mut self) -> Result<Option<Vec<Envelope>>, SourceError> {
        let mut out: Vec<Envelope> = Vec::with_capacity(self.batch);
        // When paced, hand over one simulated second at a time so alerts appear as they happen.
        let max_ticks = if self.speed.is_some() { 1 } else { usize::MAX };
        let mut ticks = 0;
        while out.len() < self.batch && ticks < max_ticks {
            match self.factory.next_tick() {
                Some(envs) => out.extend(envs),
                None => break,
            }
            ticks += 1;
        }
        if out.is_empty() {
            return Ok(None);
        }
        if let Some(speed) = self.speed {
            let now_sim = self.factory.now();
            let (wall0, sim0) = *self.started.get_or_insert((Instant::now(), now_sim));
            let due = wall0
                + Duration::from_secs_f64(((now_sim - sim0) as f64 / speed).max(0.0) / 1000.0);
            tokio::time::sleep_until(due.into()).await;
        }
        Ok(Some(out))
    }
}
