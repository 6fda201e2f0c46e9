//! Console sink: one readable line per alert, coloured by severity when the
//! output is a terminal (used by `demo`).

use std::io::{IsTerminal, Write};

use super::{Sink, SinkError};
use crate::alerts::Alert;
use crate::score::Severity;

/// Prints alerts for people.
pub struct ConsoleSink {
    colour: bool,
    /// Alerts printed.
    pub printed: u64,
}

impl Default for ConsoleSink {
    fn default() -> Self {
        ConsoleSink {
            colour: std::io::stdout().is_terminal(),
            printed: 0,
        }
    }
}

/// One alert as a line of text.
pub fn format_line(a: &Alert, colour: bool) -> String {
    let sev = format!("{:<8}", a.severity.as_str().to_uppercase());
    let sev = if colour {
        let code = match a.severity {
            Severity::Critical => "1;97;41",
            Severity::High => "1;31",
            Severity::Medium => "33",
            Severity::Low => "36",
            Severity::Info => "2",
        };
        format!("\x1b[{code}m{sev}\x1b[0m")
    } else {
        sev
    };
    format!(
        "{}  {sev} {:<10} {:<20} {:.2}  {}",
        a.ts,
        a.machine,
        a.kind.as_str(),
        a.score,
        a.explanation
    )
}

impl Sink for ConsoleSink {
    async fn publish(&mut self, alerts: &[Alert]) -> Result<(), SinkError> {
        let mut out = std::io::stdout().lock();
        for a in alerts {
            writeln!(out, "{}", format_line(a, self.colour))?;
            self.printed += 1;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        std::io::stdout().flush()?;
        Ok(())
    }
}
