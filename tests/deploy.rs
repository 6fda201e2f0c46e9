//! The shipped NATS segmentation (deploy/nats/accounts.conf, with the users
//! `twinwatch devices nats-users` writes from a registry) on a local
//! nats-server: devices publish only their own machine's subjects, the
//! processor sees telemetry, the SOC sees alerts and never telemetry.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::ConnectOptions;
use futures_util::StreamExt;

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user key pair: (public key for the server, seed for the client).
fn user() -> (String, String) {
    let k = nkeys::KeyPair::new_user();
    (k.public_key(), k.seed().unwrap())
}

/// The deploy accounts with the users `twinwatch devices nats-users` makes
/// from a registry of `devices` (name, public key, machine), on a loopback port.
fn start(devices: &[(&str, &str, &str)], processor: &str, soc: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nats/accounts.conf"),
        dir.path().join("accounts.conf"),
    )
    .unwrap();
    let registry: String = devices
        .iter()
        .map(|(name, key, machine)| {
            twinwatch::registry::entry_toml(name, &[machine.to_string()], key, false)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let reg = dir.path().join("devices.toml");
    std::fs::write(&reg, registry).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_twinwatch"))
        .args(["devices", "nats-users", "--registry"])
        .arg(&reg)
        .args(["--processor-key", processor, "--soc-key", soc])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.path().join("users.conf"), &out.stdout).unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\ninclude \"accounts.conf\"\n",
            dir.path().join("js").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let child = Command::new(common::nats_server_bin())
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let server = Server {
        child,
        port,
        _dir: dir,
    };
    assert!(
        twinwatch::bench::wait_for_port(port, Duration::from_secs(15)),
        "nats-server did not start with the deploy accounts: {}",
        std::fs::read_to_string(server._dir.path().join("server.log")).unwrap_or_default()
    );
    server
}

async fn connect(port: u16, seed: &str) -> async_nats::Client {
    ConnectOptions::with_nkey(seed.to_string())
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap()
}

#[test]
fn accounts_segment_devices_processor_and_soc() {
    let (d1, d1_seed) = user();
    let (d2, _) = user();
    let (proc_key, proc_seed) = user();
    let (soc_key, soc_seed) = user();
    let server = start(
        &[("plc-01", &d1, "press-01"), ("plc-02", &d2, "press-02")],
        &proc_key,
        &soc_key,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let device = connect(server.port, &d1_seed).await;
        let processor = connect(server.port, &proc_seed).await;
        let soc = connect(server.port, &soc_seed).await;
        let mut telemetry = processor.subscribe("twin.telemetry.>").await.unwrap();
        let mut soc_alerts = soc.subscribe("twin.alerts.>").await.unwrap();
        // Not allowed for the SOC: the server refuses it (and it would see nothing anyway).
        let mut soc_telemetry = soc.subscribe("twin.telemetry.>").await.unwrap();
        processor.flush().await.unwrap();
        soc.flush().await.unwrap();
        // The server wires the accounts' imports to a new interest a moment
        // after the subscription: wait until the device's path is open.
        let t = std::time::Instant::now();
        loop {
            device
                .publish("twin.telemetry.plant.press-01", "ready".into())
                .await
                .unwrap();
            device.flush().await.unwrap();
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(200), telemetry.next()).await
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "telemetry never reached the processor"
            );
        }
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(200), telemetry.next()).await
        {}

        // Its own machine: delivered to the processor.
        device
            .publish("twin.telemetry.plant.press-01", "own".into())
            .await
            .unwrap();
        // Another machine's subject: dropped by the server.
        device
            .publish("twin.telemetry.plant.press-02", "spoofed".into())
            .await
            .unwrap();
        device
            .publish("twin.telemetry.plant.press-01", "own again".into())
            .await
            .unwrap();
        device.flush().await.unwrap();
        let mut got = Vec::new();
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(500), telemetry.next()).await
        {
            got.push((m.subject.to_string(), m.payload.to_vec()));
        }
        assert_eq!(
            got,
            [
                ("twin.telemetry.plant.press-01".to_string(), b"own".to_vec()),
                (
                    "twin.telemetry.plant.press-01".to_string(),
                    b"own again".to_vec()
                ),
            ]
        );

        // Alerts from the processor reach the SOC; the SOC sees no telemetry.
        let t = std::time::Instant::now();
        let m = loop {
            processor
                .publish("twin.alerts.high.press-01", "alert".into())
                .await
                .unwrap();
            processor.flush().await.unwrap();
            if let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(200), soc_alerts.next()).await
            {
                break m;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the SOC never received alerts"
            );
        };
        assert_eq!(m.payload.as_ref(), b"alert");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), soc_telemetry.next())
                .await
                .map_or(true, |m| m.is_none()),
            "the SOC must not see telemetry"
        );
        // Devices cannot read what others send.
        let mut peek = device.subscribe("twin.telemetry.>").await.unwrap();
        device.flush().await.unwrap();
        processor
            .publish("twin.telemetry.plant.press-02", "x".into())
            .await
            .unwrap();
        processor.flush().await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), peek.next())
                .await
                .map_or(true, |m| m.is_none()),
            "a device must not subscribe"
        );
    });
}
