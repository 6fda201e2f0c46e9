//! Fast path: per-reading detectors on each machine's sensors, in event order.
//!
//! For every telemetry message, [`Detectors::observe`] looks at its readings
//! together — first to see whether the machine is changing operating mode
//! ([`mode`]), then each reading against its (machine, metric) baseline:
//! [`spike`] (one-step prediction residual), [`shift`] (CUSUM against a slow
//! reference), [`stuck`] (frozen value) and [`range`] (learned envelope). What
//! departs comes out as [`Finding`]s carrying a tail probability (as a
//! surprise, -log10 p); scoring and dedup happen in [`crate::alerts`].
//!
//! Each machine *learns* for `baseline.warmup` of event time from its first
//! message, then *protects*. While protecting, a reading with a finding at or
//! above the alert threshold does not update its baseline, so an attacker
//! cannot teach the baseline his signal. Late (out-of-order) and future-dated
//! readings are scored but never update a baseline.

pub mod flows;
pub mod identity;
pub mod mode;
pub mod range;
pub mod replay;
pub mod sequence;
pub mod shift;
pub mod spike;
pub mod stuck;
pub mod traffic;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::score::{normal_two_sided_surprise, surprise_from_score};
use crate::time::Millis;

use mode::ModeTracker;
use range::Envelope;
use shift::Drift;
use spike::{Predictor, Taus};
use stuck::Freeze;

/// Most metrics tracked per machine; readings of further metrics are counted and skipped.
pub const MAX_METRICS_PER_MACHINE: usize = 256;

/// What was found (the contract's canonical `kind` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    SensorSpike,
    SensorShift,
    SensorStuck,
    SensorOutOfRange,
    Multivariate,
    TrafficRate,
    TrafficSize,
    SequenceGap,
    SequenceReplay,
    ClockSkew,
    UnknownDevice,
    DeviceMismatch,
    SignatureInvalid,
    FlowNewPeer,
    FlowNewPort,
    FlowNewOp,
    FlowVolume,
    FlowFanout,
    Rule,
    /// A cap on tracked entities was hit (an extension of the contract's kinds).
    Capacity,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SensorSpike => "sensor_spike",
            Kind::SensorShift => "sensor_shift",
            Kind::SensorStuck => "sensor_stuck",
            Kind::SensorOutOfRange => "sensor_out_of_range",
            Kind::Multivariate => "multivariate",
            Kind::TrafficRate => "traffic_rate",
            Kind::TrafficSize => "traffic_size",
            Kind::SequenceGap => "sequence_gap",
            Kind::SequenceReplay => "sequence_replay",
            Kind::ClockSkew => "clock_skew",
            Kind::UnknownDevice => "unknown_device",
            Kind::DeviceMismatch => "device_mismatch",
            Kind::SignatureInvalid => "signature_invalid",
            Kind::FlowNewPeer => "flow_new_peer",
            Kind::FlowNewPort => "flow_new_port",
            Kind::FlowNewOp => "flow_new_op",
            Kind::FlowVolume => "flow_volume",
            Kind::FlowFanout => "flow_fanout",
            Kind::Rule => "rule",
            Kind::Capacity => "capacity",
        }
    }
}

/// Kind-specific numbers behind a finding, for its explanation.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    Spike {
        z: f64,
        sigma: f64,
    },
    Shift {
        statistic: f64,
        since: Millis,
        sigma: f64,
    },
    Stuck {
        since: Millis,
        duration: Millis,
        readings: u32,
        longest_learned: Millis,
    },
    Range {
        lo: f64,
        hi: f64,
        margin: f64,
    },
    /// A row of a rule query file.
    Rule {
        value: Option<f64>,
        explanation: Option<String>,
    },
    /// Traffic, identity and flow findings: the explanation is written where
    /// the finding is made; `numeric` says whether value/expected mean anything.
    Note {
        text: String,
        numeric: bool,
    },
    /// A learned model's finding: its explanation and each feature's share.
    Multivariate {
        text: String,
        contributions: Vec<(String, f64)>,
    },
}

/// One departure from a baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub machine: u32,
    pub device: u32,
    pub metric: u32,
    pub kind: Kind,
    /// Which baseline produced it (the alert's `detector`).
    pub detector: &'static str,
    /// Event time of the observation.
    pub ts: Millis,
    pub value: f64,
    pub expected: f64,
    /// -log10 of the tail probability.
    pub surprise: f64,
    pub detail: Detail,
    /// A severity fixed by the finding's source (rule files), instead of one from the score.
    pub severity: Option<crate::score::Severity>,
    /// What the finding is about when it is not a metric (a device, a peer, a port);
    /// `metric` then holds a key that keeps its alerts apart in dedup.
    pub subject: Option<String>,
}

impl Finding {
    /// A finding about `subject` (dedup key `key`), explained by `text`.
    #[allow(clippy::too_many_arguments)]
    pub fn note(
        machine: u32,
        device: u32,
        kind: Kind,
        detector: &'static str,
        ts: Millis,
        key: u32,
        subject: String,
        surprise: f64,
        text: String,
    ) -> Finding {
        Finding {
            machine,
            device,
            metric: key,
            kind,
            detector,
            ts,
            value: 0.0,
            expected: 0.0,
            surprise,
            detail: Detail::Note {
                text,
                numeric: false,
            },
            severity: None,
            subject: Some(subject),
        }
    }

    /// Adds the observed and expected numbers to a [`Finding::note`].
    pub fn with_values(mut self, value: f64, expected: f64) -> Finding {
        self.value = value;
        self.expected = expected;
        if let Detail::Note { numeric, .. } = &mut self.detail {
            *numeric = true;
        }
        self
    }
}

/// State of one (machine, metric).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetricState {
    pub metric: u32,
    pub predictor: Predictor,
    pub drift: Drift,
    /// Only where the stuck detector runs (sensors; not query features by
    /// default): boxed, it costs a feature baseline 8 bytes instead of 80.
    #[serde(default)]
    pub freeze: Option<Box<Freeze>>,
    pub envelope: Envelope,
    /// Settled since the machine's last mode change (drift is judged only when settled).
    pub settled: bool,
    /// When the sensor last stopped being settled.
    pub unsettled_since: Millis,
    /// Level and time of the last settling probe.
    pub probe_level: f64,
    pub probe_ts: Millis,
    /// Start of the current uninterrupted run of anomalous readings.
    pub anomalous_since: MaybeMillis,
}

/// An event time that may be absent, in 8 bytes where `Option<Millis>` takes
/// 16: a [`MetricState`] is 168 bytes instead of 176, 4 MB less at 10,000
/// machines × 8 sensors (510,000 states with the query features). Written
/// and read as an `Option<Millis>`, so snapshots keep their format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaybeMillis(Millis);

impl MaybeMillis {
    /// Absent (no event time is this early).
    pub const NONE: MaybeMillis = MaybeMillis(Millis::MIN);

    pub fn get(self) -> Option<Millis> {
        (self != Self::NONE).then_some(self.0)
    }

    /// The time held, or `ts` when none is (and then holds it).
    pub fn get_or_insert(&mut self, ts: Millis) -> Millis {
        if *self == Self::NONE {
            self.0 = ts;
        }
        self.0
    }
}

impl Default for MaybeMillis {
    fn default() -> Self {
        Self::NONE
    }
}

impl From<Option<Millis>> for MaybeMillis {
    fn from(t: Option<Millis>) -> Self {
        t.map_or(Self::NONE, MaybeMillis)
    }
}

impl Serialize for MaybeMillis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(s)
    }
}

impl<'de> Deserialize<'de> for MaybeMillis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<Millis>::deserialize(d).map(MaybeMillis::from)
    }
}

/// State of one machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    pub first_ts: Millis,
    pub protecting: bool,
    pub mode: ModeTracker,
    pub metrics: Vec<MetricState>,
    /// Readings skipped because the machine has too many metrics.
    pub skipped: u64,
}

/// The parameters the detectors run with, in the units they use.
#[derive(Debug, Clone)]
struct Params {
    warmup: Millis,
    taus: Taus,
    /// The shift detector's reference level follows at this pace.
    reference: spike::Decay,
    min_surprise: f64,
    /// The |z| below which a spike cannot reach `min_surprise` (its tail is not computed).
    spike_z_floor: f64,
    spike: bool,
    shift: bool,
    slack: f64,
    threshold: f64,
    rebase_after: Millis,
    stuck: bool,
    stuck_min: Millis,
    stuck_factor: f64,
    range: bool,
    margin: f64,
    move_z: f64,
    min_moving: usize,
    hold: Millis,
    settle_max: Millis,
    settling_sigma: f64,
}

/// Per-machine baselines for every sensor.
pub struct Detectors {
    p: Params,
    /// The same, for a batch's second shard (see [`Detectors::observe_batch`]).
    p2: Params,
    machines: Vec<Option<MachineState>>,
    /// Scratch per message: (slot, value, z); the second for a batch's
    /// second shard.
    scratch: Vec<(usize, f64, f64)>,
    scratch2: Vec<(usize, f64, f64)>,
    /// Whether a big batch is split over two threads.
    parallel: bool,
    /// The thread that observes a big batch's second shard, started with the
    /// first one (shared with the pipeline's other rooms, see [`Detectors::share`]).
    spare: crate::helper::Spare,
    /// Machines that entered protection since the last call to [`Detectors::take_newly_protecting`].
    newly_protecting: Vec<u32>,
}

impl Detectors {
    pub fn new(cfg: &Config) -> Self {
        let s = |ms: Millis| ms as f64 / 1000.0;
        let b = &cfg.baseline;
        let d = &cfg.detect;
        let min_surprise = surprise_from_score(cfg.alerts.min_score);
        let p = Params {
            warmup: b.warmup,
            taus: Taus::new(s(b.level_tau), s(b.trend_tau), s(b.scale_tau)),
            reference: spike::Decay::new(s(b.reference_tau)),
            min_surprise,
            spike_z_floor: crate::score::z_floor_for_surprise(min_surprise),
            spike: d.spike.enabled,
            shift: d.shift.enabled,
            slack: d.shift.slack,
            threshold: d.shift.threshold,
            rebase_after: b.rebase_after,
            stuck: d.stuck.enabled,
            stuck_min: d.stuck.min_duration,
            stuck_factor: d.stuck.learned_run_factor,
            range: d.range.enabled,
            margin: d.range.margin,
            move_z: d.mode.move_z,
            min_moving: d.mode.min_moving,
            hold: d.mode.hold,
            settle_max: d.mode.settle_max,
            settling_sigma: d.mode.settling_sigma,
        };
        Detectors {
            p2: p.clone(),
            p,
            machines: Vec::new(),
            scratch: Vec::new(),
            scratch2: Vec::new(),
            parallel: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
            spare: crate::helper::Spare::default(),
            newly_protecting: Vec::new(),
        }
    }

    /// Every machine's state, indexed by machine id, for a snapshot.
    pub fn machines(&self) -> &[Option<MachineState>] {
        &self.machines
    }

    /// Restores machine states from a snapshot.
    pub fn restore(&mut self, machines: Vec<Option<MachineState>>) {
        self.machines = machines;
    }

    /// The state of a machine, if it has sent anything.
    pub fn machine(&self, machine: u32) -> Option<&MachineState> {
        self.machines.get(machine as usize).and_then(Option::as_ref)
    }

    /// How many machines are learning and protecting.
    pub fn phase_counts(&self) -> (usize, usize) {
        let mut counts = (0, 0);
        for m in self.machines.iter().flatten() {
            if m.protecting {
                counts.1 += 1;
            } else {
                counts.0 += 1;
            }
        }
        counts
    }

    /// How many (machine, metric) baselines are held.
    pub fn baselines(&self) -> usize {
        self.machines
            .iter()
            .flatten()
            .map(|m| m.metrics.len())
            .sum()
    }

    /// Machines that started protecting since the last call.
    pub fn take_newly_protecting(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.newly_protecting)
    }

    /// Observes one telemetry message of `machine` sent by `device` at `ts`.
    /// `readings` are (metric id, value) pairs with nulls already dropped.
    /// `trusted` is false for late or future-dated messages: they are scored
    /// but never update a baseline.
    pub fn observe(
        &mut self,
        machine: u32,
        device: u32,
        ts: Millis,
        trusted: bool,
        readings: &[(u32, f64)],
        out: &mut Vec<Finding>,
    ) {
        let slot = crate::intern::slot(&mut self.machines, machine);
        let o = Observation {
            machine,
            device,
            ts,
            trusted,
            readings: (0, readings.len() as u32),
        };
        if observe_one(&self.p, slot, &mut self.scratch, &o, readings, out) {
            self.newly_protecting.push(machine);
        }
    }

    /// Splits big batches with the helper thread of `spare` (the pipeline
    /// gives its rooms one between them) instead of one of its own.
    pub fn share(&mut self, spare: crate::helper::Spare) {
        self.spare = spare;
    }

    /// Observes a batch of messages, in order per machine: the same findings
    /// and state as [`Detectors::observe`] on each in turn. A big batch is
    /// split by machine id into two shards observed at once on two threads
    /// (each owns its machines' state, so no lock is taken); its findings
    /// come back per message.
    pub fn observe_batch(
        &mut self,
        batch: &[Observation],
        readings: &[(u32, f64)],
    ) -> BatchFindings {
        let Some(top) = batch.iter().map(|o| o.machine).max() else {
            return BatchFindings::default();
        };
        crate::intern::slot(&mut self.machines, top);
        let split = if self.parallel && readings.len() >= PARALLEL_READINGS {
            median_machine(batch)
        } else {
            0
        };
        // A helper only for a batch that splits.
        let helper = if split != 0 { self.spare.get() } else { None };
        let found = match helper {
            Some(h) => {
                let (low, high) = self.machines.split_at_mut(split as usize);
                let mine = Shard {
                    p: &mut self.p,
                    machines: low,
                    base: 0,
                    scratch: &mut self.scratch,
                    batch,
                    readings,
                };
                // The second shard's own parameters: their `exp` memos are cells.
                let theirs = Shard {
                    p: &mut self.p2,
                    machines: high,
                    base: split,
                    scratch: &mut self.scratch2,
                    batch,
                    readings,
                };
                let (mine, theirs) = h.join(|| mine.run(), move || theirs.run());
                vec![mine, theirs]
            }
            // A small batch, or no second thread to be had: in one piece.
            None => vec![
                Shard {
                    p: &mut self.p,
                    machines: &mut self.machines,
                    base: 0,
                    scratch: &mut self.scratch,
                    batch,
                    readings,
                }
                .run(),
            ],
        };
        let mut newly: Vec<(u32, u32)> =
            found.iter().flat_map(|f| f.newly.iter().copied()).collect();
        newly.sort_unstable();
        self.newly_protecting
            .extend(newly.into_iter().map(|(_, m)| m));
        BatchFindings {
            parts: found
                .into_iter()
                .map(|f| Part {
                    findings: f.findings.into_iter(),
                    ends: f.ends,
                    taken: 0,
                })
                .collect(),
        }
    }
}

/// Batches with fewer readings are observed on one thread: handing a shard
/// over costs a wake-up, and the machines it takes have their state in the
/// other core's cache. With the helper thread (`benches/rooms.rs`, 2026-12-07)
/// the 1,500 messages of 1,000 machines (6,000 readings) take 1.7–1.8 ms, as
/// on one thread; 80 array messages (32,000) 3.9–4.2 ms against 4.5; a window
/// of 43 features for 1,000 machines 1.9 ms against 2.5. A thread started
/// for each batch instead lost at 6,000 readings (2.1–2.2 ms).
pub const PARALLEL_READINGS: usize = 4096;

/// One message's turn in [`Detectors::observe_batch`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub machine: u32,
    pub device: u32,
    pub ts: Millis,
    pub trusted: bool,
    /// Where its readings are in the batch's readings (start, end).
    pub readings: (u32, u32),
}

impl Observation {
    /// Its readings among the batch's.
    pub fn of<'r>(&self, readings: &'r [(u32, f64)]) -> &'r [(u32, f64)] {
        &readings[self.readings.0 as usize..self.readings.1 as usize]
    }
}

/// The findings of a batch, taken message by message in order.
#[derive(Debug, Default)]
pub struct BatchFindings {
    parts: Vec<Part>,
}

#[derive(Debug)]
struct Part {
    findings: std::vec::IntoIter<Finding>,
    /// Findings of the part up to and including each message.
    ends: Vec<u32>,
    taken: u32,
}

impl BatchFindings {
    /// How many threads observed the batch (two shards, or one piece).
    pub fn shards(&self) -> usize {
        self.parts.len()
    }

    /// Moves the findings of message `i` onto `out`; how many. Messages
    /// are taken in order, each once.
    pub fn take(&mut self, i: usize, out: &mut Vec<Finding>) -> usize {
        let mut n = 0;
        for part in &mut self.parts {
            let end = part.ends.get(i).copied().unwrap_or(part.taken);
            let k = (end - part.taken) as usize;
            out.extend(part.findings.by_ref().take(k));
            part.taken = end;
            n += k;
        }
        n
    }
}

/// What one shard of machines found in a batch.
struct ShardFound {
    findings: Vec<Finding>,
    ends: Vec<u32>,
    /// (message index, machine) of machines that started protecting.
    newly: Vec<(u32, u32)>,
}

/// One shard of a batch: the machines from id `base` on that `machines`
/// holds, with the parameters and scratch of the thread that observes it.
struct Shard<'a> {
    p: &'a mut Params,
    machines: &'a mut [Option<MachineState>],
    base: u32,
    scratch: &'a mut Vec<(usize, f64, f64)>,
    batch: &'a [Observation],
    readings: &'a [(u32, f64)],
}

impl Shard<'_> {
    /// Observes the batch's messages of the shard's machines; the others are skipped.
    fn run(self) -> ShardFound {
        let Shard {
            p,
            machines,
            base,
            scratch,
            batch,
            readings,
        } = self;
        let mut found = ShardFound {
            findings: Vec::new(),
            ends: Vec::with_capacity(batch.len()),
            newly: Vec::new(),
        };
        for (i, o) in batch.iter().enumerate() {
            let slot = o.machine.checked_sub(base);
            if let Some(slot) = slot.and_then(|m| machines.get_mut(m as usize))
                && observe_one(p, slot, scratch, o, o.of(readings), &mut found.findings)
            {
                found.newly.push((i as u32, o.machine));
            }
            found.ends.push(found.findings.len() as u32);
        }
        found
    }
}

/// The machine id that splits a batch's messages in halves: the median.
/// 0 (no split) when no message's machine is below it — one machine, or
/// half of the messages from the lowest — so neither thread is left idle.
fn median_machine(batch: &[Observation]) -> u32 {
    let mut ids: Vec<u32> = batch.iter().map(|o| o.machine).collect();
    let mid = ids.len() / 2;
    let (below, &mut m, _) = ids.select_nth_unstable(mid);
    if below.iter().any(|&b| b < m) { m } else { 0 }
}

/// One message through its machine's baselines; true when the machine
/// started protecting with it.
fn observe_one(
    p: &Params,
    slot: &mut Option<MachineState>,
    scratch: &mut Vec<(usize, f64, f64)>,
    o: &Observation,
    readings: &[(u32, f64)],
    out: &mut Vec<Finding>,
) -> bool {
    let Observation {
        machine,
        device,
        ts,
        trusted,
        ..
    } = *o;
    let m = slot.get_or_insert_with(|| MachineState {
        first_ts: ts,
        protecting: false,
        mode: ModeTracker::default(),
        metrics: Vec::new(),
        skipped: 0,
    });
    let mut started = false;
    if !m.protecting && trusted && ts >= m.first_ts.saturating_add(p.warmup) {
        m.protecting = true;
        started = true;
        // Drift is measured from where learning left each sensor.
        for s in &mut m.metrics {
            let level = s.predictor.level;
            s.drift.anchor(level, ts);
        }
    }
    let learning = !m.protecting;

    // Pass 1: z of every reading, and how many sensors moved together.
    scratch.clear();
    let mut moving = 0;
    for (k, &(metric, x)) in readings.iter().enumerate() {
        // A machine's readings (and a run's features) come in the same
        // order message after message, so the k-th reading is nearly
        // always in slot k: looked up there first, a group of 43 query
        // features costs 43 comparisons instead of some 900.
        let hinted = m.metrics.get(k).is_some_and(|s| s.metric == metric);
        let found = if hinted {
            Some(k)
        } else {
            m.metrics.iter().position(|s| s.metric == metric)
        };
        let slot = match found {
            Some(slot) => slot,
            None if m.metrics.len() < MAX_METRICS_PER_MACHINE => {
                // Room for this message's readings still to come: a
                // machine's 43 query features, met in one group, take 43
                // slots (doubling would hold 64, eight at a time 48; 168
                // bytes a slot, 9 MB more at 10,000 machines).
                if m.metrics.len() == m.metrics.capacity() {
                    let wanted =
                        (readings.len() - k).min(MAX_METRICS_PER_MACHINE - m.metrics.len());
                    m.metrics.reserve_exact(wanted);
                }
                m.metrics.push(MetricState {
                    metric,
                    ..MetricState::default()
                });
                m.metrics.len() - 1
            }
            None => {
                m.skipped += 1;
                continue;
            }
        };
        let z = m.metrics[slot].predictor.z(ts, x, &p.taus);
        if z.abs() >= p.move_z {
            moving += 1;
        }
        scratch.push((slot, x, z));
    }
    let in_transition = if trusted {
        m.mode.observe(ts, moving, p.min_moving, p.hold)
    } else {
        m.mode.in_transition(ts)
    };
    if in_transition {
        for s in &mut m.metrics {
            if s.settled {
                s.settled = false;
                s.unsettled_since = ts;
            }
            s.probe_ts = ts;
            s.probe_level = s.predictor.level;
        }
    }

    // Pass 2: judge each reading, then let the normal ones teach the baseline.
    for &(slot, x, z) in scratch.iter() {
        let s = &mut m.metrics[slot];
        let in_order = trusted && ts >= s.predictor.last_ts;
        let first = out.len();
        if !learning {
            judge(p, machine, device, ts, x, z, in_transition, s, out);
        }
        if p.stuck {
            let frozen = s
                .freeze
                .get_or_insert_with(Box::default)
                .observe(ts, x, learning, p.stuck_min, p.stuck_factor)
                .filter(|f| f.surprise >= p.min_surprise);
            if let Some(f) = frozen {
                out.push(Finding {
                    machine,
                    device,
                    metric: s.metric,
                    kind: Kind::SensorStuck,
                    detector: "frozen_run",
                    ts,
                    value: x,
                    expected: s.predictor.level,
                    surprise: f.surprise,
                    detail: Detail::Stuck {
                        since: f.since,
                        duration: f.duration,
                        readings: f.readings,
                        longest_learned: f.longest_learned,
                    },
                    severity: None,
                    subject: None,
                });
            }
        }
        let anomalous = !learning && out.len() > first;
        if !in_order {
            continue;
        }
        if !anomalous {
            s.anomalous_since = MaybeMillis::NONE;
            learn(p, ts, x, in_transition, s);
        } else if ts - s.anomalous_since.get_or_insert(ts) >= p.rebase_after {
            // Anomalous for too long to be a transient: start the short-term
            // baselines afresh from here. The alerts raised stand, and the
            // scale and envelope keep what they learned.
            s.anomalous_since = MaybeMillis::NONE;
            s.predictor.rebase(ts, x);
            s.drift.anchor(x, ts);
        } else {
            s.predictor.skip(ts, &p.taus);
        }
    }
    started
}

/// Runs the spike, range and drift checks on one reading.
#[allow(clippy::too_many_arguments)]
fn judge(
    p: &Params,
    machine: u32,
    device: u32,
    ts: Millis,
    x: f64,
    z: f64,
    in_transition: bool,
    s: &MetricState,
    out: &mut Vec<Finding>,
) {
    let pred = &s.predictor;
    if !pred.ready() {
        return;
    }
    let sigma = pred.sigma();
    let finding = |kind, detector, expected, surprise, detail| Finding {
        machine,
        device,
        metric: s.metric,
        kind,
        detector,
        ts,
        value: x,
        expected,
        surprise,
        detail,
        severity: None,
        subject: None,
    };
    if p.spike && !in_transition {
        let z = if s.settled { z } else { z / p.settling_sigma };
        // Nearly every reading is ordinary: its tail (a logarithm and a
        // division) need not be computed to know it is under the bar.
        let ordinary = z.abs() < p.spike_z_floor;
        let surprise = (!ordinary).then(|| normal_two_sided_surprise(z));
        if let Some(surprise) = surprise.filter(|&s| s >= p.min_surprise) {
            out.push(finding(
                Kind::SensorSpike,
                "holt_z",
                pred.predict(ts, &p.taus),
                surprise,
                Detail::Spike { z, sigma },
            ));
        }
    }
    if p.range
        && let Some(o) = s.envelope.check(x, sigma, p.margin)
        && o.surprise >= p.min_surprise
    {
        out.push(finding(
            Kind::SensorOutOfRange,
            "envelope",
            o.bound,
            o.surprise,
            Detail::Range {
                lo: o.lo,
                hi: o.hi,
                margin: o.margin,
            },
        ));
    }
    if p.shift && s.settled && !in_transition && s.drift.anchored {
        let c = s.drift.peek(ts, x, sigma, p.slack);
        let surprise = Drift::surprise(c.statistic, p.threshold);
        if surprise >= p.min_surprise {
            out.push(finding(
                Kind::SensorShift,
                "cusum",
                c.reference,
                surprise,
                Detail::Shift {
                    statistic: c.statistic,
                    since: c.since,
                    sigma: c.sigma,
                },
            ));
        }
    }
}

/// Lets a reading judged normal update the (machine, metric) baseline.
fn learn(p: &Params, ts: Millis, x: f64, in_transition: bool, s: &mut MetricState) {
    let dt = ((ts - s.predictor.last_ts) as f64 / 1000.0).clamp(0.0, p.reference.tau());
    s.predictor.update(ts, x, &p.taus, in_transition);
    s.envelope.learn(x);
    let sigma = s.predictor.sigma();
    if !s.drift.anchored {
        s.drift.anchor(x, ts);
        s.settled = true;
        return;
    }
    if !s.settled {
        // Follow the new level until this sensor has settled — moved less than
        // two sigmas over a trend time constant — then start afresh from it.
        s.drift.reference = s.predictor.level;
        let probe_every = (p.taus.trend() * 1000.0) as Millis;
        if !in_transition && s.predictor.ready() && ts - s.probe_ts >= probe_every {
            let still = (s.predictor.level - s.probe_level).abs() < 2.0 * sigma;
            if still || ts - s.unsettled_since >= p.settle_max {
                s.settled = true;
                s.drift.anchor(s.predictor.level, ts);
            } else {
                s.probe_ts = ts;
                s.probe_level = s.predictor.level;
            }
        }
        return;
    }
    s.drift.update(ts, x, p.reference.after(dt), sigma, p.slack);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state of one metric is the bulk of memory at 10,000 machines: no
    /// field may grow it unnoticed.
    #[test]
    fn a_metric_state_takes_168_bytes() {
        assert_eq!(std::mem::size_of::<MetricState>(), 168);
        assert_eq!(std::mem::size_of::<MaybeMillis>(), 8);
    }

    /// Snapshots write the start of an anomalous run as before (`null` or a
    /// number) and read it back.
    #[test]
    fn an_absent_time_is_written_as_null_and_read_back() {
        let mut s = MetricState::default();
        let json = serde_json::to_value(&s).expect("serializes");
        assert_eq!(json["anomalous_since"], serde_json::Value::Null);
        assert_eq!(
            s.anomalous_since.get_or_insert(1_700_000_000_000),
            1_700_000_000_000
        );
        assert_eq!(s.anomalous_since.get_or_insert(5), 1_700_000_000_000);
        let json = serde_json::to_string(&s).expect("serializes");
        assert!(json.contains("\"anomalous_since\":1700000000000"), "{json}");
        let back: MetricState = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back.anomalous_since.get(), Some(1_700_000_000_000));
        let none: MaybeMillis = serde_json::from_str("null").expect("reads null");
        assert_eq!(none.get(), None);
    }

    /// A batch observed in two shards at once finds what the same messages
    /// observed one by one find, in the same order, and leaves the same
    /// baselines: which thread holds a machine changes nothing.
    #[test]
    fn a_batch_in_two_shards_finds_what_one_message_at_a_time_finds() {
        let mut cfg = Config::default();
        cfg.baseline.warmup = 20_000;
        let (machines, steps, sensors) = (60u32, 120i64, 6u32);
        let mut batch = Vec::new();
        let mut readings = Vec::new();
        for step in 0..steps {
            for machine in 0..machines {
                let start = readings.len() as u32;
                for metric in 0..sensors {
                    let wave = ((step as f64) * 0.3 + (machine + metric) as f64).sin();
                    // A spike on some machines late in the run, a frozen
                    // sensor on others.
                    let x = if step == 100 && machine % 3 == 0 && metric == 2 {
                        50.0
                    } else if metric == 0 && machine % 5 == 1 && step > 60 {
                        1.0
                    } else {
                        10.0 * metric as f64 + wave
                    };
                    readings.push((metric, x));
                }
                batch.push(Observation {
                    machine,
                    device: machine + 100,
                    ts: 1_000_000 + step * 1000 + machine as i64,
                    trusted: step % 17 != 5,
                    readings: (start, readings.len() as u32),
                });
            }
        }
        assert!(machines as usize * 12 * sensors as usize >= PARALLEL_READINGS);

        let mut one = Detectors::new(&cfg);
        let mut expected = Vec::new();
        for o in &batch {
            one.observe(
                o.machine,
                o.device,
                o.ts,
                o.trusted,
                o.of(&readings),
                &mut expected,
            );
        }

        let mut sharded = Detectors::new(&cfg);
        sharded.parallel = true;
        let mut got = Vec::new();
        // In batches of twelve steps, so that each meets baselines the ones
        // before built, and the loop and the helper each take some second shards.
        let mut threads = Vec::new();
        for part in batch.chunks(machines as usize * 12) {
            let mut found = sharded.observe_batch(part, &readings);
            threads.push(found.shards());
            for i in 0..part.len() {
                found.take(i, &mut got);
            }
        }
        assert_eq!(threads, [2; 10]);
        assert!(expected.iter().any(|f| f.kind == Kind::SensorSpike));
        assert!(expected.iter().any(|f| f.kind == Kind::SensorStuck));
        assert_eq!(got, expected);
        assert_eq!(sharded.take_newly_protecting(), one.take_newly_protecting());
        let state = |d: &Detectors| serde_json::to_string(d.machines()).expect("serializes");
        assert_eq!(state(&sharded), state(&one));
    }

    /// Findings are taken per message in order: a message's own, none of
    /// its neighbours'.
    #[test]
    fn the_findings_of_a_batch_are_taken_per_message() {
        let mut cfg = Config::default();
        cfg.baseline.warmup = 20_000;
        let mut d = Detectors::new(&cfg);
        let sensors = 4u32;
        let value = |step: i64, metric: u32| {
            10.0 * metric as f64 + (step as f64 * 0.3 + metric as f64).sin()
        };
        // Warm each machine on steady values.
        let mut warm = Vec::new();
        for step in 0..200i64 {
            for m in 0..2 {
                let r: Vec<(u32, f64)> = (0..sensors).map(|k| (k, value(step, k))).collect();
                d.observe(m, 0, step * 1000, true, &r, &mut warm);
            }
        }
        // Four messages, machines 0 and 1 in turn; a spike in the last one only.
        let mut readings = Vec::new();
        let mut batch = Vec::new();
        for i in 0..4u32 {
            let start = readings.len() as u32;
            for k in 0..sensors {
                let spike = i == 3 && k == 1;
                readings.push((k, if spike { 900.0 } else { value(i as i64, k) }));
            }
            batch.push(Observation {
                machine: i % 2,
                device: 0,
                ts: 200_000 + 1000 * i as i64,
                trusted: true,
                readings: (start, readings.len() as u32),
            });
        }
        let mut found = d.observe_batch(&batch, &readings);
        let mut out = Vec::new();
        let counts: Vec<usize> = (0..4).map(|i| found.take(i, &mut out)).collect();
        assert_eq!(counts[..3], [0, 0, 0], "{out:?}");
        assert!(counts[3] > 0, "{warm:?}");
        assert!(out.iter().all(|f| f.machine == 1 && f.value == 900.0));
    }

    /// A batch is split at its median machine only when both halves get
    /// messages: one machine, or half the messages from the lowest, stay whole.
    #[test]
    fn a_batch_is_split_only_where_both_halves_have_messages() {
        let of = |machines: &[u32]| {
            let batch: Vec<Observation> = machines
                .iter()
                .map(|&machine| Observation {
                    machine,
                    device: 0,
                    ts: 0,
                    trusted: true,
                    readings: (0, 0),
                })
                .collect();
            median_machine(&batch)
        };
        assert_eq!(of(&[3, 1, 2, 0]), 2);
        assert_eq!(of(&[7, 7, 7, 7]), 0);
        assert_eq!(of(&[4, 4, 4, 9]), 0);
        assert_eq!(of(&[9, 4, 5, 4, 6]), 5);
    }
}
