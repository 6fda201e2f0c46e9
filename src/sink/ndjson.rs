//! NDJSON sink: one alert per line, to standard output or a file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::{Sink, SinkError};
use crate::alerts::Alert;
use crate::ocsf::AlertFormat;

/// Writes alerts as NDJSON.
pub struct NdjsonSink {
    out: BufWriter<Box<dyn Write + Send>>,
    /// Alerts written.
    pub written: u64,
    format: AlertFormat,
}

impl NdjsonSink {
    /// To standard output.
    pub fn stdout() -> Self {
        Self::new(Box::new(std::io::stdout()))
    }

    /// To a file (created or truncated); `-` means standard output.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        if path == Path::new("-") {
            return Ok(Self::stdout());
        }
        Ok(Self::new(Box::new(File::create(path)?)))
    }

    pub fn new(out: Box<dyn Write + Send>) -> Self {
        NdjsonSink {
            out: BufWriter::with_capacity(64 * 1024, out),
            written: 0,
            format: AlertFormat::Json,
        }
    }

    /// Writes alerts in `format` (the contract's JSON by default).
    pub fn with_format(mut self, format: AlertFormat) -> Self {
        self.format = format;
        self
    }
}

impl Sink for NdjsonSink {
    async fn publish(&mut self, alerts: &[Alert]) -> Result<(), SinkError> {
        for a in alerts {
            let line = crate::ocsf::encode(a, self.format).map_err(std::io::Error::from)?;
            self.out.write_all(&line)?;
            self.out.write_all(b"\n")?;
            self.written += 1;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush()?;
        Ok(())
    }
}
