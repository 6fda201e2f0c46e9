//! The telemetry payloads a plant sends nearly always, read in one pass over
//! the bytes: flat objects (or an array of them) whose names have no escapes,
//! an integer or RFC 3339 `ts`, an integer or null `seq`, and readings that are plain
//! decimals or null. serde_json's visitor took some 3,700 instructions for a
//! 180-byte message of four readings, a third of the ingest loop (callgrind
//! over the `pipeline` group of `benches/rooms.rs`).
//!
//! Anything else — an escape, an exponent, a key the contract does not name,
//! a string `ts`, a number too long to be sure of, any error at all — and it
//! gives up, leaving the payload to the serde path, whose answers and errors
//! are the contract's. What it does accept it reads exactly as the serde path
//! does (the tests below hold the two side by side on generated and mangled
//! payloads).

use std::borrow::Cow;

use super::{Name, Payload, RawTelemetry};
use crate::time::{EventTs, parse_rfc3339};

/// Reads `text` into `out` as the serde path would; `None` (with `out` as it
/// was) when the payload is not of the common shape or not valid.
pub(super) fn telemetry<'a>(text: &'a str, out: &mut Payload<'a>, max: usize) -> Option<()> {
    let (objects, readings) = (out.objects.len(), out.readings.len());
    let done = Cursor::new(text).payload(out, max);
    if done.is_none() {
        out.objects.truncate(objects);
        out.readings.truncate(readings);
    }
    done
}

struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

/// The keys of a telemetry object, as bits of a set (each may come once).
const TS: u8 = 1;
const MACHINE: u8 = 2;
const DEVICE: u8 = 4;
const SEQ: u8 = 8;
const READINGS: u8 = 16;

/// Integers of up to this many digits fit in both i64 and u64.
const SAFE_DIGITS: usize = 18;

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Cursor { text, at: 0 }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// The next byte past JSON whitespace.
    fn peek(&mut self) -> Option<u8> {
        let b = self.bytes();
        while let Some(&c) = b.get(self.at) {
            if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(c);
            }
            self.at += 1;
        }
        None
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.at += 1)
    }

    fn payload(mut self, out: &mut Payload<'a>, max: usize) -> Option<()> {
        if self.peek()? == b'[' {
            self.at += 1;
            if self.peek()? == b']' {
                return None; // empty: the serde path says so
            }
            loop {
                self.object(out)?;
                if out.objects.len() > max {
                    return None;
                }
                if !self.more(b']')? {
                    break;
                }
            }
        } else {
            self.object(out)?;
        }
        // Only whitespace may follow.
        self.peek().is_none().then_some(())
    }

    fn object(&mut self, out: &mut Payload<'a>) -> Option<()> {
        self.eat(b'{')?;
        let mut seen = 0u8;
        let (mut ts, mut machine, mut device, mut seq) = (None, None, None, None);
        let mut readings = 0..0;
        if self.peek()? == b'}' {
            return None; // no `ts`: the serde path says so
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            let bit = match key {
                "ts" => TS,
                "machine" => MACHINE,
                "device" => DEVICE,
                "seq" => SEQ,
                "readings" => READINGS,
                _ => return None,
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            match bit {
                TS => ts = Some(self.ts()?),
                MACHINE => machine = self.name_or_null()?,
                DEVICE => device = self.name_or_null()?,
                SEQ => {
                    seq = if self.null() {
                        None
                    } else {
                        Some(self.unsigned()?)
                    }
                }
                _ => {
                    let start = out.readings.len();
                    self.readings(out)?;
                    readings = start..out.readings.len();
                }
            }
            if !self.more(b'}')? {
                break;
            }
        }
        // A missing `ts` is `None` below.
        if seen & READINGS == 0 {
            return None;
        }
        out.objects.push(RawTelemetry {
            ts: EventTs(ts?),
            machine,
            device,
            seq,
            readings,
        });
        Some(())
    }

    fn readings(&mut self, out: &mut Payload<'a>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            let value = if self.null() {
                None
            } else {
                Some(self.reading()?)
            };
            out.readings.push((Cow::Borrowed(key), value));
            if !self.more(b'}')? {
                return Some(());
            }
        }
    }

    /// After an element of an object or array: true at a `,` (another
    /// follows), false at `close` (the end); `None` at anything else.
    fn more(&mut self, close: u8) -> Option<bool> {
        let c = self.peek()?;
        self.at += 1;
        match c {
            b',' => Some(true),
            _ if c == close => Some(false),
            _ => None,
        }
    }

    /// A string without escapes or control characters, borrowed.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let b = self.bytes();
        let start = self.at;
        let end = plain_end(b, start);
        if b.get(end) != Some(&b'"') {
            return None;
        }
        self.at = end + 1;
        // Both ends are ASCII quotes, so char boundaries.
        self.text.get(start..end)
    }

    fn name_or_null(&mut self) -> Option<Option<Name<'a>>> {
        if self.null() {
            return Some(None);
        }
        Some(Some(Name(Cow::Borrowed(self.string()?))))
    }

    /// `null` is next (and is taken).
    fn null(&mut self) -> bool {
        let next = self.peek().is_some_and(|c| c == b'n');
        if next && self.bytes()[self.at..].starts_with(b"null") {
            self.at += 4;
            return true;
        }
        false
    }

    /// The digits of an integer part (`0`, or a non-zero digit and more):
    /// their value while it fits (it does up to [`SAFE_DIGITS`]) and their count.
    fn digits(&mut self) -> Option<(u64, usize)> {
        let b = self.bytes();
        let start = self.at;
        let first = *b.get(start)?;
        if !first.is_ascii_digit() {
            return None;
        }
        self.at += 1;
        let mut n = u64::from(first - b'0');
        if first != b'0' {
            while let Some(&c) = b.get(self.at).filter(|c| c.is_ascii_digit()) {
                n = n.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
                self.at += 1;
            }
        }
        Some((n, self.at - start))
    }

    /// Epoch milliseconds (a non-negative integer) or an RFC 3339 string.
    fn ts(&mut self) -> Option<i64> {
        if self.peek()? == b'"' {
            return parse_rfc3339(self.string()?);
        }
        i64::try_from(self.unsigned()?).ok()
    }

    /// A non-negative integer of safe length, with no fraction or exponent.
    fn unsigned(&mut self) -> Option<u64> {
        self.peek()?;
        let (n, len) = self.digits()?;
        if len > SAFE_DIGITS || matches!(self.bytes().get(self.at), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(n)
    }

    /// A reading: an integer (as the serde path casts it) or a decimal
    /// without exponent (correctly rounded, as serde_json's
    /// `float_roundtrip` parses it).
    fn reading(&mut self) -> Option<f64> {
        self.peek()?;
        let start = self.at;
        let negative = self.bytes()[start] == b'-';
        if negative {
            self.at += 1;
        }
        let (int, int_len) = self.digits()?;
        match self.bytes().get(self.at) {
            Some(b'e' | b'E') => None,
            Some(b'.') => {
                self.at += 1;
                let frac = self.at;
                let mut m = int;
                while let Some(&c) = self.bytes().get(self.at).filter(|c| c.is_ascii_digit()) {
                    m = m.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
                    self.at += 1;
                }
                let frac_len = self.at - frac;
                if frac_len == 0 || matches!(self.bytes().get(self.at), Some(b'e' | b'E')) {
                    return None;
                }
                // Up to 15 digits are an integer below 2^53, exact as a
                // double, as is 10^k up to 10^22: one division then rounds
                // once, correctly (Clinger's fast path). Longer numbers go
                // through the standard library's parse, correctly rounded too.
                let v = if int_len + frac_len <= 15 && frac_len < POW10.len() {
                    let v = m as f64 / POW10[frac_len];
                    if negative { -v } else { v }
                } else {
                    self.text.get(start..self.at)?.parse().ok()?
                };
                v.is_finite().then_some(v)
            }
            _ => {
                // `-0` is a float to serde_json (-0.0), other integers are
                // cast; long ones it reads as floats, which is left to it.
                if int_len > SAFE_DIGITS || (negative && int == 0) {
                    return None;
                }
                let n = int as i64;
                Some(if negative { -n } else { n } as f64)
            }
        }
    }
}

/// Where a plain string that starts at `at` stops: the first byte at or
/// after `at` that [`ENDS_PLAIN`] marks, or the end of `b`.
///
/// Eight bytes at a time (names such as `temperature_c` are one or two
/// words): a word's bytes are flagged when equal to a quote or a backslash
/// or below 0x20, by the zero-byte test of "Bit Twiddling Hacks". That test
/// may also flag a byte above a flagged one, never one below the first, so
/// the lowest flag is exact.
fn plain_end(b: &[u8], mut at: usize) -> usize {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGHS: u64 = ONES << 7;
    while let Some(word) = b.get(at..at + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let x = u64::from_le_bytes(w);
        let quote = x ^ (ONES * u64::from(b'"'));
        let slash = x ^ (ONES * u64::from(b'\\'));
        let flags = (quote.wrapping_sub(ONES) & !quote)
            | (slash.wrapping_sub(ONES) & !slash)
            | (x.wrapping_sub(ONES * 0x20) & !x);
        let flags = flags & HIGHS;
        if flags != 0 {
            return at + (flags.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    while let Some(&c) = b.get(at) {
        if ENDS_PLAIN[c as usize] {
            break;
        }
        at += 1;
    }
    at
}

/// The bytes a plain string stops at: its closing quote, an escape, a
/// control character (which JSON refuses inside strings).
const ENDS_PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// The powers of ten a double holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

#[cfg(test)]
mod tests {
    use super::super::{Payload, parse_payload};
    use super::{ENDS_PLAIN, plain_end, telemetry};

    /// What a parse gave, in bits: objects and readings.
    type Parsed = (
        Vec<(i64, Option<String>, Option<String>, Option<u64>, usize)>,
        Vec<(String, Option<u64>)>,
    );

    fn parsed(p: &Payload<'_>) -> Parsed {
        (
            p.objects
                .iter()
                .map(|o| {
                    (
                        o.ts.0,
                        o.machine.as_ref().map(|n| n.0.to_string()),
                        o.device.as_ref().map(|n| n.0.to_string()),
                        o.seq,
                        o.readings.len(),
                    )
                })
                .collect(),
            p.readings
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(f64::to_bits)))
                .collect(),
        )
    }

    /// The fast path either gives up or gives what serde gives, and never
    /// accepts what serde refuses.
    fn agree(text: &str, max: usize) -> bool {
        let mut serde = Payload::default();
        let by_serde = parse_payload(text, &mut serde, max)
            .ok()
            .map(|()| parsed(&serde));
        let mut fast = Payload::default();
        match telemetry(text, &mut fast, max) {
            None => {
                assert!(
                    fast.objects.is_empty() && fast.readings.is_empty(),
                    "{text}"
                );
                false
            }
            Some(()) => {
                assert_eq!(Some(parsed(&fast)), by_serde, "payload {text:?}");
                true
            }
        }
    }

    /// Deterministic pseudo-random numbers.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn number(r: &mut Rng) -> String {
        match r.below(8) {
            0 => format!("{}", r.next() as i64 >> r.below(64)),
            1 => format!("{}", r.next() >> r.below(64)),
            2 => format!("{:e}", f64::from_bits(r.next())),
            3 => format!("{}", f64::from_bits(r.next())),
            4 => format!("{:.3}", (r.below(2_000_000) as f64 - 1e6) / 7.0),
            5 => [
                "-0", "0", "-0.0", "0.000", "1e5", "00", "01", "1.", ".5", "-", "1.5e",
            ][r.below(11) as usize]
                .to_string(),
            6 => format!("{}.{}", r.below(1000), "9".repeat(r.below(40) as usize + 1)),
            _ => format!("{}", r.below(100_000) as f64 / 100.0),
        }
    }

    fn object(r: &mut Rng) -> String {
        let mut fields = vec![
            match r.below(4) {
                0 => format!(
                    "\"ts\":\"2026-11-27T06:{:02}:{:02}.{:03}Z\"",
                    r.below(70),
                    r.below(61),
                    r.below(1000)
                ),
                1 => "\"ts\":\"yesterday\"".to_string(),
                _ => format!("\"ts\":{}", 1_764_230_400_000u64 + r.below(1 << 30)),
            },
            format!(
                "\"readings\":{{{}}}",
                (0..r.below(6))
                    .map(|k| format!(
                        "\"sensor_{k}\":{}",
                        if r.below(9) == 0 {
                            "null".into()
                        } else {
                            number(r)
                        }
                    ))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ];
        if r.below(2) == 0 {
            fields.push(format!("\"device\":\"plc-{:05}\"", r.below(100)));
        }
        if r.below(2) == 0 {
            fields.push(if r.below(5) == 0 {
                "\"machine\":null".into()
            } else {
                format!("\"machine\":\"press-{}\"", r.below(9))
            });
        }
        if r.below(2) == 0 {
            fields.push(if r.below(5) == 0 {
                "\"seq\":null".into()
            } else {
                format!("\"seq\":{}", r.next() >> r.below(64))
            });
        }
        // Shuffle the fields, with whitespace here and there.
        for i in (1..fields.len()).rev() {
            fields.swap(i, r.below(i as u64 + 1) as usize);
        }
        let sep = [",", ", ", " ,\n\t", ",\r\n"][r.below(4) as usize];
        format!("{{{}}}", fields.join(sep))
    }

    /// The word-at-a-time scan stops where a byte-at-a-time one does, for
    /// every stopping byte at every place in a word, after any bytes.
    #[test]
    fn a_plain_string_ends_where_the_byte_walk_says() {
        let walk = |b: &[u8], at: usize| {
            (at..b.len())
                .find(|&i| ENDS_PLAIN[b[i] as usize])
                .unwrap_or(b.len())
        };
        let mut r = Rng(0x2545_F491_4F6C_DD1D);
        let fillers = b"az_-.09AZ~\x7f\x80\xc3\xa9\xff !#[]{}";
        for _ in 0..20_000 {
            let len = r.below(40) as usize;
            let mut b: Vec<u8> = (0..len)
                .map(|_| fillers[r.below(fillers.len() as u64) as usize])
                .collect();
            // Zero to three stopping bytes (any of the 34) at random places.
            for _ in 0..r.below(4) {
                if b.is_empty() {
                    break;
                }
                let stop = match r.below(34) {
                    32 => b'"',
                    33 => b'\\',
                    c => c as u8,
                };
                let at = r.below(b.len() as u64) as usize;
                b[at] = stop;
            }
            let at = r.below(b.len() as u64 + 1) as usize;
            assert_eq!(plain_end(&b, at), walk(&b, at), "{b:?} from {at}");
        }
        // Each stopping byte alone, at each place of a word, after a clean word.
        for stop in (0u8..0x20).chain([b'"', b'\\']) {
            for place in 0..16 {
                let mut b = vec![b'x'; 24];
                b[place] = stop;
                assert_eq!(plain_end(&b, 0), place, "{stop:#x} at {place}");
            }
        }
    }

    #[test]
    fn the_common_payloads_are_read_fast_and_as_serde_reads_them() {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15);
        let mut fast = 0;
        for _ in 0..20_000 {
            let text = if r.below(4) == 0 {
                format!(
                    "[{}]",
                    (0..1 + r.below(4))
                        .map(|_| object(&mut r))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            } else {
                object(&mut r)
            };
            fast += agree(&text, 3) as usize;
        }
        // Most of them are of the common shape.
        assert!(fast > 5_000, "only {fast} of 20000 read fast");
        let bench = "{\"ts\":1764230400125,\"device\":\"plc-00001\",\"seq\":7,\"readings\":{\"temperature_c\":70.42,\"vibration_mm_s\":2.342,\"spindle_rpm\":1202.2,\"motor_current_a\":24.42}}";
        assert!(agree(bench, 100), "the bench's message is the common shape");
    }

    /// Mangled payloads — a byte dropped, doubled or replaced — are read as
    /// serde reads them or left to it; none the serde path refuses gets through.
    #[test]
    fn mangled_payloads_never_get_through_the_fast_path_alone() {
        let mut r = Rng(0xD1B5_4A32_D192_ED03);
        let specials = b"{}[]\",:.-+eE0123456789 nul\\\x01\x7ft";
        for _ in 0..20_000 {
            let mut bytes = object(&mut r).into_bytes();
            for _ in 0..1 + r.below(3) {
                let at = r.below(bytes.len() as u64) as usize;
                match r.below(3) {
                    0 => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, bytes[at]),
                    _ => bytes[at] = specials[r.below(specials.len() as u64) as usize],
                }
                if bytes.is_empty() {
                    break;
                }
            }
            if let Ok(text) = std::str::from_utf8(&bytes) {
                agree(text, 100);
            }
        }
        for text in [
            "{\"ts\":1764230400125,\"readings\":{\"x\":1},\"ts\":1}",
            "{\"ts\":1764230400125,\"readings\":{\"x\":-0}}",
            "{\"ts\":1764230400125,\"readings\":{\"x\":1e400}}",
            "{\"ts\":-5,\"readings\":{}}",
            "{\"ts\":9223372036854775808,\"readings\":{}}",
            "{\"ts\":1764230400125,\"readings\":{\"a\\u0000\":1}}",
            "{\"ts\":1764230400125,\"readings\":{\"x\":1}} x",
            "[{\"ts\":1764230400125,\"readings\":{}},]",
            "[]",
            "{}",
        ] {
            assert!(!agree(text, 100), "{text} is left to the serde path");
        }
        assert!(
            !agree("[{\"ts\":1,\"readings\":{}},{\"ts\":2,\"readings\":{}}]", 1),
            "over the cap"
        );
    }
}
