//! NATS sink: alerts to `twin.alerts.<severity>.<machine>` with a
//! `Nats-Msg-Id` header carrying the alert id, optionally stored in a
//! JetStream stream (default `TWIN_ALERTS`, on `twin.alerts.>`) whose
//! duplicate window drops alerts re-published after a restart; rejected
//! messages to `<prefix>.<reason>`, payload unchanged, with `Twin-Error`
//! (why) and `Twin-Subject` (where it was published) headers.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use tracing::info;

use super::{Sink, SinkError};
use crate::alerts::Alert;
use crate::config::SinkConfig;
use crate::decode::DecodeError;
use crate::nats::NatsError;
use crate::ocsf::AlertFormat;
use crate::source::Envelope;

/// Publishes alerts and dead letters on NATS.
pub struct NatsSink {
    client: Client,
    js: Option<jetstream::Context>,
    acks: Vec<PublishAckFuture>,
    prefix: String,
    /// Alerts published and dead letters republished.
    pub alerts: u64,
    pub dead_letters: u64,
    /// Something was published since the last flush. A flush is a round trip
    /// that queues behind every message the server is still sending this
    /// connection: under load, flushing after batches that published nothing
    /// would hold the loop for as long as the inbound backlog.
    unflushed: bool,
    format: AlertFormat,
}

impl NatsSink {
    /// Publishes alerts in `format` (the contract's JSON by default).
    pub fn with_format(mut self, format: AlertFormat) -> Self {
        self.format = format;
        self
    }

    pub async fn new(client: Client, cfg: &SinkConfig) -> Result<Self, NatsError> {
        let js = if cfg.jetstream {
            let js = jetstream::new(client.clone());
            if cfg.create {
                js.get_or_create_stream(jetstream::stream::Config {
                    name: cfg.stream.clone(),
                    subjects: vec!["twin.alerts.>".into()],
                    duplicate_window: Duration::from_millis(cfg.duplicate_window.max(1) as u64),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    NatsError::Request(format!("creating alert stream {}: {e}", cfg.stream))
                })?;
            } else {
                js.get_stream(&cfg.stream).await.map_err(|e| {
                    NatsError::Refused(format!(
                        "alert stream `{}` not found ({e}); create it, or set sink.create = true",
                        cfg.stream
                    ))
                })?;
            }
            info!(stream = %cfg.stream, "alerts are also stored in JetStream");
            Some(js)
        } else {
            None
        };
        Ok(NatsSink {
            client,
            js,
            acks: Vec::new(),
            prefix: cfg.deadletter_prefix.clone(),
            alerts: 0,
            dead_letters: 0,
            unflushed: false,
            format: AlertFormat::Json,
        })
    }
}

fn io(e: impl std::fmt::Display) -> SinkError {
    SinkError::Other(format!("publishing to NATS: {e}"))
}

impl Sink for NatsSink {
    async fn publish(&mut self, alerts: &[Alert]) -> Result<(), SinkError> {
        for a in alerts {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", a.id.as_str());
            let payload = Bytes::from(crate::ocsf::encode(a, self.format).map_err(io)?);
            match &self.js {
                Some(js) => self.acks.push(
                    js.publish_with_headers(a.subject(), headers, payload)
                        .await
                        .map_err(io)?,
                ),
                None => self
                    .client
                    .publish_with_headers(a.subject(), headers, payload)
                    .await
                    .map_err(io)?,
            }
            self.alerts += 1;
            self.unflushed = true;
        }
        Ok(())
    }

    async fn dead_letter(&mut self, env: &Envelope, error: &DecodeError) -> Result<(), SinkError> {
        let mut headers = HeaderMap::new();
        // Header values cannot hold line breaks.
        let why = error.to_string().replace(['\r', '\n'], " ");
        headers.insert("Twin-Error", why.as_str());
        if !env.subject.is_empty() {
            headers.insert("Twin-Subject", env.subject.as_str());
        }
        let subject = format!("{}.{}", self.prefix, error.reason.as_str());
        self.client
            .publish_with_headers(subject, headers, env.payload.clone())
            .await
            .map_err(io)?;
        self.dead_letters += 1;
        self.unflushed = true;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        for ack in self.acks.drain(..) {
            ack.await
                .map_err(|e| SinkError::Other(format!("alert stream did not confirm: {e}")))?;
        }
        if !std::mem::take(&mut self.unflushed) {
            return Ok(());
        }
        self.client.flush().await.map_err(io)
    }
}
