//! PostgreSQL binary COPY encoding, written straight into a `BytesMut`.
//!
//! A COPY stream is a fixed header, then per row a 16-bit field count and
//! per field a 32-bit length (-1 for NULL) and the value in the type's binary
//! `recv` format, then a 16-bit -1 trailer. Values are converted from the
//! decoded event without an intermediate per-field allocation: each
//! conversion writes its bytes in place and patches the length afterwards.
//!
//! Conversions are strict where PostgreSQL would be, so a value that cannot
//! fit its column is refused here (as a dead letter with a reason) rather
//! than failing the whole batch on the server.
//!
//! [`segment`] holds encoded rows grouped for one COPY and streams them.

pub mod pool;
pub mod segment;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

use crate::config::TimeUnit;
use crate::json::Json;

/// Unix microseconds now.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Signature, flags and header-extension length of a binary COPY stream.
pub const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// End-of-data marker.
pub const COPY_TRAILER: &[u8] = &[0xff, 0xff];

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01.
const PG_EPOCH_OFFSET_DAYS: i64 = 10_957;
/// Unix micros of 0001-01-01 and of 10000-01-01: the range weir accepts.
const MIN_UNIX_MICROS: i64 = -62_135_596_800_000_000;
const MAX_UNIX_MICROS: i64 = 253_402_300_800_000_000;

/// A column type weir can encode, resolved from the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    /// text, citext, name, and enums (whose binary form is the label).
    Text,
    /// varchar(n) / char(n): text of at most `max_chars` characters.
    BoundedText {
        max_chars: Option<usize>,
    },
    /// An enum: text that must be one of the labels.
    Enum {
        labels: Vec<String>,
    },
    Uuid,
    Json,
    Jsonb,
    Timestamptz,
    Timestamp,
    Date,
    Bytea,
    /// A one-dimensional array; `element_oid` goes into the array header.
    Array {
        element: Box<PgType>,
        element_oid: u32,
    },
}

impl PgType {
    /// True for types whose source is naturally text (used to decide how
    /// Kafka keys and headers are read).
    fn is_textual(&self) -> bool {
        matches!(
            self,
            PgType::Text | PgType::BoundedText { .. } | PgType::Enum { .. }
        )
    }
}

/// Why a value was refused. The code is stable and goes into dead letters
/// and metric labels; the detail is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("wrong type: {0}")]
    WrongType(String),
    #[error("out of range: {0}")]
    OutOfRange(String),
    #[error("invalid value: {0}")]
    Invalid(String),
    #[error("contains a NUL character, which PostgreSQL text cannot hold")]
    NulCharacter,
    #[error("too long: {0}")]
    TooLong(String),
}

impl FieldError {
    /// The reason code (low cardinality).
    pub fn code(&self) -> &'static str {
        match self {
            FieldError::WrongType(_) => "wrong_type",
            FieldError::OutOfRange(_) => "out_of_range",
            FieldError::Invalid(_) => "invalid_value",
            FieldError::NulCharacter => "nul_character",
            FieldError::TooLong(_) => "value_too_long",
        }
    }
}

/// A value before conversion to its column type.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Json(&'a Json<'a>),
    Str(&'a str),
    Bytes(&'a [u8]),
    Int(i64),
    /// A point in time, microseconds since the Unix epoch.
    UnixMicros(i64),
}

/// Appends a value's big-endian bytes to `buf`. `BufMut::put_i32` and its
/// kin go through `BytesMut::put_slice`, which is not inlined, and copy their
/// few bytes with a call to `memcpy`; `extend_from_slice` is inlined, and a
/// length known when compiling becomes a plain store. Those calls were 6%
/// of decoding's instructions (callgrind, around `Decoder::decode`).
#[inline(always)]
fn put<const N: usize>(buf: &mut BytesMut, bytes: [u8; N]) {
    buf.extend_from_slice(&bytes);
}

/// Writes the COPY header.
pub fn write_header(buf: &mut BytesMut) {
    buf.extend_from_slice(COPY_HEADER);
}

/// Starts a row of `fields` fields.
pub fn begin_row(buf: &mut BytesMut, fields: u16) {
    put(buf, (fields as i16).to_be_bytes());
}

pub fn write_null(buf: &mut BytesMut) {
    put(buf, (-1i32).to_be_bytes());
}

/// Encodes `input` as a field of type `ty`. On error the buffer is left as
/// it was.
pub fn write_field(
    buf: &mut BytesMut,
    ty: &PgType,
    input: Input<'_>,
    unit: TimeUnit,
) -> Result<(), FieldError> {
    let start = buf.len();
    put(buf, 0i32.to_be_bytes()); // length, patched below
    match encode_value(buf, ty, input, unit) {
        Ok(()) => {
            let len = buf.len() - start - 4;
            let len = i32::try_from(len)
                .map_err(|_| FieldError::TooLong(format!("{len} bytes in one field")))?;
            buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(err) => {
            buf.truncate(start);
            Err(err)
        }
    }
}

/// A key's or header's bytes as text. Header values are mostly short
/// ASCII (ids, UUIDs), which a word-wise ASCII check passes in a few
/// instructions where `from_utf8` took about 120 for a UUID.
#[inline]
fn utf8_bytes(bytes: &[u8]) -> Result<&str, FieldError> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).map_err(|_| FieldError::Invalid("bytes are not valid UTF-8".into()))
}

fn encode_value(
    buf: &mut BytesMut,
    ty: &PgType,
    input: Input<'_>,
    unit: TimeUnit,
) -> Result<(), FieldError> {
    // Text-like inputs read as a JSON string would be; keys and headers are
    // bytes that must be UTF-8 for anything but bytea.
    let input = match input {
        // A JSON string is a JSON value for json/jsonb columns, text for the rest.
        Input::Json(Json::String(s)) if !matches!(ty, PgType::Json | PgType::Jsonb) => {
            Input::Str(s)
        }
        Input::Bytes(bytes) if *ty != PgType::Bytea => Input::Str(utf8_bytes(bytes)?),
        other => other,
    };
    match ty {
        PgType::Bool => buf.put_u8(to_bool(input)? as u8),
        PgType::Int2 => {
            let n = to_i64(input)?;
            let n = i16::try_from(n)
                .map_err(|_| FieldError::OutOfRange(format!("{n} for smallint")))?;
            put(buf, n.to_be_bytes());
        }
        PgType::Int4 => {
            let n = to_i64(input)?;
            let n =
                i32::try_from(n).map_err(|_| FieldError::OutOfRange(format!("{n} for integer")))?;
            put(buf, n.to_be_bytes());
        }
        PgType::Int8 => put(buf, to_i64(input)?.to_be_bytes()),
        PgType::Float4 => {
            let x = to_f64(input)?;
            if x.is_finite() && x.abs() > f32::MAX as f64 {
                return Err(FieldError::OutOfRange(format!("{x} for real")));
            }
            put(buf, (x as f32).to_be_bytes());
        }
        PgType::Float8 => put(buf, to_f64(input)?.to_be_bytes()),
        PgType::Numeric => {
            let text = match input {
                Input::Str(s) => s.trim().to_string(),
                Input::Json(Json::Number(n)) => n.to_string(),
                Input::Int(n) => n.to_string(),
                other => return Err(wrong("a number", other)),
            };
            encode_numeric(buf, &text)?;
        }
        PgType::Text => put_text(buf, input)?,
        PgType::BoundedText { max_chars } => {
            let start = buf.len();
            put_text(buf, input)?;
            if let Some(max) = max_chars {
                let chars = std::str::from_utf8(&buf[start..])
                    .expect("text written by put_text should be UTF-8")
                    .chars()
                    .count();
                if chars > *max {
                    return Err(FieldError::TooLong(format!(
                        "{chars} characters for a column of at most {max}"
                    )));
                }
            }
        }
        PgType::Enum { labels } => {
            let start = buf.len();
            put_text(buf, input)?;
            let label = &buf[start..];
            if !labels.iter().any(|l| l.as_bytes() == label) {
                let label = String::from_utf8_lossy(label).into_owned();
                return Err(FieldError::Invalid(format!(
                    "`{label}` is not a label of the enum"
                )));
            }
        }
        PgType::Uuid => {
            let Input::Str(s) = input else {
                return Err(wrong("a UUID string", input));
            };
            let id = uuid::Uuid::try_parse(s.trim())
                .map_err(|_| FieldError::Invalid(format!("`{}` is not a UUID", clip(s))))?;
            buf.extend_from_slice(id.as_bytes());
        }
        PgType::Json | PgType::Jsonb => {
            if *ty == PgType::Jsonb {
                buf.put_u8(1); // jsonb binary format version
            }
            match input {
                Input::Json(value) => match value.source_text() {
                    // An array or object read from the event, holding no
                    // U+0000 and no number `jsonb` would refuse: the event's
                    // own bytes (jsonb stores the same value whatever the
                    // spacing, so this is the re-serialised value's jsonb).
                    Some(text) if *ty == PgType::Jsonb => buf.extend_from_slice(text.as_bytes()),
                    // Anything else is written into a reused scratch buffer
                    // (jsonb refuses U+0000), then appended in one piece.
                    _ => SCRATCH.with_borrow_mut(|scratch| {
                        scratch.clear();
                        value
                            .write_compact(scratch, *ty == PgType::Jsonb)
                            .map_err(|_| FieldError::NulCharacter)?;
                        buf.extend_from_slice(scratch);
                        Ok(())
                    })?,
                },
                Input::Str(s) => {
                    // A string source (header, key) holding JSON text.
                    let value =
                        Json::parse(s).map_err(|_| FieldError::Invalid("not JSON text".into()))?;
                    if *ty == PgType::Jsonb && value.contains_nul() {
                        return Err(FieldError::NulCharacter);
                    }
                    buf.extend_from_slice(s.as_bytes());
                }
                Input::Int(n) => buf.extend_from_slice(n.to_string().as_bytes()),
                other => return Err(wrong("JSON", other)),
            }
        }
        PgType::Timestamptz | PgType::Timestamp => {
            let micros = to_unix_micros(input, unit)?;
            put(buf, (micros - PG_EPOCH_OFFSET_MICROS).to_be_bytes());
        }
        PgType::Date => {
            let days = match input {
                Input::Str(s) if s.len() == 10 => NaiveDate::parse_from_str(s, "%Y-%m-%d")
                    .map_err(|_| FieldError::Invalid(format!("`{}` is not a date", clip(s))))?
                    .signed_duration_since(NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date"))
                    .num_days(),
                other => to_unix_micros(other, unit)?.div_euclid(86_400_000_000),
            };
            put(buf, ((days - PG_EPOCH_OFFSET_DAYS) as i32).to_be_bytes());
        }
        PgType::Bytea => match input {
            Input::Bytes(bytes) => buf.extend_from_slice(bytes),
            Input::Str(s) => buf.extend_from_slice(s.as_bytes()),
            other => return Err(wrong("a string or bytes", other)),
        },
        PgType::Array {
            element,
            element_oid,
        } => {
            let Input::Json(Json::Array(items)) = input else {
                return Err(wrong("an array", input));
            };
            let has_null = items.iter().any(Json::is_null);
            if items.is_empty() {
                put(buf, 0i32.to_be_bytes()); // dimensions
                put(buf, 0i32.to_be_bytes());
                put(buf, element_oid.to_be_bytes());
            } else {
                put(buf, 1i32.to_be_bytes());
                put(buf, (has_null as i32).to_be_bytes());
                put(buf, element_oid.to_be_bytes());
                let len =
                    i32::try_from(items.len()).map_err(|_| FieldError::TooLong("array".into()))?;
                put(buf, len.to_be_bytes());
                put(buf, 1i32.to_be_bytes()); // lower bound
                for item in items {
                    if item.is_null() {
                        write_null(buf);
                    } else {
                        write_field(buf, element, Input::Json(item), unit)?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn put_text(buf: &mut BytesMut, input: Input<'_>) -> Result<(), FieldError> {
    match input {
        Input::Str(s) => {
            if s.as_bytes().contains(&0) {
                return Err(FieldError::NulCharacter);
            }
            buf.extend_from_slice(s.as_bytes());
        }
        Input::Json(Json::Number(n)) => buf.extend_from_slice(n.to_string().as_bytes()),
        Input::Json(Json::Bool(b)) => buf.extend_from_slice(if *b { b"true" } else { b"false" }),
        Input::Int(n) => buf.extend_from_slice(n.to_string().as_bytes()),
        Input::UnixMicros(micros) => {
            let at = DateTime::<Utc>::from_timestamp_micros(micros)
                .ok_or_else(|| FieldError::OutOfRange("timestamp".into()))?;
            buf.extend_from_slice(at.to_rfc3339().as_bytes());
        }
        other => return Err(wrong("text", other)),
    }
    Ok(())
}

fn to_bool(input: Input<'_>) -> Result<bool, FieldError> {
    match input {
        Input::Json(Json::Bool(b)) => Ok(*b),
        Input::Str(s) => match s.trim() {
            "true" | "t" | "TRUE" | "True" => Ok(true),
            "false" | "f" | "FALSE" | "False" => Ok(false),
            _ => Err(FieldError::Invalid(format!(
                "`{}` is not a boolean",
                clip(s)
            ))),
        },
        other => Err(wrong("a boolean", other)),
    }
}

fn to_i64(input: Input<'_>) -> Result<i64, FieldError> {
    match input {
        Input::Int(n) => Ok(n),
        Input::Json(Json::Number(n)) => {
            if let Some(n) = n.as_i64() {
                Ok(n)
            } else if n.is_u64() {
                Err(FieldError::OutOfRange(format!("{n} for bigint")))
            } else {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if x.fract() == 0.0 && x >= i64::MIN as f64 && x < i64::MAX as f64 {
                    Ok(x as i64)
                } else {
                    Err(FieldError::Invalid(format!("{n} is not an integer")))
                }
            }
        }
        Input::Str(s) => s.trim().parse::<i64>().map_err(|_| {
            if !s.trim().is_empty()
                && s.trim()
                    .trim_start_matches('-')
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            {
                FieldError::OutOfRange(format!("{} for bigint", clip(s)))
            } else {
                FieldError::Invalid(format!("`{}` is not an integer", clip(s)))
            }
        }),
        Input::UnixMicros(micros) => Ok(micros),
        other => Err(wrong("an integer", other)),
    }
}

fn to_f64(input: Input<'_>) -> Result<f64, FieldError> {
    match input {
        Input::Int(n) => Ok(n as f64),
        Input::Json(Json::Number(n)) => n
            .as_f64()
            .ok_or_else(|| FieldError::Invalid(format!("{n} is not a number"))),
        Input::Str(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| FieldError::Invalid(format!("`{}` is not a number", clip(s)))),
        other => Err(wrong("a number", other)),
    }
}

/// A Kafka timestamp (Unix milliseconds) as Unix microseconds, or `None`
/// when PostgreSQL's timestamptz cannot hold it (years outside 1..=9999; a
/// producer that sends microseconds as milliseconds lands there).
pub fn kafka_timestamp_micros(ms: i64) -> Option<i64> {
    ms.checked_mul(1000)
        .filter(|micros| (MIN_UNIX_MICROS..MAX_UNIX_MICROS).contains(micros))
}

/// Converts a timestamp to Unix microseconds. Numbers (and strings of
/// digits) are epoch values in `unit`; other strings are RFC 3339, or
/// `YYYY-MM-DD[ T]HH:MM:SS[.f]` without offset, read as UTC. Years outside
/// 1..=9999 are refused.
pub fn to_unix_micros(input: Input<'_>, unit: TimeUnit) -> Result<i64, FieldError> {
    let input = match input {
        Input::Json(Json::String(s)) => Input::Str(s),
        other => other,
    };
    let micros = match input {
        Input::UnixMicros(micros) => micros,
        Input::Int(n) => scale_epoch(n as f64, unit)?,
        Input::Json(Json::Number(n)) => {
            let value = match n.as_i64() {
                Some(i) => i as f64,
                None => n.as_f64().unwrap_or(f64::NAN),
            };
            if let Some(i) = n.as_i64() {
                scale_epoch_int(i, unit)?
            } else {
                scale_epoch(value, unit)?
            }
        }
        // Epoch digits, the common webhook form, read in one pass; the
        // same value `parse::<i64>` below gives them.
        Input::Str(s) if let Some(value) = epoch_digits(s) => scale_epoch_int(value, unit)?,
        Input::Str(s) => {
            let s = s.trim();
            let numeric = !s.is_empty()
                && s.trim_start_matches('-')
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b'.')
                && s.trim_start_matches('-')
                    .bytes()
                    .any(|b| b.is_ascii_digit());
            if numeric {
                match s.parse::<i64>() {
                    Ok(i) => scale_epoch_int(i, unit)?,
                    Err(_) => scale_epoch(
                        s.parse::<f64>().map_err(|_| {
                            FieldError::Invalid(format!("`{}` is not a timestamp", clip(s)))
                        })?,
                        unit,
                    )?,
                }
            } else {
                parse_timestamp_text(s)?
            }
        }
        other => return Err(wrong("a timestamp", other)),
    };
    if !(MIN_UNIX_MICROS..MAX_UNIX_MICROS).contains(&micros) {
        return Err(FieldError::OutOfRange(
            "timestamp outside years 1 to 9999".into(),
        ));
    }
    Ok(micros)
}

/// `s` as a number when it is nothing but 1 to 18 ASCII digits, which
/// always fit an i64.
fn epoch_digits(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 18 {
        return None;
    }
    s.bytes().try_fold(0i64, |n, digit| {
        digit
            .is_ascii_digit()
            .then(|| n * 10 + i64::from(digit - b'0'))
    })
}

fn scale_epoch_int(value: i64, unit: TimeUnit) -> Result<i64, FieldError> {
    let factor = match unit {
        TimeUnit::Seconds => 1_000_000,
        TimeUnit::Millis => 1_000,
        TimeUnit::Micros => 1,
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| FieldError::OutOfRange(format!("epoch value {value}")))
}

fn scale_epoch(value: f64, unit: TimeUnit) -> Result<i64, FieldError> {
    let factor = match unit {
        TimeUnit::Seconds => 1e6,
        TimeUnit::Millis => 1e3,
        TimeUnit::Micros => 1.0,
    };
    let micros = (value * factor).round();
    if !micros.is_finite() || micros.abs() >= 9.2e18 {
        return Err(FieldError::OutOfRange(format!("epoch value {value}")));
    }
    Ok(micros as i64)
}

fn parse_timestamp_text(s: &str) -> Result<i64, FieldError> {
    if let Ok(at) = DateTime::parse_from_rfc3339(s) {
        return Ok(at.timestamp_micros());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(at) = DateTime::parse_from_str(s, format) {
            return Ok(at.timestamp_micros());
        }
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(at) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(at.and_utc().timestamp_micros());
        }
    }
    Err(FieldError::Invalid(format!(
        "`{}` is not a timestamp",
        clip(s)
    )))
}

/// Encodes a decimal number (`-12.340`, `1e-3`) in numeric's binary form:
/// base-10000 digits with a weight, sign and display scale.
pub fn encode_numeric(buf: &mut BytesMut, text: &str) -> Result<(), FieldError> {
    let invalid = || FieldError::Invalid(format!("`{}` is not a number", clip(text)));
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (
            &unsigned[..at],
            unsigned[at + 1..].parse::<i32>().map_err(|_| invalid())?,
        ),
        None => (unsigned, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(invalid());
    }
    if exponent.abs() > 1000 {
        return Err(FieldError::OutOfRange(format!(
            "exponent of {}",
            clip(text)
        )));
    }
    // All digits, and the position of the decimal point within them.
    let digits: Vec<u8> = int_part
        .bytes()
        .chain(frac_part.bytes())
        .map(|b| b - b'0')
        .collect();
    let point = int_part.len() as i32 + exponent;
    let scale = (frac_part.len() as i32 - exponent).max(0) as u16;

    // Digit i stands for 10^(point - 1 - i). Base-10000 digit w holds the
    // decimal powers 4w..4w+3; gather every decimal digit into its group.
    let mut groups: Vec<i16> = Vec::new();
    let mut weight = 0;
    if !digits.is_empty() {
        let n = digits.len() as i32;
        let max_weight = (point - 1).div_euclid(4);
        let min_weight = (point - n).div_euclid(4);
        groups = vec![0; (max_weight - min_weight + 1) as usize];
        for (i, digit) in digits.iter().enumerate() {
            let power = point - 1 - i as i32;
            let group = (max_weight - power.div_euclid(4)) as usize;
            groups[group] += *digit as i16 * 10i16.pow(power.rem_euclid(4) as u32);
        }
        weight = max_weight;
        // Strip leading zero groups (each lowers the weight) and trailing ones.
        let leading = groups.iter().take_while(|g| **g == 0).count();
        groups.drain(..leading);
        weight -= leading as i32;
        while groups.last() == Some(&0) {
            groups.pop();
        }
        if groups.is_empty() {
            weight = 0;
        }
    }
    if groups.len() > i16::MAX as usize || weight.abs() > i16::MAX as i32 {
        return Err(FieldError::OutOfRange(format!("numeric {}", clip(text))));
    }
    put(buf, (groups.len() as i16).to_be_bytes());
    put(buf, (weight as i16).to_be_bytes());
    let sign: u16 = if negative && !groups.is_empty() {
        0x4000
    } else {
        0
    };
    put(buf, sign.to_be_bytes());
    put(buf, scale.to_be_bytes());
    for group in groups {
        put(buf, group.to_be_bytes());
    }
    Ok(())
}

thread_local! {
    /// Scratch space for writing JSON values.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn wrong(expected: &str, got: Input<'_>) -> FieldError {
    let got = match got {
        Input::Json(Json::Null) => "null",
        Input::Json(Json::Bool(_)) => "a boolean",
        Input::Json(Json::Number(_)) => "a number",
        Input::Json(Json::String(_)) | Input::Str(_) => "a string",
        Input::Json(Json::Array(_)) => "an array",
        Input::Json(Json::Object(_)) => "an object",
        Input::Bytes(_) => "bytes",
        Input::Int(_) => "an integer",
        Input::UnixMicros(_) => "a timestamp",
    };
    FieldError::WrongType(format!("expected {expected}, got {got}"))
}

/// At most 64 characters of untrusted text for an error message.
fn clip(s: &str) -> String {
    if s.chars().count() <= 64 {
        s.to_string()
    } else {
        s.chars().take(64).collect::<String>() + "..."
    }
}

/// Converts a JSON value given as the type's input where the type is text:
/// used by the table of input kinds for Kafka keys and headers.
pub fn textual(ty: &PgType) -> bool {
    ty.is_textual()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serde_json::json!`, as the decoder's borrowed [`Json`].
    macro_rules! json {
        ($($value:tt)+) => {
            Json::from(serde_json::json!($($value)+))
        };
    }

    fn encode(ty: &PgType, input: Input<'_>) -> Result<Vec<u8>, FieldError> {
        let mut buf = BytesMut::new();
        write_field(&mut buf, ty, input, TimeUnit::Seconds)?;
        let len = i32::from_be_bytes(buf[..4].try_into().unwrap());
        assert_eq!(len as usize, buf.len() - 4, "length prefix");
        Ok(buf[4..].to_vec())
    }

    fn numeric(text: &str) -> (i16, i16, u16, u16, Vec<i16>) {
        let mut buf = BytesMut::new();
        encode_numeric(&mut buf, text).unwrap();
        let word = |i: usize| i16::from_be_bytes([buf[i], buf[i + 1]]);
        let n = word(0);
        let digits = (0..n as usize).map(|k| word(8 + 2 * k)).collect();
        (n, word(2), word(4) as u16, word(6) as u16, digits)
    }

    #[test]
    fn numeric_groups_digits_in_base_10000() {
        assert_eq!(numeric("0"), (0, 0, 0, 0, vec![]));
        assert_eq!(numeric("1"), (1, 0, 0, 0, vec![1]));
        assert_eq!(numeric("12345.678"), (3, 1, 0, 3, vec![1, 2345, 6780]));
        assert_eq!(numeric("-0.0001"), (1, -1, 0x4000, 4, vec![1]));
        assert_eq!(numeric("10000"), (1, 1, 0, 0, vec![1]));
        assert_eq!(numeric("1.5e3"), (1, 0, 0, 0, vec![1500]));
        assert_eq!(numeric("0.00001234"), (1, -2, 0, 8, vec![1234]));
        assert_eq!(numeric("1e-3"), (1, -1, 0, 3, vec![10]));
        assert_eq!(numeric("-0"), (0, 0, 0, 0, vec![]));
    }

    #[test]
    fn key_and_header_bytes_are_text_when_utf8_and_refused_when_not() {
        // ASCII, the common case, and multi-byte UTF-8 both read as text.
        assert_eq!(
            encode(&PgType::Text, Input::Bytes(b"c-42")).unwrap(),
            b"c-42"
        );
        assert_eq!(
            encode(
                &PgType::Text,
                Input::Bytes("h\u{e9}llo \u{1f600}".as_bytes())
            )
            .unwrap(),
            "h\u{e9}llo \u{1f600}".as_bytes()
        );
        let id = "6f1f7a7e-1d2c-4b9a-8e3f-0a1b2c3d4e5f";
        assert_eq!(
            encode(&PgType::Uuid, Input::Bytes(id.as_bytes())).unwrap(),
            uuid::Uuid::parse_str(id).unwrap().as_bytes()
        );
        // Bytes that are not UTF-8: refused for text, kept for bytea.
        for bad in [&b"\xff\xfe"[..], b"ok \xc3", b"\xed\xa0\x80"] {
            let err = encode(&PgType::Text, Input::Bytes(bad)).unwrap_err();
            assert!(
                matches!(&err, FieldError::Invalid(reason) if reason.contains("not valid UTF-8")),
                "{err:?}"
            );
            assert_eq!(encode(&PgType::Bytea, Input::Bytes(bad)).unwrap(), bad);
        }
    }

    #[test]
    fn integers_check_their_range() {
        assert_eq!(
            encode(&PgType::Int2, Input::Json(&json!(7))).unwrap(),
            vec![0, 7]
        );
        assert!(matches!(
            encode(&PgType::Int2, Input::Json(&json!(70000))),
            Err(FieldError::OutOfRange(_))
        ));
        assert_eq!(
            encode(&PgType::Int4, Input::Str("42")).unwrap(),
            42i32.to_be_bytes()
        );
        assert!(matches!(
            encode(&PgType::Int8, Input::Json(&json!(1.5))),
            Err(FieldError::Invalid(_))
        ));
        assert!(matches!(
            encode(&PgType::Int8, Input::Json(&json!("x"))),
            Err(FieldError::Invalid(_))
        ));
        assert!(matches!(
            encode(&PgType::Int8, Input::Json(&json!({}))),
            Err(FieldError::WrongType(_))
        ));
    }

    #[test]
    fn timestamps_accept_epochs_and_rfc3339() {
        fn at(input: Input<'_>) -> i64 {
            i64::from_be_bytes(
                encode(&PgType::Timestamptz, input)
                    .unwrap()
                    .try_into()
                    .unwrap(),
            ) + PG_EPOCH_OFFSET_MICROS
        }
        let (whole, fractional) = (json!(1_700_000_000), json!(1_700_000_000.25));
        assert_eq!(at(Input::Json(&whole)), 1_700_000_000_000_000);
        assert_eq!(at(Input::Str("1700000000")), 1_700_000_000_000_000);
        assert_eq!(at(Input::Json(&fractional)), 1_700_000_000_250_000);
        assert_eq!(
            at(Input::Str("2023-11-14T22:13:20Z")),
            1_700_000_000_000_000
        );
        assert_eq!(at(Input::Str("2023-11-14 22:13:20")), 1_700_000_000_000_000);
        assert_eq!(
            at(Input::Str("2023-11-15T00:13:20+02:00")),
            1_700_000_000_000_000
        );
        assert!(encode(&PgType::Timestamptz, Input::Str("yesterday")).is_err());
        let quoted = json!("1700000000");
        assert_eq!(
            to_unix_micros(Input::Json(&quoted), TimeUnit::Seconds),
            Ok(1_700_000_000_000_000)
        );
        assert!(matches!(
            encode(&PgType::Timestamptz, Input::Str("99999999999999")),
            Err(FieldError::OutOfRange(_))
        ));
    }

    #[test]
    fn epoch_digits_read_what_parse_reads() {
        let mut texts: Vec<String> = ["0", "007", "1700000000", "999999999999999999"]
            .map(String::from)
            .to_vec();
        // Every length up to 19 digits, and every digit in every place.
        for len in 1..=19 {
            for digit in b'0'..=b'9' {
                texts.push(
                    (0..len)
                        .map(|i| (b'0' + (i * 7 + digit) % 10) as char)
                        .collect(),
                );
            }
        }
        for text in &texts {
            let read = epoch_digits(text);
            if text.len() <= 18 {
                assert_eq!(read, text.parse::<i64>().ok(), "{text}");
            } else {
                assert_eq!(read, None, "{text}");
            }
        }
        for other in ["", "-5", "+5", " 5", "5 ", "1.5", "1e3", "5a", "٣"] {
            assert_eq!(epoch_digits(other), None, "{other:?}");
        }
        // Those still read as before, by the general path.
        assert_eq!(
            to_unix_micros(Input::Str(" 5 "), TimeUnit::Seconds),
            Ok(5_000_000)
        );
        assert_eq!(
            to_unix_micros(Input::Str("-5"), TimeUnit::Millis),
            Ok(-5_000)
        );
        assert_eq!(
            to_unix_micros(Input::Str("1.5"), TimeUnit::Seconds),
            Ok(1_500_000)
        );
    }

    #[test]
    fn text_refuses_nul_and_checks_length() {
        assert_eq!(
            encode(&PgType::Text, Input::Str("olá")).unwrap(),
            "olá".as_bytes()
        );
        assert_eq!(
            encode(&PgType::Text, Input::Json(&json!(12))).unwrap(),
            b"12"
        );
        assert_eq!(
            encode(&PgType::Text, Input::Str("a\0b")),
            Err(FieldError::NulCharacter)
        );
        let short = PgType::BoundedText { max_chars: Some(3) };
        assert!(encode(&short, Input::Str("olá")).is_ok());
        assert!(matches!(
            encode(&short, Input::Str("olás")),
            Err(FieldError::TooLong(_))
        ));
    }

    #[test]
    fn jsonb_has_version_byte_and_refuses_nul() {
        let out = encode(&PgType::Jsonb, Input::Json(&json!({"a": [1, "x"]}))).unwrap();
        assert_eq!(out[0], 1);
        assert_eq!(&out[1..], br#"{"a":[1,"x"]}"#);
        assert_eq!(
            encode(&PgType::Jsonb, Input::Json(&json!({"a": "\u{0}"}))),
            Err(FieldError::NulCharacter)
        );
        // json (not jsonb) keeps the escape as text.
        assert!(encode(&PgType::Json, Input::Json(&json!({"a": "\u{0}"}))).is_ok());
    }

    #[test]
    fn jsonb_of_an_event_value_is_the_events_own_text() {
        let text = r#"{"a" : [1, "x", 1.50, {"b": "\u00e9"}], "nul": ["\u0000"]}"#;
        let doc = Json::parse(text).unwrap();
        let out = encode(&PgType::Jsonb, Input::Json(doc.get("a").unwrap())).unwrap();
        assert_eq!(out[0], 1, "jsonb binary format version");
        assert_eq!(&out[1..], br#"[1, "x", 1.50, {"b": "\u00e9"}]"#);
        // json (not jsonb) is written compact, as before.
        let out = encode(&PgType::Json, Input::Json(doc.get("a").unwrap())).unwrap();
        assert_eq!(&out[..], r#"[1,"x",1.5,{"b":"é"}]"#.as_bytes());
        // Holding U+0000, the value has no source text and is refused.
        assert_eq!(
            encode(&PgType::Jsonb, Input::Json(&doc)),
            Err(FieldError::NulCharacter)
        );
    }

    #[test]
    fn a_failed_field_leaves_the_buffer_unchanged() {
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert!(
            write_field(
                &mut buf,
                &PgType::Uuid,
                Input::Str("nope"),
                TimeUnit::Seconds
            )
            .is_err()
        );
        assert_eq!(&buf[..], b"abc");
    }
}
