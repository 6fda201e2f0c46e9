//! Per-window cost of the query files (`cargo bench --bench queries`): a
//! closed 10-second window through the shipped `queries/`, after planning
//! them once. Two windows: 1,000 machines x 8 metrics at 1 Hz (80,000
//! readings, 10,000 messages, 2,000 flow records: many small groups), and
//! 250 machines x 4 metrics at 10 Hz (100,000 readings, as dense as the
//! array payloads of `twinwatch bench --batch 100 --interval 100ms`: groups
//! of 100 readings). Each first with every group-by left to
//! DataFusion, then with the plain ones over `readings` computed by twinwatch
//! (`queries.own_group_by`, the default) over the window's rows, then over
//! the sums the window kept instead of its rows (what a run gets when every
//! file reads `readings` only through such group-bys, as the shipped ones do).

use std::time::{Duration, Instant};

use twinwatch::config::Config;
use twinwatch::features::{Queries, RunOutput};
use twinwatch::pipeline::Pipeline;
use twinwatch::source::Envelope;

const T0: i64 = 1_795_766_400_000;

fn main() {
    for (machines, sensors, hz) in [(1000, 8, 1), (250, 4, 10)] {
        measure(machines, sensors, hz);
    }
}

/// One window of `machines` x `sensors` readings at `hz`, queried both ways.
fn measure(machines: i64, sensors: i64, hz: i64) {
    println!("\n{machines} machines x {sensors} metrics at {hz} Hz");
    let mut envs = Vec::new();
    for tick in 0..10 * hz {
        let s = tick / hz;
        let ts = T0 + tick * 1000 / hz;
        for m in 0..machines {
            let readings: Vec<String> = (0..sensors)
                .map(|k| {
                    format!(
                        "\"metric_{k}\":{}",
                        10.0 * k as f64 + ((tick * 31 + m * 7 + k) % 13) as f64 * 0.1
                    )
                })
                .collect();
            envs.push(Envelope::new(
                format!("twin.telemetry.bench.m-{m:04}"),
                Some(ts),
                format!(
                    "{{\"ts\":{ts},\"device\":\"plc-{m:04}\",\"seq\":{tick},\"readings\":{{{}}}}}",
                    readings.join(",")
                ),
            ));
            if tick % (5 * hz) == 0 {
                envs.push(Envelope::new(
                    format!("twin.flows.bench.m-{m:04}"),
                    Some(T0 + s * 1000),
                    format!(
                        "[{{\"ts\":{t},\"src\":\"10.20.0.5\",\"dst\":\"10.20.1.{}\",\"dst_port\":502,\"app\":\"modbus\",\"op\":\"read_holding_registers\",\"bytes\":120,\"packets\":2}},{{\"ts\":{t},\"src\":\"10.20.0.8\",\"dst\":\"10.20.1.{}\",\"dst_port\":4840,\"app\":\"opcua\",\"op\":\"read\",\"bytes\":400,\"packets\":4}}]",
                        m % 250,
                        m % 250,
                        t = T0 + s * 1000 + 500
                    ),
                ));
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
        for (own, summed) in [(false, false), (true, false), (true, true)] {
            let mut q = Queries::new(&dir).with_own_group_by(own);
            let t = Instant::now();
            let refused = q.reload().await;
            assert!(refused.is_empty(), "{refused:?}");
            let planning = t.elapsed();
            let mut p = Pipeline::new(&Config::default());
            if summed {
                p.keep_for(&RunOutput {
                    grouping: q.grouping().to_vec(),
                    ..Default::default()
                });
            }
            p.process(&envs, 0);
            let window = p.finish().closed.expect("one window");
            let groups: usize = window.groups.iter().map(|g| g.groups.len()).sum();
            println!(
                "own_group_by = {own}, readings {}: {} reading rows, {groups} groups, {} messages, {} flow records, {} machine-windows",
                if summed { "summed as they arrive" } else { "kept as rows" },
                window.readings.num_rows(),
                window.messages.num_rows(),
                window.flows.num_rows(),
                window.machine_windows
            );
            println!("planning {} files once: {:.1} ms", q.active().len(), planning.as_secs_f64() * 1000.0);
            let mut runs: Vec<Duration> = Vec::new();
            let mut per_file: std::collections::BTreeMap<String, Vec<Duration>> = Default::default();
            let mut features = 0;
            for _ in 0..30 {
                let t = Instant::now();
                let out = q.run(&window).await;
                runs.push(t.elapsed());
                assert!(out.failures.is_empty(), "{:?}", out.failures);
                features = out.features.len();
                for (f, d) in out.timings {
                    per_file.entry(f).or_default().push(d);
                }
            }
            runs.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            println!(
                "per window (30 runs): median {:.1} ms, min {:.1} ms, max {:.1} ms; {features} feature values",
                ms(runs[runs.len() / 2]),
                ms(runs[0]),
                ms(runs[runs.len() - 1])
            );
            for (f, mut v) in per_file {
                v.sort();
                println!("  {f}: median {:.1} ms ({} group-bys computed by twinwatch)", ms(v[v.len() / 2]), q.own_group_bys(&f));
            }
        }
    });
}
