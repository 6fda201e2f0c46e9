//! Sinks: where alerts (and dead letters) go. The pipeline hands each sink the
//! alerts of a batch; a sink that buffers must write them out by `flush`, which
//! the runner calls before it commits the batch to its source.

pub mod console;
pub mod nats;
pub mod ndjson;

use std::future::Future;

use crate::alerts::Alert;
use crate::decode::DecodeError;
use crate::source::Envelope;

/// A failure to deliver alerts.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("writing alerts: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// Where alerts go.
pub trait Sink: Send {
    /// Publishes the alerts of one batch, in order.
    fn publish(&mut self, alerts: &[Alert]) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Receives a rejected message (sinks that have a dead-letter subject republish it).
    fn dead_letter(
        &mut self,
        _env: &Envelope,
        _error: &DecodeError,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }

    /// Makes everything published so far durable or visible.
    fn flush(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Keeps alerts in memory (tests, evaluation).
#[derive(Debug, Default)]
pub struct MemorySink {
    pub alerts: Vec<Alert>,
}

impl Sink for MemorySink {
    async fn publish(&mut self, alerts: &[Alert]) -> Result<(), SinkError> {
        self.alerts.extend_from_slice(alerts);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}
