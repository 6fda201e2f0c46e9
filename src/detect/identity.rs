//! Identity and traffic: who speaks for each machine, how often, in what
//! order, with what clock, and whether what it says is new.
//!
//! For every telemetry message, before its readings reach the sensor
//! baselines, [`Identity::observe`] decides whether the sender may teach
//! them, and reports what departs:
//!
//! - **signature** (any phase): a device declared with a key in the
//!   [registry](crate::registry) must carry a valid `Twin-Signature` when it
//!   must sign, and a present one must verify → `signature_invalid`;
//! - **devices**: what a machine hears while it learns is its device set;
//!   afterwards a device never seen for it is `unknown_device`, one learned or
//!   declared for another machine is `device_mismatch` (a declared mismatch
//!   also while learning). Their readings are scored but never teach a
//!   baseline until the device is declared for the machine in the registry;
//! - **traffic** per device ([`traffic`](super::traffic)): messages per
//!   window (`traffic_rate`: floods, drops, and silences judged by
//!   [`Identity::tick`] on the plant's event clock), payload size
//!   (`traffic_size`), clock offset (`clock_skew`, kept out of the
//!   watermarks and baselines); the messages of a window past its flood
//!   threshold are kept out too;
//! - **sequence** ([`sequence`](super::sequence)): gaps (`sequence_gap`,
//!   scored by the device's loss rate), duplicates and rewinds
//!   (`sequence_replay`);
//! - **content** ([`replay`](super::replay)): reading vectors that re-appear
//!   in their old order (`sequence_replay`, detector `content_replay`).
//!
//! Every table is capped: devices per machine (`devices.max_per_machine`;
//! the overflow raises one `capacity` alert), machines and device names by
//! the decoder's interners.

use serde::{Deserialize, Serialize};

use super::replay::{ReplayIndex, ReplayVerdict};
use super::sequence::{SeqEvent, SeqTracker};
use super::traffic::{Gaps, Rate, RateFinding, Running, Skew};
use super::{Finding, Kind};
use crate::alerts::{NO_DEVICE, fmt_num};
use crate::config::Config;
use crate::registry::{Registry, SignatureCheck};
use crate::score::{normal_two_sided_surprise, ratio_surprise, surprise_from_score};
use crate::time::{Millis, format_duration, format_rfc3339};

const NONE: u32 = u32::MAX;
/// Dedup keys of machine-level findings (device ids stay below the interner cap).
const KEY_MACHINE_RATE: u32 = u32::MAX - 1;
const KEY_DEVICE_CAP: u32 = u32::MAX - 2;
/// Consecutive messages behind the bus's lag that make a clock skew.
const BEHIND_RUN: u32 = 30;

/// How a device stands with a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Heard while the machine learned.
    Learned,
    /// Declared for the machine in the registry.
    Approved,
    /// First heard after the machine learned, declared nowhere.
    Unknown,
    /// Learned or declared for another machine.
    Mismatch,
}

impl Status {
    fn trusted(self) -> bool {
        matches!(self, Status::Learned | Status::Approved)
    }
}

/// One device of one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub device: u32,
    pub status: Status,
    /// Its traffic baselines learn until this event time.
    pub learn_until: Millis,
    pub rate: Rate,
    pub gaps: Gaps,
    pub size: Running,
    pub skew: Skew,
    /// Consecutive messages behind the bus's lag.
    #[serde(default)]
    pub behind: u32,
}

impl DeviceState {
    fn new(device: u32, status: Status, learn_until: Millis) -> Self {
        DeviceState {
            device,
            status,
            learn_until,
            rate: Rate::default(),
            gaps: Gaps::default(),
            size: Running::default(),
            skew: Skew::default(),
            behind: 0,
        }
    }
}

/// Identity and traffic state of one machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineIdentity {
    pub first_ts: Millis,
    pub protecting: bool,
    pub devices: Vec<DeviceState>,
    /// Messages from devices past the per-machine cap.
    pub overflow: u64,
    pub rate: Rate,
    pub replay: ReplayIndex,
}

/// Everything [`Identity`] learned, for snapshots.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdentityState {
    pub machines: Vec<Option<MachineIdentity>>,
    /// For each device id, the machine it was first learned or approved for.
    pub home: Vec<u32>,
    pub now: Millis,
    /// The bus's current lag: `ts - received_at` of the last messages of
    /// known devices, whatever their clocks said. Device clocks are judged
    /// against its median, so a backlog delivered late (a gateway flushing its
    /// buffer, a capture replayed at speed) moves everyone's offset together
    /// and is no skew, while one device off its peers is.
    #[serde(default)]
    pub bus: BusLag,
    /// Sequence numbers per device id: a gateway numbers its messages across
    /// every machine it reports for.
    #[serde(default)]
    pub seqs: Vec<SeqTracker>,
}

/// Offsets of the latest messages on the bus, and their median.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BusLag {
    recent: Vec<Millis>,
    next: usize,
    seen: u64,
    median: Millis,
}

/// Offsets the bus's lag is the median of.
const BUS_RECENT: usize = 32;

impl BusLag {
    /// The median offset, once enough messages were seen.
    fn median(&self) -> Option<Millis> {
        (self.recent.len() >= 16).then_some(self.median)
    }

    fn push(&mut self, offset: Millis) {
        if self.recent.len() < BUS_RECENT {
            self.recent.push(offset);
        } else {
            self.recent[self.next] = offset;
            self.next = (self.next + 1) % BUS_RECENT;
        }
        self.seen += 1;
        if self.seen.is_multiple_of(4) || self.recent.len() < 16 {
            // On the per-message path: a stack copy, no allocation.
            let mut v = [0; BUS_RECENT];
            let n = self.recent.len();
            v[..n].copy_from_slice(&self.recent);
            self.median = *v[..n].select_nth_unstable(n / 2).1;
        }
    }
}

/// One telemetry message as the identity room sees it.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub machine: u32,
    pub device: u32,
    pub machine_name: &'a str,
    pub device_name: &'a str,
    pub ts: Millis,
    pub received_at: Millis,
    pub seq: Option<u64>,
    /// Payload bytes per message of its envelope.
    pub size: f64,
    pub fingerprint: Option<u32>,
    /// The envelope's index in its batch, raw payload and `Twin-Signature`.
    pub envelope: u32,
    pub payload: &'a [u8],
    pub signature: Option<&'a str>,
}

/// A signature to check ahead of a batch (see [`Identity::verify_ahead`]).
#[derive(Debug, Clone, Copy)]
pub struct SignatureJob<'a> {
    pub envelope: u32,
    pub device: u32,
    pub device_name: &'a str,
    pub payload: &'a [u8],
    pub signature: Option<&'a str>,
}

/// What the identity room decided about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The readings may teach baselines, move the watermark and join windows.
    pub trusted: bool,
    /// When the readings were taken, as far as can be told: `ts`, or the
    /// arrival time when the device's clock is off.
    pub ts: Millis,
}

/// Counters users ask about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdentityCounts {
    pub untrusted: u64,
    pub signatures_verified: u64,
    pub signatures_failed: u64,
    pub restarts: u64,
    pub over_device_cap: u64,
}

#[derive(Debug, Clone)]
struct Params {
    warmup: Millis,
    window: Millis,
    enabled: bool,
    flood_factor: f64,
    silence_after: Millis,
    silence_factor: f64,
    size_z: f64,
    loss_floor: f64,
    reset_max: u64,
    max_skew: Millis,
    history: usize,
    min_run: u32,
    max_devices: usize,
    min_surprise: f64,
}

/// The identity and traffic room.
pub struct Identity {
    p: Params,
    state: IdentityState,
    registry: Registry,
    /// Signatures of this batch already checked (ahead, in parallel, or on
    /// first sight): (envelope, device) -> result.
    verified: std::collections::HashMap<(u32, u32), SignatureCheck>,
    next_tick: Millis,
    pub counts: IdentityCounts,
}

impl Identity {
    pub fn new(cfg: &Config) -> Self {
        let t = &cfg.traffic;
        Identity {
            p: Params {
                warmup: cfg.baseline.warmup,
                window: cfg.window.size,
                enabled: t.enabled,
                flood_factor: t.flood_factor,
                silence_after: t.silence_after,
                silence_factor: t.silence_factor,
                size_z: t.size_z,
                loss_floor: t.loss_floor,
                reset_max: t.seq_reset_max,
                max_skew: t.max_skew,
                history: t.replay_history,
                min_run: t.replay_min_run,
                max_devices: cfg.devices.max_per_machine,
                min_surprise: surprise_from_score(cfg.alerts.min_score),
            },
            state: IdentityState::default(),
            registry: Registry::default(),
            verified: std::collections::HashMap::new(),
            next_tick: Millis::MIN,
            counts: IdentityCounts::default(),
        }
    }

    /// Replaces the device registry (approvals take effect with the next message).
    pub fn set_registry(&mut self, registry: Registry) {
        self.registry = registry;
        self.verified.clear();
    }

    /// The registry in force.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn snapshot(&self) -> IdentityState {
        self.state.clone()
    }

    pub fn restore(&mut self, state: IdentityState) {
        self.state = state;
    }

    /// The state of a machine, if it has sent anything.
    pub fn machine(&self, machine: u32) -> Option<&MachineIdentity> {
        self.state
            .machines
            .get(machine as usize)
            .and_then(Option::as_ref)
    }

    /// Marks the start of a batch (envelope indexes restart).
    pub fn begin_batch(&mut self) {
        self.verified.clear();
    }

    /// Checks the signatures a batch will need, spread over the cores: an
    /// ed25519 verification costs about 45 µs, which one core would otherwise
    /// pay for every signed message in turn. Devices without a key are skipped.
    pub fn verify_ahead(&mut self, jobs: &[SignatureJob]) {
        let registry = &self.registry;
        let mut todo: Vec<(&SignatureJob, &crate::registry::DeviceEntry)> = jobs
            .iter()
            .filter_map(|j| {
                registry
                    .get(j.device_name)
                    .filter(|e| e.public_key.is_some())
                    .map(|e| (j, e))
            })
            .collect();
        todo.sort_by_key(|(j, _)| (j.envelope, j.device));
        todo.dedup_by_key(|(j, _)| (j.envelope, j.device));
        if todo.is_empty() {
            return;
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8);
        let results: Vec<SignatureCheck> = if threads < 2 || todo.len() < 32 {
            todo.iter()
                .map(|(j, e)| e.check(j.payload, j.signature))
                .collect()
        } else {
            let chunk = todo.len().div_ceil(threads);
            std::thread::scope(|s| {
                let handles: Vec<_> = todo
                    .chunks(chunk)
                    .map(|c| {
                        s.spawn(move || {
                            c.iter()
                                .map(|(j, e)| e.check(j.payload, j.signature))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_default())
                    .collect()
            })
        };
        let done: Vec<(u32, u32)> = todo.iter().map(|(j, _)| (j.envelope, j.device)).collect();
        for ((envelope, device), c) in done.into_iter().zip(results) {
            record(&mut self.counts, &mut self.verified, (envelope, device), c);
        }
    }

    /// Judges one message; findings go to `out`.
    pub fn observe(&mut self, m: &Message, out: &mut Vec<Finding>) -> Verdict {
        let p = &self.p;
        let mach = crate::intern::entry(&mut self.state.machines, m.machine, || MachineIdentity {
            first_ts: m.ts,
            protecting: false,
            devices: Vec::new(),
            overflow: 0,
            rate: Rate::default(),
            replay: ReplayIndex::default(),
        });
        // A forged timestamp from the future must not end learning early.
        let plausible = m.ts <= m.received_at.saturating_add(p.max_skew);
        if !mach.protecting && plausible && m.ts >= mach.first_ts.saturating_add(p.warmup) {
            mach.protecting = true;
        }
        let note = |kind, detector, key, subject: &str, surprise, text: String| {
            Finding::note(
                m.machine,
                m.device,
                kind,
                detector,
                m.ts,
                key,
                subject.to_string(),
                surprise,
                text,
            )
        };
        let untrusted = |counts: &mut IdentityCounts, ts: Millis| {
            counts.untrusted += 1;
            Verdict { trusted: false, ts }
        };

        // Signature, whenever the registry holds a key for the device.
        let entry = self.registry.get(m.device_name);
        let mut signed_ok = true;
        if let Some(e) = entry {
            // Checked ahead by the pipeline; on first sight otherwise (once per envelope).
            let check = match self.verified.get(&(m.envelope, m.device)) {
                Some(c) => *c,
                None => {
                    let c = e.check(m.payload, m.signature);
                    record(
                        &mut self.counts,
                        &mut self.verified,
                        (m.envelope, m.device),
                        c,
                    );
                    c
                }
            };
            if matches!(check, SignatureCheck::Missing | SignatureCheck::Bad) {
                signed_ok = false;
                let text = if check == SignatureCheck::Missing {
                    format!(
                        "{} must sign its messages but sent one for {} without a Twin-Signature",
                        m.device_name, m.machine_name
                    )
                } else {
                    format!(
                        "the Twin-Signature of {}'s message for {} does not verify against its registered key: forged or altered",
                        m.device_name, m.machine_name
                    )
                };
                out.push(note(
                    Kind::SignatureInvalid,
                    "signature",
                    m.device,
                    m.device_name,
                    surprise_from_score(0.995),
                    text,
                ));
            }
        }
        let declared_here = entry.is_some_and(|e| e.serves(m.machine_name));
        let declared_elsewhere =
            entry.is_some_and(|e| !e.machines.is_empty() && !e.serves(m.machine_name));

        // Which device is this for the machine?
        let slot = match mach.devices.iter().position(|d| d.device == m.device) {
            Some(s) => s,
            None => {
                let home = home_of(&self.state.home, m.device);
                let status = if declared_here {
                    Status::Approved
                } else if declared_elsewhere {
                    Status::Mismatch
                } else if !mach.protecting {
                    Status::Learned
                } else if home != NONE && home != m.machine {
                    Status::Mismatch
                } else {
                    Status::Unknown
                };
                if mach.devices.len() >= p.max_devices {
                    mach.overflow += 1;
                    self.counts.over_device_cap += 1;
                    if mach.overflow == 1 || mach.overflow.is_multiple_of(10_000) {
                        out.push(note(
                            Kind::Capacity,
                            "device_cap",
                            KEY_DEVICE_CAP,
                            "devices.max_per_machine",
                            surprise_from_score(0.9),
                            format!(
                                "{} has more than {} devices (devices.max_per_machine); {} is not tracked and its readings stay out of the baselines ({} such messages so far)",
                                m.machine_name, p.max_devices, m.device_name, mach.overflow
                            ),
                        ));
                    }
                    return untrusted(&mut self.counts, m.ts);
                }
                // A device that joins after learning learns its own traffic from now on.
                let learn_until = if mach.protecting {
                    m.ts.saturating_add(p.warmup)
                } else {
                    mach.first_ts.saturating_add(p.warmup)
                };
                mach.devices
                    .push(DeviceState::new(m.device, status, learn_until));
                if status.trusted() {
                    let i = m.device as usize;
                    if self.state.home.len() <= i {
                        self.state.home.resize(i + 1, NONE);
                    }
                    if self.state.home[i] == NONE {
                        self.state.home[i] = m.machine;
                    }
                }
                mach.devices.len() - 1
            }
        };
        let dev = &mut mach.devices[slot];
        if !dev.status.trusted() && declared_here {
            // Approved in the registry since: it starts learning its traffic now.
            *dev = DeviceState::new(m.device, Status::Approved, m.ts.saturating_add(p.warmup));
        } else if dev.status.trusted() && declared_elsewhere {
            dev.status = Status::Mismatch;
        }
        if !dev.status.trusted() {
            let (kind, text) = if dev.status == Status::Mismatch {
                let home = home_of(&self.state.home, m.device);
                let belongs = match entry {
                    Some(e) if declared_elsewhere => {
                        format!("declared for {}", e.machines.join(", "))
                    }
                    _ if home != NONE => "learned for another machine".to_string(),
                    _ => "not declared for it".to_string(),
                };
                (
                    Kind::DeviceMismatch,
                    format!(
                        "{} ({belongs}) sends readings for {}; its readings are kept out of the baselines",
                        m.device_name, m.machine_name
                    ),
                )
            } else {
                (
                    Kind::UnknownDevice,
                    format!(
                        "{} was never seen for {} while it learned and is not in the device registry; its readings are scored but kept out of the baselines until it is approved",
                        m.device_name, m.machine_name
                    ),
                )
            };
            out.push(note(
                kind,
                "device_set",
                m.device,
                m.device_name,
                surprise_from_score(0.97),
                text,
            ));
            return untrusted(&mut self.counts, m.ts);
        }
        if !signed_ok {
            return untrusted(&mut self.counts, m.ts);
        }
        if !p.enabled {
            return Verdict {
                trusted: true,
                ts: m.ts,
            };
        }

        // Clock: ts against arrival, beyond the bus's lag (the median of
        // everyone's) and the device's usual offset from it. Ahead is
        // future-dated: judged at its arrival time (its own is a lie) and kept
        // out. Behind is late delivery, normal for buffering gateways: alerted
        // only when it persists while the rest of the bus is on time, and kept.
        let offset = m.ts - m.received_at;
        let median = self.state.bus.median();
        self.state.bus.push(offset);
        let bus = median.unwrap_or(offset);
        let departure = dev.skew.departure(offset - bus);
        let ahead = median.is_some() && departure > p.max_skew as f64;
        let behind = median.is_some() && departure < -(p.max_skew as f64);
        dev.behind = if behind {
            dev.behind.saturating_add(1)
        } else {
            0
        };
        let skewed = ahead || dev.behind >= BEHIND_RUN;
        // A clock off the bus says nothing reliable about when: the readings
        // and the traffic are placed at arrival.
        let ts = if ahead || behind { m.received_at } else { m.ts };
        let learning = ts < dev.learn_until;
        let judge = !learning;
        let in_order = ts >= dev.gaps.last;
        let mut trusted = !ahead;
        let first = out.len();
        if skewed {
            if judge || offset.abs() > p.max_skew {
                let mut f = note(
                    Kind::ClockSkew,
                        "clock_offset",
                        m.device,
                        "ts",
                        ratio_surprise(departure.abs() / p.max_skew as f64),
                        format!(
                            "{}'s clock is {} {} its arrival time while the bus's lag is {} (its usual offset from it {}){}",
                            m.device_name,
                            format_duration(offset.abs()),
                            if offset > 0 { "ahead of" } else { "behind" },
                            signed_secs(bus as f64),
                            signed_secs(dev.skew.offset),
                            if ahead {
                                "; the message is kept out of the watermark and the baselines"
                            } else {
                                ""
                            }
                        ),
                    )
                    .with_values(offset as f64 / 1000.0, (dev.skew.offset + bus as f64) / 1000.0);
                f.ts = m.received_at;
                out.push(f);
            }
        } else if in_order && !behind && median.is_some() {
            dev.skew.learn(offset - bus);
        }

        // Sequence numbers.
        if let Some(seq) = m.seq {
            let i = m.device as usize;
            if self.state.seqs.len() <= i {
                self.state.seqs.resize_with(i + 1, SeqTracker::default);
            }
            let tracker = &mut self.state.seqs[i];
            match tracker.observe(seq, p.reset_max, learning) {
                SeqEvent::Gap { missed } if judge => {
                    let loss = tracker.loss_rate(p.loss_floor);
                    let surprise = missed as f64 * -loss.log10();
                    if surprise >= p.min_surprise {
                        out.push(
                            note(
                                Kind::SequenceGap,
                                "seq",
                                m.device,
                                "seq",
                                surprise,
                                format!(
                                    "{} skipped from seq {} to {seq}: {missed} messages never arrived (learned loss rate {})",
                                    m.device_name,
                                    seq - missed - 1,
                                    fmt_num(loss)
                                ),
                            )
                            .with_values(seq as f64, (seq - missed) as f64),
                        );
                    }
                }
                event @ (SeqEvent::Duplicate | SeqEvent::Rewind { .. }) => {
                    trusted = false;
                    if judge {
                        let last = tracker.last.unwrap_or(seq);
                        let (score, what) = match event {
                            SeqEvent::Rewind { behind } => (
                                0.97,
                                format!(
                                    "went back {behind} numbers (from {last} to {seq}): old messages sent again"
                                ),
                            ),
                            _ => (
                                0.9,
                                format!("repeated seq {seq} (newest {last}): a message sent twice"),
                            ),
                        };
                        out.push(
                            note(
                                Kind::SequenceReplay,
                                "seq",
                                m.device,
                                "seq",
                                surprise_from_score(score),
                                format!("{} {what}; kept out of the baselines", m.device_name),
                            )
                            .with_values(seq as f64, (last + 1) as f64),
                        );
                    }
                }
                SeqEvent::Restart => self.counts.restarts += 1,
                _ => {}
            }
        }

        // Content: reading vectors this machine sent before.
        if let Some(fp) = m.fingerprint {
            let mach_learning = !mach.protecting;
            match mach
                .replay
                .observe(fp, ts, p.history, p.min_run, mach_learning)
            {
                ReplayVerdict::Detected {
                    len,
                    behind,
                    original,
                } => {
                    trusted = false;
                    out.push(note(
                        Kind::SequenceReplay,
                        "content_replay",
                        m.device,
                        "readings",
                        surprise_from_score(0.97),
                        format!(
                            "the last {len} reading vectors of {} repeat, in order, those it sent {behind} messages earlier (from {}): recorded readings replayed with fresh timestamps",
                            m.machine_name,
                            format_rfc3339(original)
                        ),
                    ));
                }
                ReplayVerdict::Replaying => trusted = false,
                ReplayVerdict::Fresh => {}
            }
        }

        // Rate per device and per machine, inter-arrival, size.
        let learn = trusted && in_order;
        if let Some(f) = dev.rate.observe(ts, p.window, p.flood_factor, learn, judge) {
            out.push(rate_finding(m, f, m.device, "message_rate", m.device_name));
        }
        // Past the flood threshold, the excess messages of the window are scored
        // but teach nothing (window features included): a flood must not become
        // the baseline it is then judged against when it ends.
        if dev.rate.flooding() {
            trusted = false;
        }
        if let Some(f) = mach
            .rate
            .observe(ts, p.window, p.flood_factor, learn, mach.protecting)
        {
            let mut f = rate_finding(
                m,
                f,
                KEY_MACHINE_RATE,
                "machine_message_rate",
                m.machine_name,
            );
            f.device = NO_DEVICE;
            out.push(f);
        }
        // Untrusted messages still show the device is alive, but teach no gaps.
        dev.gaps.observe(ts, learning && trusted);
        match dev.size.size_z(m.size) {
            Some(z) if judge && z.abs() >= p.size_z => out.push(
                note(
                    Kind::TrafficSize,
                    "payload_size",
                    m.device,
                    "payload_bytes",
                    normal_two_sided_surprise(z),
                    format!(
                        "{}'s message of {} bytes is {:.0} sigma {} its usual {} bytes",
                        m.device_name,
                        fmt_num(m.size),
                        z.abs(),
                        if z > 0.0 { "above" } else { "below" },
                        fmt_num(dev.size.mean)
                    ),
                )
                .with_values(m.size, dev.size.mean),
            ),
            _ if learn => dev.size.learn(m.size),
            _ => {}
        }
        for f in out[first..]
            .iter_mut()
            .filter(|f| f.kind != Kind::ClockSkew)
        {
            f.ts = ts;
        }
        if !trusted {
            return untrusted(&mut self.counts, ts);
        }
        if ts > self.state.now {
            self.state.now = ts;
        }
        Verdict { trusted: true, ts }
    }

    /// Judges silences on the plant's event clock (the newest trusted event
    /// time of any machine): a learned device that has sent nothing for
    /// longer than its silence threshold is reported once per silence.
    /// Runs at most once per second of event time.
    pub fn tick(&mut self, names: &dyn Fn(u32, u32) -> (String, String), out: &mut Vec<Finding>) {
        let now = self.state.now;
        if !self.p.enabled || now < self.next_tick {
            return;
        }
        self.next_tick = now + 1000;
        let p = &self.p;
        for (mi, mach) in self.state.machines.iter_mut().enumerate() {
            let Some(mach) = mach else { continue };
            if !mach.protecting {
                continue;
            }
            for dev in &mut mach.devices {
                if !dev.status.trusted()
                    || dev.gaps.silent
                    || dev.gaps.n < 10
                    || now < dev.learn_until
                {
                    continue;
                }
                let threshold = dev
                    .gaps
                    .silence_threshold(p.silence_after, p.silence_factor);
                let silent = now - dev.gaps.last;
                if silent <= threshold {
                    continue;
                }
                dev.gaps.silent = true;
                let (machine, device) = names(mi as u32, dev.device);
                out.push(
                    Finding::note(
                        mi as u32,
                        dev.device,
                        Kind::TrafficRate,
                        "silence",
                        now,
                        dev.device,
                        "message_rate".into(),
                        ratio_surprise(silent as f64 / threshold as f64),
                        format!(
                            "no trusted message from {device} for {machine} for {} (plant clock), after one every {} on average while it learned; silent since {}",
                            format_duration(silent),
                            format_duration(dev.gaps.mean as Millis),
                            format_rfc3339(dev.gaps.last)
                        ),
                    )
                    .with_values(0.0, 1000.0 / dev.gaps.mean.max(1.0)),
                );
            }
        }
    }

    /// How many machines and devices are tracked.
    pub fn sizes(&self) -> (usize, usize) {
        let machines = self.state.machines.iter().flatten();
        let devices = machines.clone().map(|m| m.devices.len()).sum();
        (machines.count(), devices)
    }
}

/// Records a signature result for its batch, and counts it.
fn record(
    counts: &mut IdentityCounts,
    verified: &mut std::collections::HashMap<(u32, u32), SignatureCheck>,
    key: (u32, u32),
    c: SignatureCheck,
) {
    match c {
        SignatureCheck::Valid => counts.signatures_verified += 1,
        SignatureCheck::Missing | SignatureCheck::Bad => counts.signatures_failed += 1,
        SignatureCheck::Unchecked => {}
    }
    verified.insert(key, c);
}

/// The machine a device was first learned or approved for, or [`NONE`].
fn home_of(home: &[u32], device: u32) -> u32 {
    home.get(device as usize).copied().unwrap_or(NONE)
}

fn signed_secs(ms: f64) -> String {
    format!(
        "{}{} s",
        if ms >= 0.0 { "+" } else { "" },
        fmt_num(ms / 1000.0)
    )
}

fn rate_finding(m: &Message, f: RateFinding, key: u32, feature: &str, who: &str) -> Finding {
    let (count, mean, threshold, what) = match f {
        RateFinding::Flood {
            count,
            mean,
            threshold,
        } => (count, mean, threshold, "already"),
        RateFinding::Drop {
            count,
            mean,
            threshold,
        } => (count, mean, threshold, "only"),
    };
    let ratio = match f {
        RateFinding::Flood { .. } => count as f64 / threshold,
        RateFinding::Drop { .. } => threshold / (count as f64).max(0.5),
    };
    Finding::note(
        m.machine,
        m.device,
        Kind::TrafficRate,
        "window_count",
        m.ts,
        key,
        feature.to_string(),
        ratio_surprise(ratio),
        format!(
            "{who} sent {what} {count} messages in this window, against {} usually",
            fmt_num(mean)
        ),
    )
    .with_values(count as f64, mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bench {
        id: Identity,
        out: Vec<Finding>,
    }

    fn bench(extra: &str) -> Bench {
        let cfg = Config::from_toml(
            &format!("[baseline]\nwarmup = \"1m\"\n{extra}"),
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        Bench {
            id: Identity::new(&cfg),
            out: Vec::new(),
        }
    }

    impl Bench {
        #[allow(clippy::too_many_arguments)]
        fn send(
            &mut self,
            device: u32,
            name: &str,
            ts: Millis,
            recv: Millis,
            seq: Option<u64>,
            fp: Option<u32>,
        ) -> Verdict {
            self.id.begin_batch();
            self.id.observe(
                &Message {
                    machine: 0,
                    device,
                    machine_name: "press-1",
                    device_name: name,
                    ts,
                    received_at: recv,
                    seq,
                    size: 180.0,
                    fingerprint: fp,
                    envelope: 0,
                    payload: b"{}",
                    signature: None,
                },
                &mut self.out,
            )
        }

        fn kinds(&mut self) -> Vec<Kind> {
            let k = self.out.iter().map(|f| f.kind).collect();
            self.out.clear();
            k
        }
    }

    const T0: Millis = 1_795_759_200_000;

    #[test]
    fn a_backlog_delivered_at_speed_is_no_clock_skew() {
        let mut b = bench("");
        // 300 s of messages arriving within 300 ms, ten minutes late.
        for s in 0..300 {
            let v = b.send(
                0,
                "plc-1",
                T0 + s * 1000,
                T0 + 600_000 + s,
                Some(s as u64),
                None,
            );
            assert!(v.trusted, "message {s}: {:?}", b.out);
        }
        assert!(b.kinds().is_empty());
    }
}
