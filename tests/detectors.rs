//! Each detector on synthetic series with known anomalies, and clean noisy
//! series with operating-mode changes that must stay quiet.

use twinwatch::config::Config;
use twinwatch::detect::{Detectors, Finding, Kind};
use twinwatch::learn::machines::Learned;
use twinwatch::sim::rng::Rng;

const T0: i64 = 1_795_759_200_000;
const SIGMA: [f64; 4] = [0.15, 0.06, 1.5, 0.3];

/// A machine with four coupled sensors: temperature (slow), vibration, speed, current.
struct Machine {
    rng: Rng,
    speed: f64,
    load: f64,
    temp: f64,
}

impl Machine {
    fn new(seed: u64) -> Self {
        Machine {
            rng: Rng::new(seed),
            speed: 300.0,
            load: 0.1,
            temp: 30.0,
        }
    }

    /// One second of plant life in `mode` (0 idle, 1 normal, 2 full).
    fn step(&mut self, mode: usize) -> [f64; 4] {
        let (speed, load) = [(300.0, 0.1), (1200.0, 0.6), (1800.0, 1.0)][mode];
        self.speed += (speed - self.speed) * 0.28;
        self.load += (load - self.load) * 0.4;
        let current = 3.0 + 35.0 * self.load * (0.5 + 0.5 * self.speed / 1200.0);
        self.temp += (22.0 + 1.1 * current - self.temp) * (1.0 - (-1.0f64 / 120.0).exp());
        let clean = [
            self.temp,
            0.4 + 1.6 * (self.speed / 1200.0).powi(2),
            self.speed,
            current,
        ];
        let mut out = [0.0; 4];
        for i in 0..4 {
            out[i] = clean[i] + SIGMA[i] * self.rng.normal();
        }
        out
    }
}

/// A schedule of modes that walks through all three while learning, then changes every few minutes.
fn mode_at(sec: i64) -> usize {
    match sec {
        s if s < 120 => 0,
        s if s < 240 => 1,
        s if s < 360 => 2,
        s if s < 600 => 1,
        s => [0, 2, 1, 2, 0, 1, 2, 1][((s - 600) / 420) as usize % 8],
    }
}

fn config() -> Config {
    Config::default()
}

/// Plays `seconds` of one machine, `tamper` changing readings, handing each
/// second's readings (rounded as a PLC reports them) to `feed`.
fn drive(
    seconds: i64,
    seed: u64,
    mut tamper: impl FnMut(i64, &mut [f64; 4]),
    mut feed: impl FnMut(i64, &[(u32, f64)]),
) {
    let mut m = Machine::new(seed);
    for s in 0..seconds {
        let mut v = m.step(mode_at(s));
        tamper(s, &mut v);
        let readings: Vec<(u32, f64)> = v
            .iter()
            .enumerate()
            .map(|(i, x)| (i as u32, (x * 1000.0).round() / 1000.0))
            .collect();
        feed(T0 + s * 1000, &readings);
    }
}

/// Runs `seconds` of one machine through the detectors; `tamper` may change readings.
fn run(
    seconds: i64,
    seed: u64,
    tamper: impl FnMut(i64, &mut [f64; 4]),
) -> (Vec<Finding>, Detectors) {
    let mut d = Detectors::new(&config());
    let mut out = Vec::new();
    drive(seconds, seed, tamper, |ts, r| {
        d.observe(0, 0, ts, true, r, &mut out)
    });
    (out, d)
}

fn kinds(f: &[Finding]) -> Vec<(Kind, u32)> {
    let mut k: Vec<(Kind, u32)> = f.iter().map(|f| (f.kind, f.metric)).collect();
    k.sort();
    k.dedup();
    k
}

#[test]
fn clean_series_with_mode_changes_stay_quiet() {
    for seed in 1..=3 {
        let (findings, d) = run(3 * 3600, seed, |_, _| {});
        assert!(
            findings.is_empty(),
            "seed {seed}: {} findings on a clean series, first {:?}",
            findings.len(),
            findings.first()
        );
        assert!(
            d.machine(0).unwrap().mode.transitions >= 20,
            "the series must hold many mode changes"
        );
    }
}

#[test]
fn nothing_is_reported_while_learning() {
    let (findings, _) = run(590, 1, |s, v| {
        if s % 60 == 30 {
            v[0] += 50.0;
        }
    });
    assert!(findings.is_empty());
}

#[test]
fn spike_on_one_sensor() {
    let at = 1500;
    let (findings, _) = run(1800, 2, |s, v| {
        if (at..at + 2).contains(&s) {
            v[1] += 12.0 * SIGMA[1];
        }
    });
    assert!(!findings.is_empty());
    assert!(
        findings
            .iter()
            .all(|f| f.ts >= T0 + at * 1000 && f.ts < T0 + (at + 2) * 1000),
        "{findings:?}"
    );
    assert!(kinds(&findings).contains(&(Kind::SensorSpike, 1)));
    let f = findings
        .iter()
        .find(|f| f.kind == Kind::SensorSpike)
        .unwrap();
    assert!(f.value > f.expected);
}

#[test]
fn bigger_spikes_score_higher() {
    let surprise = |k: f64| {
        let (f, _) = run(1850, 4, |s, v| {
            if s == 1800 {
                v[3] -= k * SIGMA[3];
            }
        });
        f.iter()
            .filter(|f| f.kind == Kind::SensorSpike)
            .map(|f| f.surprise)
            .fold(0.0, f64::max)
    };
    let (a, b) = (surprise(8.0), surprise(16.0));
    assert!(a > 0.0 && b > a, "{a} {b}");
}

#[test]
fn slow_drift_is_a_shift_and_not_a_spike() {
    // Vibration creeps up by 2 sigma per minute from minute 25, across mode changes.
    let start = 1500;
    let (findings, _) = run(2400, 3, |s, v| {
        if s >= start {
            v[1] += 0.002 * (s - start) as f64;
        }
    });
    let shift = findings
        .iter()
        .find(|f| f.kind == Kind::SensorShift)
        .expect("drift found");
    assert_eq!(shift.metric, 1);
    assert!(
        shift.ts > T0 + start * 1000 && shift.ts < T0 + (start + 600) * 1000,
        "found at {}",
        (shift.ts - T0) / 1000
    );
    assert!(
        findings.iter().all(|f| f.ts >= T0 + start * 1000),
        "nothing before the drift starts"
    );
    assert!(
        findings.iter().all(|f| f.metric == 1),
        "only the drifting sensor"
    );
}

#[test]
fn frozen_sensor_is_stuck() {
    let (start, end) = (1500, 1700);
    let mut frozen = None;
    let (findings, _) = run(1800, 5, |s, v| {
        if (start..end).contains(&s) {
            v[3] = *frozen.get_or_insert(v[3]);
        }
    });
    let stuck: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.kind == Kind::SensorStuck)
        .collect();
    assert!(!stuck.is_empty());
    assert!(stuck.iter().all(|f| f.metric == 3));
    let first = stuck[0].ts;
    assert!(first >= T0 + (start + 30) * 1000, "not before min_duration");
    assert!(first < T0 + (start + 60) * 1000);
    assert!(stuck.iter().all(|f| f.ts < T0 + end * 1000));
}

#[test]
fn out_of_range_value() {
    let (findings, _) = run(1600, 6, |s, v| {
        if s == 1550 {
            v[2] = 5000.0;
        }
    });
    let k = kinds(&findings);
    assert!(k.contains(&(Kind::SensorOutOfRange, 2)), "{k:?}");
    let f = findings
        .iter()
        .find(|f| f.kind == Kind::SensorOutOfRange)
        .unwrap();
    assert!(
        f.expected <= 1900.0,
        "expected is the crossed bound, {}",
        f.expected
    );
}

#[test]
fn anomalous_points_do_not_teach_the_baseline() {
    let attack = 1500..1520;
    let before = run(attack.start, 7, |_, _| {}).1;
    let (findings, after) = run(attack.end, 7, |s, v| {
        if attack.contains(&s) {
            v[1] += 40.0 * SIGMA[1];
        }
    });
    assert_eq!(
        findings
            .iter()
            .filter(|f| f.kind == Kind::SensorSpike)
            .count(),
        20,
        "every attacked reading is flagged"
    );
    let (b, a) = (
        &before.machine(0).unwrap().metrics[1],
        &after.machine(0).unwrap().metrics[1],
    );
    assert!(
        (a.predictor.sigma() - b.predictor.sigma()).abs() < 1e-12,
        "scale untouched"
    );
    assert_eq!(a.envelope.hi, b.envelope.hi, "envelope untouched");
    assert_eq!(
        a.drift.reference, b.drift.reference,
        "drift reference untouched"
    );
    assert!(
        (a.predictor.level - b.predictor.level).abs() < 3.0 * SIGMA[1],
        "level did not follow the attack"
    );
}

#[test]
fn a_persistent_new_level_is_rebased_not_alerted_forever() {
    // A sensor jumps to a new level and stays: alerted, then re-based after `rebase_after`.
    let (findings, _) = run(2400, 8, |s, v| {
        if s >= 1500 {
            v[3] += 30.0 * SIGMA[3];
        }
    });
    assert!(findings.iter().any(|f| f.ts < T0 + 1510 * 1000));
    let last = findings.iter().map(|f| f.ts).max().unwrap();
    assert!(
        last < T0 + 1700 * 1000,
        "still alerting {} s after the jump",
        (last - T0) / 1000 - 1500
    );
}

#[test]
fn future_dated_readings_are_scored_but_never_learned() {
    let mut d = Detectors::new(&config());
    let mut m = Machine::new(9);
    let mut out = Vec::new();
    for s in 0..1500i64 {
        let v = m.step(mode_at(s));
        let r: Vec<(u32, f64)> = v.iter().enumerate().map(|(i, x)| (i as u32, *x)).collect();
        d.observe(0, 0, T0 + s * 1000, true, &r, &mut out);
    }
    let level = d.machine(0).unwrap().metrics[0].predictor.level;
    let v = m.step(mode_at(1500));
    let r: Vec<(u32, f64)> = v
        .iter()
        .enumerate()
        .map(|(i, x)| (i as u32, if i == 0 { x + 30.0 } else { *x }))
        .collect();
    d.observe(0, 0, T0 + 3_600_000, false, &r, &mut out);
    assert!(
        out.iter()
            .any(|f| f.kind == Kind::SensorSpike && f.metric == 0),
        "scored"
    );
    assert_eq!(
        d.machine(0).unwrap().metrics[0].predictor.level,
        level,
        "not learned"
    );
}

/// Runs `seconds` of one machine through the learned multivariate model
/// (`[learn]` on); `tamper` may change readings.
fn run_learned(
    seconds: i64,
    seed: u64,
    tamper: impl FnMut(i64, &mut [f64; 4]),
) -> (Vec<Finding>, Learned) {
    let mut cfg = config();
    cfg.learn.enabled = true;
    let mut l = Learned::new(&cfg);
    let mut out = Vec::new();
    let names = |i: u32| ["temperature", "vibration", "speed", "current"][i as usize].to_string();
    drive(seconds, seed, tamper, |ts, r| {
        l.observe(0, "m", 0, ts, true, true, r, &names, &mut out)
    });
    (out, l)
}

#[test]
fn learned_model_keeps_quiet_through_mode_changes() {
    for seed in 1..=3 {
        let (findings, l) = run_learned(3 * 3600, seed, |_, _| {});
        let m = l.machine(0).unwrap();
        assert!(m.model.is_some(), "fitted after the warm-up");
        assert!(
            findings.is_empty(),
            "seed {seed}: {} multivariate findings on a clean series, first {:?}",
            findings.len(),
            findings.first()
        );
    }
}

#[test]
fn learned_model_catches_a_sensor_decoupled_from_the_load() {
    // At 2280 s the machine drops from full load to idle; from then on the
    // temperature is reported at its full-load level with its usual noise,
    // while current, speed and vibration fall: each alone looks normal.
    let (start, end) = (2280, 2280 + 360);
    for seed in 1..=3 {
        let mut frozen = None;
        let mut noise = Rng::new(seed + 100);
        let (findings, _) = run_learned(3000, seed, |s, v| {
            if (start..end).contains(&s) {
                let level = *frozen.get_or_insert(v[0]);
                v[0] = level + SIGMA[0] * noise.normal();
            }
        });
        assert!(
            findings.iter().all(|f| f.ts >= T0 + start * 1000),
            "seed {seed}: nothing before the attack, first {:?}",
            findings.first()
        );
        let caught: Vec<&Finding> = findings
            .iter()
            .filter(|f| f.kind == Kind::Multivariate && f.ts < T0 + end * 1000)
            .collect();
        let first = caught
            .first()
            .unwrap_or_else(|| panic!("seed {seed}: the decoupled temperature is not caught"));
        assert!(
            first.ts <= T0 + (start + 180) * 1000,
            "seed {seed}: caught within three minutes, not {} s in",
            (first.ts - T0) / 1000 - start
        );
        let twinwatch::detect::Detail::Multivariate { contributions, .. } = &first.detail else {
            panic!("multivariate findings carry contributions");
        };
        let total: f64 = contributions.iter().map(|c| c.1).sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "weights sum to 1: {contributions:?}"
        );
        assert_eq!(
            contributions[0].0, "temperature",
            "seed {seed}: the decoupled sensor leads the explanation: {contributions:?}"
        );
    }
}

#[test]
fn a_machine_holds_room_for_the_metrics_it_has() {
    let mut d = Detectors::new(&config());
    let mut out = Vec::new();
    // A machine's query features arrive together, once per window.
    let features: Vec<(u32, f64)> = (0..43).map(|k| (k, k as f64)).collect();
    d.observe(7, 0, T0, true, &features, &mut out);
    let m = d.machine(7).expect("the machine is known");
    assert_eq!((m.metrics.len(), m.metrics.capacity()), (43, 43));
    // Later ones: room for each group's new metrics, not a doubling.
    let more: Vec<(u32, f64)> = (0..45).map(|k| (k, 1.0)).collect();
    d.observe(7, 0, T0 + 10_000, true, &more, &mut out);
    let m = d.machine(7).expect("the machine is known");
    assert_eq!((m.metrics.len(), m.metrics.capacity()), (45, 45));
    // A sensor at a time still takes one slot each.
    d.observe(8, 0, T0, true, &[(1, 1.0)], &mut out);
    d.observe(8, 0, T0 + 1_000, true, &[(1, 1.0), (2, 2.0)], &mut out);
    let m = d.machine(8).expect("the machine is known");
    assert_eq!((m.metrics.len(), m.metrics.capacity()), (2, 2));
}

/// A reading is judged against its own sensor's baseline wherever it stands
/// in the message: the same series with its readings rotated message after
/// message, and with one sensor missing now and then, gives the same findings
/// as in a fixed order (the k-th reading is first looked for in slot k).
#[test]
fn readings_in_any_order_meet_their_own_baselines() {
    type Key = (i64, u32, Kind, u64, u64);
    let play = |rotate: bool| -> Vec<Key> {
        let mut d = Detectors::new(&config());
        let mut out = Vec::new();
        let tamper = |s: i64, v: &mut [f64; 4]| {
            if s == 1500 {
                v[2] += 40.0 * SIGMA[2];
            }
            if (2000..2200).contains(&s) {
                v[3] = 20.0;
            }
        };
        drive(2400, 11, tamper, |ts, r| {
            let s = (ts - T0) / 1000;
            let mut r: Vec<(u32, f64)> = r.to_vec();
            if s % 7 == 3 {
                r.remove(1);
            }
            if rotate {
                let n = r.len();
                r.rotate_left(s as usize % n);
            }
            d.observe(0, 0, ts, true, &r, &mut out);
        });
        let mut keys: Vec<Key> = out
            .iter()
            .map(|f| {
                (
                    f.ts,
                    f.metric,
                    f.kind,
                    f.value.to_bits(),
                    f.surprise.to_bits(),
                )
            })
            .collect();
        keys.sort();
        keys
    };
    let fixed = play(false);
    assert!(
        fixed.iter().any(|k| k.2 == Kind::SensorSpike && k.1 == 2),
        "the spike on sensor 2 is found: {fixed:?}"
    );
    assert!(
        fixed.iter().any(|k| k.1 == 3),
        "the tampered sensor 3 is found"
    );
    assert_eq!(play(true), fixed);
}
