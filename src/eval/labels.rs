//! Scoring alerts against labelled incidents.
//!
//! An incident is *detected* when at least one alert names its machine with an
//! event time inside [start, end + grace]; *feature-matched* when such an alert
//! also names the labelled sensor. An alert that falls inside no incident of its
//! machine (with the same grace) is a *false alert*. Rates are per protected
//! machine-hour: machine-hours of input minus the warm-up, since no alert can
//! be raised while learning.

use std::collections::BTreeMap;

use crate::alerts::Alert;
use crate::sim::Label;
use crate::time::{Millis, parse_rfc3339};

/// The figures of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScore {
    pub incidents: usize,
    pub detected: usize,
    pub feature_matched: usize,
    /// Per incident type: (incidents, detected).
    pub by_type: BTreeMap<String, (usize, usize)>,
    /// Per incident type: for each alert kind, how many of its incidents it hit.
    pub kinds_by_type: BTreeMap<String, BTreeMap<String, usize>>,
    pub alerts: usize,
    pub false_alerts: usize,
    /// False alerts per alert kind.
    pub false_by_kind: BTreeMap<String, usize>,
    pub machine_hours: f64,
}

impl LabelScore {
    pub fn recall(&self) -> f64 {
        if self.incidents == 0 {
            1.0
        } else {
            self.detected as f64 / self.incidents as f64
        }
    }

    pub fn false_per_machine_hour(&self) -> f64 {
        if self.machine_hours <= 0.0 {
            0.0
        } else {
            self.false_alerts as f64 / self.machine_hours
        }
    }

    /// A short report, one line per figure.
    pub fn report(&self) -> String {
        let mut s = format!(
            "incidents {} detected {} (recall {:.3}; with the labelled sensor named: {})\n",
            self.incidents,
            self.detected,
            self.recall(),
            self.feature_matched
        );
        for (t, (n, d)) in &self.by_type {
            let kinds: Vec<String> = self
                .kinds_by_type
                .get(t)
                .map(|k| k.iter().map(|(k, n)| format!("{k} {n}")).collect())
                .unwrap_or_default();
            s.push_str(&format!("  {t:<18} {d}/{n}  [{}]\n", kinds.join(", ")));
        }
        for (k, n) in &self.false_by_kind {
            s.push_str(&format!(
                "  false {k:<20} {n} ({:.3} per machine-hour)\n",
                if self.machine_hours > 0.0 {
                    *n as f64 / self.machine_hours
                } else {
                    0.0
                }
            ));
        }
        s.push_str(&format!(
            "alerts {} false {} over {:.1} protected machine-hours = {:.3} false alerts per machine-hour",
            self.alerts,
            self.false_alerts,
            self.machine_hours,
            self.false_per_machine_hour()
        ));
        s
    }
}

/// Scores `alerts` against `labels`.
pub fn score(alerts: &[Alert], labels: &[Label], machine_hours: f64, grace: Millis) -> LabelScore {
    let spans: Vec<(&Label, Millis, Millis)> = labels
        .iter()
        .filter_map(|l| l.span().map(|(s, e)| (l, s, e + grace)))
        .collect();
    let alert_ts: Vec<Option<Millis>> = alerts.iter().map(|a| parse_rfc3339(&a.ts)).collect();
    let mut by_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut kinds_by_type: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let (mut detected, mut feature_matched) = (0, 0);
    for (l, s, e) in &spans {
        let hits: Vec<&Alert> = alerts
            .iter()
            .zip(&alert_ts)
            .filter(|(a, t)| a.machine == l.machine && t.is_some_and(|t| t >= *s && t <= *e))
            .map(|(a, _)| a)
            .collect();
        let entry = by_type.entry(l.kind.clone()).or_default();
        entry.0 += 1;
        let mut kinds: Vec<&str> = hits.iter().map(|a| a.kind.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let per = kinds_by_type.entry(l.kind.clone()).or_default();
        for k in kinds {
            *per.entry(k.to_string()).or_default() += 1;
        }
        if !hits.is_empty() {
            detected += 1;
            entry.1 += 1;
            if hits
                .iter()
                .any(|a| a.feature.is_some() && a.feature == l.metric)
            {
                feature_matched += 1;
            }
        }
    }
    let mut false_by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for (a, _) in alerts.iter().zip(&alert_ts).filter(|(a, t)| {
        !spans
            .iter()
            .any(|(l, s, e)| l.machine == a.machine && t.is_some_and(|t| t >= *s && t <= *e))
    }) {
        *false_by_kind
            .entry(a.kind.as_str().to_string())
            .or_default() += 1;
    }
    let false_alerts = false_by_kind.values().sum();
    LabelScore {
        incidents: spans.len(),
        detected,
        feature_matched,
        by_type,
        kinds_by_type,
        alerts: alerts.len(),
        false_alerts,
        false_by_kind,
        machine_hours,
    }
}
