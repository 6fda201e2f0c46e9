//! The commands that talk to NATS: `run`, `record`, `alerts`, and `simulate --nats-url`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    AlertsArgs, RecordArgs, RunArgs, SimulateArgs, UsageError, load_config, runtime, summary_line,
    write_labels,
};
use crate::config::Config;
use crate::live::{Checkpoints, run_live};
use crate::nats::{NatsError, connect};
use crate::pipeline::Pipeline;
use crate::sim::Factory;
use crate::sink::nats::NatsSink;
use crate::source::capture::CaptureWriter;
use crate::source::nats::{NatsSource, envelope};
use crate::state::StateStore;
use crate::time::wall_now;

/// A watch that turns true on SIGTERM or Ctrl-C.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C still stops");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        let _ = tx.send(true);
    });
    rx
}

/// Maps connection failures: refusals are bad configuration (exit 2).
fn nats_error(e: NatsError) -> anyhow::Error {
    match e {
        NatsError::Refused(m) => UsageError(m).into(),
        other => anyhow::anyhow!(other),
    }
}

/// Connects (retrying an unreachable server); `None` when stopped first.
async fn connect_until_stopped(
    cfg: &Config,
    stop: &watch::Receiver<bool>,
) -> Result<Option<async_nats::Client>> {
    match connect(&cfg.nats, &mut stop.clone()).await {
        Ok(c) => Ok(Some(c)),
        Err(NatsError::Stopped) => Ok(None),
        Err(e) => Err(nats_error(e)),
    }
}

fn with_url(mut cfg: Config, url: Option<String>) -> Config {
    if let Some(u) = url {
        cfg.nats.url = u;
    }
    cfg
}

pub fn run(a: RunArgs) -> Result<()> {
    let mut cfg = with_url(load_config(a.config.as_deref())?, a.nats_url);
    if let Some(f) = a.alert_format {
        cfg.alerts.format = f;
    }
    runtime()?.block_on(async move {
        let stop = shutdown_signal();
        // Served from the start, so /healthz says "not ready" while connecting.
        let telemetry = std::sync::Arc::new(crate::http::Telemetry::default());
        telemetry.set_lateness(cfg.window.allowed_lateness);
        if let Some(addr) = crate::http::address(&cfg.http) {
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => {
                    info!(addr = %addr, "metrics on http://{addr}/metrics, readiness on /healthz");
                    tokio::spawn(crate::http::serve(l, telemetry.clone(), stop.clone()));
                }
                Err(e) => warn!(
                    error = %e,
                    addr = %addr,
                    "cannot serve /metrics and /healthz here; set [http] addr or TWINWATCH_HTTP_ADDR (\"\" turns it off)"
                ),
            }
        }
        let Some(client) = connect_until_stopped(&cfg, &stop).await? else {
            return Ok(());
        };
        let store = cfg.state.enabled.then(|| StateStore::new(&cfg.state.path));
        let restored = store.as_ref().and_then(StateStore::load);
        let resume_after = restored.as_ref().and_then(|c| c.stream_seq);
        let mut pipeline = match restored {
            Some(c) => Pipeline::restore(&cfg, c.pipeline),
            None => Pipeline::new(&cfg),
        };
        let registry_path = std::path::PathBuf::from(&cfg.devices.registry);
        pipeline.set_registry(super::load_registry(&cfg, None)?);
        pipeline.watch_registry(crate::registry::RegistryWatch::new(
            &registry_path,
            Duration::from_millis(cfg.devices.reload.max(1) as u64),
        ));
        let mut sink = NatsSink::new(client.clone(), &cfg.sink)
            .await
            .map_err(nats_error)?
            .with_format(cfg.alerts.format);
        let checkpoints = store.as_ref().map(|store| Checkpoints {
            store,
            interval: Duration::from_millis(cfg.state.interval.max(1) as u64),
        });
        let started = Instant::now();
        let when_behind = crate::features::WhenBehind::for_source(cfg.source.jetstream.enabled);
        let stage = super::features_beside(&cfg, &mut pipeline, when_behind).await;
        let mut source = if cfg.source.jetstream.enabled {
            NatsSource::jetstream(&client, &cfg.source, resume_after).await
        } else {
            NatsSource::core(&client, &cfg.source).await
        }
        .map_err(nats_error)?;
        telemetry.set_subscribed(&client);
        let summary = run_live(
            &mut pipeline,
            &mut source,
            &mut sink,
            checkpoints,
            stage,
            Some(&telemetry),
            stop,
        )
        .await?;
        if let Err(e) = client.drain().await {
            warn!(error = %e, "draining the NATS connection");
        }
        info!(
            batches = summary.batches,
            checkpoints = summary.checkpoints,
            query_runs = summary.query_runs,
            query_seconds = format!("{:.2}", summary.query_busy.as_secs_f64()),
            query_runs_folded = summary.query_deferred,
            query_windows_shed = summary.query_windows_shed,
            input_dropped = summary.input_dropped,
            dead_letters = sink.dead_letters,
            "stopped: {}",
            summary_line(&pipeline.stats(), started.elapsed().as_secs_f64())
        );
        Ok(())
    })
}

pub fn record(a: RecordArgs) -> Result<()> {
    let cfg = with_url(load_config(a.config.as_deref())?, a.nats_url);
    let subjects = if a.subjects.is_empty() {
        cfg.source.subjects.clone()
    } else {
        a.subjects.clone()
    };
    let file = std::fs::File::create(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    runtime()?.block_on(async move {
        let mut stop = shutdown_signal();
        let Some(client) = connect_until_stopped(&cfg, &stop).await? else {
            return Ok(());
        };
        let mut subs = futures_util::stream::SelectAll::new();
        for s in &subjects {
            subs.push(client.subscribe(s.clone()).await.with_context(|| format!("subscribing to {s}"))?);
        }
        client.flush().await.context("confirming the subscriptions")?;
        info!(subjects = ?subjects, output = %a.output.display(), "recording");
        let mut w = CaptureWriter::new(std::io::BufWriter::with_capacity(1 << 20, file));
        let deadline = a.duration.map(|d| tokio::time::Instant::now() + Duration::from_millis(d as u64));
        let mut n = 0u64;
        loop {
            let m = tokio::select! {
                _ = stop.changed() => break,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
                m = subs.next() => match m { Some(m) => m, None => break },
            };
            w.write(&envelope(m, wall_now()))?;
            n += 1;
            if a.count.is_some_and(|c| n >= c) {
                break;
            }
        }
        w.flush()?;
        info!(messages = n, output = %a.output.display(), "recording written");
        Ok(())
    })
}

pub fn alerts(a: AlertsArgs) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let cfg = with_url(load_config(a.config.as_deref())?, a.nats_url);
    let filter = super::view::Filter {
        min_severity: a.min_severity,
        machine: a.machine.clone(),
    };
    // A machine's alerts are on `twin.alerts.*.<machine token>`: the server filters.
    let subject = match &a.machine {
        Some(m) => format!("twin.alerts.*.{}", crate::alerts::subject_token(m)),
        None => "twin.alerts.>".to_string(),
    };
    let ansi = std::io::stdout().is_terminal();
    runtime()?.block_on(async move {
        let mut stop = shutdown_signal();
        let Some(client) = connect_until_stopped(&cfg, &stop).await? else {
            return Ok(());
        };
        let mut sub = client
            .subscribe(subject.clone())
            .await
            .with_context(|| format!("subscribing to {subject}"))?;
        client.flush().await.context("confirming the subscription")?;
        info!(subject = %subject, "watching alerts");
        let mut table = super::view::Table::default();
        let mut out = std::io::stdout().lock();
        if !a.json {
            write!(out, "{}", table.render(ansi, &subject))?;
            out.flush()?;
        }
        let (mut shown, mut foreign) = (0u64, 0u64);
        loop {
            let m = tokio::select! {
                _ = stop.changed() => break,
                m = sub.next() => match m { Some(m) => m, None => break },
            };
            let alert: crate::alerts::Alert = match serde_json::from_slice(&m.payload) {
                Ok(al) => al,
                Err(e) => {
                    // OCSF or foreign payloads: said once, not per message.
                    foreign += 1;
                    if foreign == 1 {
                        warn!(error = %e, subject = %m.subject, "an alert not in the contract's format (is the processor set to format = \"ocsf\"?); skipping such payloads");
                    }
                    continue;
                }
            };
            if !filter.keeps(&alert) {
                continue;
            }
            if a.json {
                out.write_all(&m.payload)?;
                out.write_all(b"\n")?;
            } else {
                table.add(alert);
                write!(out, "{}", table.render(ansi, &subject))?;
            }
            out.flush()?;
            shown += 1;
            if a.count.is_some_and(|c| shown >= c) {
                break;
            }
        }
        Ok(())
    })
}

pub fn simulate(a: SimulateArgs) -> Result<()> {
    let url = a.nats_url.clone().expect("simulate::live needs --nats-url");
    let cfg = with_url(load_config(a.config.as_deref())?, Some(url));
    let rate = match a.rate.as_deref() {
        None => Pace::RealTime,
        Some("max") => Pace::Max,
        Some(r) => match r.parse::<f64>() {
            Ok(v) if v > 0.0 && v.is_finite() => Pace::PerSecond(v),
            _ => {
                return Err(
                    UsageError(format!("--rate `{r}`: give messages per second or `max`")).into(),
                );
            }
        },
    };
    let mut sim = a.factory.sim_config(a.duration)?;
    // Live data should carry live timestamps: real-time runs start now; faster
    // ones end now, so no message is dated in the future.
    let now = wall_now() / 1000 * 1000;
    sim.start = match rate {
        Pace::RealTime => now,
        _ => now - a.duration,
    };
    let mut factory = Factory::new(sim);
    if let Some(p) = &a.labels {
        write_labels(p, factory.labels())?;
    }
    if let Some(p) = &a.registry {
        std::fs::write(p, factory.registry_toml())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let logins = if a.device_users {
        device_logins(&cfg, &factory, a.factory.keys.as_deref())?
    } else {
        Vec::new()
    };
    runtime()?.block_on(async move {
        let mut stop = shutdown_signal();
        // One connection, or one per device: `by_machine` says whose a subject is.
        let mut clients = Vec::new();
        let mut by_machine = std::collections::HashMap::new();
        if logins.is_empty() {
            let Some(client) = connect_until_stopped(&cfg, &stop).await? else {
                return Ok(());
            };
            clients.push(client);
        }
        for (machine, device_cfg) in logins {
            let Some(client) = connect_until_stopped(&device_cfg, &stop).await? else {
                return Ok(());
            };
            by_machine.insert(machine, clients.len());
            clients.push(client);
        }
        let started = Instant::now();
        let t0 = factory.now();
        let mut sent = 0u64;
        while let Some(tick) = factory.next_tick() {
            if *stop.borrow() {
                break;
            }
            for e in tick {
                let machine = crate::decode::last_token(&e.subject).unwrap_or_default();
                let client = &clients[by_machine.get(machine).copied().unwrap_or(0)];
                let published = if e.headers.is_empty() {
                    client.publish(e.subject, e.payload).await
                } else {
                    let mut h = async_nats::HeaderMap::new();
                    for (k, v) in &e.headers {
                        h.append(k.as_str(), v.as_str());
                    }
                    client.publish_with_headers(e.subject, h, e.payload).await
                };
                published.context("publishing to NATS")?;
                sent += 1;
            }
            let due = match rate {
                Pace::Max => None,
                Pace::RealTime => Some(Duration::from_millis((factory.now() - t0).max(0) as u64)),
                Pace::PerSecond(r) => Some(Duration::from_secs_f64(sent as f64 / r)),
            };
            if let Some(due) = due {
                let wait = due.saturating_sub(started.elapsed());
                if !wait.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => break,
                    }
                }
            }
        }
        for client in &clients {
            client.flush().await.context("flushing to NATS")?;
        }
        let secs = started.elapsed().as_secs_f64();
        info!(
            messages = sent,
            seconds = format!("{secs:.2}"),
            rate = format!("{:.0}/s", sent as f64 / secs.max(1e-9)),
            "simulation published"
        );
        Ok(())
    })
}

/// The connection settings of every simulated device logging in as itself:
/// (machine, `cfg` with the device's seed from `keys`). TLS settings are shared.
fn device_logins(
    cfg: &Config,
    factory: &Factory,
    keys: Option<&std::path::Path>,
) -> Result<Vec<(String, Config)>> {
    let Some(dir) = keys else {
        return Err(UsageError(
            "--device-users needs --keys DIR, the folder of the devices' seeds (`twinwatch devices sim-keys` makes them)".into(),
        )
        .into());
    };
    factory
        .devices()
        .map(|(device, machine, _)| {
            let seed = dir.join(format!("{device}.nk"));
            if !seed.is_file() {
                return Err(UsageError(format!(
                    "{}: no seed for device {device}; `twinwatch devices sim-keys --machines N --dir {}` makes the missing ones",
                    seed.display(),
                    dir.display()
                ))
                .into());
            }
            let mut c = cfg.clone();
            c.nats.nkey_seed = seed.display().to_string();
            c.nats.creds.clear();
            c.nats.name = format!("twinwatch-sim-{device}");
            Ok((crate::alerts::subject_token(machine), c))
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Pace {
    RealTime,
    PerSecond(f64),
    Max,
}
