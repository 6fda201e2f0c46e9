//! `twinwatch alerts`: what an analyst watches — the alerts on the bus as a
//! table redrawn in place (newest first, coloured by severity, counts per
//! machine), or as NDJSON for piping.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::alerts::Alert;
use crate::score::Severity;

/// The filters of the view.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub min_severity: Option<Severity>,
    pub machine: Option<String>,
}

impl Filter {
    pub fn keeps(&self, a: &Alert) -> bool {
        self.min_severity.is_none_or(|s| a.severity >= s)
            && self.machine.as_ref().is_none_or(|m| &a.machine == m)
    }
}

/// The table: the newest alerts and counts per machine.
#[derive(Debug, Default)]
pub struct Table {
    /// Newest last.
    rows: Vec<Alert>,
    per_machine: BTreeMap<String, BTreeMap<Severity, u64>>,
    total: u64,
}

/// Rows kept for the screen.
const ROWS: usize = 25;

fn colour(s: Severity) -> &'static str {
    match s {
        Severity::Critical => "\x1b[1;31m",
        Severity::High => "\x1b[31m",
        Severity::Medium => "\x1b[33m",
        Severity::Low => "\x1b[36m",
        Severity::Info => "\x1b[2m",
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

impl Table {
    pub fn add(&mut self, a: Alert) {
        *self
            .per_machine
            .entry(a.machine.clone())
            .or_default()
            .entry(a.severity)
            .or_default() += 1;
        self.total += 1;
        self.rows.push(a);
        if self.rows.len() > ROWS {
            self.rows.remove(0);
        }
    }

    /// The whole screen: clear, then the table; `ansi` adds colours and the
    /// clear-and-home sequence (a terminal), without them a plain block.
    pub fn render(&self, ansi: bool, header: &str) -> String {
        let mut out = String::new();
        if ansi {
            out.push_str("\x1b[H\x1b[2J");
        }
        let _ = writeln!(out, "{header} — {} alert(s)\n", self.total);
        let _ = writeln!(
            out,
            "{:<24} {:<9} {:<16} {:<20} {:>5}  explanation",
            "event time", "severity", "machine", "kind", "score"
        );
        for a in self.rows.iter().rev() {
            let line = format!(
                "{:<24} {:<9} {:<16} {:<20} {:>5.2}  {}",
                clip(&a.ts, 24),
                a.severity.as_str(),
                clip(&a.machine, 16),
                clip(a.kind.as_str(), 20),
                a.score,
                clip(&a.explanation, 90)
            );
            if ansi {
                let _ = writeln!(out, "{}{line}\x1b[0m", colour(a.severity));
            } else {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = writeln!(out, "\nper machine:");
        for (m, counts) in &self.per_machine {
            let parts: Vec<String> = counts
                .iter()
                .rev()
                .map(|(s, n)| format!("{} {n}", s.as_str()))
                .collect();
            let _ = writeln!(out, "  {:<16} {}", clip(m, 16), parts.join(", "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Kind;

    fn alert(machine: &str, severity: Severity, ts: &str) -> Alert {
        Alert {
            id: format!("{machine}-{ts}"),
            ts: ts.into(),
            emitted_at: ts.into(),
            machine: machine.into(),
            device: None,
            kind: Kind::SensorSpike,
            score: 0.9,
            severity,
            detector: "holt_z".into(),
            feature: None,
            value: None,
            expected: None,
            window: None,
            explanation: "x".into(),
            contributions: vec![],
            incident: "i".into(),
        }
    }

    #[test]
    fn filters_and_newest_first_with_counts() {
        let f = Filter {
            min_severity: Some(Severity::Medium),
            machine: None,
        };
        assert!(!f.keeps(&alert("a", Severity::Low, "t")));
        assert!(f.keeps(&alert("a", Severity::Critical, "t")));
        let only_b = Filter {
            machine: Some("b".into()),
            ..Filter::default()
        };
        assert!(!only_b.keeps(&alert("a", Severity::High, "t")));

        let mut t = Table::default();
        t.add(alert("a", Severity::High, "2026-11-27T08:00:01Z"));
        t.add(alert("b", Severity::Critical, "2026-11-27T08:00:02Z"));
        t.add(alert("a", Severity::Medium, "2026-11-27T08:00:03Z"));
        let plain = t.render(false, "twin.alerts.>");
        let first = plain.find("08:00:03").unwrap();
        let last = plain.find("08:00:01").unwrap();
        assert!(first < last, "newest first:\n{plain}");
        assert!(
            plain.contains("a                high 1, medium 1"),
            "{plain}"
        );
        assert!(!plain.contains('\x1b'));
        let ansi = t.render(true, "twin.alerts.>");
        assert!(ansi.starts_with("\x1b[H\x1b[2J"));
        assert!(ansi.contains("\x1b[1;31m"), "critical in bold red");
    }
}
