//! Value types of configuration keys that the sections share: durations and
//! bounded numbers. Each one checks its value while the file is read, so a
//! bad value is reported by the TOML parser itself, at its line and column
//! (config.rs adds the file and the key's path).
//!
//! The sections live beside the modules that own them (`api::config`,
//! `ebpf::config`, ...); config.rs only composes them.

use std::fmt;

use serde::{
    de::{self, Deserializer, Visitor},
    Deserialize, Serialize, Serializer,
};

/// Nanoseconds in a second: the unit of `*_seconds` keys.
pub const SECOND: u64 = 1_000_000_000;
/// Nanoseconds in a millisecond: the unit of `*_ms` keys.
pub const MILLI: u64 = 1_000_000;
/// The longest duration a key takes unless it says less: what fits in u64
/// nanoseconds (about 584 years), the unit the tracker and detectors use.
pub const NANOS_MAX: u64 = u64::MAX;

/// A duration key: a number in the key's unit (`UNIT` nanoseconds: [`SECOND`]
/// for `*_seconds`, [`MILLI`] for `*_ms`) or a string that names its own
/// (`"1500ms"`, `"30s"`, `"5m"`, `"1h 30m"`), from `MIN` to `MAX`
/// nanoseconds. Serialized as such a string, which reads back exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration<const UNIT: u64, const MIN: u64 = 0, const MAX: u64 = NANOS_MAX>(u64);

/// A `*_seconds` key, from `MIN` to `MAX` nanoseconds.
pub type Seconds<const MIN: u64 = 0, const MAX: u64 = NANOS_MAX> = Duration<SECOND, MIN, MAX>;
/// A `*_ms` key, from `MIN` to `MAX` nanoseconds.
pub type Millis<const MIN: u64 = 0, const MAX: u64 = NANOS_MAX> = Duration<MILLI, MIN, MAX>;

impl<const UNIT: u64, const MIN: u64, const MAX: u64> Duration<UNIT, MIN, MAX> {
    /// A default given in the key's unit; out of bounds fails to compile
    /// where it is evaluated in a const, and the defaults test otherwise.
    pub const fn new(in_unit: u64) -> Self {
        let nanos = in_unit * UNIT;
        assert!(MIN <= nanos && nanos <= MAX, "a default out of its bounds");
        Self(nanos)
    }

    pub const fn get(self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.0)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// `nanos` if within the bounds (`None`: beyond u64), else why not
    /// (`shown` is the value as written in the file).
    fn checked(nanos: Option<u64>, shown: &dyn fmt::Display) -> Result<Self, String> {
        if let Some(nanos) = nanos.filter(|n| (MIN..=MAX).contains(n)) {
            return Ok(Self(nanos));
        }
        let in_unit = |n: u64| n as f64 / UNIT as f64;
        let unit = unit_name(UNIT);
        Err(if MIN == 0 && MAX == NANOS_MAX {
            format!("{shown} is too large (at most {} {unit})", in_unit(MAX))
        } else {
            format!(
                "{shown} is not between {} and {} {unit}",
                in_unit(MIN),
                in_unit(MAX)
            )
        })
    }
}

fn unit_name(unit: u64) -> &'static str {
    match unit {
        SECOND => "seconds",
        MILLI => "milliseconds",
        _ => "units",
    }
}

impl<const UNIT: u64, const MIN: u64, const MAX: u64> TryFrom<std::time::Duration>
    for Duration<UNIT, MIN, MAX>
{
    type Error = String;

    fn try_from(d: std::time::Duration) -> Result<Self, String> {
        Self::checked(u64::try_from(d.as_nanos()).ok(), &format_args!("{d:?}"))
    }
}

impl<'de, const UNIT: u64, const MIN: u64, const MAX: u64> Deserialize<'de>
    for Duration<UNIT, MIN, MAX>
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurationVisitor::<UNIT, MIN, MAX>)
    }
}

struct DurationVisitor<const UNIT: u64, const MIN: u64, const MAX: u64>;

impl<const UNIT: u64, const MIN: u64, const MAX: u64> Visitor<'_>
    for DurationVisitor<UNIT, MIN, MAX>
{
    type Value = Duration<UNIT, MIN, MAX>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a number of {}, or a duration such as \"500ms\", \"30s\" or \"2m\"",
            unit_name(UNIT)
        )
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Duration::checked(n.checked_mul(UNIT), &n).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::custom(format!("{n} is below zero"))),
        }
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Self::Value, E> {
        if x.is_nan() {
            return Err(E::custom("nan is not a duration"));
        }
        if x < 0.0 {
            return Err(E::custom(format!("{x} is below zero")));
        }
        let nanos = (x * UNIT as f64).round();
        // 2^64 and above (inf too) do not fit; below, the cast is exact
        // enough (f64 has no more precision to give).
        let nanos = (nanos < u64::MAX as f64).then_some(nanos as u64);
        Duration::checked(nanos, &x).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            E::custom(format!(
                "{text:?} is not a duration ({e}); write a number of {}, or a string \
                 such as \"500ms\", \"30s\" or \"2m\"",
                unit_name(UNIT)
            ))
        })?;
        Duration::checked(u64::try_from(d.as_nanos()).ok(), &format_args!("{text:?}"))
            .map_err(E::custom)
    }
}

impl<const UNIT: u64, const MIN: u64, const MAX: u64> Serialize for Duration<UNIT, MIN, MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.get()))
    }
}

/// A whole number of type `T` from `MIN` to `MAX` (a count, a size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounded<T, const MIN: u64, const MAX: u64 = { u64::MAX }>(T);

impl<T: Copy, const MIN: u64, const MAX: u64> Bounded<T, MIN, MAX> {
    /// A default; the defaults test reads every default back through
    /// [`TryFrom`], which checks the bounds.
    pub const fn new(value: T) -> Self {
        Self(value)
    }

    pub const fn get(self) -> T {
        self.0
    }
}

impl<T: TryFrom<u64>, const MIN: u64, const MAX: u64> TryFrom<u64> for Bounded<T, MIN, MAX> {
    type Error = String;

    fn try_from(n: u64) -> Result<Self, String> {
        if !(MIN..=MAX).contains(&n) {
            return Err(if MAX == u64::MAX {
                format!("{n} is less than {MIN}")
            } else {
                format!("{n} is not between {MIN} and {MAX}")
            });
        }
        T::try_from(n)
            .map(Self)
            .map_err(|_| format!("{n} is too large"))
    }
}

impl<'de, T: TryFrom<u64>, const MIN: u64, const MAX: u64> Deserialize<'de>
    for Bounded<T, MIN, MAX>
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::try_from(u64::deserialize(d)?).map_err(de::Error::custom)
    }
}

impl<T: Serialize, const MIN: u64, const MAX: u64> Serialize for Bounded<T, MIN, MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Timeout = Seconds<{ SECOND / 10 }, { 3600 * SECOND }>;

    fn read<T: for<'de> Deserialize<'de>>(value: &str) -> Result<T, String> {
        #[derive(Deserialize)]
        struct One<T> {
            v: T,
        }
        toml::from_str::<One<T>>(&format!("v = {value}"))
            .map(|one| one.v)
            .map_err(|e| e.message().to_owned())
    }

    #[test]
    fn durations_take_a_number_in_the_unit_or_a_string() {
        let ms = std::time::Duration::from_millis;
        assert_eq!(read::<Timeout>("1.5").map(Duration::get), Ok(ms(1500)));
        assert_eq!(read::<Timeout>("2").map(Duration::get), Ok(ms(2000)));
        assert_eq!(read::<Timeout>("\"250ms\"").map(Duration::get), Ok(ms(250)));
        assert_eq!(read::<Millis>("250").map(Duration::get), Ok(ms(250)));
        assert_eq!(read::<Millis>("\"1m\"").map(Duration::get), Ok(ms(60_000)));
        assert_eq!(read::<Millis>("0.5").map(Duration::as_nanos), Ok(500_000));
    }

    #[test]
    fn durations_out_of_bounds_say_the_bounds() {
        for (value, wanted) in [
            ("0.05", "0.05 is not between 0.1 and 3600 seconds"),
            ("3601", "3601 is not between 0.1 and 3600 seconds"),
            ("\"2h\"", "\"2h\" is not between 0.1 and 3600 seconds"),
            ("-1", "-1 is below zero"),
            ("-0.5", "-0.5 is below zero"),
            ("nan", "nan is not a duration"),
            ("inf", "inf is not between 0.1 and 3600 seconds"),
            ("\"soon\"", "\"soon\" is not a duration"),
            (
                "true",
                "invalid type: boolean `true`, expected a number of seconds",
            ),
        ] {
            let e = read::<Timeout>(value).expect_err(value);
            assert!(e.starts_with(wanted), "{value}: {e}");
        }
        let e = read::<Millis>("18446744073710").expect_err("overflow");
        assert!(e.starts_with("18446744073710 is too large (at most 18446744073709.55"));
    }

    #[test]
    fn durations_serialize_to_what_reads_back() {
        for value in ["1.5", "0.1", "3600", "\"59m 59s 999ms 1us\""] {
            let d = read::<Timeout>(value).expect(value);
            let text = toml::Value::try_from(d).expect("serialize").to_string();
            assert_eq!(read::<Timeout>(&text), Ok(d), "{value} -> {text}");
        }
    }

    #[test]
    fn bounded_numbers() {
        assert_eq!(
            read::<Bounded<u32, 16, 4096>>("16").map(Bounded::get),
            Ok(16)
        );
        assert_eq!(
            read::<Bounded<u32, 16, 4096>>("4097"),
            Err("4097 is not between 16 and 4096".to_owned())
        );
        assert_eq!(
            read::<Bounded<usize, 1>>("0"),
            Err("0 is less than 1".to_owned())
        );
        let e = read::<Bounded<usize, 1>>("-3").expect_err("negative");
        assert!(e.starts_with("invalid value: integer `-3`"), "{e}");
    }
}
