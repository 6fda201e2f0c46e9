//! The command line: argument definitions and the glue from each command to the
//! library. No detection logic lives here.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, DEFAULT_TOML};
use crate::eval::labels::{LabelScore, score};
use crate::pipeline::{Pipeline, Stats, reasons_in_order, run};
use crate::sim::{Factory, Label, SimConfig};
use crate::sink::MemorySink;
use crate::sink::console::ConsoleSink;
use crate::sink::ndjson::NdjsonSink;
use crate::source::capture::{CaptureSource, CaptureWriter};
use crate::source::sim::SimSource;
use crate::time::{Millis, parse_duration, parse_rfc3339};

mod live;
mod view;

/// twinwatch: security monitoring for manufacturing digital-twin telemetry.
#[derive(Debug, Parser)]
#[command(name = "twinwatch", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Live: consume telemetry and flows from NATS, publish alerts and dead letters.
    Run(RunArgs),
    /// Run the pipeline over a capture file, in event time; alerts as NDJSON.
    Replay(ReplayArgs),
    /// Generate a simulated factory's telemetry and flows, with labelled incidents, as a capture file.
    Simulate(SimulateArgs),
    /// Simulate a factory and detect in one process, no NATS needed; alerts printed as they come.
    Demo(DemoArgs),
    /// Write what flows on the bus as a capture file, for later `replay`.
    Record(RecordArgs),
    /// Watch the alerts on the bus: a table redrawn in place, or NDJSON with --json.
    Alerts(AlertsArgs),
    /// Throughput and latency on NATS: raw delivery to a counting subscriber, then the whole pipeline.
    Bench(BenchArgs),
    /// Configuration helpers.
    Config(ConfigArgs),
    /// Check or explain the SQL query files.
    #[command(subcommand)]
    Queries(QueriesCommand),
    /// Measure detection quality.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Device identities: make keys for the registry.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// What has been learned: the saved baselines and models of every machine.
    #[command(subcommand)]
    Models(ModelsCommand),
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// One line per machine: phase, sensors, devices, peers, multivariate model.
    List {
        /// Configuration file (TOML), for `[state] path`.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The snapshot file (model files are read from its folder); default: the configured `[state] path`.
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Everything learned for one machine, as JSON.
    Show {
        machine: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        path: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Create an nkey pair for a device: the seed goes to `<DIR>/<NAME>.nk`
    /// (mode 0600), the registry entry is printed.
    Keygen {
        /// The device's name (the `device` field of its messages).
        name: String,
        /// Machines the device may report for (repeatable).
        #[arg(long = "machine")]
        machines: Vec<String>,
        /// Folder for the seed file.
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
        /// Print `require_signature = false` (the key is checked when a signature is sent).
        #[arg(long)]
        optional: bool,
    },
    /// Print the public key (U...) of a seed file, as `nats-users` and the server want it.
    Pubkey {
        /// A file holding an nkey seed (`SU...`), as `keygen` writes.
        seed: PathBuf,
    },
    /// Seeds for the devices of the simulated factory (`simulate --machines N`)
    /// that have none in DIR, and their registry printed: every device gets a
    /// key (its NATS user in the segmented deployment); those that sign require it.
    SimKeys {
        /// Number of simulated machines (as `simulate --machines`).
        #[arg(long, default_value_t = 6)]
        machines: usize,
        /// Folder of the seed files (`<device>.nk`); `simulate --keys DIR` reads them.
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
    },
    /// Print the NATS users of the segmented deployment (deploy/secrets/users.conf):
    /// one DEVICES user per registered device with a key, publishing only its
    /// machines' subjects, and the processor's and SOC's public nkeys.
    NatsUsers {
        /// The device registry; default: the configured `devices.registry`.
        #[arg(long)]
        registry: Option<PathBuf>,
        /// The PROCESSOR account user's public nkey (U...).
        #[arg(long)]
        processor_key: String,
        /// The SOC account user's public nkey (U...).
        #[arg(long)]
        soc_key: String,
        /// Configuration file (TOML), for `devices.registry`.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// NATS server URL(s); overrides the configuration.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Alert format on the wire; overrides `[alerts] format`.
    #[arg(long, value_enum)]
    pub alert_format: Option<crate::ocsf::AlertFormat>,
}

#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// NATS server URL(s); overrides the configuration.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Configuration file (TOML) for the [nats] connection settings.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Only alerts of this severity or worse (info, low, medium, high, critical).
    #[arg(long)]
    pub min_severity: Option<crate::score::Severity>,
    /// Only this machine's alerts.
    #[arg(long)]
    pub machine: Option<String>,
    /// One alert per line as it arrives (NDJSON, the payload as published), for piping.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many alerts (after the filters).
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// NATS server URL(s); overrides the configuration.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Capture file to write.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Subjects to record (repeatable); default: the configured source subjects.
    #[arg(long = "subject")]
    pub subjects: Vec<String>,
    /// Stop after this long.
    #[arg(long, value_parser = duration_arg)]
    pub duration: Option<Millis>,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Configuration file (TOML) for the [nats] connection settings.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Capture file (NDJSON, contract §4); `-` for standard input.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Where alerts go (NDJSON); standard output by default.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Alert format of the lines; overrides `[alerts] format`.
    #[arg(long, value_enum)]
    pub alert_format: Option<crate::ocsf::AlertFormat>,
    /// Device registry (TOML); default: the configured `devices.registry`.
    #[arg(long)]
    pub devices: Option<PathBuf>,
    /// Write everything learned to this snapshot at the end (for `models list`,
    /// or to start `run` from baselines learned on a capture: set `[state] path` to it).
    #[arg(long)]
    pub state: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct FactoryArgs {
    /// Random seed: the same seed gives the same factory, byte for byte.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of machines.
    #[arg(long, default_value_t = 6)]
    pub machines: usize,
    /// Telemetry messages per second per machine (plant time).
    #[arg(long, default_value_t = 1.0)]
    pub hz: f64,
    /// Simulate without incidents.
    #[arg(long)]
    pub no_incidents: bool,
    /// Devices do not sign their payloads (by default the devices of machines 01, 03, 05, ... do).
    #[arg(long)]
    pub no_sign: bool,
    /// Sign with the seeds in this folder (`<device>.nk`, from `devices keygen`) where present.
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// Start of simulated time (RFC 3339).
    #[arg(long, default_value = "2026-11-27T06:00:00Z")]
    pub start: String,
}

impl FactoryArgs {
    fn sim_config(&self, duration: Millis) -> Result<SimConfig, UsageError> {
        let start = parse_rfc3339(&self.start).ok_or_else(|| {
            UsageError(format!("--start `{}` is not an RFC 3339 time", self.start))
        })?;
        if self.machines == 0 || self.machines > 100_000 {
            return Err(UsageError("--machines must be between 1 and 100000".into()));
        }
        if !(self.hz > 0.0 && self.hz <= 1000.0) {
            return Err(UsageError(
                "--hz must be above 0 and at most 1000 messages per second".into(),
            ));
        }
        Ok(SimConfig {
            seed: self.seed,
            machines: self.machines,
            start,
            duration,
            rate_hz: self.hz,
            incidents: !self.no_incidents,
            sign: !self.no_sign,
            keys_dir: self.keys.clone(),
            ..SimConfig::default()
        })
    }
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub factory: FactoryArgs,
    /// Simulated time to generate.
    #[arg(long, default_value = "2h", value_parser = duration_arg)]
    pub duration: Millis,
    /// Capture file to write; standard output by default.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Labels file (JSON list of machine, type, start, end); default: next to --output as `<output>.labels.json`.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Device registry of the simulated devices (their public keys); default: next to --output as `<output>.devices.toml`.
    #[arg(long)]
    pub registry: Option<PathBuf>,
    /// Publish live to this NATS server instead of writing a capture file.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// With --nats-url: log in as each device, with its seed in --keys DIR
    /// (`<device>.nk`), one connection per device, each publishing only its
    /// machine's messages (the segmented deployment's device users).
    #[arg(long, requires = "nats_url")]
    pub device_users: bool,
    /// Publishing pace on NATS: messages per second, or `max`; default: real time.
    #[arg(long)]
    pub rate: Option<String>,
    /// Configuration file (TOML) for the [nats] connection settings.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub factory: FactoryArgs,
    /// Plant time to simulate (the first 10 minutes are learning).
    #[arg(long, default_value = "90m", value_parser = duration_arg)]
    pub duration: Millis,
    /// How much faster than real time plant time runs, or `max`.
    #[arg(long, default_value = "300")]
    pub speed: String,
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Print the full, commented default configuration file.
    #[arg(long)]
    pub print_defaults: bool,
    /// Check a configuration file and exit 0 if it is valid.
    #[arg(long, value_name = "FILE")]
    pub check: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum QueriesCommand {
    /// Validate every .sql file of DIR (default: the configured folder) against the table schemas.
    Check {
        dir: Option<PathBuf>,
        /// Configuration file (TOML), for the default folder.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print what a query file computes: its kind, output columns and plan.
    Explain { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Replay a `simulate` capture and score the alerts against its labels.
    Sim(EvalSimArgs),
    /// The SKAB protocol on the SKAB data folder: the learned model beside the published leaderboard.
    Skab {
        /// The SKAB `data/` folder (holding valve1/, valve2/, other/) or its parent.
        dir: PathBuf,
        /// Also print the figures of every run.
        #[arg(long)]
        per_run: bool,
        /// Alarm factors over the largest smoothed training value of max-z, T² and Q.
        #[arg(long, default_value_t = 1.2)]
        z_factor: f64,
        #[arg(long, default_value_t = 3.0)]
        t2_factor: f64,
        #[arg(long, default_value_t = 8.0)]
        q_factor: f64,
        /// Rows the statistics are averaged over.
        #[arg(long, default_value_t = 20)]
        smooth: usize,
        /// Most operating modes per run (KMeans clusters of its training rows, a model each).
        #[arg(long, default_value_t = 1)]
        max_modes: usize,
    },
    /// NAB scoring on the NAB folder: a detector of the pipeline beside the published scoreboard.
    Nab {
        /// The NAB folder (holding data/ and labels/).
        dir: PathBuf,
        /// Which detector: `learned` (the multivariate model, on one series) or
        /// `readings` (the per-reading baselines: spike, shift, stuck, range).
        #[arg(long, default_value = "learned")]
        detector: String,
        /// Rows the learned model's statistic is averaged over.
        #[arg(long, default_value_t = 1)]
        smooth: usize,
        /// Configuration file (TOML) for the per-reading detectors' settings.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// NATS server to use; by default a private nats-server on a free loopback port.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Machines the messages come from, in turn.
    #[arg(long, default_value_t = 1000)]
    pub machines: usize,
    /// Readings per telemetry object.
    #[arg(long, default_value_t = 4)]
    pub sensors: usize,
    /// NATS messages per measured burst.
    #[arg(long, default_value_t = 500_000)]
    pub messages: usize,
    /// Telemetry objects per NATS message (more than 1: an array payload).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Event time between two objects of one machine (1s: 1 Hz telemetry).
    #[arg(long, default_value = "1s", value_parser = duration_arg)]
    pub interval: i64,
    /// Configuration file (TOML) for the pipeline; default: the defaults (queries from ./queries).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Only the raw delivery phase, its rate printed alone (bench runs it in a
    /// process of its own).
    #[arg(long, hide = true)]
    pub raw_only: bool,
}

#[derive(Debug, Args)]
pub struct EvalSimArgs {
    /// Capture file written by `simulate`.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Labels file written by `simulate`.
    #[arg(long)]
    pub labels: PathBuf,
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// An alert this long after an incident's end still counts for it.
    #[arg(long, default_value = "2m", value_parser = duration_arg)]
    pub grace: Millis,
    /// Also write the alerts here (NDJSON).
    #[arg(long)]
    pub alerts: Option<PathBuf>,
    /// Device registry; default: `<input>.devices.toml` when it exists, else the configured one.
    #[arg(long)]
    pub devices: Option<PathBuf>,
}

fn duration_arg(s: &str) -> Result<Millis, String> {
    parse_duration(s)
}

/// Bad usage or configuration: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl From<ConfigError> for UsageError {
    fn from(e: ConfigError) -> Self {
        UsageError(e.to_string())
    }
}

/// Runs a parsed command line.
pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => live::run(a),
        Command::Record(a) => live::record(a),
        Command::Alerts(a) => live::alerts(a),
        Command::Replay(a) => replay(a),
        Command::Simulate(a) => simulate(a),
        Command::Demo(a) => demo(a),
        Command::Config(a) => config(a),
        Command::Eval(EvalCommand::Sim(a)) => eval_sim(a),
        Command::Eval(EvalCommand::Nab {
            dir,
            detector,
            smooth,
            config,
        }) => eval_nab(&dir, &detector, smooth, config.as_deref()),
        Command::Bench(a) => bench(a),
        Command::Eval(EvalCommand::Skab {
            dir,
            per_run,
            z_factor,
            t2_factor,
            q_factor,
            smooth,
            max_modes,
        }) => {
            let mut d = crate::eval::skab::Detector {
                z_factor,
                t2_factor,
                q_factor,
                ..Default::default()
            };
            d.fit.smooth = smooth;
            d.fit.max_modes = max_modes.clamp(1, 8);
            eval_skab(&dir, per_run, &d)
        }
        Command::Models(ModelsCommand::List { config, path }) => {
            models_list(&load_checkpoint(config.as_deref(), path.as_deref())?)
        }
        Command::Models(ModelsCommand::Show {
            machine,
            config,
            path,
        }) => models_show(
            &load_checkpoint(config.as_deref(), path.as_deref())?,
            &machine,
        ),
        Command::Devices(DevicesCommand::Keygen {
            name,
            machines,
            dir,
            optional,
        }) => keygen(&name, &machines, &dir, !optional),
        Command::Devices(DevicesCommand::Pubkey { seed }) => {
            println!("{}", read_seed(&seed)?.public_key());
            Ok(())
        }
        Command::Devices(DevicesCommand::SimKeys { machines, dir }) => sim_keys(machines, &dir),
        Command::Devices(DevicesCommand::NatsUsers {
            registry,
            processor_key,
            soc_key,
            config,
        }) => {
            for (what, key) in [("--processor-key", &processor_key), ("--soc-key", &soc_key)] {
                if nkeys::KeyPair::from_public_key(key).is_err() {
                    return Err(UsageError(format!(
                        "{what} `{key}` is not a user public nkey (U...); `nk -gen user -pubout` or `twinwatch devices keygen` make one"
                    ))
                    .into());
                }
            }
            let cfg = load_config(config.as_deref())?;
            let reg = load_registry(&cfg, registry.as_deref())?;
            print!("{}", reg.nats_users(&processor_key, &soc_key));
            Ok(())
        }
        Command::Queries(QueriesCommand::Check { dir, config }) => {
            let dir = match dir {
                Some(d) => d,
                None => PathBuf::from(load_config(config.as_deref())?.queries.dir),
            };
            queries_check(&dir)
        }
        Command::Queries(QueriesCommand::Explain { file }) => queries_explain(&file),
    }
}

pub(crate) fn load_config(path: Option<&Path>) -> Result<Config> {
    Config::load_or_default(path).map_err(|e| UsageError::from(e).into())
}

/// The feature stage, when query files are enabled.
/// The device registry: `path` when given (it must exist), else the
/// configured `devices.registry` (none when that file does not exist).
pub(crate) fn load_registry(
    cfg: &Config,
    path: Option<&Path>,
) -> Result<crate::registry::Registry> {
    let file = path.map_or_else(|| PathBuf::from(&cfg.devices.registry), Path::to_path_buf);
    match crate::registry::Registry::load(&file) {
        Ok(Some(r)) => {
            tracing::info!(devices = r.len(), path = %file.display(), "device registry loaded");
            Ok(r)
        }
        Ok(None) if path.is_some() => {
            Err(UsageError(format!("{}: no such device registry", file.display())).into())
        }
        Ok(None) => Ok(crate::registry::Registry::default()),
        Err(e) => Err(UsageError(e.to_string()).into()),
    }
}

fn keygen(name: &str, machines: &[String], dir: &Path, require: bool) -> Result<()> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(UsageError(format!("`{name}` cannot be a device name and file name")).into());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.nk"));
    if path.exists() {
        return Err(UsageError(format!(
            "{}: exists already; remove it first to replace the key",
            path.display()
        ))
        .into());
    }
    let key = new_seed_file(&path)?;
    eprintln!(
        "seed written to {} (keep it on the device only)",
        path.display()
    );
    print!(
        "{}",
        crate::registry::entry_toml(name, machines, &key.public_key(), require)
    );
    Ok(())
}

/// The key pair of a seed file; a missing or malformed file is bad usage.
pub(crate) fn read_seed(path: &Path) -> Result<nkeys::KeyPair> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
    nkeys::KeyPair::from_seed(text.trim()).map_err(|_| {
        UsageError(format!(
            "{}: does not hold an nkey seed (a line starting with SU); `twinwatch devices keygen` makes one",
            path.display()
        ))
        .into()
    })
}

fn sim_keys(machines: usize, dir: &Path) -> Result<()> {
    if machines == 0 || machines > 100_000 {
        return Err(UsageError("--machines must be between 1 and 100000".into()).into());
    }
    let factory = Factory::new(SimConfig {
        machines,
        incidents: false,
        ..SimConfig::default()
    });
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = String::from(
        "# Device registry of the simulated factory (twinwatch devices sim-keys).\n\n",
    );
    let mut made = 0;
    for (device, machine, signs) in factory.devices() {
        let path = dir.join(format!("{device}.nk"));
        let key = if path.exists() {
            read_seed(&path)?
        } else {
            made += 1;
            new_seed_file(&path)?
        };
        out.push_str(&crate::registry::entry_toml(
            device,
            &[machine.to_string()],
            &key.public_key(),
            signs,
        ));
        out.push('\n');
    }
    eprintln!("{made} new seeds in {}", dir.display());
    print!("{out}");
    Ok(())
}

/// A new user key pair whose seed is written to `path` (readable by its owner only).
fn new_seed_file(path: &Path) -> Result<nkeys::KeyPair> {
    let key = nkeys::KeyPair::new_user();
    let seed = key
        .seed()
        .map_err(|e| anyhow::anyhow!("making a seed: {e}"))?;
    write_secret(path, &(seed + "\n"))?;
    Ok(key)
}

/// Writes a file only its owner can read.
fn write_secret(path: &Path, text: &str) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn features(cfg: &Config) -> Option<crate::features::FeatureStage> {
    cfg.queries
        .enabled
        .then(|| crate::features::FeatureStage::new(&cfg.queries))
}

/// The feature stage on a thread of its own (`run`, `bench`), its files
/// planned first ([`Pipeline::plan_queries`]).
pub(crate) async fn features_beside(
    cfg: &Config,
    pipeline: &mut Pipeline,
    when_behind: crate::features::WhenBehind,
) -> Option<crate::features::BackgroundStage> {
    let mut stage = features(cfg)?;
    pipeline.plan_queries(&mut stage).await;
    Some(stage.spawn(when_behind))
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Progress on standard error, once a second, only when it is a terminal.
struct Progress {
    on: bool,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new() -> Self {
        let now = Instant::now();
        Progress {
            on: std::io::stderr().is_terminal(),
            started: now,
            last: now,
        }
    }

    fn tick(&mut self, s: &Stats) {
        if !self.on || self.last.elapsed().as_millis() < 1000 {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        eprint!(
            "\r{} messages, {} readings ({:.0}/s), {} alerts   ",
            s.messages,
            s.readings,
            s.readings as f64 / secs,
            s.alerts
        );
        let _ = std::io::stderr().flush();
    }

    fn done(&self) {
        if self.on && self.started.elapsed().as_millis() >= 1000 {
            eprintln!();
        }
    }
}

fn summary_line(s: &Stats, secs: f64) -> String {
    let mut line = format!(
        "{} messages, {} readings, {} flow records in {:.2} s ({:.0} readings/s); {} alerts ({} folded into open ones); {} machine-windows closed; {} late, {} future-dated",
        s.messages,
        s.readings,
        s.flows,
        secs,
        s.readings as f64 / secs.max(1e-9),
        s.alerts,
        s.suppressed,
        s.machine_windows,
        s.late,
        s.future
    );
    if s.rejected > 0 {
        let reasons: Vec<String> = reasons_in_order(s)
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        line.push_str(&format!(
            "; {} rejected ({})",
            s.rejected,
            reasons.join(", ")
        ));
    }
    line
}

fn replay(a: ReplayArgs) -> Result<()> {
    let mut cfg = load_config(a.config.as_deref())?;
    if let Some(f) = a.alert_format {
        cfg.alerts.format = f;
    }
    let mut source = CaptureSource::open(&a.input).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nhint: --input takes a capture file written by `twinwatch simulate` or `record`"
        )
    })?;
    let mut sink = match &a.output {
        Some(p) => NdjsonSink::create(p).with_context(|| format!("creating {}", p.display()))?,
        None => NdjsonSink::stdout(),
    }
    .with_format(cfg.alerts.format);
    let mut pipeline = Pipeline::new(&cfg);
    pipeline.set_registry(load_registry(&cfg, a.devices.as_deref())?);
    let started = Instant::now();
    replay_through(&cfg, &mut pipeline, &mut source, &mut sink)?;
    tracing::info!(
        "replay: {}",
        summary_line(&pipeline.stats(), started.elapsed().as_secs_f64())
    );
    if let Some(path) = &a.state {
        crate::state::StateStore::new(path)
            .save(pipeline.snapshot(), None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tracing::info!(path = %path.display(), "state written");
    }
    Ok(())
}

/// A capture through the pipeline and the query files into `sink`, with progress on a terminal.
fn replay_through<K: crate::sink::Sink>(
    cfg: &Config,
    pipeline: &mut Pipeline,
    source: &mut CaptureSource,
    sink: &mut K,
) -> Result<()> {
    let mut progress = Progress::new();
    let mut stage = features(cfg);
    runtime()?.block_on(run(pipeline, source, sink, stage.as_mut(), &mut |p| {
        progress.tick(&p.stats())
    }))?;
    progress.done();
    Ok(())
}

fn write_labels(path: &Path, labels: &[Label]) -> Result<()> {
    let text = serde_json::to_string_pretty(labels)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn simulate(a: SimulateArgs) -> Result<()> {
    if a.nats_url.is_some() {
        return live::simulate(a);
    }
    let sim = a.factory.sim_config(a.duration)?;
    let mut factory = Factory::new(sim);
    let out: Box<dyn Write> = match &a.output {
        Some(p) if p != Path::new("-") => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        _ => Box::new(std::io::stdout().lock()),
    };
    let labels_path = a.labels.clone().or_else(|| {
        a.output
            .as_ref()
            .filter(|p| *p != Path::new("-"))
            .map(|p| PathBuf::from(format!("{}.labels.json", p.display())))
    });
    let mut w = CaptureWriter::new(std::io::BufWriter::with_capacity(1 << 20, out));
    let mut n: u64 = 0;
    let total = (a.duration as f64 / 1000.0 * factory.messages_per_second()).max(1.0);
    let mut progress = Progress::new();
    while let Some(tick) = factory.next_tick() {
        for e in &tick {
            w.write(e)?;
        }
        n += tick.len() as u64;
        if progress.on && progress.last.elapsed().as_millis() >= 1000 {
            progress.last = Instant::now();
            eprint!(
                "\rsimulating: {:.0}% ({n} messages)   ",
                100.0 * n as f64 / total
            );
        }
    }
    w.flush()?;
    progress.done();
    match &labels_path {
        Some(p) => write_labels(p, factory.labels())?,
        None => tracing::warn!(
            "labels not written: give --labels FILE when the capture goes to standard output"
        ),
    }
    let registry_path = a.registry.clone().or_else(|| {
        a.output
            .as_ref()
            .filter(|p| *p != Path::new("-"))
            .map(|p| PathBuf::from(format!("{}.devices.toml", p.display())))
    });
    if let Some(p) = &registry_path {
        std::fs::write(p, factory.registry_toml())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    tracing::info!(
        messages = n,
        incidents = factory.labels().len(),
        labels = ?labels_path,
        "simulation written"
    );
    Ok(())
}

fn machine_hours(s: &Stats, warmup: Millis) -> f64 {
    let machines = (s.machines_learning + s.machines_protecting) as f64;
    let span = match (s.oldest_ts, s.newest_ts) {
        (Some(a), Some(b)) => (b - a - warmup).max(0),
        _ => 0,
    };
    machines * span as f64 / 3_600_000.0
}

fn demo(a: DemoArgs) -> Result<()> {
    let cfg = load_config(a.config.as_deref())?;
    let speed = match a.speed.as_str() {
        "max" => None,
        s => match s.parse::<f64>() {
            Ok(v) if v > 0.0 && v.is_finite() => Some(v),
            _ => {
                return Err(
                    UsageError(format!("--speed `{s}`: give a positive number or `max`")).into(),
                );
            }
        },
    };
    let sim = a.factory.sim_config(a.duration)?;
    let machines = sim.machines;
    let factory = Factory::new(sim);
    let labels = factory.labels().to_vec();
    let wall = speed.map(|v| a.duration as f64 / v / 1000.0);
    println!(
        "twinwatch demo: {machines} simulated machines, {} of plant time{}, seed {}.",
        crate::time::format_duration(a.duration),
        wall.map_or(" as fast as possible".to_string(), |w| format!(
            " in about {w:.0} s"
        )),
        a.factory.seed
    );
    println!(
        "Each machine learns its baselines for {} of plant time; {} incidents (sensor faults, and attacks on devices, traffic and flows) are injected after that.",
        crate::time::format_duration(cfg.baseline.warmup),
        labels.len()
    );
    println!("Alerts appear below as they are raised:\n");
    let registry =
        crate::registry::Registry::parse(&factory.registry_toml(), Path::new("simulated devices"))?;
    let mut source = SimSource::new(factory, speed);
    let mut pipeline = Pipeline::new(&cfg);
    pipeline.set_registry(registry);
    let mut sink = Recorder {
        console: ConsoleSink::default(),
        alerts: MemorySink::default(),
    };
    let started = Instant::now();
    let mut stage = features(&cfg);
    runtime()?.block_on(run(
        &mut pipeline,
        &mut source,
        &mut sink,
        stage.as_mut(),
        &mut |_| {},
    ))?;
    let secs = started.elapsed().as_secs_f64();
    let stats = pipeline.stats();
    let result: LabelScore = score(
        &sink.alerts.alerts,
        &labels,
        machine_hours(&stats, cfg.baseline.warmup),
        120_000,
    );
    println!("\nSummary");
    println!("  {}", summary_line(&stats, secs));
    for line in result.report().lines() {
        println!("  {line}");
    }
    Ok(())
}

/// Prints alerts and keeps them for the summary.
struct Recorder {
    console: ConsoleSink,
    alerts: MemorySink,
}

impl crate::sink::Sink for Recorder {
    async fn publish(
        &mut self,
        alerts: &[crate::alerts::Alert],
    ) -> Result<(), crate::sink::SinkError> {
        self.console.publish(alerts).await?;
        self.alerts.publish(alerts).await
    }

    async fn flush(&mut self) -> Result<(), crate::sink::SinkError> {
        self.console.flush().await
    }
}

fn queries_check(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(UsageError(format!("{}: not a folder of query files", dir.display())).into());
    }
    match runtime()?.block_on(crate::features::Queries::check_dir(dir)) {
        Ok(files) => {
            for (name, kind) in &files {
                println!("{}: ok ({kind})", dir.join(name).display());
            }
            Ok(())
        }
        Err(errors) => {
            let lines: Vec<String> = errors
                .iter()
                .map(|e| {
                    format!(
                        "{}:{}:{}: {}",
                        dir.join(&e.file).display(),
                        e.line,
                        e.column,
                        e.message
                    )
                })
                .collect();
            Err(UsageError(lines.join("\n")).into())
        }
    }
}

fn queries_explain(file: &Path) -> Result<()> {
    match runtime()?.block_on(crate::features::Queries::explain(file)) {
        Ok(text) => {
            print!("{text}");
            Ok(())
        }
        Err(e) => {
            let dir = file.parent().unwrap_or(Path::new(""));
            Err(UsageError(format!(
                "{}:{}:{}: {}",
                dir.join(&e.file).display(),
                e.line,
                e.column,
                e.message
            ))
            .into())
        }
    }
}

fn config(a: ConfigArgs) -> Result<()> {
    if let Some(path) = &a.check {
        Config::load(path).map_err(UsageError::from)?;
        println!("{}: ok", path.display());
        return Ok(());
    }
    if a.print_defaults {
        print!("{DEFAULT_TOML}");
        return Ok(());
    }
    Err(UsageError("config: give --print-defaults or --check FILE".into()).into())
}

fn eval_sim(a: EvalSimArgs) -> Result<()> {
    let cfg = load_config(a.config.as_deref())?;
    let text = std::fs::read_to_string(&a.labels)
        .with_context(|| format!("reading {}", a.labels.display()))?;
    let labels: Vec<Label> = serde_json::from_str(&text)
        .map_err(|e| UsageError(format!("{}: not a labels file: {e}", a.labels.display())))?;
    let mut source = CaptureSource::open(&a.input).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut pipeline = Pipeline::new(&cfg);
    let beside = PathBuf::from(format!("{}.devices.toml", a.input.display()));
    let devices = a
        .devices
        .clone()
        .or_else(|| beside.exists().then_some(beside));
    pipeline.set_registry(load_registry(&cfg, devices.as_deref())?);
    let mut sink = MemorySink::default();
    let started = Instant::now();
    replay_through(&cfg, &mut pipeline, &mut source, &mut sink)?;
    let stats = pipeline.stats();
    if let Some(p) = &a.alerts {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        );
        for al in &sink.alerts {
            serde_json::to_writer(&mut f, al)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
    }
    let result = score(
        &sink.alerts,
        &labels,
        machine_hours(&stats, cfg.baseline.warmup),
        a.grace,
    );
    println!("{}", summary_line(&stats, started.elapsed().as_secs_f64()));
    println!("{}", result.report());
    println!(
        "sim: recall {:.3} false_per_machine_hour {:.3}",
        result.recall(),
        result.false_per_machine_hour()
    );
    Ok(())
}

fn eval_skab(dir: &Path, per_run: bool, detector: &crate::eval::skab::Detector) -> Result<()> {
    use crate::eval::skab;
    let runs = skab::load(dir).map_err(|e| UsageError(e.to_string()))?;
    let mut failed = Vec::new();
    let (total, runs_scored) = skab::evaluate(&runs, |run| match detector.predict(run) {
        Ok(p) => p,
        Err(e) => {
            // A run the model cannot learn from predicts nothing (and is said so).
            failed.push(format!("{}: {e}", run.name));
            vec![false; run.rows.len()]
        }
    });
    for f in &failed {
        tracing::warn!("{f}");
    }
    let ours = "**twinwatch (learned baseline)**";
    let mut rows: Vec<(String, f64, f64, f64)> = skab::LEADERBOARD
        .iter()
        .map(|(n, f1, far, mar)| (n.to_string(), *f1, *far, *mar))
        .collect();
    rows.push((ours.to_string(), total.f1(), total.far(), total.mar()));
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.total_cmp(&b.2)));
    println!(
        "SKAB, {} runs, {} test rows (first {} rows of each run for training)\n",
        runs.len(),
        total.tp + total.fp + total.fn_ + total.tn,
        skab::TRAIN_ROWS
    );
    println!("| Algorithm | F1 | FAR, % | MAR, % |");
    println!("|---|---|---|---|");
    for (name, f1, far, mar) in &rows {
        println!("| {name} | {f1:.2} | {far:.2} | {mar:.2} |");
    }
    if per_run {
        println!("\n| run | F1 | FAR, % | MAR, % |");
        println!("|---|---|---|---|");
        for (name, c) in &runs_scored {
            println!(
                "| {name} | {:.2} | {:.2} | {:.2} |",
                c.f1(),
                c.far(),
                c.mar()
            );
        }
    }
    println!(
        "\nskab: F1 {:.3} FAR {:.2}% MAR {:.2}%",
        total.f1(),
        total.far(),
        total.mar()
    );
    Ok(())
}

/// The saved snapshot, read as `run` would (a bad file is a usage error here: nothing is set aside).
fn bench(a: BenchArgs) -> Result<()> {
    if a.machines == 0 || a.sensors == 0 || a.messages == 0 || a.batch == 0 {
        return Err(UsageError(
            "--machines, --sensors, --messages and --batch must be at least 1".into(),
        )
        .into());
    }
    let params = crate::bench::BenchParams {
        nats_url: a.nats_url,
        machines: a.machines,
        sensors: a.sensors,
        messages: a.messages,
        batch: a.batch,
        interval: a.interval,
        config: load_config(a.config.as_deref())?,
        progress: std::io::stderr().is_terminal(),
        raw_exe: std::env::current_exe().ok(),
    };
    if a.raw_only {
        let Some(url) = params.nats_url.clone() else {
            return Err(UsageError("--raw-only needs --nats-url".into()).into());
        };
        let rate = runtime()?
            .block_on(crate::bench::raw(&url, &params))
            .map_err(|e| anyhow::anyhow!(e))?;
        println!("{rate:.0}");
        return Ok(());
    }
    let (machines, sensors, batch, interval) = (a.machines, a.sensors, a.batch, a.interval);
    // The bench's publisher and its watches on this thread alone; the
    // pipeline starts a runtime of its own, as `run` would have.
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = driver
        .block_on(crate::bench::run(params))
        .map_err(|e| match e {
            crate::bench::BenchError::NoServer => anyhow::Error::from(UsageError(e.to_string())),
            other => anyhow::anyhow!(other),
        })?;
    println!(
        "messages: {machines} machines, {sensors} readings per object, {batch} object(s) per message, {interval} ms of event time per object; {} query file(s)",
        r.queries
    );
    println!(
        "raw NATS delivery to one counting subscriber: {:.0} msgs/s (best of {} runs: {})",
        r.raw_msgs_per_s,
        r.raw_runs.len(),
        r.raw_runs
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "pipeline, sustained with no drops: {:.0} msgs/s = {:.0} readings/s ({:.2} of raw; {} burst(s))",
        r.sustained_msgs_per_s,
        r.sustained_readings_per_s,
        r.ratio(),
        r.attempts
    );
    if let (Some(all), Some(q)) = (r.cpu_us_per_msg, r.query_cpu_us_per_msg) {
        println!(
            "pipeline CPU at the sustained rate: {all:.2} µs per message, of which the query thread {q:.2} (its threads' CPU time over the messages it took)"
        );
    }
    println!(
        "publish -> alert at {:.0} msgs/s: p50 {:.1} ms, p99 {:.1} ms ({} spikes)",
        r.latency_load_msgs_per_s, r.p50_ms, r.p99_ms, r.spikes
    );
    if r.queries > 0 {
        println!(
            "query runs: {} taking {:.1} s in all on their own thread ({} due runs folded into the next while it was busy, {} machine-windows not queried)",
            r.query_runs, r.query_seconds, r.query_runs_folded, r.query_windows_shed
        );
    }
    match r.peak_heap_mb {
        Some(heap) => println!(
            "peak RSS {:.0} MB: heap in use at most {heap:.0} MB (sampled every {} ms, not while latency is timed), executable and libraries {:.0} MB resident, the rest mostly heap the allocator holds free",
            r.peak_rss_mb,
            crate::bench::HEAP_SAMPLE.as_millis(),
            r.code_mb
        ),
        None => println!(
            "peak RSS {:.0} MB (executable and libraries {:.0} MB resident)",
            r.peak_rss_mb, r.code_mb
        ),
    }
    println!("{}", r.line());
    Ok(())
}

fn load_checkpoint(config: Option<&Path>, path: Option<&Path>) -> Result<crate::state::Checkpoint> {
    let cfg = load_config(config)?;
    let file = path.map_or_else(|| PathBuf::from(&cfg.state.path), Path::to_path_buf);
    crate::state::read(&file).map_err(|e| {
        let hint = match &e {
            crate::state::ReadError::Io(_) => {
                " (nothing learned yet? `run` writes it every [state] interval)"
            }
            _ => "",
        };
        UsageError(format!("{}: {e}{hint}", file.display())).into()
    })
}

fn models_list(c: &crate::state::Checkpoint) -> Result<()> {
    let p = &c.pipeline;
    println!(
        "snapshot of {} (format {}), {} machines",
        c.created_at,
        c.format_version,
        p.machines.len()
    );
    println!(
        "{:<24} {:<10} {:>7} {:>7} {:>5}  multivariate",
        "machine", "phase", "sensors", "devices", "peers"
    );
    for (i, name) in p.machines.iter().enumerate() {
        let det = p.detectors.get(i).and_then(Option::as_ref);
        let phase = match det {
            Some(d) if d.protecting => "protecting",
            Some(_) => "learning",
            None => "-",
        };
        let sensors = det.map_or(0, |d| d.metrics.len());
        let devices = p
            .identity
            .machines
            .get(i)
            .and_then(Option::as_ref)
            .map_or(0, |m| m.devices.len());
        let peers = p
            .flows
            .get(i)
            .and_then(Option::as_ref)
            .map_or(0, |f| f.peers.len());
        let model = match p.learned.get(i).and_then(Option::as_ref) {
            None => "-".to_string(),
            Some(m) => match (&m.model, &m.fit_error) {
                (Some(model), _) => format!(
                    "{} features, {} mode(s), trained on {} vectors {} .. {}, fitted {} time(s)",
                    model.width(),
                    model.models.len(),
                    model.trained_on(),
                    crate::time::format_rfc3339(m.trained_from),
                    crate::time::format_rfc3339(m.trained_to),
                    m.fits
                ),
                (None, Some(e)) => format!("not fitted: {e}"),
                (None, None) => "learning".to_string(),
            },
        };
        println!("{name:<24} {phase:<10} {sensors:>7} {devices:>7} {peers:>5}  {model}");
    }
    Ok(())
}

fn models_show(c: &crate::state::Checkpoint, machine: &str) -> Result<()> {
    let p = &c.pipeline;
    let Some(i) = p.machines.iter().position(|m| m == machine) else {
        return Err(UsageError(format!(
            "no machine `{machine}` in the snapshot ({} machines; `twinwatch models list` names them)",
            p.machines.len()
        ))
        .into());
    };
    let metric = |id: u32| {
        p.metrics
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    };
    let device = |id: u32| {
        p.devices
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    };
    let sensors: Vec<serde_json::Value> = p
        .detectors
        .get(i)
        .and_then(Option::as_ref)
        .map(|d| {
            d.metrics
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "sensor": metric(s.metric),
                        "level": s.predictor.level,
                        "sigma": s.predictor.sigma(),
                        "range": [s.envelope.lo, s.envelope.hi],
                        "settled": s.settled,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let devices: Vec<serde_json::Value> = p
        .identity
        .machines
        .get(i)
        .and_then(Option::as_ref)
        .map(|m| {
            m.devices
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "device": device(d.device),
                        "status": d.status,
                        "messages_per_window": d.rate.counts.mean,
                        "payload_bytes": d.size.mean,
                        "clock_offset_ms": d.skew.offset,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let flows = p.flows.get(i).and_then(Option::as_ref).map(|f| {
        serde_json::json!({
            "protecting": f.protecting,
            "peers": f.peers.len(),
            "ports": f.ports,
            "operations": f.ops.len(),
            "widest_fanout": f.widest_fanout,
        })
    });
    let model = p.learned.get(i).and_then(Option::as_ref).map(|m| {
        serde_json::json!({
            "features": m.features.iter().map(|f| metric(*f)).collect::<Vec<_>>(),
            "trained_from": crate::time::format_rfc3339(m.trained_from),
            "trained_to": crate::time::format_rfc3339(m.trained_to),
            "fits": m.fits,
            "fit_error": m.fit_error,
            "model": m.model,
        })
    });
    let out = serde_json::json!({
        "machine": machine,
        "snapshot": {"created_at": c.created_at, "format_version": c.format_version},
        "sensors": sensors,
        "devices": devices,
        "flows": flows,
        "multivariate": model,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn eval_nab(dir: &Path, detector: &str, smooth: usize, config: Option<&Path>) -> Result<()> {
    use crate::eval::nab::{self, Profile};
    let cfg = load_config(config)?;
    let (learned, label) = match detector {
        "learned" => (true, "**twinwatch (learned model)**"),
        "readings" => (false, "**twinwatch (per-reading detectors)**"),
        other => {
            return Err(UsageError(format!(
                "--detector `{other}`: give `learned` or `readings`"
            ))
            .into());
        }
    };
    let series = nab::load(dir).map_err(|e| UsageError(e.to_string()))?;
    let on = std::io::stderr().is_terminal();
    let mut scores = Vec::with_capacity(series.len());
    for (i, s) in series.iter().enumerate() {
        if on {
            eprint!(
                "\rscoring {}/{}: {}            ",
                i + 1,
                series.len(),
                s.name
            );
        }
        scores.push(if learned {
            nab::model_scores(s, smooth)
        } else {
            nab::detector_scores(s, &cfg)
        });
    }
    if on {
        eprintln!();
    }
    let mut ours = Vec::new();
    for p in [Profile::STANDARD, Profile::LOW_FP, Profile::LOW_FN] {
        // The alert cooldown in rows (one row a second, as the detectors see them).
        let cooldown = (cfg.alerts.cooldown / 1000).max(0) as usize;
        let (threshold, files) = nab::best_threshold(&series, &scores, &p, cooldown);
        ours.push((nab::normalised(&files, &p), threshold));
    }
    let rows_n: usize = series.iter().map(|s| s.values.len()).sum();
    let windows: usize = series.iter().map(|s| s.windows.len()).sum();
    println!(
        "NAB, {} series, {rows_n} rows, {windows} windows\n",
        series.len()
    );
    let mut rows: Vec<(String, f64, f64, f64)> = nab::SCOREBOARD
        .iter()
        .map(|(n, a, b, c)| (n.to_string(), *a, *b, *c))
        .collect();
    rows.push((label.into(), ours[0].0, ours[1].0, ours[2].0));
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("| Detector | Standard | Low FP | Low FN |");
    println!("|---|---|---|---|");
    for (n, a, b, c) in &rows {
        println!("| {n} | {a:.1} | {b:.1} | {c:.1} |");
    }
    println!(
        "\nthresholds (score): standard {:.4}, low FP {:.4}, low FN {:.4}",
        ours[0].1, ours[1].1, ours[2].1
    );
    println!(
        "\nnab: standard {:.1} low_fp {:.1} low_fn {:.1}",
        ours[0].0, ours[1].0, ours[2].0
    );
    Ok(())
}
