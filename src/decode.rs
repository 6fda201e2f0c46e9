//! Decode: raw payloads (contract §1 telemetry, §2 flow records) into Arrow
//! record batches, with typed serde structs — never `serde_json::Value` — and
//! Arrow builders that live as long as the decoder.
//!
//! Each call to [`Decoder::decode`] turns a batch of envelopes into a
//! [`DecodedBatch`] of three tables plus the rejected envelopes
//! ([`Decoder::decode_parts`], which the pipeline calls, decodes a big batch
//! as two such parts at once on two threads, with the same rows and ids):
//!
//! **`readings`** — one row per reading (long form):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `ts` | timestamp(ms, UTC) | event time of the message |
//! | `received_at` | timestamp(ms, UTC) | arrival time (the event time when unknown) |
//! | `subject` | text (dictionary) | NATS subject |
//! | `machine` | text (dictionary) | machine (default: last subject token) |
//! | `device` | text (dictionary) | sending device (default: the machine) |
//! | `seq` | uint64, nullable | device sequence number |
//! | `metric` | text (dictionary) | reading name |
//! | `value` | float64, nullable | the reading; null means "no value this time" |
//! | `payload_bytes` | uint32 | size of the payload that carried the message |
//! | `machine_id`, `device_id`, `metric_id` | uint32 | interned ids (dense, stable for the process) |
//! | `message` | uint32 | row of the message in this batch's `messages` table |
//!
//! **`messages`** — one row per telemetry object: `ts, received_at, subject,
//! machine, device, seq, payload_bytes, readings` (count), `machine_id,
//! device_id, first_reading` (row of its first reading in `readings`).
//! A message's readings are the contiguous rows
//! `first_reading .. first_reading + readings`. `envelope` is the index of the
//! envelope that carried it in the decoded batch (arrival order).
//!
//! **`flows`** — one row per flow record: `ts, received_at, subject, machine,
//! src, dst, dst_port` (uint16, nullable), `proto, app, op` (utf8, nullable),
//! `bytes` (uint64), `packets` (uint64, nullable), `payload_bytes, machine_id,
//! envelope`.
//!
//! "text (dictionary)" is Arrow's `Dictionary(UInt32, Utf8)`: `machine`,
//! `device` and `metric` are keyed by their interned ids, `subject` by a
//! per-batch dictionary. SQL treats them as text; Rust readers cast them.
//!
//! A payload that breaks the contract is rejected whole (an array with one bad
//! object included) with a [`Reason`]; nothing here panics on input.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use arrow::array::builder::NullBufferBuilder;
use arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, DictionaryArray, PrimitiveArray, StringBuilder,
    StringDictionaryBuilder, TimestampMillisecondBuilder, UInt16Builder, UInt32Array,
    UInt32Builder, UInt64Builder,
};
use arrow::buffer::ScalarBuffer;
use arrow::datatypes::{
    DataType, Field, Float64Type, Schema, SchemaRef, TimeUnit, TimestampMillisecondType,
    UInt32Type, UInt64Type,
};
use arrow::record_batch::RecordBatch;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

mod fast;

use crate::config::InputConfig;
use crate::intern::Interner;
use crate::source::{Envelope, Stream};
use crate::time::{EventTs, Millis, plausible};

/// Longest machine, device or metric name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Deepest nesting of objects and arrays accepted. Contract messages need 3;
/// anything far deeper is an attack on parsers, refused before parsing.
pub const MAX_DEPTH: usize = 32;

/// Whether JSON text nests objects/arrays deeper than `max` (brackets inside
/// strings do not count). No allocation; 64 bytes at a time.
fn nests_deeper_than(text: &[u8], max: usize) -> bool {
    // Nesting deeper than `max` needs more than `max` opening brackets: a
    // count settles every ordinary message without following strings.
    if count_opening(text) <= max {
        return false;
    }
    // An array payload has many brackets but is shallow. Each 64-byte block
    // becomes bitmasks (quotes, backslashes, brackets); the bits inside
    // strings are the prefix XOR of the quotes. A block whose brackets
    // cannot pass the limit nor go below zero moves the depth by counts
    // alone; the rest (escapes, blocks near the limit) is followed byte by byte.
    let mut walk = Walk {
        depth: 0,
        in_string: false,
        escaped: false,
        max,
    };
    let mut blocks = text.chunks_exact(64);
    for block in &mut blocks {
        let m = masks(block);
        if m.backslash == 0 && !walk.escaped {
            let mut inside = m.quote;
            for shift in [1, 2, 4, 8, 16, 32] {
                inside ^= inside << shift;
            }
            if walk.in_string {
                inside = !inside;
            }
            let opens = (m.open & !inside).count_ones() as usize;
            let closes = (m.close & !inside).count_ones() as usize;
            if walk.depth + opens <= max && closes <= walk.depth {
                walk.depth = walk.depth + opens - closes;
                walk.in_string = inside >> 63 == 1;
                continue;
            }
        }
        if walk.bytes(block) {
            return true;
        }
    }
    walk.bytes(blocks.remainder())
}

/// Opening brackets in `text`, counted in byte lanes (16 at a time).
fn count_opening(text: &[u8]) -> usize {
    let chunks = text.chunks_exact(128);
    let tail = chunks.remainder();
    let mut n = 0;
    for chunk in chunks {
        let k: u8 = chunk
            .iter()
            .map(|&b| u8::from(b == b'{') + u8::from(b == b'['))
            .sum();
        n += k as usize;
    }
    n + tail.iter().filter(|&&b| b == b'{' || b == b'[').count()
}

/// The depth check's state between blocks.
struct Walk {
    depth: usize,
    in_string: bool,
    escaped: bool,
    max: usize,
}

impl Walk {
    /// Follows `bytes` one at a time; true once deeper than `max`.
    fn bytes(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > self.max {
                        return true;
                    }
                }
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }
}

/// Bit i of each mask: whether byte i of a 64-byte block is that character.
struct Masks {
    quote: u64,
    backslash: u64,
    open: u64,
    close: u64,
}

#[cfg(target_arch = "x86_64")]
fn masks(block: &[u8]) -> Masks {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    assert_eq!(block.len(), 64);
    let mut m = Masks {
        quote: 0,
        backslash: 0,
        open: 0,
        close: 0,
    };
    // SAFETY: SSE2 is part of every x86_64 target; each load reads 16 bytes
    // at offsets 0, 16, 32, 48 of a block asserted to be 64 bytes long, and
    // `loadu` needs no alignment.
    unsafe {
        let eq = |v: __m128i, c: u8| _mm_cmpeq_epi8(v, _mm_set1_epi8(c as i8));
        let bits = |v: __m128i| _mm_movemask_epi8(v) as u16 as u64;
        for k in 0..4 {
            let v = _mm_loadu_si128(block.as_ptr().add(16 * k) as *const __m128i);
            let at = 16 * k;
            m.quote |= bits(eq(v, b'"')) << at;
            m.backslash |= bits(eq(v, b'\\')) << at;
            m.open |= bits(_mm_or_si128(eq(v, b'{'), eq(v, b'['))) << at;
            m.close |= bits(_mm_or_si128(eq(v, b'}'), eq(v, b']'))) << at;
        }
    }
    m
}

#[cfg(not(target_arch = "x86_64"))]
fn masks(block: &[u8]) -> Masks {
    let mut m = Masks {
        quote: 0,
        backslash: 0,
        open: 0,
        close: 0,
    };
    for (i, &b) in block.iter().enumerate() {
        m.quote |= u64::from(b == b'"') << i;
        m.backslash |= u64::from(b == b'\\') << i;
        m.open |= u64::from(b == b'{' || b == b'[') << i;
        m.close |= u64::from(b == b'}' || b == b']') << i;
    }
    m
}

/// Why a message was rejected. The name is the `<reason>` of the dead-letter
/// subject `twin.deadletter.<reason>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    InvalidUtf8,
    InvalidJson,
    TooLarge,
    TooDeep,
    MissingField,
    WrongType,
    NonFinite,
    BadTimestamp,
    BadName,
    Empty,
    Capacity,
}

impl Reason {
    /// Every reason, for counters and docs.
    pub const ALL: [Reason; 11] = [
        Reason::InvalidUtf8,
        Reason::InvalidJson,
        Reason::TooLarge,
        Reason::TooDeep,
        Reason::MissingField,
        Reason::WrongType,
        Reason::NonFinite,
        Reason::BadTimestamp,
        Reason::BadName,
        Reason::Empty,
        Reason::Capacity,
    ];

    /// The short name used in subjects, logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::InvalidJson => "invalid_json",
            Reason::TooLarge => "too_large",
            Reason::TooDeep => "too_deep",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::NonFinite => "non_finite",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::BadName => "bad_name",
            Reason::Empty => "empty",
            Reason::Capacity => "capacity",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected message: why, in a word and in a sentence.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct DecodeError {
    pub reason: Reason,
    pub detail: String,
    /// For [`Reason::Capacity`]: the configuration key of the cap reached.
    pub cap: Option<&'static str>,
}

impl DecodeError {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > 200 {
            let mut cut = 200;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push('…');
        }
        DecodeError {
            reason,
            detail,
            cap: None,
        }
    }

    /// Classifies a serde_json error. Our own visitors prefix their messages
    /// with the reason name (`non_finite: …`) so the class survives serde.
    fn from_json(e: serde_json::Error) -> Self {
        let msg = e.to_string();
        let reason = if let Some(r) = Reason::ALL
            .iter()
            .find(|r| msg.starts_with(r.as_str()) && msg[r.as_str().len()..].starts_with(':'))
        {
            *r
        } else if msg.starts_with("recursion limit exceeded") {
            Reason::TooDeep
        } else if msg.starts_with("number out of range") {
            Reason::NonFinite
        } else if msg.starts_with("missing field") {
            Reason::MissingField
        } else if msg.starts_with("invalid type")
            || msg.starts_with("invalid value")
            || msg.starts_with("invalid length")
        {
            Reason::WrongType
        } else {
            Reason::InvalidJson
        };
        DecodeError::new(reason, msg)
    }
}

/// A rejected envelope of the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Index of the envelope in the batch given to [`Decoder::decode`].
    pub index: usize,
    pub error: DecodeError,
}

/// What one batch of envelopes decoded to.
#[derive(Debug, Clone)]
pub struct DecodedBatch {
    pub readings: RecordBatch,
    pub messages: RecordBatch,
    pub flows: RecordBatch,
    pub rejected: Vec<Rejected>,
}

// ---------------------------------------------------------------- schemas

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// The type of the name columns of `readings` and `messages`: keys into the
/// names (for `machine`, `device`, `metric`: the interned id itself), so a
/// row carries 4 bytes per name and filters and window concatenation copy no
/// text. Query files see ordinary text (comparisons, `||`, GROUP BY).
pub fn name_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8))
}

/// Schema of the `readings` table.
pub fn readings_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("ts", ts_type(), false),
            Field::new("received_at", ts_type(), false),
            Field::new("subject", name_type(), false),
            Field::new("machine", name_type(), false),
            Field::new("device", name_type(), false),
            Field::new("seq", DataType::UInt64, true),
            Field::new("metric", name_type(), false),
            Field::new("value", DataType::Float64, true),
            Field::new("payload_bytes", DataType::UInt32, false),
            Field::new("machine_id", DataType::UInt32, false),
            Field::new("device_id", DataType::UInt32, false),
            Field::new("metric_id", DataType::UInt32, false),
            Field::new("message", DataType::UInt32, false),
        ]))
    })
    .clone()
}

/// Schema of the `messages` table.
pub fn messages_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("ts", ts_type(), false),
            Field::new("received_at", ts_type(), false),
            Field::new("subject", name_type(), false),
            Field::new("machine", name_type(), false),
            Field::new("device", name_type(), false),
            Field::new("seq", DataType::UInt64, true),
            Field::new("payload_bytes", DataType::UInt32, false),
            Field::new("readings", DataType::UInt32, false),
            Field::new("machine_id", DataType::UInt32, false),
            Field::new("device_id", DataType::UInt32, false),
            Field::new("first_reading", DataType::UInt32, false),
            Field::new("envelope", DataType::UInt32, false),
        ]))
    })
    .clone()
}

/// Schema of the `flows` table.
pub fn flows_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("ts", ts_type(), false),
            Field::new("received_at", ts_type(), false),
            Field::new("subject", DataType::Utf8, false),
            Field::new("machine", DataType::Utf8, false),
            Field::new("src", DataType::Utf8, false),
            Field::new("dst", DataType::Utf8, false),
            Field::new("dst_port", DataType::UInt16, true),
            Field::new("proto", DataType::Utf8, true),
            Field::new("app", DataType::Utf8, true),
            Field::new("op", DataType::Utf8, true),
            Field::new("bytes", DataType::UInt64, false),
            Field::new("packets", DataType::UInt64, true),
            Field::new("payload_bytes", DataType::UInt32, false),
            Field::new("machine_id", DataType::UInt32, false),
            Field::new("envelope", DataType::UInt32, false),
        ]))
    })
    .clone()
}

// ------------------------------------------------------------ serde types

/// A string that borrows from the payload when it has no escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Name<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Name<'a>, E> {
                Ok(Name(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Name<'a>, E> {
                Ok(Name(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// One reading value: a finite number or null.
struct ReadingValue(Option<f64>);

impl<'de> Deserialize<'de> for ReadingValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'v> Visitor<'v> for V {
            type Value = ReadingValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("wrong_type: a reading must be a number or null")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ReadingValue, E> {
                if v.is_finite() {
                    Ok(ReadingValue(Some(v)))
                } else {
                    Err(E::custom("non_finite: a reading is not a finite number"))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ReadingValue, E> {
                Ok(ReadingValue(Some(v as f64)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ReadingValue, E> {
                Ok(ReadingValue(Some(v as f64)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ReadingValue, E> {
                Ok(ReadingValue(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<ReadingValue, E> {
                Ok(ReadingValue(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<ReadingValue, E> {
                Err(E::custom(
                    "wrong_type: a reading is a string, not a number or null",
                ))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<ReadingValue, E> {
                Err(E::custom(
                    "wrong_type: a reading is a boolean, not a number or null",
                ))
            }
            fn visit_map<A: MapAccess<'v>>(self, _: A) -> Result<ReadingValue, A::Error> {
                Err(de::Error::custom(
                    "wrong_type: a reading is an object, not a number or null",
                ))
            }
            fn visit_seq<A: SeqAccess<'v>>(self, _: A) -> Result<ReadingValue, A::Error> {
                Err(de::Error::custom(
                    "wrong_type: a reading is an array, not a number or null",
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// One reading as parsed: its name (borrowed from the payload when it has no
/// escapes) and its value.
type RawReading<'a> = (Cow<'a, str>, Option<f64>);

/// The `readings` object, appended in payload order to the payload's one
/// vector of readings (no allocation per object).
struct ReadingsSeed<'p, 'a>(&'p mut Vec<RawReading<'a>>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for ReadingsSeed<'_, 'a> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for ReadingsSeed<'_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("wrong_type: `readings` must be an object of name -> number or null")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Name(k)) = map.next_key::<Name<'a>>()? {
            let ReadingValue(v) = map.next_value()?;
            self.0.push((k, v));
        }
        Ok(())
    }
}

/// One telemetry object (contract §1). Its readings are
/// `readings` of the [`Payload`] it was parsed into.
struct RawTelemetry<'a> {
    ts: EventTs,
    machine: Option<Name<'a>>,
    device: Option<Name<'a>>,
    seq: Option<u64>,
    readings: std::ops::Range<usize>,
}

/// A telemetry payload parsed: its objects, and all their readings in one
/// vector. Unknown fields are skipped; `ts` and `readings` are required;
/// `machine`, `device` and `seq` may be missing or null.
struct ObjectSeed<'p, 'a>(&'p mut Vec<RawReading<'a>>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for ObjectSeed<'_, 'a> {
    type Value = RawTelemetry<'a>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for ObjectSeed<'_, 'a> {
    type Value = RawTelemetry<'a>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a telemetry object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        fn once<T, E: de::Error>(slot: &mut Option<T>, field: &'static str, v: T) -> Result<(), E> {
            match slot.replace(v) {
                Some(_) => Err(E::duplicate_field(field)),
                None => Ok(()),
            }
        }
        let (mut ts, mut machine, mut device, mut seq, mut readings) =
            (None, None, None, None, None);
        while let Some(Name(key)) = map.next_key::<Name<'de>>()? {
            match key.as_ref() {
                "ts" => once(&mut ts, "ts", map.next_value::<EventTs>()?)?,
                "machine" => once(
                    &mut machine,
                    "machine",
                    map.next_value::<Option<Name<'a>>>()?,
                )?,
                "device" => once(&mut device, "device", map.next_value::<Option<Name<'a>>>()?)?,
                "seq" => once(&mut seq, "seq", map.next_value::<Option<u64>>()?)?,
                "readings" => {
                    let start = self.0.len();
                    map.next_value_seed(ReadingsSeed(&mut *self.0))?;
                    once(&mut readings, "readings", start..self.0.len())?
                }
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(RawTelemetry {
            ts: ts.ok_or_else(|| de::Error::missing_field("ts"))?,
            readings: readings.ok_or_else(|| de::Error::missing_field("readings"))?,
            machine: machine.flatten(),
            device: device.flatten(),
            seq: seq.flatten(),
        })
    }
}

/// A telemetry payload's objects and their readings.
#[derive(Default)]
struct Payload<'a> {
    objects: Vec<RawTelemetry<'a>>,
    readings: Vec<RawReading<'a>>,
}

impl<'a> Payload<'a> {
    fn readings_of(&self, m: &RawTelemetry<'a>) -> &[RawReading<'a>] {
        &self.readings[m.readings.clone()]
    }
}

/// Where the objects of a payload go: [`Payload`] for telemetry, a `Vec` of
/// a derived type for flow records.
trait Objects<'de> {
    fn count(&self) -> usize;
    /// The payload was one object.
    fn one<A: MapAccess<'de>>(&mut self, map: A) -> Result<(), A::Error>;
    /// The next object of an array; false at its end.
    fn next<A: SeqAccess<'de>>(&mut self, seq: &mut A) -> Result<bool, A::Error>;
}

impl<'de, T: Deserialize<'de>> Objects<'de> for Vec<T> {
    fn count(&self) -> usize {
        self.len()
    }
    fn one<A: MapAccess<'de>>(&mut self, map: A) -> Result<(), A::Error> {
        self.push(T::deserialize(de::value::MapAccessDeserializer::new(map))?);
        Ok(())
    }
    fn next<A: SeqAccess<'de>>(&mut self, seq: &mut A) -> Result<bool, A::Error> {
        Ok(seq.next_element::<T>()?.map(|t| self.push(t)).is_some())
    }
}

impl<'de: 'a, 'a> Objects<'de> for Payload<'a> {
    fn count(&self) -> usize {
        self.objects.len()
    }
    fn one<A: MapAccess<'de>>(&mut self, map: A) -> Result<(), A::Error> {
        let o = ObjectSeed(&mut self.readings).visit_map(map)?;
        self.objects.push(o);
        Ok(())
    }
    fn next<A: SeqAccess<'de>>(&mut self, seq: &mut A) -> Result<bool, A::Error> {
        let o = seq.next_element_seed(ObjectSeed(&mut self.readings))?;
        Ok(o.map(|o| self.objects.push(o)).is_some())
    }
}

#[derive(Deserialize)]
struct RawFlow<'a> {
    ts: EventTs,
    #[serde(borrow, default)]
    machine: Option<Name<'a>>,
    #[serde(borrow)]
    src: Name<'a>,
    #[serde(borrow)]
    dst: Name<'a>,
    #[serde(default)]
    dst_port: Option<u16>,
    #[serde(borrow, default)]
    proto: Option<Name<'a>>,
    #[serde(borrow, default)]
    app: Option<Name<'a>>,
    #[serde(borrow, default)]
    op: Option<Name<'a>>,
    bytes: u64,
    #[serde(default)]
    packets: Option<u64>,
}

/// A payload: one object or an array of them, collected into `out` (reused).
struct OneOrMany<'o, C> {
    out: &'o mut C,
    max: usize,
}

impl<'de, C: Objects<'de>> DeserializeSeed<'de> for OneOrMany<'_, C> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, C: Objects<'de>> Visitor<'de> for OneOrMany<'_, C> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("wrong_type: the payload must be an object or an array of objects")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.out.one(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while self.out.next(&mut seq)? {
            if self.out.count() > self.max {
                return Err(de::Error::custom(format_args!(
                    "too_large: more than {} objects in one payload",
                    self.max
                )));
            }
        }
        Ok(())
    }
}

fn parse_payload<'a, C: Objects<'a>>(
    text: &'a str,
    out: &mut C,
    max: usize,
) -> Result<(), DecodeError> {
    let mut de = serde_json::Deserializer::from_str(text);
    OneOrMany { out, max }
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(DecodeError::from_json)?;
    if out.count() == 0 {
        return Err(DecodeError::new(
            Reason::Empty,
            "the payload holds no message",
        ));
    }
    Ok(())
}

// --------------------------------------------------------------- builders

/// A primitive column being built: a plain vector, and a validity bitmap
/// made only once a null comes. Arrow's builders cost some 77 instructions to
/// repeat a message's value over its four readings and 34 to append one
/// (callgrind over the `pipeline` group of `benches/rooms.rs`); here a push is
/// a store, and the finished array takes the vector as its buffer.
struct Col<T: ArrowPrimitiveType> {
    values: Vec<T::Native>,
    nulls: NullBufferBuilder,
}

/// Rows a column keeps room for between batches: the last batch's, up to this
/// (a full batch of array payloads is 400,000 rows; room for all of it in
/// every column, idle, would be 30 MB).
const KEPT_ROWS: usize = 16 * 1024;

impl<T: ArrowPrimitiveType> Col<T> {
    fn new() -> Self {
        Col {
            values: Vec::new(),
            nulls: NullBufferBuilder::new(0),
        }
    }

    fn push(&mut self, v: T::Native) {
        self.values.push(v);
        self.nulls.append_non_null();
    }

    fn push_n(&mut self, v: T::Native, n: usize) {
        self.values.extend(std::iter::repeat_n(v, n));
        self.nulls.append_n_non_nulls(n);
    }

    fn push_slice(&mut self, v: &[T::Native]) {
        self.values.extend_from_slice(v);
        self.nulls.append_n_non_nulls(v.len());
    }

    fn push_option(&mut self, v: Option<T::Native>) {
        match v {
            Some(v) => self.push(v),
            None => self.push_nulls(1),
        }
    }

    fn push_nulls(&mut self, n: usize) {
        self.values
            .extend(std::iter::repeat_n(T::Native::default(), n));
        self.nulls.append_n_nulls(n);
    }

    fn values_mut(&mut self) -> &mut [T::Native] {
        &mut self.values
    }

    /// The rows so far as an array; the column starts again, empty.
    fn finish(&mut self) -> PrimitiveArray<T> {
        let room = self.values.len().min(KEPT_ROWS);
        let values = std::mem::replace(&mut self.values, Vec::with_capacity(room));
        PrimitiveArray::new(ScalarBuffer::from(values), self.nulls.finish())
    }
}

/// A millisecond timestamp column as the schemas have it (UTC).
fn utc(a: PrimitiveArray<TimestampMillisecondType>) -> PrimitiveArray<TimestampMillisecondType> {
    a.with_timezone("UTC")
}

struct ReadingsBuilder {
    ts: Col<TimestampMillisecondType>,
    received_at: Col<TimestampMillisecondType>,
    /// Keys into the messages' subject dictionary (one lookup per envelope).
    subject: Col<UInt32Type>,
    seq: Col<UInt64Type>,
    value: Col<Float64Type>,
    payload_bytes: Col<UInt32Type>,
    machine_id: Col<UInt32Type>,
    device_id: Col<UInt32Type>,
    metric_id: Col<UInt32Type>,
    message: Col<UInt32Type>,
    rows: u32,
}

struct MessagesBuilder {
    ts: Col<TimestampMillisecondType>,
    received_at: Col<TimestampMillisecondType>,
    subject: SubjectBuilder,
    seq: Col<UInt64Type>,
    payload_bytes: Col<UInt32Type>,
    readings: Col<UInt32Type>,
    machine_id: Col<UInt32Type>,
    device_id: Col<UInt32Type>,
    first_reading: Col<UInt32Type>,
    envelope: Col<UInt32Type>,
    rows: u32,
}

struct FlowsBuilder {
    ts: TimestampMillisecondBuilder,
    received_at: TimestampMillisecondBuilder,
    subject: StringBuilder,
    machine: StringBuilder,
    src: StringBuilder,
    dst: StringBuilder,
    dst_port: UInt16Builder,
    proto: StringBuilder,
    app: StringBuilder,
    op: StringBuilder,
    bytes: UInt64Builder,
    packets: UInt64Builder,
    payload_bytes: UInt32Builder,
    machine_id: Col<UInt32Type>,
    envelope: UInt32Builder,
}

fn ts_builder() -> TimestampMillisecondBuilder {
    TimestampMillisecondBuilder::new().with_timezone("UTC")
}

/// Subjects are not interned (they are not capped names), so each batch
/// has a dictionary of its own, shared by its two tables.
type SubjectBuilder = StringDictionaryBuilder<UInt32Type>;

/// The names of interned ids, for the dictionary columns.
struct Names {
    machines: ArrayRef,
    devices: ArrayRef,
    metrics: ArrayRef,
}

/// An array without the builder's spare capacity. Builders grow by doubling,
/// and a finished array keeps what it grew to: up to twice its size, held for
/// as long as its window waits (most of a 10,000-machine window's memory).
fn fit<A: Array>(mut a: A) -> A {
    a.shrink_to_fit();
    a
}

/// A dictionary column whose keys are interned ids.
fn named(ids: &ArrayRef, names: &ArrayRef) -> ArrayRef {
    let keys = ids
        .as_any()
        .downcast_ref::<UInt32Array>()
        .expect("id columns are UInt32")
        .clone();
    Arc::new(
        DictionaryArray::<UInt32Type>::try_new(keys, names.clone()).expect("every id has its name"),
    )
}

impl ReadingsBuilder {
    fn new() -> Self {
        ReadingsBuilder {
            ts: Col::new(),
            received_at: Col::new(),
            subject: Col::new(),
            seq: Col::new(),
            value: Col::new(),
            payload_bytes: Col::new(),
            machine_id: Col::new(),
            device_id: Col::new(),
            metric_id: Col::new(),
            message: Col::new(),
            rows: 0,
        }
    }

    /// `subjects`: the values of the messages' subject column, finished first.
    fn finish(&mut self, names: &Names, subjects: &ArrayRef) -> RecordBatch {
        self.rows = 0;
        let machine_id: ArrayRef = Arc::new(fit(self.machine_id.finish()));
        let device_id: ArrayRef = Arc::new(fit(self.device_id.finish()));
        let metric_id: ArrayRef = Arc::new(fit(self.metric_id.finish()));
        let subject: ArrayRef = Arc::new(fit(self.subject.finish()));
        let cols: Vec<ArrayRef> = vec![
            Arc::new(fit(utc(self.ts.finish()))),
            Arc::new(fit(utc(self.received_at.finish()))),
            named(&subject, subjects),
            named(&machine_id, &names.machines),
            named(&device_id, &names.devices),
            Arc::new(fit(self.seq.finish())),
            named(&metric_id, &names.metrics),
            Arc::new(fit(self.value.finish())),
            Arc::new(fit(self.payload_bytes.finish())),
            machine_id,
            device_id,
            metric_id,
            Arc::new(fit(self.message.finish())),
        ];
        RecordBatch::try_new(readings_schema(), cols).expect("readings columns match their schema")
    }
}

impl MessagesBuilder {
    fn new() -> Self {
        MessagesBuilder {
            ts: Col::new(),
            received_at: Col::new(),
            subject: SubjectBuilder::new(),
            seq: Col::new(),
            payload_bytes: Col::new(),
            readings: Col::new(),
            machine_id: Col::new(),
            device_id: Col::new(),
            first_reading: Col::new(),
            envelope: Col::new(),
            rows: 0,
        }
    }

    /// The table and its subjects (the values the readings' subject keys point into).
    fn finish(&mut self, names: &Names) -> (RecordBatch, ArrayRef) {
        self.rows = 0;
        let machine_id: ArrayRef = Arc::new(fit(self.machine_id.finish()));
        let device_id: ArrayRef = Arc::new(fit(self.device_id.finish()));
        let subject = fit(self.subject.finish());
        let subjects = subject.values().clone();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(fit(utc(self.ts.finish()))),
            Arc::new(fit(utc(self.received_at.finish()))),
            Arc::new(subject),
            named(&machine_id, &names.machines),
            named(&device_id, &names.devices),
            Arc::new(fit(self.seq.finish())),
            Arc::new(fit(self.payload_bytes.finish())),
            Arc::new(fit(self.readings.finish())),
            machine_id,
            device_id,
            Arc::new(fit(self.first_reading.finish())),
            Arc::new(fit(self.envelope.finish())),
        ];
        let table = RecordBatch::try_new(messages_schema(), cols)
            .expect("messages columns match their schema");
        (table, subjects)
    }
}

impl FlowsBuilder {
    fn new() -> Self {
        FlowsBuilder {
            ts: ts_builder(),
            received_at: ts_builder(),
            subject: StringBuilder::new(),
            machine: StringBuilder::new(),
            src: StringBuilder::new(),
            dst: StringBuilder::new(),
            dst_port: UInt16Builder::new(),
            proto: StringBuilder::new(),
            app: StringBuilder::new(),
            op: StringBuilder::new(),
            bytes: UInt64Builder::new(),
            packets: UInt64Builder::new(),
            payload_bytes: UInt32Builder::new(),
            machine_id: Col::new(),
            envelope: UInt32Builder::new(),
        }
    }

    fn finish(&mut self) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(fit(self.ts.finish())),
            Arc::new(fit(self.received_at.finish())),
            Arc::new(fit(self.subject.finish())),
            Arc::new(fit(self.machine.finish())),
            Arc::new(fit(self.src.finish())),
            Arc::new(fit(self.dst.finish())),
            Arc::new(fit(self.dst_port.finish())),
            Arc::new(fit(self.proto.finish())),
            Arc::new(fit(self.app.finish())),
            Arc::new(fit(self.op.finish())),
            Arc::new(fit(self.bytes.finish())),
            Arc::new(fit(self.packets.finish())),
            Arc::new(fit(self.payload_bytes.finish())),
            Arc::new(fit(self.machine_id.finish())),
            Arc::new(fit(self.envelope.finish())),
        ];
        RecordBatch::try_new(flows_schema(), cols).expect("flows columns match their schema")
    }
}

fn text<'e>(cfg: &InputConfig, env: &'e Envelope) -> Result<&'e str, DecodeError> {
    let text = utf8_text(cfg, env)?;
    check_depth(text)?;
    Ok(text)
}

/// The payload as text, within `input.max_payload_bytes`; its depth is not
/// checked yet (see [`check_depth`]).
fn utf8_text<'e>(cfg: &InputConfig, env: &'e Envelope) -> Result<&'e str, DecodeError> {
    if env.payload.len() > cfg.max_payload_bytes {
        return Err(DecodeError::new(
            Reason::TooLarge,
            format!(
                "payload of {} bytes exceeds input.max_payload_bytes = {}",
                env.payload.len(),
                cfg.max_payload_bytes
            ),
        ));
    }
    std::str::from_utf8(&env.payload)
        .map_err(|e| DecodeError::new(Reason::InvalidUtf8, format!("payload is not UTF-8: {e}")))
}

/// Refuses text nested deeper than [`MAX_DEPTH`] before a recursive parser reads it.
fn check_depth(text: &str) -> Result<(), DecodeError> {
    if nests_deeper_than(text.as_bytes(), MAX_DEPTH) {
        return Err(DecodeError::new(
            Reason::TooDeep,
            format!("objects and arrays nested deeper than {MAX_DEPTH}"),
        ));
    }
    Ok(())
}

/// Batches carrying at least this many bytes of telemetry are decoded in two
/// parts on two threads (see [`Decoder::decode_parts`]).
const PARALLEL_DECODE_BYTES: usize = 256 * 1024;

/// The bytes of telemetry an envelope carries (what the split into parts weighs).
fn telemetry_bytes(e: &Envelope) -> usize {
    match e.stream() {
        Stream::Telemetry => e.payload.len(),
        Stream::Flows => 0,
    }
}

// ---------------------------------------------------------------- decoder

/// Turns envelopes into Arrow tables. Holds the interners, so ids are stable
/// for the life of the decoder.
pub struct Decoder {
    cfg: InputConfig,
    /// Machine names → ids.
    pub machines: Interner,
    /// Device names → ids.
    pub devices: Interner,
    /// Metric names → ids.
    pub metrics: Interner,
    /// Per machine id, the device id of the machine's own name (`u32::MAX`: not yet known).
    own_devices: Vec<u32>,
    /// The builders of a batch, and of its second part when decoded in two.
    first: Part,
    second: Part,
    /// The thread that decodes a big batch's second part (shared with the
    /// pipeline's other rooms, see [`Decoder::share`]).
    spare: crate::helper::Spare,
}

/// Most keys of one object remembered for the next (see [`Part::metric_id`]).
const MAX_REMEMBERED_KEYS: usize = 64;

/// The last token of a subject: the default machine.
pub(crate) fn last_token(subject: &str) -> Option<&str> {
    subject.rsplit('.').next().filter(|t| !t.is_empty())
}

fn check_name<'a>(field: &str, name: &'a str) -> Result<&'a str, DecodeError> {
    if name.len() > MAX_NAME_BYTES {
        return Err(DecodeError::new(
            Reason::BadName,
            format!("`{field}` is longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    // Names are ASCII nearly always: a byte scan the compiler vectorizes
    // says so, and only other names are walked char by char (a control
    // character is C0, DEL or C1; C1 is two bytes in UTF-8).
    let printable_ascii = name.bytes().all(|b| (0x20..0x7f).contains(&b));
    if !printable_ascii && name.chars().any(char::is_control) {
        return Err(DecodeError::new(
            Reason::BadName,
            format!("`{field}` holds control characters"),
        ));
    }
    Ok(name)
}

fn check_ts(ts: Millis) -> Result<Millis, DecodeError> {
    if plausible(ts) {
        Ok(ts)
    } else {
        Err(DecodeError::new(
            Reason::BadTimestamp,
            format!("ts {ts} is outside 2000..2100 (seconds sent as milliseconds?)"),
        ))
    }
}

/// How a part of a batch gets the ids of the names it meets.
trait Resolve {
    fn machine(&mut self, name: &str) -> Option<u32>;
    fn device(&mut self, name: &str) -> Option<u32>;
    /// The device of the machine's own name.
    fn own_device(&mut self, machine: u32) -> Option<u32>;
    /// The metric's id and its name as held by the interner.
    fn metric(&mut self, name: &str) -> Option<(u32, Arc<str>)>;
    fn machine_name(&self, machine: u32) -> &str;
}

/// Interning into the decoder's own tables: one thread, ids final at once.
struct Interning<'a> {
    machines: &'a mut Interner,
    devices: &'a mut Interner,
    metrics: &'a mut Interner,
    own_devices: &'a mut Vec<u32>,
}

impl Resolve for Interning<'_> {
    fn machine(&mut self, name: &str) -> Option<u32> {
        self.machines.intern(name)
    }

    fn device(&mut self, name: &str) -> Option<u32> {
        self.devices.intern(name)
    }

    fn own_device(&mut self, machine: u32) -> Option<u32> {
        let m = machine as usize;
        if let Some(&d) = self.own_devices.get(m)
            && d != u32::MAX
        {
            return Some(d);
        }
        let d = self.devices.intern(self.machines.name(machine))?;
        if self.own_devices.len() <= m {
            self.own_devices.resize(m + 1, u32::MAX);
        }
        self.own_devices[m] = d;
        Some(d)
    }

    fn metric(&mut self, name: &str) -> Option<(u32, Arc<str>)> {
        let id = self.metrics.intern(name)?;
        Some((id, self.metrics.name(id).clone()))
    }

    fn machine_name(&self, machine: u32) -> &str {
        self.machines.name(machine)
    }
}

/// Names met by a part decoded beside another: the decoder's tables are only
/// read (both parts read them at once), and a name they do not hold gets a
/// provisional id after theirs, in order of appearance. [`Decoder::settle`]
/// interns those names afterwards, first part first, which gives every name
/// the id a decode in one piece would have given it.
struct Ahead<'a> {
    machines: &'a Interner,
    devices: &'a Interner,
    metrics: &'a Interner,
    own_devices: &'a [u32],
    new: NewNames,
}

/// Indices of [`NewNames::tables`].
const MACHINES: usize = 0;
const DEVICES: usize = 1;
const METRICS: usize = 2;

/// The names a part met that the decoder did not hold, and the own devices
/// it looked up.
struct NewNames {
    /// Machines, devices, metrics: uncapped interners of their own, whose
    /// ids count after the decoder's (the caps are checked when settling).
    tables: [Interner; 3],
    /// (machine, device) of the machines whose own device was looked up.
    own: Vec<(u32, u32)>,
}

impl Default for NewNames {
    fn default() -> Self {
        NewNames {
            tables: std::array::from_fn(|_| Interner::new(usize::MAX)),
            own: Vec::new(),
        }
    }
}

impl NewNames {
    /// The provisional id of `name` in table `t`, after the `held` names of the decoder.
    fn id(&mut self, t: usize, held: usize, name: &str) -> u32 {
        let j = self.tables[t].intern(name).expect("an uncapped interner");
        held as u32 + j
    }

    /// The name behind a provisional id of table `t`.
    fn name(&self, t: usize, held: usize, id: u32) -> &Arc<str> {
        self.tables[t].name(id - held as u32)
    }

    fn is_empty(&self) -> bool {
        self.tables.iter().all(Interner::is_empty)
    }
}

impl Ahead<'_> {
    /// The name of a machine id, held or provisional.
    fn machine_arc(&self, machine: u32) -> &Arc<str> {
        if machine as usize >= self.machines.len() {
            self.new.name(MACHINES, self.machines.len(), machine)
        } else {
            self.machines.name(machine)
        }
    }
}

impl Resolve for Ahead<'_> {
    fn machine(&mut self, name: &str) -> Option<u32> {
        Some(match self.machines.get(name) {
            Some(id) => id,
            None => self.new.id(MACHINES, self.machines.len(), name),
        })
    }

    fn device(&mut self, name: &str) -> Option<u32> {
        Some(match self.devices.get(name) {
            Some(id) => id,
            None => self.new.id(DEVICES, self.devices.len(), name),
        })
    }

    fn own_device(&mut self, machine: u32) -> Option<u32> {
        if let Some(&d) = self.own_devices.get(machine as usize)
            && d != u32::MAX
        {
            return Some(d);
        }
        // The shared name (not a copy): the lookup below needs `self` mutably.
        let name = self.machine_arc(machine).clone();
        let d = self.device(&name)?;
        self.new.own.push((machine, d));
        Some(d)
    }

    fn metric(&mut self, name: &str) -> Option<(u32, Arc<str>)> {
        if let Some(id) = self.metrics.get(name) {
            return Some((id, self.metrics.name(id).clone()));
        }
        let held = self.metrics.len();
        let id = self.new.id(METRICS, held, name);
        Some((id, self.new.name(METRICS, held, id).clone()))
    }

    fn machine_name(&self, machine: u32) -> &str {
        self.machine_arc(machine)
    }
}

/// The builders and scratch of one part of a batch.
struct Part {
    readings: ReadingsBuilder,
    messages: MessagesBuilder,
    flows: FlowsBuilder,
    /// Metric names met at each place of an object's readings, with their
    /// ids: the last object's, unless a payload mixed its keys.
    last_keys: Vec<(Arc<str>, u32)>,
    /// Scratch of one payload: (machine, device) per object and metric id per reading.
    ids: Vec<(u32, u32)>,
    metric_ids: Vec<u32>,
    rejected: Vec<Rejected>,
}

impl Decoder {
    pub fn new(cfg: InputConfig) -> Self {
        Decoder {
            machines: Interner::new(cfg.max_machines),
            devices: Interner::new(cfg.max_devices),
            metrics: Interner::new(cfg.max_metrics),
            cfg,
            own_devices: Vec::new(),
            first: Part::new(),
            second: Part::new(),
            spare: crate::helper::Spare::default(),
        }
    }

    /// Decodes big batches' second parts on the helper thread of `spare`
    /// (the pipeline gives its rooms one between them) instead of one of its own.
    pub fn share(&mut self, spare: crate::helper::Spare) {
        self.spare = spare;
    }

    /// Takes the names of a snapshot (ids as they were), forgetting what
    /// was remembered about the names before.
    pub fn restore_names(&mut self, machines: Interner, devices: Interner, metrics: Interner) {
        self.machines = machines;
        self.devices = devices;
        self.metrics = metrics;
        self.own_devices.clear();
        self.first.last_keys.clear();
        self.second.last_keys.clear();
    }

    /// Decodes a batch of envelopes into one set of tables, on this thread.
    pub fn decode(&mut self, envelopes: &[Envelope]) -> DecodedBatch {
        self.decode_serial(envelopes);
        let names = self.names();
        self.first.finish(&names)
    }

    /// Decodes a batch of envelopes into one or two sets of tables that
    /// together hold what [`Decoder::decode`] would: the same rows with the
    /// same ids, the second part's rows coming after the first's (its
    /// envelopes follow the first part's; `message` and `first_reading` count
    /// within each part). A batch with at least [`PARALLEL_DECODE_BYTES`] of
    /// telemetry is split in two halves by bytes, decoded at once on this
    /// thread and a second one: decoding is a third of the ingest loop's work.
    pub fn decode_parts(&mut self, envelopes: &[Envelope]) -> Vec<DecodedBatch> {
        let total: usize = envelopes.iter().map(telemetry_bytes).sum();
        if total >= PARALLEL_DECODE_BYTES && self.decode_in_two(envelopes, total) {
            let names = self.names();
            return vec![self.first.finish(&names), self.second.finish(&names)];
        }
        vec![self.decode(envelopes)]
    }

    fn names(&mut self) -> Names {
        Names {
            machines: self.machines.arrow_values(),
            devices: self.devices.arrow_values(),
            metrics: self.metrics.arrow_values(),
        }
    }

    fn decode_serial(&mut self, envelopes: &[Envelope]) {
        let mut names = Interning {
            machines: &mut self.machines,
            devices: &mut self.devices,
            metrics: &mut self.metrics,
            own_devices: &mut self.own_devices,
        };
        self.first.decode(&self.cfg, &mut names, envelopes, 0);
    }

    /// Both halves at once, then their new names interned; false (and
    /// nothing kept) when no second thread could be had or the new names
    /// would not all fit under the caps — then the batch is decoded in one piece.
    fn decode_in_two(&mut self, envelopes: &[Envelope], total: usize) -> bool {
        let mut mid = 0;
        let mut bytes = 0;
        while mid < envelopes.len() && bytes < total / 2 {
            bytes += telemetry_bytes(&envelopes[mid]);
            mid += 1;
        }
        let ahead = || Ahead {
            machines: &self.machines,
            devices: &self.devices,
            metrics: &self.metrics,
            own_devices: &self.own_devices,
            new: NewNames::default(),
        };
        let Some(helper) = self.spare.get() else {
            return false;
        };
        let (mut a, mut b) = (ahead(), ahead());
        let (cfg, first, second) = (&self.cfg, &mut self.first, &mut self.second);
        helper.join(
            || first.decode(cfg, &mut a, &envelopes[..mid], 0),
            || second.decode(cfg, &mut b, &envelopes[mid..], mid),
        );
        let (a, b) = (a.new, b.new);
        if !self.settle(a, b) {
            self.first.clear();
            self.second.clear();
            return false;
        }
        true
    }

    /// Interns the names the two parts met that were new, the first part's
    /// first, and gives the second part's rows their final ids. False,
    /// interning nothing, when they would not all fit under the caps.
    fn settle(&mut self, a: NewNames, b: NewNames) -> bool {
        if a.is_empty() && b.is_empty() {
            return true;
        }
        let mut tables = [&mut self.machines, &mut self.devices, &mut self.metrics];
        let fits = |t: usize, room: usize| {
            let (a, b) = (&a.tables[t], &b.tables[t]);
            a.len() + b.names().iter().filter(|n| a.get(n).is_none()).count() <= room
        };
        if !(0..3).all(|t| fits(t, tables[t].room())) {
            return false;
        }
        let held = tables.each_ref().map(|t| t.len());
        // The first part's new names take the ids they were given; the
        // second part's ids are where its names land.
        let mut maps: [Vec<u32>; 3] = Default::default();
        for (t, table) in tables.iter_mut().enumerate() {
            let mut intern = |n: &Arc<str>| table.intern(n).expect("room was checked");
            for n in a.tables[t].names() {
                intern(n);
            }
            maps[t] = b.tables[t].names().iter().map(intern).collect();
        }
        let fix = |t: usize, id: u32| match (id as usize).checked_sub(held[t]) {
            Some(j) => maps[t][j],
            None => id,
        };
        self.second.renumber(&fix);
        for (m, d) in a.own.into_iter().chain(
            b.own
                .into_iter()
                .map(|(m, d)| (fix(MACHINES, m), fix(DEVICES, d))),
        ) {
            let m = m as usize;
            if self.own_devices.len() <= m {
                self.own_devices.resize(m + 1, u32::MAX);
            }
            self.own_devices[m] = d;
        }
        true
    }
}

impl Part {
    fn new() -> Self {
        Part {
            readings: ReadingsBuilder::new(),
            messages: MessagesBuilder::new(),
            flows: FlowsBuilder::new(),
            last_keys: Vec::new(),
            ids: Vec::new(),
            metric_ids: Vec::new(),
            rejected: Vec::new(),
        }
    }

    /// Forgets the rows of a part that is not kept (their ids may be provisional).
    fn clear(&mut self) {
        *self = Part::new();
    }

    /// The part's tables, and its builders ready for the next batch.
    fn finish(&mut self, names: &Names) -> DecodedBatch {
        let (messages, subjects) = self.messages.finish(names);
        DecodedBatch {
            readings: self.readings.finish(names, &subjects),
            messages,
            flows: self.flows.finish(),
            rejected: std::mem::take(&mut self.rejected),
        }
    }

    /// Gives the rows their final ids: `fix(table, id)`, table one of
    /// [`MACHINES`], [`DEVICES`], [`METRICS`].
    fn renumber(&mut self, fix: &impl Fn(usize, u32) -> u32) {
        let columns: [(&mut Col<UInt32Type>, usize); 6] = [
            (&mut self.messages.machine_id, MACHINES),
            (&mut self.messages.device_id, DEVICES),
            (&mut self.readings.machine_id, MACHINES),
            (&mut self.readings.device_id, DEVICES),
            (&mut self.readings.metric_id, METRICS),
            (&mut self.flows.machine_id, MACHINES),
        ];
        for (column, t) in columns {
            for id in column.values_mut() {
                *id = fix(t, *id);
            }
        }
        for (_, id) in &mut self.last_keys {
            *id = fix(METRICS, *id);
        }
    }

    /// Decodes `envelopes`, the first of which is envelope `first` of the batch.
    fn decode(
        &mut self,
        cfg: &InputConfig,
        names: &mut impl Resolve,
        envelopes: &[Envelope],
        first: usize,
    ) {
        let mut telemetry = Payload::default();
        let mut flows: Vec<RawFlow> = Vec::new();
        for (i, env) in envelopes.iter().enumerate() {
            let index = first + i;
            let result = match env.stream() {
                Stream::Telemetry => {
                    self.decode_telemetry(cfg, names, env, index as u32, &mut telemetry)
                }
                Stream::Flows => self.decode_flows(cfg, names, env, index as u32, &mut flows),
            };
            if let Err(error) = result {
                self.rejected.push(Rejected { index, error });
            }
        }
    }

    fn decode_telemetry<'e>(
        &mut self,
        cfg: &InputConfig,
        names: &mut impl Resolve,
        env: &'e Envelope,
        index: u32,
        scratch: &mut Payload<'e>,
    ) -> Result<(), DecodeError> {
        let text = utf8_text(cfg, env)?;
        scratch.objects.clear();
        scratch.readings.clear();
        // The common shape is read fast; everything else, errors included,
        // by serde. What the fast reader accepts nests three deep at most (an
        // array, an object, its readings), so only what it leaves needs the
        // depth check — for an array payload that check was a tenth of its
        // decoding.
        if fast::telemetry(text, scratch, cfg.max_messages_per_payload).is_none() {
            check_depth(text)?;
            parse_payload(text, scratch, cfg.max_messages_per_payload)?;
        }
        let default_machine = last_token(&env.subject);
        // Validate and intern everything before appending any row, so a bad
        // object rejects its whole payload without leaving rows behind.
        self.check_and_intern(names, scratch, default_machine)?;
        let payload_bytes = env.payload.len().min(u32::MAX as usize) as u32;
        let subject = self
            .messages
            .subject
            .append_n(&env.subject, scratch.objects.len())
            .map_err(|_| capacity("subjects", "source.max_batch"))?;
        let mut first_metric = 0;
        let metric_ids = &self.metric_ids;
        for (m, &(machine_id, device_id)) in scratch.objects.iter().zip(&self.ids) {
            let readings = scratch.readings_of(m);
            let ts = m.ts.0;
            let received_at = env.received_at.unwrap_or(ts);
            let msg_row = self.messages.rows;
            let b = &mut self.messages;
            b.ts.push(ts);
            b.received_at.push(received_at);
            b.seq.push_option(m.seq);
            b.payload_bytes.push(payload_bytes);
            b.readings.push(readings.len() as u32);
            b.machine_id.push(machine_id);
            b.device_id.push(device_id);
            b.first_reading.push(self.readings.rows);
            b.envelope.push(index);
            b.rows += 1;
            let r = &mut self.readings;
            let n = readings.len();
            r.ts.push_n(ts, n);
            r.received_at.push_n(received_at, n);
            r.subject.push_n(subject, n);
            match m.seq {
                Some(seq) => r.seq.push_n(seq, n),
                None => r.seq.push_nulls(n),
            }
            r.payload_bytes.push_n(payload_bytes, n);
            r.machine_id.push_n(machine_id, n);
            r.device_id.push_n(device_id, n);
            r.message.push_n(msg_row, n);
            for (_, v) in readings {
                r.value.push_option(*v);
            }
            r.metric_id
                .push_slice(&metric_ids[first_metric..first_metric + n]);
            first_metric += n;
            r.rows += n as u32;
        }
        Ok(())
    }

    /// Checks every object of a payload and interns its names into
    /// `self.ids` ((machine, device) per object) and `self.metric_ids` (one
    /// id per reading).
    ///
    /// The objects of an array payload nearly always share their machine,
    /// device and keys: a name equal to the object before's is neither
    /// checked nor looked up again, and a key equal to the last object's at
    /// the same place takes that key's id at once. Each object is checked
    /// whole before its names are interned, and keys that differ only once
    /// every object was checked, as before.
    fn check_and_intern(
        &mut self,
        names: &mut impl Resolve,
        scratch: &Payload<'_>,
        default_machine: Option<&str>,
    ) -> Result<(), DecodeError> {
        self.ids.clear();
        self.metric_ids.clear();
        // The last machine name an object gave (checked), and the last
        // machine and device names looked up with their ids (a machine may
        // be the subject's, which is not checked; a device is always named).
        let mut named_machine = None::<&str>;
        let (mut last_machine, mut last_device) = (None::<(&str, u32)>, None::<(&str, u32)>);
        // (place in `metric_ids`, place in its object, key) of keys still to intern.
        let mut deferred: Vec<(usize, usize, &str)> = Vec::new();
        for m in &scratch.objects {
            check_ts(m.ts.0)?;
            let named = m
                .machine
                .as_ref()
                .map(|n| n.0.as_ref())
                .filter(|s| !s.is_empty());
            let machine = match named {
                Some(name) if named_machine == Some(name) => name,
                Some(name) => {
                    named_machine = Some(check_name("machine", name)?);
                    name
                }
                None => default_machine.ok_or_else(|| {
                    DecodeError::new(
                        Reason::MissingField,
                        "missing field `machine` (and no subject to take it from)",
                    )
                })?,
            };
            let device = m
                .device
                .as_ref()
                .map(|n| n.0.as_ref())
                .filter(|s| !s.is_empty());
            if let Some(name) = device
                && last_device.is_none_or(|(last, _)| last != name)
            {
                check_name("device", name)?;
            }
            for (i, (k, _)) in scratch.readings_of(m).iter().enumerate() {
                match self.last_keys.get(i) {
                    // Checked when it was met; its id is final.
                    Some((name, id)) if **name == **k => self.metric_ids.push(*id),
                    _ => {
                        check_name("readings key", k)?;
                        deferred.push((self.metric_ids.len(), i, k));
                        self.metric_ids.push(u32::MAX);
                    }
                }
            }
            let machine_id = match last_machine {
                Some((last, id)) if last == machine => id,
                _ => {
                    let id = names
                        .machine(machine)
                        .ok_or_else(|| capacity("machines", "input.max_machines"))?;
                    last_machine = Some((machine, id));
                    id
                }
            };
            let device_id = match (device, last_device) {
                (Some(name), Some((last, id))) if name == last => id,
                (Some(name), _) => {
                    let id = names
                        .device(name)
                        .ok_or_else(|| capacity("devices", "input.max_devices"))?;
                    last_device = Some((name, id));
                    id
                }
                (None, _) => names
                    .own_device(machine_id)
                    .ok_or_else(|| capacity("devices", "input.max_devices"))?,
            };
            self.ids.push((machine_id, device_id));
        }
        for (at, i, k) in deferred {
            self.metric_ids[at] = self.metric_id(names, i, k)?;
        }
        Ok(())
    }

    /// The id of the metric named `key`, the `i`th key of its object. A
    /// plant's messages repeat their keys in the same order, so the key at
    /// the same place in the last object is tried first: one compare instead
    /// of a hash lookup.
    fn metric_id(
        &mut self,
        names: &mut impl Resolve,
        i: usize,
        key: &str,
    ) -> Result<u32, DecodeError> {
        if let Some((name, id)) = self.last_keys.get(i)
            && **name == *key
        {
            return Ok(*id);
        }
        let (id, name) = names
            .metric(key)
            .ok_or_else(|| capacity("metrics", "input.max_metrics"))?;
        let entry = (name, id);
        match self.last_keys.get_mut(i) {
            Some(slot) => *slot = entry,
            None if i < MAX_REMEMBERED_KEYS => self.last_keys.push(entry),
            None => {}
        }
        Ok(id)
    }

    fn decode_flows<'e>(
        &mut self,
        cfg: &InputConfig,
        names: &mut impl Resolve,
        env: &'e Envelope,
        index: u32,
        scratch: &mut Vec<RawFlow<'e>>,
    ) -> Result<(), DecodeError> {
        let text = text(cfg, env)?;
        scratch.clear();
        parse_payload(text, scratch, cfg.max_messages_per_payload)?;
        let default_machine = last_token(&env.subject);
        let mut ids = Vec::with_capacity(scratch.len());
        for f in scratch.iter() {
            check_ts(f.ts.0)?;
            let machine = match f
                .machine
                .as_ref()
                .map(|n| n.0.as_ref())
                .filter(|s| !s.is_empty())
            {
                Some(name) => check_name("machine", name)?,
                None => default_machine.ok_or_else(|| {
                    DecodeError::new(Reason::MissingField, "missing field `machine`")
                })?,
            };
            check_name("src", &f.src.0)?;
            check_name("dst", &f.dst.0)?;
            for (field, v) in [("proto", &f.proto), ("app", &f.app), ("op", &f.op)] {
                if let Some(n) = v {
                    check_name(field, &n.0)?;
                }
            }
            ids.push(
                names
                    .machine(machine)
                    .ok_or_else(|| capacity("machines", "input.max_machines"))?,
            );
        }
        let payload_bytes = env.payload.len().min(u32::MAX as usize) as u32;
        let b = &mut self.flows;
        for (f, machine_id) in scratch.iter().zip(ids) {
            b.ts.append_value(f.ts.0);
            b.received_at
                .append_value(env.received_at.unwrap_or(f.ts.0));
            b.subject.append_value(&env.subject);
            b.machine.append_value(names.machine_name(machine_id));
            b.src.append_value(&f.src.0);
            b.dst.append_value(&f.dst.0);
            b.dst_port.append_option(f.dst_port);
            b.proto.append_option(f.proto.as_ref().map(|n| &n.0));
            b.app.append_option(f.app.as_ref().map(|n| &n.0));
            b.op.append_option(f.op.as_ref().map(|n| &n.0));
            b.bytes.append_value(f.bytes);
            b.packets.append_option(f.packets);
            b.payload_bytes.append_value(payload_bytes);
            b.machine_id.push(machine_id);
            b.envelope.append_value(index);
        }
        Ok(())
    }
}

fn capacity(what: &str, key: &'static str) -> DecodeError {
    DecodeError {
        cap: Some(key),
        ..DecodeError::new(
            Reason::Capacity,
            format!("too many distinct {what}: the cap {key} is reached"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{Walk, check_name, nests_deeper_than};

    /// The ASCII scan lets through what the char walk lets through: names
    /// outside ASCII are still judged by their chars, not refused.
    #[test]
    fn names_are_refused_for_control_characters_only() {
        for ok in ["press-07", "Temperatur °C", "drück_bar", "温度", " ~"] {
            assert_eq!(check_name("metric", ok).ok(), Some(ok), "{ok:?}");
        }
        for bad in ["a\tb", "a\u{7f}", "temp\u{85}", "\u{9f}x", "\n"] {
            assert!(check_name("metric", bad).is_err(), "{bad:?}");
        }
    }

    /// The byte-by-byte walk alone: what the block path must agree with.
    fn reference(text: &[u8], max: usize) -> bool {
        Walk {
            depth: 0,
            in_string: false,
            escaped: false,
            max,
        }
        .bytes(text)
    }

    #[test]
    fn the_depth_check_agrees_with_a_plain_walk() {
        let mut cases: Vec<Vec<u8>> = vec![
            b"[{\"a\":1},{\"b\":[2,3]}]".to_vec(),
            br#"{"k":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}"#.to_vec(),
            br#"{"k":"\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[","l":[[1]]}"#.to_vec(),
            br#"{"k":"\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["#.to_vec(),
            b"]]]]]]]]]][[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_vec(),
            b"\"unterminated [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\".to_vec(),
        ];
        // Nesting at, just below and just above the limit, with strings and
        // escapes between the brackets.
        for depth in [31usize, 32, 33, 40] {
            let mut t = Vec::new();
            for i in 0..depth {
                t.extend_from_slice(if i % 2 == 0 { b"[" } else { b"{\"k\\\"\":" });
            }
            assert_eq!(nests_deeper_than(&t, 32), depth > 32, "nested {depth} deep");
            cases.push(t);
        }
        // A pseudo-random mix of the bytes that matter.
        // With and without escapes (blocks without a backslash take the
        // bitmask path), over several 64-byte blocks.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for alphabet in [&b"{}[]\"\\a:,"[..], &b"{}[]\"aaaaa:,"[..]] {
            for _ in 0..2000 {
                let mut t = Vec::new();
                for _ in 0..(x % 500) as usize {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Mostly openers, so some cases go past the limit.
                    let b = if x.is_multiple_of(3) {
                        b'['
                    } else {
                        alphabet[(x >> 8) as usize % alphabet.len()]
                    };
                    t.push(b);
                }
                x = x.wrapping_add(0x632b_e59b_d9b4_e019);
                cases.push(t);
            }
        }
        // Shallow array payloads long enough for many blocks, with a string
        // full of brackets across a block boundary, and one nested too deep.
        let object = br#"{"ts":1,"device":"plc-00001","seq":2,"readings":{"a":1.5,"b":null}}"#;
        let mut shallow = b"[".to_vec();
        for k in 0..50 {
            if k > 0 {
                shallow.push(b',');
            }
            shallow.extend_from_slice(object);
        }
        shallow.extend_from_slice(br#",{"note":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}]"#);
        cases.push(shallow.clone());
        let mut deep = shallow[..shallow.len() - 1].to_vec();
        deep.extend_from_slice(&[b'['; 40]);
        cases.push(deep);
        let mut past = 0;
        for t in &cases {
            for max in [0, 3, 32] {
                let want = reference(t, max);
                past += want as usize;
                assert_eq!(
                    nests_deeper_than(t, max),
                    want,
                    "{:?} at {max}",
                    String::from_utf8_lossy(t)
                );
            }
        }
        assert!(past > 100, "the cases reach past the limit ({past})");
        assert!(!nests_deeper_than(&cases[cases.len() - 2], 32));
        assert!(nests_deeper_than(&cases[cases.len() - 1], 32));
    }
}
