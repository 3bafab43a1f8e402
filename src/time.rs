//! Time representation shared by the store and the API edges.
//!
//! Stored times are integer milliseconds since the Unix epoch (UTC), compared
//! as integers; the API renders them as RFC 3339 UTC with milliseconds.
//! Freshness decisions never use these wall-clock values: they use
//! `std::time::Instant` in memory (see `scheduler`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Renders epoch milliseconds as `2026-05-09T10:30:00.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let mut buf = [0u8; RFC3339_LEN];
    match write_rfc3339(ms, &mut buf) {
        Some(text) => text.to_owned(),
        None => {
            // Outside four-digit years; not reachable from real clocks.
            let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
            let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
            let sod = secs.rem_euclid(86_400);
            format!(
                "{y}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
                sod / 3600,
                (sod % 3600) / 60,
                sod % 60
            )
        }
    }
}

const RFC3339_LEN: usize = 24;

/// Writes the RFC 3339 form into `buf` without allocating (lists render
/// three times per item). `None` for years outside 0..=9999.
fn write_rfc3339(ms: i64, buf: &mut [u8; RFC3339_LEN]) -> Option<&str> {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000) as u32;
    let sod = secs.rem_euclid(86_400) as u32;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    if !(0..=9999).contains(&y) {
        return None;
    }
    let fields = [
        (y as u32, 4, b'-'),
        (m, 2, b'-'),
        (d, 2, b'T'),
        (sod / 3600, 2, b':'),
        ((sod % 3600) / 60, 2, b':'),
        (sod % 60, 2, b'.'),
        (millis, 3, b'Z'),
    ];
    let mut at = 0;
    for (value, width, then) in fields {
        let mut v = value;
        for slot in buf[at..at + width].iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
        buf[at + width] = then;
        at += width + 1;
    }
    std::str::from_utf8(&buf[..at]).ok()
}

/// An epoch-milliseconds time that serializes as RFC 3339 without
/// allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub i64);

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; RFC3339_LEN];
        match write_rfc3339(self.0, &mut buf) {
            Some(text) => serializer.serialize_str(text),
            None => serializer.serialize_str(&rfc3339(self.0)),
        }
    }
}

/// Parses RFC 3339 UTC (`2026-05-09T10:31:00Z`, optional fraction, `Z`
/// or `+00:00`) into epoch milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &frac[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    if !matches!(rest, "Z" | "z" | "+00:00" | "-00:00") {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    Some(((days * 86_400 + h * 3600 + mi * 60 + se) * 1000) + millis)
}

/// (year, month, day) to days since 1970-01-01 (inverse of
/// `civil_from_days`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The longest duration any field accepts (10 years). Every epoch-ms sum
/// `now + duration` then stays far inside `i64` and inside the four-digit
/// years RFC 3339 renders; fields have their own, smaller bounds.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// Parses a duration string such as `500ms`, `90s`, `30m`, `1h30m`, `2d`.
/// A bare number is refused: the unit is part of the value. Anything over
/// [`MAX_DURATION`] is refused, never wrapped or saturated. Edges do not call
/// this directly: they call [`parse_duration_within`] with their field's
/// bounds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_duration_within(text, Duration::ZERO, MAX_DURATION)
}

/// The one checked parser of every duration on every edge (REST bodies,
/// admin envelopes, the config file): `text` must parse and lie within
/// `min..=max` (`max` is capped at [`MAX_DURATION`]). The message says which
/// bound was crossed, so callers only prefix the field's name.
pub fn parse_duration_within(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let max = max.min(MAX_DURATION);
    // `None`: beyond even u128 milliseconds; over every bound all the same.
    let ms = match duration_millis(text)? {
        Some(ms) if ms <= max.as_millis() => ms,
        _ => return Err(format!("must be at most {}", format_duration(max))),
    };
    if ms < min.as_millis() {
        return Err(if min <= Duration::from_millis(1) {
            "must be a positive duration".to_owned()
        } else {
            format!("must be at least {}", format_duration(min))
        });
    }
    // At most MAX_DURATION, so it fits.
    Ok(Duration::from_millis(ms as u64))
}

/// The milliseconds `text` spells, in u128 so that no sum wraps; `None`
/// when even that overflows.
fn duration_millis(text: &str) -> Result<Option<u128>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: Option<u128> = Some(0);
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration {text:?}: expected a number"));
        }
        let value: Option<u128> = rest[..digits].parse().ok();
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let millis_per_unit: u128 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: missing unit (ms, s, m, h, d)"
                ));
            }
            other => return Err(format!("invalid duration {text:?}: unknown unit {other:?}")),
        };
        total = total
            .zip(value)
            .and_then(|(t, v)| t.checked_add(v.checked_mul(millis_per_unit)?));
    }
    Ok(total)
}

/// Milliseconds of a duration that came through [`parse_duration`] or a
/// bounded config value; saturates instead of wrapping for anything else.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Renders a duration the way `parse_duration` reads it back.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if out.is_empty() { "0s".into() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_778_322_600_123), "2026-05-09T10:30:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn parses_rfc3339() {
        for ms in [0i64, 1_778_322_600_123, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(
            parse_rfc3339("2026-05-09T10:31:00Z"),
            Some(1_778_322_660_000)
        );
        assert_eq!(
            parse_rfc3339("2026-05-09T10:31:00.5+00:00"),
            Some(1_778_322_660_500)
        );
        for bad in [
            "",
            "2026-05-09",
            "2026-13-01T00:00:00Z",
            "2026-05-09T10:31:00+02:00",
            "2026-05-09T10:31:00.Z",
            "x026-05-09T10:31:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn parses_durations() {
        let table = [
            ("500ms", 500),
            ("90s", 90_000),
            ("30m", 1_800_000),
            ("1h30m", 5_400_000),
            ("1d", 86_400_000),
            ("1m30s250ms", 90_250),
        ];
        for (text, ms) in table {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_millis(ms),
                "{text}"
            );
        }
        for bad in [
            "",
            "10",
            "s",
            "5x",
            "-5s",
            "1.5s",
            "99999999999999999999s",
            "18446744073709552s",
            "106751991167d",
            "3651d",
            "3650d1ms",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(parse_duration("3650d").unwrap(), MAX_DURATION);
    }

    #[test]
    fn bounded_durations() {
        let (min, max) = (Duration::from_millis(1), Duration::from_secs(86_400));
        assert_eq!(
            parse_duration_within("24h", min, max),
            Ok(Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_duration_within("24h1ms", min, max).unwrap_err(),
            "must be at most 24h"
        );
        assert_eq!(
            parse_duration_within("0s", min, max).unwrap_err(),
            "must be a positive duration"
        );
        assert_eq!(
            parse_duration_within("50ms", Duration::from_millis(100), max).unwrap_err(),
            "must be at least 100ms"
        );
    }

    #[test]
    fn format_round_trips() {
        for ms in [
            0u64, 250, 1000, 61_000, 5_400_000, 90_250, 86_400_000, 90_061_000,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }
}
