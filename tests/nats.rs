//! `twinwatch run` against real nats-server processes: alerts and dead letters
//! on their subjects with their headers, every authentication mode and its
//! refusal, an unreachable server, a server restart, SIGKILL with JetStream
//! (nothing lost, same alert ids), SIGTERM, `record` and `simulate --nats-url`.
//! Each test starts its own server on a free loopback port.

mod common;

use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, HeaderMap};
use base64::Engine;
use common::{NatsServer, Twinwatch, make_pki, rt, t0, write_config};
use futures_util::StreamExt;
use twinwatch::alerts::Alert;

async fn connect(url: &str, opts: ConnectOptions) -> Client {
    opts.connect(url).await.expect("test client connects")
}

/// Publishes a malformed payload until twinwatch dead-letters it: proves it is
/// connected and subscribed. Returns the dead letter's headers.
async fn probe(c: &Client, machine: &str, timeout: Duration) -> Option<HeaderMap> {
    let mut dl = c.subscribe("twin.deadletter.>").await.unwrap();
    c.flush().await.unwrap();
    let body = format!("probe for {machine}: not json");
    let t = Instant::now();
    while t.elapsed() < timeout {
        c.publish(
            format!("twin.telemetry.test.{machine}"),
            body.clone().into(),
        )
        .await
        .unwrap();
        c.flush().await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), dl.next()).await
            && m.payload == body.as_bytes()
        {
            assert_eq!(m.subject.as_str(), "twin.deadletter.invalid_json");
            return m.headers;
        }
    }
    None
}

fn base_config(dir: &std::path::Path, extra: &str) -> String {
    write_config(
        dir,
        "twinwatch.toml",
        &format!("[baseline]\nwarmup = \"1m\"\n[state]\nenabled = false\n{extra}"),
    )
}

/// `steady` seconds of a machine at 70 °C, then one reading at 95 °C (a spike
/// once the 1-minute warm-up of `base_config` is over), flushed; returns the
/// event time of the first reading.
async fn steady_then_spike(c: &Client, machine: &str, steady: i64) -> i64 {
    let t0 = t0();
    let subject = format!("twin.telemetry.plant.{machine}");
    for s in 0..=steady {
        let value = if s == steady { 95.0 } else { 70.0 };
        c.publish(subject.clone(), telemetry(t0, machine, s, value).into())
            .await
            .unwrap();
    }
    c.flush().await.unwrap();
    t0
}

fn telemetry(t0: i64, machine: &str, s: i64, value: f64) -> String {
    let noise = ((s * 7919) % 17) as f64 * 0.01;
    format!(
        r#"{{"ts": {}, "machine": "{machine}", "device": "plc-{machine}", "seq": {s}, "readings": {{"temperature_c": {}, "pressure_bar": {}}}}}"#,
        t0 + s * 1000,
        value + noise,
        5.0 + noise
    )
}

#[test]
fn alerts_and_dead_letters_on_their_subjects_with_headers() {
    let server = NatsServer::start("");
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(dir.path(), "");
    let tw = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", &server.url()]);
    rt().block_on(async {
        let c = connect(&server.url(), ConnectOptions::new()).await;
        let headers = probe(&c, "press-9", Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("no dead letter: {}", tw.stderr()));
        let why = headers
            .get("Twin-Error")
            .expect("Twin-Error header")
            .as_str()
            .to_string();
        assert!(why.starts_with("invalid_json:"), "{why}");
        assert_eq!(
            headers.get("Twin-Subject").unwrap().as_str(),
            "twin.telemetry.test.press-9"
        );

        let mut alerts = c.subscribe("twin.alerts.>").await.unwrap();
        c.flush().await.unwrap();
        let t0 = steady_then_spike(&c, "press-9", 300).await;
        let m = tokio::time::timeout(Duration::from_secs(10), alerts.next())
            .await
            .unwrap_or_else(|_| panic!("no alert: {}", tw.stderr()))
            .unwrap();
        let a: Alert = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            m.subject.as_str(),
            format!("twin.alerts.{}.press-9", a.severity.as_str())
        );
        assert_eq!(
            m.headers
                .as_ref()
                .unwrap()
                .get("Nats-Msg-Id")
                .unwrap()
                .as_str(),
            a.id
        );
        assert_eq!(a.feature.as_deref(), Some("temperature_c"));
        assert_eq!(a.device.as_deref(), Some("plc-press-9"));
        assert_eq!(a.ts, twinwatch::time::format_rfc3339(t0 + 300_000));
    });
}

/// Starts twinwatch with `nats` settings against `server` and checks it works, using `client_opts` for the test client.
fn works_with(
    server: &NatsServer,
    url: &str,
    nats: &str,
    client_opts: impl Fn() -> ConnectOptions,
) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(dir.path(), &format!("[nats]\n{nats}\n"));
    let tw = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", url]);
    rt().block_on(async {
        let c = connect(url, client_opts()).await;
        assert!(
            probe(&c, "m1", Duration::from_secs(20)).await.is_some(),
            "twinwatch did not work: {}\nserver: {}",
            tw.stderr(),
            server.log()
        );
    });
    for secret in ["s3cret-pw", "t0ken-xyz"] {
        assert!(!tw.stderr().contains(secret), "a secret was logged");
    }
}

/// Starts twinwatch with `nats` settings and expects exit code 2 naming the problem.
fn refused_with(url: &str, nats: &str, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(dir.path(), &format!("[nats]\n{nats}\n"));
    let mut tw = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", url]);
    let code = tw.wait_exit(Duration::from_secs(20));
    let err = tw.stderr();
    assert_eq!(code, Some(2), "expected exit 2: {err}");
    assert!(
        err.to_lowercase().contains(expect),
        "expected `{expect}` in: {err}"
    );
    for secret in ["wrong-pw", "bad-token"] {
        assert!(!err.contains(secret), "a secret was logged: {err}");
    }
}

#[test]
fn user_and_password() {
    let server =
        NatsServer::start("authorization { users = [ { user: proc, password: s3cret-pw } ] }");
    works_with(
        &server,
        &server.url(),
        "user = \"proc\"\npassword = \"s3cret-pw\"",
        || ConnectOptions::with_user_and_password("proc".into(), "s3cret-pw".into()),
    );
    refused_with(
        &server.url(),
        "user = \"proc\"\npassword = \"wrong-pw\"",
        "refused the credentials",
    );
}

#[test]
fn token() {
    let server = NatsServer::start("authorization { token: t0ken-xyz }");
    works_with(&server, &server.url(), "token = \"t0ken-xyz\"", || {
        ConnectOptions::with_token("t0ken-xyz".into())
    });
    refused_with(
        &server.url(),
        "token = \"bad-token\"",
        "refused the credentials",
    );
}

#[test]
fn nkey_seed_file() {
    let user = nkeys::KeyPair::new_user();
    let other = nkeys::KeyPair::new_user();
    let server = NatsServer::start(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let seed = write_config(
        dir.path(),
        "proc.nk",
        &format!("{}\n", user.seed().unwrap()),
    );
    let wrong = write_config(dir.path(), "other.nk", &other.seed().unwrap());
    let s = user.seed().unwrap();
    works_with(
        &server,
        &server.url(),
        &format!("nkey_seed = \"{seed}\""),
        || ConnectOptions::with_nkey(s.clone()),
    );
    refused_with(
        &server.url(),
        &format!("nkey_seed = \"{wrong}\""),
        "refused the credentials",
    );
    let junk = write_config(dir.path(), "junk.nk", "not a seed");
    refused_with(
        &server.url(),
        &format!("nkey_seed = \"{junk}\""),
        "nkey seed",
    );
}

fn jwt(claims: serde_json::Value, signer: &nkeys::KeyPair) -> String {
    let b64 = |d: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d);
    let mut claims = claims;
    claims["iat"] = serde_json::json!(chrono::Utc::now().timestamp());
    claims["jti"] = serde_json::json!(format!("{:x}", rand_id()));
    let head = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = b64(claims.to_string().as_bytes());
    let sig = signer.sign(format!("{head}.{body}").as_bytes()).unwrap();
    format!("{head}.{body}.{}", b64(&sig))
}

fn rand_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn creds_file_with_operator_jwts() {
    let op = nkeys::KeyPair::new_operator();
    let acc = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let op_jwt = jwt(
        serde_json::json!({"iss": op.public_key(), "sub": op.public_key(), "name": "plant", "nats": {"type": "operator", "version": 2}}),
        &op,
    );
    let acc_jwt = jwt(
        serde_json::json!({"iss": op.public_key(), "sub": acc.public_key(), "name": "PROCESSOR", "nats": {
            "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1},
            "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}}),
        &op,
    );
    let user_jwt = jwt(
        serde_json::json!({"iss": acc.public_key(), "sub": user.public_key(), "name": "twinwatch", "nats": {
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}}),
        &acc,
    );
    let server = NatsServer::start(&format!(
        "operator: \"{op_jwt}\"\nresolver: MEMORY\nresolver_preload: {{ {}: \"{acc_jwt}\" }}\n",
        acc.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let creds = |jwt: &str, seed: &str| {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    };
    let good = write_config(
        dir.path(),
        "proc.creds",
        &creds(&user_jwt, &user.seed().unwrap()),
    );
    let text = std::fs::read_to_string(&good).unwrap();
    works_with(
        &server,
        &server.url(),
        &format!("creds = \"{good}\""),
        || ConnectOptions::with_credentials(&text).unwrap(),
    );
    // A user signed by an account the server does not know.
    let stranger = nkeys::KeyPair::new_account();
    let bad_jwt = jwt(
        serde_json::json!({"iss": stranger.public_key(), "sub": user.public_key(), "name": "x", "nats": {"pub": {}, "sub": {}, "type": "user", "version": 2}}),
        &stranger,
    );
    let bad = write_config(
        dir.path(),
        "bad.creds",
        &creds(&bad_jwt, &user.seed().unwrap()),
    );
    refused_with(
        &server.url(),
        &format!("creds = \"{bad}\""),
        "refused the credentials",
    );
}

#[test]
fn tls_with_a_custom_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let server = NatsServer::start(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        pki.server_cert, pki.server_key
    ));
    let ca = pki.ca.clone();
    works_with(
        &server,
        &server.tls_url(),
        &format!("ca = \"{}\"", pki.ca),
        || {
            ConnectOptions::new()
                .add_root_certificates(ca.clone().into())
                .require_tls(true)
        },
    );
    // Without the CA the server's certificate cannot be trusted.
    refused_with(&server.tls_url(), "", "tls");
}

#[test]
fn mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let server = NatsServer::start(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}",
        pki.server_cert, pki.server_key, pki.ca
    ));
    let (ca, cert, key) = (
        pki.ca.clone(),
        pki.client_cert.clone(),
        pki.client_key.clone(),
    );
    works_with(
        &server,
        &server.tls_url(),
        &format!(
            "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"",
            pki.ca, pki.client_cert, pki.client_key
        ),
        || {
            ConnectOptions::new()
                .add_root_certificates(ca.clone().into())
                .add_client_certificate(cert.clone().into(), key.clone().into())
                .require_tls(true)
        },
    );
    // No client certificate: the server refuses the handshake.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg = base_config(dir2.path(), &format!("[nats]\nca = \"{}\"\n", pki.ca));
    let mut tw = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", &server.tls_url()]);
    let code = tw.wait_exit(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(2),
        "a client without a certificate is refused: {}",
        tw.stderr()
    );
    assert!(tw.stderr().contains("TLS with NATS"), "{}", tw.stderr());
}

#[test]
fn unreachable_server_is_retried_until_it_comes() {
    let port = common::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(dir.path(), "");
    let mut tw = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", &url]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        tw.wait_exit(Duration::from_millis(10)),
        None,
        "must not exit: {}",
        tw.stderr()
    );
    let attempts = tw.stderr().matches("cannot reach NATS").count();
    assert!(attempts >= 2, "one line per attempt: {}", tw.stderr());
    let server = NatsServer::start_on(port, "");
    rt().block_on(async {
        let c = connect(&server.url(), ConnectOptions::new()).await;
        assert!(
            probe(&c, "m1", Duration::from_secs(40)).await.is_some(),
            "{}",
            tw.stderr()
        );
    });
}

#[test]
fn server_restart_mid_stream() {
    let mut server = NatsServer::start("");
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(dir.path(), "");
    // The server comes from NATS_URL this time.
    let mut tw = Twinwatch::spawn_env(&["run", "--config", &cfg], Some(&server.url()));
    rt().block_on(async {
        let c = connect(&server.url(), ConnectOptions::new()).await;
        assert!(probe(&c, "before", Duration::from_secs(20)).await.is_some());
    });
    server.restart();
    rt().block_on(async {
        let c = connect(&server.url(), ConnectOptions::new()).await;
        assert!(
            probe(&c, "after", Duration::from_secs(30)).await.is_some(),
            "no recovery: {}",
            tw.stderr()
        );
    });
    assert!(tw.stderr().contains("connection lost"), "{}", tw.stderr());
    tw.signal("TERM");
    assert_eq!(
        tw.wait_exit(Duration::from_secs(10)),
        Some(0),
        "SIGTERM stops cleanly: {}",
        tw.stderr()
    );
    assert!(tw.stderr().contains("stopped:"), "{}", tw.stderr());
}

/// The simulated plant of the JetStream tests: its envelopes in order, event
/// times ending now so that nothing is dated in the future of its arrival.
fn plant(minutes: i64) -> (Vec<twinwatch::source::Envelope>, Vec<twinwatch::sim::Label>) {
    use twinwatch::sim::{Factory, SimConfig};
    let mut f = Factory::new(SimConfig {
        seed: 7,
        machines: 3,
        duration: minutes * 60_000,
        start: (twinwatch::time::wall_now() - minutes * 60_000) / 1000 * 1000,
        ..SimConfig::default()
    });
    let mut envs = Vec::new();
    while let Some(t) = f.next_tick() {
        envs.extend(t);
    }
    (envs, f.labels().to_vec())
}

async fn stream_alerts(js: &async_nats::jetstream::Context) -> Vec<Alert> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    let mut stream = js.get_stream("TWIN_ALERTS").await.unwrap();
    let n = stream.info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut msgs = consumer
        .fetch()
        .max_messages(n.max(1))
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    while let Some(Ok(m)) = msgs.next().await {
        out.push(serde_json::from_slice(&m.payload).unwrap());
        if out.len() == n {
            break;
        }
    }
    assert_eq!(out.len(), n);
    out
}

#[test]
fn jetstream_sigkill_restart_loses_nothing_and_keeps_alert_ids() {
    let server = NatsServer::jetstream("");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("models/state.json");
    let cfg = write_config(
        dir.path(),
        "twinwatch.toml",
        &format!(
            "[queries]\nenabled = false\n[source]\nmax_batch = 16\n[source.jetstream]\nenabled = true\ncreate = true\n\
             [sink]\njetstream = true\n[state]\npath = \"{}\"\ninterval = \"50ms\"\n",
            state.display()
        ),
    );
    let (envs, labels) = plant(40);
    // What an uninterrupted pipeline raises on the same input.
    let mut p = twinwatch::pipeline::Pipeline::new(&twinwatch::config::Config::default());
    let expected: Vec<Alert> = envs
        .chunks(64)
        .flat_map(|c| p.process(c, 0).alerts)
        .collect();
    assert!(!expected.is_empty());

    rt().block_on(async {
        let c = connect(&server.url(), ConnectOptions::new()).await;
        let js = async_nats::jetstream::new(c.clone());
        common::publish_backlog(
            &js,
            envs.iter()
                .map(|e| (e.subject.to_string(), e.payload.clone())),
        )
        .await;
        let total = envs.len() as u64;

        let mut first = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", &server.url()]);
        let stream = js.get_stream("TWIN_TELEMETRY").await.unwrap();
        let t = Instant::now();
        let killed_at = loop {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no progress: {}",
                first.stderr()
            );
            if let Ok(info) = stream.consumer_info("twinwatch").await
                && info.delivered.stream_sequence >= total / 3
                && state.exists()
            {
                first.signal("KILL");
                break info.delivered.stream_sequence;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        first.wait_exit(Duration::from_secs(5));
        println!("killed after {killed_at} of {total} messages");

        let mut second = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", &server.url()]);
        let t = Instant::now();
        loop {
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "did not finish: {}",
                second.stderr()
            );
            if let Ok(info) = stream.consumer_info("twinwatch").await
                && info.ack_floor.stream_sequence >= total
                && info.num_pending == 0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Graceful stop: drains, saves state, acknowledges, exits 0.
        second.signal("TERM");
        assert_eq!(
            second.wait_exit(Duration::from_secs(15)),
            Some(0),
            "{}",
            second.stderr()
        );
        assert!(
            second.stderr().contains("state restored"),
            "{}",
            second.stderr()
        );
        let info = stream.consumer_info("twinwatch").await.unwrap();
        assert_eq!(info.num_ack_pending, 0);

        let got = stream_alerts(&js).await;
        let ids = |v: &[Alert]| {
            let mut ids: Vec<String> = v.iter().map(|a| a.id.clone()).collect();
            ids.sort();
            ids
        };
        assert_eq!(
            ids(&got),
            ids(&expected),
            "the alert stream holds exactly the uninterrupted run's alerts, once each"
        );
        let hours = 3.0 * (40.0 - 10.0) / 60.0;
        let recall = twinwatch::eval::labels::score(&got, &labels, hours, 120_000);
        println!("{}", recall.report());
        assert_eq!(
            recall.recall(),
            twinwatch::eval::labels::score(&expected, &labels, hours, 120_000).recall()
        );
    });
}

#[test]
fn record_what_simulate_publishes() {
    let server = NatsServer::start("");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rec.ndjson");
    let mut rec = Twinwatch::spawn(&[
        "record",
        "--nats-url",
        &server.url(),
        "--output",
        out.to_str().unwrap(),
        "--count",
        "288",
    ]);
    let t = Instant::now();
    while !rec.stderr().contains("recording") {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", rec.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let sim = std::process::Command::new(env!("CARGO_BIN_EXE_twinwatch"))
        .args([
            "simulate",
            "--nats-url",
            &server.url(),
            "--duration",
            "2m",
            "--machines",
            "2",
            "--rate",
            "max",
        ])
        .output()
        .unwrap();
    assert!(
        sim.status.success(),
        "{}",
        String::from_utf8_lossy(&sim.stderr)
    );
    assert_eq!(
        rec.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        rec.stderr()
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 2 * 120 + 2 * 24);
    assert!(text.lines().all(|l| l.contains("\"received_at\":")));
    let replay = std::process::Command::new(env!("CARGO_BIN_EXE_twinwatch"))
        .args(["replay", "--input", out.to_str().unwrap()])
        .env("TWINWATCH_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&replay.stderr);
    assert!(log.contains("240 messages, 1440 readings"), "{log}");
    assert!(log.contains("0 late, 0 future-dated"), "{log}");
}

/// Signed telemetry verified live, a forged signature alerted as critical, and
/// a device approved by editing the registry while `run` keeps running.
#[test]
fn signatures_and_registry_reload_live() {
    use twinwatch::registry::{device_key, entry_toml, sign};
    let server = NatsServer::start("");
    let dir = tempfile::tempdir().unwrap();
    let key = device_key([42; 32]);
    let registry = dir.path().join("devices.toml");
    std::fs::write(
        &registry,
        entry_toml("plc-press-9", &["press-9".into()], &key.public_key(), true),
    )
    .unwrap();
    let cfg = base_config(
        dir.path(),
        &format!(
            "[devices]\nregistry = \"{}\"\nreload = \"100ms\"\n",
            registry.display()
        ),
    );
    let tw = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", &server.url()]);
    rt().block_on(async {
        let c = connect(&server.url(), ConnectOptions::new()).await;
        probe(&c, "press-9", Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("not subscribed: {}", tw.stderr()));
        let mut alerts = c.subscribe("twin.alerts.>").await.unwrap();
        c.flush().await.unwrap();
        let t0 = t0();
        let subject = "twin.telemetry.plant.press-9";
        let send = |s: i64, device: &str, signer: Option<&nkeys::KeyPair>| {
            let payload = telemetry(t0, "press-9", s, 70.0).replace("plc-press-9", device);
            let mut h = HeaderMap::new();
            if let Some(k) = signer {
                h.insert("Twin-Signature", sign(k, payload.as_bytes()).as_str());
            }
            c.publish_with_headers(subject, h, payload.into())
        };
        for s in 0..150 {
            send(s, "plc-press-9", Some(&key)).await.unwrap();
        }
        // Signed by someone else: critical.
        let forger = device_key([43; 32]);
        send(150, "plc-press-9", Some(&forger)).await.unwrap();
        c.flush().await.unwrap();
        async fn next(alerts: &mut async_nats::Subscriber, tw: &Twinwatch) -> (String, Alert) {
            let m = tokio::time::timeout(Duration::from_secs(10), alerts.next())
                .await
                .unwrap_or_else(|_| panic!("no alert: {}", tw.stderr()))
                .unwrap();
            (
                m.subject.to_string(),
                serde_json::from_slice::<Alert>(&m.payload).unwrap(),
            )
        }
        let (subj, a) = next(&mut alerts, &tw).await;
        assert_eq!(a.kind.as_str(), "signature_invalid", "{a:?}");
        assert_eq!(subj, "twin.alerts.critical.press-9");
        // A workstation nobody declared: unknown.
        send(151, "eng-ws-1", None).await.unwrap();
        c.flush().await.unwrap();
        let (_, a) = next(&mut alerts, &tw).await;
        assert_eq!(
            (a.kind.as_str(), a.device.as_deref()),
            ("unknown_device", Some("eng-ws-1"))
        );
        // Approve eng-ws-2 by adding it to the file; run picks it up.
        let mut text = std::fs::read_to_string(&registry).unwrap();
        text.push_str("\n[[device]]\nname = \"eng-ws-2\"\nmachines = [\"press-9\"]\n");
        std::fs::write(&registry, text).unwrap();
        let mut s = 152;
        let t = Instant::now();
        while !tw.stderr().contains("device registry reloaded") {
            assert!(t.elapsed() < Duration::from_secs(10), "{}", tw.stderr());
            send(s, "plc-press-9", Some(&key)).await.unwrap();
            c.flush().await.unwrap();
            s += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for k in 0..5 {
            send(s + k, "eng-ws-2", None).await.unwrap();
        }
        send(s + 5, "eng-ws-3", None).await.unwrap();
        c.flush().await.unwrap();
        // The next alert is eng-ws-3's: the approved eng-ws-2 raised none.
        let (_, a) = next(&mut alerts, &tw).await;
        assert_eq!(
            (a.kind.as_str(), a.device.as_deref()),
            ("unknown_device", Some("eng-ws-3")),
            "{a:?}"
        );
    });
}

#[test]
fn bench_measures_raw_delivery_then_the_pipeline() {
    // A small run against its own nats-server: the figures are not judged
    // here (benchmarks are not timed tests), only that each is measured.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twinwatch"))
        .args(["bench", "--messages", "3000", "--machines", "20"])
        .env("NATS_SERVER_BIN", common::nats_server_bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let fields: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"bench:"), "{stdout}");
    assert_eq!(
        [
            fields[2], fields[3], fields[5], fields[7], fields[8], fields[10]
        ],
        ["msgs/s", "ratio", "p99", "ms", "rss", "MB"],
        "{last}"
    );
    let num = |i: usize| fields[i].parse::<f64>().unwrap();
    assert!(num(1) > 0.0, "a sustained rate: {last}");
    assert!(
        num(4) > 0.0 && num(4) <= 1.5,
        "a ratio to raw delivery: {last}"
    );
    assert!(num(6) > 0.0, "spikes were timed: {stdout}");
    assert!(num(9) > 0.0, "peak RSS: {last}");
    // Raw delivery is run three times and the best run is the limit.
    let raw = stdout
        .lines()
        .find_map(|l| l.strip_prefix("raw NATS delivery to one counting subscriber: "))
        .unwrap_or_else(|| panic!("a raw delivery line: {stdout}"));
    let (limit, runs) = raw
        .split_once(" msgs/s (best of 3 runs: ")
        .unwrap_or_else(|| panic!("three raw runs: {raw}"));
    let runs: Vec<f64> = runs
        .trim_end_matches(')')
        .split(", ")
        .map(|r| r.parse().unwrap())
        .collect();
    assert_eq!(runs.len(), 3, "{raw}");
    let best = runs.iter().copied().fold(0.0, f64::max);
    assert!(best > 0.0, "{raw}");
    assert_eq!(limit.parse::<f64>().unwrap(), best, "{raw}");
}

/// A client and a core source on it, for the source's own tests.
async fn core_source(
    url: &str,
    cfg: twinwatch::config::SourceConfig,
) -> (Client, twinwatch::source::nats::NatsSource) {
    let client = async_nats::connect(url).await.unwrap();
    let source = twinwatch::source::nats::NatsSource::core(&client, &cfg)
        .await
        .unwrap();
    (client, source)
}

/// `n` messages of `size` spaces, one machine each, flushed.
async fn publish_blanks(client: &Client, n: usize, size: usize) {
    for i in 0..n {
        client
            .publish(format!("twin.telemetry.s.m{i}"), vec![b' '; size].into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
}

#[test]
fn source_batches_are_bounded_in_payload_bytes() {
    use twinwatch::source::Source;
    let server = NatsServer::start("");
    rt().block_on(async {
        let cfg = twinwatch::config::SourceConfig {
            max_batch_bytes: 1000,
            max_latency: 200,
            ..Default::default()
        };
        let (client, mut source) = core_source(&server.url(), cfg).await;
        publish_blanks(&client, 10, 300).await;
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < 10 {
            let batch = source.next_batch().await.unwrap().unwrap();
            sizes.push(batch.len());
        }
        // 300-byte payloads: a batch closes once it holds 1000 bytes or more.
        assert!(sizes.iter().all(|&n| n <= 4), "{sizes:?}");
        assert!(sizes.len() >= 3, "{sizes:?}");
    });
}

#[test]
fn a_pipeline_behind_holds_at_most_max_buffered_bytes_and_counts_what_it_drops() {
    use twinwatch::source::Source;
    let server = NatsServer::start("");
    rt().block_on(async {
        let cfg = twinwatch::config::SourceConfig {
            max_buffered_bytes: 20_000,
            max_batch: 100_000,
            max_batch_bytes: 1 << 30,
            max_latency: 50,
            ..Default::default()
        };
        let (client, mut source) = core_source(&server.url(), cfg).await;
        // Everything arrives while nothing is taken out: the pipeline is behind.
        publish_blanks(&client, 500, 300).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut took = 0;
        while let Ok(batch) =
            tokio::time::timeout(Duration::from_secs(1), source.next_batch()).await
        {
            took += batch.unwrap().unwrap().len();
        }
        // 300 payload bytes, a subject and the envelope's bookkeeping: about
        // 450 bytes a message, so 20,000 bytes hold some 40 of them.
        assert!(took > 0 && took <= 20_000 / 300, "took {took}");
        assert_eq!(took as u64 + source.dropped(), 500, "took {took}");
        // Once taken out, the room is free again.
        let dropped = source.dropped();
        publish_blanks(&client, 10, 300).await;
        let batch = tokio::time::timeout(Duration::from_secs(5), source.next_batch())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let mut more = batch.len();
        while more < 10 {
            more += source.next_batch().await.unwrap().unwrap().len();
        }
        assert_eq!(more, 10);
        assert_eq!(source.dropped(), dropped);
        // A message larger than the whole budget still gets through when
        // nothing else is held.
        client
            .publish("twin.telemetry.s.big", vec![b' '; 30_000].into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        let batch = tokio::time::timeout(Duration::from_secs(5), source.next_batch())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].payload.len(), 30_000);
    });
}

#[test]
fn metrics_and_readiness_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let cfg = base_config(
        dir.path(),
        &format!("[http]\naddr = \"127.0.0.1:{port}\"\n"),
    );
    // No server yet: served, but not ready.
    let nats_port = common::free_port();
    let waiting = Twinwatch::spawn(&[
        "run",
        "--config",
        &cfg,
        "--nats-url",
        &format!("nats://127.0.0.1:{nats_port}"),
    ]);
    let body = common::wait_http(port, "/healthz", "503", &waiting);
    assert!(body.contains("not ready"), "{body}");
    drop(waiting);

    let server = NatsServer::start("");
    let tw = Twinwatch::spawn(&["run", "--config", &cfg, "--nats-url", &server.url()]);
    common::wait_http(port, "/healthz", "200", &tw);
    rt().block_on(async {
        let c = connect(&server.url(), ConnectOptions::new()).await;
        // A bad message comes back as a dead letter once the loop took it.
        probe(&c, "press-9", Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("no dead letter: {}", tw.stderr()));
        steady_then_spike(&c, "press-9", 120).await;
    });
    // The counters are refreshed a few times a second.
    let t = Instant::now();
    let metrics = loop {
        let body = common::wait_http(port, "/metrics", "200", &tw);
        if body.contains("twinwatch_messages_total 121\n")
            && body.contains("twinwatch_alerts_total{")
        {
            break body;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{body}\n{}",
            tw.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        metrics.contains("twinwatch_readings_total 242\n"),
        "{metrics}"
    );
    // The probe is resent until answered: as many dead letters as bad messages.
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{prefix}: {metrics}"))
    };
    let bad = value("twinwatch_decode_errors_total{reason=\"invalid_json\"}");
    assert!(bad >= 1.0, "{metrics}");
    assert_eq!(value("twinwatch_dead_letters_total"), bad, "{metrics}");
    assert!(
        metrics.contains("twinwatch_alerts_total{kind=\"sensor_spike\",severity="),
        "{metrics}"
    );
    assert!(
        metrics.contains("twinwatch_machines{phase=\"protecting\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE twinwatch_envelopes_total counter"));
    // Two sensors of one machine, and the query features' baselines.
    assert!(value("twinwatch_baselines") >= 2.0, "{metrics}");
    assert!(value("twinwatch_watermark_lag_seconds") > 0.0, "{metrics}");
    let (status, _) = common::http_get(port, "/nope").unwrap();
    assert!(status.contains("404"), "{status}");
}

#[test]
fn alerts_view_prints_the_filtered_alerts_as_ndjson() {
    let server = NatsServer::start("");
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_twinwatch"))
        .args([
            "alerts",
            "--nats-url",
            &server.url(),
            "--json",
            "--min-severity",
            "high",
            "--count",
            "2",
        ])
        .env("TWINWATCH_LOG", "info")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !std::fs::read_to_string(&err)
        .unwrap_or_default()
        .contains("watching alerts")
    {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let alert = |machine: &str, severity: &str, ts: &str| {
        format!(
            r#"{{"id":"{machine}-{ts}","ts":"{ts}","emitted_at":"{ts}","machine":"{machine}","kind":"sensor_spike","score":0.9,"severity":"{severity}","detector":"holt_z","explanation":"x","incident":"i"}}"#
        )
    };
    rt().block_on(async {
        let c = connect(&server.url(), ConnectOptions::new()).await;
        for (m, s, ts) in [
            ("press-1", "low", "2026-11-27T08:00:01.000Z"),
            ("press-1", "high", "2026-11-27T08:00:02.000Z"),
            ("press-2", "medium", "2026-11-27T08:00:03.000Z"),
            ("press-2", "critical", "2026-11-27T08:00:04.000Z"),
        ] {
            c.publish(format!("twin.alerts.{s}.{m}"), alert(m, s, ts).into())
                .await
                .unwrap();
        }
        c.publish("twin.alerts.high.x", "not an alert".into())
            .await
            .unwrap();
        c.flush().await.unwrap();
    });
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the view did not stop after 2 alerts"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    let got: Vec<Alert> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(&str, &str)> = got
        .iter()
        .map(|a| (a.machine.as_str(), a.severity.as_str()))
        .collect();
    assert_eq!(seen, [("press-1", "high"), ("press-2", "critical")]);
}
