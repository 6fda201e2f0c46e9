//! NATS connection: the plant's security settings (TLS with a custom CA, mutual
//! TLS, creds files, nkey seeds, user/password, token) turned into an
//! `async-nats` client, and the start-up policy around it:
//!
//! - a server that cannot be reached is retried with exponential backoff
//!   (0.5 s doubling to 30 s), one log line per attempt, never giving up;
//! - a server that refuses the credentials, or a TLS set-up that cannot work,
//!   is a configuration problem: [`NatsError::Refused`], which the binary turns
//!   into exit code 2.
//!
//! Once connected, the client reconnects by itself for ever; disconnections
//! and reconnections are logged. Secrets never reach a log line: URLs are
//! logged without their user-info, passwords and tokens not at all.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event};
use tracing::{error, info, warn};

use crate::config::NatsConfig;

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// Refused for a reason retrying will not fix: credentials, TLS, a bad URL or file.
    #[error("{0}")]
    Refused(String),
    /// Stopped before a connection was made (shutdown requested).
    #[error("stopped before NATS was reached")]
    Stopped,
    /// A request to the server failed after connecting.
    #[error("{0}")]
    Request(String),
}

/// A URL with any `user:password@` removed, for logs.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***@{}", &u[..scheme], &u[at + 1..])
            }
            (None, Some(at)) => format!("***@{}", &u[at + 1..]),
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

async fn options(cfg: &NatsConfig) -> Result<ConnectOptions, NatsError> {
    let mut o = if !cfg.creds.is_empty() {
        ConnectOptions::with_credentials_file(&cfg.creds)
            .await
            .map_err(|e| NatsError::Refused(format!("nats.creds `{}`: {e}", cfg.creds)))?
    } else if !cfg.nkey_seed.is_empty() {
        let seed = std::fs::read_to_string(&cfg.nkey_seed)
            .map_err(|e| NatsError::Refused(format!("nats.nkey_seed `{}`: {e}", cfg.nkey_seed)))?;
        let seed = seed.trim().to_string();
        if nkeys::KeyPair::from_seed(&seed).is_err() {
            return Err(NatsError::Refused(format!(
                "nats.nkey_seed `{}` does not hold an nkey seed (a line starting with SU)",
                cfg.nkey_seed
            )));
        }
        ConnectOptions::with_nkey(seed)
    } else if !cfg.user.is_empty() {
        ConnectOptions::with_user_and_password(cfg.user.clone(), cfg.password.0.clone())
    } else if !cfg.token.0.is_empty() {
        ConnectOptions::with_token(cfg.token.0.clone())
    } else {
        ConnectOptions::new()
    };
    for (key, path) in [
        ("nats.ca", &cfg.ca),
        ("nats.cert", &cfg.cert),
        ("nats.key", &cfg.key),
    ] {
        if !path.is_empty() && !std::path::Path::new(path).is_file() {
            return Err(NatsError::Refused(format!("{key} `{path}`: no such file")));
        }
    }
    if !cfg.ca.is_empty() {
        o = o.add_root_certificates(PathBuf::from(&cfg.ca));
    }
    if !cfg.cert.is_empty() {
        o = o.add_client_certificate(PathBuf::from(&cfg.cert), PathBuf::from(&cfg.key));
    }
    let tls =
        cfg.require_tls || !cfg.ca.is_empty() || !cfg.cert.is_empty() || cfg.url.contains("tls://");
    Ok(o.require_tls(tls)
        .name(&cfg.name)
        .connection_timeout(Duration::from_millis(cfg.connect_timeout.max(1) as u64))
        .max_reconnects(None)
        .subscription_capacity(cfg.subscription_capacity)
        .event_callback(|event| async move {
            match event {
                Event::Connected => info!("NATS connection (re)established"),
                Event::Disconnected => warn!("NATS connection lost; reconnecting"),
                Event::SlowConsumer(sid) => warn!(
                    subscription = sid,
                    "NATS slow consumer: the server dropped messages"
                ),
                Event::ServerError(e) => warn!(error = %e, "NATS server error"),
                Event::ClientError(e) => warn!(error = %e, "NATS client error"),
                Event::LameDuckMode => warn!("NATS server entering lame duck mode"),
                Event::Draining | Event::Closed => {}
            }
        }))
}

/// Whether a connection error is a TLS verdict (an untrusted or missing
/// certificate) rather than a network fault; rustls reports those as I/O errors.
fn is_tls_failure(message: &str) -> bool {
    [
        "invalid peer certificate",
        "certificate required",
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "HandshakeFailure",
        "peer is incompatible",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// Connects, retrying an unreachable server until `stop` resolves.
pub async fn connect(
    cfg: &NatsConfig,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Client, NatsError> {
    let shown = redact_url(&cfg.url);
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1u32;
    loop {
        let o = options(cfg).await?;
        match o.connect(cfg.url.as_str()).await {
            Ok(client) => {
                info!(url = %shown, "connected to NATS");
                return Ok(client);
            }
            Err(e) => match e.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    error!(url = %shown, "NATS refused the credentials");
                    return Err(NatsError::Refused(format!(
                        "NATS at {shown} refused the credentials ({e}); check nats.creds, nats.nkey_seed, nats.user/password or nats.token"
                    )));
                }
                ConnectErrorKind::Tls => {
                    return Err(NatsError::Refused(format!(
                        "TLS with NATS at {shown} failed ({e}); check nats.ca, nats.cert and nats.key"
                    )));
                }
                _ if is_tls_failure(&e.to_string()) => {
                    return Err(NatsError::Refused(format!(
                        "TLS with NATS at {shown} failed ({e}); check nats.ca, nats.cert and nats.key"
                    )));
                }
                ConnectErrorKind::ServerParse => {
                    return Err(NatsError::Refused(format!(
                        "NATS URL `{shown}` is not valid ({e})"
                    )));
                }
                _ => {
                    warn!(url = %shown, attempt, retry_in = ?delay, "cannot reach NATS: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => return Err(NatsError::Stopped),
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                    attempt += 1;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_logged_without_secrets() {
        assert_eq!(
            redact_url("nats://alice:s3cret@10.0.0.1:4222"),
            "nats://***@10.0.0.1:4222"
        );
        assert_eq!(
            redact_url("tls://h:4222,nats://tok@h2:4222"),
            "tls://h:4222,nats://***@h2:4222"
        );
        assert_eq!(redact_url("127.0.0.1:4222"), "127.0.0.1:4222");
    }
}
