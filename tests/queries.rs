//! Query files: the default queries on a hand-built window with known answers,
//! rules through replay, hot reload (good edit, bad edit, removal), the check
//! and explain commands, and queries that fail at run time.

use std::path::Path;
use std::process::Command;

use twinwatch::config::Config;
use twinwatch::features::{FeatureRow, Queries, RunOutput};
use twinwatch::pipeline::Pipeline;
use twinwatch::score::Severity;
use twinwatch::source::Envelope;
use twinwatch::window::ClosedWindows;

const T0: i64 = 1_795_766_400_000; // a window boundary

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One window of machine `press-1`: three messages from two devices (a sequence gap of 2),
/// and flows including a Modbus write from an unexpected host.
fn window() -> ClosedWindows {
    window_through(Pipeline::new(&Config::default()))
}

/// [`window`], through the pipeline `p`.
fn window_through(mut p: Pipeline) -> ClosedWindows {
    let t = |ms: i64, device: &str, seq: u64, x: f64| {
        Envelope::new(
            "twin.telemetry.s.press-1",
            Some(T0 + ms),
            format!(
                r#"{{"ts": {}, "device": "{device}", "seq": {seq}, "readings": {{"x": {x}, "y": null}}}}"#,
                T0 + ms
            ),
        )
    };
    let flows = Envelope::new(
        "twin.flows.s.press-1",
        Some(T0 + 500),
        format!(
            r#"[{{"ts": {t}, "src": "10.0.0.5", "dst": "10.0.1.1", "dst_port": 502, "app": "modbus", "op": "read_holding_registers", "bytes": 100, "packets": 2}},
                {{"ts": {t}, "src": "10.0.0.5", "dst": "10.0.1.2", "dst_port": 502, "app": "modbus", "op": "read_holding_registers", "bytes": 300, "packets": 4}},
                {{"ts": {t}, "src": "10.0.0.5", "dst": "10.0.1.2", "dst_port": 4840, "bytes": 50}},
                {{"ts": {t}, "src": "10.9.9.9", "dst": "10.0.1.1", "dst_port": 502, "app": "modbus", "op": "write_single_register", "bytes": 120, "packets": 2}}]"#,
            t = T0 + 500
        ),
    );
    let batch = vec![
        t(0, "d1", 1, 1.0),
        t(1000, "d1", 2, 2.0),
        t(2000, "d1", 5, 3.0),
        t(3000, "d2", 9, 6.0),
        flows,
    ];
    let out = p.process(&batch, 0);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    p.finish().closed.expect("the window closes at the end")
}

fn feature(out: &RunOutput, name: &str) -> f64 {
    let rows: Vec<&FeatureRow> = out
        .features
        .iter()
        .filter(|f| out.feature(f) == name)
        .collect();
    assert_eq!(
        rows.len(),
        1,
        "{name}: {:?}",
        out.features
            .iter()
            .map(|f| out.feature(f))
            .collect::<Vec<_>>()
    );
    assert_eq!(out.machine(rows[0]), "press-1");
    assert_eq!(rows[0].ts, T0, "features carry their window's start");
    rows[0].value
}

#[test]
fn default_queries_give_known_answers() {
    let w = window();
    let out = rt().block_on(async {
        let mut q = Queries::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("queries"));
        let refused = q.reload().await;
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(q.active().len(), 4);
        q.run(&w).await
    });
    assert!(out.failures.is_empty(), "{:?}", out.failures);
    // reading_stats.sql: x = 1, 2, 3, 6; y is always null.
    assert_eq!(feature(&out, "reading_stats:x.mean"), 3.0);
    assert!((feature(&out, "reading_stats:x.std") - 3.5f64.sqrt()).abs() < 1e-12);
    assert_eq!(feature(&out, "reading_stats:x.min"), 1.0);
    assert_eq!(feature(&out, "reading_stats:x.max"), 6.0);
    assert_eq!(feature(&out, "reading_stats:x.count"), 4.0);
    assert!(
        !out.features
            .iter()
            .any(|f| out.feature(f).starts_with("reading_stats:y"))
    );
    // messages.sql
    assert_eq!(feature(&out, "messages:messages"), 4.0);
    assert_eq!(feature(&out, "messages:devices"), 2.0);
    assert_eq!(feature(&out, "messages:seq_gaps"), 2.0, "d1 sent 1, 2, 5");
    assert!(
        out.features
            .iter()
            .all(|f| out.feature(f) != "messages:bytes")
    );
    // flows.sql
    assert_eq!(feature(&out, "flows:bytes"), 570.0);
    assert_eq!(
        feature(&out, "flows:packets"),
        8.0,
        "missing packet counts count as 0"
    );
    assert_eq!(feature(&out, "flows:records"), 4.0);
    assert_eq!(feature(&out, "flows:write_ops"), 1.0);
    assert_eq!(feature(&out, "flows:max_destinations_per_source"), 2.0);
    assert_eq!(feature(&out, "flows:max_ports_per_source"), 2.0);
    assert_eq!(feature(&out, "flows:max_bytes_to_one_peer"), 350.0);
    // modbus_writes.sql: the write from 10.9.9.9.
    assert_eq!(out.rules.len(), 1, "{:?}", out.rules);
    let r = &out.rules[0];
    assert_eq!(
        (r.machine.as_str(), r.severity, r.value),
        ("press-1", Severity::High, Some(1.0))
    );
    assert!(r.explanation.as_deref().unwrap().contains("10.9.9.9"));
}

#[test]
fn planned_ahead_the_windows_keep_from_the_first_row_only_what_the_files_read() {
    let mut cfg = Config::default();
    cfg.queries.dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("queries")
        .display()
        .to_string();
    let summed = |w: &ClosedWindows| -> u64 {
        w.groups
            .iter()
            .flat_map(|g| &g.groups)
            .map(|g| g.acc.rows)
            .sum()
    };
    // Before any run has answered, the windows know nothing of the files:
    // every reading waits as a row, with every column.
    let unplanned = window();
    assert_eq!(unplanned.readings.num_rows(), 8, "x and y of four messages");
    assert_eq!(summed(&unplanned), 0);
    // Planned before the first batch: the shipped files only group readings
    // by machine and window, so none waits as a row, and of the messages
    // only what messages.sql reads is kept.
    let mut p = Pipeline::new(&cfg);
    let mut stage = twinwatch::features::FeatureStage::new(&cfg.queries);
    rt().block_on(p.plan_queries(&mut stage));
    let planned = window_through(p);
    assert_eq!(planned.readings.num_rows(), 0, "no reading kept as a row");
    assert_eq!(summed(&planned), 4, "x's four values summed (y is null)");
    let receipts = |w: &ClosedWindows| -> Vec<i64> {
        w.messages
            .parts
            .iter()
            .flat_map(|b| {
                b.column_by_name("received_at")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<arrow::array::TimestampMillisecondArray>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect()
    };
    assert!(receipts(&unplanned).iter().all(|&t| t > 0));
    assert!(
        receipts(&planned).iter().all(|&t| t == 0),
        "received_at is read by no file: zeros, not kept"
    );
    // The files answer the same either way.
    let answers = |w: &ClosedWindows| {
        let out = rt().block_on(async {
            let mut q = Queries::new(&cfg.queries.dir);
            assert!(q.reload().await.is_empty());
            q.run(w).await
        });
        assert!(out.failures.is_empty(), "{:?}", out.failures);
        let mut rows: Vec<(String, u64)> = out
            .features
            .iter()
            .map(|f| (out.feature(f).to_string(), f.value.to_bits()))
            .collect();
        rows.sort();
        (rows, out.rules.len())
    };
    let (a, b) = (answers(&unplanned), answers(&planned));
    assert!(a.0.len() > 10, "{a:?}");
    assert_eq!(a, b);
}

/// The files of `dir` (all of which plan) run once over [`window`].
fn run_dir(dir: &Path) -> RunOutput {
    let w = window();
    rt().block_on(async {
        let mut q = Queries::new(dir);
        assert!(q.reload().await.is_empty());
        q.run(&w).await
    })
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn hot_reload_good_edit_bad_edit_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let w = window();
    rt().block_on(async {
        let mut q = Queries::new(dir.path());
        assert!(q.reload().await.is_empty());
        assert!(q.run(&w).await.features.is_empty(), "no files, no features");

        write(dir.path(), "f.sql", "-- twinwatch: features\nSELECT machine, window_start, count(*) AS n FROM readings GROUP BY machine, window_start\n");
        assert!(q.reload().await.is_empty());
        assert_eq!(q.run(&w).await.features.len(), 1);

        // A good edit takes effect at the next run.
        write(dir.path(), "f.sql", "-- twinwatch: features\nSELECT machine, window_start, count(*) AS n, max(value) AS top FROM readings GROUP BY machine, window_start\n");
        q.reload().await;
        let out = q.run(&w).await;
        assert!(out.features.iter().any(|f| out.feature(f) == "f:top" && f.value == 6.0));

        // A bad edit is refused with file, line and column; the previous version stays.
        write(dir.path(), "f.sql", "-- twinwatch: features\nSELECT machine,\n       window_start,\n       count(*) AS n FROM readingz GROUP BY machine\n");
        let refused = q.reload().await;
        assert_eq!(refused.len(), 1);
        let e = &refused[0];
        assert_eq!(e.file, "f.sql");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.column > 1, "{e}");
        assert!(e.message.contains("readingz"), "{e}");
        assert_eq!(q.refusals, 1);
        assert!(q.reload().await.is_empty(), "a refused version is reported once");
        let out = q.run(&w).await;
        assert!(out.features.iter().any(|f| out.feature(f) == "f:top"), "old version still active");

        // Removal.
        std::fs::remove_file(dir.path().join("f.sql")).unwrap();
        q.reload().await;
        assert!(q.active().is_empty());
        assert!(q.run(&w).await.features.is_empty());
    });
}

#[test]
fn a_file_that_fails_after_some_rows_gives_none() {
    // Results stream a batch at a time: the window's first part is taken
    // before the second (its values past 50) makes the cast fail. The file
    // then gives no rows, as when its result was collected whole first.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "half.sql",
        "-- twinwatch: features\nSELECT machine, CAST(CASE WHEN value > 50 THEN 'x' ELSE '1' END AS DOUBLE) AS a FROM readings\n",
    );
    write(
        dir.path(),
        "good.sql",
        "-- twinwatch: features\nSELECT machine, count(*) AS n FROM readings GROUP BY machine\n",
    );
    let mut w = window();
    let first = w.readings.parts[0].clone();
    let at = first.schema().index_of("value").unwrap();
    let mut cols = first.columns().to_vec();
    cols[at] = std::sync::Arc::new(arrow::array::Float64Array::from(vec![
        100.0;
        first.num_rows()
    ]));
    let second = arrow::record_batch::RecordBatch::try_new(first.schema(), cols).unwrap();
    w.readings.parts.push(second);
    let (half, out) = rt().block_on(async {
        let mut q = Queries::new(dir.path());
        assert!(q.reload().await.is_empty());
        let mut w1 = w.clone();
        w1.readings.parts.truncate(1);
        (q.run(&w1).await, q.run(&w).await)
    });
    assert!(half.failures.is_empty(), "{:?}", half.failures);
    assert!(
        half.features.iter().any(|f| half.feature(f) == "half:a"),
        "the first part alone gives rows"
    );
    let failed: Vec<&str> = out.failures.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(failed, ["half.sql"], "{:?}", out.failures);
    assert!(
        !out.features.iter().any(|f| out.feature(f) == "half:a"),
        "no row of the failed file"
    );
    let good: Vec<f64> = out
        .features
        .iter()
        .filter(|f| out.feature(f) == "good:n")
        .map(|f| f.value)
        .collect();
    assert_eq!(good, [16.0], "the other file's rows stand");
}

#[test]
fn runtime_failures_do_not_stop_the_other_files() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bad.sql",
        "-- twinwatch: features\nSELECT machine, CAST(metric AS INT) AS m FROM readings\n",
    );
    write(
        dir.path(),
        "div.sql",
        "-- twinwatch: features\nSELECT machine, 1.0 / (count(*) - count(*)) AS inf, 1 / (count(*) - count(*)) AS z FROM readings GROUP BY machine\n",
    );
    write(
        dir.path(),
        "nulls.sql",
        "-- twinwatch: features\nSELECT machine, avg(value) FILTER (WHERE metric = 'nope') AS none, count(*) AS n FROM readings GROUP BY machine\n",
    );
    write(
        dir.path(),
        "rule.sql",
        "-- twinwatch: rule severity=low\nSELECT machine, 'seen' AS explanation FROM readings GROUP BY machine\n",
    );
    let out = run_dir(dir.path());
    let failed: Vec<&str> = out.failures.iter().map(|(f, _)| f.as_str()).collect();
    assert!(failed.contains(&"bad.sql"), "{:?}", out.failures);
    assert!(
        out.features.iter().any(|f| out.feature(f) == "nulls:n"),
        "NULL features are skipped, others kept"
    );
    assert!(!out.features.iter().any(|f| out.feature(f) == "nulls:none"));
    assert!(
        !out.features.iter().any(|f| out.feature(f) == "div:inf"),
        "non-finite values are skipped"
    );
    assert_eq!(out.rules.len(), 1);
    assert_eq!(out.rules[0].severity, Severity::Low);
}

#[test]
fn refusals_at_plan_time() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "no_header.sql",
        "SELECT machine, 1 AS x FROM readings\n",
    );
    write(
        dir.path(),
        "no_machine.sql",
        "-- twinwatch: features\nSELECT count(*) AS n FROM readings\n",
    );
    write(
        dir.path(),
        "ddl.sql",
        "-- twinwatch: features\nCREATE TABLE t AS SELECT machine, 1 AS x FROM readings\n",
    );
    write(
        dir.path(),
        "syntax.sql",
        "-- twinwatch: rule severity=high\nSELECT machine FROM readings WHERE\n",
    );
    let errors = rt().block_on(Queries::check_dir(dir.path())).unwrap_err();
    let by_file = |f: &str| {
        errors
            .iter()
            .find(|e| e.file == f)
            .unwrap_or_else(|| panic!("{f} not refused: {errors:?}"))
    };
    assert!(by_file("no_header.sql").message.contains("first line"));
    assert!(by_file("no_machine.sql").message.contains("machine"));
    assert!(by_file("ddl.sql").message.contains("only queries"));
    assert_eq!(by_file("syntax.sql").line, 2, "{:?}", by_file("syntax.sql"));
}

fn twinwatch(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_twinwatch"))
        .args(args)
        .env("TWINWATCH_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn check_and_explain_commands() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
    let out = twinwatch(&["queries", "check", shipped.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4);

    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "ok.sql",
        "-- twinwatch: features\nSELECT machine, count(*) AS n FROM messages GROUP BY machine\n",
    );
    write(
        dir.path(),
        "bad.sql",
        "-- twinwatch: features\n\nSELECT machine, nosuch FROM readings\n",
    );
    let out = twinwatch(&["queries", "check", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:3:", dir.path().join("bad.sql").display());
    assert!(err.contains(&expected) && err.contains("nosuch"), "{err}");

    let out = twinwatch(&[
        "queries",
        "explain",
        shipped.join("messages.sql").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("messages.sql: features"), "{text}");
    assert!(
        text.contains("seq_gaps") && text.contains("plan:"),
        "{text}"
    );
    let out = twinwatch(&[
        "queries",
        "explain",
        shipped.join("modbus_writes.sql").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("severity high"));
    // Which group-bys twinwatch computes itself: reading_stats' one; none of messages'.
    let own = "group-bys over readings computed by twinwatch on name keys: 1";
    assert!(!text.contains("computed by twinwatch"), "{text}");
    let out = twinwatch(&[
        "queries",
        "explain",
        shipped.join("reading_stats.sql").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(own), "{text}");
    assert!(
        text.contains("each keyed by machine and window: summed up as readings arrive"),
        "{text}"
    );
}

#[test]
fn a_rule_file_fires_through_replay() {
    let dir = tempfile::tempdir().unwrap();
    let qdir = dir.path().join("q");
    std::fs::create_dir(&qdir).unwrap();
    write(
        &qdir,
        "hot.sql",
        "-- twinwatch: rule severity=critical\nSELECT machine, window_start, max(value) AS value, 'temperature over 95' AS explanation\nFROM readings WHERE metric = 'temperature_c' AND value > 95 GROUP BY machine, window_start\n",
    );
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, format!("[queries]\ndir = \"{}\"\n", qdir.display())).unwrap();
    let capture = dir.path().join("in.ndjson");
    let mut lines = String::new();
    for s in 0..30i64 {
        let t = if s == 25 { 99.5 } else { 70.0 };
        lines.push_str(&format!(
            "{{\"subject\":\"twin.telemetry.s.oven-1\",\"payload\":{{\"ts\":{},\"readings\":{{\"temperature_c\":{t}}}}}}}\n",
            T0 + s * 1000
        ));
    }
    std::fs::write(&capture, lines).unwrap();
    let out = twinwatch(&[
        "replay",
        "--input",
        capture.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alerts: Vec<twinwatch::alerts::Alert> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rules: Vec<_> = alerts
        .iter()
        .filter(|a| a.kind == twinwatch::detect::Kind::Rule)
        .collect();
    assert_eq!(rules.len(), 1, "{alerts:?}");
    let a = rules[0];
    assert_eq!(a.severity, Severity::Critical);
    assert_eq!(a.machine, "oven-1");
    assert_eq!(a.feature.as_deref(), Some("hot.sql"));
    assert_eq!(a.value, Some(99.5));
    assert_eq!(a.explanation, "temperature over 95");
    assert_eq!(
        a.ts,
        twinwatch::time::format_rfc3339(T0 + 20_000),
        "the rule row's window start"
    );
    assert_eq!(a.subject(), "twin.alerts.critical.oven-1");
}

#[test]
fn run_output_comes_sorted_for_the_pipeline() {
    // Two machines and two windows, handed over in the reverse of event order.
    let mut p = Pipeline::new(&Config::default());
    let msg = |m: &str, ms: i64, x: f64| {
        Envelope::new(
            format!("twin.telemetry.s.{m}"),
            Some(T0 + ms),
            format!(
                r#"{{"ts": {}, "readings": {{"x": {x}, "y": {x}}}}}"#,
                T0 + ms
            ),
        )
    };
    p.process(&[msg("b", 10_500, 1.0), msg("a", 10_500, 2.0)], 0);
    p.process(&[msg("b", 500, 3.0), msg("a", 500, 4.0)], 0);
    let w = p.finish().closed.expect("windows close at the end");
    let out = rt().block_on(async {
        let mut q = Queries::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("queries"));
        assert!(q.reload().await.is_empty());
        q.run(&w).await
    });
    let keys: Vec<(i64, &str, &str)> = out
        .features
        .iter()
        .map(|f| (f.ts, out.machine(f), out.feature(f)))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(keys.first().map(|k| (k.0, k.1)), Some((T0, "a")));
    assert_eq!(keys.last().map(|k| (k.0, k.1)), Some((T0 + 10_000, "b")));
}

/// A configuration whose query folder holds one file, every handed-over set
/// of windows due at once (the folder lives as long as the guard).
fn one_file(name: &str, sql: &str) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), name, sql);
    let mut cfg = Config::default();
    cfg.queries.dir = dir.path().display().to_string();
    cfg.queries.every = 0;
    (dir, cfg)
}

#[test]
fn the_background_stage_answers_every_run_in_order() {
    let (_dir, cfg) = one_file(
        "rows.sql",
        "-- twinwatch: features\nSELECT machine, window_start, 'n' AS feature, CAST(count(*) AS DOUBLE) AS value FROM readings GROUP BY machine, window_start",
    );
    rt().block_on(async {
        let mut stage = twinwatch::features::FeatureStage::new(&cfg.queries)
            .spawn(twinwatch::features::WhenBehind::Wait);
        assert!(stage.next().await.is_none(), "nothing in flight: no wait");
        let mut p = Pipeline::new(&cfg);
        let mut sizes = Vec::new();
        for (k, n) in [3usize, 1, 2].into_iter().enumerate() {
            let base = T0 + k as i64 * 100_000;
            let batch: Vec<Envelope> = (0..n)
                .map(|i| {
                    Envelope::new(
                        "twin.telemetry.s.m",
                        Some(base + i as i64),
                        format!(r#"{{"ts": {}, "readings": {{"x": 1}}}}"#, base + i as i64),
                    )
                })
                .collect();
            p.process(&batch, 0);
            // The previous window closes when this one opens; the last one at the end.
            stage.offer(p.finish().closed, false).await;
            sizes.push(n as f64);
        }
        // Whatever was folded while the stage was busy goes now, as at the end of a run.
        stage.offer(None, true).await;
        let mut got = Vec::new();
        while let Some(run) = stage.next().await {
            got.extend(run.features.iter().map(|f| f.value));
        }
        assert_eq!(
            got, sizes,
            "every window answered, in the order handed over"
        );
        assert_eq!(stage.in_flight(), 0);
        assert!(stage.runs >= 1);
    });
}

#[test]
fn a_file_reading_window_end_sees_it_once_the_windows_keep_only_what_is_read() {
    let (_dir, cfg) = one_file(
        "ends.sql",
        "-- twinwatch: features\nSELECT machine, window_start, 'length' AS feature, CAST(max(CAST(window_end AS BIGINT)) - min(CAST(window_start AS BIGINT)) AS DOUBLE) AS value FROM readings GROUP BY machine, window_start",
    );
    let mut p = Pipeline::new(&cfg);
    let mut stage = twinwatch::features::FeatureStage::new(&cfg.queries);
    let mut lengths = Vec::new();
    // After the first run the windows keep only the columns the file reads,
    // `window_end` among them (unread, it would be zeros).
    for k in 0..3i64 {
        let base = T0 + k * 100_000;
        let batch: Vec<Envelope> = (0..3)
            .map(|i| {
                let ts = base + i * 1000;
                Envelope::new(
                    "twin.telemetry.s.m",
                    Some(ts),
                    format!(r#"{{"ts": {ts}, "readings": {{"x": 1}}}}"#),
                )
            })
            .collect();
        p.process(&batch, 0);
        stage.offer(p.finish().closed);
        let run = rt().block_on(stage.run()).expect("a window closed");
        assert!(run.failures.is_empty(), "{:?}", run.failures);
        assert!(run.columns_read["readings"].contains("window_end"));
        p.observe_features(&run, 0);
        lengths.extend(run.features.iter().map(|f| f.value));
    }
    assert_eq!(lengths, vec![10_000.0; 3], "window_end - window_start");
}

#[test]
fn without_query_files_no_rows_wait_in_windows() {
    let mut cfg = Config::default();
    cfg.queries.enabled = false;
    let mut p = Pipeline::new(&cfg);
    for s in 0..30 {
        let e = Envelope::new(
            "twin.telemetry.s.m",
            Some(T0 + s * 1000),
            format!(r#"{{"ts": {}, "readings": {{"x": 1}}}}"#, T0 + s * 1000),
        );
        assert!(p.process(&[e], 0).closed.is_none());
    }
    assert!(p.finish().closed.is_none());
    assert_eq!(p.stats().readings, 30, "every reading was still judged");
}

#[test]
fn the_columns_the_files_read_are_known() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["reading_stats.sql", "messages.sql"] {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("queries")
                .join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    let cols = rt().block_on(async {
        let mut q = Queries::new(dir.path());
        assert!(q.reload().await.is_empty());
        let shipped = q.columns_read();
        std::fs::write(
            dir.path().join("all.sql"),
            "-- twinwatch: features\nSELECT machine, window_start, count(*) AS n FROM (SELECT * FROM flows) GROUP BY machine, window_start\n",
        )
        .unwrap();
        assert!(q.reload().await.is_empty());
        (shipped, q.columns_read())
    });
    let (shipped, with_star) = cols;
    let names = |t: &str| shipped[t].iter().map(String::as_str).collect::<Vec<_>>();
    for c in ["machine", "metric", "value", "window_start"] {
        assert!(
            names("readings").contains(&c),
            "{c}: {:?}",
            names("readings")
        );
    }
    assert!(
        !names("readings").contains(&"subject"),
        "{:?}",
        names("readings")
    );
    assert!(!names("readings").contains(&"received_at"));
    for c in ["machine", "device", "seq", "window_start"] {
        assert!(
            names("messages").contains(&c),
            "{c}: {:?}",
            names("messages")
        );
    }
    assert!(names("flows").is_empty(), "no file reads flows");
    // A file that reads what it does not name (a star) keeps what it reads.
    assert!(with_star["flows"].contains("machine"));
    assert!(with_star["flows"].contains("window_start"));
}

#[test]
fn name_columns_are_text_to_sql_whether_read_or_not() {
    // Device, metric and subject are read (as string views on the query
    // side); `machine` is grouped on; the flows table's names stay plain text.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "names.sql",
        "-- twinwatch: features\nSELECT machine, window_start, device || '/' || metric || '@' || split_part(subject, '.', 3) AS feature, sum(value) AS value\nFROM readings WHERE value IS NOT NULL\nGROUP BY machine, window_start, device, metric, subject\n",
    );
    // Reads no name but `machine`: the other name columns are placeholders.
    write(
        dir.path(),
        "count.sql",
        "-- twinwatch: features\nSELECT machine, window_start, count(*) AS n, count(DISTINCT machine) AS machines FROM messages GROUP BY machine, window_start\n",
    );
    let w = window();
    rt().block_on(async {
        let mut q = Queries::new(dir.path());
        assert!(q.reload().await.is_empty());
        let out = q.run(&w).await;
        assert!(out.failures.is_empty(), "{:?}", out.failures);
        let mut got: Vec<(String, String, f64)> = out
            .features
            .iter()
            .map(|f| {
                (
                    out.machine(f).to_string(),
                    out.feature(f).to_string(),
                    f.value,
                )
            })
            .collect();
        got.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let row = |f: &str, v: f64| ("press-1".to_string(), f.to_string(), v);
        assert_eq!(
            got,
            vec![
                row("count:machines", 1.0),
                row("count:n", 4.0),
                row("names:d1/x@s", 6.0),
                row("names:d2/x@s", 6.0),
            ]
        );
    });
}

/// The query thread runs at nice 10: a run must not take the CPU the ingest
/// loop (and its alert latency) needs.
#[cfg(target_os = "linux")]
#[test]
fn the_query_thread_gives_way_to_the_ingest_loop() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.queries.dir = dir.path().display().to_string();
    let _stage = rt().block_on(async {
        twinwatch::features::FeatureStage::new(&cfg.queries)
            .spawn(twinwatch::features::WhenBehind::Wait)
    });
    let nice_of_query_threads = || -> Vec<i64> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() != "twinwatch-queri" {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the parenthesised name: state is the 3rd field, nice the 19th.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            out.push(rest.split(' ').nth(16).unwrap().parse().unwrap());
        }
        out
    };
    let mut nice = nice_of_query_threads();
    for _ in 0..100 {
        if !nice.is_empty() && nice.iter().all(|&n| n == 10) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        nice = nice_of_query_threads();
    }
    assert!(!nice.is_empty(), "a query thread runs");
    assert!(nice.iter().all(|&n| n == 10), "nice values {nice:?}");
}

#[test]
fn a_run_makes_room_for_as_many_feature_rows_as_the_last_run_gave() {
    // Results are taken as they stream, so a run cannot count its rows before
    // it takes them: it makes room for as many as the last run gave (windows
    // of a plant are alike), and a run like the last never grows its vector.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("queries/reading_stats.sql"),
        dir.path().join("reading_stats.sql"),
    )
    .unwrap();
    write(
        dir.path(),
        "wide.sql",
        "-- twinwatch: features\nSELECT machine, window_start, 1.0 AS a, 2.0 AS b FROM readings GROUP BY machine, window_start\n",
    );
    let w = window();
    let (first, second) = rt().block_on(async {
        let mut q = Queries::new(dir.path());
        assert!(q.reload().await.is_empty());
        (q.run(&w).await, q.run(&w).await)
    });
    for out in [&first, &second] {
        assert!(out.failures.is_empty(), "{:?}", out.failures);
        // x's five statistics (y is never valued) and the wide file's two features.
        assert_eq!(out.features.len(), 7);
        assert_eq!(feature(out, "wide:b"), 2.0);
    }
    assert_eq!(
        second.features.capacity(),
        7,
        "room made once, exactly the rows of the run before"
    );
}

/// Query runs of 40 machines × 6 features a window (and a rule row each
/// window), with a jump on one machine's feature late on.
fn synthetic_runs() -> Vec<RunOutput> {
    use std::sync::Arc;
    let machines: Vec<Arc<str>> = (0..40).map(|m| Arc::from(format!("m-{m:02}"))).collect();
    let features: Vec<Arc<str>> = (0..6).map(|k| Arc::from(format!("f.sql:x{k}"))).collect();
    (0..120i64)
        .map(|w| {
            let ts = T0 + w * 10_000;
            let mut rows = Vec::new();
            for m in 0..machines.len() as u32 {
                for k in 0..features.len() as u32 {
                    let noise = ((w * 7919 + i64::from(m * 31 + k)) % 97) as f64 * 0.01;
                    let jump = if w >= 100 && m == 7 && k == 2 {
                        50.0
                    } else {
                        0.0
                    };
                    rows.push(FeatureRow {
                        machine: m,
                        feature: k,
                        value: 10.0 * f64::from(k) + noise + jump,
                        ts,
                    });
                }
            }
            RunOutput {
                features: rows,
                names: twinwatch::features::RunNames {
                    machines: machines.clone(),
                    features: features.clone(),
                },
                rules: vec![twinwatch::features::RuleRow {
                    file: "r.sql".into(),
                    severity: Severity::High,
                    machine: format!("m-{:02}", w % 40),
                    value: Some(w as f64),
                    score: None,
                    explanation: Some(format!("window {w}")),
                    ts,
                }],
                ..RunOutput::default()
            }
        })
        .collect()
}

/// Every run observed in parts of `budget` rows (`None`: each run whole);
/// the alerts as JSON and the feature baselines afterwards.
fn observe_in_parts(runs: &[RunOutput], budget: Option<usize>) -> (Vec<String>, String) {
    let mut cfg = Config::default();
    cfg.baseline.warmup = 300_000;
    let mut p = Pipeline::new(&cfg);
    let mut alerts = Vec::new();
    for run in runs {
        let got = match budget {
            None => p.observe_features(run, 0),
            Some(b) => {
                let mut cursor = twinwatch::pipeline::FeatureCursor::new(run);
                let mut got = Vec::new();
                while !cursor.done() {
                    let left = cursor.left(run);
                    got.extend(p.observe_features_part(run, &mut cursor, b, 0));
                    assert!(
                        cursor.left(run) < left || cursor.done(),
                        "each part takes a row, or the rules at the end"
                    );
                }
                got
            }
        };
        alerts.extend(got.iter().map(|a| serde_json::to_string(a).unwrap()));
    }
    let snapshot = p.snapshot();
    let baselines = serde_json::to_string(&snapshot.feature_detectors).unwrap();
    (alerts, baselines)
}

#[test]
fn a_run_observed_in_parts_gives_what_it_gives_whole() {
    let runs = synthetic_runs();
    let (whole, baselines) = observe_in_parts(&runs, None);
    assert!(
        whole.iter().any(|a| a.contains("m-07") && a.contains("x2")),
        "the jump on m-07's x2 is an alert: {whole:?}"
    );
    assert!(
        whole.iter().any(|a| a.contains("window ")),
        "rule rows are alerts"
    );
    for budget in [1, 5, 6, 7, 100, 239, 240, 10_000] {
        let (parts, b) = observe_in_parts(&runs, Some(budget));
        assert_eq!(parts, whole, "parts of {budget} rows");
        assert_eq!(b, baselines, "parts of {budget} rows");
    }
}

/// `queries.own_group_by`: the shipped files give the same feature values, to
/// the bit, whether twinwatch or DataFusion computes their group-bys.
#[test]
fn the_shipped_files_answer_the_same_with_own_group_by_off() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
    let w = window();
    let answers = |out: &RunOutput| -> Vec<(String, String, i64, u64)> {
        out.features
            .iter()
            .map(|f| {
                (
                    out.machine(f).to_string(),
                    out.feature(f).to_string(),
                    f.ts,
                    f.value.to_bits(),
                )
            })
            .collect()
    };
    let (on, off) = rt().block_on(async {
        let mut on = Queries::new(&shipped);
        let mut off = Queries::new(&shipped).with_own_group_by(false);
        assert!(on.reload().await.is_empty() && off.reload().await.is_empty());
        assert_eq!(on.own_group_bys("reading_stats.sql"), 1);
        assert_eq!(off.own_group_bys("reading_stats.sql"), 0);
        (on.run(&w).await, off.run(&w).await)
    });
    assert!(on.features.len() >= 15, "{}", on.features.len());
    assert_eq!(answers(&on), answers(&off));
    assert_eq!(on.rules.len(), off.rules.len());
}

/// A run makes room for its feature rows from the last run's rows per
/// machine-window: a run folding three windows in after a run of one gets
/// room for all three at once (no doubling past them, which left up to half
/// of a 10,000-machine run's rows unused at the memory peak).
#[test]
fn a_run_makes_room_for_the_rows_of_every_window_it_holds() {
    let mut p = Pipeline::new(&Config::default());
    let mut closed = Vec::new();
    let mut runs = Vec::new();
    for second in 0..46 {
        let batch: Vec<Envelope> = (0..30)
            .map(|m| {
                let ts = T0 + second * 1000;
                Envelope::new(
                    format!("twin.telemetry.s.press-{m}"),
                    Some(ts),
                    format!(
                        r#"{{"ts": {ts}, "device": "plc-{m}", "seq": {second}, "readings": {{"x": {}, "y": {}}}}}"#,
                        (second * 7 + m) % 11,
                        m
                    ),
                )
            })
            .collect();
        closed.extend(p.process(&batch, 0).closed);
        if second == 15 || second == 45 {
            // One window's close, then three gathered into one run.
            let mut parts = std::mem::take(&mut closed).into_iter();
            let mut all: ClosedWindows = parts.next().unwrap();
            for c in parts {
                all.extend(c);
            }
            runs.push(all);
        }
    }
    let closed = runs;
    assert_eq!(closed.len(), 2);
    assert_eq!(
        (closed[0].machine_windows, closed[1].machine_windows),
        (30, 90)
    );
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
    let (one, three) = rt().block_on(async {
        let mut q = Queries::new(&shipped);
        assert!(q.reload().await.is_empty());
        (q.run(&closed[0]).await, q.run(&closed[1]).await)
    });
    assert!(one.failures.is_empty() && three.failures.is_empty());
    assert_eq!(three.features.len(), 3 * one.features.len());
    assert_eq!(three.features.capacity(), three.features.len());
}
