//! The command line end to end: simulate → replay → scored alerts, the demo,
//! configuration errors and exit codes.

use std::path::Path;
use std::process::{Command, Output};

use twinwatch::alerts::Alert;
use twinwatch::eval::labels::score;
use twinwatch::score::Severity;
use twinwatch::sim::Label;

fn twinwatch(args: &[&str]) -> Output {
    twinwatch_logging(args, "warn")
}

/// `twinwatch` with its log at `level` (on standard error).
fn twinwatch_logging(args: &[&str], level: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twinwatch"))
        .args(args)
        .env("TWINWATCH_LOG", level)
        .output()
        .expect("running twinwatch")
}

fn ok(args: &[&str]) -> Output {
    let out = twinwatch(args);
    assert!(
        out.status.success(),
        "twinwatch {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The number after `prefix` on the last line of `stdout` (the closing line of an eval).
fn closing_figure(stdout: &str, prefix: &str) -> f64 {
    let last = stdout.lines().last().unwrap_or_default();
    last.strip_prefix(prefix)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("last line: {last}"))
}

fn read_alerts(path: &Path) -> Vec<Alert> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is an alert"))
        .collect()
}

fn simulate(dir: &Path, seed: u64, extra: &[&str]) -> (String, Vec<Label>) {
    let capture = dir.join(format!("sim-{seed}.ndjson"));
    let capture = capture.to_str().unwrap().to_string();
    let seed = seed.to_string();
    let mut args = vec!["simulate", "--seed", &seed, "--output", &capture];
    args.extend_from_slice(extra);
    ok(&args);
    let labels = std::fs::read_to_string(format!("{capture}.labels.json")).unwrap();
    (capture, serde_json::from_str(&labels).unwrap())
}

#[test]
fn replay_finds_the_simulated_incidents() {
    let dir = tempfile::tempdir().unwrap();
    let mut worst_recall: f64 = 1.0;
    let mut worst_false: f64 = 0.0;
    // Which alert kinds hit each incident type, over the seeds.
    let mut kinds: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for seed in [11, 12, 13] {
        let (capture, labels) = simulate(dir.path(), seed, &["--duration", "2h"]);
        let alerts_path = dir.path().join(format!("alerts-{seed}.ndjson"));
        ok(&[
            "replay",
            "--input",
            &capture,
            "--devices",
            &format!("{capture}.devices.toml"),
            "--output",
            alerts_path.to_str().unwrap(),
        ]);
        let alerts = read_alerts(&alerts_path);
        // 6 machines x (2 h - 10 min of learning).
        let result = score(&alerts, &labels, 6.0 * (2.0 - 10.0 / 60.0), 120_000);
        println!("seed {seed}: {}", result.report().replace('\n', "\n  "));
        assert!(result.incidents >= 15, "the simulation must hold incidents");
        worst_recall = worst_recall.min(result.recall());
        worst_false = worst_false.max(result.false_per_machine_hour());
        for (t, k) in &result.kinds_by_type {
            kinds
                .entry(t.clone())
                .or_default()
                .extend(k.keys().cloned());
        }
    }
    // Each attack seen is caught by the kind made for it.
    for (attack, kind) in [
        ("spoof", "unknown_device"),
        ("replay_seq", "sequence_replay"),
        ("replay_forged", "sequence_replay"),
        ("flood", "traffic_rate"),
        ("silence", "traffic_rate"),
        ("clock_skew", "clock_skew"),
        ("exfil", "flow_volume"),
        ("unauthorized_write", "flow_new_op"),
        ("scan", "flow_fanout"),
        ("bad_signature", "signature_invalid"),
    ] {
        if let Some(seen) = kinds.get(attack) {
            assert!(
                seen.contains(kind),
                "{attack} not caught as {kind}: {seen:?}"
            );
        }
    }
    assert!(
        kinds.len() >= 8,
        "the seeds hold most incident types: {kinds:?}"
    );
    println!(
        "worst recall {worst_recall:.3}, worst false alerts per machine-hour {worst_false:.3}"
    );
    assert!(worst_recall >= 0.9, "recall {worst_recall}");
    assert!(
        worst_false <= 1.0,
        "false alerts per machine-hour {worst_false}"
    );
}

#[test]
fn replay_is_deterministic_and_alerts_follow_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let (capture, _) = simulate(dir.path(), 21, &["--duration", "40m", "--machines", "4"]);
    let a = dir.path().join("a.ndjson");
    let b = dir.path().join("b.ndjson");
    ok(&[
        "replay",
        "--input",
        &capture,
        "--output",
        a.to_str().unwrap(),
    ]);
    ok(&["replay", "--input", &capture, "-o", b.to_str().unwrap()]);
    let (a, b) = (read_alerts(&a), read_alerts(&b));
    assert!(!a.is_empty());
    let ids = |v: &[Alert]| v.iter().map(|x| x.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b), "same input, same ids");
    for al in &a {
        assert_eq!(al.id.len(), 32);
        assert!((0.0..=1.0).contains(&al.score));
        assert_eq!(al.severity, Severity::from_score(al.score));
        assert!(!al.explanation.is_empty() && !al.detector.is_empty());
        assert!(
            al.subject()
                .starts_with(&format!("twin.alerts.{}.", al.severity.as_str()))
        );
        assert!(twinwatch::time::parse_rfc3339(&al.ts).is_some());
        assert!(twinwatch::time::parse_rfc3339(&al.emitted_at).is_some());
        let w: f64 = al.contributions.iter().map(|c| c.weight).sum();
        assert!((w - 1.0).abs() < 1e-9);
    }
    // The raw JSON carries the contract's field names.
    let line = std::fs::read_to_string(dir.path().join("a.ndjson")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    for key in [
        "id",
        "ts",
        "emitted_at",
        "machine",
        "kind",
        "score",
        "severity",
        "detector",
        "explanation",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
}

/// The shipped files read `readings` only through a group-by by machine,
/// window and metric, so a replay keeps its sums, not its rows: the alerts
/// are those of a replay that keeps the rows and leaves the group-by to
/// DataFusion, to the last bit of every score and value.
#[test]
fn readings_summed_as_they_arrive_give_the_alerts_of_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (capture, _) = simulate(dir.path(), 23, &["--duration", "40m", "--machines", "4"]);
    let rows_cfg = dir.path().join("rows.toml");
    std::fs::write(&rows_cfg, "[queries]\nown_group_by = false\n").unwrap();
    let replay = |out: &Path, extra: &[&str]| {
        let mut args = vec!["replay", "--input", &capture, "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let run = twinwatch_logging(&args, "info");
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let log = String::from_utf8_lossy(&run.stderr).to_string();
        let alerts: Vec<serde_json::Value> = std::fs::read_to_string(out)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("emitted_at");
                v
            })
            .collect();
        (log, alerts)
    };
    let (log, summed) = replay(&dir.path().join("sums.ndjson"), &[]);
    assert!(
        log.contains("readings of the next windows summed up as they arrive"),
        "{log}"
    );
    let (log, kept) = replay(
        &dir.path().join("rows.ndjson"),
        &["--config", rows_cfg.to_str().unwrap()],
    );
    assert!(!log.contains("summed up as they arrive"), "{log}");
    let from_stats = |a: &serde_json::Value| {
        a["contributions"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["feature"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("reading_stats:"))
            })
        })
    };
    assert!(
        summed.iter().any(from_stats),
        "some alerts come from reading_stats' features"
    );
    assert_eq!(summed, kept);
}

#[test]
fn a_plant_without_incidents_stays_quiet_through_its_mode_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (capture, labels) = simulate(dir.path(), 31, &["--duration", "2h", "--no-incidents"]);
    assert!(labels.is_empty());
    let out = ok(&["replay", "--input", &capture]);
    let alerts = String::from_utf8(out.stdout).unwrap();
    let n = alerts.lines().count();
    println!("{n} alerts over 11 protected machine-hours of mode changes and breaks");
    assert!(
        n <= 11,
        "at most one false alert per machine-hour: {alerts}"
    );
    let sensor_alerts = alerts
        .lines()
        .filter(|l| {
            !l.contains("\"feature\":\"reading_stats:")
                && !l.contains("\"feature\":\"messages:")
                && !l.contains("\"feature\":\"flows:")
        })
        .count();
    assert!(
        sensor_alerts <= 2,
        "the per-reading detectors stay quiet through mode changes: {alerts}"
    );
}

#[test]
fn malformed_lines_are_rejected_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("bad.ndjson");
    std::fs::write(
        &capture,
        concat!(
            "{\"ts\": 1795766400000, \"machine\": \"m\", \"readings\": {\"x\": 1}}\n",
            "this is not json\n",
            "{\"subject\": \"twin.telemetry.s.m\", \"payload\": {\"ts\": \"never\", \"readings\": {}}}\n",
            "\n",
            "{\"subject\": \"twin.flows.s.m\", \"payload\": [{\"ts\": 1795766400000, \"src\": \"a\", \"dst\": \"b\", \"bytes\": 1}]}\n",
        ),
    )
    .unwrap();
    let out = twinwatch(&["replay", "--input", capture.to_str().unwrap()]);
    assert!(out.status.success());
    let out = twinwatch_logging(&["replay", "--input", capture.to_str().unwrap()], "info");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("2 rejected (invalid_json 1, bad_timestamp 1)"),
        "{log}"
    );
}

#[test]
fn bad_configuration_exits_2_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("plant.toml");
    std::fs::write(
        &cfg,
        "[window]\nsize = \"10s\"\n[alerts]\ncooldwon = \"5m\"\n",
    )
    .unwrap();
    let out = twinwatch(&[
        "replay",
        "--input",
        "/nonexistent",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plant.toml:4:1") && err.contains("cooldwon"),
        "{err}"
    );

    std::fs::write(&cfg, "[alerts]\nmin_score = 7\n").unwrap();
    let out = twinwatch(&["config", "--check", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("alerts.min_score"));

    let out = twinwatch(&["replay"]);
    assert_eq!(out.status.code(), Some(2), "missing --input is bad usage");
}

#[test]
fn missing_input_is_a_runtime_failure_with_a_hint() {
    let out = twinwatch(&["replay", "--input", "/nonexistent/capture.ndjson"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/capture.ndjson"));
}

#[test]
fn printed_defaults_are_a_valid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&["config", "--print-defaults"]);
    let path = dir.path().join("defaults.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    ok(&["config", "--check", path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("[detect.mode]"));
}

#[test]
fn demo_runs_without_nats_and_summarises() {
    let out = ok(&[
        "demo",
        "--duration",
        "40m",
        "--speed",
        "max",
        "--machines",
        "3",
        "--seed",
        "5",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("twinwatch demo: 3 simulated machines"),
        "{text}"
    );
    assert!(text.contains("Summary"), "{text}");
    assert!(text.contains("recall"), "{text}");
    assert!(
        text.lines().any(|l| l.contains("sensor_")),
        "alerts are printed: {text}"
    );
}

#[test]
fn simulate_is_deterministic_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (ca, la) = simulate(&a, 4, &["--duration", "20m"]);
    let (cb, lb) = simulate(&b, 4, &["--duration", "20m"]);
    assert_eq!(std::fs::read(ca).unwrap(), std::fs::read(cb).unwrap());
    assert_eq!(la, lb);
}

#[test]
fn keygen_writes_a_private_seed_that_simulate_signs_with() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = ok(&[
        "devices",
        "keygen",
        "plc-01a",
        "--machine",
        "press-01",
        "--dir",
        keys.to_str().unwrap(),
    ]);
    let entry = String::from_utf8(out.stdout).unwrap();
    let reg = twinwatch::registry::Registry::parse(&entry, Path::new("entry")).unwrap();
    let e = reg.get("plc-01a").unwrap();
    assert!(e.serves("press-01") && e.require_signature);
    let pk = e.public_key.clone().unwrap();
    let seed_file = keys.join("plc-01a.nk");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&seed_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the seed is readable by its owner only");
    }
    // A second keygen does not overwrite the key.
    let again = twinwatch(&[
        "devices",
        "keygen",
        "plc-01a",
        "--dir",
        keys.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));
    // The simulator signs plc-01a with it, and its registry says so.
    let (capture, _) = simulate(
        dir.path(),
        5,
        &[
            "--duration",
            "20m",
            "--machines",
            "2",
            "--keys",
            keys.to_str().unwrap(),
        ],
    );
    let registry = std::fs::read_to_string(format!("{capture}.devices.toml")).unwrap();
    assert!(registry.contains(&pk), "{registry}");
    let alerts = dir.path().join("alerts.ndjson");
    ok(&[
        "replay",
        "--input",
        &capture,
        "--devices",
        &format!("{capture}.devices.toml"),
        "--output",
        alerts.to_str().unwrap(),
    ]);
    let bad: Vec<Alert> = read_alerts(&alerts)
        .into_iter()
        .filter(|a| a.kind.as_str() == "signature_invalid")
        .collect();
    assert!(bad.is_empty(), "every signature verifies: {bad:#?}");
    // Under another registry key, every message of plc-01a fails.
    let other = twinwatch::registry::device_key([5; 32]).public_key();
    let forged = dir.path().join("other.toml");
    std::fs::write(&forged, registry.replace(&pk, &other)).unwrap();
    ok(&[
        "replay",
        "--input",
        &capture,
        "--devices",
        forged.to_str().unwrap(),
        "--output",
        alerts.to_str().unwrap(),
    ]);
    let bad = read_alerts(&alerts)
        .into_iter()
        .filter(|a| a.kind.as_str() == "signature_invalid")
        .count();
    assert!(bad >= 1);
    let missing = twinwatch(&[
        "replay",
        "--input",
        &capture,
        "--devices",
        "/nonexistent/devices.toml",
    ]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn eval_skab_runs_the_protocol_on_a_skab_shaped_folder() {
    // One run shaped like SKAB's: 600 rows, an anomaly (flow drops, the rest
    // unchanged) over the last 100.
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("data").join("valve1");
    std::fs::create_dir_all(&v1).unwrap();
    let mut text = String::from(
        "datetime;Accelerometer1RMS;Current;Temperature;Volume Flow RateRMS;anomaly;changepoint\n",
    );
    let mut s: u64 = 99;
    let mut noise = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    for i in 0..600 {
        let anomalous = i >= 500;
        let flow = if anomalous { 26.0 } else { 32.0 } + noise();
        text.push_str(&format!(
            "2020-03-09 10:{:02}:{:02};{:.4};{:.3};{:.2};{:.2};{}.0;0.0\n",
            i / 60,
            i % 60,
            0.027 + 0.001 * noise(),
            1.3 + 0.05 * noise(),
            79.0 + 0.002 * i as f64 + 0.05 * noise(),
            flow,
            anomalous as u8
        ));
    }
    std::fs::write(v1.join("0.csv"), text).unwrap();
    let out = ok(&["eval", "skab", dir.path().to_str().unwrap()]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("| Conv-AE | 0.78 | 13.55 | 28.02 |"),
        "{stdout}"
    );
    let f1 = closing_figure(&stdout, "skab: F1 ");
    assert!(f1 > 0.9, "the flow drop is found: {stdout}");
    let missing = twinwatch(&["eval", "skab", "/nonexistent"]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn models_list_and_show_what_a_replay_learned() {
    let dir = tempfile::tempdir().unwrap();
    let (capture, _) = simulate(
        dir.path(),
        4,
        &["--duration", "25m", "--machines", "2", "--no-sign"],
    );
    let cfg = dir.path().join("learn.toml");
    std::fs::write(&cfg, "[learn]\nenabled = true\n").unwrap();
    let state = dir.path().join("state.json");
    let state = state.to_str().unwrap();
    ok(&[
        "replay",
        "--config",
        cfg.to_str().unwrap(),
        "--input",
        &capture,
        "--output",
        dir.path().join("a.ndjson").to_str().unwrap(),
        "--state",
        state,
    ]);
    let list = String::from_utf8(ok(&["models", "list", "--path", state]).stdout).unwrap();
    assert!(list.contains("2 machines"), "{list}");
    for m in ["press-01", "lathe-02"] {
        let line = list
            .lines()
            .find(|l| l.starts_with(m))
            .unwrap_or_else(|| panic!("{list}"));
        // Six sensors and their lagged averages.
        assert!(
            line.contains("protecting") && line.contains("12 features"),
            "{line}"
        );
    }
    let show = ok(&["models", "show", "press-01", "--path", state]).stdout;
    let v: serde_json::Value = serde_json::from_slice(&show).unwrap();
    assert_eq!(v["machine"], "press-01");
    assert_eq!(v["sensors"].as_array().unwrap().len(), 6);
    assert_eq!(v["devices"][0]["device"], "plc-01a");
    assert_eq!(v["multivariate"]["features"].as_array().unwrap().len(), 6);
    assert!(
        v["multivariate"]["model"]["models"][0]["limits"]["q"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Each machine's model is its own file beside the snapshot, saying what it holds.
    for m in ["press-01", "lathe-02"] {
        let file = dir.path().join(format!("{m}.model.json"));
        let f: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(f["machine"], m);
        assert_eq!(f["format_version"], 2);
        assert_eq!(f["features"].as_array().unwrap().len(), 6);
        assert_eq!(f["modes"], 1);
        assert!(
            f["training_window"]["from"].as_str().unwrap()
                < f["training_window"]["to"].as_str().unwrap()
        );
        assert!(f["created_at"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(
        twinwatch(&["models", "show", "nope", "--path", state])
            .status
            .code(),
        Some(2)
    );
    // A damaged snapshot is refused with a message, not a crash.
    std::fs::write(
        dir.path().join("bad.json"),
        "{\"format_version\": 1, \"pipel",
    )
    .unwrap();
    let bad = twinwatch(&[
        "models",
        "list",
        "--path",
        dir.path().join("bad.json").to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a twinwatch snapshot"));
}

#[test]
fn eval_nab_scores_a_nab_shaped_folder() {
    // One series of 400 rows with a step at row 300, labelled 290..=320.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data").join("synthetic")).unwrap();
    std::fs::create_dir_all(dir.path().join("labels")).unwrap();
    let mut text = String::from("timestamp,value\n");
    for i in 0..400 {
        let v = if i >= 300 { 80.0 } else { 50.0 } + ((i * 7919) % 13) as f64 * 0.1;
        text.push_str(&format!("2014-01-01 {:02}:{:02}:00,{v}\n", i / 60, i % 60));
    }
    std::fs::write(dir.path().join("data/synthetic/step.csv"), text).unwrap();
    std::fs::write(
        dir.path().join("labels/combined_windows.json"),
        r#"{"synthetic/step.csv": [["2014-01-01 04:50:00.000000", "2014-01-01 05:20:00.000000"]]}"#,
    )
    .unwrap();
    let out = ok(&["eval", "nab", dir.path().to_str().unwrap()]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("| ARTime | 74.9 | 65.1 | 80.4 |"),
        "{stdout}"
    );
    let standard = closing_figure(&stdout, "nab: standard ");
    assert!(standard > 90.0, "the step is caught early: {stdout}");
    let readings = ok(&[
        "eval",
        "nab",
        dir.path().to_str().unwrap(),
        "--detector",
        "readings",
    ]);
    let stdout = String::from_utf8(readings.stdout).unwrap();
    assert!(closing_figure(&stdout, "nab: standard ") > 90.0, "{stdout}");
    let bad = twinwatch(&[
        "eval",
        "nab",
        dir.path().to_str().unwrap(),
        "--detector",
        "magic",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(
        twinwatch(&["eval", "nab", "/nonexistent"]).status.code(),
        Some(2)
    );
}

#[test]
fn sim_keys_gives_every_simulated_device_a_key_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let keys = keys.to_str().unwrap();
    let first = ok(&["devices", "sim-keys", "--machines", "3", "--dir", keys]);
    let text = String::from_utf8(first.stdout).unwrap();
    let reg = twinwatch::registry::Registry::parse(&text, Path::new("sim")).unwrap();
    assert_eq!(reg.len(), 3, "{text}");
    // The simulator's signing devices (machines 01, 03, ...) must sign; the others may.
    for (device, signs) in [("plc-01a", true), ("plc-02a", false), ("plc-03a", true)] {
        let e = reg
            .get(device)
            .unwrap_or_else(|| panic!("{device} in {text}"));
        assert_eq!(e.require_signature, signs, "{device}");
        let seed = format!("{keys}/{device}.nk");
        let pubkey = ok(&["devices", "pubkey", &seed]);
        assert_eq!(
            String::from_utf8(pubkey.stdout).unwrap().trim(),
            e.public_key.as_deref().unwrap()
        );
    }
    // Run again: the seeds the devices hold stay, so does the registry.
    let second = ok(&["devices", "sim-keys", "--machines", "3", "--dir", keys]);
    assert_eq!(String::from_utf8(second.stdout).unwrap(), text);
    assert!(String::from_utf8_lossy(&second.stderr).contains("0 new seeds"));
    // A file that holds no seed is bad usage, named.
    let junk = dir.path().join("junk.nk");
    std::fs::write(&junk, "not a seed\n").unwrap();
    let bad = twinwatch(&["devices", "pubkey", junk.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("junk.nk"));
    // Logging in as the devices needs their seeds.
    let no_keys = twinwatch(&[
        "simulate",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--device-users",
        "--machines",
        "2",
    ]);
    assert_eq!(no_keys.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_keys.stderr).contains("--keys"));
}
