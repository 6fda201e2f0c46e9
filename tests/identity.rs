//! The traffic and identity room through the whole pipeline: each finding
//! kind with a case that must alert and one that must not.

use std::collections::HashMap;

use twinwatch::alerts::Alert;
use twinwatch::config::Config;
use twinwatch::detect::Kind;
use twinwatch::pipeline::Pipeline;
use twinwatch::registry::{Registry, device_key, entry_toml, sign};
use twinwatch::source::Envelope;
use twinwatch::time::Millis;

const T0: Millis = 1_795_759_200_000;
const WARMUP: Millis = 120_000;

struct Plant {
    p: Pipeline,
    alerts: Vec<Alert>,
    seqs: HashMap<String, u64>,
    rng: u64,
    /// Per machine: the readings sent, for replays.
    sent: HashMap<String, Vec<String>>,
}

fn config(extra: &str) -> Config {
    Config::from_toml(
        &format!("[baseline]\nwarmup = \"2m\"\n{extra}"),
        std::path::Path::new("test.toml"),
    )
    .unwrap()
}

impl Plant {
    fn new(extra: &str) -> Self {
        Plant {
            p: Pipeline::new(&config(extra)),
            alerts: Vec::new(),
            seqs: HashMap::new(),
            rng: 0x9e37_79b9_7f4a_7c15,
            sent: HashMap::new(),
        }
    }

    fn noise(&mut self) -> f64 {
        // xorshift, summed to something bell-shaped
        let mut acc = 0.0;
        for _ in 0..4 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            acc += (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        }
        acc - 2.0
    }

    fn readings(&mut self) -> String {
        let (a, b) = (self.noise(), self.noise());
        format!(
            r#"{{"temperature_c":{:.2},"pressure_bar":{:.3}}}"#,
            70.0 + a,
            5.0 + 0.1 * b
        )
    }

    fn next_seq(&mut self, device: &str) -> u64 {
        let s = self.seqs.entry(device.to_string()).or_insert(1000);
        *s += 1;
        *s
    }

    fn feed(&mut self, envs: Vec<Envelope>) {
        let out = self.p.process(&envs, 0);
        self.alerts.extend(out.alerts);
    }

    /// One message of `device` for `machine` at `ts` with the next sequence number.
    fn msg(&mut self, machine: &str, device: &str, ts: Millis) -> Envelope {
        let seq = self.next_seq(device);
        let r = self.readings();
        self.sent
            .entry(machine.to_string())
            .or_default()
            .push(r.clone());
        envelope(machine, device, ts, ts + 10, Some(seq), &r)
    }

    /// 1 Hz from each (machine, device) over [from, to).
    fn normal(&mut self, pairs: &[(&str, &str)], from: Millis, to: Millis) {
        let mut t = from;
        while t < to {
            let envs: Vec<Envelope> = pairs.iter().map(|(m, d)| self.msg(m, d, t + 7)).collect();
            self.feed(envs);
            t += 1000;
        }
    }

    fn kinds(&self) -> Vec<Kind> {
        let mut k: Vec<Kind> = self.alerts.iter().map(|a| a.kind).collect();
        k.sort();
        k.dedup();
        k
    }

    fn take(&mut self) -> Vec<Alert> {
        std::mem::take(&mut self.alerts)
    }
}

fn envelope(
    machine: &str,
    device: &str,
    ts: Millis,
    recv: Millis,
    seq: Option<u64>,
    readings: &str,
) -> Envelope {
    let seq = seq.map(|s| format!(r#","seq":{s}"#)).unwrap_or_default();
    Envelope::new(
        format!("twin.telemetry.p.{machine}"),
        Some(recv),
        format!(
            r#"{{"ts":{ts},"machine":"{machine}","device":"{device}"{seq},"readings":{readings}}}"#
        ),
    )
}

const PLANT: [(&str, &str); 3] = [("m1", "plc-1"), ("m2", "plc-2"), ("m3", "plc-3")];

/// A plant that learned for the warm-up and ran quietly for three minutes more.
fn learned(extra: &str) -> Plant {
    let mut p = Plant::new(extra);
    p.normal(&PLANT, T0, T0 + WARMUP + 180_000);
    assert!(p.alerts.is_empty(), "quiet plant alerted: {:#?}", p.alerts);
    p
}

const NOW: Millis = T0 + WARMUP + 180_000;

#[test]
fn flood_alerts_and_rate_jitter_does_not() {
    let mut p = learned("");
    // Jitter: messages 0..300 ms late or early, some windows one more or less.
    let mut t = NOW;
    for i in 0..300 {
        let jitter = (i * 7919 % 600) - 300;
        let envs = vec![
            p.msg("m1", "plc-1", t + jitter),
            p.msg("m2", "plc-2", t),
            p.msg("m3", "plc-3", t),
        ];
        p.feed(envs);
        t += 1000;
    }
    assert!(p.kinds().is_empty(), "{:#?}", p.alerts);
    // Ten times the rate for 30 s.
    for k in 0..300 {
        let e = p.msg("m1", "plc-1", t + k * 100);
        p.feed(vec![e]);
        if k % 10 == 0 {
            let envs = vec![
                p.msg("m2", "plc-2", t + k * 100),
                p.msg("m3", "plc-3", t + k * 100),
            ];
            p.feed(envs);
        }
    }
    let a = p.take();
    assert!(
        a.iter().any(|a| a.kind == Kind::TrafficRate
            && a.machine == "m1"
            && a.device.as_deref() == Some("plc-1")),
        "{a:#?}"
    );
    assert!(a.iter().all(|a| a.machine == "m1"), "{a:#?}");
}

#[test]
fn silence_alerts_on_the_plant_clock_and_a_reboot_does_not() {
    let mut p = learned("");
    // m1's device reboots: five seconds quiet, sequence back to 0.
    p.normal(&PLANT[1..], NOW, NOW + 5_000);
    p.seqs.insert("plc-1".into(), 0);
    p.normal(&PLANT, NOW + 5_000, NOW + 60_000);
    assert!(
        p.kinds().is_empty(),
        "a reboot is no incident: {:#?}",
        p.alerts
    );
    assert_eq!(p.p.stats().untrusted, 0);
    // m1 falls silent while the others go on.
    p.normal(&PLANT[1..], NOW + 60_000, NOW + 120_000);
    let a = p.take();
    let silence: Vec<&Alert> = a.iter().filter(|a| a.detector == "silence").collect();
    assert_eq!(silence.len(), 1, "{a:#?}");
    assert_eq!(silence[0].machine, "m1");
    // About 30 s (the silence threshold) after its last message.
    let ts = twinwatch::time::parse_rfc3339(&silence[0].ts).unwrap();
    assert!((ts - (NOW + 60_000)).abs() <= 33_000, "{}", silence[0].ts);
    // It comes back having skipped sixty numbers: the gap is reported.
    *p.seqs.get_mut("plc-1").unwrap() += 60;
    p.normal(&PLANT, NOW + 120_000, NOW + 125_000);
    let a = p.take();
    let gap = a
        .iter()
        .find(|a| a.kind == Kind::SequenceGap)
        .expect("gap alert");
    assert!(
        gap.explanation.contains("60 messages never arrived"),
        "{}",
        gap.explanation
    );
}

#[test]
fn payload_size_departure() {
    let mut p = learned("");
    let big = format!(
        r#"{{"temperature_c":70.1,"pressure_bar":5.01,"blob":"{}"}}"#,
        "x".repeat(2000)
    );
    let seq = p.next_seq("plc-1");
    p.feed(vec![envelope(
        "m1",
        "plc-1",
        NOW,
        NOW + 10,
        Some(seq),
        &big,
    )]);
    // `blob` is not a number: that message is rejected, so send a valid large one.
    let many: Vec<String> = (0..60).map(|i| format!(r#""extra_{i}":{i}.5"#)).collect();
    let big = format!(
        r#"{{"temperature_c":70.1,"pressure_bar":5.01,{}}}"#,
        many.join(",")
    );
    let seq = p.next_seq("plc-1");
    p.feed(vec![envelope(
        "m1",
        "plc-1",
        NOW + 1000,
        NOW + 1010,
        Some(seq),
        &big,
    )]);
    let a = p.take();
    assert!(a.iter().any(|a| a.kind == Kind::TrafficSize), "{a:#?}");
    // Ordinary sizes after it stay quiet.
    p.normal(&PLANT, NOW + 2000, NOW + 30_000);
    assert!(!p.kinds().contains(&Kind::TrafficSize), "{:#?}", p.alerts);
}

#[test]
fn duplicates_rewinds_and_reorders() {
    let mut p = learned("");
    // A reordered pair is accepted quietly.
    let (s1, s2) = (p.next_seq("plc-1"), p.next_seq("plc-1"));
    let (r1, r2) = (p.readings(), p.readings());
    p.feed(vec![
        envelope("m1", "plc-1", NOW + 1000, NOW + 1010, Some(s2), &r2),
        envelope("m1", "plc-1", NOW + 900, NOW + 1011, Some(s1), &r1),
    ]);
    p.normal(&PLANT, NOW + 2000, NOW + 10_000);
    assert!(p.kinds().is_empty(), "{:#?}", p.alerts);
    // The same message twice.
    let s = p.next_seq("plc-1");
    let r = p.readings();
    let e = envelope("m1", "plc-1", NOW + 10_000, NOW + 10_010, Some(s), &r);
    p.feed(vec![e.clone(), e]);
    let a = p.take();
    assert!(
        a.iter()
            .any(|a| a.kind == Kind::SequenceReplay && a.explanation.contains("sent twice")),
        "{a:#?}"
    );
    // Old numbers again (a replay with the original sequence numbers).
    let r = p.readings();
    p.feed(vec![envelope(
        "m1",
        "plc-1",
        NOW + 11_000,
        NOW + 11_010,
        Some(s - 200),
        &r,
    )]);
    let a = p.take();
    assert!(
        a.iter()
            .any(|a| a.kind == Kind::SequenceReplay && a.explanation.contains("went back 200")),
        "{a:#?}"
    );
    assert_eq!(
        p.p.stats().untrusted,
        2,
        "the copies stay out of the baselines"
    );
}

#[test]
fn replayed_readings_with_forged_sequence_numbers() {
    let mut p = learned("");
    // Live data: nothing.
    p.normal(&PLANT, NOW, NOW + 60_000);
    assert!(p.kinds().is_empty());
    // m1's readings from four minutes ago, with fresh ts and continuing seq.
    let old: Vec<String> = {
        let s = &p.sent["m1"];
        s[s.len() - 240..s.len() - 180].to_vec()
    };
    let mut t = NOW + 60_000;
    for r in old {
        let seq = p.next_seq("plc-1");
        let others = vec![
            envelope("m1", "plc-1", t, t + 10, Some(seq), &r),
            p.msg("m2", "plc-2", t),
            p.msg("m3", "plc-3", t),
        ];
        p.feed(others);
        t += 1000;
    }
    let a = p.take();
    let replay: Vec<&Alert> = a
        .iter()
        .filter(|a| a.detector == "content_replay")
        .collect();
    assert_eq!(replay.len(), 1, "{a:#?}");
    assert_eq!(replay[0].machine, "m1");
    let ts = twinwatch::time::parse_rfc3339(&replay[0].ts).unwrap();
    assert!(
        ts - (NOW + 60_000) <= 30_000,
        "recognised within 30 messages: {}",
        replay[0].ts
    );
}

#[test]
fn clock_skew_is_kept_out_and_a_late_backlog_is_not_skew() {
    let mut p = learned("");
    // A backlog: every device's messages arrive five minutes late, together.
    let mut t = NOW;
    for _ in 0..60 {
        let envs: Vec<Envelope> = PLANT
            .iter()
            .map(|(m, d)| {
                let seq = p.next_seq(d);
                let r = p.readings();
                envelope(m, d, t, t + 300_000, Some(seq), &r)
            })
            .collect();
        p.feed(envs);
        t += 1000;
    }
    assert!(p.kinds().is_empty(), "{:#?}", p.alerts);
    // Now one device's clock runs five minutes ahead while the rest are on time.
    let mut p = learned("");
    let before = p.p.stats().untrusted;
    let mut t = NOW;
    for _ in 0..20 {
        let seq = p.next_seq("plc-1");
        let r = p.readings();
        let envs = vec![
            envelope("m1", "plc-1", t + 300_000, t + 10, Some(seq), &r),
            p.msg("m2", "plc-2", t),
            p.msg("m3", "plc-3", t),
        ];
        p.feed(envs);
        t += 1000;
    }
    let a = p.take();
    let skew = a
        .iter()
        .find(|a| a.kind == Kind::ClockSkew)
        .expect("clock_skew");
    assert_eq!(skew.machine, "m1");
    // Dated at arrival, not at the lying timestamp.
    let ts = twinwatch::time::parse_rfc3339(&skew.ts).unwrap();
    assert!(ts < NOW + 30_000, "{}", skew.ts);
    assert_eq!(p.p.stats().untrusted - before, 20);
}

#[test]
fn unknown_and_mismatched_devices_until_approved() {
    let mut p = learned("");
    // A new engineering workstation talks for m1: unknown, kept out.
    p.normal(&[("m1", "eng-ws-9")], NOW, NOW + 5_000);
    let a = p.take();
    assert!(
        a.iter()
            .any(|a| a.kind == Kind::UnknownDevice && a.device.as_deref() == Some("eng-ws-9")),
        "{a:#?}"
    );
    assert_eq!(p.p.stats().untrusted, 5);
    // m2's device reports for m1: mismatch.
    p.normal(&[("m1", "plc-2")], NOW + 5_000, NOW + 6_000);
    let a = p.take();
    assert!(a.iter().any(|a| a.kind == Kind::DeviceMismatch), "{a:#?}");
    // The workstation is approved in the registry: quiet and trusted from then on.
    let key = device_key([3; 32]);
    let reg = entry_toml("eng-ws-9", &["m1".into()], &key.public_key(), false);
    p.p.set_registry(Registry::parse(&reg, std::path::Path::new("devices.toml")).unwrap());
    let untrusted = p.p.stats().untrusted;
    p.normal(
        &[
            ("m1", "plc-1"),
            ("m1", "eng-ws-9"),
            ("m2", "plc-2"),
            ("m3", "plc-3"),
        ],
        NOW + 6_000,
        NOW + 60_000,
    );
    assert!(p.kinds().is_empty(), "{:#?}", p.alerts);
    assert_eq!(p.p.stats().untrusted, untrusted);
    assert_eq!(
        p.p.identity()
            .machine(0)
            .unwrap()
            .devices
            .iter()
            .filter(|d| d.status == twinwatch::detect::identity::Status::Approved)
            .count(),
        1
    );
}

#[test]
fn signatures_are_verified_against_the_registry() {
    let key = device_key([9; 32]);
    let reg = entry_toml("plc-1", &["m1".into()], &key.public_key(), true);
    let mut p = Plant::new("");
    p.p.set_registry(Registry::parse(&reg, std::path::Path::new("devices.toml")).unwrap());
    let signed = |p: &mut Plant, ts: Millis, how: u8| {
        let seq = p.next_seq("plc-1");
        let r = p.readings();
        let mut e = envelope("m1", "plc-1", ts, ts + 10, Some(seq), &r);
        match how {
            0 => {
                let s = sign(&key, &e.payload);
                e.headers.push(("Twin-Signature".into(), s));
            }
            1 => e.headers.push((
                "Twin-Signature".into(),
                sign(&device_key([1; 32]), &e.payload),
            )),
            _ => {}
        }
        e
    };
    for i in 0..200 {
        let e = signed(&mut p, T0 + i * 1000, 0);
        p.feed(vec![e]);
    }
    assert!(p.alerts.is_empty(), "{:#?}", p.alerts);
    assert_eq!(p.p.stats().signatures_verified, 200);
    // Signed by another key, and unsigned: critical, also while learning.
    let e = signed(&mut p, T0 + 200_000, 1);
    p.feed(vec![e]);
    let e = signed(&mut p, T0 + 201_000, 2);
    p.feed(vec![e]);
    let a = p.take();
    assert_eq!(a.len(), 1, "one open alert for the device: {a:#?}");
    assert_eq!(a[0].kind, Kind::SignatureInvalid);
    assert_eq!(a[0].severity.as_str(), "critical");
    assert_eq!(p.p.stats().signatures_failed, 2);
    assert_eq!(p.p.stats().untrusted, 2);
}

#[allow(clippy::too_many_arguments)]
fn flow(
    machine: &str,
    ts: Millis,
    src: &str,
    dst: &str,
    port: u16,
    app: &str,
    op: &str,
    bytes: u64,
) -> String {
    format!(
        r#"{{"ts":{ts},"machine":"{machine}","src":"{src}","dst":"{dst}","dst_port":{port},"proto":"tcp","app":"{app}","op":"{op}","bytes":{bytes}}}"#
    )
}

fn flows(machine: &str, ts: Millis, records: &[String]) -> Envelope {
    Envelope::new(
        format!("twin.flows.p.{machine}"),
        Some(ts + 20),
        format!("[{}]", records.join(",")),
    )
}

/// The usual traffic of m1: the poller reads, the HMI reads OPC UA.
fn usual(ts: Millis) -> Envelope {
    flows(
        "m1",
        ts,
        &[
            flow(
                "m1",
                ts,
                "10.0.0.5",
                "10.1.0.1",
                502,
                "modbus",
                "read_holding_registers",
                120 + (ts / 1000 % 7) as u64,
            ),
            flow(
                "m1",
                ts + 100,
                "10.0.0.8",
                "10.1.0.1",
                4840,
                "opcua",
                "read",
                400 + (ts / 1000 % 13) as u64,
            ),
        ],
    )
}

#[test]
fn flows_new_peers_ports_ops_volume_and_fanout() {
    let mut p = Plant::new("");
    let mut t = T0;
    while t < T0 + WARMUP + 60_000 {
        p.feed(vec![usual(t)]);
        t += 5_000;
    }
    assert!(p.alerts.is_empty(), "{:#?}", p.alerts);
    // Usual traffic stays quiet.
    for _ in 0..20 {
        p.feed(vec![usual(t)]);
        t += 5_000;
    }
    assert!(p.alerts.is_empty(), "{:#?}", p.alerts);
    // The poller, which only read, writes a register.
    p.feed(vec![flows(
        "m1",
        t,
        &[flow(
            "m1",
            t,
            "10.0.0.5",
            "10.1.0.1",
            502,
            "modbus",
            "write_single_register",
            124,
        )],
    )]);
    assert_eq!(p.kinds(), vec![Kind::FlowNewOp]);
    p.take();
    // Exfiltration: megabytes to a new external peer on a new port.
    t += 10_000;
    p.feed(vec![flows(
        "m1",
        t,
        &[flow(
            "m1",
            t,
            "10.1.0.1",
            "203.0.113.7",
            8443,
            "https",
            "post",
            2_000_000,
        )],
    )]);
    let k = p.kinds();
    for want in [Kind::FlowNewPeer, Kind::FlowNewPort, Kind::FlowVolume] {
        assert!(k.contains(&want), "{want:?} missing: {:#?}", p.alerts);
    }
    p.take();
    // Volume to a known peer far above its usual.
    t += 10_000;
    p.feed(vec![flows(
        "m1",
        t,
        &[flow(
            "m1", t, "10.0.0.8", "10.1.0.1", 4840, "opcua", "read", 900_000,
        )],
    )]);
    assert_eq!(p.kinds(), vec![Kind::FlowVolume]);
    p.take();
    // A scan: one source, 60 destination:port pairs in a window; one fan-out
    // alert and at most `max_new_per_window` novelty alerts, not sixty.
    t += 10_000;
    let t_scan = (t / 10_000 + 1) * 10_000;
    let recs: Vec<String> = (0..60)
        .map(|i| {
            flow(
                "m1",
                t_scan + i,
                "10.0.0.8",
                &format!("10.1.0.{}", 10 + i),
                [22u16, 80, 502][i as usize % 3],
                "tcp",
                "syn",
                60,
            )
        })
        .collect();
    p.feed(vec![flows("m1", t_scan, &recs)]);
    let a = p.take();
    assert_eq!(
        a.iter().filter(|a| a.kind == Kind::FlowFanout).count(),
        1,
        "{a:#?}"
    );
    assert!(
        a.iter().filter(|a| a.kind != Kind::FlowFanout).count() <= 3,
        "{a:#?}"
    );
}

#[test]
fn sprayed_ids_stay_within_their_caps() {
    let mut p = Plant::new(
        "[input]\nmax_machines = 50\nmax_devices = 300\n[devices]\nmax_per_machine = 8\n",
    );
    p.normal(&PLANT, T0, T0 + WARMUP + 10_000);
    assert!(p.alerts.is_empty());
    // 5,000 invented device ids for m1, then 1,000 invented machines.
    let t = T0 + WARMUP + 10_000;
    for i in 0..5_000 {
        let e = p.msg("m1", &format!("rogue-{i}"), t + i);
        p.feed(vec![e]);
    }
    for i in 0..1_000 {
        let e = p.msg(&format!("ghost-{i}"), "ghost", t + 5_000 + i);
        p.feed(vec![e]);
    }
    let (machines, devices) = p.p.identity().sizes();
    assert!(machines <= 50, "{machines}");
    assert!(devices <= 8 * 50, "{devices}");
    assert!(p.p.identity().machine(0).unwrap().devices.len() <= 8);
    let a = p.take();
    let caps: Vec<&Alert> = a.iter().filter(|a| a.kind == Kind::Capacity).collect();
    // One per cap reached: m1's device table, the global device names, the machines.
    let features: Vec<&str> = caps.iter().filter_map(|a| a.feature.as_deref()).collect();
    for want in [
        "devices.max_per_machine",
        "input.max_devices",
        "input.max_machines",
    ] {
        assert!(features.contains(&want), "{want} not alerted: {features:?}");
    }
    assert_eq!(caps.len(), 3, "{caps:#?}");
    // Unknown-device alerts only for the devices tracked, not one per sprayed id.
    let unknown = a.iter().filter(|a| a.kind == Kind::UnknownDevice).count();
    assert!(unknown <= 8, "{unknown}");
    assert!(p.p.stats().over_cap > 0);
}

#[test]
fn a_gateway_numbers_its_messages_across_machines() {
    // One gateway reports for three machines with one sequence: no gaps, and
    // a message it loses is one number missing across them.
    let mut p = Plant::new("");
    let gw = [("m1", "gw-1"), ("m2", "gw-1"), ("m3", "gw-1")];
    p.normal(&gw, T0, NOW + 60_000);
    assert!(p.kinds().is_empty(), "{:#?}", p.alerts);
    *p.seqs.get_mut("gw-1").unwrap() += 12;
    p.normal(&gw, NOW + 60_000, NOW + 62_000);
    let a = p.take();
    let gap = a.iter().find(|a| a.kind == Kind::SequenceGap).expect("gap");
    assert!(
        gap.explanation.contains("12 messages never arrived"),
        "{}",
        gap.explanation
    );
}

#[test]
fn a_sensor_decoupled_from_the_one_it_follows_is_multivariate() {
    // pressure follows temperature; after learning, pressure goes flat while
    // temperature keeps moving: each value stays in its learned range.
    let mut p = Plant::new("[learn]\nenabled = true\nlag = \"0s\"\n");
    let reading = |p: &mut Plant, i: i64, coupled: bool| {
        let load = ((i as f64) / 10.0).sin() * 3.0;
        let (a, b) = (p.noise(), p.noise());
        let temp = 70.0 + load + 0.2 * a;
        let pressure = if coupled {
            5.0 + 0.5 * load + 0.03 * b
        } else {
            5.0 + 0.03 * b
        };
        format!(r#"{{"temperature_c":{temp:.3},"pressure_bar":{pressure:.4}}}"#)
    };
    let send = |p: &mut Plant, i: i64, coupled: bool| {
        let seq = p.next_seq("plc-1");
        let r = reading(p, i, coupled);
        let ts = T0 + i * 1000;
        p.feed(vec![envelope("m1", "plc-1", ts, ts + 10, Some(seq), &r)]);
    };
    for i in 0..600 {
        send(&mut p, i, true);
    }
    let model = p.p.learned().machine(0).and_then(|m| m.model.clone());
    assert!(model.is_some(), "fitted when learning ended");
    assert!(!p.kinds().contains(&Kind::Multivariate), "{:#?}", p.alerts);
    for i in 600..700 {
        send(&mut p, i, false);
    }
    let a = p.take();
    let mv: Vec<&Alert> = a.iter().filter(|a| a.kind == Kind::Multivariate).collect();
    assert!(!mv.is_empty(), "{a:#?}");
    let sum: f64 = mv[0].contributions.iter().map(|c| c.weight).sum();
    assert!((sum - 1.0).abs() < 1e-3, "{:?}", mv[0].contributions);
}

/// Within a batch, each message's alerts come in the order its rooms raised
/// them — identity's, then the detectors' — before the next message's: the
/// detectors take the batch's messages at once, and their findings are put
/// back message by message.
#[test]
fn a_batch_keeps_each_messages_alerts_together_and_in_order() {
    let mut p = learned("");
    // m1 skips sixty numbers and reads a spike; m2 skips sixty numbers.
    *p.seqs.get_mut("plc-1").unwrap() += 60;
    *p.seqs.get_mut("plc-2").unwrap() += 60;
    let (s1, s2) = (p.next_seq("plc-1"), p.next_seq("plc-2"));
    let r2 = p.readings();
    let spike = r#"{"temperature_c":140.0,"pressure_bar":5.0}"#;
    p.feed(vec![
        envelope("m1", "plc-1", NOW + 7, NOW + 17, Some(s1), spike),
        envelope("m2", "plc-2", NOW + 8, NOW + 18, Some(s2), &r2),
    ]);
    let a = p.take();
    let order: Vec<(&str, Kind)> = a.iter().map(|a| (a.machine.as_str(), a.kind)).collect();
    let m2_gap = order
        .iter()
        .position(|&o| o == ("m2", Kind::SequenceGap))
        .unwrap_or_else(|| panic!("m2's gap: {order:?}"));
    let m1: Vec<Kind> = order[..m2_gap]
        .iter()
        .map(|&(m, k)| {
            assert_eq!(m, "m1", "{order:?}");
            k
        })
        .collect();
    assert_eq!(m1.first(), Some(&Kind::SequenceGap), "{order:?}");
    assert!(m1.contains(&Kind::SensorSpike), "{order:?}");
    assert_eq!(order.len(), m2_gap + 1, "{order:?}");
}
