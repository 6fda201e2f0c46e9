//! The device registry: which devices may speak for which machines, and how
//! they prove it.
//!
//! A TOML file (`devices.registry`, default `devices.toml`) lists devices:
//!
//! ```toml
//! [[device]]
//! name = "plc-07a"                 # the `device` field of its messages
//! machines = ["press-07"]          # the machines it may report for
//! public_key = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"  # optional NATS user nkey
//! require_signature = true         # optional; needs public_key
//! ```
//!
//! A declared device is approved for its machines: it never raises
//! `unknown_device` there, and its readings teach the baselines even when it
//! appears after the machine has learned. When it has a key, the
//! `Twin-Signature` header (base64 ed25519 over the raw payload bytes,
//! contract §1) is verified with the `nkeys` crate; a bad signature, or none
//! from a device that must sign, is `signature_invalid`.
//!
//! `run` checks the file for changes every `devices.reload` ([`RegistryWatch`]),
//! so approving a device needs no restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use nkeys::KeyPair;
use serde::Deserialize;

/// The header that carries a device's signature.
pub const SIGNATURE_HEADER: &str = "Twin-Signature";

/// A registry problem, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    device: Vec<toml::Spanned<EntryText>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryText {
    name: String,
    #[serde(default)]
    machines: Vec<String>,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    require_signature: bool,
}

/// One declared device.
#[derive(Clone)]
pub struct DeviceEntry {
    pub name: String,
    pub machines: Vec<String>,
    pub public_key: Option<String>,
    pub require_signature: bool,
    key: Option<Arc<KeyPair>>,
}

impl std::fmt::Debug for DeviceEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceEntry")
            .field("name", &self.name)
            .field("machines", &self.machines)
            .field("public_key", &self.public_key)
            .field("require_signature", &self.require_signature)
            .finish()
    }
}

/// What a signature check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureCheck {
    /// The signature verified against the device's key.
    Valid,
    /// Nothing to verify: no key, or no signature from a device that need not sign.
    Unchecked,
    /// A device that must sign sent no signature.
    Missing,
    /// The signature is not valid base64, has the wrong length, or does not verify.
    Bad,
}

impl DeviceEntry {
    /// Whether the device is declared for `machine`.
    pub fn serves(&self, machine: &str) -> bool {
        self.machines.iter().any(|m| m == machine)
    }

    /// Verifies `signature` (the header's value) over `payload`.
    pub fn check(&self, payload: &[u8], signature: Option<&str>) -> SignatureCheck {
        let Some(key) = &self.key else {
            return SignatureCheck::Unchecked;
        };
        let Some(sig) = signature else {
            return if self.require_signature {
                SignatureCheck::Missing
            } else {
                SignatureCheck::Unchecked
            };
        };
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(sig.trim()) else {
            return SignatureCheck::Bad;
        };
        match key.verify(payload, &bytes) {
            Ok(()) => SignatureCheck::Valid,
            Err(_) => SignatureCheck::Bad,
        }
    }
}

/// The declared devices, by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Vec<DeviceEntry>,
    by_name: HashMap<String, usize>,
}

impl Registry {
    /// Parses registry text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Registry, RegistryError> {
        let invalid = |offset: usize, message: String| RegistryError::Invalid {
            path: path.to_path_buf(),
            line: text[..offset.min(text.len())].matches('\n').count() + 1,
            message,
        };
        let file: File = toml::from_str(text).map_err(|e| {
            invalid(
                e.span().map_or(0, |s| s.start),
                e.message().trim().to_string(),
            )
        })?;
        let mut reg = Registry::default();
        for spanned in file.device {
            let at = spanned.span().start;
            let e = spanned.into_inner();
            if e.name.is_empty() {
                return Err(invalid(at, "a device needs a `name`".into()));
            }
            if reg.by_name.contains_key(&e.name) {
                return Err(invalid(
                    at,
                    format!("device `{}` is declared twice", e.name),
                ));
            }
            let key = match &e.public_key {
                Some(pk) => {
                    if !pk.starts_with('U') {
                        return Err(invalid(
                            at,
                            format!(
                                "device `{}`: public_key must be a NATS user nkey (U...)",
                                e.name
                            ),
                        ));
                    }
                    let kp = KeyPair::from_public_key(pk).map_err(|err| {
                        invalid(
                            at,
                            format!("device `{}`: public_key is not an nkey: {err}", e.name),
                        )
                    })?;
                    Some(Arc::new(kp))
                }
                None if e.require_signature => {
                    return Err(invalid(
                        at,
                        format!(
                            "device `{}`: require_signature needs a public_key to verify with",
                            e.name
                        ),
                    ));
                }
                None => None,
            };
            reg.by_name.insert(e.name.clone(), reg.entries.len());
            reg.entries.push(DeviceEntry {
                name: e.name,
                machines: e.machines,
                public_key: e.public_key,
                require_signature: e.require_signature,
                key,
            });
        }
        Ok(reg)
    }

    /// Loads a registry file; `Ok(None)` when there is no such file.
    pub fn load(path: &Path) -> Result<Option<Registry>, RegistryError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Registry::parse(&text, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RegistryError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The entry of a device, if declared.
    pub fn get(&self, device: &str) -> Option<&DeviceEntry> {
        self.by_name.get(device).map(|&i| &self.entries[i])
    }

    /// How many devices are declared.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no device is declared.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `users.conf` that `deploy/nats/accounts.conf` includes: the
    /// processor's and the SOC's public nkeys, and one DEVICES user per
    /// device with a key, allowed to publish only its machines' telemetry
    /// and flow subjects (`twin.telemetry.*.<machine>`, `twin.flows.*.<machine>`)
    /// and to subscribe to nothing. Devices without a key are left out (they
    /// could not log in with one); they are named in a comment.
    pub fn nats_users(&self, processor_key: &str, soc_key: &str) -> String {
        let mut out = format!(
            "# Written by `twinwatch devices nats-users` from the device registry; included by accounts.conf.\n\
             PROCESSOR_NKEY: \"{processor_key}\"\nSOC_NKEY: \"{soc_key}\"\nDEVICE_USERS: [\n"
        );
        let mut keyless = Vec::new();
        for d in &self.entries {
            let Some(key) = &d.public_key else {
                keyless.push(d.name.as_str());
                continue;
            };
            let subjects: Vec<String> = d
                .machines
                .iter()
                .flat_map(|m| {
                    let t = crate::alerts::subject_token(m);
                    [
                        format!("\"twin.telemetry.*.{t}\""),
                        format!("\"twin.flows.*.{t}\""),
                    ]
                })
                .collect();
            out.push_str(&format!(
                "  # {}\n  {{ nkey: \"{key}\", permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ deny: [\">\"] }} }} }}\n",
                d.name,
                subjects.join(", ")
            ));
        }
        out.push_str("]\n");
        if !keyless.is_empty() {
            out.push_str(&format!(
                "# Without a public key, so without a NATS user: {}\n",
                keyless.join(", ")
            ));
        }
        out
    }
}

/// Watches the registry file and reloads it when it changes.
pub struct RegistryWatch {
    path: PathBuf,
    every: Duration,
    checked: Instant,
    stamp: Option<(SystemTime, u64)>,
}

impl RegistryWatch {
    /// Watches `path`; `current` is what was loaded at start.
    pub fn new(path: &Path, every: Duration) -> Self {
        RegistryWatch {
            path: path.to_path_buf(),
            every,
            checked: Instant::now(),
            stamp: stamp(path),
        }
    }

    /// When the check interval has passed and the file changed: the new
    /// registry (an empty one when the file was removed), or why it could not
    /// be loaded (the caller keeps the registry it has).
    pub fn poll(&mut self) -> Option<Result<Registry, RegistryError>> {
        if self.checked.elapsed() < self.every {
            return None;
        }
        self.checked = Instant::now();
        let now = stamp(&self.path);
        if now == self.stamp {
            return None;
        }
        self.stamp = now;
        Some(Registry::load(&self.path).map(Option::unwrap_or_default))
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The base64 `Twin-Signature` value of `payload` signed by `key`.
pub fn sign(key: &KeyPair, payload: &[u8]) -> String {
    // Signing only fails for a public-only key pair, which callers never hold here.
    let sig = key.sign(payload).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(sig)
}

/// The registry entry (TOML) of a device.
pub fn entry_toml(name: &str, machines: &[String], public_key: &str, require: bool) -> String {
    let quote = |s: &str| format!("{s:?}");
    let machines: Vec<String> = machines.iter().map(|m| quote(m)).collect();
    format!(
        "[[device]]\nname = {}\nmachines = [{}]\npublic_key = {}\nrequire_signature = {require}\n",
        quote(name),
        machines.join(", "),
        quote(public_key)
    )
}

/// A user key pair for a device, from 32 bytes of seed material.
pub fn device_key(raw: [u8; 32]) -> KeyPair {
    // Any 32 bytes make a valid ed25519 signing key.
    KeyPair::new_from_raw(nkeys::KeyPairType::User, raw).expect("32 bytes are a valid seed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg_with(pk: &str, require: bool) -> Registry {
        let text = entry_toml("plc-1", &["m1".to_string()], pk, require);
        Registry::parse(&text, Path::new("devices.toml")).unwrap()
    }

    #[test]
    fn signatures_verify_only_with_the_right_key_and_bytes() {
        let key = device_key([7; 32]);
        let other = device_key([8; 32]);
        let reg = reg_with(&key.public_key(), true);
        let e = reg.get("plc-1").unwrap();
        assert!(e.serves("m1") && !e.serves("m2"));
        let payload = br#"{"ts":1,"readings":{"a":1}}"#;
        let good = sign(&key, payload);
        assert_eq!(e.check(payload, Some(&good)), SignatureCheck::Valid);
        assert_eq!(e.check(b"{}", Some(&good)), SignatureCheck::Bad);
        assert_eq!(
            e.check(payload, Some(&sign(&other, payload))),
            SignatureCheck::Bad
        );
        assert_eq!(e.check(payload, Some("not base64!")), SignatureCheck::Bad);
        assert_eq!(e.check(payload, Some("c2ln")), SignatureCheck::Bad);
        assert_eq!(e.check(payload, None), SignatureCheck::Missing);
        let relaxed = reg_with(&key.public_key(), false);
        let e = relaxed.get("plc-1").unwrap();
        assert_eq!(e.check(payload, None), SignatureCheck::Unchecked);
    }

    #[test]
    fn the_watch_reloads_a_changed_file_and_keeps_going_on_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.toml");
        let mut w = RegistryWatch::new(&path, Duration::ZERO);
        assert!(w.poll().is_none(), "no file, no change");
        std::fs::write(&path, "[[device]]\nname = \"a\"\nmachines = [\"m\"]\n").unwrap();
        let reg = w.poll().expect("changed").unwrap();
        assert!(reg.get("a").is_some_and(|e| e.serves("m")));
        assert!(w.poll().is_none(), "unchanged");
        std::fs::write(&path, "[[device]]\nnom = 1\n").unwrap();
        assert!(w.poll().expect("changed").is_err());
        std::fs::remove_file(&path).unwrap();
        assert!(w.poll().expect("removed").unwrap().is_empty());
    }

    #[test]
    fn bad_files_name_the_line() {
        let p = Path::new("devices.toml");
        let err = |text: &str| Registry::parse(text, p).unwrap_err().to_string();
        assert!(
            err("[[device]]\nname = \"a\"\nrequire_signature = true\n")
                .contains("needs a public_key")
        );
        let e = err("[[device]]\nname = \"a\"\n\n[[device]]\nname = \"a\"\n");
        assert!(
            e.contains("declared twice") && e.starts_with("devices.toml:4"),
            "{e}"
        );
        assert!(err("[[device]]\nname = \"a\"\npublic_key = \"Uxyz\"\n").contains("not an nkey"));
        assert!(err("[[device]]\nname = \"a\"\nbogus = 1\n").contains("bogus"));
        let seed_like = device_key([1; 32]).seed().unwrap();
        assert!(
            err(&format!(
                "[[device]]\nname = \"a\"\npublic_key = \"{seed_like}\"\n"
            ))
            .contains("user nkey")
        );
        assert!(
            Registry::load(Path::new("/nonexistent/devices.toml"))
                .unwrap()
                .is_none()
        );
    }
}
