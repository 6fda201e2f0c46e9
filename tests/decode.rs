//! Decoder: contract §1/§2 shapes into Arrow, and every class of bad input
//! rejected with its reason, without panics and without leftover rows.

use arrow::array::{
    Array, Float64Array, StringArray, TimestampMillisecondArray, UInt16Array, UInt32Array,
    UInt64Array,
};
use arrow::record_batch::RecordBatch;
use twinwatch::config::InputConfig;
use twinwatch::decode::{Decoder, Reason};
use twinwatch::source::Envelope;

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref::<T>()
        .unwrap()
}

/// A name column (a dictionary) as plain text.
fn text(b: &RecordBatch, name: &str) -> StringArray {
    let c = arrow::compute::cast(
        b.column_by_name(name).unwrap(),
        &arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    c.as_any().downcast_ref::<StringArray>().unwrap().clone()
}

/// A name column's values in row order.
fn strings(b: &RecordBatch, name: &str) -> Vec<String> {
    text(b, name).iter().flatten().map(String::from).collect()
}

fn env(subject: &str, payload: &[u8]) -> Envelope {
    Envelope::new(subject, Some(1_795_766_400_500), payload.to_vec())
}

fn decoder() -> Decoder {
    Decoder::new(InputConfig::default())
}

#[test]
fn contract_example_round_trips() {
    let mut d = decoder();
    let payload = br#"{"ts": "2026-11-27T08:00:00.125Z", "machine": "press-07", "device": "plc-07a",
 "seq": 18211, "readings": {"temperature_c": 71.2, "vibration_mm_s": 2.31, "spindle_rpm": 1198}, "firmware": {"v": [1, 2]}}"#;
    let b = d.decode(&[env("twin.telemetry.s1.press-07", payload)]);
    assert!(b.rejected.is_empty(), "{:?}", b.rejected);
    let r = &b.readings;
    assert_eq!(r.num_rows(), 3);
    assert_eq!(
        col::<TimestampMillisecondArray>(r, "ts").value(0),
        1_795_766_400_125
    );
    assert_eq!(
        col::<TimestampMillisecondArray>(r, "received_at").value(0),
        1_795_766_400_500
    );
    assert_eq!(text(r, "machine").value(2), "press-07");
    assert_eq!(text(r, "device").value(0), "plc-07a");
    assert_eq!(text(r, "subject").value(0), "twin.telemetry.s1.press-07");
    assert_eq!(col::<UInt64Array>(r, "seq").value(1), 18211);
    let metric = text(r, "metric");
    let metrics: Vec<&str> = (0..3).map(|i| metric.value(i)).collect();
    assert_eq!(metrics, ["temperature_c", "vibration_mm_s", "spindle_rpm"]);
    assert_eq!(col::<Float64Array>(r, "value").value(2), 1198.0);
    assert_eq!(
        col::<UInt32Array>(r, "payload_bytes").value(0) as usize,
        payload.len()
    );
    let m = &b.messages;
    assert_eq!(m.num_rows(), 1);
    assert_eq!(col::<UInt32Array>(m, "readings").value(0), 3);
    assert_eq!(col::<UInt32Array>(m, "first_reading").value(0), 0);
}

#[test]
fn arrays_epoch_ms_nulls_and_defaults() {
    let mut d = decoder();
    let payload = br#"[{"ts": 1764230400125, "readings": {"t": null, "p": -1.5e2}},
                       {"ts": 1764230401125, "seq": 7, "readings": {"t": 20}}]"#;
    let b = d.decode(&[env("twin.telemetry.site.lathe-3", payload)]);
    assert!(b.rejected.is_empty(), "{:?}", b.rejected);
    let r = &b.readings;
    assert_eq!(r.num_rows(), 3);
    let v = col::<Float64Array>(r, "value");
    assert!(v.is_null(0), "null means no value this time");
    assert_eq!(v.value(1), -150.0);
    assert_eq!(
        text(r, "machine").value(0),
        "lathe-3",
        "machine defaults to the last subject token"
    );
    assert_eq!(
        text(r, "device").value(0),
        "lathe-3",
        "device defaults to the machine"
    );
    assert!(col::<UInt64Array>(r, "seq").is_null(0));
    assert_eq!(
        col::<TimestampMillisecondArray>(r, "ts").value(2),
        1_764_230_401_125
    );
    assert_eq!(col::<UInt32Array>(r, "message").value(2), 1);
    assert_eq!(b.messages.num_rows(), 2);
}

#[test]
fn bare_capture_objects_need_a_machine() {
    let mut d = decoder();
    let ok = Envelope::new(
        "",
        None,
        &br#"{"ts": 1764230400125, "machine": "m1", "readings": {"x": 1}}"#[..],
    );
    let bad = Envelope::new(
        "",
        None,
        &br#"{"ts": 1764230400125, "readings": {"x": 1}}"#[..],
    );
    let b = d.decode(&[ok, bad]);
    assert_eq!(b.readings.num_rows(), 1);
    assert_eq!(
        col::<TimestampMillisecondArray>(&b.readings, "received_at").value(0),
        1_764_230_400_125,
        "unknown arrival time falls back to the event time"
    );
    assert_eq!(b.rejected.len(), 1);
    assert_eq!(b.rejected[0].index, 1);
    assert_eq!(b.rejected[0].error.reason, Reason::MissingField);
}

#[test]
fn flow_records() {
    let mut d = decoder();
    let payload = br#"[{"ts": 1764230400125, "machine": "press-07", "src": "10.20.7.11", "dst": "10.20.0.5",
 "dst_port": 502, "proto": "tcp", "app": "modbus", "op": "write_single_register", "bytes": 120, "packets": 2},
 {"ts": "2026-11-27T08:00:00Z", "src": "10.20.7.11", "dst": "10.20.0.9", "bytes": 64}]"#;
    let b = d.decode(&[env("twin.flows.s1.press-07", payload)]);
    assert!(b.rejected.is_empty(), "{:?}", b.rejected);
    let f = &b.flows;
    assert_eq!(f.num_rows(), 2);
    assert_eq!(b.readings.num_rows(), 0);
    assert_eq!(
        col::<StringArray>(f, "op").value(0),
        "write_single_register"
    );
    assert_eq!(col::<UInt16Array>(f, "dst_port").value(0), 502);
    assert!(col::<UInt16Array>(f, "dst_port").is_null(1));
    assert!(col::<StringArray>(f, "app").is_null(1));
    assert_eq!(col::<UInt64Array>(f, "bytes").value(1), 64);
    assert_eq!(col::<StringArray>(f, "machine").value(1), "press-07");
}

fn reason_of(d: &mut Decoder, subject: &str, payload: &[u8]) -> Reason {
    let b = d.decode(&[env(subject, payload)]);
    assert_eq!(
        b.readings.num_rows() + b.flows.num_rows() + b.messages.num_rows(),
        0,
        "a rejected payload leaves no rows"
    );
    assert_eq!(
        b.rejected.len(),
        1,
        "payload {:?} should be rejected",
        String::from_utf8_lossy(payload)
    );
    b.rejected[0].error.reason
}

#[test]
fn every_bad_input_class_has_its_reason() {
    let mut d = Decoder::new(InputConfig {
        max_payload_bytes: 4096,
        ..InputConfig::default()
    });
    let t = "twin.telemetry.s.m";
    let cases: Vec<(&[u8], Reason)> = vec![
        (b"\xff\xfe{}", Reason::InvalidUtf8),
        (
            b"{\"ts\": 1764230400125, \"readings\": {",
            Reason::InvalidJson,
        ),
        (b"not json at all", Reason::InvalidJson),
        (
            b"{\"ts\": 1764230400125, \"readings\": {}} trailing",
            Reason::InvalidJson,
        ),
        (b"{\"readings\": {\"x\": 1}}", Reason::MissingField),
        (b"{\"ts\": 1764230400125}", Reason::MissingField),
        (
            b"{\"ts\": 1764230400125, \"readings\": {\"x\": \"hot\"}}",
            Reason::WrongType,
        ),
        (
            b"{\"ts\": 1764230400125, \"readings\": {\"x\": true}}",
            Reason::WrongType,
        ),
        (
            b"{\"ts\": 1764230400125, \"readings\": {\"x\": [1]}}",
            Reason::WrongType,
        ),
        (
            b"{\"ts\": 1764230400125, \"readings\": [1, 2]}",
            Reason::WrongType,
        ),
        (
            b"{\"ts\": 1764230400125.5, \"readings\": {}}",
            Reason::WrongType,
        ),
        (
            b"{\"ts\": 1764230400125, \"seq\": -1, \"readings\": {}}",
            Reason::WrongType,
        ),
        (b"\"just a string\"", Reason::WrongType),
        // An object's fields by position (what a derived struct visitor
        // would take) is not the contract's form.
        (
            b"[[1764230400125, null, null, null, {\"x\": 1}]]",
            Reason::WrongType,
        ),
        (
            b"{\"ts\": 1764230400125, \"readings\": {\"x\": 1e400}}",
            Reason::NonFinite,
        ),
        (
            b"{\"ts\": \"yesterday\", \"readings\": {}}",
            Reason::BadTimestamp,
        ),
        (
            b"{\"ts\": 1764230400, \"readings\": {}}",
            Reason::BadTimestamp,
        ),
        (
            b"{\"ts\": 1764230400125000, \"readings\": {}}",
            Reason::BadTimestamp,
        ),
        (b"[]", Reason::Empty),
        (
            b"[{\"ts\": 1764230400125, \"readings\": {\"x\": 1}}, {\"ts\": 1}]",
            Reason::MissingField,
        ),
        (
            b"{\"ts\": 1764230400125, \"machine\": \"a\\u0000b\", \"readings\": {}}",
            Reason::BadName,
        ),
        // DEL, and a C1 control (two bytes in UTF-8), in a metric name.
        (
            b"{\"ts\": 1764230400125, \"readings\": {\"a\\u007fb\": 1}}",
            Reason::BadName,
        ),
        (
            b"{\"ts\": 1764230400125, \"readings\": {\"temp\\u0085\": 1}}",
            Reason::BadName,
        ),
    ];
    for (payload, want) in cases {
        assert_eq!(
            reason_of(&mut d, t, payload),
            want,
            "payload {:?}",
            String::from_utf8_lossy(payload)
        );
    }
    let long_name = format!(
        "{{\"ts\": 1764230400125, \"device\": \"{}\", \"readings\": {{}}}}",
        "d".repeat(300)
    );
    assert_eq!(reason_of(&mut d, t, long_name.as_bytes()), Reason::BadName);
    let big = format!(
        "{{\"ts\": 1764230400125, \"readings\": {{}}, \"pad\": \"{}\"}}",
        "x".repeat(5000)
    );
    assert_eq!(reason_of(&mut d, t, big.as_bytes()), Reason::TooLarge);
    let deep = format!(
        "{{\"ts\": 1764230400125, \"readings\": {{}}, \"x\": {}{}}}",
        "[".repeat(1000),
        "]".repeat(1000)
    );
    assert_eq!(reason_of(&mut d, t, deep.as_bytes()), Reason::TooDeep);
    let fine = b"{\"ts\": 1764230400125, \"readings\": {}, \"x\": \"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[\"}";
    assert!(
        d.decode(&[env(t, fine)]).rejected.is_empty(),
        "brackets inside strings are not nesting"
    );
    // Flows: missing bytes, bad port.
    let f = "twin.flows.s.m";
    assert_eq!(
        reason_of(
            &mut d,
            f,
            b"{\"ts\": 1764230400125, \"src\": \"a\", \"dst\": \"b\"}"
        ),
        Reason::MissingField
    );
    assert_eq!(
        reason_of(&mut d, f, b"{\"ts\": 1764230400125, \"src\": \"a\", \"dst\": \"b\", \"bytes\": 1, \"dst_port\": 70000}"),
        Reason::WrongType
    );
}

#[test]
fn deep_nesting_is_rejected_not_a_stack_overflow() {
    let mut d = Decoder::new(InputConfig::default());
    let unbalanced = format!(
        "{{\"ts\": 1764230400125, \"readings\": {{}}, \"x\": {}}}",
        "[".repeat(100_000)
    );
    assert_eq!(
        reason_of(&mut d, "twin.telemetry.s.m", unbalanced.as_bytes()),
        Reason::TooDeep
    );
    let balanced = format!(
        "{{\"ts\": 1764230400125, \"readings\": {{}}, \"x\": {}{}}}",
        "{\"a\":[".repeat(50_000),
        "]}".repeat(50_000)
    );
    assert_eq!(
        reason_of(&mut d, "twin.telemetry.s.m", balanced.as_bytes()),
        Reason::TooDeep
    );
    // Nesting where the fast reader looks first (it gives up, and the depth
    // check it skips for what it accepts still refuses these): arrays around
    // the objects, and in place of a reading's value.
    let (open, close) = ("[".repeat(40), "]".repeat(40));
    for deep in [
        format!("{open}{{\"ts\": 1764230400125, \"readings\": {{\"x\": 1}}}}{close}"),
        format!("{{\"ts\": 1764230400125, \"readings\": {{\"x\": {open}1{close}}}}}"),
        format!("[{{\"ts\": 1764230400125, \"readings\": {{\"x\": 1}}}}, {open}{close}]"),
    ] {
        assert_eq!(
            reason_of(&mut d, "twin.telemetry.s.m", deep.as_bytes()),
            Reason::TooDeep,
            "{deep}"
        );
    }
}

#[test]
fn a_bad_message_does_not_disturb_its_batch() {
    let mut d = decoder();
    let good = br#"{"ts": 1764230400125, "readings": {"x": 1, "y": 2}}"#;
    let b = d.decode(&[
        env("twin.telemetry.s.a", good),
        env("twin.telemetry.s.b", b"{broken"),
        env("twin.telemetry.s.c", good),
    ]);
    assert_eq!(b.readings.num_rows(), 4);
    assert_eq!(b.messages.num_rows(), 2);
    assert_eq!(b.rejected.len(), 1);
    assert_eq!(b.rejected[0].index, 1);
    assert_eq!(col::<UInt32Array>(&b.messages, "first_reading").value(1), 2);
    assert_eq!(col::<UInt32Array>(&b.messages, "envelope").value(1), 2);
}

#[test]
fn machine_cap_rejects_with_capacity() {
    let mut d = Decoder::new(InputConfig {
        max_machines: 3,
        ..InputConfig::default()
    });
    let p = br#"{"ts": 1764230400125, "readings": {"x": 1}}"#;
    let envs: Vec<Envelope> = (0..10)
        .map(|i| env(&format!("twin.telemetry.s.m{i}"), p))
        .collect();
    let b = d.decode(&envs);
    assert_eq!(b.messages.num_rows(), 3);
    assert_eq!(b.rejected.len(), 7);
    assert!(
        b.rejected
            .iter()
            .all(|r| r.error.reason == Reason::Capacity)
    );
    assert_eq!(d.machines.len(), 3);
}

#[test]
fn random_bytes_never_panic() {
    // A cheap fuzz: mutated copies of a valid payload, every one either decodes or is rejected.
    let mut d = decoder();
    let base = br#"[{"ts": "2026-11-27T08:00:00.125Z", "machine": "press-07", "seq": 1, "readings": {"t": 71.2, "v": null}}]"#;
    let mut state: u64 = 0x1234_5678;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..5000 {
        let mut p = base.to_vec();
        for _ in 0..(1 + next() % 4) {
            let i = (next() as usize) % p.len();
            p[i] = (next() % 256) as u8;
        }
        let b = d.decode(&[env("twin.telemetry.s.m", &p)]);
        assert!(b.rejected.len() + b.messages.num_rows() >= 1);
    }
}

#[test]
fn name_columns_are_dictionaries_keyed_by_the_interned_ids() {
    use arrow::array::DictionaryArray;
    use arrow::datatypes::UInt32Type;
    let mut d = decoder();
    let b = d.decode(&[
        env(
            "twin.telemetry.s.a",
            br#"{"ts": 1795766400000, "readings": {"x": 1, "y": 2}}"#,
        ),
        env(
            "twin.telemetry.s.b",
            br#"{"ts": 1795766400000, "readings": {"y": 3}}"#,
        ),
    ]);
    let r = &b.readings;
    let machine = col::<DictionaryArray<UInt32Type>>(r, "machine");
    let metric = col::<DictionaryArray<UInt32Type>>(r, "metric");
    assert_eq!(
        machine.keys().values(),
        col::<UInt32Array>(r, "machine_id").values(),
        "the keys are the ids: no text per row"
    );
    assert_eq!(
        metric.keys().values(),
        col::<UInt32Array>(r, "metric_id").values()
    );
    assert_eq!(
        text(r, "metric").iter().flatten().collect::<Vec<_>>(),
        ["x", "y", "y"]
    );
    assert_eq!(text(&b.messages, "machine").value(1), "b");
    // A later batch reuses the names array while no name was added.
    let again = d.decode(&[env(
        "twin.telemetry.s.a",
        br#"{"ts": 1795766401000, "readings": {"x": 4}}"#,
    )]);
    let later = col::<DictionaryArray<UInt32Type>>(&again.readings, "machine");
    assert!(std::sync::Arc::ptr_eq(machine.values(), later.values()));
}

#[test]
fn remembered_keys_and_devices_never_give_a_wrong_name() {
    // The decoder tries the last object's keys and each machine's own device
    // first: keys that change order, appear or go away, and a machine that
    // sometimes names a device, must still get their own names.
    let mut d = decoder();
    let b = d.decode(&[
        env(
            "twin.telemetry.s.a",
            br#"{"ts": 1795766400000, "readings": {"x": 1, "y": 2, "z": 3}}"#,
        ),
        env(
            "twin.telemetry.s.b",
            br#"{"ts": 1795766400000, "device": "plc-b", "readings": {"z": 4, "y": 5}}"#,
        ),
        env(
            "twin.telemetry.s.a",
            br#"[{"ts": 1795766401000, "readings": {"w": 6, "x": 7}},
                 {"ts": 1795766402000, "device": "plc-a2", "readings": {"w": 8, "x": 9, "y": 10, "z": 11}}]"#,
        ),
        env(
            "twin.telemetry.s.b",
            br#"{"ts": 1795766401000, "readings": {"y": 12}}"#,
        ),
    ]);
    assert!(b.rejected.is_empty(), "{:?}", b.rejected);
    let r = &b.readings;
    let metrics = strings(r, "metric");
    let values: Vec<f64> = col::<Float64Array>(r, "value").values().to_vec();
    let by_value: Vec<(f64, &str)> = values
        .into_iter()
        .zip(metrics.iter().map(String::as_str))
        .collect();
    assert_eq!(
        by_value,
        [
            (1.0, "x"),
            (2.0, "y"),
            (3.0, "z"),
            (4.0, "z"),
            (5.0, "y"),
            (6.0, "w"),
            (7.0, "x"),
            (8.0, "w"),
            (9.0, "x"),
            (10.0, "y"),
            (11.0, "z"),
            (12.0, "y"),
        ]
    );
    let m = &b.messages;
    assert_eq!(strings(m, "device"), ["a", "plc-b", "a", "plc-a2", "b"]);
    assert_eq!(
        strings(r, "subject"),
        [
            ["twin.telemetry.s.a"; 3].as_slice(),
            &["twin.telemetry.s.b"; 2],
            &["twin.telemetry.s.a"; 6],
            &["twin.telemetry.s.b"; 1]
        ]
        .concat()
    );
    assert_eq!(
        strings(m, "subject"),
        [
            "twin.telemetry.s.a",
            "twin.telemetry.s.b",
            "twin.telemetry.s.a",
            "twin.telemetry.s.a",
            "twin.telemetry.s.b"
        ]
    );
    // Restoring names from a snapshot forgets what was remembered: ids
    // follow the restored names, not the ones before.
    let snap = |names: &[&str]| twinwatch::intern::Interner::from_names(names, 100);
    d.restore_names(
        snap(&["b", "a"]),
        snap(&["b", "a"]),
        snap(&["z", "y", "x", "w"]),
    );
    let again = d.decode(&[env(
        "twin.telemetry.s.a",
        br#"{"ts": 1795766403000, "readings": {"w": 1, "x": 2}}"#,
    )]);
    assert_eq!(
        col::<UInt32Array>(&again.readings, "machine_id").values(),
        &[1, 1]
    );
    assert_eq!(
        col::<UInt32Array>(&again.readings, "device_id").values(),
        &[1, 1]
    );
    assert_eq!(
        col::<UInt32Array>(&again.readings, "metric_id").values(),
        &[3, 2]
    );
}

/// Every row of a table as text, `offset` added to the row-number column
/// `counted` if any (rows of a second part count from the end of the first's).
fn rows_of(b: &RecordBatch, counted: Option<&str>, offset: u32) -> Vec<String> {
    let cols: Vec<(String, arrow::array::ArrayRef)> = b
        .schema()
        .fields()
        .iter()
        .zip(b.columns())
        .map(|(f, c)| {
            let c = if Some(f.name().as_str()) == counted {
                let v = c.as_any().downcast_ref::<UInt32Array>().unwrap();
                std::sync::Arc::new(UInt32Array::from_iter_values(
                    v.values().iter().map(|x| x + offset),
                )) as arrow::array::ArrayRef
            } else {
                c.clone()
            };
            (f.name().clone(), c)
        })
        .collect();
    (0..b.num_rows())
        .map(|r| {
            cols.iter()
                .map(|(name, c)| {
                    let v = arrow::util::display::array_value_to_string(c, r).unwrap();
                    format!("{name}={v}")
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// A batch of well over 256 KB: machines, devices and metrics new in either
/// half or both, objects without a device, array payloads, flow records, and
/// bad payloads in both halves.
fn big_batch(round: usize) -> Vec<Envelope> {
    let mut out = Vec::new();
    for i in 0..3600usize {
        let machine = format!("m-{}", (i * 7 + round * 13) % 450);
        let subject = format!("twin.telemetry.site.{machine}");
        let ts = 1_795_766_400_000u64 + (i as u64) * 10;
        let payload = match i % 10 {
            // A metric first seen here, in whichever half this falls.
            0 => format!(
                r#"{{"ts":{ts},"device":"dev-{}","seq":{i},"readings":{{"a":{}.5,"x{}":1.25,"b":null}}}}"#,
                i % 37,
                i % 11,
                i / 500
            ),
            // No device: the machine's own name is its device.
            1 => format!(r#"{{"ts":{ts},"readings":{{"a":{i},"b":2.5,"c":-1}}}}"#),
            2 => format!(
                r#"[{{"ts":{ts},"machine":"{machine}-arm","readings":{{"a":1,"b":2}}}},{{"ts":{},"readings":{{"b":3,"a":4,"d{}":5}}}}]"#,
                ts + 1,
                i % 3
            ),
            3 => {
                let flow = format!(
                    r#"{{"ts":{ts},"src":"10.0.0.{}","dst":"10.0.1.1","dst_port":502,"proto":"tcp","app":"modbus","bytes":{}}}"#,
                    i % 250,
                    100 + i
                );
                out.push(Envelope::new(
                    format!("twin.flows.site.{machine}"),
                    Some(1_795_766_400_500),
                    flow.into_bytes(),
                ));
                format!(
                    r#"{{"ts":{ts},"device":"plc-{}","readings":{{"a":{i}.125,"b":0}}}}"#,
                    i % 90
                )
            }
            // A bad payload; the machine of its first object must not be kept.
            4 if i % 20 == 4 => format!(
                r#"[{{"ts":{ts},"machine":"never-{i}","readings":{{"a":1}}}},{{"ts":{ts},"readings":{{"a\u0001":1}}}}]"#
            ),
            5 if i % 40 == 5 => "{not json".to_string(),
            _ => format!(
                r#"{{"ts":{ts},"device":"dev-{}","seq":{i},"readings":{{"a":{}.75,"b":{},"c":3,"note":null}}}}"#,
                i % 37,
                i % 13,
                i % 17
            ),
        };
        out.push(Envelope::new(
            subject.as_str(),
            Some(1_795_766_400_500),
            payload.into_bytes(),
        ));
    }
    out
}

/// What `decode_parts` hands out, put back together in order, and what
/// `decode` gives in one piece: each table's rows as text, the rejections,
/// and the interned names.
fn decoded_as_text(d: &mut Decoder, envelopes: &[Envelope], parts: bool) -> (usize, Vec<String>) {
    let batches = if parts {
        d.decode_parts(envelopes)
    } else {
        vec![d.decode(envelopes)]
    };
    let (mut readings, mut messages, mut flows, mut rejected) = (vec![], vec![], vec![], vec![]);
    let (mut messages_before, mut readings_before) = (0, 0);
    for b in &batches {
        readings.extend(rows_of(&b.readings, Some("message"), messages_before));
        messages.extend(rows_of(&b.messages, Some("first_reading"), readings_before));
        flows.extend(rows_of(&b.flows, None, 0));
        rejected.extend(
            b.rejected
                .iter()
                .map(|r| format!("rejected {} {}", r.index, r.error.reason.as_str())),
        );
        messages_before += b.messages.num_rows() as u32;
        readings_before += b.readings.num_rows() as u32;
    }
    let mut out = [readings, messages, flows, rejected].concat();
    for (kind, names) in [
        ("machine", d.machines.names()),
        ("device", d.devices.names()),
        ("metric", d.metrics.names()),
    ] {
        out.extend(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{kind} {i} {n}")),
        );
    }
    (batches.len(), out)
}

#[test]
fn a_batch_decoded_in_two_parts_is_the_batch_decoded_in_one() {
    let (mut whole, mut split) = (decoder(), decoder());
    for round in 0..3 {
        let batch = big_batch(round);
        let bytes: usize = batch
            .iter()
            .filter(|e| e.subject.starts_with("twin.telemetry."))
            .map(|e| e.payload.len())
            .sum();
        assert!(bytes > 270_000, "{bytes} bytes of telemetry");
        let (_, want) = decoded_as_text(&mut whole, &batch, false);
        let (parts, got) = decoded_as_text(&mut split, &batch, true);
        assert_eq!(parts, 2, "round {round} was decoded in two parts");
        assert!(want.iter().any(|r| r.starts_with("rejected")));
        assert!(want.iter().any(|r| r.contains("src=10.0.0.")));
        assert_eq!(got.len(), want.len(), "round {round}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "round {round}");
        }
    }
}

#[test]
fn a_batch_whose_new_names_pass_a_cap_is_decoded_in_one_piece() {
    let cfg = InputConfig {
        max_machines: 300,
        max_metrics: 6,
        ..InputConfig::default()
    };
    let (mut whole, mut split) = (Decoder::new(cfg.clone()), Decoder::new(cfg));
    let batch = big_batch(0);
    let (_, want) = decoded_as_text(&mut whole, &batch, false);
    let (parts, got) = decoded_as_text(&mut split, &batch, true);
    assert_eq!(parts, 1);
    assert!(
        want.iter().any(|r| r.ends_with(" capacity")),
        "the caps were reached"
    );
    assert_eq!(got, want);
    assert_eq!(split.machines.refused(), whole.machines.refused());
}

/// The objects of an array payload that share names, and those that do not:
/// each row keeps its own machine, device and metric, whatever the objects
/// before it said, and every distinct name is still checked.
#[test]
fn objects_of_one_payload_keep_their_own_names() {
    let mut d = decoder();
    let t = "twin.telemetry.s.press-01";
    let payload = br#"[
        {"ts": 1764230400000, "device": "plc-a", "readings": {"x": 1, "y": 2}},
        {"ts": 1764230401000, "device": "plc-a", "readings": {"x": 3, "y": 4}},
        {"ts": 1764230402000, "machine": "press-02", "device": "plc-b", "readings": {"y": 5, "x": 6}},
        {"ts": 1764230403000, "machine": "press-02", "readings": {"x": 7, "z": 8}},
        {"ts": 1764230404000, "device": "plc-a", "readings": {"x": 9, "y": 10}}
    ]"#;
    let b = d.decode(&[env(t, payload)]);
    assert!(b.rejected.is_empty(), "{:?}", b.rejected);
    let r = &b.readings;
    let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        strings(r, "metric"),
        m(&["x", "y", "x", "y", "y", "x", "x", "z", "x", "y"])
    );
    assert_eq!(
        strings(r, "machine"),
        m(&[
            "press-01", "press-01", "press-01", "press-01", "press-02", "press-02", "press-02",
            "press-02", "press-01", "press-01"
        ])
    );
    // A device named once, another, none (the machine's own name), the first again.
    assert_eq!(
        strings(&b.messages, "device"),
        m(&["plc-a", "plc-a", "plc-b", "press-02", "plc-a"])
    );
    let values = col::<Float64Array>(r, "value");
    assert_eq!(
        (0..values.len())
            .map(|i| values.value(i))
            .collect::<Vec<_>>(),
        (1..=10).map(f64::from).collect::<Vec<_>>()
    );
    // The same keys again in the next payload, then a changed one.
    let b = d.decode(&[env(
        t,
        br#"[{"ts": 1764230405000, "readings": {"x": 1, "y": 2}}, {"ts": 1764230406000, "readings": {"x": 1, "w": 2}}]"#,
    )]);
    assert_eq!(strings(&b.readings, "metric"), m(&["x", "y", "x", "w"]));
}

/// A name the object before had passed is not a pass for a different one:
/// a bad machine, device or key after good ones rejects the payload.
#[test]
fn a_bad_name_after_good_ones_is_still_refused() {
    let mut d = decoder();
    let t = "twin.telemetry.s.press-01";
    let long = "p".repeat(300);
    for bad in [
        format!(r#"{{"ts": 1764230401000, "machine": "{long}", "readings": {{"x": 1}}}}"#),
        r#"{"ts": 1764230401000, "machine": "press-\u0007", "readings": {"x": 1}}"#.to_string(),
        r#"{"ts": 1764230401000, "device": "plc-\u0001", "readings": {"x": 1}}"#.to_string(),
        r#"{"ts": 1764230401000, "device": "plc-a", "readings": {"x\u0002": 1}}"#.to_string(),
    ] {
        let good = r#"{"ts": 1764230400000, "machine": "press-01", "device": "plc-a", "readings": {"x": 1}}"#;
        let payload = format!("[{good}, {good}, {bad}]");
        assert_eq!(
            reason_of(&mut d, t, payload.as_bytes()),
            Reason::BadName,
            "{bad}"
        );
    }
    // The subject's machine is not a checked name: spelt out too long, it is refused.
    let subject = format!("twin.telemetry.s.{long}");
    let payload = format!(
        r#"[{{"ts": 1764230400000, "readings": {{"x": 1}}}}, {{"ts": 1764230401000, "machine": "{long}", "readings": {{"x": 1}}}}]"#
    );
    assert_eq!(
        reason_of(&mut d, &subject, payload.as_bytes()),
        Reason::BadName
    );
}
