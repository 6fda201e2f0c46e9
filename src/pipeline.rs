//! Pipeline: wires the rooms together — the only module that knows them all.
//!
//! A batch of envelopes walks: [`decode`](crate::decode) → admission against
//! the machine's watermark ([`window`](crate::window)) → fast path
//! ([`detect`](crate::detect)) → scoring and dedup ([`alerts`](crate::alerts))
//! → the sink; on-time rows wait in their windows, and windows the watermarks
//! closed come out as tables for the feature queries.
//!
//! [`Pipeline`] is synchronous and deterministic: the same envelopes in the
//! same order give the same alerts (but `emitted_at`). [`run`] drives it from
//! a [`Source`] into a [`Sink`], committing each batch to the source only after
//! its alerts were flushed (at-least-once).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arrow::array::{
    Array, Float64Array, StringArray, TimestampMillisecondArray, UInt16Array, UInt32Array,
    UInt64Array,
};
use tracing::{debug_span, info, warn};

use crate::alerts::{Alert, AlertBook, Names};
use crate::config::Config;
use crate::decode::{DecodeError, Decoder, Reason};
use crate::detect::flows::{FlowRecord, Flows};
use crate::detect::identity::{Identity, Message};
use crate::detect::{Detectors, Finding, Observation};
use crate::sink::{Sink, SinkError};
use crate::source::{Envelope, Source, SourceError};
use crate::time::{Millis, wall_now};
use crate::window::{Admission, ClosedWindows, Windows};

/// The detector settings for query features.
fn feature_config(cfg: &Config) -> Config {
    let mut c = cfg.clone();
    c.alerts.min_score = cfg.queries.min_score;
    c.detect.range.enabled &= cfg.queries.range_and_stuck;
    c.detect.stuck.enabled &= cfg.queries.range_and_stuck;
    c
}

/// Most distinct query features (and rule files) tracked.
pub const MAX_FEATURES: usize = 10_000;

/// Counters users ask about.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub envelopes: u64,
    pub payload_bytes: u64,
    pub messages: u64,
    pub readings: u64,
    pub null_readings: u64,
    pub flows: u64,
    pub rejected: u64,
    pub rejected_by_reason: HashMap<&'static str, u64>,
    pub late: u64,
    pub future: u64,
    /// Messages whose sender may not teach baselines (unknown device, bad
    /// signature, skewed clock, replayed): scored, kept out of windows and baselines.
    pub untrusted: u64,
    pub signatures_verified: u64,
    pub signatures_failed: u64,
    /// Messages refused because a cap on tracked entities was reached.
    pub over_cap: u64,
    pub findings: u64,
    pub alerts: u64,
    pub suppressed: u64,
    pub windows_closed: u64,
    pub machine_windows: u64,
    pub machines_learning: usize,
    pub machines_protecting: usize,
    /// Baselines held: (machine, sensor) and (machine, query feature).
    pub baselines: usize,
    /// Event time of the oldest and newest message seen.
    pub oldest_ts: Option<Millis>,
    pub newest_ts: Option<Millis>,
}

/// Logs a line per key at most once per interval, saying how many were held back.
pub struct LogLimiter {
    interval: Duration,
    last: HashMap<&'static str, (Instant, u64)>,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            last: HashMap::new(),
        }
    }

    /// `Some(held back since the last line)` when a line may be logged now.
    pub fn allow(&mut self, key: &'static str) -> Option<u64> {
        let now = Instant::now();
        match self.last.get_mut(key) {
            Some((at, held)) if now.duration_since(*at) < self.interval => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let n = *held;
                *at = now;
                *held = 0;
                Some(n)
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// What one batch produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Alerts to publish, in event order per machine.
    pub alerts: Vec<Alert>,
    /// Rejected envelopes (index in the batch) and why.
    pub rejected: Vec<(usize, DecodeError)>,
    /// Machine-windows closed by this batch.
    pub closed: Option<ClosedWindows>,
}

/// Everything the pipeline has learned, serializable: what a restart needs so
/// it does not learn from zero (see [`crate::state`]).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PipelineState {
    pub machines: Vec<String>,
    pub devices: Vec<String>,
    pub metrics: Vec<String>,
    pub clocks: Vec<crate::window::Clock>,
    pub flow_clocks: Vec<crate::window::Clock>,
    pub detectors: Vec<Option<crate::detect::MachineState>>,
    pub alerts: crate::alerts::BookState,
    /// Baselines of the query features, their names and their alerts.
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub feature_detectors: Vec<Option<crate::detect::MachineState>>,
    #[serde(default)]
    pub feature_alerts: Option<crate::alerts::BookState>,
    /// Devices, traffic and sequence baselines, replay fingerprints.
    #[serde(default)]
    pub identity: crate::detect::identity::IdentityState,
    /// Learned peers, ports, operations, volumes and fan-out per machine.
    #[serde(default)]
    pub flows: Vec<Option<crate::detect::flows::MachineFlows>>,
    /// The learned multivariate model of every machine.
    #[serde(default)]
    pub learned: Vec<Option<crate::learn::machines::MachineModel>>,
}

/// Where [`Pipeline::observe_features_part`] stands in one query run: the
/// next feature row, and the run's name indices already interned.
#[derive(Debug)]
pub struct FeatureCursor {
    next: usize,
    machine_ids: Vec<Option<Option<u32>>>,
    feature_ids: Vec<Option<Option<u32>>>,
    done: bool,
}

impl FeatureCursor {
    /// At the start of `run`.
    pub fn new(run: &crate::features::RunOutput) -> Self {
        FeatureCursor {
            next: 0,
            machine_ids: vec![None; run.names.machines.len()],
            feature_ids: vec![None; run.names.features.len()],
            done: false,
        }
    }

    /// Feature rows of `run` not yet observed.
    pub fn left(&self, run: &crate::features::RunOutput) -> usize {
        run.features.len().saturating_sub(self.next)
    }

    /// Whether every row of the run, rules too, was observed.
    pub fn done(&self) -> bool {
        self.done
    }
}

/// The detection pipeline.
pub struct Pipeline {
    cfg: Config,
    decoder: Decoder,
    windows: Windows,
    /// Whether rows are kept in window tables (only the query files read them).
    keep_windows: bool,
    detectors: Detectors,
    book: AlertBook,
    /// Names (`<file>:<feature>`, and rule files), baselines and alerts of the query features.
    features: crate::intern::Interner,
    feature_detectors: Detectors,
    feature_book: AlertBook,
    identity: Identity,
    flows: Flows,
    learned: crate::learn::machines::Learned,
    /// Envelopes processed so far, shared with whoever watches from another task.
    progress: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// When each global cap last raised its `capacity` alert (event time).
    cap_raised: HashMap<&'static str, Millis>,
    registry_watch: Option<crate::registry::RegistryWatch>,
    stats: Stats,
    log: LogLimiter,
    /// A part's readings, nulls dropped, and its messages for the detectors.
    readings: Vec<(u32, f64)>,
    observations: Vec<Observation>,
    /// Per message, the findings held before and after identity observed it.
    marks: Vec<(usize, usize)>,
    findings: Vec<Finding>,
    /// Where [`Pipeline::judge_batch`] sets the findings aside.
    earlier: Vec<Finding>,
    per_envelope: Vec<u32>,
}

fn col<'b, T: 'static>(batch: &'b arrow::record_batch::RecordBatch, name: &str) -> &'b T {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .expect("decoded tables have their documented columns")
}

impl Pipeline {
    pub fn new(cfg: &Config) -> Self {
        let mut p = Pipeline {
            cfg: cfg.clone(),
            decoder: Decoder::new(cfg.input.clone()),
            windows: Windows::new(cfg.window.clone()),
            keep_windows: cfg.queries.enabled,
            detectors: Detectors::new(cfg),
            book: AlertBook::new(cfg.alerts.min_score, cfg.alerts.cooldown, cfg.window.size),
            features: crate::intern::Interner::new(MAX_FEATURES),
            feature_detectors: Detectors::new(&feature_config(cfg)),
            feature_book: AlertBook::new(
                cfg.queries.min_score,
                cfg.alerts.cooldown,
                cfg.window.size,
            ),
            identity: Identity::new(cfg),
            flows: Flows::new(cfg),
            learned: crate::learn::machines::Learned::new(cfg),
            progress: Default::default(),
            cap_raised: HashMap::new(),
            registry_watch: None,
            stats: Stats::default(),
            log: LogLimiter::new(Duration::from_secs(10)),
            readings: Vec::new(),
            observations: Vec::new(),
            marks: Vec::new(),
            findings: Vec::new(),
            earlier: Vec::new(),
            per_envelope: Vec::new(),
        };
        // One helper thread for the rooms that split a big batch in two.
        let spare = crate::helper::Spare::default();
        p.decoder.share(spare.clone());
        p.detectors.share(spare.clone());
        p.feature_detectors.share(spare);
        p
    }

    /// Puts a device registry in force (approvals apply from the next message).
    pub fn set_registry(&mut self, registry: crate::registry::Registry) {
        self.identity.set_registry(registry);
    }

    /// Watches the registry file for changes (see [`Pipeline::poll_registry`]).
    pub fn watch_registry(&mut self, watch: crate::registry::RegistryWatch) {
        self.registry_watch = Some(watch);
    }

    /// Reloads the registry when its file changed (checked at most every
    /// `devices.reload`); a file that does not load keeps the registry in force.
    pub fn poll_registry(&mut self) {
        let Some(result) = self.registry_watch.as_mut().and_then(|w| w.poll()) else {
            return;
        };
        match result {
            Ok(reg) => {
                info!(devices = reg.len(), "device registry reloaded");
                self.identity.set_registry(reg);
            }
            Err(e) => {
                warn!(error = %e, "device registry not reloaded; the previous one stays in force")
            }
        }
    }

    /// The identity room (devices, traffic, sequences), for inspection and tests.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The flows room, for inspection and tests.
    pub fn flows(&self) -> &Flows {
        &self.flows
    }

    /// A counter of the envelopes processed, readable while the pipeline runs
    /// in another task (`bench` uses it to see that nothing was dropped).
    pub fn progress(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.progress.clone()
    }

    /// The learned models, for inspection and tests.
    pub fn learned(&self) -> &crate::learn::machines::Learned {
        &self.learned
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.late = self.windows.late;
        s.future = self.windows.future;
        s.alerts = self.book.raised + self.feature_book.raised;
        s.suppressed = self.book.suppressed + self.feature_book.suppressed;
        let c = &self.identity.counts;
        s.untrusted = c.untrusted;
        s.signatures_verified = c.signatures_verified;
        s.signatures_failed = c.signatures_failed;
        s.over_cap += c.over_device_cap;
        (s.machines_learning, s.machines_protecting) = self.detectors.phase_counts();
        s.baselines = self.detectors.baselines() + self.feature_detectors.baselines();
        s
    }

    /// A snapshot of everything learned so far.
    pub fn snapshot(&self) -> PipelineState {
        let names = |i: &crate::intern::Interner| i.names().iter().map(|n| n.to_string()).collect();
        PipelineState {
            machines: names(&self.decoder.machines),
            devices: names(&self.decoder.devices),
            metrics: names(&self.decoder.metrics),
            clocks: self.windows.clocks().0.to_vec(),
            flow_clocks: self.windows.clocks().1.to_vec(),
            detectors: self.detectors.machines().to_vec(),
            alerts: self.book.snapshot(),
            features: names(&self.features),
            feature_detectors: self.feature_detectors.machines().to_vec(),
            feature_alerts: Some(self.feature_book.snapshot()),
            identity: self.identity.snapshot(),
            flows: self.flows.snapshot(),
            learned: self.learned.snapshot(),
        }
    }

    /// A pipeline that continues from a snapshot.
    pub fn restore(cfg: &Config, state: PipelineState) -> Self {
        let mut p = Pipeline::new(cfg);
        let c = &p.cfg.input;
        p.decoder.restore_names(
            crate::intern::Interner::from_names(&state.machines, c.max_machines),
            crate::intern::Interner::from_names(&state.devices, c.max_devices),
            crate::intern::Interner::from_names(&state.metrics, c.max_metrics),
        );
        p.windows.restore_clocks(state.clocks, state.flow_clocks);
        p.detectors.restore(state.detectors);
        p.book.restore(state.alerts);
        p.features = crate::intern::Interner::from_names(&state.features, MAX_FEATURES);
        p.feature_detectors.restore(state.feature_detectors);
        if let Some(b) = state.feature_alerts {
            p.feature_book.restore(b);
        }
        p.identity.restore(state.identity);
        p.flows.restore(state.flows);
        p.learned.restore(state.learned);
        p
    }

    /// Windows keep from now on only what the files of `run` read: the
    /// columns they name, and of `readings` only sums where its group-bys allow.
    pub fn keep_for(&mut self, run: &crate::features::RunOutput) {
        self.keep_only(&run.columns_read, &run.grouping);
    }

    /// Plans the stage's query files before the first batch, so the windows
    /// keep only what the files read from the first row on rather than from
    /// the first run's answer (a run's answer then changes nothing, unless
    /// the files changed in between).
    pub async fn plan_queries(&mut self, stage: &mut crate::features::FeatureStage) {
        let queries = stage.plan_ahead().await;
        self.keep_only(&queries.columns_read(), queries.grouping());
    }

    /// Windows keep these columns of each table, and of `readings` these sums.
    fn keep_only(
        &mut self,
        columns: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        grouping: &[crate::window::GroupSpec],
    ) {
        self.windows.read_only(columns);
        self.windows.group_readings(grouping);
    }

    /// Feeds the rows of a query run to the feature baselines and turns rule
    /// rows into alerts. Feature and rule alerts keep their own dedup book.
    pub fn observe_features(
        &mut self,
        run: &crate::features::RunOutput,
        emitted_at: Millis,
    ) -> Vec<Alert> {
        let mut cursor = FeatureCursor::new(run);
        self.observe_features_part(run, &mut cursor, usize::MAX, emitted_at)
    }

    /// [`Pipeline::observe_features`] a part at a time: the feature rows of
    /// whole (machine, window) groups from where `cursor` stands, until at
    /// least `budget` rows were taken (at least one group), then the run's
    /// rule rows once every feature row is in. Parts of any size, in turn,
    /// give the alerts and baselines the whole run gives at once; the live
    /// loop takes a part between input batches, so a large run (430,000 rows
    /// at 10,000 machines) does not hold up the fast path's alerts.
    pub fn observe_features_part(
        &mut self,
        run: &crate::features::RunOutput,
        cursor: &mut FeatureCursor,
        budget: usize,
        emitted_at: Millis,
    ) -> Vec<Alert> {
        if cursor.done {
            return Vec::new();
        }
        let _s = debug_span!(
            "features",
            features = run.features.len(),
            from = cursor.next,
            rules = run.rules.len()
        )
        .entered();
        // Rows come sorted by (ts, machine, feature) from the query stage
        // ([`crate::features::Queries::run`]), so the same input gives the
        // same alerts in the same order (and the same ids); a machine's
        // features of one window are consecutive rows.
        if cursor.next == 0 {
            self.keep_for(run);
        }
        // Each (window, machine) group of rows is one observation; the
        // part's groups go through the baselines at once, sharded by machine.
        let mut batch = Vec::new();
        let mut values: Vec<(u32, f64)> = Vec::new();
        let rows = &run.features;
        let until = cursor.next.saturating_add(budget.max(1));
        while cursor.next < rows.len() && cursor.next < until {
            let first = &rows[cursor.next];
            let start = values.len();
            // The run's name indices to the pipeline's interned ids, each
            // name interned when first met (in row order, as the rows name them).
            let machine = *cursor.machine_ids[first.machine as usize]
                .get_or_insert_with(|| self.decoder.machines.intern(run.machine(first)));
            while let Some(r) = rows
                .get(cursor.next)
                .filter(|r| r.ts == first.ts && r.machine == first.machine)
            {
                let feature = *cursor.feature_ids[r.feature as usize]
                    .get_or_insert_with(|| self.features.intern(run.feature(r)));
                if let Some(feature) = feature {
                    values.push((feature, r.value));
                }
                cursor.next += 1;
            }
            match machine {
                Some(machine) => batch.push(Observation {
                    machine,
                    device: crate::alerts::NO_DEVICE,
                    ts: first.ts,
                    trusted: true,
                    readings: (start as u32, values.len() as u32),
                }),
                None => values.truncate(start),
            }
        }
        let mut findings = Vec::new();
        let mut found = self.feature_detectors.observe_batch(&batch, &values);
        for i in 0..batch.len() {
            found.take(i, &mut findings);
        }
        self.feature_detectors.take_newly_protecting();
        if cursor.next >= rows.len() {
            cursor.done = true;
            self.rule_findings(run, &mut findings);
        }
        self.stats.findings += findings.len() as u64;
        let names = Names {
            machines: &self.decoder.machines,
            devices: &self.decoder.devices,
            metrics: &self.features,
        };
        findings
            .iter()
            .filter_map(|f| self.feature_book.offer(f, &names, emitted_at))
            .collect()
    }

    /// A run's rule rows as findings, each with its file's severity.
    fn rule_findings(&mut self, run: &crate::features::RunOutput, findings: &mut Vec<Finding>) {
        for r in &run.rules {
            let (Some(machine), Some(rule)) = (
                self.decoder.machines.intern(&r.machine),
                self.features.intern(&r.file),
            ) else {
                continue;
            };
            let score = r
                .score
                .unwrap_or_else(|| crate::alerts::rule_score(r.severity));
            findings.push(Finding {
                machine,
                device: crate::alerts::NO_DEVICE,
                metric: rule,
                kind: crate::detect::Kind::Rule,
                detector: "rule",
                ts: r.ts,
                value: r.value.unwrap_or(0.0),
                expected: 0.0,
                surprise: crate::score::surprise_from_score(score),
                detail: crate::detect::Detail::Rule {
                    value: r.value,
                    explanation: r.explanation.clone(),
                },
                severity: Some(r.severity),
                subject: None,
            });
        }
    }

    /// The detectors' state (for inspection and tests).
    pub fn detectors(&self) -> &Detectors {
        &self.detectors
    }

    /// Runs one batch through every room.
    pub fn process(&mut self, envelopes: &[Envelope], emitted_at: Millis) -> Output {
        let mut out = Output::default();
        self.stats.envelopes += envelopes.len() as u64;
        self.stats.payload_bytes += envelopes
            .iter()
            .map(|e| e.payload.len() as u64)
            .sum::<u64>();

        // A big batch comes back in two parts, decoded at once on two threads;
        // each part's rows go through the rooms in turn, which is the order
        // of their envelopes.
        let parts = {
            let _s = debug_span!("decode", envelopes = envelopes.len()).entered();
            self.decoder.decode_parts(envelopes)
        };
        // Messages per envelope, for the size of one message of an array payload.
        self.per_envelope.clear();
        self.per_envelope.resize(envelopes.len(), 0);
        for decoded in &parts {
            for r in &decoded.rejected {
                self.reject(r.index, &r.error, envelopes, &mut out);
            }
            self.stats.messages += decoded.messages.num_rows() as u64;
            self.stats.readings += decoded.readings.num_rows() as u64;
            self.stats.flows += decoded.flows.num_rows() as u64;
            for &e in col::<UInt32Array>(&decoded.messages, "envelope").values() {
                self.per_envelope[e as usize] += 1;
            }
        }
        self.identity.begin_batch();
        if !self.identity.registry().is_empty() {
            let _s = debug_span!("signatures").entered();
            let mut jobs = Vec::new();
            for decoded in &parts {
                let m_env = col::<UInt32Array>(&decoded.messages, "envelope").values();
                let m_device = col::<UInt32Array>(&decoded.messages, "device_id").values();
                jobs.extend(m_env.iter().zip(m_device).map(|(&e, &device)| {
                    let env = &envelopes[e as usize];
                    crate::detect::identity::SignatureJob {
                        envelope: e,
                        device,
                        device_name: self.decoder.devices.name(device),
                        payload: &env.payload,
                        signature: env.header(crate::registry::SIGNATURE_HEADER),
                    }
                }));
            }
            self.identity.verify_ahead(&jobs);
        }
        let mut admissions = Vec::with_capacity(parts.len());
        {
            let _s = debug_span!("fast_path", envelopes = envelopes.len()).entered();
            self.readings.clear();
            self.observations.clear();
            self.marks.clear();
            for decoded in &parts {
                admissions.push(self.fast_path(decoded, envelopes));
            }
            self.judge_batch();
            let (machines, devices) = (&self.decoder.machines, &self.decoder.devices);
            self.identity.tick(
                &|m, d| (machines.name(m).to_string(), devices.name(d).to_string()),
                &mut self.findings,
            );
        }

        {
            let _s = debug_span!("alerts", findings = self.findings.len()).entered();
            self.stats.findings += self.findings.len() as u64;
            let names = Names {
                machines: &self.decoder.machines,
                devices: &self.decoder.devices,
                metrics: &self.decoder.metrics,
            };
            for f in self.findings.drain(..) {
                if let Some(a) = self.book.offer(&f, &names, emitted_at) {
                    out.alerts.push(a);
                }
            }
        }
        for m in self.detectors.take_newly_protecting() {
            info!(machine = %self.decoder.machines.name(m), "baseline learned; machine is now protected");
        }

        {
            let _s = debug_span!("window").entered();
            // Window tables only feed the query files: without them, rows are
            // not kept (the watermarks above still judge lateness).
            if self.keep_windows {
                for (decoded, (messages, flows)) in parts.iter().zip(&admissions) {
                    self.windows.buffer(decoded, messages, flows);
                }
                out.closed = self.windows.close();
            }
        }
        self.count_closed(&out.closed);
        // Counted once the batch went through every room, so a watcher (the
        // bench) never sees messages as done while they are being processed.
        self.progress
            .fetch_add(envelopes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// One part of a decoded batch through identity, admission and the
    /// per-reading detectors; the admissions of its messages and flow records.
    fn fast_path(
        &mut self,
        decoded: &crate::decode::DecodedBatch,
        envelopes: &[Envelope],
    ) -> (Vec<Admission>, Vec<Admission>) {
        let messages = &decoded.messages;
        let readings = &decoded.readings;
        // Admission: each message against its machine's watermark, in arrival order.
        let m_ts = col::<TimestampMillisecondArray>(messages, "ts").values();
        let m_recv = col::<TimestampMillisecondArray>(messages, "received_at").values();
        let m_machine = col::<UInt32Array>(messages, "machine_id").values();
        let m_device = col::<UInt32Array>(messages, "device_id").values();
        let m_first = col::<UInt32Array>(messages, "first_reading").values();
        let m_count = col::<UInt32Array>(messages, "readings").values();
        let f_ts = col::<TimestampMillisecondArray>(&decoded.flows, "ts").values();
        let f_recv = col::<TimestampMillisecondArray>(&decoded.flows, "received_at").values();
        let f_machine = col::<UInt32Array>(&decoded.flows, "machine_id").values();
        let m_seq = col::<UInt64Array>(messages, "seq");
        let r_metric = col::<UInt32Array>(readings, "metric_id").values();
        let r_value = col::<Float64Array>(readings, "value");
        let flows = &decoded.flows;
        let f_src = col::<StringArray>(flows, "src");
        let f_dst = col::<StringArray>(flows, "dst");
        let f_port = col::<UInt16Array>(flows, "dst_port");
        let f_app = col::<StringArray>(flows, "app");
        let f_op = col::<StringArray>(flows, "op");
        let f_bytes = col::<UInt64Array>(flows, "bytes").values();

        let m_env = col::<UInt32Array>(messages, "envelope").values();
        let f_env = col::<UInt32Array>(&decoded.flows, "envelope").values();
        let mut msg_adm = Vec::with_capacity(messages.num_rows());
        let mut flow_adm = Vec::with_capacity(flows.num_rows());
        // Messages and flow records are admitted in arrival order, interleaved,
        // so each sees the watermark as it stood when it arrived.
        let mut f = 0;
        let flow = |p: &mut Self, f: usize, out: &mut Vec<Admission>| {
            let adm = p.windows.admit_flow(f_machine[f], f_ts[f], f_recv[f]);
            out.push(adm);
            p.flows.observe(
                &FlowRecord {
                    machine: f_machine[f],
                    machine_name: p.decoder.machines.name(f_machine[f]),
                    ts: f_ts[f],
                    src: f_src.value(f),
                    dst: f_dst.value(f),
                    dst_port: (!f_port.is_null(f)).then(|| f_port.value(f)),
                    app: (!f_app.is_null(f)).then(|| f_app.value(f)),
                    op: (!f_op.is_null(f)).then(|| f_op.value(f)),
                    bytes: f_bytes[f],
                    trusted: adm != Admission::Future,
                },
                &mut p.findings,
            );
        };
        // Identity and admission go message by message (they see every
        // machine); the detectors take the batch's messages afterwards
        // ([`Pipeline::judge_batch`]).
        for i in 0..messages.num_rows() {
            while f < f_env.len() && f_env[f] < m_env[i] {
                flow(self, f, &mut flow_adm);
                f += 1;
            }
            let ts = m_ts[i];
            let start = self.readings.len();
            let first = m_first[i] as usize;
            for r in first..first + m_count[i] as usize {
                if r_value.is_null(r) {
                    self.stats.null_readings += 1;
                } else {
                    self.readings.push((r_metric[r], r_value.value(r)));
                }
            }
            let env = &envelopes[m_env[i] as usize];
            let found_before = self.findings.len();
            let verdict = self.identity.observe(
                &Message {
                    machine: m_machine[i],
                    device: m_device[i],
                    machine_name: self.decoder.machines.name(m_machine[i]),
                    device_name: self.decoder.devices.name(m_device[i]),
                    ts,
                    received_at: m_recv[i],
                    seq: (!m_seq.is_null(i)).then(|| m_seq.value(i)),
                    size: env.payload.len() as f64
                        / self.per_envelope[m_env[i] as usize].max(1) as f64,
                    fingerprint: crate::detect::replay::fingerprint(&self.readings[start..]),
                    envelope: m_env[i],
                    payload: &env.payload,
                    signature: env.header(crate::registry::SIGNATURE_HEADER),
                },
                &mut self.findings,
            );
            // An untrusted sender neither moves the watermark nor joins a window.
            let adm = if verdict.trusted {
                self.windows.admit(m_machine[i], ts, m_recv[i])
            } else {
                Admission::Untrusted
            };
            let ts = verdict.ts;
            msg_adm.push(adm);
            if adm != Admission::Future {
                self.stats.newest_ts = Some(self.stats.newest_ts.map_or(ts, |n| n.max(ts)));
                self.stats.oldest_ts = Some(self.stats.oldest_ts.map_or(ts, |n| n.min(ts)));
            }
            self.observations.push(Observation {
                machine: m_machine[i],
                device: m_device[i],
                ts,
                trusted: matches!(adm, Admission::OnTime | Admission::Late),
                readings: (start as u32, self.readings.len() as u32),
            });
            self.marks.push((found_before, self.findings.len()));
        }
        for f in f..f_env.len() {
            flow(self, f, &mut flow_adm);
        }
        (msg_adm, flow_adm)
    }

    /// The batch's messages, as [`Pipeline::fast_path`] left them, through
    /// the detectors at once (sharded by machine) and the learned models;
    /// their findings are put back in message order.
    fn judge_batch(&mut self) {
        let mut found = self
            .detectors
            .observe_batch(&self.observations, &self.readings);
        // Each message's findings: identity's (and the flow records' before
        // it), then the detectors', then the learned model's, which learns
        // only from a message nothing else found fault with.
        // The findings so far move aside (into a buffer kept for it, so no
        // batch allocates) and come back interleaved.
        std::mem::swap(&mut self.findings, &mut self.earlier);
        let mut earlier = self.earlier.drain(..);
        let mut taken = 0;
        let metrics = &self.decoder.metrics;
        for (i, (o, &(before, after))) in self.observations.iter().zip(&self.marks).enumerate() {
            self.findings.extend(earlier.by_ref().take(after - taken));
            taken = after;
            let found_here = found.take(i, &mut self.findings);
            let clean = after == before && found_here == 0;
            self.learned.observe(
                o.machine,
                self.decoder.machines.name(o.machine),
                o.device,
                o.ts,
                o.trusted,
                clean,
                o.of(&self.readings),
                &|id| metrics.name(id).to_string(),
                &mut self.findings,
            );
        }
        self.findings.extend(earlier);
    }

    /// Hands the windows `out` closed to the feature stage and, when a run is
    /// due (or `force`), adds the alerts of the query features and rules to `out`.
    pub async fn run_features(
        &mut self,
        stage: &mut Option<&mut crate::features::FeatureStage>,
        out: &mut Output,
        force: bool,
    ) {
        let Some(stage) = stage.as_deref_mut() else {
            return;
        };
        stage.offer(out.closed.take());
        if (force || stage.due())
            && let Some(run) = stage.run().await
        {
            let alerts = self.observe_features(&run, wall_now());
            out.alerts.extend(alerts);
        }
    }

    /// End of input: closes every open window.
    pub fn finish(&mut self) -> Output {
        let closed = self.windows.close_all();
        self.count_closed(&closed);
        Output {
            closed,
            ..Output::default()
        }
    }

    fn count_closed(&mut self, closed: &Option<ClosedWindows>) {
        if let Some(c) = closed {
            self.stats.windows_closed += 1;
            self.stats.machine_windows += c.machine_windows as u64;
        }
    }

    fn reject(
        &mut self,
        index: usize,
        error: &DecodeError,
        envelopes: &[Envelope],
        out: &mut Output,
    ) {
        self.stats.rejected += 1;
        *self
            .stats
            .rejected_by_reason
            .entry(error.reason.as_str())
            .or_default() += 1;
        if let Some(held) = self.log.allow(error.reason.as_str()) {
            warn!(
                reason = %error.reason,
                subject = %envelopes[index].subject,
                held_back = held,
                "message rejected: {}",
                error.detail
            );
        }
        out.rejected.push((index, error.clone()));
        if error.reason == Reason::Capacity {
            self.stats.over_cap += 1;
            self.cap_alert(error, out);
        }
    }

    /// A global cap (machines, devices, metrics) refused a message: one
    /// `capacity` alert per cap and cooldown, from the monitor itself.
    fn cap_alert(&mut self, error: &DecodeError, out: &mut Output) {
        let Some(key) = error.cap else {
            return;
        };
        let ts = self.stats.newest_ts.unwrap_or(0);
        let last = self.cap_raised.get(key).copied();
        if last.is_some_and(|t| ts - t < self.cfg.alerts.cooldown) {
            return;
        }
        self.cap_raised.insert(key, ts);
        out.alerts.push(crate::alerts::capacity_alert(
            key,
            format!(
                "{key} reached: messages naming further new entities are dead-lettered ({} refused so far); raise the cap if the plant grew, or find who sprays invented ids",
                self.stats.over_cap
            ),
            ts,
            wall_now(),
        ));
    }
}

/// A failure that stops [`run`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Drives `pipeline` from `source` into `sink` until the source ends.
/// `progress` is called after every batch (it throttles itself).
pub async fn run<S: Source, K: Sink>(
    pipeline: &mut Pipeline,
    source: &mut S,
    sink: &mut K,
    mut features: Option<&mut crate::features::FeatureStage>,
    progress: &mut dyn FnMut(&Pipeline),
) -> Result<(), RunError> {
    if let Some(stage) = features.as_deref_mut() {
        pipeline.plan_queries(stage).await;
    }
    while let Some(batch) = source.next_batch().await? {
        deliver(pipeline, &batch, sink, &mut features).await?;
        source.commit().await?;
        progress(pipeline);
    }
    finish(pipeline, sink, &mut features).await
}

/// One batch through the pipeline: dead letters, alerts (the query files'
/// included when a run is due) published and flushed.
pub async fn deliver<K: Sink>(
    pipeline: &mut Pipeline,
    batch: &[Envelope],
    sink: &mut K,
    features: &mut Option<&mut crate::features::FeatureStage>,
) -> Result<(), RunError> {
    let mut out = pipeline.process(batch, wall_now());
    for (i, e) in &out.rejected {
        sink.dead_letter(&batch[*i], e).await?;
    }
    pipeline.run_features(features, &mut out, false).await;
    sink.publish(&out.alerts).await?;
    sink.flush().await?;
    Ok(())
}

/// End of input: the last windows closed and queried, their alerts published.
pub async fn finish<K: Sink>(
    pipeline: &mut Pipeline,
    sink: &mut K,
    features: &mut Option<&mut crate::features::FeatureStage>,
) -> Result<(), RunError> {
    let mut out = pipeline.finish();
    pipeline.run_features(features, &mut out, true).await;
    sink.publish(&out.alerts).await?;
    sink.flush().await?;
    Ok(())
}

/// Reasons in a stable order, for summaries.
pub fn reasons_in_order(stats: &Stats) -> Vec<(&'static str, u64)> {
    Reason::ALL
        .iter()
        .filter_map(|r| {
            stats
                .rejected_by_reason
                .get(r.as_str())
                .map(|n| (r.as_str(), *n))
        })
        .collect()
}
