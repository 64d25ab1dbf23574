//! JSON pointers (RFC 6901) with one extension: a `*` token steps into every
//! element of an array.
//!
//! A pointer with wildcards is used two ways. As an *explode path* it
//! enumerates items (`/entry/*/changes/*/value/messages/*` yields every
//! message of a webhook body, with the array index taken at each `*`). As an
//! *event pointer* its wildcards are *bound* to an item's indices, so
//! `/entry/*/changes/*/value/metadata` reaches the envelope of that very item.

use smallvec::SmallVec;

use crate::json::{Json, Wanted};

/// The array index taken at each `*` of a match. Held inline: webhook
/// explode paths have up to three wildcards, and a vector per exploded
/// item was one allocation and free per row.
pub type Indices = SmallVec<[u32; 4]>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An object key; `index` is set when the key is also a valid array index.
    Key { key: String, index: Option<usize> },
    /// `*`: every element of an array.
    Wildcard,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    tokens: Vec<Token>,
}

impl Pointer {
    /// Parses `""` (the whole value) or `/a/b/0/*`. `~0` and `~1` escape `~`
    /// and `/` as in RFC 6901.
    pub fn parse(text: &str) -> Result<Pointer, String> {
        if text.is_empty() {
            return Ok(Pointer {
                text: String::new(),
                tokens: Vec::new(),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "`{text}` is not a JSON pointer: it must be empty or start with `/`"
            ));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            if raw == "*" {
                tokens.push(Token::Wildcard);
                continue;
            }
            let key = unescape(raw).ok_or_else(|| {
                format!("`{text}`: `~` must be followed by 0 or 1 (RFC 6901 escapes)")
            })?;
            let index = array_index(&key);
            tokens.push(Token::Key { key, index });
        }
        Ok(Pointer {
            text: text.to_string(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Number of `*` tokens.
    pub fn wildcards(&self) -> usize {
        self.tokens
            .iter()
            .filter(|t| matches!(t, Token::Wildcard))
            .count()
    }

    /// The tokens up to and including the last wildcard, as text: two
    /// pointers whose wildcards bind the same way share this prefix.
    pub fn wildcard_prefix(&self) -> Option<String> {
        let last = self
            .tokens
            .iter()
            .rposition(|t| matches!(t, Token::Wildcard))?;
        Some(render(&self.tokens[..=last]))
    }

    /// The value at this pointer, with the k-th wildcard bound to
    /// `indices[k]`. A wildcard without an index, or a path that does not
    /// exist, gives `None`.
    pub fn get_bound<'v>(&self, root: &'v Json<'v>, indices: &[u32]) -> Option<&'v Json<'v>> {
        let mut current = root;
        let mut bound = indices.iter();
        for token in &self.tokens {
            current = match token {
                Token::Key { key, index } => match current {
                    Json::Object(members) => members.get(key)?,
                    Json::Array(items) => items.get((*index)?)?,
                    _ => return None,
                },
                Token::Wildcard => {
                    let at = *bound.next()? as usize;
                    current.as_array()?.get(at)?
                }
            };
        }
        Some(current)
    }

    /// The value at this pointer, which has no wildcards.
    pub fn get<'v>(&self, root: &'v Json<'v>) -> Option<&'v Json<'v>> {
        self.get_bound(root, &[])
    }

    /// Calls `found(item, indices)` for every value this pointer reaches, in
    /// document order; `indices` holds the array index taken at each `*`.
    pub fn for_each_match<'v>(
        &self,
        root: &'v Json<'v>,
        found: &mut dyn FnMut(&'v Json<'v>, &[u32]),
    ) {
        let mut indices = Indices::new();
        walk(&self.tokens, root, &mut indices, found);
    }

    /// The part of `wanted` this pointer reaches, added if new; a `*`
    /// wants every item of an array.
    pub fn wanted<'w>(&self, wanted: &'w mut Wanted) -> &'w mut Wanted {
        self.tokens
            .iter()
            .fold(wanted, |wanted, token| match token {
                Token::Key { key, index } => wanted.member(key, *index),
                Token::Wildcard => wanted.items(),
            })
    }

    /// The concrete pointer of a match: wildcards replaced by `indices`.
    pub fn concrete(&self, indices: &[u32]) -> String {
        let mut out = String::new();
        let mut bound = indices.iter();
        for token in &self.tokens {
            out.push('/');
            match token {
                Token::Key { key, .. } => out.push_str(&escape(key)),
                Token::Wildcard => match bound.next() {
                    Some(index) => out.push_str(&index.to_string()),
                    None => out.push('*'),
                },
            }
        }
        out
    }
}

fn walk<'v>(
    tokens: &[Token],
    current: &'v Json<'v>,
    indices: &mut Indices,
    found: &mut dyn FnMut(&'v Json<'v>, &[u32]),
) {
    let Some((token, rest)) = tokens.split_first() else {
        found(current, indices);
        return;
    };
    match token {
        Token::Key { key, index } => {
            let next = match current {
                Json::Object(members) => members.get(key),
                Json::Array(items) => index.and_then(|i| items.get(i)),
                _ => None,
            };
            if let Some(next) = next {
                walk(rest, next, indices, found);
            }
        }
        Token::Wildcard => {
            if let Json::Array(items) = current {
                for (i, item) in items.iter().enumerate() {
                    indices.push(i as u32);
                    walk(rest, item, indices, found);
                    indices.pop();
                }
            }
        }
    }
}

fn unescape(raw: &str) -> Option<String> {
    if !raw.contains('~') {
        return Some(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn render(tokens: &[Token]) -> String {
    let mut out = String::new();
    for token in tokens {
        out.push('/');
        match token {
            Token::Key { key, .. } => out.push_str(&escape(key)),
            Token::Wildcard => out.push('*'),
        }
    }
    out
}

/// RFC 6901 array index: `0` or digits without a leading zero.
fn array_index(key: &str) -> Option<usize> {
    if key == "0" {
        return Some(0);
    }
    if key.is_empty() || key.starts_with('0') || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    key.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{
            "entry": [
                {"changes": [
                    {"value": {"metadata": {"id": "A"}, "messages": [{"id": 1}, {"id": 2}]}},
                    {"value": {"metadata": {"id": "B"}, "statuses": [{"id": 3}]}}
                ]},
                {"changes": [
                    {"value": {"metadata": {"id": "C"}, "messages": [{"id": 4}]}}
                ]}
            ],
            "a/b": {"m~n": 7}
        }"#;

    fn num(n: i64) -> Json<'static> {
        Json::Number(n.into())
    }

    fn text(s: &'static str) -> Json<'static> {
        Json::String(s.into())
    }

    #[test]
    fn plain_pointers_follow_rfc6901() {
        let doc = Json::parse(BODY).unwrap();
        assert_eq!(Pointer::parse("").unwrap().get(&doc), Some(&doc));
        assert_eq!(
            Pointer::parse("/a~1b/m~0n").unwrap().get(&doc),
            Some(&num(7))
        );
        assert_eq!(
            Pointer::parse("/entry/1/changes/0/value/metadata/id")
                .unwrap()
                .get(&doc),
            Some(&text("C"))
        );
        assert_eq!(Pointer::parse("/entry/01").unwrap().get(&doc), None);
        assert_eq!(Pointer::parse("/missing/x").unwrap().get(&doc), None);
        assert!(Pointer::parse("no-slash").is_err());
        assert!(Pointer::parse("/bad~2escape").is_err());
    }

    #[test]
    fn wildcards_enumerate_in_document_order_with_indices() {
        let doc = Json::parse(BODY).unwrap();
        let explode = Pointer::parse("/entry/*/changes/*/value/messages/*").unwrap();
        let mut seen = Vec::new();
        explode.for_each_match(&doc, &mut |item, indices| {
            seen.push((
                item.get("id").and_then(Json::as_i64).unwrap(),
                indices.to_vec(),
            ));
        });
        assert_eq!(
            seen,
            vec![(1, vec![0, 0, 0]), (2, vec![0, 0, 1]), (4, vec![1, 0, 0])]
        );
        assert_eq!(
            explode.concrete(&[1, 0, 0]),
            "/entry/1/changes/0/value/messages/0"
        );
    }

    #[test]
    fn bound_wildcards_reach_the_items_envelope() {
        let doc = Json::parse(BODY).unwrap();
        let envelope = Pointer::parse("/entry/*/changes/*/value/metadata/id").unwrap();
        assert_eq!(envelope.get_bound(&doc, &[0, 1, 0]), Some(&text("B")));
        assert_eq!(envelope.get_bound(&doc, &[1, 0]), Some(&text("C")));
        // Too few indices: the pointer cannot be resolved.
        assert_eq!(envelope.get_bound(&doc, &[1]), None);
        assert_eq!(
            envelope.wildcard_prefix().as_deref(),
            Some("/entry/*/changes/*")
        );
    }
}
