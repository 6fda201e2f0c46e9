//! Sources: where messages come from. Every source hands the pipeline batches
//! of [`Envelope`]s — a subject, an arrival time, headers and the raw payload
//! bytes — and nothing else, so the stages after it never know whether a
//! message came from a capture file, the simulator or the bus.
//!
//! `commit` is called once the previous batch went through the pipeline and
//! the alerts it caused were published: sources that acknowledge (JetStream)
//! acknowledge there, which makes delivery at-least-once.

pub mod capture;
pub mod nats;
pub mod sim;

use std::future::Future;

use bytes::Bytes;

use crate::time::Millis;

/// A NATS subject: text in shared bytes, so handing the client's subject to
/// an envelope copies nothing (a `String` cost an allocation per message).
pub use async_nats::Subject;

/// One message as it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// NATS subject (`twin.telemetry.<site>.<machine>`, `twin.flows.…`); empty for bare capture lines.
    pub subject: Subject,
    /// Arrival time; `None` when unknown (bare capture lines), then the event time stands in.
    pub received_at: Option<Millis>,
    /// Message headers in arrival order (a name may repeat).
    pub headers: Vec<(String, String)>,
    /// The payload exactly as received.
    pub payload: Bytes,
}

impl Envelope {
    /// A telemetry envelope with no headers.
    pub fn new(
        subject: impl Into<Subject>,
        received_at: Option<Millis>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Envelope {
            subject: subject.into(),
            received_at,
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    /// What the subject says the payload holds.
    pub fn stream(&self) -> Stream {
        if self.subject.starts_with("twin.flows.") || self.subject.as_str() == "twin.flows" {
            Stream::Flows
        } else {
            Stream::Telemetry
        }
    }

    /// The first value of a header, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The two input streams of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// §1, sensor telemetry.
    Telemetry,
    /// §2, network flow records.
    Flows,
}

/// A failure of the source itself (not of a message in it).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// Where batches of envelopes come from.
pub trait Source: Send {
    /// The next batch; `Ok(None)` at the end of the input.
    fn next_batch(
        &mut self,
    ) -> impl Future<Output = Result<Option<Vec<Envelope>>, SourceError>> + Send;

    /// Everything handed out so far went through the pipeline and its alerts are out.
    fn commit(&mut self) -> impl Future<Output = Result<(), SourceError>> + Send {
        async { Ok(()) }
    }

    /// Messages waiting behind the last one handed out, when the source knows
    /// (a JetStream consumer's pending count).
    fn pending(&self) -> Option<u64> {
        None
    }

    /// Messages dropped so far because the pipeline was behind and the
    /// source's buffer was full (core NATS: `source.max_buffered_bytes`).
    fn dropped(&self) -> u64 {
        0
    }

    /// Where in a replayable log the last message handed out sits (JetStream stream sequence).
    fn position(&self) -> Option<u64> {
        None
    }

    /// How long `next_batch` may wait for more after a batch's first message
    /// (core NATS and JetStream: `source.max_latency`); longer than this
    /// without a batch, input is quiet.
    fn fill_wait(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Stop taking new input; later calls to `next_batch` hand out what is in hand, then `None`.
    fn stop(&mut self) {}
}
