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
    pki: common::Pki,
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
    for file in ["nats.conf", "accounts.conf"] {
        std::fs::copy(
            format!("{}/deploy/nats/{file}", env!("CARGO_MANIFEST_DIR")),
            dir.path().join(file),
        )
        .unwrap();
    }
    let pki = common::make_pki(dir.path());
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
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    // The shipped server configuration, on loopback (-a/-p override `listen`).
    let child = Command::new(common::nats_server_bin())
        .arg("-c")
        .arg(dir.path().join("nats.conf"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .env("TLS_CERT", &pki.server_cert)
        .env("TLS_KEY", &pki.server_key)
        .env("TLS_CA", &pki.ca)
        .env("JS_DIR", dir.path().join("js"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let server = Server {
        child,
        port,
        pki,
        _dir: dir,
    };
    assert!(
        twinwatch::bench::wait_for_port(port, Duration::from_secs(15)),
        "nats-server did not start with the deploy accounts: {}",
        std::fs::read_to_string(server._dir.path().join("server.log")).unwrap_or_default()
    );
    server
}

/// A client of `server` over mutual TLS, logged in with the nkey `seed`.
async fn connect(server: &Server, seed: &str) -> async_nats::Client {
    let pki = &server.pki;
    ConnectOptions::with_nkey(seed.to_string())
        .add_root_certificates(pki.ca.clone().into())
        .add_client_certificate(
            pki.client_cert.clone().into(),
            pki.client_key.clone().into(),
        )
        .require_tls(true)
        .connect(format!("tls://127.0.0.1:{}", server.port))
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
    common::rt().block_on(async {
        let device = connect(&server, &d1_seed).await;
        let processor = connect(&server, &proc_seed).await;
        let soc = connect(&server, &soc_seed).await;
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

#[test]
fn a_client_without_a_certificate_is_refused() {
    let (d1, d1_seed) = user();
    let (p, _) = user();
    let (soc, _) = user();
    let server = start(&[("plc-01", &d1, "press-01")], &p, &soc);
    common::rt().block_on(async {
        // The right nkey and the plant's CA, but no client certificate.
        let refused = ConnectOptions::with_nkey(d1_seed.clone())
            .add_root_certificates(server.pki.ca.clone().into())
            .require_tls(true)
            .connection_timeout(Duration::from_secs(2))
            .connect(format!("tls://127.0.0.1:{}", server.port));
        let refused = tokio::time::timeout(Duration::from_secs(5), refused).await;
        assert!(
            !matches!(refused, Ok(Ok(_))),
            "a client without a certificate got in"
        );
        // The same with its certificate: in.
        connect(&server, &d1_seed).await;
    });
}

#[test]
fn twinwatch_runs_end_to_end_over_tls_with_the_processor_key() {
    let (d1, d1_seed) = user();
    let processor = nkeys::KeyPair::new_user();
    let (soc_key, soc_seed) = user();
    let server = start(
        &[("plc-01", &d1, "press-01")],
        &processor.public_key(),
        &soc_key,
    );
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("processor.nk");
    std::fs::write(&seed_file, processor.seed().unwrap()).unwrap();
    let pki = &server.pki;
    let cfg = common::write_config(
        dir.path(),
        "twinwatch.toml",
        &format!(
            "[nats]\nurl = \"tls://127.0.0.1:{}\"\nnkey_seed = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [baseline]\nwarmup = \"1m\"\n[state]\nenabled = false\n[http]\naddr = \"\"\n",
            server.port,
            seed_file.display(),
            pki.ca,
            pki.client_cert,
            pki.client_key
        ),
    );
    let tw = common::Twinwatch::spawn(&["run", "--config", &cfg]);
    common::rt().block_on(async {
        let device = connect(&server, &d1_seed).await;
        let soc = connect(&server, &soc_seed).await;
        let mut alerts = soc.subscribe("twin.alerts.>").await.unwrap();
        soc.flush().await.unwrap();
        let t = std::time::Instant::now();
        while !tw.stderr().contains("subscribed") {
            assert!(t.elapsed() < Duration::from_secs(20), "{}", tw.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t0 = common::t0();
        let reading = |s: i64, v: f64| {
            format!(
                r#"{{"ts": {}, "device": "plc-01", "seq": {s}, "readings": {{"temperature_c": {}}}}}"#,
                t0 + s * 1000,
                v + ((s * 7919) % 17) as f64 * 0.01
            )
        };
        let m = loop {
            // Resent from the start until the SOC has the alert: the
            // accounts' imports are wired a moment after the subscriptions.
            for s in 0..=120 {
                let v = if s == 120 { 95.0 } else { 70.0 };
                device
                    .publish("twin.telemetry.plant.press-01", reading(s, v).into())
                    .await
                    .unwrap();
            }
            device.flush().await.unwrap();
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(3), alerts.next()).await {
                break m;
            }
            assert!(t.elapsed() < Duration::from_secs(40), "no alert reached the SOC: {}", tw.stderr());
        };
        let a: twinwatch::alerts::Alert = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(a.machine, "press-01");
        assert_eq!(m.subject.as_str(), format!("twin.alerts.{}.press-01", a.severity.as_str()));
    });
}
