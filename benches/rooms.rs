//! What each room of the pipeline costs (`cargo bench --bench rooms`):
//! decoding JSON into Arrow (one message, a batch of 1,000, a full batch of
//! 4,096 in one piece and in two parts on two threads), the window
//! features (the shipped query files over one closed 10-second window of 100
//! machines), the per-reading baselines (one message of 4 readings into a
//! machine that has learned, and a window's 43 query features for each of
//! 1,000 machines), the learned model scoring one vector,
//! encoding one alert as the JSON the sinks publish, and the whole
//! synchronous pipeline (every room a live batch walks through but the
//! source and the query thread) on the `bench` command's default traffic and
//! on its array traffic.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::Path;

use twinwatch::alerts::{AlertBook, Names};
use twinwatch::config::Config;
use twinwatch::decode::Decoder;
use twinwatch::detect::{Detectors, Finding, Kind, Observation};
use twinwatch::features::{Queries, RunOutput};
use twinwatch::intern::Interner;
use twinwatch::learn::model::{FitParams, Modes, Scorer};
use twinwatch::pipeline::Pipeline;
use twinwatch::source::Envelope;

const T0: i64 = 1_795_766_400_000;

/// A telemetry message of about 180 bytes with 4 readings, as the contract's example.
fn message(machine: usize, second: i64) -> Envelope {
    let ts = T0 + second * 1000;
    Envelope::new(
        format!("twin.telemetry.bench.m-{machine:05}"),
        Some(ts + 3),
        object(machine, second as u64, ts),
    )
}

/// An array payload of `objects` objects of `machine`, the first the
/// `first`-th it sends, `step` ms of event time apart; it arrives 3 ms after
/// the last.
fn array_message(machine: usize, first: u64, objects: u64, step: i64) -> Envelope {
    let ts = |seq: u64| T0 + seq as i64 * step;
    let body: Vec<String> = (first..first + objects)
        .map(|seq| object(machine, seq, ts(seq)))
        .collect();
    Envelope::new(
        format!("twin.telemetry.bench.m-{machine:05}"),
        Some(ts(first + objects - 1) + 3),
        format!("[{}]", body.join(",")),
    )
}

/// One telemetry object of 4 readings: the `seq`-th of `machine`, sent at `ts`.
/// Its readings are `bench`'s noise ([`twinwatch::bench::noise`]): they come
/// round again only after 4,099 objects (four replay histories), and one
/// object's are unrelated to the last's. Readings that repeated every 97
/// objects were rightly taken for a replay once a machine had learned, and
/// the pipeline then kept the machine's messages out of its windows and
/// baselines; a sawtooth looked like changes of operating mode.
fn object(machine: usize, seq: u64, ts: i64) -> String {
    let n = twinwatch::bench::noise(machine, seq) as f64 * 0.001;
    format!(
        r#"{{"ts":{ts},"device":"plc-{machine:05}","seq":{seq},"readings":{{"temperature_c":{:.3},"vibration_mm_s":{:.4},"spindle_rpm":{:.2},"motor_current_a":{:.3}}}}}"#,
        70.0 + n,
        2.3 + n / 10.0,
        1198.0 + n * 10.0,
        24.0 + n
    )
}

fn decode(c: &mut Criterion) {
    let cfg = Config::default();
    let mut g = c.benchmark_group("decode");
    let one = vec![message(1, 1)];
    let mut d = Decoder::new(cfg.input.clone());
    g.throughput(Throughput::Elements(1));
    g.bench_function("one message", |b| {
        b.iter(|| black_box(d.decode(black_box(&one))))
    });
    let batch: Vec<Envelope> = (0..1000).map(|m| message(m, 1)).collect();
    let mut d = Decoder::new(cfg.input.clone());
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("batch of 1000 messages", |b| {
        b.iter(|| black_box(d.decode(black_box(&batch))))
    });
    // A full batch as the live source hands it over (source.max_batch): in
    // one piece, and in two parts at once as the pipeline decodes it.
    let full: Vec<Envelope> = (0..4096)
        .map(|m| message(m % 1000, 1 + m as i64 / 1000))
        .collect();
    for (name, parts) in [
        ("batch of 4096 messages, one piece", false),
        ("batch of 4096 messages, two parts", true),
    ] {
        let mut d = Decoder::new(cfg.input.clone());
        g.throughput(Throughput::Elements(full.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                if parts {
                    black_box(d.decode_parts(black_box(&full)).len())
                } else {
                    black_box(d.decode(black_box(&full)).messages.num_rows())
                }
            })
        });
    }
    // Array payloads: 100 objects of 4 readings in each of 20 envelopes.
    let arrays: Vec<Envelope> = (0..20).map(|m| array_message(m, 0, 100, 1000)).collect();
    let mut d = Decoder::new(cfg.input.clone());
    g.throughput(Throughput::Elements(20 * 100 * 4));
    g.bench_function("20 array payloads of 100 objects (readings)", |b| {
        b.iter(|| black_box(d.decode(black_box(&arrays))))
    });
    g.finish();
}

fn window_features(c: &mut Criterion) {
    // One closed 10-second window of 100 machines at 1 Hz.
    let envs: Vec<Envelope> = (0..10)
        .flat_map(|s| (0..100).map(move |m| message(m, s)))
        .collect();
    let mut p = Pipeline::new(&Config::default());
    p.process(&envs, 0);
    let window = p.finish().closed.expect("one window");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
    let mut q = Queries::new(&dir);
    let refused = rt.block_on(q.reload());
    assert!(refused.is_empty(), "{refused:?}");
    let mut g = c.benchmark_group("window features");
    g.throughput(Throughput::Elements(window.readings.num_rows() as u64));
    g.sample_size(20);
    g.bench_function("shipped queries, 100 machines x 10 s", |b| {
        b.iter(|| black_box(rt.block_on(q.run(&window))))
    });
    g.finish();
}

fn baselines(c: &mut Criterion) {
    let cfg = Config::default();
    let mut d = Detectors::new(&cfg);
    let mut out = Vec::new();
    let mut second = 0i64;
    let reading = |s: i64| -> Vec<(u32, f64)> {
        let n = ((s * 7919) % 97) as f64 * 0.01;
        vec![
            (0, 70.0 + n),
            (1, 2.3 + n / 10.0),
            (2, 1198.0 + n * 10.0),
            (3, 24.0 + n),
        ]
    };
    // Past the warm-up, so every detector judges.
    while second < 900 {
        d.observe(0, 0, T0 + second * 1000, true, &reading(second), &mut out);
        second += 1;
    }
    let mut g = c.benchmark_group("baselines");
    g.throughput(Throughput::Elements(4));
    g.bench_function("one message of 4 readings", |b| {
        b.iter(|| {
            second += 1;
            out.clear();
            d.observe(0, 0, T0 + second * 1000, true, &reading(second), &mut out);
            black_box(out.len())
        })
    });
    // What a query run hands the loop: each machine's 43 features of one
    // window (the shipped files' count) as one group, 1,000 machines.
    const FEATURES: u32 = 43;
    const MACHINES: u32 = 1_000;
    let mut features = Detectors::new(&cfg);
    let group = |m: u32, w: i64| -> Vec<(u32, f64)> {
        (0..FEATURES)
            .map(|k| {
                (
                    k,
                    10.0 * k as f64 + ((w * 7919 + (m * 31 + k) as i64) % 97) as f64 * 0.01,
                )
            })
            .collect()
    };
    let mut window = 0i64;
    while window < 90 {
        for m in 0..MACHINES {
            features.observe(
                m,
                0,
                T0 + window * 10_000,
                true,
                &group(m, window),
                &mut out,
            );
        }
        window += 1;
    }
    let groups: Vec<Vec<(u32, f64)>> = (0..MACHINES).map(|m| group(m, 0)).collect();
    g.throughput(Throughput::Elements((FEATURES * MACHINES) as u64));
    g.bench_function("a window of 43 features for 1000 machines", |b| {
        b.iter(|| {
            window += 1;
            out.clear();
            for (m, values) in groups.iter().enumerate() {
                features.observe(m as u32, 0, T0 + window * 10_000, true, values, &mut out);
            }
            black_box(out.len())
        })
    });
    // The same window as one batch: what a query run's part goes through,
    // split by machine over two threads.
    let values: Vec<(u32, f64)> = groups.iter().flatten().copied().collect();
    let mut batch: Vec<Observation> = (0..MACHINES)
        .map(|m| Observation {
            machine: m,
            device: 0,
            ts: 0,
            trusted: true,
            readings: (m * FEATURES, (m + 1) * FEATURES),
        })
        .collect();
    g.bench_function("the same window as one batch (two shards)", |b| {
        b.iter(|| {
            window += 1;
            out.clear();
            for o in &mut batch {
                o.ts = T0 + window * 10_000;
            }
            let mut found = features.observe_batch(&batch, &values);
            for i in 0..batch.len() {
                found.take(i, &mut out);
            }
            black_box(out.len())
        })
    });
    g.finish();
}

fn multivariate(c: &mut Criterion) {
    // 12 features (6 sensors and their lagged averages), 600 training vectors.
    let rows: Vec<Vec<f64>> = (0..700)
        .map(|i| {
            let load = (i as f64 / 50.0).sin();
            (0..12)
                .map(|k| {
                    10.0 * k as f64 + load * (k + 1) as f64 + ((i * 31 + k * 7) % 13) as f64 * 0.01
                })
                .collect()
        })
        .collect();
    let single = Modes::fit(&rows[..600], &FitParams::default()).expect("a model");
    let mut scorer = Scorer::new(&single);
    let mut g = c.benchmark_group("multivariate");
    g.throughput(Throughput::Elements(1));
    let mut i = 600;
    g.bench_function("score one vector of 12 features", |b| {
        b.iter(|| {
            i = if i + 1 >= rows.len() { 600 } else { i + 1 };
            black_box(scorer.score(&single, black_box(&rows[i])))
        })
    });
    g.bench_function("fit on 600 vectors", |b| {
        b.iter(|| black_box(Modes::fit(black_box(&rows[..600]), &FitParams::default())))
    });
    g.finish();
}

fn alert_encoding(c: &mut Criterion) {
    let mut machines = Interner::new(16);
    let mut devices = Interner::new(16);
    let mut metrics = Interner::new(16);
    let m = machines.intern("press-07").expect("room");
    let d = devices.intern("plc-07a").expect("room");
    let k = metrics.intern("temperature_c").expect("room");
    let names = Names {
        machines: &machines,
        devices: &devices,
        metrics: &metrics,
    };
    let f = Finding::note(
        m,
        d,
        Kind::SensorSpike,
        "robust_z",
        T0,
        k,
        "temperature_c".into(),
        12.0,
        "temperature_c jumped to 120.4 (expected 70.2 ± 0.3): 8.1 sigma".into(),
    );
    let mut book = AlertBook::new(0.0, 600_000, 10_000);
    let alert = book.offer(&f, &names, T0 + 5).expect("an alert");
    let mut g = c.benchmark_group("alerts");
    g.throughput(Throughput::Elements(1));
    // What an alert storm costs per alert before it is encoded: its ids,
    // times, explanation and the book's entry (a fresh book, so none is a
    // repeat).
    g.bench_function("raise one alert", |b| {
        b.iter_batched(
            || AlertBook::new(0.0, 600_000, 10_000),
            |mut book| black_box(book.offer(black_box(&f), &names, T0 + 5)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("encode one alert as JSON", |b| {
        b.iter_batched(
            || Vec::with_capacity(1024),
            |mut buf| {
                serde_json::to_writer(&mut buf, black_box(&alert)).expect("serializable");
                black_box(buf)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A live batch through `Pipeline::process`: 1,500 messages (what the
/// source hands over at a few hundred thousand messages a second) of 1,000
/// machines at 1 Hz, every machine past its warm-up, windows closing as
/// event time passes. This is the loop's own cost per message, without the
/// NATS client and the query thread that share the cores with it live.
fn pipeline(c: &mut Criterion) {
    const MACHINES: usize = 1000;
    const BATCH: usize = 1500;
    // The next message in the order `bench` publishes: machines in turn.
    let mut sent = 0usize;
    let next_batch = move || -> Vec<Envelope> {
        (0..BATCH)
            .map(|_| {
                let e = message(sent % MACHINES, (sent / MACHINES) as i64);
                sent += 1;
                e
            })
            .collect()
    };
    // Ten minutes of event time: the default warm-up.
    let warm_up = 600 * MACHINES / BATCH;
    let name = "batch of 1500 messages of 1000 machines";
    whole_pipeline(c, "pipeline", name, BATCH as u64, warm_up, next_batch);
}

/// The `bench` command's array traffic through `Pipeline::process`
/// (`--batch 100 --interval 100ms`): messages of 100 objects of 4 readings,
/// 1,000 machines in turn, each message 10 s of its machine's event time,
/// 20 messages (8,000 readings) a batch, every machine past its warm-up.
fn pipeline_arrays(c: &mut Criterion) {
    const MACHINES: usize = 1000;
    const OBJECTS: u64 = 100;
    const BATCH: usize = 20;
    let mut sent = 0usize;
    let next_batch = move || -> Vec<Envelope> {
        (0..BATCH)
            .map(|_| {
                let m = sent % MACHINES;
                let first = (sent / MACHINES) as u64 * OBJECTS;
                sent += 1;
                array_message(m, first, OBJECTS, 100)
            })
            .collect()
    };
    // Ten minutes of event time and one message more.
    let warm_up = 61 * MACHINES / BATCH;
    let name = "batch of 20 messages of 100 objects (readings)";
    let readings = BATCH as u64 * OBJECTS * 4;
    whole_pipeline(c, "pipeline arrays", name, readings, warm_up, next_batch);
}

/// Batches from `next_batch` through a fresh pipeline, timed once
/// `warm_up` batches have gone through it: once with the windows keeping
/// the readings as rows, once keeping the sums of the shipped files'
/// group-bys instead (what a live run does once its first query run is in).
/// The warm-up runs only when a case is asked for, so a profile of one case
/// is not the other's.
fn whole_pipeline(
    c: &mut Criterion,
    group: &str,
    name: &str,
    elements: u64,
    warm_up: usize,
    mut next_batch: impl FnMut() -> Vec<Envelope>,
) {
    let grouping = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(async {
            let mut q = Queries::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("queries"));
            assert!(q.reload().await.is_empty());
            q.grouping().to_vec()
        });
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(elements));
    g.sample_size(30);
    for (kept, grouping) in [("rows", Vec::new()), ("sums", grouping)] {
        let mut p = Pipeline::new(&Config::default());
        p.keep_for(&RunOutput {
            grouping,
            ..Default::default()
        });
        let mut warm = false;
        g.bench_function(format!("{name}, readings kept as {kept}"), |b| {
            if !std::mem::replace(&mut warm, true) {
                for _ in 0..warm_up {
                    let batch = next_batch();
                    black_box(p.process(&batch, 0));
                }
            }
            b.iter_batched(
                &mut next_batch,
                |batch| black_box(p.process(&batch, 0).alerts.len()),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(
    rooms,
    decode,
    window_features,
    baselines,
    multivariate,
    alert_encoding,
    pipeline,
    pipeline_arrays
);
criterion_main!(rooms);
