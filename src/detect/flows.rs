//! Network flows per machine (contract §2): who talks to the machine's
//! network, on which ports, with which operations, how much, and how widely.
//!
//! While a machine's flows learn (`baseline.warmup` from its first flow
//! record), [`Flows::observe`] collects its peers (every source and
//! destination address), destination ports, (source, app, operation) triples,
//! the bytes each destination receives per window, and the widest fan-out of
//! one source in a window. Afterwards it reports:
//! `flow_new_peer`, `flow_new_port`, `flow_new_op` (a write from a source that
//! never wrote), `flow_volume` (bytes to one destination in a window far
//! above its learned mean, or above the largest learned mean for a destination
//! never seen: exfiltration) and `flow_fanout` (one source touching many
//! distinct destination:port pairs in a window: scanning).
//!
//! Sets are sorted vectors of 64-bit hashes, capped per machine
//! (`flows.max_peers`, `max_ports`, `max_ops`; a full set raises one
//! `capacity` alert); the per-window tallies are capped too, and at most
//! `flows.max_new_per_window` novelty findings are made per machine and
//! window, so sprayed addresses cost bounded memory and one fan-out alert.

use serde::{Deserialize, Serialize};

use super::{Finding, Kind};
use crate::alerts::{NO_DEVICE, fmt_num};
use crate::config::Config;
use crate::score::{ratio_surprise, surprise_from_score};
use crate::time::{Millis, format_rfc3339, window_start};

/// Most destinations and sources tallied per machine and window.
const MAX_TALLIES: usize = 64;

/// One flow record as this room sees it.
#[derive(Debug, Clone, Copy)]
pub struct FlowRecord<'a> {
    pub machine: u32,
    pub machine_name: &'a str,
    pub ts: Millis,
    pub src: &'a str,
    pub dst: &'a str,
    pub dst_port: Option<u16>,
    pub app: Option<&'a str>,
    pub op: Option<&'a str>,
    pub bytes: u64,
    /// False for future-dated records: judged, never learned.
    pub trusted: bool,
}

/// Bytes per window to one destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub dst: u64,
    pub bytes: super::traffic::Running,
}

/// The current window's tallies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Window {
    start: Millis,
    /// (destination, bytes, alerted)
    bytes: Vec<(u64, u64, bool)>,
    /// (source, distinct destination:port hashes, alerted)
    fanout: Vec<(u64, Vec<u64>, bool)>,
    novelties: u32,
}

/// What a machine's flows learned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineFlows {
    pub first_ts: Millis,
    pub protecting: bool,
    pub peers: Vec<u64>,
    pub ports: Vec<u16>,
    pub ops: Vec<u64>,
    pub volumes: Vec<Volume>,
    pub largest_mean: f64,
    pub widest_fanout: u32,
    window: Window,
    /// Which caps were reported (peers, ports, ops).
    capped: [bool; 3],
}

#[derive(Debug, Clone)]
struct Params {
    enabled: bool,
    warmup: Millis,
    window: Millis,
    max_peers: usize,
    max_ports: usize,
    max_ops: usize,
    volume_factor: f64,
    volume_min: u64,
    fanout_min: usize,
    max_new: u32,
}

/// The flows room.
pub struct Flows {
    p: Params,
    machines: Vec<Option<MachineFlows>>,
}

/// FNV-1a over the parts, separated: a stable 64-bit key for addresses and triples.
pub fn key(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes().iter().chain(std::iter::once(&0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// A dedup key (32 bits) for a finding about `subject`.
fn dedup_key(subject: &str) -> u32 {
    (key(&[subject]) >> 32) as u32
}

/// The slot of `key` in a window's tallies, added while there is room
/// ([`MAX_TALLIES`]); `None` once full.
fn tally<T>(
    v: &mut Vec<T>,
    key: u64,
    key_of: impl Fn(&T) -> u64,
    make: impl FnOnce() -> T,
) -> Option<usize> {
    match v.iter().position(|e| key_of(e) == key) {
        Some(i) => Some(i),
        None if v.len() < MAX_TALLIES => {
            v.push(make());
            Some(v.len() - 1)
        }
        None => None,
    }
}

/// Inserts into a sorted set below `cap`; `Err(true)` when the cap refused it.
fn insert_capped<T: Ord + Copy>(set: &mut Vec<T>, v: T, cap: usize) -> Result<bool, bool> {
    match set.binary_search(&v) {
        Ok(_) => Ok(false),
        Err(_) if set.len() >= cap => Err(true),
        Err(i) => {
            set.insert(i, v);
            Ok(true)
        }
    }
}

impl Flows {
    pub fn new(cfg: &Config) -> Self {
        let f = &cfg.flows;
        Flows {
            p: Params {
                enabled: f.enabled,
                warmup: cfg.baseline.warmup,
                window: cfg.window.size,
                max_peers: f.max_peers,
                max_ports: f.max_ports,
                max_ops: f.max_ops,
                volume_factor: f.volume_factor,
                volume_min: f.volume_min_bytes,
                fanout_min: f.fanout_min,
                max_new: f.max_new_per_window,
            },
            machines: Vec::new(),
        }
    }

    pub fn snapshot(&self) -> Vec<Option<MachineFlows>> {
        self.machines.clone()
    }

    pub fn restore(&mut self, machines: Vec<Option<MachineFlows>>) {
        self.machines = machines;
    }

    /// The learned flows of a machine.
    pub fn machine(&self, machine: u32) -> Option<&MachineFlows> {
        self.machines.get(machine as usize).and_then(Option::as_ref)
    }

    /// Judges and learns one flow record.
    pub fn observe(&mut self, r: &FlowRecord, out: &mut Vec<Finding>) {
        let p = &self.p;
        if !p.enabled {
            return;
        }
        let m = crate::intern::entry(&mut self.machines, r.machine, || MachineFlows {
            first_ts: r.ts,
            protecting: false,
            peers: Vec::new(),
            ports: Vec::new(),
            ops: Vec::new(),
            volumes: Vec::new(),
            largest_mean: 0.0,
            widest_fanout: 0,
            window: Window {
                start: window_start(r.ts, p.window),
                ..Window::default()
            },
            capped: [false; 3],
        });
        if !m.protecting && r.trusted && r.ts >= m.first_ts.saturating_add(p.warmup) {
            m.protecting = true;
        }
        let learning = !m.protecting;
        let finding = |kind, detector, subject: String, score_or_surprise: f64, text: String| {
            Finding::note(
                r.machine,
                NO_DEVICE,
                kind,
                detector,
                r.ts,
                dedup_key(&subject),
                subject,
                score_or_surprise,
                text,
            )
        };

        // Window roll-over: the closed window teaches volumes and fan-out.
        let start = window_start(r.ts, p.window);
        let in_window = if start > m.window.start {
            let closed = std::mem::take(&mut m.window);
            learn_window(m, &closed, learning);
            m.window.start = start;
            true
        } else {
            start == m.window.start
        };

        // Novelty: peers, ports, operations.
        // Written only for findings: most records find nothing.
        let flow = || {
            format!(
                "{} -> {}{}{}",
                r.src,
                r.dst,
                r.dst_port.map(|p| format!(":{p}")).unwrap_or_default(),
                r.app.map(|a| format!(" {a}")).unwrap_or_default()
            )
        };
        let mut novel: Vec<(Kind, String, f64, String)> = Vec::new();
        for ip in [r.src, r.dst] {
            match insert_capped(&mut m.peers, key(&[ip]), if learning { p.max_peers } else { 0 }) {
                Err(true) if learning => cap(m, 0, "flows.max_peers", p.max_peers, r, out),
                Err(_) if !learning && m.peers.binary_search(&key(&[ip])).is_err() => novel.push((
                    Kind::FlowNewPeer,
                    ip.to_string(),
                    0.9,
                    format!(
                        "{ip} never appeared in {}'s flows while they were learned ({} peers known): {}",
                        r.machine_name,
                        m.peers.len(),
                        flow()
                    ),
                )),
                _ => {}
            }
        }
        if let Some(port) = r.dst_port {
            match insert_capped(&mut m.ports, port, if learning { p.max_ports } else { 0 }) {
                Err(true) if learning => cap(m, 1, "flows.max_ports", p.max_ports, r, out),
                Err(_) if !learning && m.ports.binary_search(&port).is_err() => novel.push((
                    Kind::FlowNewPort,
                    format!("port {port}"),
                    0.9,
                    format!(
                        "destination port {port} never seen for {} ({} ports known): {}",
                        r.machine_name,
                        m.ports.len(),
                        flow()
                    ),
                )),
                _ => {}
            }
        }
        if let Some(op) = r.op {
            let app = r.app.unwrap_or("");
            let k = key(&[r.src, app, op]);
            match insert_capped(&mut m.ops, k, if learning { p.max_ops } else { 0 }) {
                Err(true) if learning => cap(m, 2, "flows.max_ops", p.max_ops, r, out),
                Err(_) if !learning && m.ops.binary_search(&k).is_err() => {
                    let write = op.to_ascii_lowercase().contains("write");
                    novel.push((
                        Kind::FlowNewOp,
                        format!("{} {app} {op}", r.src),
                        if write { 0.97 } else { 0.9 },
                        format!(
                            "{} sent {app} {op} to {}, which it never did while {}'s flows were learned{}",
                            r.src,
                            r.dst,
                            r.machine_name,
                            if write { ": an unauthorised write?" } else { "" }
                        ),
                    ))
                }
                _ => {}
            }
        }
        for (kind, subject, score, text) in novel {
            if m.window.novelties < p.max_new {
                m.window.novelties += 1;
                let mut f = finding(kind, "flow_set", subject, surprise_from_score(score), text);
                // New peers and ports are kept apart per source: a sweep from
                // one host is one open alert (plus its fan-out), not one per address.
                if kind != Kind::FlowNewOp {
                    f.metric = dedup_key(r.src);
                }
                out.push(f);
            }
        }
        if !in_window {
            return; // a late record: its window has been learned already
        }

        // Volume to the destination in this window.
        let dst = key(&[r.dst]);
        let w = &mut m.window;
        let slot = tally(&mut w.bytes, dst, |e| e.0, || (dst, 0, false));
        if let Some(i) = slot {
            let e = &mut w.bytes[i];
            e.1 = e.1.saturating_add(r.bytes);
            if !learning && !e.2 {
                let learned = m
                    .volumes
                    .binary_search_by_key(&dst, |v| v.dst)
                    .ok()
                    .map(|i| &m.volumes[i]);
                let (expected, threshold) = match learned {
                    Some(v) if v.bytes.n >= 3 => (
                        v.bytes.mean,
                        (v.bytes.mean * p.volume_factor)
                            .max(v.bytes.mean + 8.0 * v.bytes.dev)
                            .max(p.volume_min as f64),
                    ),
                    _ => (
                        0.0,
                        (m.largest_mean * p.volume_factor).max(p.volume_min as f64),
                    ),
                };
                if e.1 as f64 > threshold {
                    e.2 = true;
                    let bytes = e.1;
                    out.push(
                        finding(
                            Kind::FlowVolume,
                            "window_bytes",
                            r.dst.to_string(),
                            ratio_surprise(bytes as f64 / threshold),
                            format!(
                                "{} bytes went to {} in the window from {} ({}; threshold {} bytes): exfiltration?",
                                bytes,
                                r.dst,
                                format_rfc3339(w.start),
                                if learned.is_some() {
                                    format!("usually {} bytes", fmt_num(expected))
                                } else {
                                    "a destination never seen while learning".to_string()
                                },
                                fmt_num(threshold)
                            ),
                        )
                        .with_values(bytes as f64, expected),
                    );
                }
            }
        }

        // Fan-out of the source in this window.
        let src = key(&[r.src]);
        let port = r.dst_port.map_or(0, |p| p as u64 + 1);
        let pair = key(&[r.dst]) ^ port.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let limit = p.fanout_min.max(2 * m.widest_fanout as usize);
        let slot = tally(&mut w.fanout, src, |e| e.0, || (src, Vec::new(), false));
        if let Some(i) = slot {
            let e = &mut w.fanout[i];
            if e.1.len() <= limit && !e.1.contains(&pair) {
                e.1.push(pair);
            }
            if !learning && !e.2 && e.1.len() > limit {
                e.2 = true;
                out.push(
                    finding(
                        Kind::FlowFanout,
                        "window_fanout",
                        r.src.to_string(),
                        ratio_surprise(e.1.len() as f64 / limit as f64),
                        format!(
                            "{} touched more than {limit} distinct destination:port pairs around {} in one window (widest while learning: {}): scanning?",
                            r.src,
                            r.machine_name,
                            m.widest_fanout
                        ),
                    )
                    .with_values(e.1.len() as f64, m.widest_fanout as f64),
                );
            }
        }
    }
}

/// Lets a closed window teach the volumes and the fan-out.
fn learn_window(m: &mut MachineFlows, w: &Window, learning: bool) {
    for &(dst, bytes, alerted) in &w.bytes {
        if alerted {
            continue;
        }
        let i = match m.volumes.binary_search_by_key(&dst, |v| v.dst) {
            Ok(i) => i,
            // Only learning adds destinations; afterwards new ones stay new.
            Err(i) if learning && m.volumes.len() < 4 * MAX_TALLIES => {
                m.volumes.insert(
                    i,
                    Volume {
                        dst,
                        bytes: Default::default(),
                    },
                );
                i
            }
            Err(_) => continue,
        };
        let v = &mut m.volumes[i].bytes;
        v.learn(bytes as f64);
        if learning {
            m.largest_mean = m.largest_mean.max(v.mean);
        }
    }
    if learning {
        for (_, pairs, _) in &w.fanout {
            m.widest_fanout = m.widest_fanout.max(pairs.len() as u32);
        }
    }
}

/// Reports a full learned set once.
fn cap(
    m: &mut MachineFlows,
    which: usize,
    key_name: &str,
    n: usize,
    r: &FlowRecord,
    out: &mut Vec<Finding>,
) {
    if m.capped[which] {
        return;
    }
    m.capped[which] = true;
    out.push(Finding::note(
        r.machine,
        NO_DEVICE,
        Kind::Capacity,
        "flow_cap",
        r.ts,
        dedup_key(key_name),
        key_name.to_string(),
        surprise_from_score(0.9),
        format!(
            "{} reached {key_name} = {n} while learning its flows; further entries are not learned (and will look new once it protects)",
            r.machine_name
        ),
    ));
}
