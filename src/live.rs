//! Live runner: drives the pipeline from a long-running source (NATS) into a
//! sink, with state snapshots and graceful shutdown.
//!
//! Per batch: decode → detect → dead letters and alerts published → sink
//! flushed. The query files run on a thread of their own
//! ([`BackgroundStage`]): the windows a batch closes are handed over, and a
//! run's answer goes through the feature baselines after the batch's own
//! alerts are out — a large one (hundreds of thousands of feature rows, at
//! thousands of machines) a part after each batch and the rest once input is
//! quiet, so that it never holds up the fast path's alerts for its whole
//! length. Without state snapshots the
//! batch is then committed to the source (acknowledged). With snapshots, the pipeline's state is written every
//! `state.interval` (and whenever input pauses), and only then is everything
//! up to it committed: the acknowledged stream position and the saved state
//! always agree, so a process killed at any instant resumes exactly where its
//! state says, re-raising the same alerts with the same ids.
//!
//! Shutdown (SIGTERM or Ctrl-C sets the watch): stop taking input, push what is
//! in hand through the pipeline, publish and flush, write the state, commit.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::features::{BackgroundStage, RunOutput};
use crate::http::Telemetry;
use crate::pipeline::{FeatureCursor, Pipeline, RunError};
use crate::sink::Sink;
use crate::source::Source;
use crate::state::StateStore;
use crate::time::wall_now;

/// Counters of one live run.
#[derive(Debug, Default, Clone, Copy)]
pub struct LiveSummary {
    pub batches: u64,
    pub checkpoints: u64,
    /// Query runs, their total time, and due runs folded into the next one
    /// because the query stage was busy.
    pub query_runs: u64,
    pub query_busy: Duration,
    pub query_deferred: u64,
    /// Machine-windows not queried because the query stage was behind.
    pub query_windows_shed: u64,
    /// Messages the source dropped because the pipeline was behind.
    pub input_dropped: u64,
}

/// The shortest wait without a batch after which input counts as quiet.
const QUIET_AT_LEAST: Duration = Duration::from_millis(5);

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
    mut features: Option<BackgroundStage>,
    telemetry: Option<&Telemetry>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<LiveSummary, RunError> {
    let mut summary = LiveSummary::default();
    // Counters for /metrics are refreshed at most every STATS_EVERY (they walk
    // every machine); `stale` says a batch went by since.
    const STATS_EVERY: Duration = Duration::from_millis(250);
    let mut stats_at = Instant::now();
    let mut stale = false;
    let mut uncommitted = false;
    let mut next_checkpoint = Instant::now()
        + checkpoints
            .as_ref()
            .map_or(Duration::MAX / 4, |c| c.interval);
    let mut stopping = *shutdown.borrow();
    if stopping {
        source.stop();
    }
    let in_flight = |f: &Option<BackgroundStage>| f.as_ref().is_some_and(|f| f.in_flight() > 0);
    // Input counts as quiet after twice the time a batch may wait to fill
    // without one.
    let quiet = (2 * source.fill_wait()).max(QUIET_AT_LEAST);
    let mut answered = Answered::default();
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
                // A query run answered while input is quiet: its alerts go out
                // now (a large run's first part; the rest between batches).
                run = next_run(&mut features), if in_flight(&features) => {
                    if let Some(run) = run {
                        answered.push(run, telemetry);
                        take_answered(pipeline, sink, &mut answered, telemetry, Part::Next).await?;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(stats_at + STATS_EVERY), if stale => {
                    if let Some(t) = telemetry {
                        t.batch(Some(pipeline.stats()), None, 0, &[], wall_now());
                    }
                    stats_at = Instant::now();
                    stale = false;
                    continue;
                }
                _ = tokio::time::sleep_until(next_checkpoint), if uncommitted => {
                    // Input paused with work not yet acknowledged: checkpoint now.
                    if let Some(c) = &checkpoints {
                        checkpoint(pipeline, source, sink, &mut features, &mut answered, telemetry, c, &mut summary).await?;
                        uncommitted = false;
                        next_checkpoint = Instant::now() + c.interval;
                    }
                    continue;
                }
                b = source.next_batch() => b?,
                // No batch for longer than the source waits to fill one
                // (`Source::fill_wait`): input is quiet, so what is left of
                // the answered runs goes through now. (A branch that is always
                // ready would cut short every batch still filling.)
                _ = tokio::time::sleep(quiet), if !answered.is_empty() => {
                    take_answered(pipeline, sink, &mut answered, telemetry, Part::All).await?;
                    continue;
                }
            }
        };
        let Some(batch) = batch else { break };
        if batch.is_empty() {
            continue;
        }
        let mut out = compute(|| pipeline.process(&batch, wall_now()));
        for (i, e) in &out.rejected {
            sink.dead_letter(&batch[*i], e).await?;
        }
        if let Some(f) = features.as_mut() {
            f.offer(out.closed.take(), false).await;
            while let Some(run) = f.ready() {
                answered.push(run, telemetry);
            }
        }
        if let Some(t) = telemetry {
            let due = stats_at.elapsed() >= STATS_EVERY;
            let stats = due.then(|| pipeline.stats());
            if due {
                stats_at = Instant::now();
            }
            stale = !due;
            t.input_dropped(source.dropped());
            t.batch(
                stats,
                source.pending(),
                out.rejected.len(),
                &out.alerts,
                wall_now(),
            );
        }
        sink.publish(&out.alerts).await?;
        sink.flush().await?;
        // The batch's own alerts are out: a part of the answered runs now.
        if !answered.is_empty() {
            take_answered(pipeline, sink, &mut answered, telemetry, Part::Next).await?;
        }
        summary.batches += 1;
        match &checkpoints {
            None => source.commit().await?,
            Some(c) => {
                uncommitted = true;
                if Instant::now() >= next_checkpoint {
                    checkpoint(
                        pipeline,
                        source,
                        sink,
                        &mut features,
                        &mut answered,
                        telemetry,
                        c,
                        &mut summary,
                    )
                    .await?;
                    uncommitted = false;
                    next_checkpoint = Instant::now() + c.interval;
                }
            }
        }
    }
    let mut out = pipeline.finish();
    if let Some(f) = features.as_mut() {
        f.offer(out.closed.take(), true).await;
    }
    sink.publish(&out.alerts).await?;
    answer_runs(pipeline, sink, &mut features, &mut answered, telemetry).await?;
    if let Some(t) = telemetry {
        t.batch(Some(pipeline.stats()), None, 0, &out.alerts, wall_now());
    }
    match &checkpoints {
        Some(c) => {
            checkpoint(
                pipeline,
                source,
                sink,
                &mut features,
                &mut answered,
                telemetry,
                c,
                &mut summary,
            )
            .await?
        }
        None => source.commit().await?,
    }
    summary.input_dropped = source.dropped();
    if let Some(f) = &features {
        summary.query_runs = f.runs;
        summary.query_busy = f.busy;
        summary.query_deferred = f.deferred();
        summary.query_windows_shed = f.shed();
    }
    Ok(summary)
}

/// Runs a stretch of the pipeline's own work (milliseconds of CPU) so that
/// the runtime's other tasks — the NATS connection reading the next messages
/// and writing alerts, the inbox — are not held up behind it: on a
/// multi-thread runtime this worker hands its queue to another thread for the
/// duration ([`tokio::task::block_in_place`]); elsewhere it just runs.
fn compute<T>(work: impl FnOnce() -> T) -> T {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// The next query run's output (pending forever without a stage, for `select!`).
async fn next_run(features: &mut Option<BackgroundStage>) -> Option<RunOutput> {
    match features {
        Some(f) => f.next().await,
        None => std::future::pending().await,
    }
}

/// Query runs answered and not yet through the feature baselines, oldest
/// first, the first one part-way.
#[derive(Default)]
struct Answered {
    runs: VecDeque<(RunOutput, FeatureCursor)>,
}

/// How much of the answered runs to take.
#[derive(Clone, Copy)]
enum Part {
    /// The next part: the whole backlog up to [`Answered::WHOLE`] feature
    /// rows, an [`Answered::SPREAD`]th of it past that.
    Next,
    /// Everything answered.
    All,
}

impl Answered {
    /// A backlog of up to this many feature rows is taken in one part (a
    /// window of the default 1,000 machines is 43,000 rows, about 2.4 ms of the
    /// loop's time at 56 ns a row in `cargo bench --bench rooms -- baselines`).
    const WHOLE: usize = 65_536;
    /// A larger backlog is spread over this many parts (at 10,000 machines a
    /// run of 430,000 rows, about 3 ms a part instead of 25-90 ms at once),
    /// few enough that it is taken faster than big batches answer new runs.
    const SPREAD: usize = 8;

    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn push(&mut self, run: RunOutput, telemetry: Option<&Telemetry>) {
        if let Some(t) = telemetry {
            t.query_run(&run.timings);
        }
        let cursor = FeatureCursor::new(&run);
        self.runs.push_back((run, cursor));
    }

    /// Feature rows not yet observed (a handful of runs at most are here).
    fn left(&self) -> usize {
        self.runs.iter().map(|(run, cursor)| cursor.left(run)).sum()
    }

    /// Takes `part` of the runs, oldest first; the alerts it raised.
    fn observe(&mut self, pipeline: &mut Pipeline, part: Part) -> Vec<crate::alerts::Alert> {
        let left = self.left();
        let mut budget = match part {
            Part::Next if left > Self::WHOLE => left.div_ceil(Self::SPREAD),
            _ => usize::MAX,
        };
        let mut alerts = Vec::new();
        while let Some((run, cursor)) = self.runs.front_mut() {
            let before = cursor.left(run);
            alerts.extend(pipeline.observe_features_part(run, cursor, budget, wall_now()));
            budget = budget.saturating_sub(before - cursor.left(run));
            if cursor.done() {
                self.runs.pop_front();
            }
            if budget == 0 {
                break;
            }
        }
        alerts
    }
}

/// `part` of the answered runs through the feature baselines, its alerts
/// published and flushed.
async fn take_answered<K: Sink>(
    pipeline: &mut Pipeline,
    sink: &mut K,
    answered: &mut Answered,
    telemetry: Option<&Telemetry>,
    part: Part,
) -> Result<(), RunError> {
    let alerts = compute(|| answered.observe(pipeline, part));
    if let Some(t) = telemetry {
        t.alerts(&alerts);
    }
    sink.publish(&alerts).await?;
    sink.flush().await?;
    Ok(())
}

/// Waits for every query run in flight, then takes every answered run and
/// publishes their alerts, so that what a snapshot saves (feature baselines,
/// alert books) includes them.
async fn answer_runs<K: Sink>(
    pipeline: &mut Pipeline,
    sink: &mut K,
    features: &mut Option<BackgroundStage>,
    answered: &mut Answered,
    telemetry: Option<&Telemetry>,
) -> Result<(), RunError> {
    if let Some(f) = features.as_mut() {
        while let Some(run) = f.next().await {
            answered.push(run, telemetry);
        }
    }
    take_answered(pipeline, sink, answered, telemetry, Part::All).await
}

#[allow(clippy::too_many_arguments)]
async fn checkpoint<S: Source, K: Sink>(
    pipeline: &mut Pipeline,
    source: &mut S,
    sink: &mut K,
    features: &mut Option<BackgroundStage>,
    answered: &mut Answered,
    telemetry: Option<&Telemetry>,
    c: &Checkpoints<'_>,
    summary: &mut LiveSummary,
) -> Result<(), RunError> {
    answer_runs(pipeline, sink, features, answered, telemetry).await?;
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

#[cfg(test)]
mod tests {
    use super::{Answered, Part, compute};
    use crate::features::{FeatureRow, RunNames, RunOutput};
    use crate::pipeline::Pipeline;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    /// Whether a task spawned beside a long `compute` ran while it computed,
    /// on a runtime of one worker (where only a handed-over queue lets it).
    fn others_run_meanwhile(rt: &tokio::runtime::Runtime) -> bool {
        let flag = Arc::new(AtomicBool::new(false));
        let seen = flag.clone();
        let work = rt.spawn(async move {
            compute(|| {
                let until = Instant::now() + Duration::from_secs(5);
                while !seen.load(Ordering::Acquire) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                seen.load(Ordering::Acquire)
            })
        });
        // Spawned once the work holds the worker: it can only run elsewhere.
        std::thread::sleep(Duration::from_millis(50));
        rt.spawn(async move { flag.store(true, Ordering::Release) });
        rt.block_on(work).expect("the work task ends")
    }

    #[test]
    fn the_runtime_goes_on_while_the_pipeline_computes() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("a runtime");
        assert!(others_run_meanwhile(&rt));
    }

    #[test]
    fn on_a_current_thread_runtime_the_work_just_runs() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        assert_eq!(rt.block_on(async { compute(|| 6 * 7) }), 42);
    }

    /// A query run of `machines` × `features` rows, one window.
    fn run(machines: u32, features: u32) -> RunOutput {
        let rows = (0..machines)
            .flat_map(|m| {
                (0..features).map(move |k| FeatureRow {
                    machine: m,
                    feature: k,
                    value: f64::from(k),
                    ts: 1_795_766_400_000,
                })
            })
            .collect();
        RunOutput {
            features: rows,
            names: RunNames {
                machines: (0..machines).map(|m| format!("m-{m}").into()).collect(),
                features: (0..features)
                    .map(|k| format!("f.sql:x{k}").into())
                    .collect(),
            },
            ..RunOutput::default()
        }
    }

    #[test]
    fn a_large_backlog_is_taken_in_eighths_and_a_small_one_at_once() {
        let mut p = Pipeline::new(&crate::config::Config::default());
        let mut answered = Answered::default();
        // 100,000 rows, groups of 10: an eighth is 12,500 rows, then an
        // eighth of what is left, up to the end of a group.
        answered.push(run(10_000, 10), None);
        answered.observe(&mut p, Part::Next);
        assert_eq!(answered.left(), 87_500);
        answered.observe(&mut p, Part::Next);
        assert_eq!(answered.left(), 87_500 - 10_940);
        // Behind it, a run the size of the default plant's window.
        answered.push(run(1_000, 43), None);
        answered.observe(&mut p, Part::All);
        assert!(answered.is_empty());
        answered.push(run(1_000, 43), None);
        answered.observe(&mut p, Part::Next);
        assert!(answered.is_empty(), "43,000 rows go at once");
    }
}
