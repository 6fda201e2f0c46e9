//! Event time: parsing the contract's two timestamp forms, formatting RFC 3339,
//! and reading human durations ("10s", "5m") from the configuration and the CLI.
//!
//! Time inside twinwatch is always `Millis`, epoch milliseconds in UTC, so that
//! windows, rates and baselines follow the messages' own clock (`ts`), never the
//! wall clock: `replay` and `run` then give the same alerts for the same input.

use chrono::{DateTime, SecondsFormat, Utc};

/// Epoch milliseconds, UTC.
pub type Millis = i64;

/// Earliest event time accepted: 2000-01-01T00:00:00Z. Anything earlier is a
/// broken clock or a unit mistake (seconds sent as milliseconds).
pub const MIN_TS: Millis = 946_684_800_000;
/// Latest event time accepted: 2100-01-01T00:00:00Z (microseconds sent as
/// milliseconds land far beyond it).
pub const MAX_TS: Millis = 4_102_444_800_000;

/// Whether `ts` lies in the plausible range [`MIN_TS`, `MAX_TS`).
pub fn plausible(ts: Millis) -> bool {
    (MIN_TS..MAX_TS).contains(&ts)
}

/// Parses an RFC 3339 timestamp to epoch milliseconds (sub-millisecond digits are truncated).
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.timestamp_millis())
}

/// Formats epoch milliseconds as RFC 3339 in UTC, with milliseconds only when
/// they are not zero (`2026-11-27T08:00:03Z`, `2026-11-27T08:00:03.004Z`).
pub fn format_rfc3339(ms: Millis) -> String {
    let Some(dt) = DateTime::<Utc>::from_timestamp_millis(ms) else {
        return ms.to_string();
    };
    let fmt = if ms.rem_euclid(1000) == 0 {
        SecondsFormat::Secs
    } else {
        SecondsFormat::Millis
    };
    dt.to_rfc3339_opts(fmt, true)
}

/// The current wall-clock time, epoch milliseconds: `emitted_at`, and a
/// message's arrival (`received_at`).
pub fn wall_now() -> Millis {
    // Read straight off the system clock: chrono's `Utc::now` builds a
    // calendar date on the way, a visible cost when every message is stamped.
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as Millis,
        // Before 1970 (a broken clock): floored, as chrono does.
        Err(e) => -(e.duration().as_nanos().div_ceil(1_000_000) as Millis),
    }
}

/// Parses a duration such as `500ms`, `10s`, `5m`, `2h`, `1d` or `1h30m`.
/// A bare number is read as seconds.
pub fn parse_duration(s: &str) -> Result<Millis, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        return secs_to_millis(secs, s);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{s}`: missing unit (ms, s, m, h, d)"))?;
        if num_len == 0 {
            return Err(format!("`{s}`: expected a number before the unit"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("`{s}`: bad number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            other => {
                return Err(format!(
                    "`{s}`: unknown unit `{other}` (use ms, s, m, h or d)"
                ));
            }
        };
        total += value * factor;
        rest = &rest[unit_len..];
    }
    secs_to_millis(total, s)
}

fn secs_to_millis(secs: f64, original: &str) -> Result<Millis, String> {
    if !(0.0..=1e10).contains(&secs) {
        return Err(format!("`{original}`: duration out of range"));
    }
    Ok((secs * 1000.0).round() as Millis)
}

/// Formats a duration compactly for explanations: `45s`, `5m12s`, `2h03m`.
pub fn format_duration(ms: Millis) -> String {
    let secs = ms.max(0) / 1000;
    if secs < 60 {
        if ms < 10_000 && ms % 1000 != 0 {
            return format!("{:.1}s", ms as f64 / 1000.0);
        }
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// Serde helpers for durations written as strings in TOML (`size = "10s"`).
pub mod serde_duration {
    use super::{Millis, format_duration_exact, parse_duration};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &Millis, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration_exact(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Formats a duration so that [`parse_duration`] reads it back exactly.
pub fn format_duration_exact(ms: Millis) -> String {
    if ms % 3_600_000 == 0 && ms != 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms != 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The start of the tumbling window of `size` that holds `ts`.
pub fn window_start(ts: Millis, size: Millis) -> Millis {
    ts.div_euclid(size) * size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wall_clock_reads_epoch_milliseconds_as_chrono_does() {
        let before = Utc::now().timestamp_millis();
        let now = wall_now();
        let after = Utc::now().timestamp_millis();
        assert!(
            before <= now && now <= after,
            "{before} <= {now} <= {after}"
        );
    }

    #[test]
    fn rfc3339_round_trip() {
        let ms = parse_rfc3339("2026-11-27T08:00:00.125Z").unwrap();
        assert_eq!(ms, 1_795_766_400_125);
        assert_eq!(format_rfc3339(ms), "2026-11-27T08:00:00.125Z");
        assert_eq!(format_rfc3339(ms - 125), "2026-11-27T08:00:00Z");
        assert_eq!(
            parse_rfc3339("2026-11-27T09:00:00+01:00"),
            Some(1_795_766_400_000)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(10_000));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("2.5"), Ok(2_500));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-3s").is_err());
        for ms in [0, 1, 999, 1000, 90_000, 600_000, 7_200_000] {
            assert_eq!(parse_duration(&format_duration_exact(ms)), Ok(ms));
        }
        assert_eq!(format_duration(312_000), "5m12s");
    }

    #[test]
    fn windows_align_to_epoch() {
        assert_eq!(window_start(10_999, 10_000), 10_000);
        assert_eq!(window_start(-1, 10_000), -10_000);
    }
}

/// An event time as the contract writes it: an RFC 3339 string or integer
/// epoch milliseconds. Deserializes without going through `serde_json::Value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTs(pub Millis);

impl<'de> serde::Deserialize<'de> for EventTs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = EventTs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an RFC 3339 string or integer epoch milliseconds")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<EventTs, E> {
                parse_rfc3339(s)
                    .map(EventTs)
                    .ok_or_else(|| E::custom(format_args!("bad_timestamp: `{s}` is not RFC 3339")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<EventTs, E> {
                Ok(EventTs(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<EventTs, E> {
                i64::try_from(v)
                    .map(EventTs)
                    .map_err(|_| E::custom("bad_timestamp: epoch milliseconds out of range"))
            }
        }
        d.deserialize_any(V)
    }
}
