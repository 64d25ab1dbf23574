//! A JSON document that borrows from the event's bytes.
//!
//! `serde_json::Value` allocates a `String` for every key and string and a
//! map node for every member, and frees them all again after the event; on a
//! webhook body that tree was the largest single cost of decoding (parse and
//! drop about a quarter of weir's CPU). [`Json`] is read by the very same
//! `serde_json` parser, so what is accepted and refused, the error texts and
//! the nesting limit are unchanged; only the tree differs:
//!
//! - strings and keys borrow from the input unless they hold escapes;
//! - an object is a vector of its members in document order. A key given
//!   twice reads as its last value, as in `serde_json`'s map and in
//!   PostgreSQL's `jsonb`.
//!
//! Serialising a [`Json`] writes the members in document order (with any
//! repeated key repeated), so a `json` column keeps the input's order.
//!
//! [`Json::parse`] reads with weir's own reader ([`read`]), which also keeps
//! each array's and object's source text, so a `jsonb` column can take the
//! input's own bytes instead of a re-serialisation. Whatever that reader
//! declines (any error, and the rare shapes it leaves to serde_json) is read
//! again by serde_json, whose verdict and error text stand; the decode fuzz
//! target checks that both readers agree on every input.

mod read;
mod wanted;

pub use wanted::{Wanted, Whole};

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

/// One JSON value; strings and keys borrow from the text it was read from.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Array<'a>),
    Object(Object<'a>),
}

/// The items of a JSON array, and its source text when it may be written
/// as it is (see [`Json::source_text`]). Derefs to the items.
#[derive(Debug, Clone, Default)]
pub struct Array<'a> {
    items: Vec<Json<'a>>,
    text: Option<&'a str>,
    /// Read by [`Json::parse_wanted`] for the wanted items only: the others
    /// are null placeholders, and it is never written from its items.
    partial: bool,
}

impl<'a> From<Vec<Json<'a>>> for Array<'a> {
    fn from(items: Vec<Json<'a>>) -> Self {
        Array {
            items,
            text: None,
            partial: false,
        }
    }
}

impl<'a> std::ops::Deref for Array<'a> {
    type Target = [Json<'a>];

    fn deref(&self) -> &[Json<'a>] {
        &self.items
    }
}

impl<'b, 'a> IntoIterator for &'b Array<'a> {
    type Item = &'b Json<'a>;
    type IntoIter = std::slice::Iter<'b, Json<'a>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

/// Equal values are equal whatever text they were read from.
impl PartialEq for Array<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.items == other.items
    }
}

/// The members of a JSON object, in document order, and its source text
/// when it may be written as it is (see [`Json::source_text`]).
#[derive(Debug, Clone, Default)]
pub struct Object<'a> {
    members: Vec<(Cow<'a, str>, Json<'a>)>,
    text: Option<&'a str>,
    /// Read by [`Json::parse_wanted`] with the wanted members only: it is
    /// never written from its members.
    partial: bool,
}

/// Equal values are equal whatever text they were read from.
impl PartialEq for Object<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.members == other.members
    }
}

impl<'a> Object<'a> {
    /// The value of `key`. Of a key given twice, the last one counts.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.members
            .iter()
            .rev()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value)
    }

    /// The members in document order (a repeated key appears each time).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        debug_assert!(!self.partial, "the members of a partial object were listed");
        self.members
            .iter()
            .map(|(key, value)| (key.as_ref(), value))
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl<'a> Json<'a> {
    /// Reads `text`, which must hold exactly one JSON value. What is
    /// accepted, the values read and the errors are `serde_json`'s,
    /// including its nesting limit of 128.
    pub fn parse(text: &'a str) -> Result<Json<'a>, serde_json::Error> {
        // weir's reader accepts only what serde_json accepts, and reads the
        // same values; anything it declines, serde_json decides.
        read::read(text, wanted::Want::All).or_else(|read::Declined| Json::parse_with_serde(text))
    }

    /// Reads `text` as [`Json::parse`] does (the same verdict and errors),
    /// but builds only what `wanted` names: every value on a wanted path,
    /// and the values read whole. Other members are left out, and other
    /// items of an array are null placeholders. A value read whole by
    /// `jsonb` only ([`Whole::Text`]) keeps its source text and is built
    /// only as far as wanted below it, unless it has no source text to
    /// give. Texts weir's reader declines are read whole by serde_json.
    pub fn parse_wanted(text: &'a str, wanted: &Wanted) -> Result<Json<'a>, serde_json::Error> {
        read::read(text, wanted.want()).or_else(|read::Declined| Json::parse_with_serde(text))
    }

    /// Reads `text` with `serde_json` alone: the reference [`Json::parse`]
    /// agrees with. Arrays and objects read this way keep no source text.
    pub fn parse_with_serde(text: &'a str) -> Result<Json<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The exact text this array or object was read from, when that text
    /// may be given to PostgreSQL's `jsonb` as it is: nothing inside holds
    /// U+0000 (which `jsonb` refuses) and every number is one `jsonb` reads
    /// as written (no exponent of four or more digits, at most 1,000
    /// characters). `None` for scalars, for values not read by
    /// [`Json::parse`], and for any other array or object.
    pub fn source_text(&self) -> Option<&'a str> {
        match self {
            Json::Array(array) => array.text,
            Json::Object(object) => object.text,
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Json<'a>]> {
        match self {
            Json::Array(array) => Some(array),
            _ => None,
        }
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(object) => object.get(key),
            _ => None,
        }
    }

    /// True when any string or key holds U+0000, which `jsonb` refuses.
    pub fn contains_nul(&self) -> bool {
        match self {
            Json::String(s) => s.contains('\0'),
            Json::Array(items) => items.iter().any(Json::contains_nul),
            Json::Object(object) => object
                .iter()
                .any(|(key, value)| key.contains('\0') || value.contains_nul()),
            _ => false,
        }
    }
}

/// A string or key holding U+0000, which `jsonb` refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldsNul;

impl Json<'_> {
    /// Appends the value's compact JSON text to `out`: the very bytes
    /// `serde_json::to_writer` writes (members in document order), without
    /// going through a serializer and an `io::Write` for every token. With
    /// `refuse_nul`, stops with [`HoldsNul`] at the first string or key
    /// holding U+0000; what was appended by then is partial, and the caller
    /// truncates it.
    pub fn write_compact(&self, out: &mut Vec<u8>, refuse_nul: bool) -> Result<(), HoldsNul> {
        match self {
            Json::Null => out.extend_from_slice(b"null"),
            Json::Bool(true) => out.extend_from_slice(b"true"),
            Json::Bool(false) => out.extend_from_slice(b"false"),
            Json::Number(n) => {
                if let Some(n) = n.as_u64() {
                    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                } else if let Some(n) = n.as_i64() {
                    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                } else {
                    // A float: serde_json's own formatting of it.
                    use std::io::Write as _;
                    // Writing into a Vec cannot fail.
                    let _ = write!(out, "{n}");
                }
            }
            Json::String(s) => write_string(out, s, refuse_nul)?,
            Json::Array(items) => {
                debug_assert!(!items.partial, "a partial array was written");
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write_compact(out, refuse_nul)?;
                }
                out.push(b']');
            }
            Json::Object(object) => {
                out.push(b'{');
                for (i, (key, value)) in object.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_string(out, key, refuse_nul)?;
                    out.push(b':');
                    value.write_compact(out, refuse_nul)?;
                }
                out.push(b'}');
            }
        }
        Ok(())
    }
}

/// How a byte is written inside a JSON string: 0 as itself, `u` as a
/// `\u00XX` escape, any other as a backslash and that letter. The same
/// choices as serde_json's compact formatter.
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

fn write_string(out: &mut Vec<u8>, s: &str, refuse_nul: bool) -> Result<(), HoldsNul> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run = 0;
    while let Some(at) = next_escape(bytes, run) {
        out.extend_from_slice(&bytes[run..at]);
        let byte = bytes[at];
        match ESCAPE[byte as usize] {
            b'u' => {
                if byte == 0 && refuse_nul {
                    return Err(HoldsNul);
                }
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(byte >> 4) as usize],
                    HEX[(byte & 0xf) as usize],
                ]);
            }
            escape => out.extend_from_slice(&[b'\\', escape]),
        }
        run = at + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
    Ok(())
}

/// Where the next byte at or after `from` that must be escaped is: a
/// quote, a backslash or a control character (below 0x20). Most strings
/// have none, and this scan was the largest share of reading JSON (39% of
/// the reader's instructions with eight bytes at a time). On x86-64, whose
/// every CPU has SSE2, sixteen bytes are checked at a time; the last few
/// bytes of the text, and other targets, go eight at a time.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn next_escape(bytes: &[u8], from: usize) -> Option<usize> {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let mut at = from;
    while let Some(chunk) = bytes.get(at..at + 16) {
        // SAFETY: SSE2 is part of the x86-64 baseline (every CPU this runs
        // on has it, and the build enables it everywhere), and `chunk` is
        // sixteen readable bytes for an unaligned load.
        let mask = unsafe {
            let block = _mm_loadu_si128(chunk.as_ptr().cast());
            // A byte is a control character when the unsigned maximum of
            // it and 0x1f is 0x1f (bytes 0x80 and up are above it, as they
            // must be: they belong to multi-byte characters).
            let control_max = _mm_set1_epi8(0x1f);
            let control = _mm_cmpeq_epi8(_mm_max_epu8(block, control_max), control_max);
            let quote = _mm_cmpeq_epi8(block, _mm_set1_epi8(b'"' as i8));
            let backslash = _mm_cmpeq_epi8(block, _mm_set1_epi8(b'\\' as i8));
            // One bit per byte, the first byte lowest.
            _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control)) as u32
        };
        if mask != 0 {
            return Some(at + mask.trailing_zeros() as usize);
        }
        at += 16;
    }
    next_escape_by_words(bytes, at)
}

#[cfg(not(target_arch = "x86_64"))]
fn next_escape(bytes: &[u8], from: usize) -> Option<usize> {
    next_escape_by_words(bytes, from)
}

/// [`next_escape`], eight bytes at a time: the first byte found is read
/// off the word's mask.
fn next_escape_by_words(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // The high bit of every zero byte of `word`. Bytes above the lowest
    // zero byte may be marked too (its borrow runs on), but none below it,
    // so the lowest marked byte is the first zero byte; `word`'s own high
    // bits are masked out.
    let zeros = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    let mut at = from;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        // Below 0x20: every byte minus 0x20 borrows into its high bit only
        // if it was below 0x20 (or 0x80 and up, masked out by `!word`); as
        // with `zeros`, the lowest marked byte is the first such byte.
        let found = (word.wrapping_sub(ONES * 0x20) & !word & HIGHS)
            | zeros(word ^ (ONES * b'"' as u64))
            | zeros(word ^ (ONES * b'\\' as u64));
        if found != 0 {
            // Little-endian: the lowest marked byte comes first in `bytes`.
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    bytes[at..]
        .iter()
        .position(|byte| ESCAPE[*byte as usize] != 0)
        .map(|offset| at + offset)
}

impl From<serde_json::Value> for Json<'static> {
    fn from(value: serde_json::Value) -> Self {
        match value {
            serde_json::Value::Null => Json::Null,
            serde_json::Value::Bool(b) => Json::Bool(b),
            serde_json::Value::Number(n) => Json::Number(n),
            serde_json::Value::String(s) => Json::String(Cow::Owned(s)),
            serde_json::Value::Array(items) => Json::Array(Array::from(
                items.into_iter().map(Json::from).collect::<Vec<_>>(),
            )),
            serde_json::Value::Object(map) => Json::Object(Object {
                members: map
                    .into_iter()
                    .map(|(key, value)| (Cow::Owned(key), Json::from(value)))
                    .collect(),
                text: None,
                partial: false,
            }),
        }
    }
}

impl fmt::Display for Json<'_> {
    /// Compact JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => serializer.serialize_unit(),
            Json::Bool(b) => serializer.serialize_bool(*b),
            Json::Number(n) => n.serialize(serializer),
            Json::String(s) => serializer.serialize_str(s),
            Json::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(object) => {
                let mut map = serializer.serialize_map(Some(object.len()))?;
                for (key, value) in object.iter() {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Json::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_f64<E>(self, x: f64) -> Result<Self::Value, E> {
        // As serde_json's own Value: a float JSON cannot carry is null.
        Ok(Number::from_f64(x).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(s)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        Json::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(Array::from(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(Key(key)) = map.next_key()? {
            members.push((key, map.next_value()?));
        }
        Ok(Json::Object(Object {
            members,
            text: None,
            partial: false,
        }))
    }
}

/// An object key, borrowed when it holds no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Key(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Key(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Key(Cow::Owned(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Texts whose reading must match serde_json's Value exactly: the same
    /// verdict, the same error text, the same values at every pointer.
    const TEXTS: &[&str] = &[
        r#"{"a":1,"b":[true,null,-2,3.5,1e3,18446744073709551615],"c":{"d":"e\u00e9\n"}}"#,
        r#"{"k":1,"k":2}"#,
        r#""\ud83d\ude00""#,
        r#""\ud800""#,
        r#"{"a":1,}"#,
        r#"[1,2"#,
        "{} x",
        "1e400",
        "-0",
        "\"tab\there\"",
        "",
    ];

    #[test]
    fn reads_exactly_what_serde_json_reads() {
        for text in TEXTS {
            let ours = Json::parse(text);
            let theirs = serde_json::from_str::<serde_json::Value>(text);
            match (&ours, &theirs) {
                (Ok(ours), Ok(theirs)) => {
                    // Written back and read by serde_json, ours is theirs.
                    let back: serde_json::Value = serde_json::from_str(&ours.to_string()).unwrap();
                    assert_eq!(&back, theirs, "{text}");
                }
                (Err(ours), Err(theirs)) => {
                    assert_eq!(ours.to_string(), theirs.to_string(), "{text}")
                }
                _ => panic!("`{text}`: ours {ours:?}, serde_json {theirs:?}"),
            }
        }
    }

    #[test]
    fn the_nesting_limit_is_serde_jsons() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let err = Json::parse(&deep).unwrap_err().to_string();
        assert!(err.contains("recursion limit"), "{err}");
        let fine = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(Json::parse(&fine).is_ok());
    }

    #[test]
    fn strings_borrow_unless_escaped_and_the_last_key_wins() {
        let text = r#"{"plain":"abc","esc\u0041":"x\ty","k":1,"k":2}"#;
        let doc = Json::parse(text).unwrap();
        let Json::Object(object) = &doc else {
            panic!("not an object")
        };
        let (key, value) = object.iter().next().unwrap();
        assert_eq!(key, "plain");
        assert!(matches!(value, Json::String(Cow::Borrowed("abc"))));
        assert_eq!(doc.get("escA").and_then(Json::as_str), Some("x\ty"));
        assert_eq!(doc.get("k").and_then(Json::as_i64), Some(2));
        // Written in document order, the repeated key kept.
        assert_eq!(
            doc.to_string(),
            r#"{"plain":"abc","escA":"x\ty","k":1,"k":2}"#
        );
    }

    #[test]
    fn compact_text_is_byte_for_byte_serde_jsons() {
        let mut texts: Vec<String> = TEXTS.iter().map(|t| t.to_string()).collect();
        texts.extend([
            r#"{"ctl":"\u0001\u001f\b\f\n\r\t\"\\/\u007f","é":"\u00e9 ü 😀"}"#.to_string(),
            r#"[0.1,-0.0,1e-7,123456789012345678901234567890,-9223372036854775808,2.5e300]"#
                .to_string(),
            r#"{"a":{},"b":[],"c":[[]],"d":{"e":{"f":null}},"":""}"#.to_string(),
            r#"{"nul":"a\u0000b","k":1,"k":true}"#.to_string(),
        ]);
        for text in &texts {
            let Ok(doc) = Json::parse(text) else { continue };
            let mut ours = b"prefix".to_vec();
            doc.write_compact(&mut ours, false).unwrap();
            let theirs = serde_json::to_vec(&doc).unwrap();
            assert_eq!(&ours[6..], &theirs[..], "{text}");
            assert_eq!(
                doc.write_compact(&mut Vec::new(), true).is_err(),
                doc.contains_nul(),
                "{text}"
            );
        }
    }

    #[test]
    fn strings_are_escaped_wherever_the_byte_falls_in_a_word() {
        // Each escaped byte at every position of a 24-byte string, beside
        // multi-byte characters, so the eight-byte scan meets it at every
        // offset within a word (and in the tail after the last word).
        for special in ['\u{0}', '\u{1f}', '"', '\\', '\n', '\u{7f}', 'é', ' ', '~'] {
            for at in 0..24 {
                let mut text: Vec<char> = "abcdefghijklmnopqrstuvwx".chars().collect();
                text[at] = special;
                let text: String = text.into_iter().collect();
                let doc = Json::String(Cow::Borrowed(&text));
                let mut ours = Vec::new();
                doc.write_compact(&mut ours, false).unwrap();
                assert_eq!(ours, serde_json::to_vec(&text).unwrap(), "{text:?}");
                assert_eq!(
                    doc.write_compact(&mut Vec::new(), true).is_err(),
                    special == '\u{0}'
                );
            }
        }
    }

    /// Texts at the edges of weir's reader: each must read exactly as
    /// serde_json reads it, whether the reader accepts it or declines it.
    const EDGES: &[&str] = &[
        "-0",
        "0.0",
        "-9223372036854775808",
        "-9223372036854775809",
        "9999999999999999999",
        "18446744073709551615",
        "18446744073709551616",
        "1E2",
        "1e+2",
        "1e-400",
        "1e-1000",
        "01",
        "-",
        "1.",
        ".5",
        "1e",
        "1e+",
        "-01",
        r#""\u00e9\u00E9""#,
        r#""\ud83d\ude00""#,
        r#""\ude00""#,
        r#""\ud800\u0041""#,
        r#""\ud800x""#,
        r#""\u12""#,
        r#""\x""#,
        "\"a\u{1}b\"",
        "\"a\u{7f}b\"",
        r#""\/\b\f\n\r\t\"\\""#,
        " \t\r\n[ 1 , { \"a\" : [ ] } ] \n",
        "[1,]",
        "[1 2]",
        r#"{"a" 1}"#,
        r#"{"a":1,}"#,
        "{1:2}",
        "{\"a\":1",
        "nul",
        "truex",
        "true false",
        "[\"unterminated",
        "\u{feff}1",
    ];

    #[test]
    fn weirs_reader_reads_what_serde_json_reads() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let (at_limit, past_limit, past_serde) = (deep(100), deep(101), deep(129));
        let mut texts: Vec<&str> = EDGES.iter().chain(TEXTS).copied().collect();
        texts.extend([at_limit.as_str(), past_limit.as_str(), past_serde.as_str()]);
        let mut accepted = 0;
        for text in texts {
            let theirs = Json::parse_with_serde(text);
            if let Ok(ours) = read::read(text, wanted::Want::All) {
                accepted += 1;
                assert_eq!(Some(&ours), theirs.as_ref().ok(), "{text}");
            }
            match (Json::parse(text), theirs) {
                (Ok(ours), Ok(theirs)) => assert_eq!(ours, theirs, "{text}"),
                (Err(ours), Err(theirs)) => {
                    assert_eq!(ours.to_string(), theirs.to_string(), "{text}")
                }
                (ours, theirs) => panic!("`{text}`: ours {ours:?}, serde_json {theirs:?}"),
            }
        }
        assert!(accepted >= 20, "the reader itself read {accepted} texts");
        assert_eq!(
            read::read(&past_limit, wanted::Want::All),
            Err(read::Declined)
        );
    }

    /// Pointers a mapping might read, and how: members, items by index and
    /// by `*`, values read whole and as `jsonb` text.
    const WANTED: &[(&str, Whole)] = &[
        ("/a", Whole::Value),
        ("/b/1", Whole::Text),
        ("/c", Whole::Text),
        ("/c/d", Whole::Value),
        ("/k", Whole::Value),
        ("/entry/*/changes/*/value/messages/*", Whole::Text),
        ("/entry/*/changes/*/value/messages/*/id", Whole::Value),
        (
            "/entry/*/changes/*/value/statuses/*/errors/0/code",
            Whole::Value,
        ),
        ("/entry/0/id", Whole::Value),
    ];

    /// [`Json::parse_wanted`] with [`WANTED`] against serde_json's reading
    /// of `text` (`theirs`): the same verdict and error text, the same value
    /// wherever a value is read whole, and for `jsonb` text either the text
    /// the whole reading keeps or, without one, the whole value.
    fn agrees_when_wanted_in_part(text: &str, theirs: &Result<Json<'_>, serde_json::Error>) {
        use crate::decode::pointer::Pointer;
        let mut wanted = Wanted::default();
        let pointers: Vec<(Pointer, Whole)> = WANTED
            .iter()
            .map(|(text, how)| (Pointer::parse(text).unwrap(), *how))
            .collect();
        for (pointer, how) in &pointers {
            pointer.wanted(&mut wanted).read_whole(*how);
        }
        wanted.settle();
        let (part, whole) = match (Json::parse_wanted(text, &wanted), theirs) {
            (Ok(part), Ok(_)) => (part, Json::parse(text).unwrap()),
            (Err(ours), Err(theirs)) => {
                return assert_eq!(ours.to_string(), theirs.to_string(), "{text}");
            }
            (ours, theirs) => panic!("`{text}`: wanted {ours:?}, serde_json {theirs:?}"),
        };
        for (pointer, how) in &pointers {
            let mut found = Vec::new();
            pointer.for_each_match(&part, &mut |value, _| found.push(value));
            let mut expected = Vec::new();
            pointer.for_each_match(&whole, &mut |value, _| expected.push(value));
            assert_eq!(
                found.len(),
                expected.len(),
                "{text} at {}",
                pointer.as_str()
            );
            for (found, expected) in found.into_iter().zip(expected) {
                match (how, expected.source_text()) {
                    (Whole::Text, Some(source)) => {
                        assert_eq!(found.source_text(), Some(source), "{text}")
                    }
                    _ => assert_eq!(found, expected, "{text} at {}", pointer.as_str()),
                }
            }
        }
    }

    /// Only the wanted parts are built; what no pointer reads is left out
    /// (members) or held by a null (items), and is still read through.
    #[test]
    fn only_the_wanted_parts_are_built() {
        use crate::decode::pointer::Pointer;
        let text = r#"{"a": {"x": 1, "y": [2, 3]}, "b": [{"p": 1}, {"q": "\u0000"}, 7], "c": {"d": [1], "e": {"f": 1.5}}, "z": "\u0000"}"#;
        let mut wanted = Wanted::default();
        for (pointer, how) in [
            ("/a/x", Whole::Value),
            ("/b/1", Whole::Text),
            ("/c", Whole::Text),
        ] {
            Pointer::parse(pointer)
                .unwrap()
                .wanted(&mut wanted)
                .read_whole(how);
        }
        wanted.settle();
        let part = Json::parse_wanted(text, &wanted).unwrap();
        let Json::Object(root) = &part else {
            panic!("an object")
        };
        let keys: Vec<&str> = root.members.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, ["a", "b", "c"], "`z` is not wanted");
        assert!(root.partial && root.text.is_none(), "not read whole");
        let Some(Json::Object(a)) = part.get("a") else {
            panic!("`a`")
        };
        assert_eq!(a.members.len(), 1, "only `x` of `a`");
        let b = part.get("b").unwrap().as_array().unwrap();
        assert_eq!(b.len(), 3, "every item has its place");
        assert_eq!(
            (&b[0], &b[2]),
            (&Json::Null, &Json::Null),
            "items no pointer reads"
        );
        // `/b/1` holds U+0000, so it has no text to give: built whole.
        assert_eq!(b[1], Json::parse(r#"{"q": "\u0000"}"#).unwrap());
        // `/c` gives its text, and nothing below it is built.
        let c = part.get("c").unwrap();
        assert_eq!(c.source_text(), Some(r#"{"d": [1], "e": {"f": 1.5}}"#));
        assert!(matches!(c, Json::Object(c) if c.members.is_empty() && c.partial));
        // The verdict is the whole text's, wherever the error is.
        let bad = r#"{"a": {"x": 1}, "z": [1, "\u12"]}"#;
        assert_eq!(
            Json::parse_wanted(bad, &wanted).unwrap_err().to_string(),
            Json::parse_with_serde(bad).unwrap_err().to_string()
        );
        for text in EDGES.iter().chain(TEXTS) {
            agrees_when_wanted_in_part(text, &Json::parse_with_serde(text));
        }
    }

    /// The fuzz target's reader check, run by the test suite: the fuzz
    /// seeds and the texts above, mutated the ways that reach the reader's
    /// edges (escapes, surrogates, numbers, structure), read by both readers.
    #[test]
    fn weirs_reader_agrees_with_serde_json_on_mutated_texts() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};

        const TOKENS: &[&str] = &[
            "\\u0000",
            "\\ud800",
            "\\udc00",
            "\\ud83d\\ude00",
            "\\u00e9",
            "\\",
            "\"",
            ",",
            ":",
            "[",
            "]",
            "{",
            "}",
            "-0",
            "1e5",
            "1E-400",
            ".5",
            "18446744073709551616",
            "-9223372036854775809",
            " ",
            "\n",
            "\u{1}",
            "\u{7f}",
            "é",
            "null",
            "tru",
            "0",
        ];
        let seeds_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/seeds/decode");
        let mut seeds: Vec<String> = std::fs::read_dir(seeds_dir)
            .unwrap()
            .map(|entry| {
                let bytes = std::fs::read(entry.unwrap().path()).unwrap();
                // A fuzz input's first byte picks topic and header.
                String::from_utf8(bytes[1..].to_vec()).unwrap()
            })
            .collect();
        assert!(seeds.len() >= 3, "fuzz seeds in {seeds_dir}");
        seeds.extend(EDGES.iter().chain(TEXTS).map(|t| t.to_string()));

        let mut rng = StdRng::seed_from_u64(0x5eed);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let mut text = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..=3) {
                let mut at = rng.random_range(0..=text.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                match rng.random_range(0..3) {
                    0 => text.insert_str(at, TOKENS[rng.random_range(0..TOKENS.len())]),
                    1 => {
                        let mut end = (at + rng.random_range(1..4)).min(text.len());
                        while !text.is_char_boundary(end) {
                            end += 1;
                        }
                        text.replace_range(at..end, "");
                    }
                    _ => text.truncate(at),
                }
            }
            let ours = Json::parse(&text);
            let theirs = Json::parse_with_serde(&text);
            agrees_when_wanted_in_part(&text, &theirs);
            match (&ours, &theirs) {
                (Ok(ours), Ok(theirs)) => {
                    accepted += 1;
                    assert_eq!(ours, theirs, "{text}");
                }
                (Err(ours), Err(theirs)) => {
                    refused += 1;
                    assert_eq!(ours.to_string(), theirs.to_string(), "{text}")
                }
                _ => panic!("`{text}`: ours {ours:?}, serde_json {theirs:?}"),
            }
        }
        // Both verdicts are exercised, not only one.
        assert!(
            accepted > 1_000 && refused > 1_000,
            "{accepted} read, {refused} refused"
        );
    }

    #[test]
    fn arrays_and_objects_keep_their_text_unless_jsonb_would_read_it_otherwise() {
        let text = r#" {"a": [1, {"b": "x\\u0000"}], "n": {"z": "a\u0000"}, "e": [1.5e10, 2E-300], "big": [1e-1000]} "#;
        let doc = Json::parse(text).unwrap();
        let source = |pointer: &str| {
            let pointer = crate::decode::pointer::Pointer::parse(pointer).unwrap();
            pointer.get(&doc).unwrap().source_text()
        };
        assert_eq!(
            source("/a"),
            Some(r#"[1, {"b": "x\\u0000"}]"#),
            "escaped backslash"
        );
        assert_eq!(source("/e"), Some("[1.5e10, 2E-300]"));
        assert_eq!(source("/n"), None, "holds U+0000");
        assert_eq!(source("/big"), None, "a four-digit exponent");
        assert_eq!(source(""), None, "holds what its members hold");
        assert_eq!(source("/a/0"), None, "scalars are written by weir");
        let plain = Json::parse(r#"  {"a" : [ true ,null] }"#).unwrap();
        assert_eq!(plain.source_text(), Some(r#"{"a" : [ true ,null] }"#));
        // Read by serde_json alone, nothing keeps its text.
        assert_eq!(Json::parse_with_serde("[1]").unwrap().source_text(), None);
    }

    /// The word-at-a-time search finds the same first byte as a byte-by-byte
    /// one, wherever it sits, whatever comes after it (a zero or control
    /// byte's borrow marks the bytes above it too) and whatever the bytes
    /// before it are.
    #[test]
    fn the_first_byte_to_escape_is_found_wherever_it_is() {
        const BYTES: &[u8] = &[
            0x00, 0x01, 0x1f, 0x20, 0x21, b'"', 0x23, b'\\', 0x5d, 0x7f, 0x80, 0x9f, 0xa0, 0xff,
        ];
        let slow = |bytes: &[u8], from: usize| {
            (from..bytes.len()).find(|&at| ESCAPE[bytes[at] as usize] != 0)
        };
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // Up to four sixteen-byte blocks and a tail of any length.
        for len in 0..72 {
            for _ in 0..200 {
                // Mostly plain letters, so the first hit falls anywhere.
                let bytes: Vec<u8> = (0..len)
                    .map(|_| match next() % 8 {
                        0 => BYTES[(next() % BYTES.len() as u64) as usize],
                        _ => b'a' + (next() % 26) as u8,
                    })
                    .collect();
                for from in 0..=len {
                    let expected = slow(&bytes, from);
                    assert_eq!(next_escape(&bytes, from), expected, "{bytes:?} from {from}");
                    assert_eq!(
                        next_escape_by_words(&bytes, from),
                        expected,
                        "words: {bytes:?} from {from}"
                    );
                }
            }
        }
    }

    #[test]
    fn nul_is_found_in_strings_and_keys() {
        assert!(Json::parse(r#"{"a":["\u0000"]}"#).unwrap().contains_nul());
        assert!(Json::parse(r#"{"\u0000":1}"#).unwrap().contains_nul());
        assert!(!Json::parse(r#"{"a":"\\u0000"}"#).unwrap().contains_nul());
    }
}
