//! Test harness: a private `nats-server` on a free loopback port with the
//! configuration a test needs, the twinwatch binary as a child process, and
//! certificates made at test time.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server binary (the library's search: `NATS_SERVER_BIN`, `PATH`, Debian's path).
pub fn nats_server_bin() -> String {
    twinwatch::bench::nats_server_bin()
        .map(|p| p.display().to_string())
        .expect("nats-server not found: install it (scripts/test does) or set NATS_SERVER_BIN")
}

pub fn free_port() -> u16 {
    twinwatch::bench::free_port().unwrap()
}

use twinwatch::bench::wait_for_port;

/// Event time of the first test message: ten minutes ago, on a whole minute, so
/// no message is dated in the future of its arrival.
pub fn t0() -> i64 {
    (twinwatch::time::wall_now() - 600_000) / 60_000 * 60_000
}

/// A runtime for a test's client side.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A nats-server owned by one test; killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
}

impl NatsServer {
    /// Starts a server; `extra` is appended to its configuration (`{dir}` is replaced by a private folder).
    pub fn start(extra: &str) -> Self {
        Self::start_on(free_port(), extra)
    }

    pub fn start_on(port: u16, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nats.conf");
        let text = format!(
            "listen: 127.0.0.1:{port}\n{}\n",
            extra.replace("{dir}", &dir.path().display().to_string())
        );
        std::fs::write(&conf, text).unwrap();
        let mut s = NatsServer {
            child: None,
            port,
            dir,
            conf,
        };
        s.spawn();
        s
    }

    /// Starts a server with JetStream storing under its private folder.
    pub fn jetstream(extra: &str) -> Self {
        Self::start(&format!(
            "jetstream {{ store_dir: \"{{dir}}/js\" }}\n{extra}"
        ))
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        if !wait_for_port(self.port, Duration::from_secs(15)) {
            panic!("nats-server did not listen: {}", self.log());
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts the server again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A twinwatch child process; killed when dropped. Its standard error goes to a file.
pub struct Twinwatch {
    pub child: Child,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Twinwatch {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_env(args, None)
    }

    /// Spawns with `NATS_URL` set to `nats_url` (or removed).
    pub fn spawn_env(args: &[&str], nats_url: Option<&str>) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twinwatch"));
        match nats_url {
            Some(u) => cmd.env("NATS_URL", u),
            None => cmd.env_remove("NATS_URL"),
        };
        Self::launch(cmd, args)
    }

    /// Spawns in the working directory `cwd` (relative paths of a configuration
    /// resolve there), with the variables `env` set.
    pub fn spawn_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twinwatch"));
        cmd.current_dir(cwd)
            .env_remove("NATS_URL")
            .envs(env.iter().copied());
        Self::launch(cmd, args)
    }

    fn launch(mut cmd: Command, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr.log");
        let child = cmd
            .args(args)
            .env("TWINWATCH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting twinwatch");
        Twinwatch {
            child,
            stderr,
            _dir: dir,
        }
    }

    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits for the process to exit; its exit code, or `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for Twinwatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a configuration file and returns its path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files.
pub struct Pki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

pub fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "twinwatch test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(vec!["twinwatch-processor".into()]);
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
    }
}

/// Creates the telemetry stream and fills it, waiting for every acknowledgement
/// (in chunks: the client bounds publishes awaiting their acknowledgement).
pub async fn publish_backlog(
    js: &async_nats::jetstream::Context,
    messages: impl IntoIterator<Item = (String, bytes::Bytes)>,
) {
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TWIN_TELEMETRY".into(),
        subjects: vec!["twin.telemetry.>".into(), "twin.flows.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut acks = Vec::new();
    for (subject, payload) in messages {
        acks.push(js.publish(subject, payload).await.unwrap());
        if acks.len() == 500 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// One HTTP GET over a plain socket: (status line, body).
pub fn http_get(port: u16, path: &str) -> Option<(String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

pub fn wait_http(port: u16, path: &str, want: &str, tw: &Twinwatch) -> String {
    let t = Instant::now();
    loop {
        if let Some((status, body)) = http_get(port, path)
            && status.contains(want)
        {
            return body;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{path} never answered {want}: {}",
            tw.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
