//! HTTP: what `run` tells operators and Prometheus while it runs.
//!
//! `GET /metrics` — counters and gauges in the Prometheus text format (0.0.4);
//! `GET /healthz` — `200 ok` once the NATS connection is up and the
//! subscriptions are made, `503` before and while the connection is lost (a
//! readiness probe for an orchestrator). Anything else is `404`.
//!
//! The ingest loop writes into [`Telemetry`] once per batch (a short lock,
//! no allocation beyond the first batch); the server only reads it. The
//! server is deliberately tiny — one request per connection, request heads up
//! to 8 KiB, no bodies — since only scrapers and probes talk to it, on an
//! address the operator chooses (loopback by default).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::alerts::Alert;
use crate::pipeline::Stats;

/// What the endpoint reports, shared between the loop and the server.
#[derive(Default)]
pub struct Telemetry {
    subscribed: AtomicBool,
    lateness: std::sync::atomic::AtomicI64,
    client: Mutex<Option<async_nats::Client>>,
    counts: Mutex<Counts>,
}

/// The figures behind `/metrics`.
#[derive(Default, Clone)]
struct Counts {
    stats: Stats,
    dead_letters: u64,
    /// Alerts published, by (kind, severity).
    alerts: BTreeMap<(&'static str, &'static str), u64>,
    /// Query time and runs, per file.
    queries: BTreeMap<String, (f64, u64)>,
    /// Wall clock minus the newest watermark, when last seen (ms).
    watermark_lag_ms: Option<i64>,
    /// The JetStream consumer's pending messages.
    pending: Option<u64>,
    /// Messages the source dropped because the pipeline was behind.
    input_dropped: u64,
}

impl Telemetry {
    /// Readiness: subscribed on this client (whose connection state is
    /// checked at every probe).
    pub fn set_subscribed(&self, client: &async_nats::Client) {
        if let Ok(mut c) = self.client.lock() {
            *c = Some(client.clone());
        }
        self.subscribed.store(true, Ordering::Relaxed);
    }

    /// Whether `/healthz` answers 200.
    pub fn ready(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
            && self.client.lock().is_ok_and(|c| {
                c.as_ref().is_some_and(|c| {
                    c.connection_state() == async_nats::connection::State::Connected
                })
            })
    }

    /// One batch went through: the pipeline's counters, the dead letters it
    /// sent and the alerts it published.
    /// `stats` may be `None` (the loop refreshes them a few times a second);
    /// `pending` is the JetStream consumer's pending count, when the source knows it.
    pub fn batch(
        &self,
        stats: Option<Stats>,
        pending: Option<u64>,
        dead_letters: usize,
        alerts: &[Alert],
        now: i64,
    ) {
        let Ok(mut c) = self.counts.lock() else {
            return;
        };
        if let Some(stats) = stats {
            let lateness = self.lateness.load(Ordering::Relaxed);
            c.watermark_lag_ms = stats.newest_ts.map(|t| now - (t - lateness));
            c.stats = stats;
        }
        c.pending = pending.or(c.pending);
        c.dead_letters += dead_letters as u64;
        for a in alerts {
            *c.alerts
                .entry((a.kind.as_str(), a.severity.as_str()))
                .or_default() += 1;
        }
    }

    /// The source's count of messages dropped while the pipeline was behind.
    pub fn input_dropped(&self, total: u64) {
        if let Ok(mut c) = self.counts.lock() {
            c.input_dropped = total;
        }
    }

    /// The window's allowed lateness: the watermark trails the newest event by it.
    pub fn set_lateness(&self, ms: i64) {
        self.lateness.store(ms, Ordering::Relaxed);
    }

    /// Alerts published outside a batch (a query run answering while input is quiet).
    pub fn alerts(&self, alerts: &[Alert]) {
        let Ok(mut c) = self.counts.lock() else {
            return;
        };
        for a in alerts {
            *c.alerts
                .entry((a.kind.as_str(), a.severity.as_str()))
                .or_default() += 1;
        }
    }

    /// A query run's time per file.
    pub fn query_run(&self, timings: &[(String, std::time::Duration)]) {
        let Ok(mut c) = self.counts.lock() else {
            return;
        };
        for (file, took) in timings {
            let e = c.queries.entry(file.clone()).or_default();
            e.0 += took.as_secs_f64();
            e.1 += 1;
        }
    }

    /// The Prometheus text exposition of everything above.
    pub fn render(&self) -> String {
        let c = self.counts.lock().map(|c| c.clone()).unwrap_or_default();
        let s = &c.stats;
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let one = |v: f64| vec![(String::new(), v)];
        // Plain counters without labels.
        for (name, help, v) in [
            (
                "twinwatch_envelopes_total",
                "NATS messages taken in.",
                s.envelopes,
            ),
            (
                "twinwatch_messages_total",
                "Telemetry objects decoded.",
                s.messages,
            ),
            ("twinwatch_readings_total", "Readings decoded.", s.readings),
            (
                "twinwatch_flow_records_total",
                "Flow records decoded.",
                s.flows,
            ),
        ] {
            metric(name, "counter", help, &one(v as f64));
        }
        let mut reasons: Vec<(String, f64)> = crate::decode::Reason::ALL
            .iter()
            .map(|r| {
                let n = s.rejected_by_reason.get(r.as_str()).copied().unwrap_or(0);
                (format!("{{reason=\"{}\"}}", r.as_str()), n as f64)
            })
            .collect();
        reasons.sort_by(|a, b| a.0.cmp(&b.0));
        metric(
            "twinwatch_decode_errors_total",
            "counter",
            "Messages rejected, by reason (each is also a dead letter).",
            &reasons,
        );
        metric(
            "twinwatch_dead_letters_total",
            "counter",
            "Rejected messages republished on twin.deadletter.<reason>.",
            &one(c.dead_letters as f64),
        );
        let alerts: Vec<(String, f64)> = c
            .alerts
            .iter()
            .map(|((k, sev), n)| (format!("{{kind=\"{k}\",severity=\"{sev}\"}}"), *n as f64))
            .collect();
        metric(
            "twinwatch_alerts_total",
            "counter",
            "Alerts published, by kind and severity.",
            &alerts,
        );
        metric(
            "twinwatch_late_events_total",
            "counter",
            "Events that arrived after their window closed.",
            &one(s.late as f64),
        );
        metric(
            "twinwatch_untrusted_messages_total",
            "counter",
            "Messages scored but kept out of baselines (unknown device, bad signature, skew, replay).",
            &one(s.untrusted as f64),
        );
        metric(
            "twinwatch_machines",
            "gauge",
            "Machines by phase.",
            &[
                ("{phase=\"learning\"}".into(), s.machines_learning as f64),
                (
                    "{phase=\"protecting\"}".into(),
                    s.machines_protecting as f64,
                ),
            ],
        );
        metric(
            "twinwatch_baselines",
            "gauge",
            "Baselines held: (machine, sensor) and (machine, query feature).",
            &one(s.baselines as f64),
        );
        if let Some(lag) = c.watermark_lag_ms {
            metric(
                "twinwatch_watermark_lag_seconds",
                "gauge",
                "Wall clock minus the newest watermark (newest event time - window.allowed_lateness).",
                &one(lag as f64 / 1000.0),
            );
        }
        metric(
            "twinwatch_input_dropped_total",
            "counter",
            "Core NATS messages dropped because the pipeline was behind and source.max_buffered_bytes was reached.",
            &one(c.input_dropped as f64),
        );
        if let Some(p) = c.pending {
            metric(
                "twinwatch_jetstream_pending",
                "gauge",
                "Messages the JetStream consumer has not delivered yet.",
                &one(p as f64),
            );
        }
        let (secs, runs): (Vec<_>, Vec<_>) = c
            .queries
            .iter()
            .map(|(f, (t, n))| {
                let l = format!("{{file=\"{}\"}}", f.replace(['"', '\\', '\n'], "_"));
                ((l.clone(), *t), (l, *n as f64))
            })
            .unzip();
        metric(
            "twinwatch_query_seconds_total",
            "counter",
            "Time spent running each query file.",
            &secs,
        );
        metric(
            "twinwatch_query_runs_total",
            "counter",
            "Runs of each query file.",
            &runs,
        );
        out
    }
}

/// The address to serve on: `TWINWATCH_HTTP_ADDR`, else `[http] addr`; `None` when empty.
pub fn address(cfg: &crate::config::HttpConfig) -> Option<String> {
    let addr = std::env::var("TWINWATCH_HTTP_ADDR").unwrap_or_else(|_| cfg.addr.clone());
    (!addr.trim().is_empty()).then(|| addr.trim().to_string())
}

/// Serves until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    telemetry: std::sync::Arc<Telemetry>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            _ = stop.changed() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let t = telemetry.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &t).await {
                        debug!(error = %e, "HTTP request");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting an HTTP connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, t: &Telemetry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            t.render(),
        ),
        ("GET", "/healthz") if t.ready() => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/healthz") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready: not connected to NATS or not subscribed yet\n".to_string(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /healthz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_family_once() {
        let t = Telemetry::default();
        let mut s = Stats {
            readings: 12,
            baselines: 8,
            newest_ts: Some(10_000),
            ..Stats::default()
        };
        s.rejected_by_reason.insert("invalid_json", 2);
        t.set_lateness(5_000);
        t.batch(Some(s), Some(42), 2, &[], 20_000);
        t.query_run(&[(
            "reading_stats.sql".into(),
            std::time::Duration::from_millis(1500),
        )]);
        let text = t.render();
        assert!(text.contains("twinwatch_readings_total 12\n"), "{text}");
        assert!(text.contains("twinwatch_decode_errors_total{reason=\"invalid_json\"} 2\n"));
        assert!(text.contains("twinwatch_decode_errors_total{reason=\"too_large\"} 0\n"));
        assert!(text.contains("twinwatch_dead_letters_total 2\n"));
        assert!(text.contains("twinwatch_baselines 8\n"));
        // Watermark = newest 10 s - lateness 5 s; wall clock at 20 s.
        assert!(
            text.contains("twinwatch_watermark_lag_seconds 15\n"),
            "{text}"
        );
        assert!(text.contains("twinwatch_jetstream_pending 42\n"));
        assert!(text.contains("twinwatch_input_dropped_total 0\n"));
        t.input_dropped(7);
        assert!(t.render().contains("twinwatch_input_dropped_total 7\n"));
        assert!(text.contains("twinwatch_query_seconds_total{file=\"reading_stats.sql\"} 1.5\n"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
        }
        assert!(!t.ready(), "not subscribed yet");
    }

    #[test]
    fn the_grafana_dashboard_asks_only_for_metrics_that_exist() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../deploy/grafana/twinwatch.json")).unwrap();
        let t = Telemetry::default();
        t.batch(
            Some(Stats {
                newest_ts: Some(0),
                ..Stats::default()
            }),
            Some(0),
            0,
            &[],
            0,
        );
        let families: Vec<String> = t
            .render()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        let mut asked = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for (i, _) in expr.match_indices("twinwatch_") {
                    let name: String = expr[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(families.contains(&name), "{name} in `{expr}`");
                    asked += 1;
                }
            }
        }
        assert!(asked >= 10);
    }
}
