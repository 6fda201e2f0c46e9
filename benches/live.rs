//! Live throughput and latency on NATS (`cargo bench --bench live`).
//!
//! Starts its own nats-server on a free loopback port and a release
//! `twinwatch run`, then measures:
//! 1. core NATS: messages/s through the whole pipeline with no slow-consumer
//!    drops (the last message's dead-letter probe returns only after every
//!    earlier message was processed);
//! 2. publish → alert latency p50/p99 for injected spikes at a moderate,
//!    paced load;
//! 3. JetStream: messages/s from a stream backlog through a durable consumer,
//!    with state snapshots and acknowledgements.
//!
//! Environment: `LIVE_MESSAGES` (default 300000), `LIVE_MACHINES` (1000),
//! `LIVE_RATE` for the latency phase in msgs/s (20000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use async_nats::Client;
use common::{NatsServer, Twinwatch, write_config};
use futures_util::StreamExt;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A telemetry message of about 180 bytes with 4 readings.
fn message(machine: u64, ts: i64, seq: u64, spike: bool) -> String {
    let n = ((seq * 7919 + machine * 31) % 97) as f64 * 0.01;
    let t = if spike { 120.0 } else { 70.0 + n };
    format!(
        r#"{{"ts":{ts},"machine":"m-{machine:05}","device":"plc-{machine:05}","seq":{seq},"readings":{{"temperature_c":{t:.2},"vibration_mm_s":{:.3},"spindle_rpm":{:.1},"motor_current_a":{:.2}}}}}"#,
        2.3 + n / 10.0,
        1198.0 + n * 10.0,
        24.0 + n
    )
}

async fn probe(c: &Client, tag: &str) {
    let mut dl = c.subscribe("twin.deadletter.>").await.unwrap();
    c.flush().await.unwrap();
    let body = format!("probe {tag}");
    loop {
        c.publish("twin.telemetry.bench.probe", body.clone().into())
            .await
            .unwrap();
        c.flush().await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), dl.next()).await
            && m.payload == body.as_bytes()
        {
            return;
        }
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let messages = env("LIVE_MESSAGES", 300_000);
    let machines = env("LIVE_MACHINES", 1000);
    let rate = env("LIVE_RATE", 20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = (twinwatch::time::wall_now() - 3_600_000) / 1000 * 1000;

    // 1. Core throughput: paced steps, then as fast as the publisher goes.
    let server = NatsServer::start("max_payload: 1048576");
    let cfg = write_config(
        dir.path(),
        "core.toml",
        "[baseline]\nwarmup = \"1m\"\n[state]\nenabled = false\n[alerts]\ncooldown = \"1s\"\n",
    );
    let mut tw = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", &server.url()]);
    rt.block_on(async {
        let c = async_nats::connect(server.url()).await.unwrap();
        probe(&c, "ready").await;
        let mut k = 0u64;
        for step in [25_000u64, 50_000, 75_000, 100_000, 150_000, 0] {
            let drops_before = tw.stderr().matches("slow consumer").count();
            let count = if step == 0 { messages } else { step * 3 };
            let t = Instant::now();
            for i in 0..count {
                let m = i % machines;
                if m == 0 {
                    k += 1;
                }
                let body = message(m, base + k as i64 * 100, k, false);
                c.publish(format!("twin.telemetry.bench.m-{m:05}"), body.into()).await.unwrap();
                if step > 0 && i % 1000 == 999 {
                    let due = t + Duration::from_secs_f64((i + 1) as f64 / step as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            probe(&c, &format!("step {step}")).await;
            let secs = t.elapsed().as_secs_f64();
            let drops = tw.stderr().matches("slow consumer").count() - drops_before;
            println!(
                "core: {} {count} messages ({machines} machines, 4 readings each) in {secs:.2} s = {:.0} msgs/s ({:.0} readings/s) through the pipeline; slow-consumer events {drops}",
                if step == 0 { "unpaced".to_string() } else { format!("paced at {step}/s:") },
                count as f64 / secs,
                count as f64 * 4.0 / secs
            );
        }
    });
    tw.signal("TERM");
    tw.wait_exit(Duration::from_secs(20));

    // 2. Latency at a paced load.
    let mut tw = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", &server.url()]);
    let mut lat = rt.block_on(async {
        let c = async_nats::connect(server.url()).await.unwrap();
        probe(&c, "ready-2").await;
        let lat_machines = 100u64;
        // Learning: 80 s of event time per machine at 10 Hz.
        for k in 0..800u64 {
            for m in 0..lat_machines {
                c.publish(format!("twin.telemetry.bench.m-{m:05}"), message(m, base + k as i64 * 100, k, false).into()).await.unwrap();
            }
        }
        probe(&c, "learned").await;
        let mut alerts = c.subscribe("twin.alerts.>").await.unwrap();
        c.flush().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
        let collector = tokio::spawn(async move {
            let mut sent: std::collections::HashMap<String, Instant> = Default::default();
            let mut out = Vec::new();
            loop {
                tokio::select! {
                    s = rx.recv() => match s { Some((k, t)) => { sent.insert(k, t); } None => break },
                    Some(m) = alerts.next() => {
                        let now = Instant::now();
                        let a: twinwatch::alerts::Alert = serde_json::from_slice(&m.payload).unwrap();
                        if a.kind == twinwatch::detect::Kind::SensorSpike && let Some(t) = sent.remove(&format!("{}@{}", a.machine, a.ts)) {
                            out.push(now.duration_since(t).as_secs_f64() * 1000.0);
                        }
                    }
                }
            }
            // Drain alerts still in flight.
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), alerts.next()).await {
                let now = Instant::now();
                let a: twinwatch::alerts::Alert = serde_json::from_slice(&m.payload).unwrap();
                if let Some(t) = sent.remove(&format!("{}@{}", a.machine, a.ts)) {
                    out.push(now.duration_since(t).as_secs_f64() * 1000.0);
                }
            }
            out
        });
        let start = Instant::now();
        let per_tick = (rate / 100).max(1); // messages every 10 ms
        let mut k = 800u64;
        let mut sent = 0u64;
        let mut spikes = 0u64;
        let mut ticks = 0u64;
        while start.elapsed() < Duration::from_secs(10) {
            // One spike every 50 ms, on a machine chosen in turn.
            let mut pending = ticks.is_multiple_of(5).then_some((ticks / 5 * 37) % lat_machines);
            ticks += 1;
            for _ in 0..per_tick {
                let m = sent % lat_machines;
                if m == 0 {
                    k += 1;
                }
                let spike = pending == Some(m);
                if spike {
                    pending = None;
                }
                let ts = base + k as i64 * 100;
                let body = message(m, ts, k, spike);
                if spike {
                    spikes += 1;
                    tx.send((format!("m-{m:05}@{}", twinwatch::time::format_rfc3339(ts)), Instant::now())).unwrap();
                }
                c.publish(format!("twin.telemetry.bench.m-{m:05}"), body.into()).await.unwrap();
                sent += 1;
            }
            c.flush().await.unwrap();
            let due = start + Duration::from_millis(10 * (sent / per_tick));
            tokio::time::sleep_until(due.into()).await;
        }
        drop(tx);
        let lat = collector.await.unwrap();
        println!(
            "latency load: {:.0} msgs/s for 10 s, {spikes} spikes injected, {} alerts matched",
            sent as f64 / start.elapsed().as_secs_f64(),
            lat.len()
        );
        lat
    });
    tw.signal("TERM");
    tw.wait_exit(Duration::from_secs(20));
    if !lat.is_empty() {
        let p50 = percentile(&mut lat, 0.5);
        let p99 = percentile(&mut lat, 0.99);
        println!("latency: publish -> alert p50 {p50:.2} ms, p99 {p99:.2} ms");
    }
    drop(server);

    // 3. JetStream throughput from a backlog.
    let server = NatsServer::jetstream("");
    let state = dir.path().join("state.json");
    let cfg = write_config(
        dir.path(),
        "js.toml",
        &format!(
            "[baseline]\nwarmup = \"1m\"\n[source.jetstream]\nenabled = true\ncreate = true\n[state]\npath = \"{}\"\ninterval = \"1s\"\n",
            state.display()
        ),
    );
    let js_messages = messages.min(200_000);
    let js_rate = rt.block_on(async {
        let c = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(c.clone());
        let backlog = (0..js_messages).map(|i| {
            let (m, k) = (i % machines, i / machines);
            (
                format!("twin.telemetry.bench.m-{m:05}"),
                message(m, base + k as i64 * 100, k, false).into(),
            )
        });
        common::publish_backlog(&js, backlog).await;
        let tw = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", &server.url()]);
        let stream = js.get_stream("TWIN_TELEMETRY").await.unwrap();
        let t = Instant::now();
        loop {
            if let Ok(info) = stream.consumer_info("twinwatch").await
                && info.ack_floor.stream_sequence >= js_messages
            {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(300), "{}", tw.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tw.signal("TERM");
        js_messages as f64 / t.elapsed().as_secs_f64()
    });
    println!(
        "jetstream: {js_messages} messages from a stream backlog, {js_rate:.0} msgs/s acknowledged (snapshots every 1 s)"
    );
}
