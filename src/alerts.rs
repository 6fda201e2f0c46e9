//! Alerts: findings become contract §3 alerts — scored, explained, with
//! deterministic ids — and are deduplicated.
//!
//! Dedup keeps one open alert per (machine, kind, feature). A finding for an
//! open key is raised again only when its severity is higher than the last one
//! raised (escalation) or when `alerts.cooldown` of event time has passed since
//! the last raise (a reminder that the condition persists); otherwise it is
//! counted as suppressed. A key with no finding for `cooldown` closes, and the
//! next finding opens a new incident.
//!
//! Ids are deterministic, so replaying the same input gives the same ids and a
//! JetStream stream with `Nats-Msg-Id` drops duplicates: `incident` hashes
//! (machine, kind, feature, event time of the incident's first anomalous
//! point); `id` hashes the same plus the event time of the finding that was
//! raised, so an escalation or reminder carries a new id (it must not be
//! dropped as a duplicate) while the first alert of an incident has
//! `id = hash(machine, kind, feature, t0, t0)`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::detect::{Detail, Finding, Kind};
use crate::intern::Interner;
use crate::score::{Severity, score_from_surprise};
use crate::time::{Millis, format_duration, format_rfc3339, window_start};

/// A window of event time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertWindow {
    pub start: String,
    pub end: String,
}

/// A feature's share in an alert's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub feature: String,
    pub weight: f64,
}

/// An alert, exactly the contract's shape (plus `incident`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: String,
    pub ts: String,
    pub emitted_at: String,
    pub machine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub kind: Kind,
    pub score: f64,
    pub severity: Severity,
    pub detector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<AlertWindow>,
    pub explanation: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contributions: Vec<Contribution>,
    /// Groups the alerts of one incident (first alert, escalations, reminders).
    pub incident: String,
}

impl Alert {
    /// `twin.alerts.<severity>.<machine>`, the machine made one subject token.
    pub fn subject(&self) -> String {
        format!(
            "twin.alerts.{}.{}",
            self.severity.as_str(),
            subject_token(&self.machine)
        )
    }
}

/// Makes a name safe as one NATS subject token.
pub fn subject_token(name: &str) -> String {
    let t: String = name
        .chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if t.is_empty() { "_".into() } else { t }
}

/// Severity from kind and score: a few kinds are severe by nature.
pub fn severity_for(kind: Kind, score: f64) -> Severity {
    match kind {
        Kind::SignatureInvalid => Severity::Critical,
        _ => Severity::from_score(score),
    }
}

/// The device id of findings that no single device sent (features, rules).
pub const NO_DEVICE: u32 = u32::MAX;

/// The score a rule row gets when it gives none: the bottom of its severity band.
pub fn rule_score(severity: Severity) -> f64 {
    match severity {
        Severity::Info => 0.5,
        Severity::Low => 0.75,
        Severity::Medium => 0.9,
        Severity::High => 0.97,
        Severity::Critical => 0.995,
    }
}

/// Name tables for turning ids into text.
pub struct Names<'a> {
    pub machines: &'a Interner,
    pub devices: &'a Interner,
    pub metrics: &'a Interner,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Open {
    first_ts: Millis,
    last_ts: Millis,
    last_raised: Millis,
    severity: Severity,
}

/// Open alerts and dedup.
pub struct AlertBook {
    min_score: f64,
    cooldown: Millis,
    window: Millis,
    open: HashMap<(u32, Kind, u32), Open>,
    newest: Millis,
    offers: u64,
    /// Findings raised as alerts.
    pub raised: u64,
    /// Findings folded into an open alert.
    pub suppressed: u64,
    /// Findings below the score threshold.
    pub below_threshold: u64,
}

impl AlertBook {
    pub fn new(min_score: f64, cooldown: Millis, window: Millis) -> Self {
        AlertBook {
            min_score,
            cooldown,
            window,
            open: HashMap::new(),
            newest: Millis::MIN,
            offers: 0,
            raised: 0,
            suppressed: 0,
            below_threshold: 0,
        }
    }

    /// Offers a finding; returns the alert to publish, if any.
    pub fn offer(&mut self, f: &Finding, names: &Names, emitted_at: Millis) -> Option<Alert> {
        let score = score_from_surprise(f.surprise);
        // An operator's rule is explicit: it alerts whatever its score.
        if score < self.min_score && f.kind != Kind::Rule {
            self.below_threshold += 1;
            return None;
        }
        self.offers += 1;
        self.newest = self.newest.max(f.ts);
        if self.offers.is_multiple_of(4096) {
            let horizon = self.newest - 2 * self.cooldown;
            self.open.retain(|_, o| o.last_ts >= horizon);
        }
        let severity = f.severity.unwrap_or_else(|| severity_for(f.kind, score));
        let key = (f.machine, f.kind, f.metric);
        let raise = match self.open.get_mut(&key) {
            Some(o) if f.ts - o.last_ts <= self.cooldown => {
                o.last_ts = o.last_ts.max(f.ts);
                if severity > o.severity || f.ts - o.last_raised >= self.cooldown {
                    o.severity = severity;
                    o.last_raised = f.ts;
                    Some(o.first_ts)
                } else {
                    None
                }
            }
            _ => {
                self.open.insert(
                    key,
                    Open {
                        first_ts: f.ts,
                        last_ts: f.ts,
                        last_raised: f.ts,
                        severity,
                    },
                );
                Some(f.ts)
            }
        };
        let Some(first_ts) = raise else {
            self.suppressed += 1;
            return None;
        };
        self.raised += 1;
        Some(build(
            f,
            score,
            severity,
            first_ts,
            names,
            self.window,
            emitted_at,
        ))
    }

    /// The open alerts, for a snapshot (sorted, so snapshots are deterministic).
    pub fn snapshot(&self) -> BookState {
        let mut open: Vec<OpenEntry> = self
            .open
            .iter()
            .map(|(&(machine, kind, feature), o)| OpenEntry {
                machine,
                kind,
                feature,
                open: o.clone(),
            })
            .collect();
        open.sort_by_key(|e| (e.machine, e.kind, e.feature));
        BookState {
            open,
            newest: self.newest,
        }
    }

    /// Restores the open alerts of a snapshot.
    pub fn restore(&mut self, state: BookState) {
        self.newest = state.newest;
        self.open = state
            .open
            .into_iter()
            .map(|e| ((e.machine, e.kind, e.feature), e.open))
            .collect();
    }
}

/// The dedup state in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BookState {
    open: Vec<OpenEntry>,
    newest: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenEntry {
    machine: u32,
    kind: Kind,
    feature: u32,
    #[serde(flatten)]
    open: Open,
}

fn hash_id(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u32).to_le_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    // Written digit by digit: a `format!` per byte was a third of an alert's
    // cost in an alert storm (sixteen small strings for one id).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for b in &digest[..16] {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    id
}

fn build(
    f: &Finding,
    score: f64,
    severity: Severity,
    first_ts: Millis,
    names: &Names,
    window: Millis,
    emitted_at: Millis,
) -> Alert {
    let machine = names.machines.name(f.machine).to_string();
    let feature = match &f.subject {
        Some(s) => s.clone(),
        None => names.metrics.name(f.metric).to_string(),
    };
    let kind = f.kind.as_str().as_bytes();
    let first = first_ts.to_le_bytes();
    let this = f.ts.to_le_bytes();
    // Findings about a device's traffic share feature names across devices:
    // the device keeps their ids apart.
    let device = match (&f.subject, f.device) {
        (Some(_), d) if d != NO_DEVICE => names.devices.name(d).to_string(),
        _ => String::new(),
    };
    let feature_key = format!(
        "{feature}{}{device}",
        if device.is_empty() { "" } else { "@" }
    );
    let incident = hash_id(&[machine.as_bytes(), kind, feature_key.as_bytes(), &first]);
    let id = hash_id(&[
        machine.as_bytes(),
        kind,
        feature_key.as_bytes(),
        &first,
        &this,
    ]);
    let start = window_start(f.ts, window);
    Alert {
        id,
        ts: format_rfc3339(f.ts),
        emitted_at: format_rfc3339(emitted_at),
        device: (f.device != NO_DEVICE).then(|| names.devices.name(f.device).to_string()),
        kind: f.kind,
        score: (score * 10_000.0).round() / 10_000.0,
        severity,
        detector: f.detector.to_string(),
        value: match &f.detail {
            Detail::Rule { value, .. } => *value,
            Detail::Note { numeric: false, .. } => None,
            _ => Some(f.value),
        },
        expected: match f.detail {
            Detail::Rule { .. } | Detail::Note { numeric: false, .. } => None,
            _ => Some(round_sig(f.expected, 6)),
        },
        window: Some(AlertWindow {
            start: format_rfc3339(start),
            end: format_rfc3339(start + window),
        }),
        explanation: explain(f, &feature),
        contributions: match &f.detail {
            Detail::Multivariate { contributions, .. } => contributions
                .iter()
                .map(|(name, w)| Contribution {
                    feature: name.clone(),
                    weight: (w * 10_000.0).round() / 10_000.0,
                })
                .collect(),
            _ => vec![Contribution {
                feature: feature.clone(),
                weight: 1.0,
            }],
        },
        feature: Some(feature),
        machine,
        incident,
    }
}

/// The machine name of alerts about the monitor itself (a global cap reached).
pub const MONITOR: &str = "twinwatch";

/// A `capacity` alert about a global cap (`key`), raised by the monitor itself.
pub fn capacity_alert(key: &str, explanation: String, ts: Millis, emitted_at: Millis) -> Alert {
    let kind = Kind::Capacity.as_str().as_bytes();
    let t = ts.to_le_bytes();
    let score = 0.9;
    Alert {
        id: hash_id(&[MONITOR.as_bytes(), kind, key.as_bytes(), &t, &t]),
        ts: format_rfc3339(ts),
        emitted_at: format_rfc3339(emitted_at),
        machine: MONITOR.into(),
        device: None,
        kind: Kind::Capacity,
        score,
        severity: Severity::from_score(score),
        detector: "input_cap".into(),
        feature: Some(key.into()),
        value: None,
        expected: None,
        window: None,
        explanation,
        contributions: Vec::new(),
        incident: hash_id(&[MONITOR.as_bytes(), kind, key.as_bytes(), &t]),
    }
}

/// Rounds to `digits` significant digits (for display fields).
fn round_sig(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let mag = 10f64.powi(digits - 1 - x.abs().log10().floor() as i32);
    (x * mag).round() / mag
}

/// A number as a person would write it in a sentence.
pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    let decimals = if a >= 1000.0 {
        0
    } else if a >= 100.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        3
    };
    let mut s = format!("{x:.decimals$}");
    // Trimmed in place: one string per number, not two.
    if s.contains('.') {
        let kept = s.trim_end_matches('0').trim_end_matches('.').len();
        s.truncate(kept);
    }
    s
}

fn explain(f: &Finding, feature: &str) -> String {
    let v = fmt_num(f.value);
    let e = fmt_num(f.expected);
    match f.detail.clone() {
        Detail::Spike { z, .. } => format!(
            "{feature} {v} is {:.1} sigma {} its expected {e}",
            z.abs(),
            if z >= 0.0 { "above" } else { "below" }
        ),
        Detail::Shift {
            statistic,
            since,
            sigma,
        } => format!(
            "{feature} has drifted {} to {v} from its reference {e} (sigma {}), accumulating {:.0} sigma of excess over {}",
            if f.value >= f.expected { "up" } else { "down" },
            fmt_num(sigma),
            statistic,
            format_duration(f.ts - since)
        ),
        Detail::Stuck {
            duration,
            readings,
            longest_learned,
            ..
        } => format!(
            "{feature} frozen at {v} for {} ({readings} identical readings; longest frozen run while learning {})",
            format_duration(duration),
            format_duration(longest_learned)
        ),
        Detail::Range { lo, hi, margin } => format!(
            "{feature} {v} is outside its learned range {}..{} (margin {})",
            fmt_num(lo),
            fmt_num(hi),
            fmt_num(margin)
        ),
        Detail::Rule {
            explanation: Some(text),
            ..
        } => text,
        Detail::Note { text, .. } | Detail::Multivariate { text, .. } => text,
        Detail::Rule { value, .. } => match value {
            Some(v) => format!("rule {feature} matched (value {})", fmt_num(v)),
            None => format!("rule {feature} matched"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::normal_two_sided_surprise;

    fn names() -> (Interner, Interner, Interner) {
        let mut m = Interner::new(10);
        let mut d = Interner::new(10);
        let mut k = Interner::new(10);
        m.intern("press.07 a");
        d.intern("plc-07a");
        k.intern("temperature_c");
        (m, d, k)
    }

    fn spike(ts: Millis, z: f64) -> Finding {
        Finding {
            machine: 0,
            device: 0,
            metric: 0,
            kind: Kind::SensorSpike,
            detector: "holt_z",
            ts,
            value: 71.0 + z,
            expected: 71.0,
            surprise: normal_two_sided_surprise(z),
            detail: Detail::Spike { z, sigma: 1.0 },
            severity: None,
            subject: None,
        }
    }

    #[test]
    fn dedup_escalation_cooldown_and_ids() {
        let (m, d, k) = names();
        let n = Names {
            machines: &m,
            devices: &d,
            metrics: &k,
        };
        let mut book = AlertBook::new(0.7, 600_000, 10_000);
        let a = book
            .offer(&spike(1_000_000, 5.0), &n, 0)
            .expect("first finding raises");
        assert_eq!(a.severity, Severity::Low);
        assert!(
            book.offer(&spike(1_001_000, 5.0), &n, 0).is_none(),
            "same severity is folded"
        );
        let b = book
            .offer(&spike(1_002_000, 12.0), &n, 0)
            .expect("escalation raises");
        assert!(b.severity > a.severity);
        assert_eq!(a.incident, b.incident);
        assert_ne!(a.id, b.id);
        assert!(book.offer(&spike(1_300_000, 12.0), &n, 0).is_none());
        let c = book
            .offer(&spike(1_602_000, 12.0), &n, 0)
            .expect("reminder after cooldown");
        assert_eq!(c.incident, a.incident);
        let later = book
            .offer(&spike(3_000_000, 6.0), &n, 0)
            .expect("a new incident after a quiet cooldown");
        assert_ne!(later.incident, a.incident);
        assert!(
            book.offer(&spike(4_000_000, 3.0), &n, 0).is_none(),
            "below threshold"
        );
        assert_eq!(
            (book.raised, book.suppressed, book.below_threshold),
            (4, 2, 1)
        );

        // Same input, same ids.
        let mut again = AlertBook::new(0.7, 600_000, 10_000);
        assert_eq!(
            again.offer(&spike(1_000_000, 5.0), &n, 99).unwrap().id,
            a.id
        );
        assert_eq!(a.subject(), "twin.alerts.low.press_07_a");
        assert_eq!(a.window.as_ref().unwrap().start, "1970-01-01T00:16:40Z");
        assert_eq!(
            a.explanation,
            "temperature_c 76 is 5.0 sigma above its expected 71"
        );
    }

    /// Ids are the first 16 bytes of the SHA-256 of their parts (each after
    /// its length), in lower-case hex: the same digits as ever for the same data.
    #[test]
    fn ids_are_the_digest_in_lower_case_hex() {
        let mut h = Sha256::new();
        h.update(3u32.to_le_bytes());
        h.update(b"abc");
        let digest = h.finalize();
        let expected: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hash_id(&[b"abc"]), expected);
        assert_eq!(hash_id(&[b"abc"]).len(), 32);
        assert_ne!(hash_id(&[b"ab", b"c"]), hash_id(&[b"a", b"bc"]));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_num(96.4), "96.4");
        assert_eq!(fmt_num(1198.0), "1198");
        assert_eq!(fmt_num(2.3100), "2.31");
        assert_eq!(fmt_num(0.0042), "0.004");
        assert_eq!(fmt_num(-3.0), "-3");
        assert_eq!(fmt_num(100.04), "100");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(-0.25), "-0.25");
        assert_eq!(round_sig(71.0123456, 4), 71.01);
    }
}
