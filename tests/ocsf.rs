//! OCSF output: the Detection Finding mapping against a fixed example, the
//! configuration key, and the NDJSON sink writing it.

use std::path::Path;

use serde_json::json;
use twinwatch::alerts::{Alert, AlertWindow, Contribution};
use twinwatch::config::Config;
use twinwatch::detect::Kind;
use twinwatch::ocsf::{AlertFormat, detection_finding, encode};
use twinwatch::score::Severity;
use twinwatch::sink::Sink;
use twinwatch::sink::ndjson::NdjsonSink;

fn example() -> Alert {
    Alert {
        id: "a1b2c3d4e5f60718".into(),
        ts: "2026-11-27T08:00:05.000Z".into(),
        emitted_at: "2026-11-27T08:00:05.250Z".into(),
        machine: "press-07".into(),
        device: Some("plc-07a".into()),
        kind: Kind::Multivariate,
        score: 0.9712,
        severity: Severity::High,
        detector: "multivariate".into(),
        feature: Some("model".into()),
        value: Some(31.5),
        expected: Some(1.0),
        window: Some(AlertWindow {
            start: "2026-11-27T08:00:00.000Z".into(),
            end: "2026-11-27T08:00:10.000Z".into(),
        }),
        explanation: "Q 31.5x its limit; temperature_c leads".into(),
        contributions: vec![Contribution {
            feature: "temperature_c".into(),
            weight: 0.8,
        }],
        incident: "a1b2c3d4e5f60718".into(),
    }
}

#[test]
fn detection_finding_of_a_fixed_example() {
    let expected = json!({
        "class_uid": 2004,
        "class_name": "Detection Finding",
        "category_uid": 2,
        "category_name": "Findings",
        "activity_id": 1,
        "activity_name": "Create",
        "type_uid": 200401,
        "type_name": "Detection Finding: Create",
        "time": 1795766405000i64,
        "severity_id": 4,
        "severity": "High",
        "status_id": 1,
        "status": "New",
        "is_alert": true,
        "confidence_score": 97,
        "message": "Q 31.5x its limit; temperature_c leads",
        "metadata": {
            "version": "1.4.0",
            "uid": "a1b2c3d4e5f60718",
            "correlation_uid": "a1b2c3d4e5f60718",
            "logged_time": 1795766405250i64,
            "product": {"name": "twinwatch", "vendor_name": "twinwatch", "version": env!("CARGO_PKG_VERSION")}
        },
        "finding_info": {
            "uid": "a1b2c3d4e5f60718",
            "title": "multivariate on press-07",
            "desc": "Q 31.5x its limit; temperature_c leads",
            "types": ["multivariate"],
            "created_time": 1795766405250i64,
            "first_seen_time": 1795766400000i64,
            "last_seen_time": 1795766410000i64,
            "analytic": {"name": "multivariate", "type_id": 4, "type": "Learning (ML/DL)"}
        },
        "resources": [{"type": "machine", "name": "press-07", "uid": "press-07"}],
        "device": {"type_id": 7, "type": "IOT", "name": "plc-07a", "uid": "plc-07a"},
        "unmapped": {
            "kind": "multivariate",
            "score": 0.9712,
            "subject": "twin.alerts.high.press-07",
            "feature": "model",
            "value": 31.5,
            "expected": 1.0,
            "contributions": [{"feature": "temperature_c", "weight": 0.8}]
        }
    });
    assert_eq!(detection_finding(&example()), expected);
}

#[test]
fn optional_fields_stay_out_and_severities_map() {
    let mut a = example();
    a.device = None;
    a.window = None;
    a.feature = None;
    a.value = None;
    a.expected = None;
    a.contributions.clear();
    a.detector = "rule".into();
    a.severity = Severity::Info;
    let e = detection_finding(&a);
    assert!(e.get("device").is_none());
    assert_eq!(e["finding_info"]["first_seen_time"], e["time"]);
    assert_eq!(e["finding_info"]["analytic"]["type_id"], 1);
    assert_eq!(e["severity_id"], 1);
    assert_eq!(e["unmapped"].as_object().unwrap().len(), 3, "{e}");
    for (s, id) in [
        (Severity::Low, 2),
        (Severity::Medium, 3),
        (Severity::High, 4),
        (Severity::Critical, 5),
    ] {
        a.severity = s;
        assert_eq!(detection_finding(&a)["severity_id"], id);
    }
    // The contract's JSON is unchanged by default.
    let plain: Alert = serde_json::from_slice(&encode(&a, AlertFormat::Json).unwrap()).unwrap();
    assert_eq!(plain, a);
}

#[test]
fn configuration_key_and_sink() {
    let cfg = Config::from_toml("[alerts]\nformat = \"ocsf\"\n", Path::new("c.toml")).unwrap();
    assert_eq!(cfg.alerts.format, AlertFormat::Ocsf);
    assert_eq!(Config::default().alerts.format, AlertFormat::Json);
    assert!(Config::from_toml("[alerts]\nformat = \"cef\"\n", Path::new("c.toml")).is_err());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.ndjson");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut sink = NdjsonSink::create(&path)
            .unwrap()
            .with_format(AlertFormat::Ocsf);
        sink.publish(&[example(), example()]).await.unwrap();
        sink.flush().await.unwrap();
    });
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["class_uid"] == 2004));
}
