//! Configuration: one struct tree, read from a TOML file (`--config`), where
//! every key has a default so that no file is needed.
//!
//! `twinwatch config --print-defaults` prints [`DEFAULT_TOML`], the full
//! commented default file; a test keeps it equal to `Config::default()`.
//! Errors name the file, the line and column, and the key, and the binary turns
//! them into exit code 2.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::time::{Millis, serde_duration};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub queries: QueriesConfig,
    pub nats: NatsConfig,
    pub source: SourceConfig,
    pub sink: SinkConfig,
    pub state: StateConfig,
    pub input: InputConfig,
    pub window: WindowConfig,
    pub baseline: BaselineConfig,
    pub detect: DetectConfig,
    pub devices: DevicesConfig,
    pub traffic: TrafficConfig,
    pub flows: FlowsConfig,
    pub learn: LearnConfig,
    pub alerts: AlertsConfig,
    pub http: HttpConfig,
}

/// The metrics and health endpoint of `run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Where `/metrics` and `/healthz` are served; empty turns the endpoint
    /// off. `TWINWATCH_HTTP_ADDR` overrides it.
    pub addr: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: "127.0.0.1:9464".into(),
        }
    }
}

/// The SQL feature and rule files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueriesConfig {
    pub enabled: bool,
    /// Folder of `.sql` files; looked at again before every run, so edits apply at the next window.
    pub dir: String,
    /// Closed windows are gathered and queried together once they span this much event time ...
    #[serde(with = "serde_duration")]
    pub every: Millis,
    /// ... or as soon as this many rows have gathered (readings summed up
    /// as they arrived count as the rows they were). 100,000 by default: at
    /// 10,000 machines the query thread lags the loop, and what gathers
    /// meanwhile (up to four times this) is much of the process's memory;
    /// runs of 100,000 rows took less query time in all than runs of 500,000.
    pub max_rows: usize,
    /// Feature alerts below this score are not raised. Window aggregates are
    /// coarser and heavier-tailed than single readings, so the bar is higher.
    pub min_score: f64,
    /// Out-of-range and stuck checks on features. Off by default: counts are
    /// constant by design and spreads are skewed, so spike and drift checks
    /// (which follow the feature's own variability) are what fit them.
    pub range_and_stuck: bool,
    /// Plain group-bys over `readings` (names and window as keys; count,
    /// sum, avg, min, max, var, stddev of `value`) computed by twinwatch on
    /// the 4-byte name keys instead of by DataFusion on the name strings:
    /// the same results to the bit, the shipped reading_stats.sql 6–19 %
    /// faster (`cargo bench --bench queries`). When every use of `readings`
    /// in the active files is such a group-by keyed by `machine` and a
    /// window column, the windows keep each group's sums instead of its
    /// rows, added as the rows arrive. false leaves every group-by to
    /// DataFusion (and the rows in the windows).
    pub own_group_by: bool,
}

impl Default for QueriesConfig {
    fn default() -> Self {
        QueriesConfig {
            enabled: true,
            dir: "queries".into(),
            every: 30_000,
            max_rows: 100_000,
            min_score: 0.9,
            range_and_stuck: false,
            own_group_by: true,
        }
    }
}

/// A secret (password, token): never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"<redacted>\""
        })
    }
}

/// How to reach and authenticate to NATS. Empty strings mean "not set".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated; `tls://` requires TLS. `NATS_URL` and `--nats-url` override it.
    pub url: String,
    /// Client name shown by the server.
    pub name: String,
    /// Credentials file (user JWT + nkey seed), as made by `nsc`.
    pub creds: String,
    /// File holding an nkey seed (`SU...`).
    pub nkey_seed: String,
    pub user: String,
    pub password: Secret,
    pub token: Secret,
    /// PEM file of the CA that signed the server's certificate.
    pub ca: String,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert: String,
    pub key: String,
    /// Refuse to talk to a server without TLS.
    pub require_tls: bool,
    #[serde(with = "serde_duration")]
    pub connect_timeout: Millis,
    /// Messages a subscription may buffer before the server counts twinwatch as a slow consumer and drops.
    pub subscription_capacity: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            name: "twinwatch".into(),
            creds: String::new(),
            nkey_seed: String::new(),
            user: String::new(),
            password: Secret::default(),
            token: Secret::default(),
            ca: String::new(),
            cert: String::new(),
            key: String::new(),
            require_tls: false,
            connect_timeout: 5_000,
            subscription_capacity: 262_144,
        }
    }
}

/// What `run` consumes and how messages are batched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    pub subjects: Vec<String>,
    /// Core subscriptions join this queue group when set, so several processes share the load.
    pub queue_group: String,
    /// Most messages in one pipeline batch.
    pub max_batch: usize,
    /// Most payload bytes in one pipeline batch (array payloads carry many
    /// readings per message: the batch, and the wait of its first message,
    /// stay bounded in readings too).
    pub max_batch_bytes: usize,
    /// The longest a message waits for its batch to fill.
    #[serde(with = "serde_duration")]
    pub max_latency: Millis,
    /// Most bytes of core-NATS messages held while the pipeline is behind
    /// (payloads, subjects, headers and bookkeeping); past it new messages
    /// are dropped and counted, so a burst cannot grow memory without bound.
    /// An empty inbox takes any message, however large.
    pub max_buffered_bytes: usize,
    pub jetstream: JetStreamSourceConfig,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            subjects: vec!["twin.telemetry.>".into(), "twin.flows.>".into()],
            queue_group: String::new(),
            max_batch: 4096,
            max_batch_bytes: 1 << 20,
            max_latency: 2,
            // About 0.2 s of backlog at this machine's sustained rates; a
            // plant that must ride out longer bursts without loss uses JetStream.
            max_buffered_bytes: 16 << 20,
            jetstream: JetStreamSourceConfig::default(),
        }
    }
}

/// A durable JetStream pull consumer instead of core subscriptions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JetStreamSourceConfig {
    pub enabled: bool,
    pub stream: String,
    pub consumer: String,
    /// Create the stream (on `source.subjects`) and the consumer when missing; otherwise a missing one is an error.
    pub create: bool,
    #[serde(with = "serde_duration")]
    pub ack_wait: Millis,
    pub max_ack_pending: i64,
}

impl Default for JetStreamSourceConfig {
    fn default() -> Self {
        JetStreamSourceConfig {
            enabled: false,
            stream: "TWIN_TELEMETRY".into(),
            consumer: "twinwatch".into(),
            create: false,
            ack_wait: 30_000,
            max_ack_pending: 1_000_000,
        }
    }
}

/// Where `run` publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkConfig {
    /// Dead letters go to `<deadletter_prefix>.<reason>`.
    pub deadletter_prefix: String,
    /// Also store alerts in a JetStream stream (publishing waits for its acknowledgement).
    pub jetstream: bool,
    pub stream: String,
    /// Create the alert stream (subjects `twin.alerts.>`) when missing.
    pub create: bool,
    /// How long the alert stream remembers `Nats-Msg-Id`s to drop duplicates.
    #[serde(with = "serde_duration")]
    pub duplicate_window: Millis,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            deadletter_prefix: "twin.deadletter".into(),
            jetstream: false,
            stream: "TWIN_ALERTS".into(),
            create: true,
            duplicate_window: 600_000,
        }
    }
}

/// Snapshots of the learned state (see the `state` module).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    pub enabled: bool,
    pub path: String,
    /// How often `run` writes a snapshot (and, with JetStream, acknowledges up to it).
    #[serde(with = "serde_duration")]
    pub interval: Millis,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            enabled: true,
            path: "models/state.json".into(),
            interval: 5_000,
        }
    }
}

/// Limits on what the decoder accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputConfig {
    /// Payloads larger than this are rejected (reason `too_large`).
    pub max_payload_bytes: usize,
    /// Most distinct machines tracked; messages for further machines are rejected (reason `capacity`).
    pub max_machines: usize,
    /// Most distinct metric names tracked, over all machines.
    pub max_metrics: usize,
    /// Most distinct device ids tracked, over all machines.
    pub max_devices: usize,
    /// Most telemetry objects in one array payload.
    pub max_messages_per_payload: usize,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            max_payload_bytes: 1 << 20,
            max_machines: 100_000,
            max_metrics: 10_000,
            max_devices: 200_000,
            max_messages_per_payload: 10_000,
        }
    }
}

/// Event-time windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WindowConfig {
    /// Tumbling window size.
    #[serde(with = "serde_duration")]
    pub size: Millis,
    /// How far behind a machine's newest event time a message may arrive and still join its window.
    #[serde(with = "serde_duration")]
    pub allowed_lateness: Millis,
    /// Messages dated further than this ahead of their arrival (`received_at`) do not move the watermark.
    #[serde(with = "serde_duration")]
    pub max_future: Millis,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            size: 10_000,
            allowed_lateness: 5_000,
            max_future: 120_000,
        }
    }
}

/// Per-(machine, metric) baselines: learning and adaptation speeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BaselineConfig {
    /// Event time a machine spends learning before it is protected (no alerts while learning).
    #[serde(with = "serde_duration")]
    pub warmup: Millis,
    /// Time constant of the short-term level (the prediction a spike is measured against).
    #[serde(with = "serde_duration")]
    pub level_tau: Millis,
    /// Time constant of the short-term trend.
    #[serde(with = "serde_duration")]
    pub trend_tau: Millis,
    /// Time constant of the noise scale (robust sigma of the one-step residual).
    #[serde(with = "serde_duration")]
    pub scale_tau: Millis,
    /// Time constant of the slow reference level that drift is measured against.
    #[serde(with = "serde_duration")]
    pub reference_tau: Millis,
    /// A sensor anomalous without interruption for this long is re-based on its
    /// current value (its alerts stay raised), so a fault that ends at a new level
    /// does not leave a stale baseline alerting forever.
    #[serde(with = "serde_duration")]
    pub rebase_after: Millis,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        BaselineConfig {
            warmup: 600_000,
            level_tau: 1_500,
            trend_tau: 30_000,
            scale_tau: 300_000,
            reference_tau: 600_000,
            rebase_after: 30_000,
        }
    }
}

/// Detector switches and thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    pub spike: SpikeConfig,
    pub shift: ShiftConfig,
    pub stuck: StuckConfig,
    pub range: RangeConfig,
    pub mode: ModeConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpikeConfig {
    pub enabled: bool,
}

impl Default for SpikeConfig {
    fn default() -> Self {
        SpikeConfig { enabled: true }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShiftConfig {
    pub enabled: bool,
    /// CUSUM slack, in reference sigmas: deviations smaller than this never accumulate.
    pub slack: f64,
    /// CUSUM decision interval, in reference sigmas: a shift is reported once the
    /// accumulated excess reaches it (score `low` there, growing with the excess).
    pub threshold: f64,
}

impl Default for ShiftConfig {
    fn default() -> Self {
        ShiftConfig {
            enabled: true,
            slack: 2.0,
            threshold: 20.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StuckConfig {
    pub enabled: bool,
    /// A value must stay frozen at least this long before it can be called stuck.
    #[serde(with = "serde_duration")]
    pub min_duration: Millis,
    /// ... and at least this many times the longest frozen run seen while learning.
    pub learned_run_factor: f64,
}

impl Default for StuckConfig {
    fn default() -> Self {
        StuckConfig {
            enabled: true,
            min_duration: 30_000,
            learned_run_factor: 3.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RangeConfig {
    pub enabled: bool,
    /// Margin around the learned envelope, as a fraction of the envelope's width.
    pub margin: f64,
}

impl Default for RangeConfig {
    fn default() -> Self {
        RangeConfig {
            enabled: true,
            margin: 0.25,
        }
    }
}

/// Operating-mode changes: when several of a machine's sensors leave their
/// prediction together, the machine is changing mode, not under attack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModeConfig {
    /// A sensor "moves" when its one-step residual exceeds this many sigmas.
    pub move_z: f64,
    /// This many sensors of a machine moving in one message mark a mode transition.
    pub min_moving: usize,
    /// How long after the last joint move a machine stays in transition (spike and drift muted, baselines follow).
    #[serde(with = "serde_duration")]
    pub hold: Millis,
    /// Longest settling after a transition (while slow sensors such as temperature converge).
    #[serde(with = "serde_duration")]
    pub settle_max: Millis,
    /// While a sensor settles its prediction is catching up, so spikes are measured
    /// against this many times its sigma.
    pub settling_sigma: f64,
}

impl Default for ModeConfig {
    fn default() -> Self {
        ModeConfig {
            move_z: 4.0,
            min_moving: 2,
            hold: 30_000,
            settle_max: 1_200_000,
            settling_sigma: 1.5,
        }
    }
}

/// Who speaks for each machine: the device registry and the learned devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevicesConfig {
    /// The device registry (TOML, see the README, "Device registry"); a missing file means
    /// no registry: only the devices seen while a machine learns are known.
    pub registry: String,
    /// How often `run` checks the registry file for changes (approval without restart).
    #[serde(with = "serde_duration")]
    pub reload: Millis,
    /// Most devices tracked per machine; further devices raise one `capacity` alert and are not tracked.
    pub max_per_machine: usize,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            registry: "devices.toml".into(),
            reload: 5_000,
            max_per_machine: 16,
        }
    }
}

/// Message rates, sizes, sequence numbers, clocks and replayed content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrafficConfig {
    pub enabled: bool,
    /// A window holding this many times a device's learned message count is a flood.
    pub flood_factor: f64,
    /// A device is silent once it has sent nothing for this long of plant event time ...
    #[serde(with = "serde_duration")]
    pub silence_after: Millis,
    /// ... and for this many times the longest gap it left while learning.
    pub silence_factor: f64,
    /// A payload this many robust sigmas from the device's usual size is `traffic_size`.
    pub size_z: f64,
    /// Probability floor of one lost message: a gap of n messages scores like n
    /// independent losses at this rate (or the learned rate, if higher).
    pub loss_floor: f64,
    /// A sequence number at or below this, after a higher one, is a device restart, not a replay.
    pub seq_reset_max: u64,
    /// `ts` further than this from `received_at` (beyond the device's learned offset) is `clock_skew`.
    #[serde(with = "serde_duration")]
    pub max_skew: Millis,
    /// Reading vectors fingerprinted per machine to recognise replayed content.
    pub replay_history: usize,
    /// This many consecutive re-appearing reading vectors, in their original order, are a replay.
    pub replay_min_run: u32,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            enabled: true,
            flood_factor: 3.0,
            silence_after: 30_000,
            silence_factor: 5.0,
            size_z: 8.0,
            loss_floor: 0.01,
            seq_reset_max: 8,
            max_skew: 30_000,
            replay_history: 1024,
            replay_min_run: 6,
        }
    }
}

/// Network flow baselines per machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowsConfig {
    pub enabled: bool,
    /// Caps on the learned sets per machine; hitting one raises a `capacity` alert.
    pub max_peers: usize,
    pub max_ports: usize,
    pub max_ops: usize,
    /// Bytes to one destination in a window above this many times its learned mean are `flow_volume` ...
    pub volume_factor: f64,
    /// ... and above this many bytes (destinations never seen: above the largest learned mean times the factor, or this).
    pub volume_min_bytes: u64,
    /// One source touching more distinct destination:port pairs in a window than this,
    /// and than twice its machine's learned maximum, is `flow_fanout`.
    pub fanout_min: usize,
    /// Most `flow_new_*` findings per machine and window (a spray is one `flow_fanout`, not a storm).
    pub max_new_per_window: u32,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        FlowsConfig {
            enabled: true,
            max_peers: 256,
            max_ports: 64,
            max_ops: 64,
            volume_factor: 4.0,
            volume_min_bytes: 16_384,
            fanout_min: 16,
            max_new_per_window: 8,
        }
    }
}

/// Learned multivariate baselines per machine (see `src/learn/`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearnConfig {
    pub enabled: bool,
    /// Share of the scaled training variance the PCA plane keeps.
    pub variance: f64,
    /// Vectors the statistics are averaged over.
    pub smooth: usize,
    /// Alert when the smoothed T² or Q exceeds this many times its largest value in training.
    pub t2_factor: f64,
    pub q_factor: f64,
    /// Most training vectors kept per machine (older ones are thinned).
    pub max_train: usize,
    /// Refit on the vectors judged normal since the machine started, this often (event time).
    #[serde(with = "serde_duration")]
    pub retrain: Millis,
    /// Largest inflation of a sensor's deviation for its autocorrelation (1 = none).
    pub max_inflation: f64,
    /// Each sensor also enters the model as its exponential average over this long
    /// ("0s": not), so a sensor that follows another with a lag is related to it.
    #[serde(with = "serde_duration")]
    pub lag: Millis,
    /// Most operating modes per machine (KMeans clusters of its training vectors, a model each).
    pub max_modes: usize,
    /// Clusters are modes when their centres are this many summed spreads apart.
    pub mode_separation: f64,
}

impl Default for LearnConfig {
    fn default() -> Self {
        LearnConfig {
            enabled: false,
            variance: 0.9,
            smooth: 20,
            t2_factor: 5.0,
            q_factor: 5.0,
            max_train: 1200,
            retrain: 3_600_000,
            max_inflation: 20.0,
            lag: 120_000,
            max_modes: 1,
            mode_separation: crate::learn::model::MODE_SEPARATION,
        }
    }
}

/// Alert emission: threshold and dedup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Findings scoring below this are not alerted (0..1).
    pub min_score: f64,
    /// An open alert is raised again only when its severity grows, or this long after it was last raised;
    /// it closes when no finding for it arrives for this long.
    #[serde(with = "serde_duration")]
    pub cooldown: Millis,
    /// How alerts are written: the contract's JSON, or OCSF Detection Findings.
    pub format: crate::ocsf::AlertFormat,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            min_score: 0.75,
            cooldown: 600_000,
            format: crate::ocsf::AlertFormat::Json,
        }
    }
}

/// The commented default configuration file.
pub const DEFAULT_TOML: &str = r#"# twinwatch configuration. Every key is optional; these are the defaults.
# Durations are strings with a unit: "500ms", "10s", "5m", "2h".

[queries]
# SQL feature and rule files (see the README, "Query files"). Edits apply at the next window.
enabled = true
dir = "queries"
# Closed windows are gathered and queried together once they span this much event time
# (so replay and live give the same results), or as soon as this many rows have gathered
# (smaller runs keep less waiting while the query thread is busy, and cost no more in all).
# Up to four times max_rows gather while the query thread is busy; past that, with core NATS
# the oldest are not queried (counted: query_windows_shed), with JetStream the loop waits.
every = "30s"
max_rows = 100000
# Feature alerts below this score are not raised (window aggregates are coarser than readings).
min_score = 0.9
# Out-of-range and stuck checks on features (off: counts are constant by design, spreads skewed).
range_and_stuck = false
# Plain group-bys over readings (name and window keys; count, sum, avg, min, max, var, stddev
# of value) are computed by twinwatch on name keys, the same to the bit; when every file reads readings
# only so, keyed by machine and window, the windows keep sums instead of rows. false leaves them to DataFusion.
own_group_by = true

[nats]
# Server URL(s), comma-separated. tls:// requires TLS. NATS_URL and --nats-url override it.
url = "nats://127.0.0.1:4222"
name = "twinwatch"
# Authentication: set at most one of creds (JWT + nkey file), nkey_seed (file), user/password, token.
creds = ""
nkey_seed = ""
user = ""
password = ""
token = ""
# TLS: the CA that signed the server certificate; a client certificate and key for mutual TLS.
ca = ""
cert = ""
key = ""
require_tls = false
connect_timeout = "5s"
# Messages a subscription may buffer to ride out bursts before the server drops (slow consumer).
subscription_capacity = 262144

[source]
subjects = ["twin.telemetry.>", "twin.flows.>"]
# Join a queue group so several twinwatch processes share the subjects (core NATS only).
queue_group = ""
# A pipeline batch closes at this many messages or payload bytes, or this long after its first message.
max_batch = 4096
max_batch_bytes = 1048576
max_latency = "2ms"
# Most bytes of core-NATS messages held while the pipeline is behind; past it new ones are dropped
# (counted: twinwatch_input_dropped_total). JetStream keeps a backlog on the server instead.
max_buffered_bytes = 16777216

[source.jetstream]
# Consume through a durable pull consumer instead of core subscriptions.
enabled = false
stream = "TWIN_TELEMETRY"
consumer = "twinwatch"
# Create the stream (on source.subjects) and the consumer when missing; when false, a missing one is an error.
create = false
ack_wait = "30s"
max_ack_pending = 1000000

[sink]
# Rejected messages are republished unchanged to <deadletter_prefix>.<reason>, header Twin-Error.
deadletter_prefix = "twin.deadletter"
# Also store alerts in a JetStream stream; duplicates (same Nats-Msg-Id) are dropped by the server.
jetstream = false
stream = "TWIN_ALERTS"
create = true
duplicate_window = "10m"

[state]
# Snapshots of everything learned, so a restart does not learn from zero.
# With JetStream, messages are acknowledged up to the last snapshot written.
enabled = true
path = "models/state.json"
interval = "5s"

[input]
# Payloads larger than this are dead-lettered with reason `too_large`.
max_payload_bytes = 1048576
# Caps on what is tracked, so sprayed ids cannot grow memory without bound.
# Messages past a cap are dead-lettered with reason `capacity`.
max_machines = 100000
max_metrics = 10000
max_devices = 200000
# Most telemetry objects in one array payload.
max_messages_per_payload = 10000

[window]
# Tumbling event-time windows, aligned to the epoch.
size = "10s"
# A message may arrive this far behind its machine's newest event time and still join its window;
# later ones are counted as late (and still scored for point anomalies).
allowed_lateness = "5s"
# Messages dated further than this ahead of their arrival time do not move the watermark
# and stay out of the baselines.
max_future = "2m"

[baseline]
# Event time each machine learns before it is protected. No alerts while learning.
warmup = "10m"
# Time constants of the per-(machine, metric) baseline (see the README, "Detectors").
level_tau = "1500ms"
trend_tau = "30s"
scale_tau = "5m"
reference_tau = "10m"
# A sensor anomalous without interruption for this long is re-based on its current value
# (the alerts already raised stay), so a fault that ends at a new level cannot leave a
# stale baseline behind that alerts forever.
rebase_after = "30s"

[detect.spike]
enabled = true

[detect.shift]
enabled = true
# CUSUM slack in reference sigmas: smaller deviations never accumulate.
slack = 2.0
# CUSUM decision interval in reference sigmas: a shift is reported once the accumulated
# excess reaches it (score `low` there, rising as the excess grows).
threshold = 20.0

[detect.stuck]
enabled = true
# A frozen value is stuck only after this long ...
min_duration = "30s"
# ... and after this many times the longest frozen run seen while learning.
learned_run_factor = 3.0

[detect.range]
enabled = true
# Margin around the learned envelope, as a fraction of its width.
margin = 0.25

[detect.mode]
# When at least `min_moving` sensors of a machine jump more than `move_z` sigmas in one message,
# the machine is changing operating mode: spike and drift alerts pause for `hold` after the last
# joint move while its baselines follow, and drift references follow until the sensors settle
# (at most `settle_max`).
move_z = 4.0
min_moving = 2
hold = "30s"
settle_max = "20m"
# While a sensor settles its prediction is catching up: spikes are measured against this many sigmas.
settling_sigma = 1.5

[http]
# `run` serves Prometheus metrics on /metrics and readiness on /healthz here; "" turns it off.
# TWINWATCH_HTTP_ADDR overrides it.
addr = "127.0.0.1:9464"

[devices]
# The device registry: declared devices per machine, their NATS nkey public keys and whether
# they must sign (see the README, "Device registry"). Checked for changes every `reload`.
registry = "devices.toml"
reload = "5s"
# Devices tracked per machine; a spray of invented device ids raises one `capacity` alert.
max_per_machine = 16

[traffic]
enabled = true
# A window with this many times a device's learned message count is a flood (`traffic_rate`).
flood_factor = 3.0
# A device is silent after sending nothing for this long of plant event time, and for
# `silence_factor` times the longest gap it left while learning.
silence_after = "30s"
silence_factor = 5.0
# Payload sizes this many robust sigmas off the device's usual size are `traffic_size`.
size_z = 8.0
# A gap of n sequence numbers scores like n losses at this probability (or the learned loss rate).
loss_floor = 0.01
# A sequence number at or below this, after a higher one, is a device restart (not a replay).
seq_reset_max = 8
# ts further than this from received_at, beyond the device's learned offset, is `clock_skew`.
max_skew = "30s"
# Reading vectors remembered per machine, and how many consecutive re-appearing ones make a replay.
replay_history = 1024
replay_min_run = 6

[flows]
enabled = true
# Learned sets per machine (peers, destination ports, source+operation pairs); hitting a cap
# raises a `capacity` alert.
max_peers = 256
max_ports = 64
max_ops = 64
# Bytes to one destination in a window: `flow_volume` above volume_factor x its learned mean
# and above volume_min_bytes.
volume_factor = 4.0
volume_min_bytes = 16384
# A source touching more distinct destination:port pairs in a window than this (and than twice
# the learned maximum) is scanning (`flow_fanout`).
fanout_min = 16
# At most this many new-peer/port/op alerts per machine and window.
max_new_per_window = 8

[learn]
# A multivariate model per machine (long-run scaling, PCA with T2 and Q), fitted when its
# warm-up ends on the vectors of its readings; alerts of kind `multivariate`. Off by default
# while it is being completed: on the simulated plant it still raises about 0.27 false alerts
# per machine-hour (temperature lagging load after ten minutes of training).
enabled = false
variance = 0.9
smooth = 20
# Alert when the smoothed statistic exceeds this many times its largest value in training.
t2_factor = 5.0
q_factor = 5.0
max_train = 1200
# Refit on everything judged normal since the machine started (thinned), this often.
retrain = "1h"
# Slow sensors are scaled by their long-run deviation, at most this many times their short-term one.
max_inflation = 20.0
# Each sensor also enters the model as its average over this long ("0s": not), so a sensor
# that follows another with a lag (temperature after load) is related to it.
lag = "2m"
# Operating modes: the training vectors are clustered (KMeans) and each distinct cluster gets
# its own model, for machines that switch between discrete states whose sensors relate
# differently. 1 = one model: on the simulated plant, whose temperature takes minutes to follow
# a load change, one model with lagged averages keeps quiet through every change, while models
# per state do not know the way between them (see README, "Learned baselines").
max_modes = 1
# Clusters are modes when their centres are this many summed spreads apart (halves of one
# continuous cloud are ~1.5); otherwise the machine has one model.
mode_separation = 3.0

[alerts]
# Findings scoring below this (0..1) are not alerted. Severity is `low` from 0.7, `medium` from
# 0.85, `high` from 0.95, `critical` from 0.99; 0.75 is a spike of about 5 sigma.
min_score = 0.75
# One open alert per (machine, kind, feature): raised again on escalation or this long after it
# was last raised; closed when no finding for it arrives for this long.
cooldown = "10m"
# "json": the contract's alert format; "ocsf": OCSF Detection Finding (class 2004) events for a SIEM.
format = "json"
"#;

/// A configuration problem: which file, where, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Reads `path` when given, the defaults otherwise.
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::load(p),
            None => Ok(Config::default()),
        }
    }

    /// Parses and validates configuration text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the values that parse but make no sense.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message: message.to_string(),
            })
        };
        let positive = [
            ("window.size", self.window.size),
            ("baseline.level_tau", self.baseline.level_tau),
            ("baseline.trend_tau", self.baseline.trend_tau),
            ("baseline.scale_tau", self.baseline.scale_tau),
            ("baseline.reference_tau", self.baseline.reference_tau),
            ("baseline.rebase_after", self.baseline.rebase_after),
            ("detect.stuck.min_duration", self.detect.stuck.min_duration),
        ];
        for (key, v) in positive {
            if v <= 0 {
                return bad(key, "must be greater than zero");
            }
        }
        if !(0.0..=1.0).contains(&self.queries.min_score) {
            return bad("queries.min_score", "must be between 0 and 1");
        }
        if self.queries.max_rows == 0 {
            return bad("queries.max_rows", "must be greater than zero");
        }
        if self.nats.subscription_capacity == 0 {
            return bad("nats.subscription_capacity", "must be greater than zero");
        }
        if self.source.max_batch == 0 {
            return bad("source.max_batch", "must be greater than zero");
        }
        if self.source.max_buffered_bytes == 0 {
            return bad("source.max_buffered_bytes", "must be greater than zero");
        }
        if self.source.max_batch_bytes == 0 {
            return bad("source.max_batch_bytes", "must be greater than zero");
        }
        if self.source.subjects.is_empty() {
            return bad("source.subjects", "needs at least one subject");
        }
        if self.state.enabled && self.state.interval <= 0 {
            return bad("state.interval", "must be greater than zero");
        }
        if self.source.jetstream.max_ack_pending == 0 {
            return bad(
                "source.jetstream.max_ack_pending",
                "must not be zero (-1 means unlimited)",
            );
        }
        if self.nats.cert.is_empty() != self.nats.key.is_empty() {
            return bad(
                "nats.cert",
                "a client certificate needs its key (nats.key), and the other way round",
            );
        }
        let auths = [
            !self.nats.creds.is_empty(),
            !self.nats.nkey_seed.is_empty(),
            !self.nats.user.is_empty(),
            !self.nats.token.0.is_empty(),
        ];
        if auths.iter().filter(|&&a| a).count() > 1 {
            return bad(
                "nats",
                "set at most one of creds, nkey_seed, user/password and token",
            );
        }
        if self.input.max_payload_bytes == 0 {
            return bad("input.max_payload_bytes", "must be greater than zero");
        }
        for (key, v) in [
            ("input.max_machines", self.input.max_machines),
            ("input.max_metrics", self.input.max_metrics),
            ("input.max_devices", self.input.max_devices),
            (
                "input.max_messages_per_payload",
                self.input.max_messages_per_payload,
            ),
        ] {
            if v == 0 || v > u32::MAX as usize {
                return bad(key, "must be between 1 and 4294967295");
            }
        }
        if !(0.0..=1.0).contains(&self.alerts.min_score) {
            return bad("alerts.min_score", "must be between 0 and 1");
        }
        if !(self.detect.shift.slack.is_finite() && self.detect.shift.slack > 0.0) {
            return bad("detect.shift.slack", "must be a positive number");
        }
        if !(self.detect.shift.threshold.is_finite() && self.detect.shift.threshold > 0.0) {
            return bad("detect.shift.threshold", "must be a positive number");
        }
        if !(self.detect.range.margin.is_finite() && self.detect.range.margin >= 0.0) {
            return bad("detect.range.margin", "must be zero or positive");
        }
        if !(self.detect.stuck.learned_run_factor.is_finite()
            && self.detect.stuck.learned_run_factor >= 1.0)
        {
            return bad("detect.stuck.learned_run_factor", "must be at least 1");
        }
        if !(self.detect.mode.move_z.is_finite() && self.detect.mode.move_z > 0.0) {
            return bad("detect.mode.move_z", "must be a positive number");
        }
        if !(self.detect.mode.settling_sigma.is_finite() && self.detect.mode.settling_sigma >= 1.0)
        {
            return bad("detect.mode.settling_sigma", "must be at least 1");
        }
        for (key, v) in [
            ("traffic.flood_factor", self.traffic.flood_factor),
            ("traffic.silence_factor", self.traffic.silence_factor),
            ("traffic.size_z", self.traffic.size_z),
            ("flows.volume_factor", self.flows.volume_factor),
        ] {
            if !(v.is_finite() && v >= 1.0) {
                return bad(key, "must be a number of at least 1");
            }
        }
        if !(self.traffic.loss_floor > 0.0 && self.traffic.loss_floor < 1.0) {
            return bad("traffic.loss_floor", "must be between 0 and 1 (exclusive)");
        }
        for (key, v) in [
            ("traffic.silence_after", self.traffic.silence_after),
            ("traffic.max_skew", self.traffic.max_skew),
            ("devices.reload", self.devices.reload),
        ] {
            if v <= 0 {
                return bad(key, "must be greater than zero");
            }
        }
        for (key, v) in [
            ("devices.max_per_machine", self.devices.max_per_machine),
            ("traffic.replay_history", self.traffic.replay_history),
            ("flows.max_peers", self.flows.max_peers),
            ("flows.max_ports", self.flows.max_ports),
            ("flows.max_ops", self.flows.max_ops),
            ("flows.fanout_min", self.flows.fanout_min),
        ] {
            if v == 0 || v > 1 << 20 {
                return bad(key, "must be between 1 and 1048576");
            }
        }
        if !(self.learn.variance > 0.0 && self.learn.variance <= 1.0) {
            return bad("learn.variance", "must be above 0 and at most 1");
        }
        for (key, v) in [
            ("learn.t2_factor", self.learn.t2_factor),
            ("learn.q_factor", self.learn.q_factor),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(key, "must be a positive number");
            }
        }
        if !(self.learn.max_inflation.is_finite() && self.learn.max_inflation >= 1.0) {
            return bad("learn.max_inflation", "must be at least 1");
        }
        if !(1..=8).contains(&self.learn.max_modes) {
            return bad("learn.max_modes", "must be 1 to 8");
        }
        if !(self.learn.mode_separation.is_finite() && self.learn.mode_separation > 0.0) {
            return bad("learn.mode_separation", "must be above 0");
        }
        if self.learn.lag < 0 {
            return bad("learn.lag", "must not be negative");
        }
        if self.learn.retrain <= 0 {
            return bad("learn.retrain", "must be greater than zero");
        }
        if self.learn.smooth == 0 || self.learn.smooth > 10_000 {
            return bad("learn.smooth", "must be between 1 and 10000");
        }
        if self.learn.max_train < 100 || self.learn.max_train > 1_000_000 {
            return bad("learn.max_train", "must be between 100 and 1000000");
        }
        if self.traffic.replay_min_run < 2 {
            return bad("traffic.replay_min_run", "must be at least 2");
        }
        if self.detect.mode.min_moving < 2 {
            return bad(
                "detect.mode.min_moving",
                "must be at least 2 (one sensor moving alone is what spikes are made of)",
            );
        }
        Ok(())
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_is_the_default_config() {
        let parsed = Config::from_toml(DEFAULT_TOML, Path::new("defaults.toml")).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn empty_file_is_the_default_config() {
        assert_eq!(
            Config::from_toml("", Path::new("x.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "[window]\nsize = \"10s\"\nsise = \"5s\"\n";
        let err = Config::from_toml(text, Path::new("plant.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("plant.toml:3:1: "), "{msg}");
        assert!(msg.contains("sise"), "{msg}");
    }

    #[test]
    fn bad_duration_names_the_problem() {
        let err = Config::from_toml("[window]\nsize = \"ten\"\n", Path::new("p.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("p.toml:2:"), "{msg}");
        assert!(msg.contains("unit"), "{msg}");
    }

    #[test]
    fn invalid_value_names_the_key() {
        let err =
            Config::from_toml("[alerts]\nmin_score = 1.5\n", Path::new("p.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "p.toml: alerts.min_score: must be between 0 and 1"
        );
        let err = Config::from_toml("[window]\nsize = \"0s\"\n", Path::new("p.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "p.toml: window.size: must be greater than zero"
        );
    }
}
