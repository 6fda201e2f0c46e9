//! The simulated factory behind `simulate`, `demo`, benches and tests.
//!
//! Each machine has physically coupled sensors driven by one state: spindle
//! speed follows the operating mode's set point, motor current follows load and
//! speed, temperature follows current through a slow thermal lag, vibration
//! grows with the square of speed, pressure and coolant flow follow load. Modes
//! (idle, normal, full load) change on a schedule with plant-wide breaks, the
//! first ten minutes walk through all three so that learning sees them. Flow
//! records show the SCADA poller, the twin gateway and the occasional
//! engineering write.
//!
//! Labelled incidents are injected after the warm-up, alternating between
//! sensor faults on one sensor — `spike` (a few readings many sigmas off),
//! `drift` (an offset growing linearly for minutes), `stuck` (the value
//! frozen), `decouple` (temperature reported flat, with its usual noise, while
//! the load changes underneath: a cross-sensor manipulation) — and attacks on the twin's traffic: `spoof` (a second device
//! publishing plausible readings for the machine), `replay_seq` and
//! `replay_forged` (an old stretch of the machine's readings sent instead of
//! the live ones, with their old sequence numbers or with forged continuing
//! ones), `flood` (ten times the message rate), `silence` (the device's
//! messages stop arriving), `clock_skew` (timestamps minutes off),
//! `exfil` (a new external peer receiving large volumes), `unauthorized_write`
//! (the SCADA poller, which only reads, writes a register), `scan` (a host
//! touching many addresses and ports) and `bad_signature` (forged signatures
//! on a signing device's messages).
//!
//! Devices of even-numbered machines (1st, 3rd, ...) sign their payloads with
//! an nkey derived from the seed (or read from `--keys DIR`);
//! [`Factory::registry_toml`] gives the matching device registry. Everything
//! is a pure function of `--seed`.

pub mod rng;

use std::fmt::Write as _;

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::source::Envelope;
use crate::time::{Millis, format_rfc3339, parse_rfc3339};
use rng::Rng;

/// Default start of simulated time: 2026-11-27T06:00:00Z.
pub const DEFAULT_START: Millis = 1_795_759_200_000;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub machines: usize,
    pub start: Millis,
    pub duration: Millis,
    /// Telemetry messages per second per machine.
    pub rate_hz: f64,
    /// Inject labelled incidents.
    pub incidents: bool,
    /// Incidents start no earlier than this after the start (past the warm-up).
    pub quiet_start: Millis,
    pub site: String,
    /// Devices of even-numbered machines sign their payloads.
    pub sign: bool,
    /// Seed files (`<device>.nk`) to sign with instead of derived keys.
    pub keys_dir: Option<std::path::PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            machines: 6,
            start: DEFAULT_START,
            duration: 2 * 3_600_000,
            rate_hz: 1.0,
            incidents: true,
            quiet_start: 15 * 60_000,
            site: "plant1".into(),
            sign: true,
            keys_dir: None,
        }
    }
}

/// A labelled incident (the labels file is a JSON list of these).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub machine: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub start: String,
    pub end: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
}

impl Label {
    /// Start and end as epoch milliseconds.
    pub fn span(&self) -> Option<(Millis, Millis)> {
        Some((parse_rfc3339(&self.start)?, parse_rfc3339(&self.end)?))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    Normal,
    Full,
}

impl Mode {
    fn speed(self) -> f64 {
        match self {
            Mode::Idle => 0.25,
            Mode::Normal => 1.0,
            Mode::Full => 1.5,
        }
    }
    fn load(self) -> f64 {
        match self {
            Mode::Idle => 0.1,
            Mode::Normal => 0.6,
            Mode::Full => 1.0,
        }
    }
}

/// The sensors every machine reports, with their noise sigmas and decimals.
const METRICS: [(&str, f64, usize); 6] = [
    ("temperature_c", 0.15, 2),
    ("vibration_mm_s", 0.06, 3),
    ("spindle_rpm", 1.5, 1),
    ("motor_current_a", 0.3, 2),
    ("pressure_bar", 0.04, 3),
    ("coolant_flow_l_min", 0.15, 2),
];
/// Sensors that drift slowly (slow processes or ageing transducers).
const DRIFTABLE: [usize; 4] = [0, 1, 4, 5];

#[derive(Debug, Clone, Copy)]
enum Fault {
    Spike {
        offset: f64,
    },
    Drift {
        total: f64,
    },
    Stuck,
    /// The sensor reports its level at the start, with its usual noise, while
    /// the machine changes load underneath: every statistic of its own stays
    /// normal, its relation to the others breaks.
    Decouple,
}

#[derive(Debug, Clone)]
struct Incident {
    metric: usize,
    start: Millis,
    end: Millis,
    fault: Fault,
}

/// Attacks on the traffic and identity of a machine.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attack {
    Spoof,
    /// Messages `lag` back sent again, with their old sequence numbers or forged ones.
    Replay {
        lag: usize,
        forged_seq: bool,
    },
    Flood,
    Silence,
    ClockSkew {
        offset: Millis,
    },
    Exfil,
    UnauthorizedWrite,
    Scan,
    BadSignature,
}

impl Attack {
    fn label(self) -> &'static str {
        match self {
            Attack::Spoof => "spoof",
            Attack::Replay {
                forged_seq: false, ..
            } => "replay_seq",
            Attack::Replay {
                forged_seq: true, ..
            } => "replay_forged",
            Attack::Flood => "flood",
            Attack::Silence => "silence",
            Attack::ClockSkew { .. } => "clock_skew",
            Attack::Exfil => "exfil",
            Attack::UnauthorizedWrite => "unauthorized_write",
            Attack::Scan => "scan",
            Attack::BadSignature => "bad_signature",
        }
    }
}

/// The labels of the attacks, for reports.
pub const ATTACK_KINDS: [&str; 10] = [
    "spoof",
    "replay_seq",
    "replay_forged",
    "flood",
    "silence",
    "clock_skew",
    "exfil",
    "unauthorized_write",
    "scan",
    "bad_signature",
];

#[derive(Debug, Clone, Copy)]
struct AttackWindow {
    start: Millis,
    end: Millis,
    attack: Attack,
}

struct Machine {
    name: String,
    device: String,
    ip: String,
    base_rpm: f64,
    temp_gain: f64,
    epoch_ms_ts: bool,
    seq: u64,
    mode: Mode,
    mode_until: Millis,
    rpm: f64,
    load: f64,
    temp: f64,
    incidents: Vec<Incident>,
    attacks: Vec<AttackWindow>,
    frozen: [Option<f64>; 6],
    last: [f64; 6],
    rng: Rng,
    /// Signs its payloads when set.
    key: Option<nkeys::KeyPair>,
    /// Readings objects and sequence numbers sent, kept only when a replay is planned.
    history: VecDeque<(u64, String)>,
    keep_history: usize,
    spoof_device: String,
    spoof_seq: u64,
    /// When the engineering workstation writes once while the machine learns.
    learning_write: Millis,
}

const KINDS: [(&str, f64); 6] = [
    ("press", 900.0),
    ("lathe", 1200.0),
    ("mill", 1500.0),
    ("pump", 1800.0),
    ("robot", 600.0),
    ("oven", 300.0),
];

/// The whole factory, stepping through simulated time.
pub struct Factory {
    cfg: SimConfig,
    machines: Vec<Machine>,
    labels: Vec<Label>,
    now: Millis,
    tick: u64,
}

impl Factory {
    pub fn new(cfg: SimConfig) -> Self {
        let mut root = Rng::new(cfg.seed);
        let mut machines = Vec::with_capacity(cfg.machines);
        let mut labels = Vec::new();
        for i in 0..cfg.machines {
            let mut rng = root.fork(i as u64);
            let (kind, rpm) = KINDS[i % KINDS.len()];
            let name = format!("{kind}-{:02}", i + 1);
            let base_rpm = rpm * rng.range(0.9, 1.1);
            let device = format!("plc-{:02}a", i + 1);
            let key = (cfg.sign && i % 2 == 0).then(|| device_key(&cfg, &device));
            let mut m = Machine {
                spoof_device: format!("plc-{:02}b", i + 1),
                spoof_seq: 1 + rng.below(1000) as u64,
                learning_write: cfg.start + rng.range(60_000.0, 540_000.0) as Millis,
                key,
                history: VecDeque::new(),
                keep_history: 0,
                attacks: Vec::new(),
                device,
                ip: format!("10.20.{}.{}", 1 + i / 200, 10 + i % 200),
                base_rpm,
                temp_gain: rng.range(0.9, 1.3),
                epoch_ms_ts: i % 3 == 2,
                seq: 1 + rng.below(10_000) as u64,
                mode: Mode::Idle,
                mode_until: cfg.start + rng.range(120_000.0, 180_000.0) as Millis,
                rpm: base_rpm * Mode::Idle.speed(),
                load: Mode::Idle.load(),
                temp: 22.0,
                incidents: Vec::new(),
                frozen: [None; 6],
                last: [0.0; 6],
                name,
                rng,
            };
            m.temp = 22.0 + m.temp_gain * current(&m, 0.0);
            if cfg.incidents {
                plan_incidents(&mut m, &cfg, &mut labels);
            }
            machines.push(m);
        }
        labels.sort_by(|a, b| a.start.cmp(&b.start).then(a.machine.cmp(&b.machine)));
        Factory {
            now: cfg.start,
            cfg,
            machines,
            labels,
            tick: 0,
        }
    }

    /// The labelled incidents of this run.
    pub fn labels(&self) -> &[Label] {
        &self.labels
    }

    /// The device registry matching this factory: every signing device with
    /// its public key, required to sign.
    pub fn registry_toml(&self) -> String {
        let mut out =
            String::from("# Device registry of the simulated factory (twinwatch simulate).\n\n");
        for m in &self.machines {
            if let Some(k) = &m.key {
                out.push_str(&crate::registry::entry_toml(
                    &m.device,
                    std::slice::from_ref(&m.name),
                    &k.public_key(),
                    true,
                ));
                out.push('\n');
            }
        }
        out
    }

    /// Every machine's own device, in machine order: (device, machine, whether it signs).
    /// The segmented deployment makes a NATS user of each (`devices sim-keys`).
    pub fn devices(&self) -> impl Iterator<Item = (&str, &str, bool)> {
        self.machines
            .iter()
            .map(|m| (m.device.as_str(), m.name.as_str(), m.key.is_some()))
    }

    /// The current simulated time.
    pub fn now(&self) -> Millis {
        self.now
    }

    /// Messages per simulated second, all machines (for progress and pacing).
    pub fn messages_per_second(&self) -> f64 {
        self.cfg.machines as f64 * self.cfg.rate_hz
    }

    /// Whether simulated time has run out.
    pub fn done(&self) -> bool {
        self.now >= self.cfg.start + self.cfg.duration
    }

    /// The envelopes of the next tick, in arrival order; `None` when done.
    pub fn next_tick(&mut self) -> Option<Vec<Envelope>> {
        if self.done() {
            return None;
        }
        let step = (1000.0 / self.cfg.rate_hz).round().max(1.0) as Millis;
        let t = self.now;
        let mut out = Vec::with_capacity(self.machines.len() + self.machines.len() / 2);
        let flows_now = self
            .tick
            .is_multiple_of(5 * self.cfg.rate_hz.round().max(1.0) as u64);
        for m in &mut self.machines {
            advance(m, t, step as f64 / 1000.0, &self.cfg);
            telemetry(m, t, step, &self.cfg.site, &mut out);
            if flows_now {
                out.push(flows(m, t, &self.cfg.site));
            }
        }
        out.sort_by_key(|e| e.received_at);
        self.now += step;
        self.tick += 1;
        Some(out)
    }
}

fn current(m: &Machine, _noise: f64) -> f64 {
    3.0 + 35.0 * m.load * (0.5 + 0.5 * m.rpm / m.base_rpm)
}

/// A device's signing key: from `<keys_dir>/<device>.nk` when present, else
/// derived from the seed and the device name.
fn device_key(cfg: &SimConfig, device: &str) -> nkeys::KeyPair {
    if let Some(dir) = &cfg.keys_dir
        && let Ok(seed) = std::fs::read_to_string(dir.join(format!("{device}.nk")))
        && let Ok(k) = nkeys::KeyPair::from_seed(seed.trim())
    {
        return k;
    }
    let mut h = Sha256::new();
    h.update(b"twinwatch-sim-device-key");
    h.update(cfg.seed.to_le_bytes());
    h.update(device.as_bytes());
    crate::registry::device_key(h.finalize().into())
}

fn plan_attack(m: &mut Machine, step_ms: f64) -> (Attack, Millis) {
    let minutes = |rng: &mut Rng, lo: f64, hi: f64| (rng.range(lo, hi) * 60_000.0) as Millis;
    loop {
        let attack = match m.rng.below(ATTACK_KINDS.len()) {
            0 => Attack::Spoof,
            1 | 2 => Attack::Replay {
                lag: (m.rng.range(6.0, 12.0) * 60_000.0 / step_ms) as usize,
                forged_seq: m.rng.chance(0.5),
            },
            3 => Attack::Flood,
            4 => Attack::Silence,
            5 => Attack::ClockSkew {
                offset: ((if m.rng.chance(0.5) { 1.0 } else { -1.0 })
                    * m.rng.range(2.0, 8.0)
                    * 60_000.0) as Millis,
            },
            6 => Attack::Exfil,
            7 => Attack::UnauthorizedWrite,
            8 => Attack::Scan,
            _ if m.key.is_some() => Attack::BadSignature,
            _ => continue,
        };
        let len = match attack {
            Attack::Spoof => minutes(&mut m.rng, 3.0, 6.0),
            Attack::Replay { .. } => minutes(&mut m.rng, 2.0, 4.0),
            Attack::Flood => minutes(&mut m.rng, 1.0, 3.0),
            Attack::Silence | Attack::ClockSkew { .. } | Attack::Exfil => {
                minutes(&mut m.rng, 2.0, 4.0)
            }
            Attack::UnauthorizedWrite | Attack::Scan => 60_000,
            Attack::BadSignature => minutes(&mut m.rng, 1.0, 3.0),
        };
        if let Attack::Replay { lag, .. } = attack {
            m.keep_history = m.keep_history.max(lag + 1);
        }
        return (attack, len);
    }
}

fn plan_incidents(m: &mut Machine, cfg: &SimConfig, labels: &mut Vec<Label>) {
    let end = cfg.start + cfg.duration;
    let mut t = cfg.start + cfg.quiet_start + m.rng.range(0.0, 600_000.0) as Millis;
    let step_ms = 1000.0 / cfg.rate_hz;
    let mut attack_next = false;
    loop {
        if attack_next {
            attack_next = false;
            let (attack, len) = plan_attack(m, step_ms);
            if t + len + 60_000 > end {
                break;
            }
            m.attacks.push(AttackWindow {
                start: t,
                end: t + len,
                attack,
            });
            labels.push(Label {
                machine: m.name.clone(),
                kind: attack.label().into(),
                start: format_rfc3339(t),
                end: format_rfc3339(t + len),
                metric: None,
            });
            t += len + m.rng.range(12.0, 25.0) as Millis * 60_000;
            continue;
        }
        attack_next = true;
        let which = m.rng.below(4);
        let (fault, metric, len, kind) = match which {
            0 => {
                let metric = m.rng.below(METRICS.len());
                let sign = if m.rng.chance(0.5) { 1.0 } else { -1.0 };
                let offset = sign * m.rng.range(10.0, 25.0) * METRICS[metric].1;
                let len = (m.rng.range(1.0, 4.0).floor() * step_ms) as Millis;
                (Fault::Spike { offset }, metric, len, "spike")
            }
            1 => {
                let metric = DRIFTABLE[m.rng.below(DRIFTABLE.len())];
                let sign = if m.rng.chance(0.5) { 1.0 } else { -1.0 };
                let total = sign * m.rng.range(40.0, 80.0) * METRICS[metric].1;
                let len = m.rng.range(8.0, 15.0) as Millis * 60_000;
                (Fault::Drift { total }, metric, len, "drift")
            }
            2 => {
                let metric = m.rng.below(METRICS.len());
                let len = m.rng.range(3.0, 8.0) as Millis * 60_000;
                (Fault::Stuck, metric, len, "stuck")
            }
            _ => {
                // Temperature held flat while motor current rises or falls with the load.
                let len = m.rng.range(4.0, 8.0) as Millis * 60_000;
                (Fault::Decouple, 0, len, "decouple")
            }
        };
        if t + len + 60_000 > end {
            break;
        }
        m.incidents.push(Incident {
            metric,
            start: t,
            end: t + len,
            fault,
        });
        labels.push(Label {
            machine: m.name.clone(),
            kind: kind.into(),
            start: format_rfc3339(t),
            end: format_rfc3339(t + len.max(step_ms as Millis)),
            metric: Some(METRICS[metric].0.into()),
        });
        t += len + m.rng.range(12.0, 25.0) as Millis * 60_000;
    }
}

/// Plant-wide breaks: every hour at :30, all machines idle for eight minutes.
fn on_break(t: Millis) -> bool {
    let minute = (t / 60_000) % 60;
    (30..38).contains(&minute)
}

fn advance(m: &mut Machine, t: Millis, dt: f64, cfg: &SimConfig) {
    // A decoupling attack starts with a load change (the attacker waits for
    // one) on a working machine: a plant break does not idle it meanwhile, or
    // the frozen sensor would be telling the truth.
    let decoupling = m
        .incidents
        .iter()
        .any(|i| matches!(i.fault, Fault::Decouple) && t >= i.start && t < i.end);
    let working = |mode: Mode| {
        if on_break(t) && t - cfg.start > 600_000 && !decoupling {
            Mode::Idle
        } else {
            mode
        }
    };
    if let Some(inc) = m
        .incidents
        .iter()
        .find(|i| matches!(i.fault, Fault::Decouple) && t >= i.start && t < i.end)
        // Once per incident (the flip sets this mark), whatever the schedule.
        && m.mode_until != inc.end + 120_000
    {
        let before = if on_break(t) && t - cfg.start > 600_000 {
            Mode::Idle
        } else {
            m.mode
        };
        m.mode = if before == Mode::Full {
            Mode::Idle
        } else {
            Mode::Full
        };
        m.mode_until = inc.end + 120_000;
    }
    if t >= m.mode_until {
        let since_start = t - cfg.start;
        // Walk through idle -> normal -> full -> normal while learning, then roam.
        let (next, len) = if since_start < 240_000 {
            (
                Mode::Normal,
                270_000.0 - since_start as f64 + m.rng.range(0.0, 30_000.0),
            )
        } else if since_start < 420_000 {
            (
                Mode::Full,
                420_000.0 - since_start as f64 + m.rng.range(0.0, 30_000.0),
            )
        } else if since_start < 600_000 {
            (Mode::Normal, m.rng.range(240_000.0, 360_000.0))
        } else {
            let next = match (m.mode, m.rng.below(2)) {
                (Mode::Idle, 0) | (Mode::Full, 0) => Mode::Normal,
                (Mode::Idle, _) | (Mode::Normal, 1) => Mode::Full,
                _ => Mode::Idle,
            };
            (next, m.rng.range(240_000.0, 900_000.0))
        };
        m.mode = next;
        m.mode_until = t + len as Millis;
    }
    let mode = working(m.mode);
    let a = |tau: f64| 1.0 - (-dt / tau).exp();
    m.rpm += (m.base_rpm * mode.speed() - m.rpm) * a(3.0);
    m.load += (mode.load() - m.load) * a(2.0);
    let amps = current(m, 0.0);
    let ambient = 22.0 + 2.0 * ((t as f64 / 3_600_000.0) * std::f64::consts::TAU / 24.0).sin();
    m.temp += (ambient + m.temp_gain * amps - m.temp) * a(120.0);
}

/// The attack on a machine at `t`, if any.
fn attack_at(m: &Machine, t: Millis) -> Option<Attack> {
    m.attacks
        .iter()
        .find(|a| t >= a.start && t < a.end)
        .map(|a| a.attack)
}

fn telemetry(m: &mut Machine, t: Millis, step: Millis, site: &str, out: &mut Vec<Envelope>) {
    let ts = t + m.rng.range(0.0, 40.0) as Millis;
    let speed = m.rpm / m.base_rpm;
    let clean = [
        m.temp,
        0.4 + 1.6 * speed * speed + 0.3 * m.load,
        m.rpm,
        current(m, 0.0),
        1.5 + 4.5 * m.load,
        8.0 + 12.0 * m.load,
    ];
    let mut values = [0.0; 6];
    for (i, (_, sigma, _)) in METRICS.iter().enumerate() {
        values[i] = clean[i] + sigma * m.rng.normal();
    }
    for inc in &m.incidents {
        let i = inc.metric;
        if ts < inc.start || ts >= inc.end {
            if matches!(inc.fault, Fault::Stuck | Fault::Decouple) && ts >= inc.end {
                m.frozen[i] = None;
            }
            continue;
        }
        match inc.fault {
            Fault::Spike { offset } => values[i] += offset,
            Fault::Drift { total } => {
                values[i] += total * (ts - inc.start) as f64 / (inc.end - inc.start) as f64;
            }
            Fault::Stuck => {
                values[i] = *m.frozen[i].get_or_insert(m.last[i]);
            }
            Fault::Decouple => {
                let level = *m.frozen[i].get_or_insert(m.last[i]);
                values[i] = level + METRICS[i].1 * m.rng.normal();
            }
        }
    }
    let readings = readings_json(m, &values, true);
    let seq = m.seq;
    m.seq += 1;
    if m.keep_history > 0 {
        m.history.push_back((seq, readings.clone()));
        if m.history.len() > m.keep_history {
            m.history.pop_front();
        }
    }
    let latency = 3 + (m.rng.normal().abs() * 8.0) as Millis;
    let subject = format!("twin.telemetry.{site}.{}", m.name);
    let device = m.device.clone();
    let attack = attack_at(m, ts);
    match attack {
        // Dropped on the way: the device's numbers go on, nothing arrives.
        Some(Attack::Silence) => {}
        Some(Attack::Replay { lag, forged_seq }) => {
            // The live message is swallowed; an old one goes in its place.
            let n = m.history.len();
            let (old_seq, old) = m.history[n.saturating_sub(lag + 1)].clone();
            let seq = if forged_seq { seq } else { old_seq };
            let payload = message_json(m, ts, &device, seq, &old);
            out.push(sign_envelope(m, &subject, ts + latency, payload, false));
        }
        Some(Attack::ClockSkew { offset }) => {
            let payload = message_json(m, ts + offset, &device, seq, &readings);
            out.push(sign_envelope(m, &subject, ts + latency, payload, false));
        }
        _ => {
            let payload = message_json(m, ts, &device, seq, &readings);
            let forge = attack == Some(Attack::BadSignature);
            out.push(sign_envelope(m, &subject, ts + latency, payload, forge));
        }
    }
    match attack {
        Some(Attack::Spoof) => {
            // A second device with plausible readings of its own.
            let mut fake = clean;
            for (i, (_, sigma, _)) in METRICS.iter().enumerate() {
                fake[i] += sigma * m.rng.normal();
            }
            let readings = readings_json(m, &fake, false);
            let (dev, seq) = (m.spoof_device.clone(), m.spoof_seq);
            m.spoof_seq += 1;
            let at = ts + step / 2;
            let payload = message_json(m, at, &dev, seq, &readings);
            out.push(Envelope::new(subject.clone(), Some(at + latency), payload));
        }
        Some(Attack::Flood) => {
            // Nine more messages per tick from the same device, numbered on.
            for k in 1..10 {
                let at = ts + step * k / 10;
                let seq = m.seq;
                m.seq += 1;
                let mut v = values;
                for (i, (_, sigma, _)) in METRICS.iter().enumerate() {
                    v[i] = clean[i] + sigma * m.rng.normal();
                }
                let readings = readings_json(m, &v, false);
                let payload = message_json(m, at, &device, seq, &readings);
                out.push(sign_envelope(m, &subject, at + latency, payload, false));
            }
        }
        _ => {}
    }
}

/// `{"temperature_c":..,...}` with each sensor's decimals; `remember` keeps
/// the rounded values as the sensors' last readings (for stuck faults).
fn readings_json(m: &mut Machine, values: &[f64; 6], remember: bool) -> String {
    let mut p = String::with_capacity(160);
    p.push('{');
    for (i, (name, _, decimals)) in METRICS.iter().enumerate() {
        let scale = 10f64.powi(*decimals as i32);
        let v = (values[i] * scale).round() / scale;
        if remember {
            m.last[i] = v;
        }
        if i > 0 {
            p.push(',');
        }
        let _ = write!(p, "\"{name}\":{v:.decimals$}");
    }
    p.push('}');
    p
}

fn message_json(m: &Machine, ts: Millis, device: &str, seq: u64, readings: &str) -> String {
    let mut p = String::with_capacity(256);
    p.push('{');
    if m.epoch_ms_ts {
        let _ = write!(p, "\"ts\":{ts}");
    } else {
        let _ = write!(p, "\"ts\":\"{}\"", format_rfc3339(ts));
    }
    let _ = write!(
        p,
        ",\"machine\":\"{}\",\"device\":\"{device}\",\"seq\":{seq},\"readings\":{readings}}}",
        m.name
    );
    p
}

/// A telemetry envelope, signed when the machine's device signs (`forge`:
/// with a signature over other bytes, as an attacker without the key would).
fn sign_envelope(
    m: &Machine,
    subject: &str,
    received: Millis,
    payload: String,
    forge: bool,
) -> Envelope {
    let mut e = Envelope::new(subject.to_string(), Some(received), payload);
    if let Some(k) = &m.key {
        let signed: &[u8] = if forge { b"forged" } else { &e.payload };
        let sig = crate::registry::sign(k, signed);
        e.headers
            .push((crate::registry::SIGNATURE_HEADER.into(), sig));
    }
    e
}

/// One flow record of the simulated network (always TCP).
struct Flow<'a> {
    ts: Millis,
    src: &'a str,
    dst: &'a str,
    port: u16,
    app: Option<&'a str>,
    op: Option<&'a str>,
    bytes: u64,
    packets: u64,
}

/// Appends a flow record to a JSON array being written (`p` starts with `[`).
fn write_flow(p: &mut String, machine: &str, f: Flow) {
    if p.len() > 1 {
        p.push(',');
    }
    let _ = write!(
        p,
        "{{\"ts\":{},\"machine\":\"{machine}\",\"src\":\"{}\",\"dst\":\"{}\",\"dst_port\":{},\"proto\":\"tcp\"",
        f.ts, f.src, f.dst, f.port
    );
    if let Some(app) = f.app {
        let _ = write!(p, ",\"app\":\"{app}\"");
    }
    if let Some(op) = f.op {
        let _ = write!(p, ",\"op\":\"{op}\"");
    }
    let _ = write!(p, ",\"bytes\":{},\"packets\":{}}}", f.bytes, f.packets);
}

fn flows(m: &mut Machine, t: Millis, site: &str) -> Envelope {
    let ts = t + 500;
    let mut p = String::with_capacity(512);
    p.push('[');
    let name = m.name.clone();
    let ip = m.ip.clone();
    // The SCADA poller reads registers; the OPC UA client reads.
    let bytes = 118 + m.rng.below(12) as u64;
    let (src, dst) = ("10.20.0.5", ip.as_str());
    write_flow(
        &mut p,
        &name,
        Flow {
            ts,
            src,
            dst,
            port: 502,
            app: Some("modbus"),
            op: Some("read_holding_registers"),
            bytes,
            packets: 2,
        },
    );
    let bytes = 400 + m.rng.below(80) as u64;
    write_flow(
        &mut p,
        &name,
        Flow {
            ts: ts + 100,
            src: "10.20.0.8",
            dst,
            port: 4840,
            app: Some("opcua"),
            op: Some("read"),
            bytes,
            packets: 4,
        },
    );
    // The engineering workstation writes a register about twice an hour, and
    // once while the machine learns (so learning knows it may).
    let learning_write = t >= m.learning_write && t < m.learning_write + 5_000;
    if m.rng.chance(5.0 / 1800.0) || learning_write {
        let bytes = 120 + m.rng.below(8) as u64;
        write_flow(
            &mut p,
            &name,
            Flow {
                ts: ts + 200,
                src: "10.20.0.20",
                dst,
                port: 502,
                app: Some("modbus"),
                op: Some("write_single_register"),
                bytes,
                packets: 2,
            },
        );
    }
    match attack_at(m, ts) {
        Some(Attack::Exfil) => {
            let far = format!("203.0.113.{}", 10 + ip.len() % 200);
            let bytes = 300_000 + m.rng.below(1_500_000) as u64;
            let packets = 400 + m.rng.below(800) as u64;
            write_flow(
                &mut p,
                &name,
                Flow {
                    ts: ts + 300,
                    src: &ip,
                    dst: &far,
                    port: 443,
                    app: Some("https"),
                    op: None,
                    bytes,
                    packets,
                },
            );
        }
        Some(Attack::UnauthorizedWrite) => {
            let bytes = 120 + m.rng.below(8) as u64;
            write_flow(
                &mut p,
                &name,
                Flow {
                    ts: ts + 250,
                    src: "10.20.0.5",
                    dst,
                    port: 502,
                    app: Some("modbus"),
                    op: Some("write_single_register"),
                    bytes,
                    packets: 2,
                },
            );
        }
        Some(Attack::Scan) => {
            // A compromised host sweeps the machine's subnet and common ports.
            for k in 0..40i64 {
                let port = [22, 80, 102, 443, 502, 4840, 8080, 44818][k as usize % 8];
                let a = 1 + m.rng.below(4);
                let b = 1 + m.rng.below(250);
                let target = format!("10.20.{a}.{b}");
                write_flow(
                    &mut p,
                    &name,
                    Flow {
                        ts: ts + 300 + k * 10,
                        src: "10.20.0.8",
                        dst: &target,
                        port,
                        app: None,
                        op: None,
                        bytes: 60,
                        packets: 1,
                    },
                );
            }
        }
        _ => {}
    }
    p.push(']');
    let received = ts + 20 + m.rng.below(30) as Millis;
    Envelope::new(format!("twin.flows.{site}.{}", m.name), Some(received), p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_factory() {
        let run = |seed| {
            let mut f = Factory::new(SimConfig {
                seed,
                duration: 60_000,
                ..SimConfig::default()
            });
            let mut all = Vec::new();
            while let Some(t) = f.next_tick() {
                all.extend(t);
            }
            (all, f.labels().to_vec())
        };
        let (a, la) = run(3);
        let (b, lb) = run(3);
        let (c, _) = run(4);
        assert_eq!(a, b);
        assert_eq!(la, lb);
        assert_ne!(a, c);
        assert_eq!(a.len(), 6 * 60 + 6 * 12);
    }

    #[test]
    fn incidents_are_labelled_after_the_warmup() {
        let f = Factory::new(SimConfig::default());
        let labels = f.labels();
        assert!(labels.len() >= 12, "{}", labels.len());
        for kind in ["spike", "drift", "stuck"] {
            assert!(labels.iter().any(|l| l.kind == kind), "no {kind}");
        }
        for l in labels {
            let (s, e) = l.span().unwrap();
            assert!(s >= DEFAULT_START + 15 * 60_000 && e > s);
        }
    }
}
