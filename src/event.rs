//! What flows through weir: a Kafka message ([`Event`]) as weir keeps it
//! until its batch commits, and why an event (or one item of it) was not
//! written ([`DeadLetter`], [`Stage`]).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

/// A Kafka message as weir keeps it until its batch commits.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch (create or log-append time).
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub headers: Headers,
    pub payload: Bytes,
}

impl Event {
    /// The value of the first header named `name`, when it has one.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name)
    }

    /// Bytes this event holds (for the in-flight memory budget).
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self.headers.packed_len()
            + 64
    }
}

/// A message's Kafka headers, in order, packed into one buffer and read in
/// place.
///
/// The consumer copies every message out of librdkafka. Kept as a vector
/// of (name, value) pairs, headers cost a vector and a reference count per
/// name for each message, allocated on the consumer thread and freed on a
/// writer's: 5.3% of weir's CPU samples in a 1-writer drain of the bench's
/// webhooks. Packed, they are one more copy into the consumer's arena.
///
/// Layout, per header: the name's length (u32, little-endian), the name
/// (UTF-8), the value's length (u32, little-endian; [`Headers::NULL`] for a
/// header without a value), the value. Only [`Headers::pack`] writes it, so
/// every name is whole UTF-8 (a name that was not is written lossily) and
/// every length fits what follows.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    packed: Bytes,
}

/// A header name's bytes as [`Headers`] keeps them: as they are when they
/// are UTF-8, as nearly every name is, and lossily otherwise. The word-wise
/// ASCII check settles nearly every name; counted, `from_utf8_lossy` and
/// `from_utf8` each took about 90 instructions for a short name.
fn utf8_name(name: &[u8]) -> Cow<'_, [u8]> {
    if name.is_ascii() || std::str::from_utf8(name).is_ok() {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(String::from_utf8_lossy(name).into_owned().into_bytes())
    }
}

impl Headers {
    /// The length that marks a header without a value. A Kafka record's
    /// lengths are signed 32-bit, so no value is this long.
    const NULL: u32 = u32::MAX;

    /// Packs `pairs` into `scratch` (cleared first) and keeps the packed
    /// bytes as `store` copies them: the consumer's arena, or a fresh
    /// buffer. No headers keep nothing and call `store` not at all.
    ///
    /// Names come as bytes, as Kafka carries them. The protocol calls them
    /// strings, but a client writing raw bytes can send any: a name that
    /// is not UTF-8 is kept lossily, each bad sequence as U+FFFD (as the
    /// dead-letter table stores a NUL in a name), and its value as it is.
    pub fn pack<'a>(
        pairs: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        scratch: &mut Vec<u8>,
        store: impl FnOnce(&[u8]) -> Bytes,
    ) -> Headers {
        scratch.clear();
        for (name, value) in pairs {
            let name = utf8_name(name);
            scratch.extend_from_slice(&length(name.len()).to_le_bytes());
            scratch.extend_from_slice(&name);
            match value {
                Some(value) => {
                    scratch.extend_from_slice(&length(value.len()).to_le_bytes());
                    scratch.extend_from_slice(value);
                }
                None => scratch.extend_from_slice(&Self::NULL.to_le_bytes()),
            }
        }
        if scratch.is_empty() {
            return Headers::default();
        }
        Headers {
            packed: store(scratch),
        }
    }

    /// Headers from owned pairs, in a buffer of their own (tests, replay).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>) -> Headers {
        let pairs = pairs
            .into_iter()
            .map(|(name, value)| (name.as_bytes(), value));
        Headers::pack(pairs, &mut Vec::new(), Bytes::copy_from_slice)
    }

    /// Each header's name and value, in the order the message carries them.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        // `pack` wrote every name as UTF-8 (lossily where it was not), so
        // none fails the check; a failure would end the headers rather than
        // read a broken name.
        self.entries()
            .map_while(|(name, value)| Some((std::str::from_utf8(name).ok()?, value)))
    }

    /// The value of the first header named `name`, when it has one (as
    /// before: a first `name` without a value hides any later one). Read
    /// for every row a header feeds, so names are compared as bytes,
    /// without checking each one's UTF-8 on the way.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries()
            .find(|(key, _)| *key == name.as_bytes())
            .and_then(|(_, value)| value)
    }

    /// The packed headers' names (as bytes) and values, in order.
    fn entries(&self) -> Entries<'_> {
        Entries { rest: &self.packed }
    }

    pub fn is_empty(&self) -> bool {
        self.packed.is_empty()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Bytes the packed headers take.
    pub fn packed_len(&self) -> usize {
        self.packed.len()
    }
}

/// A length as the packed layout stores it. Kafka's lengths are signed
/// 32-bit, so a header longer than that never reaches weir.
fn length(len: usize) -> u32 {
    u32::try_from(len)
        .ok()
        .filter(|len| *len != Headers::NULL)
        .expect("a Kafka header's name and value are shorter than 2 GiB")
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(name, value)| (name, value.map(String::from_utf8_lossy))),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_back_in_order_with_names_values_and_nulls_intact() {
        let wide = vec![7u8; 70_000];
        let pairs: Vec<(&str, Option<&[u8]>)> = vec![
            ("company_id", Some(b"6f1f7a7e")),
            ("", Some(b"unnamed")),
            ("no-value", None),
            ("empty-value", Some(b"")),
            ("n\u{e4}me \u{1f600}", Some(&[0xff, 0x00, 0xfe])),
            ("wide", Some(&wide)),
            ("company_id", Some(b"second")),
        ];
        let mut stored = 0;
        let as_bytes = pairs.iter().map(|(name, value)| (name.as_bytes(), *value));
        let headers = Headers::pack(as_bytes, &mut vec![1, 2, 3], |packed| {
            stored += 1;
            Bytes::copy_from_slice(packed)
        });
        assert_eq!(stored, 1, "packed headers are stored in one copy");
        assert_eq!(headers.iter().collect::<Vec<_>>(), pairs);
        assert_eq!(headers.len(), pairs.len());

        // The first header of a name wins; a header without a value has
        // none to give, and an empty value is not a missing one.
        assert_eq!(headers.get("company_id"), Some(&b"6f1f7a7e"[..]));
        assert_eq!(headers.get("no-value"), None);
        assert_eq!(headers.get("empty-value"), Some(&b""[..]));
        assert_eq!(
            headers.get("n\u{e4}me \u{1f600}"),
            Some(&[0xff, 0x00, 0xfe][..])
        );
        assert_eq!(headers.get("missing"), None);
        assert_eq!(headers.get("company"), None);
        assert!(!headers.is_empty());

        // A name that is not UTF-8 is kept lossily, its value as it is,
        // and the headers after it are still read.
        let odd = Headers::pack(
            [
                (&b"x-\xff\xfename"[..], Some(&b"kept"[..])),
                (&b"trace"[..], None),
            ],
            &mut Vec::new(),
            Bytes::copy_from_slice,
        );
        assert_eq!(
            odd.iter().collect::<Vec<_>>(),
            [
                ("x-\u{fffd}\u{fffd}name", Some(&b"kept"[..])),
                ("trace", None)
            ]
        );
        assert_eq!(odd.get("x-\u{fffd}\u{fffd}name"), Some(&b"kept"[..]));

        // No headers: nothing stored, nothing read.
        let none = Headers::pack([], &mut Vec::new(), |_| unreachable!("nothing to store"));
        assert!(none.is_empty());
        assert_eq!(none.iter().count(), 0);
        assert_eq!(none.packed_len(), 0);
        assert_eq!(none, Headers::default());
    }
}

/// The packed headers of one message: see [`Headers::entries`].
struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Entries<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.rest.split_at_checked(len)?;
        self.rest = rest;
        Some(taken)
    }

    fn length(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        // `pack` wrote every length, so none of these fails; a failure
        // would end the headers rather than read past them.
        let name_len = self.length()? as usize;
        let name = self.take(name_len)?;
        let value = match self.length()? {
            Headers::NULL => None,
            len => Some(self.take(len as usize)?),
        };
        Some((name, value))
    }
}

/// Where processing gave up on an event or item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Decode,
    Validate,
    Route,
    Write,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Validate => "validate",
            Stage::Route => "route",
            Stage::Write => "write",
        }
    }

    pub fn parse(text: &str) -> Option<Stage> {
        Some(match text {
            "decode" => Stage::Decode,
            "validate" => Stage::Validate,
            "route" => Stage::Route,
            "write" => Stage::Write,
            _ => return None,
        })
    }
}

/// An event (or one item of it) that will not be written to its table.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Index of the event in the batch's `messages`.
    pub message: u32,
    /// The target table, when the failure concerns one.
    pub table: Option<Arc<str>>,
    /// Position of the item among the event's items for that table.
    pub item: Option<u32>,
    /// JSON pointer of the item within the event.
    pub item_path: Option<String>,
    pub stage: Stage,
    /// Low-cardinality reason code (`missing_required`, `23505`, ...).
    pub code: Cow<'static, str>,
    /// Human-readable detail (never the payload itself).
    pub detail: String,
}
