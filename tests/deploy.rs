//! The shipped NATS segmentation (deploy/nats/accounts.conf, with the users
//! `twinwatch devices nats-users` writes from a registry) on a local
//! nats-server: devices publish only their own machine's subjects, the
//! processor sees telemetry, the SOC sees alerts and never telemetry.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::ConnectOptions;
use futures_util::StreamExt;

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Server {
    _process: Process,
    port: u16,
    pki: common::Pki,
    _dir: tempfile::TempDir,
}

/// A user key pair: (public key for the server, seed for the client).
fn user() -> (String, String) {
    let k = nkeys::KeyPair::new_user();
    (k.public_key(), k.seed().unwrap())
}

/// Lays out `dir` as deploy/ is: `nats/` (the shipped server configuration)
/// beside `secrets/` (where users.conf and the certificates go).
fn lay_out(dir: &Path) {
    for sub in ["nats", "secrets"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for file in ["nats.conf", "accounts.conf"] {
        std::fs::copy(
            format!("{}/deploy/nats/{file}", env!("CARGO_MANIFEST_DIR")),
            dir.join("nats").join(file),
        )
        .unwrap();
    }
}

/// The shipped server configuration of `dir` (see [`lay_out`]) on a loopback
/// port (-a/-p override `listen`), with the server certificate and CA given.
fn serve(dir: &Path, cert: &str, key: &str, ca: &str) -> (Child, u16) {
    // Tests run in parallel: a port found free may be taken by another
    // test's server before ours binds it (ours then exits, and the port
    // answers for the other one). Such a start is tried again on a new port.
    for _ in 0..5 {
        let port = common::free_port();
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut child = Command::new(common::nats_server_bin())
            .arg("-c")
            .arg(dir.join("nats/nats.conf"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .env("TLS_CERT", cert)
            .env("TLS_KEY", key)
            .env("TLS_CA", ca)
            .env("JS_DIR", dir.join("js"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let up = twinwatch::bench::wait_for_port(port, Duration::from_secs(15));
        std::thread::sleep(Duration::from_millis(300));
        if up && child.try_wait().unwrap().is_none() {
            return (child, port);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!(
        "nats-server did not start with the deploy accounts: {}",
        std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
    );
}

/// The deploy accounts with the users `twinwatch devices nats-users` makes
/// from a registry of `devices` (name, public key, machine), on a loopback port.
fn start(devices: &[(&str, &str, &str)], processor: &str, soc: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    lay_out(dir.path());
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
    let users = succeed(
        Command::new(env!("CARGO_BIN_EXE_twinwatch"))
            .args(["devices", "nats-users", "--registry"])
            .arg(&reg)
            .args(["--processor-key", processor, "--soc-key", soc]),
    );
    std::fs::write(dir.path().join("secrets/users.conf"), users).unwrap();
    let (child, port) = serve(dir.path(), &pki.server_cert, &pki.server_key, &pki.ca);
    Server {
        _process: Process(child),
        port,
        pki,
        _dir: dir,
    }
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

/// Copies the files of the repository folder `from` into `to`.
fn copy_dir(from: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(format!("{}/{from}", env!("CARGO_MANIFEST_DIR"))).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Runs `cmd`, which must succeed; its standard output.
fn succeed(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs `scripts/gen-certs ARGS DIR` with this build's twinwatch; it must succeed.
fn gen_certs(args: &[&str], dir: &Path) {
    succeed(
        Command::new(format!("{}/scripts/gen-certs", env!("CARGO_MANIFEST_DIR")))
            .args(args)
            .arg(dir)
            .env("TWINWATCH", env!("CARGO_BIN_EXE_twinwatch")),
    );
}

/// The figure of a Prometheus line `name{labels} value` (summed over labels).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What docker-compose.yml runs, without Docker: scripts/gen-certs makes the
/// secrets, the shipped nats.conf serves them, and twinwatch runs with the
/// shipped processor, simulator and SOC configurations in a folder laid out
/// as the containers' /deploy.
#[test]
fn gen_certs_and_the_shipped_configurations_run_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    lay_out(root);
    copy_dir("deploy/twinwatch", &root.join("twinwatch"));
    copy_dir("queries", &root.join("queries"));
    let secrets = root.join("secrets");
    gen_certs(&["--machines", "2"], &secrets);
    let users = std::fs::read_to_string(secrets.join("users.conf")).unwrap();
    assert_eq!(
        users.matches("nkey:").count(),
        2,
        "one user per device: {users}"
    );
    // A second run keeps what is there: the keys the devices hold stay valid.
    let seed = std::fs::read_to_string(secrets.join("devices/plc-01a.nk")).unwrap();
    gen_certs(&["--machines", "2"], &secrets);
    assert_eq!(
        std::fs::read_to_string(secrets.join("devices/plc-01a.nk")).unwrap(),
        seed
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for private in [
            "processor.nk",
            "ca-key.pem",
            "server-key.pem",
            "devices/plc-02a.nk",
        ] {
            let mode = std::fs::metadata(secrets.join(private))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{private} is readable by others");
        }
    }
    let s = |f: &str| secrets.join(f).display().to_string();
    let (child, port) = serve(root, &s("server.pem"), &s("server-key.pem"), &s("ca.pem"));
    let _server = Process(child);
    let url = format!("tls://127.0.0.1:{port}");
    let http = common::free_port();
    let http_addr = format!("127.0.0.1:{http}");
    let processor = common::Twinwatch::spawn_in(
        root,
        &[
            "run",
            "--config",
            "twinwatch/processor.toml",
            "--nats-url",
            &url,
        ],
        &[("TWINWATCH_HTTP_ADDR", &http_addr)],
    );
    common::wait_http(http, "/healthz", "200", &processor);
    let (soc_out, soc_err) = (root.join("soc.out"), root.join("soc.err"));
    let mut soc = Command::new(env!("CARGO_BIN_EXE_twinwatch"))
        .current_dir(root)
        .args([
            "alerts",
            "--config",
            "twinwatch/soc.toml",
            "--nats-url",
            &url,
        ])
        .args(["--json", "--count", "3"])
        .env("TWINWATCH_LOG", "info")
        .stdout(std::fs::File::create(&soc_out).unwrap())
        .stderr(std::fs::File::create(&soc_err).unwrap())
        .spawn()
        .unwrap();
    // Two hours of two machines as fast as the bus takes them, each machine
    // through its own device's login.
    let mut sim = common::Twinwatch::spawn_in(
        root,
        &[
            "simulate",
            "--config",
            "twinwatch/simulator.toml",
            "--nats-url",
            &url,
            "--machines",
            "2",
            "--keys",
            "secrets/devices",
            "--device-users",
            "--rate",
            "4000",
            "--duration",
            "2h",
        ],
        &[],
    );
    assert_eq!(
        sim.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        sim.stderr()
    );
    let log = sim.stderr();
    let sent: f64 = log
        .lines()
        .find(|l| l.contains("simulation published"))
        .and_then(|l| {
            l.split("messages=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no count in {log}"));
    // Every device's messages reached the processor: the server dropped none
    // of them for publishing on a subject its user may not.
    let t = std::time::Instant::now();
    let metrics = loop {
        let m = common::wait_http(http, "/metrics", "200", &processor);
        if metric(&m, "twinwatch_envelopes_total") >= sent * 0.98
            || t.elapsed() > Duration::from_secs(60)
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        metric(&metrics, "twinwatch_envelopes_total") >= sent * 0.98,
        "{sent} sent: {metrics}\n{}",
        processor.stderr()
    );
    assert_eq!(metric(&metrics, "twinwatch_machines"), 2.0, "{metrics}");
    // Its alerts reached the SOC user.
    let t = std::time::Instant::now();
    while soc.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the SOC got no 3 alerts: {}\n{}",
            std::fs::read_to_string(&soc_err).unwrap_or_default(),
            processor.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let lines = std::fs::read_to_string(&soc_out).unwrap();
    let alerts: Vec<twinwatch::alerts::Alert> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(alerts.len(), 3, "{lines}");
    let registry = std::fs::read_to_string(secrets.join("devices.toml")).unwrap();
    let machines: Vec<&str> = registry
        .lines()
        .filter_map(|l| l.strip_prefix("machines = [\""))
        .map(|l| l.trim_end_matches("\"]"))
        .collect();
    assert_eq!(machines.len(), 2);
    assert!(
        alerts
            .iter()
            .all(|a| machines.contains(&a.machine.as_str())),
        "{lines}"
    );

    // Adding a device as the README says: keygen into the registry, its
    // certificate, users.conf again, the server reloads; then it publishes.
    let entry = succeed(
        Command::new(env!("CARGO_BIN_EXE_twinwatch"))
            .args([
                "devices",
                "keygen",
                "plc-09a",
                "--machine",
                "press-09",
                "--dir",
            ])
            .arg(secrets.join("devices")),
    );
    std::fs::write(
        secrets.join("devices.toml"),
        registry + "\n" + &String::from_utf8(entry).unwrap(),
    )
    .unwrap();
    gen_certs(&["--client", "plc-09a"], &secrets);
    gen_certs(&["--users"], &secrets);
    let hup = Command::new("kill")
        .args(["-HUP", &_server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let before = metric(
        &common::wait_http(http, "/metrics", "200", &processor),
        "twinwatch_envelopes_total",
    );
    let seed = std::fs::read_to_string(secrets.join("devices/plc-09a.nk")).unwrap();
    common::rt().block_on(async {
        // The reload takes a moment: the new user is refused until then.
        let t = std::time::Instant::now();
        let device = loop {
            let c = ConnectOptions::with_nkey(seed.trim().to_string())
                .add_root_certificates(secrets.join("ca.pem"))
                .add_client_certificate(
                    secrets.join("plc-09a.pem"),
                    secrets.join("plc-09a-key.pem"),
                )
                .require_tls(true)
                .connect(&url)
                .await;
            match c {
                Ok(c) => break c,
                Err(e) => assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "plc-09a refused: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        loop {
            let body = format!(
                r#"{{"ts": {}, "device": "plc-09a", "readings": {{"temperature_c": 40.0}}}}"#,
                twinwatch::time::wall_now()
            );
            device
                .publish("twin.telemetry.plant1.press-09", body.into())
                .await
                .unwrap();
            device.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let m = common::wait_http(http, "/metrics", "200", &processor);
            if metric(&m, "twinwatch_envelopes_total") > before {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "press-09 never reached twinwatch"
            );
        }
    });
}

/// The compose stack's pieces point at each other: Prometheus scrapes the
/// port the processor's configuration serves, Grafana's data source is that
/// Prometheus, and the dashboard it loads is the shipped one.
#[test]
fn the_dashboards_profile_is_wired_to_the_processor() {
    let file =
        |p: &str| std::fs::read_to_string(format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let processor: toml::Value = toml::from_str(&file("deploy/twinwatch/processor.toml")).unwrap();
    let addr = processor["http"]["addr"].as_str().unwrap();
    let port = addr.rsplit(':').next().unwrap();
    assert!(
        file("deploy/prometheus/prometheus.yml").contains(&format!("\"twinwatch:{port}\"")),
        "Prometheus must scrape twinwatch:{port}"
    );
    let compose = file("docker-compose.yml");
    assert!(compose.contains(&format!("\"127.0.0.1:{port}:{port}\"")));
    assert!(
        file("deploy/grafana/provisioning/datasources/prometheus.yml")
            .contains("url: http://prometheus:9090")
    );
    assert!(
        compose.contains(
            "./deploy/grafana/twinwatch.json:/var/lib/grafana/dashboards/twinwatch.json:ro"
        )
    );
    assert!(
        file("deploy/grafana/provisioning/dashboards/twinwatch.yml")
            .contains("path: /var/lib/grafana/dashboards")
    );
    // The stack's configurations are ones twinwatch accepts.
    for cfg in ["processor", "soc", "simulator"] {
        succeed(
            Command::new(env!("CARGO_BIN_EXE_twinwatch"))
                .args(["config", "--check"])
                .arg(format!(
                    "{}/deploy/twinwatch/{cfg}.toml",
                    env!("CARGO_MANIFEST_DIR")
                )),
        );
    }
}
