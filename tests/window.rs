//! Event time: per-machine watermarks, window closing, lateness and
//! future-dated messages, through the pipeline.

use arrow::array::{Array, Float64Array, StringArray, TimestampMillisecondArray};
use twinwatch::config::{Config, WindowConfig};
use twinwatch::pipeline::Pipeline;
use twinwatch::source::Envelope;
use twinwatch::window::{Admission, Windows};

const T0: i64 = 1_795_766_400_000; // 2026-11-27T08:00:00Z, a multiple of 10 s

fn msg(machine: &str, ts: i64, value: f64) -> Envelope {
    Envelope::new(
        format!("twin.telemetry.s.{machine}"),
        Some(ts + 5),
        format!(r#"{{"ts": {ts}, "readings": {{"x": {value}}}}}"#),
    )
}

/// A column of `batch` as text (names are dictionary columns).
fn texts(batch: &arrow::record_batch::RecordBatch, column: &str) -> Vec<String> {
    let c = arrow::compute::cast(
        batch.column_by_name(column).unwrap(),
        &arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    let c = c.as_any().downcast_ref::<StringArray>().unwrap();
    c.iter()
        .map(|s| s.unwrap_or_default().to_string())
        .collect()
}

fn windows() -> Windows {
    Windows::new(WindowConfig::default())
}

#[test]
fn watermarks_are_per_machine_and_future_dated_messages_do_not_move_them() {
    let mut w = windows();
    assert_eq!(w.admit(0, T0 + 100_000, T0 + 100_000), Admission::OnTime);
    assert_eq!(
        w.admit(1, T0, T0),
        Admission::OnTime,
        "machine 1 is not late because machine 0 is ahead"
    );
    assert_eq!(w.watermark(0), Some(T0 + 95_000));
    // Dated an hour ahead of its arrival: ignored by the watermark.
    assert_eq!(w.admit(1, T0 + 3_600_000, T0 + 1_000), Admission::Future);
    assert_eq!(w.watermark(1), Some(T0 - 5_000));
    assert_eq!(w.admit(1, T0 + 2_000, T0 + 2_000), Admission::OnTime);
    // Within the allowed lateness the older window is still open.
    assert_eq!(w.admit(0, T0 + 91_000, T0 + 101_000), Admission::OnTime);
    assert_eq!(w.admit(0, T0 + 89_999, T0 + 101_000), Admission::Late);
    assert_eq!((w.late, w.future), (1, 1));
}

#[test]
fn windows_close_when_the_watermark_passes_their_end() {
    let mut p = Pipeline::new(&Config::default());
    let mut closed = Vec::new();
    for s in 0..15 {
        let out = p.process(&[msg("a", T0 + s * 1000, s as f64)], 0);
        if let Some(c) = out.closed {
            closed.push((s, c));
        }
    }
    assert!(
        closed.is_empty(),
        "window [0, 10 s) waits for the 5 s of lateness"
    );
    let out = p.process(
        &[msg("a", T0 + 15_000, 15.0), msg("b", T0 + 15_000, 0.0)],
        0,
    );
    let c = out
        .closed
        .expect("newest 15 s - lateness 5 s = 10 s closes [0, 10 s)");
    assert_eq!(c.machine_windows, 1);
    assert_eq!(
        c.span,
        (T0, T0 + 10_000),
        "the closed window's start and end"
    );
    let r = &c.readings.concat();
    assert_eq!(r.num_rows(), 10);
    let starts = r
        .column_by_name("window_start")
        .unwrap()
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .unwrap();
    let ends = r
        .column_by_name("window_end")
        .unwrap()
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .unwrap();
    assert!((0..10).all(|i| starts.value(i) == T0 && ends.value(i) == T0 + 10_000));
    let values = r
        .column_by_name("value")
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    assert_eq!(values.iter().flatten().sum::<f64>(), 45.0);
    assert_eq!(c.messages.num_rows(), 10);
    assert!(
        r.column_by_name("message").is_none(),
        "batch-local links are dropped"
    );
    // The rest closes at the end of input.
    let end = p
        .finish()
        .closed
        .expect("the open windows close at the end");
    assert_eq!(end.readings.num_rows(), 7);
    let machines = arrow::compute::cast(
        end.readings.concat().column_by_name("machine").unwrap(),
        &arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    let machines = machines.as_any().downcast_ref::<StringArray>().unwrap();
    assert_eq!(machines.iter().flatten().filter(|m| *m == "b").count(), 1);
    assert_eq!(end.machine_windows, 2);
}

#[test]
fn late_data_is_counted_kept_out_of_windows_and_still_scored() {
    let mut cfg = Config::default();
    cfg.baseline.warmup = 60_000;
    let mut p = Pipeline::new(&cfg);
    let mut rows = 0;
    for s in 0..300 {
        let v = 10.0 + ((s * 7919) % 13) as f64 * 0.01;
        if let Some(c) = p.process(&[msg("a", T0 + s * 1000, v)], 0).closed {
            rows += c.readings.num_rows();
        }
    }
    // A reading from two minutes ago arrives now, with a huge value.
    let out = p.process(&[msg("a", T0 + 180_000, 500.0)], 0);
    assert_eq!(p.stats().late, 1);
    assert!(
        out.alerts.iter().any(|a| a.value == Some(500.0)),
        "late data is still scored"
    );
    rows += p.finish().closed.map_or(0, |c| c.readings.num_rows());
    assert_eq!(rows, 300, "the late reading is in no window");
}

#[test]
fn future_dated_readings_do_not_close_windows() {
    let mut p = Pipeline::new(&Config::default());
    p.process(&[msg("a", T0, 1.0)], 0);
    let forged = Envelope::new(
        "twin.telemetry.s.a",
        Some(T0 + 1_000),
        format!(r#"{{"ts": {}, "readings": {{"x": 1}}}}"#, T0 + 86_400_000),
    );
    let out = p.process(&[forged], 0);
    assert!(
        out.closed.is_none(),
        "a forged future timestamp must not close the machine's windows"
    );
    assert_eq!(p.stats().future, 1);
    let out = p.process(&[msg("a", T0 + 1_000, 1.0)], 0);
    assert!(out.closed.is_none());
    assert_eq!(
        p.stats().late,
        0,
        "honest data after the forgery is not late"
    );
}

#[test]
fn flows_join_their_machine_windows_on_their_own_watermark() {
    let mut p = Pipeline::new(&Config::default());
    let flow = Envelope::new(
        "twin.flows.s.a",
        Some(T0 + 2_000),
        format!(
            r#"{{"ts": {}, "src": "10.0.0.1", "dst": "10.0.0.2", "dst_port": 502, "bytes": 100}}"#,
            T0 + 2_000
        ),
    );
    let later = Envelope::new(
        "twin.flows.s.a",
        Some(T0 + 20_000),
        format!(
            r#"{{"ts": {}, "src": "10.0.0.1", "dst": "10.0.0.2", "bytes": 10}}"#,
            T0 + 20_000
        ),
    );
    p.process(&[msg("a", T0, 1.0), flow], 0);
    let c = p.process(&[msg("a", T0 + 60_000, 1.0)], 0).closed.unwrap();
    assert_eq!(
        c.flows.num_rows(),
        0,
        "flows keep their own watermark: telemetry running ahead does not close them"
    );
    let c = p.process(&[later], 0).closed.unwrap();
    assert_eq!(c.flows.num_rows(), 1);
    assert!(c.flows.concat().column_by_name("window_start").is_some());
}

#[test]
fn windows_keep_only_the_columns_the_queries_read() {
    let mut p = Pipeline::new(&Config::default());
    // What a run of files reading machine, metric and value of `readings` says.
    let run = twinwatch::features::RunOutput {
        columns_read: [(
            "readings".to_string(),
            ["machine", "metric", "value"].map(String::from).into(),
        )]
        .into(),
        ..Default::default()
    };
    p.observe_features(&run, 0);
    for s in 0..12 {
        p.process(&[msg("a", T0 + s * 1000, s as f64)], 0);
    }
    let c = p.finish().closed.expect("the windows close at the end");
    let parts = &c.readings.parts;
    assert!(parts.len() >= 2, "one part per batch");
    let r = c.readings.concat();
    // What is read is there; window_start always is; window_end (its start
    // plus the size) only when read, the span of the close saying when the
    // windows end.
    let values = r.column_by_name("value").unwrap();
    let values = values.as_any().downcast_ref::<Float64Array>().unwrap();
    assert_eq!(values.iter().flatten().sum::<f64>(), 66.0);
    let starts = r.column_by_name("window_start").unwrap();
    let starts = starts
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .unwrap();
    assert_eq!(starts.value(11), T0 + 10_000);
    let ends = r.column_by_name("window_end").unwrap();
    let ends = ends
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .unwrap();
    assert!(ends.values().iter().all(|&t| t == 0), "window_end unread");
    assert_eq!(c.span, (T0, T0 + 20_000));
    assert_eq!(texts(&r, "machine")[0], "a");
    // What no file reads is zeros (empty text), and every batch's zeros are
    // one shared buffer: an unread column costs no memory per row.
    let subject = texts(&r, "subject");
    assert!(subject.iter().all(String::is_empty), "{subject:?}");
    let received = |i: usize| parts[i].column_by_name("received_at").unwrap().to_data();
    assert!(received(0).buffers()[0].as_ptr() == received(1).buffers()[0].as_ptr());
    assert!(
        r.column_by_name("received_at")
            .unwrap()
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .unwrap()
            .values()
            .iter()
            .all(|&t| t == 0)
    );
    // Messages were not named: kept whole.
    let m = c.messages.concat();
    assert_eq!(texts(&m, "subject")[0], "twin.telemetry.s.a");
}

#[test]
fn a_batch_closing_in_parts_hands_over_every_row_once() {
    let mut p = Pipeline::new(&Config::default());
    let run = twinwatch::features::RunOutput {
        columns_read: [("readings".to_string(), ["value"].map(String::from).into())].into(),
        ..Default::default()
    };
    p.observe_features(&run, 0);
    // One batch spanning two windows of machine a: [0, 10 s) and [10 s, 20 s).
    let batch: Vec<Envelope> = (0..14).map(|s| msg("a", T0 + s * 1000, s as f64)).collect();
    assert!(p.process(&batch, 0).closed.is_none(), "nothing closed yet");
    // Machine a's watermark passes 10 s: the first window closes, the rest waits.
    let first = p
        .process(&[msg("a", T0 + 15_000, 100.0)], 0)
        .closed
        .expect("[0, 10 s) closes");
    let rest = p.finish().closed.expect("the rest closes at the end");
    let sum = |t: &twinwatch::window::Table| {
        let r = t.concat();
        let v = r.column_by_name("value").unwrap();
        v.as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .iter()
            .flatten()
            .sum::<f64>()
    };
    assert_eq!(first.readings.num_rows(), 10);
    assert_eq!(sum(&first.readings), 45.0);
    assert_eq!(rest.readings.num_rows(), 5, "rows 10..14 and 15, once each");
    assert_eq!(sum(&rest.readings), (10..14).sum::<i64>() as f64 + 100.0);
    // Unread columns of the parts cut from the batch are still the shared zeros.
    let ptr = |t: &twinwatch::window::Table| {
        t.parts[0]
            .column_by_name("seq")
            .unwrap()
            .to_data()
            .buffers()[0]
            .as_ptr()
    };
    assert!(ptr(&first.readings) == ptr(&rest.readings));
}

#[test]
fn each_machine_window_that_closes_is_counted_once() {
    // 30 s of one machine's telemetry in one batch, then of two machines
    // interleaved: three 10-second windows each, every one counted once
    // whether its rows come in one run or alternate with another machine's.
    let closed_windows = |machines: &[&str]| {
        let mut p = Pipeline::new(&Config::default());
        let batch: Vec<Envelope> = (0..30)
            .flat_map(|s| {
                machines
                    .iter()
                    .map(move |m| msg(m, T0 + s * 1000, s as f64))
            })
            .collect();
        let during = p.process(&batch, 0).closed.map_or(0, |c| c.machine_windows);
        let end = p.finish().closed.map_or(0, |c| c.machine_windows);
        (during, end)
    };
    assert_eq!(closed_windows(&["a"]), (2, 1));
    assert_eq!(closed_windows(&["a", "b"]), (4, 2));
}

#[test]
fn interleaved_machines_closing_at_different_times_hand_over_each_row_once() {
    // Machines a and b alternate row by row over 30 s; a runs ahead, so its
    // windows close before b's, and the batch gives up its rows in three parts.
    let mut p = Pipeline::new(&Config::default());
    let value = |m: &str, s: i64| {
        if m == "a" {
            s as f64
        } else {
            1000.0 + s as f64
        }
    };
    let batch: Vec<Envelope> = (0..30)
        .flat_map(|s| ["a", "b"].map(|m| msg(m, T0 + s * 1000, value(m, s))))
        .collect();
    let rows = |t: &twinwatch::window::Table| {
        let r = t.concat();
        let v = r.column_by_name("value").unwrap();
        let v = v.as_any().downcast_ref::<Float64Array>().unwrap();
        let mut out: Vec<(String, f64)> = texts(&r, "machine")
            .into_iter()
            .zip(v.iter().map(|x| x.unwrap()))
            .collect();
        out.sort_by(|x, y| x.partial_cmp(y).unwrap());
        out
    };
    let expect = |m: &str, secs: std::ops::Range<i64>| -> Vec<(String, f64)> {
        secs.map(|s| (m.to_string(), value(m, s))).collect()
    };
    // The batch itself closes [0, 10 s) and [10 s, 20 s) of both machines.
    let first = p.process(&batch, 0).closed.expect("two windows each close");
    let mut want = expect("a", 0..20);
    want.extend(expect("b", 0..20));
    assert_eq!(rows(&first.readings), want);
    assert_eq!(first.machine_windows, 4);
    // a alone moves on: its [20 s, 30 s) closes, b's waits.
    let second = p
        .process(&[msg("a", T0 + 35_000, 35.0)], 0)
        .closed
        .expect("a's third window closes");
    assert_eq!(rows(&second.readings), expect("a", 20..30));
    assert_eq!(second.machine_windows, 1);
    let rest = p.finish().closed.expect("the rest closes at the end");
    let mut want = vec![("a".to_string(), 35.0)];
    want.extend(expect("b", 20..30));
    assert_eq!(rows(&rest.readings), want);
    assert_eq!(
        rest.messages.num_rows(),
        11,
        "messages close with their readings"
    );
}
