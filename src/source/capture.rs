//! Capture files (contract §4): NDJSON, one message a line, either a bare
//! telemetry object or an envelope
//! `{"subject", "received_at", "headers", "payload" | "payload_b64"}`.
//!
//! [`CaptureSource`] reads a file on its own thread (so parsing the file and
//! running the pipeline use both cores) and hands envelopes over in batches.
//! A line that is not a valid envelope is passed on as a bare payload: the
//! decoder then rejects it with a reason, exactly as it would a bad message
//! from the bus, so a capture replays malformed input faithfully.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::{Envelope, Source, SourceError};
use crate::time::EventTs;

/// Lines per batch handed to the pipeline.
pub const BATCH_LINES: usize = 2048;

#[derive(Deserialize)]
struct CaptureLine<'a> {
    #[serde(borrow, default)]
    subject: Option<Cow<'a, str>>,
    #[serde(default)]
    received_at: Option<EventTs>,
    #[serde(default)]
    headers: Option<BTreeMap<String, HeaderValues>>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload_b64: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HeaderValues {
    One(String),
    Many(Vec<String>),
}

/// Parses one capture line into an envelope. Never fails: what is not an
/// envelope is a bare payload for the decoder to judge.
pub fn parse_line(line: &[u8]) -> Envelope {
    if let Ok(text) = std::str::from_utf8(line)
        && let Ok(c) = serde_json::from_str::<CaptureLine>(text)
    {
        let payload = match (c.payload, &c.payload_b64) {
            (Some(raw), _) => Some(Bytes::copy_from_slice(raw.get().as_bytes())),
            (None, Some(b64)) => B64.decode(b64.as_bytes()).ok().map(Bytes::from),
            (None, None) => None,
        };
        if let Some(payload) = payload {
            let mut headers = Vec::new();
            for (k, v) in c.headers.unwrap_or_default() {
                match v {
                    HeaderValues::One(s) => headers.push((k, s)),
                    HeaderValues::Many(vs) => {
                        headers.extend(vs.into_iter().map(|s| (k.clone(), s)))
                    }
                }
            }
            return Envelope {
                subject: c.subject.map(Cow::into_owned).unwrap_or_default().into(),
                received_at: c.received_at.map(|t| t.0),
                headers,
                payload,
            };
        }
    }
    Envelope::new(String::new(), None, Bytes::copy_from_slice(line))
}

/// Writes envelopes as capture lines.
pub struct CaptureWriter<W: Write> {
    out: W,
    line: Vec<u8>,
}

impl<W: Write> CaptureWriter<W> {
    pub fn new(out: W) -> Self {
        CaptureWriter {
            out,
            line: Vec::with_capacity(512),
        }
    }

    /// Writes one envelope. The payload is embedded as JSON when it is valid
    /// JSON and carries no signature; otherwise as `payload_b64`, so that the
    /// exact bytes survive.
    pub fn write(&mut self, env: &Envelope) -> std::io::Result<()> {
        self.line.clear();
        self.line.extend_from_slice(b"{\"subject\":");
        serde_json::to_writer(&mut self.line, env.subject.as_str())?;
        if let Some(t) = env.received_at {
            self.line.extend_from_slice(b",\"received_at\":");
            self.line.extend_from_slice(t.to_string().as_bytes());
        }
        if !env.headers.is_empty() {
            let mut map: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (k, v) in &env.headers {
                map.entry(k).or_default().push(v);
            }
            self.line.extend_from_slice(b",\"headers\":{");
            for (i, (k, vs)) in map.iter().enumerate() {
                if i > 0 {
                    self.line.push(b',');
                }
                serde_json::to_writer(&mut self.line, k)?;
                self.line.push(b':');
                if vs.len() == 1 {
                    serde_json::to_writer(&mut self.line, vs[0])?;
                } else {
                    serde_json::to_writer(&mut self.line, vs)?;
                }
            }
            self.line.push(b'}');
        }
        let signed = env.header("Twin-Signature").is_some();
        let embeddable = !signed && json_fits_one_line(&env.payload);
        if embeddable {
            self.line.extend_from_slice(b",\"payload\":");
            self.line.extend_from_slice(&env.payload);
        } else {
            self.line.extend_from_slice(b",\"payload_b64\":\"");
            self.line
                .extend_from_slice(B64.encode(&env.payload).as_bytes());
            self.line.push(b'"');
        }
        self.line.extend_from_slice(b"}\n");
        self.out.write_all(&self.line)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Whether the bytes are one JSON value that can sit inside a capture line unchanged.
fn json_fits_one_line(payload: &[u8]) -> bool {
    if payload.contains(&b'\n') || payload.contains(&b'\r') {
        return false;
    }
    match std::str::from_utf8(payload) {
        Ok(s) => serde_json::from_str::<&RawValue>(s).is_ok_and(|r| r.get().len() == s.len()),
        Err(_) => false,
    }
}

/// Reads a capture file on a thread of its own.
pub struct CaptureSource {
    rx: mpsc::Receiver<Result<Vec<Envelope>, SourceError>>,
}

impl CaptureSource {
    /// Opens `path` (`-` for standard input) and starts reading it.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let reader: Box<dyn Read + Send> = if path == Path::new("-") {
            Box::new(std::io::stdin())
        } else {
            Box::new(File::open(path).map_err(|source| SourceError::Io {
                path: path.display().to_string(),
                source,
            })?)
        };
        Ok(Self::from_reader(reader, path.to_path_buf()))
    }

    /// Reads capture lines from any reader.
    pub fn from_reader(reader: Box<dyn Read + Send>, name: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel(4);
        std::thread::Builder::new()
            .name("capture-reader".into())
            .spawn(move || read_loop(BufReader::with_capacity(1 << 20, reader), &name, &tx))
            .expect("spawning the capture reader thread");
        CaptureSource { rx }
    }
}

fn read_loop(
    mut reader: impl BufRead,
    name: &Path,
    tx: &mpsc::Sender<Result<Vec<Envelope>, SourceError>>,
) {
    let mut batch = Vec::with_capacity(BATCH_LINES);
    let mut line = Vec::with_capacity(4096);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                let trimmed = line.trim_ascii();
                if trimmed.is_empty() {
                    continue;
                }
                batch.push(parse_line(trimmed));
                if batch.len() >= BATCH_LINES
                    && tx
                        .blocking_send(Ok(std::mem::replace(
                            &mut batch,
                            Vec::with_capacity(BATCH_LINES),
                        )))
                        .is_err()
                {
                    return;
                }
            }
            Err(source) => {
                let _ = tx.blocking_send(Err(SourceError::Io {
                    path: name.display().to_string(),
                    source,
                }));
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}

impl Source for CaptureSource {
    async fn next_batch(&mut self) -> Result<Option<Vec<Envelope>>, SourceError> {
        self.rx.recv().await.transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_and_bare_lines() {
        let e = parse_line(
            br#"{"subject":"twin.telemetry.s1.m1","received_at":"2026-11-27T08:00:00Z","headers":{"A":"1","B":["2","3"]},"payload":{"ts":1,"readings":{}}}"#,
        );
        assert_eq!(e.subject.as_str(), "twin.telemetry.s1.m1");
        assert_eq!(e.received_at, Some(1_795_766_400_000));
        assert_eq!(e.headers.len(), 3);
        assert_eq!(&e.payload[..], br#"{"ts":1,"readings":{}}"#);

        let bare = br#"{"ts":1764230400125,"machine":"m","readings":{"t":1}}"#;
        let e = parse_line(bare);
        assert_eq!(e.subject.as_str(), "");
        assert_eq!(&e.payload[..], &bare[..]);

        let junk = b"{not json";
        assert_eq!(&parse_line(junk).payload[..], junk);
    }

    #[test]
    fn writer_round_trips_exact_bytes() {
        let env = Envelope::new(
            "twin.telemetry.a.b",
            Some(42),
            &b"{\"ts\": 1, \"readings\": {}}"[..],
        );
        let signed = {
            let mut e = env.clone();
            e.headers.push(("Twin-Signature".into(), "c2ln".into()));
            e
        };
        let odd = Envelope::new("twin.telemetry.a.b", Some(43), &b"\xff\xfe not utf8\n"[..]);
        let mut w = CaptureWriter::new(Vec::new());
        for e in [&env, &signed, &odd] {
            w.write(e).unwrap();
        }
        let text = w.into_inner();
        let lines: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 3);
        assert!(
            std::str::from_utf8(lines[1])
                .unwrap()
                .contains("payload_b64")
        );
        assert_eq!(parse_line(lines[0]), env);
        assert_eq!(parse_line(lines[1]), signed);
        assert_eq!(parse_line(lines[2]), odd);
    }
}
