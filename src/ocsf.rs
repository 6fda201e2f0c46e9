//! OCSF: alerts as OCSF Detection Finding events (class 2004, category 2
//! Findings, schema 1.4), so a SIEM that speaks OCSF takes them unchanged.
//!
//! Chosen with `[alerts] format = "ocsf"` or `--alert-format ocsf`; the
//! contract's own JSON stays the default. The mapping (also in the README):
//!
//! | twinwatch | OCSF |
//! |---|---|
//! | `id` | `finding_info.uid`, `metadata.uid` |
//! | `incident` | `metadata.correlation_uid` |
//! | `ts` | `time` (epoch ms), `finding_info.first_seen_time`, `last_seen_time` |
//! | `emitted_at` | `finding_info.created_time`, `metadata.logged_time` |
//! | `kind` | `finding_info.types[0]`, and in the title |
//! | `detector` | `finding_info.analytic.name` (type: rule → Rule, multivariate → Learning, others → Statistical) |
//! | `explanation` | `message`, `finding_info.desc` |
//! | `severity` | `severity_id` / `severity`: info 1 Informational, low 2, medium 3, high 4, critical 5 |
//! | `score` | `confidence_score` (0–100) |
//! | `machine` | `resources[0]` (`type` "machine") |
//! | `device` | `device` (`type_id` 7 IOT) |
//! | `window` | `finding_info.first_seen_time` / `last_seen_time` when present |
//! | `feature`, `value`, `expected`, `contributions`, `score`, `kind`, the NATS subject | `unmapped` |
//!
//! Fixed: `activity_id` 1 Create (escalations and reminders are new alerts
//! with their own ids, grouped by `correlation_uid`), `status_id` 1 New,
//! `type_uid` 200401, `is_alert` true.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::alerts::Alert;
use crate::score::Severity;
use crate::time::parse_rfc3339;

/// How alerts are written on the wire and to files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AlertFormat {
    /// The contract's alert JSON (§3).
    #[default]
    Json,
    /// OCSF Detection Finding (class_uid 2004).
    Ocsf,
}

/// The OCSF schema version the events follow.
pub const OCSF_VERSION: &str = "1.4.0";

fn severity_id(s: Severity) -> (u8, &'static str) {
    match s {
        Severity::Info => (1, "Informational"),
        Severity::Low => (2, "Low"),
        Severity::Medium => (3, "Medium"),
        Severity::High => (4, "High"),
        Severity::Critical => (5, "Critical"),
    }
}

fn analytic_type(detector: &str) -> (u8, &'static str) {
    match detector {
        "rule" => (1, "Rule"),
        "multivariate" => (4, "Learning (ML/DL)"),
        _ => (3, "Statistical"),
    }
}

/// The alert as an OCSF Detection Finding.
pub fn detection_finding(a: &Alert) -> Value {
    let time = parse_rfc3339(&a.ts).unwrap_or(0);
    let created = parse_rfc3339(&a.emitted_at).unwrap_or(time);
    let (first_seen, last_seen) = a
        .window
        .as_ref()
        .and_then(|w| Some((parse_rfc3339(&w.start)?, parse_rfc3339(&w.end)?)))
        .unwrap_or((time, time));
    let (sev_id, sev) = severity_id(a.severity);
    let (analytic_id, analytic) = analytic_type(&a.detector);
    let kind = a.kind.as_str();
    let mut event = json!({
        "class_uid": 2004,
        "class_name": "Detection Finding",
        "category_uid": 2,
        "category_name": "Findings",
        "activity_id": 1,
        "activity_name": "Create",
        "type_uid": 200401,
        "type_name": "Detection Finding: Create",
        "time": time,
        "severity_id": sev_id,
        "severity": sev,
        "status_id": 1,
        "status": "New",
        "is_alert": true,
        "confidence_score": (a.score * 100.0).round().clamp(0.0, 100.0) as u8,
        "message": a.explanation,
        "metadata": {
            "version": OCSF_VERSION,
            "uid": a.id,
            "correlation_uid": a.incident,
            "logged_time": created,
            "product": {
                "name": "twinwatch",
                "vendor_name": "twinwatch",
                "version": env!("CARGO_PKG_VERSION"),
            },
        },
        "finding_info": {
            "uid": a.id,
            "title": format!("{kind} on {}", a.machine),
            "desc": a.explanation,
            "types": [kind],
            "created_time": created,
            "first_seen_time": first_seen,
            "last_seen_time": last_seen,
            "analytic": { "name": a.detector, "type_id": analytic_id, "type": analytic },
        },
        "resources": [{ "type": "machine", "name": a.machine, "uid": a.machine }],
        "unmapped": {
            "kind": kind,
            "score": a.score,
            "subject": a.subject(),
        },
    });
    if let Some(d) = &a.device {
        event["device"] = json!({ "type_id": 7, "type": "IOT", "name": d, "uid": d });
    }
    let unmapped = &mut event["unmapped"];
    if let Some(f) = &a.feature {
        unmapped["feature"] = json!(f);
    }
    if let Some(v) = a.value {
        unmapped["value"] = json!(v);
    }
    if let Some(e) = a.expected {
        unmapped["expected"] = json!(e);
    }
    if !a.contributions.is_empty() {
        unmapped["contributions"] = json!(a.contributions);
    }
    event
}

/// The alert in `format`, as bytes for the wire or a line of a file.
pub fn encode(a: &Alert, format: AlertFormat) -> serde_json::Result<Vec<u8>> {
    match format {
        AlertFormat::Json => serde_json::to_vec(a),
        AlertFormat::Ocsf => serde_json::to_vec(&detection_finding(a)),
    }
}
