//! NATS source: core subscriptions (optionally in a queue group) or a durable
//! JetStream pull consumer, turned into batches of envelopes bounded in size
//! (`source.max_batch` messages, `source.max_batch_bytes` of payload) and in
//! latency (`source.max_latency` after the batch's first message).
//!
//! JetStream: with `create = true` the stream (on `source.subjects`) and the
//! consumer are created when missing; otherwise both are bound and a missing
//! one is a configuration error. Messages are acknowledged in [`Source::commit`],
//! which the live runner calls once the alerts a batch caused are published
//! and a state snapshot holding its effects is written — at-least-once delivery
//! with state that matches what was acknowledged. When a snapshot says which
//! stream sequence it holds, a created consumer restarts right after it; a bound
//! consumer's older messages are acknowledged and skipped.
//!
//! Core messages are taken off the client as they arrive by a task of their
//! own, which turns them into envelopes and holds them for the pipeline in an
//! [`Inbox`] bounded in bytes (`source.max_buffered_bytes`): while the pipeline
//! is behind, the backlog costs at most that much memory, whatever the size of
//! the messages, and what arrives past it is dropped and counted
//! ([`Source::dropped`]). The client's own buffer (`nats.subscription_capacity`,
//! counted in messages) stays short behind it.
//!
//! `next_batch` is cancel-safe: a partial batch lives in the source, not in the
//! future, so the runner may race it against a shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self, AckKind, consumer::AckPolicy, consumer::DeliverPolicy, consumer::pull,
};
use async_nats::{Client, HeaderMap, Message};
use futures_util::FutureExt;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Envelope, Source, SourceError};
use crate::config::SourceConfig;
use crate::nats::NatsError;
use crate::time::wall_now;

/// Converts NATS headers to envelope headers.
fn headers_of(h: Option<&HeaderMap>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(h) = h {
        for (name, values) in h.iter() {
            for v in values {
                out.push((name.to_string(), v.as_str().to_string()));
            }
        }
        out.sort();
    }
    out
}

/// A core NATS message as an envelope that arrived at `received_at`. Its
/// subject and payload move into the envelope: no copy, and no shared header
/// allocated for a second owner of either.
pub fn envelope(m: Message, received_at: i64) -> Envelope {
    Envelope {
        received_at: Some(received_at),
        headers: headers_of(m.headers.as_ref()),
        subject: m.subject,
        payload: m.payload,
    }
}

/// What one held envelope costs the inbox: its bytes and its bookkeeping.
fn held_bytes(e: &Envelope) -> usize {
    // The envelope itself, its slot in the channel and the allocations' headers.
    const OVERHEAD: usize = std::mem::size_of::<Envelope>() + 64;
    OVERHEAD
        + e.payload.len()
        + e.subject.len()
        + e.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 48)
            .sum::<usize>()
}

/// Core messages waiting for the pipeline, at most `budget` bytes of them
/// (see the module docs). Dropping it stops the task that fills it.
///
/// They come over in chunks: whatever had arrived when the task woke, up to
/// [`CHUNK`] messages, in one send. One channel operation a chunk instead
/// of one a message, and one count of the bytes held.
struct Inbox {
    rx: mpsc::UnboundedReceiver<Chunk>,
    /// The chunk being handed out.
    current: std::vec::IntoIter<Envelope>,
    held: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Envelopes sent over at once, and what they cost the inbox.
struct Chunk {
    envelopes: Vec<Envelope>,
    cost: usize,
}

/// Most messages in one chunk. A chunk is counted out of the inbox when it
/// is received, before its envelopes are handed out: the inbox may hold up to
/// a chunk (some 40 KB of default messages) more than `budget`.
const CHUNK: usize = 128;

impl Inbox {
    /// Drops past `budget` are counted in `dropped`.
    fn new(subscriptions: Subscriptions, budget: usize, dropped: Arc<AtomicU64>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(take_in(subscriptions, tx, held.clone(), dropped, budget));
        Inbox {
            rx,
            current: Vec::new().into_iter(),
            held,
            task,
        }
    }

    /// The next envelope; `None` once the subscriptions ended.
    async fn next(&mut self) -> Option<Envelope> {
        loop {
            if let Some(e) = self.ready() {
                return Some(e);
            }
            let chunk = self.rx.recv().await?;
            self.hand_out(chunk);
        }
    }

    /// The next envelope already here (in the chunk being handed out, or in
    /// one already sent), without waiting: a batch fills from these without
    /// a future per message.
    fn ready(&mut self) -> Option<Envelope> {
        loop {
            if let Some(e) = self.current.next() {
                return Some(e);
            }
            let chunk = self.rx.try_recv().ok()?;
            self.hand_out(chunk);
        }
    }

    /// Counts a received chunk out of the inbox and hands out its envelopes next.
    fn hand_out(&mut self, chunk: Chunk) {
        self.held.fetch_sub(chunk.cost, Ordering::AcqRel);
        self.current = chunk.envelopes.into_iter();
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The core subscriptions, polled in turn: each poll starts at the one
/// after the last that gave a message, so a busy subject does not starve the
/// others. (A `SelectAll` does the same, but queues a subscription's future
/// anew, one allocation, for every message it yields.)
#[derive(Default)]
struct Subscriptions {
    streams: Vec<BoxStream<'static, Message>>,
    /// Where the next poll starts.
    turn: usize,
}

impl Subscriptions {
    fn push(&mut self, s: BoxStream<'static, Message>) {
        self.streams.push(s);
    }
}

impl Stream for Subscriptions {
    type Item = Message;

    /// A message from the first subscription in turn that has one; `None`
    /// once every subscription has ended.
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Message>> {
        use std::task::Poll;
        let this = &mut *self;
        let mut tried = 0;
        while tried < this.streams.len() {
            let k = this.turn % this.streams.len();
            match this.streams[k].poll_next_unpin(cx) {
                Poll::Ready(Some(m)) => {
                    this.turn = k + 1;
                    return Poll::Ready(Some(m));
                }
                Poll::Ready(None) => {
                    // Ended: the next one takes its place in the turn.
                    drop(this.streams.swap_remove(k));
                    this.turn = k;
                }
                Poll::Pending => {
                    this.turn = k + 1;
                    tried += 1;
                }
            }
        }
        if this.streams.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

/// How often the "dropped" warning may repeat.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Takes messages off the subscriptions as they arrive and into the inbox,
/// dropping (and counting) what would take it past `budget` bytes.
async fn take_in(
    mut subscriptions: Subscriptions,
    tx: mpsc::UnboundedSender<Chunk>,
    held: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    budget: usize,
) {
    let mut warned: Option<Instant> = None;
    let mut ended = false;
    // Each chunk fills this one vector, then moves out in an allocation of
    // its exact size: one allocation a chunk, not six regrowths on the way to
    // [`CHUNK`], and no spare room held. (Spare room is not counted against
    // the budget, and a pipeline behind a trickle holds thousands of
    // one-message chunks: 13 KB each at [`CHUNK`]'s room, 450 bytes counted.)
    let mut filling: Vec<Envelope> = Vec::with_capacity(CHUNK);
    while !ended {
        let Some(first) = subscriptions.next().await else {
            return;
        };
        // One arrival time for what had arrived together (milliseconds).
        let now = wall_now();
        let before = held.load(Ordering::Acquire);
        let mut chunk_cost = 0;
        let mut next = Some(first);
        while let Some(m) = next.take() {
            let e = envelope(m, now);
            let cost = held_bytes(&e);
            // An empty inbox takes any message, so one larger than the budget
            // (up to input.max_payload_bytes) is still processed, alone.
            let held_now = before + chunk_cost;
            if held_now > 0 && held_now + cost > budget {
                let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if warned.is_none_or(|at| at.elapsed() >= DROP_WARNING_EVERY) {
                    warned = Some(Instant::now());
                    warn!(
                        dropped_total = n,
                        max_buffered_bytes = budget,
                        "the pipeline is behind and source.max_buffered_bytes is reached: new messages are dropped; \
                         give twinwatch more CPU, split the subjects over a queue group, or consume through JetStream"
                    );
                }
            } else {
                chunk_cost += cost;
                filling.push(e);
            }
            if filling.len() < CHUNK {
                // What has already arrived joins the chunk; nothing waits.
                match subscriptions.next().now_or_never() {
                    Some(Some(m)) => next = Some(m),
                    Some(None) => ended = true,
                    None => {}
                }
            }
        }
        if filling.is_empty() {
            continue;
        }
        let mut envelopes = Vec::with_capacity(filling.len());
        envelopes.append(&mut filling);
        let chunk = Chunk {
            envelopes,
            cost: chunk_cost,
        };
        held.fetch_add(chunk.cost, Ordering::AcqRel);
        if tx.send(chunk).is_err() {
            return;
        }
    }
}

enum Feed {
    Core(Inbox),
    JetStream(BoxStream<'static, Result<jetstream::Message, String>>),
    Ended,
}

/// Consumes from NATS.
pub struct NatsSource {
    feed: Feed,
    max_batch: usize,
    max_batch_bytes: usize,
    /// Payload bytes of `pending`.
    pending_bytes: usize,
    max_latency: Duration,
    pending: Vec<Envelope>,
    /// Ackers of messages handed out but not yet acknowledged.
    ackers: Vec<jetstream::message::Acker>,
    ack_all: bool,
    /// Messages at or below this stream sequence are already in the restored state.
    skip_through: u64,
    position: Option<u64>,
    /// The consumer's pending count, as the last JetStream message said.
    js_pending: Option<u64>,
    stopping: bool,
    /// Messages the inbox dropped (it outlives the inbox: the count stays after the feed ends).
    dropped: Arc<AtomicU64>,
}

impl NatsSource {
    /// Core subscriptions on `cfg.subjects`.
    pub async fn core(client: &Client, cfg: &SourceConfig) -> Result<Self, NatsError> {
        let mut all = Subscriptions::default();
        for subject in &cfg.subjects {
            let sub = if cfg.queue_group.is_empty() {
                client.subscribe(subject.clone()).await
            } else {
                client
                    .queue_subscribe(subject.clone(), cfg.queue_group.clone())
                    .await
            }
            .map_err(|e| NatsError::Request(format!("subscribing to {subject}: {e}")))?;
            all.push(sub.boxed());
        }
        client
            .flush()
            .await
            .map_err(|e| NatsError::Request(format!("confirming the subscriptions: {e}")))?;
        info!(subjects = ?cfg.subjects, queue_group = %cfg.queue_group, "subscribed");
        let dropped = Arc::new(AtomicU64::new(0));
        let inbox = Inbox::new(all, cfg.max_buffered_bytes.max(1), dropped.clone());
        Ok(Self {
            dropped,
            ..Self::new(Feed::Core(inbox), cfg, true, 0)
        })
    }

    /// A durable pull consumer; `resume_after` is the stream sequence the restored state holds.
    pub async fn jetstream(
        client: &Client,
        cfg: &SourceConfig,
        resume_after: Option<u64>,
    ) -> Result<Self, NatsError> {
        let j = &cfg.jetstream;
        let js = jetstream::new(client.clone());
        let req =
            |what: &str, e: &dyn std::fmt::Display| NatsError::Request(format!("{what}: {e}"));
        let stream = if j.create {
            js.get_or_create_stream(jetstream::stream::Config {
                name: j.stream.clone(),
                subjects: cfg.subjects.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| req(&format!("creating stream {}", j.stream), &e))?
        } else {
            js.get_stream(&j.stream).await.map_err(|e| {
                NatsError::Refused(format!(
                    "JetStream stream `{}` not found ({e}); create it, or set source.jetstream.create = true",
                    j.stream
                ))
            })?
        };
        let wanted = pull::Config {
            durable_name: Some(j.consumer.clone()),
            ack_policy: AckPolicy::All,
            ack_wait: Duration::from_millis(j.ack_wait.max(1) as u64),
            max_ack_pending: j.max_ack_pending,
            deliver_policy: match resume_after {
                Some(seq) => DeliverPolicy::ByStartSequence {
                    start_sequence: seq + 1,
                },
                None => DeliverPolicy::All,
            },
            ..Default::default()
        };
        let consumer: jetstream::consumer::Consumer<pull::Config> = if j.create {
            if resume_after.is_some() {
                // Restart exactly after what the restored state holds.
                let _ = stream.delete_consumer(&j.consumer).await;
                stream
                    .create_consumer(wanted)
                    .await
                    .map_err(|e| req(&format!("creating consumer {}", j.consumer), &e))?
            } else {
                stream
                    .get_or_create_consumer(&j.consumer, wanted)
                    .await
                    .map_err(|e| req(&format!("creating consumer {}", j.consumer), &e))?
            }
        } else {
            stream.get_consumer(&j.consumer).await.map_err(|e| {
                NatsError::Refused(format!(
                    "JetStream consumer `{}` on stream `{}` not found ({e}); create it, or set source.jetstream.create = true",
                    j.consumer, j.stream
                ))
            })?
        };
        let ack_all = consumer.cached_info().config.ack_policy == AckPolicy::All;
        let messages = consumer
            .stream()
            .max_messages_per_batch(cfg.max_batch.max(1))
            .messages()
            .await
            .map_err(|e| req("starting to pull", &e))?
            .map(|r| r.map_err(|e| e.to_string()))
            .boxed();
        info!(stream = %j.stream, consumer = %j.consumer, resume_after = ?resume_after, "consuming from JetStream");
        Ok(Self::new(
            Feed::JetStream(messages),
            cfg,
            ack_all,
            resume_after.unwrap_or(0),
        ))
    }

    fn new(feed: Feed, cfg: &SourceConfig, ack_all: bool, skip_through: u64) -> Self {
        NatsSource {
            feed,
            max_batch: cfg.max_batch.max(1),
            max_batch_bytes: cfg.max_batch_bytes.max(1),
            pending_bytes: 0,
            max_latency: Duration::from_millis(cfg.max_latency.max(0) as u64),
            pending: Vec::new(),
            ackers: Vec::new(),
            ack_all,
            skip_through,
            position: None,
            js_pending: None,
            stopping: false,
            dropped: Arc::default(),
        }
    }

    /// Adds an envelope to the batch being filled.
    fn hold(&mut self, e: Envelope) {
        self.pending_bytes += e.payload.len();
        self.pending.push(e);
    }

    /// Waits for the next message; `None` when the feed has ended.
    async fn next_one(&mut self) -> Option<()> {
        match &mut self.feed {
            Feed::Core(inbox) => {
                let e = inbox.next().await?;
                self.hold(e);
                Some(())
            }
            Feed::JetStream(s) => loop {
                match s.next().await? {
                    Ok(m) => {
                        let now = wall_now();
                        let info = m.info().ok();
                        let seq = info.as_ref().map_or(0, |i| i.stream_sequence);
                        if let Some(i) = &info {
                            self.js_pending = Some(i.pending);
                        }
                        // Arrival is when the stream stored it, not when a
                        // backlog is read: clock checks stay meaningful after downtime.
                        let stored = info.map_or(now, |i| {
                            (i.published.unix_timestamp_nanos() / 1_000_000) as i64
                        });
                        let (msg, acker) = m.split();
                        if seq != 0 && seq <= self.skip_through {
                            // Already in the restored state.
                            let _ = acker.ack_with(AckKind::Ack).await;
                            continue;
                        }
                        if seq != 0 && self.position.is_some_and(|p| seq <= p) {
                            // A redelivery of a message already processed; a later ack covers it.
                            continue;
                        }
                        self.hold(envelope(msg, stored));
                        if self.ack_all {
                            self.ackers.clear();
                        }
                        self.ackers.push(acker);
                        if seq != 0 {
                            self.position = Some(seq);
                        }
                        return Some(());
                    }
                    Err(e) => warn!(error = %e, "JetStream pull failed; retrying"),
                }
            },
            Feed::Ended => None,
        }
    }
}

impl Source for NatsSource {
    async fn next_batch(&mut self) -> Result<Option<Vec<Envelope>>, SourceError> {
        if self.pending.is_empty() {
            if self.stopping {
                return Ok(None);
            }
            if self.next_one().await.is_none() {
                self.feed = Feed::Ended;
                return Ok(None);
            }
        }
        let deadline = tokio::time::Instant::now() + self.max_latency;
        while self.pending.len() < self.max_batch
            && self.pending_bytes < self.max_batch_bytes
            && !self.stopping
        {
            if let Feed::Core(inbox) = &mut self.feed
                && let Some(e) = inbox.ready()
            {
                self.hold(e);
                continue;
            }
            // What has already arrived is taken without a timer; only an
            // empty buffer waits (until the batch's deadline).
            let next = match self.next_one().now_or_never() {
                Some(next) => Ok(next),
                None => tokio::time::timeout_at(deadline, self.next_one()).await,
            };
            match next {
                Ok(Some(())) => {}
                Ok(None) => {
                    self.feed = Feed::Ended;
                    break;
                }
                Err(_) => break,
            }
        }
        self.pending_bytes = 0;
        // The next batch is likely about this one's size: its vector is
        // allocated once instead of grown by doubling (a dozen copies for a
        // batch of 4,096 envelopes).
        let next = Vec::with_capacity(self.pending.len());
        Ok(Some(std::mem::replace(&mut self.pending, next)))
    }

    async fn commit(&mut self) -> Result<(), SourceError> {
        for a in self.ackers.drain(..) {
            a.ack()
                .await
                .map_err(|e| SourceError::Other(format!("acknowledging to JetStream: {e}")))?;
        }
        Ok(())
    }

    fn position(&self) -> Option<u64> {
        self.position
    }

    fn fill_wait(&self) -> Duration {
        self.max_latency
    }

    fn pending(&self) -> Option<u64> {
        self.js_pending
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn stop(&mut self) {
        // Stop pulling new messages; what is already in hand still goes through.
        self.stopping = true;
        self.feed = Feed::Ended;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(i: usize) -> Message {
        Message {
            subject: format!("twin.telemetry.t.m-{i}").into(),
            reply: None,
            payload: format!("{{\"seq\":{i}}}").into(),
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    fn arrived(n: usize) -> Subscriptions {
        let mut all = Subscriptions::default();
        all.push(futures_util::stream::iter((0..n).map(message)).boxed());
        all
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// Subscriptions are taken in turn while each has messages, one that
    /// ends leaves the others going, and the whole ends with the last.
    #[test]
    fn subscriptions_are_taken_in_turn_until_the_last_ends() {
        runtime().block_on(async {
            let mut all = Subscriptions::default();
            let from = |range: std::ops::Range<usize>| {
                futures_util::stream::iter(range.map(message)).boxed()
            };
            all.push(from(0..2));
            all.push(from(100..105));
            all.push(from(200..203));
            let mut got = Vec::new();
            while let Some(m) = all.next().await {
                got.push(m.payload);
            }
            let want: Vec<bytes::Bytes> = [0, 100, 200, 1, 101, 201, 202, 102, 103, 104]
                .into_iter()
                .map(|i| message(i).payload)
                .collect();
            assert_eq!(got, want);
            assert!(all.next().await.is_none());
            assert!(Subscriptions::default().next().await.is_none());
        });
    }

    /// Messages that arrived together go over in chunks of up to [`CHUNK`],
    /// in order, each counted in the inbox once.
    #[test]
    fn what_arrived_together_goes_over_in_chunks() {
        runtime().block_on(async {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let held = Arc::new(AtomicUsize::new(0));
            let dropped = Arc::new(AtomicU64::new(0));
            let n = 2 * CHUNK + 5;
            take_in(arrived(n), tx, held.clone(), dropped.clone(), usize::MAX).await;
            let mut sizes = Vec::new();
            let mut cost = 0;
            let mut seqs = Vec::new();
            while let Some(chunk) = rx.recv().await {
                sizes.push(chunk.envelopes.len());
                // Moved out in an allocation of its own size: no spare room held.
                assert_eq!(chunk.envelopes.capacity(), chunk.envelopes.len());
                assert_eq!(
                    chunk.cost,
                    chunk.envelopes.iter().map(held_bytes).sum::<usize>()
                );
                cost += chunk.cost;
                seqs.extend(chunk.envelopes.iter().map(|e| e.payload.clone()));
            }
            assert_eq!(sizes, [CHUNK, CHUNK, 5]);
            assert_eq!(held.load(Ordering::Acquire), cost);
            assert_eq!(dropped.load(Ordering::Relaxed), 0);
            let want: Vec<bytes::Bytes> = (0..n).map(|i| message(i).payload).collect();
            assert_eq!(seqs, want);
            // A lone message's chunk holds no room for a full one.
            let (tx, mut rx) = mpsc::unbounded_channel();
            take_in(arrived(1), tx, held.clone(), dropped.clone(), usize::MAX).await;
            let lone = rx.recv().await.expect("one chunk");
            assert!(
                lone.envelopes.capacity() < CHUNK / 8,
                "{}",
                lone.envelopes.capacity()
            );
        });
    }

    /// What has arrived is handed out without waiting, in order, across
    /// chunks, each counted out of the inbox; nothing more once it is empty.
    #[test]
    fn what_has_arrived_is_handed_out_without_waiting() {
        runtime().block_on(async {
            let dropped = Arc::new(AtomicU64::new(0));
            let n = 2 * CHUNK + 3;
            let mut inbox = Inbox::new(arrived(n), usize::MAX, dropped);
            // Nothing is there until the task that fills it has run.
            let first = inbox.next().await.expect("a message");
            tokio::task::yield_now().await;
            let mut got = vec![first.payload];
            while let Some(e) = inbox.ready() {
                got.push(e.payload);
            }
            let want: Vec<bytes::Bytes> = (0..n).map(|i| message(i).payload).collect();
            assert_eq!(got, want);
            assert_eq!(inbox.held.load(Ordering::Acquire), 0);
            assert!(inbox.ready().is_none());
        });
    }

    /// The budget holds within a chunk: what would pass it is dropped and
    /// counted, and the inbox hands out the rest in order.
    #[test]
    fn the_budget_holds_within_a_chunk() {
        runtime().block_on(async {
            let one = held_bytes(&envelope(message(0), 0));
            let dropped = Arc::new(AtomicU64::new(0));
            let mut inbox = Inbox::new(arrived(50), 10 * one + one / 2, dropped.clone());
            let mut got = Vec::new();
            while let Ok(Some(e)) =
                tokio::time::timeout(Duration::from_millis(200), inbox.next()).await
            {
                got.push(e.payload);
            }
            // Messages 0–9 cost `one` each, the later ones two bytes more
            // (their digits): ten fit, and the eleventh would pass the budget.
            assert_eq!(got.len(), 10);
            assert_eq!(got.len() as u64 + dropped.load(Ordering::Relaxed), 50);
            let want: Vec<bytes::Bytes> = (0..got.len()).map(|i| message(i).payload).collect();
            assert_eq!(got, want);
            assert_eq!(inbox.held.load(Ordering::Acquire), 0);
        });
    }
}
