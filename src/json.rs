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
    Array(Vec<Json<'a>>),
    Object(Object<'a>),
}

/// The members of a JSON object, in document order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

impl<'a> Object<'a> {
    /// The value of `key`. Of a key given twice, the last one counts.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.0
            .iter()
            .rev()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value)
    }

    /// The members in document order (a repeated key appears each time).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        self.0.iter().map(|(key, value)| (key.as_ref(), value))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> Json<'a> {
    /// Reads `text`, which must hold exactly one JSON value. Errors are
    /// `serde_json`'s, including its nesting limit of 128.
    pub fn parse(text: &'a str) -> Result<Json<'a>, serde_json::Error> {
        serde_json::from_str(text)
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
            Json::Array(items) => Some(items),
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

impl From<serde_json::Value> for Json<'static> {
    fn from(value: serde_json::Value) -> Self {
        match value {
            serde_json::Value::Null => Json::Null,
            serde_json::Value::Bool(b) => Json::Bool(b),
            serde_json::Value::Number(n) => Json::Number(n),
            serde_json::Value::String(s) => Json::String(Cow::Owned(s)),
            serde_json::Value::Array(items) => {
                Json::Array(items.into_iter().map(Json::from).collect())
            }
            serde_json::Value::Object(map) => Json::Object(Object(
                map.into_iter()
                    .map(|(key, value)| (Cow::Owned(key), Json::from(value)))
                    .collect(),
            )),
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
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(Key(key)) = map.next_key()? {
            members.push((key, map.next_value()?));
        }
        Ok(Json::Object(Object(members)))
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
    fn nul_is_found_in_strings_and_keys() {
        assert!(Json::parse(r#"{"a":["\u0000"]}"#).unwrap().contains_nul());
        assert!(Json::parse(r#"{"\u0000":1}"#).unwrap().contains_nul());
        assert!(!Json::parse(r#"{"a":"\\u0000"}"#).unwrap().contains_nul());
    }
}
