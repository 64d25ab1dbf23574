//! weir's reader of JSON text, for [`Json::parse`](super::Json::parse).
//!
//! It builds the same tree serde_json's visitor builds, with one addition:
//! every array and object keeps the text it was read from, when that text
//! may go to `jsonb` as it is. It only ever *accepts* what serde_json
//! accepts, reading the same values. Anything else it declines, and the
//! caller hands the text to serde_json, whose verdict and error text stand.
//! It declines every error, nesting deeper than [`MAX_DEPTH`], and
//! every number other than a plain integer that fits 64 bits; for the
//! latter, serde_json reads the number's own text (so floats round exactly as
//! serde_json rounds them).
//!
//! The text was checked to be UTF-8 before, so strings are only scanned
//! for their quote, backslashes and control characters.
//!
//! Given a [`Wanted`], it builds only the wanted parts: every other value is
//! read through by [`Reader::skip`], which checks exactly what building it
//! checks (so the verdict is the same) and says whether its text may go to
//! `jsonb`, but builds nothing. Such arrays and objects are *partial*.

use std::borrow::Cow;

use super::wanted::{Want, Whole};
use super::{Array, Json, Object, next_escape};

/// Nesting read here. serde_json allows 128: deeper texts are declined and
/// serde_json reads them (or refuses them) itself.
const MAX_DEPTH: usize = 100;

/// A number longer than this, or whose exponent has more than
/// [`MAX_EXPONENT_DIGITS`] digits, keeps its container from being written
/// as it is: serde_json rounds it to a double, and PostgreSQL's `numeric`
/// may refuse it as written.
const MAX_RAW_NUMBER: usize = 1000;
const MAX_EXPONENT_DIGITS: usize = 3;

/// The reader did not accept the text; serde_json decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Declined;

/// Reads `text`, which must hold exactly one JSON value, building what
/// `want` names of it.
pub(super) fn read<'a>(text: &'a str, want: Want<'_>) -> Result<Json<'a>, Declined> {
    let mut reader = Reader {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    reader.skip_whitespace();
    let (value, _) = reader.value(0, want)?;
    reader.skip_whitespace();
    if reader.at != reader.bytes.len() {
        return Err(Declined);
    }
    Ok(value)
}

struct Reader<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

/// A value, and whether its text may go to `jsonb` as it is.
type Read<'a> = Result<(Json<'a>, bool), Declined>;

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        self.at += found as usize;
        found
    }

    /// JSON's four whitespace bytes, as serde_json skips them.
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn value(&mut self, depth: usize, want: Want<'_>) -> Read<'a> {
        match self.peek().ok_or(Declined)? {
            b'{' => self.object(depth + 1, want),
            b'[' => self.array(depth + 1, want),
            b'"' => {
                let (text, holds_nul) = self.string()?;
                Ok((Json::String(text), !holds_nul))
            }
            b't' => self.literal(b"true", Json::Bool(true)),
            b'f' => self.literal(b"false", Json::Bool(false)),
            b'n' => self.literal(b"null", Json::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(Declined),
        }
    }

    fn literal(&mut self, word: &[u8], value: Json<'a>) -> Read<'a> {
        if !self.bytes[self.at..].starts_with(word) {
            return Err(Declined);
        }
        self.at += word.len();
        Ok((value, true))
    }

    fn object(&mut self, depth: usize, want: Want<'_>) -> Read<'a> {
        let start = self.at;
        // A partial object keeps at most the wanted members (but for a
        // repeated key): room for them all saves regrowing.
        let mut members = match want {
            Want::All => Vec::new(),
            Want::Part(wanted) => Vec::with_capacity(wanted.members.len()),
        };
        let raw = self.elements(depth, b'}', |reader| {
            if reader.peek() != Some(b'"') {
                return Err(Declined);
            }
            let (key, key_holds_nul) = reader.string()?;
            reader.skip_whitespace();
            if !reader.eat(b':') {
                return Err(Declined);
            }
            reader.skip_whitespace();
            let member = match want {
                Want::All => Some(Want::All),
                Want::Part(wanted) => wanted.of_member(&key),
            };
            let value_raw = match member {
                Some(member) => {
                    let (value, value_raw) = reader.value(depth, member)?;
                    members.push((key, value));
                    value_raw
                }
                None => reader.skip(depth)?,
            };
            Ok(!key_holds_nul && value_raw)
        })?;
        let Some((text, partial)) = self.kept(start, raw, want) else {
            return self.object(depth, Want::All);
        };
        let object = Object {
            members,
            text,
            partial,
        };
        Ok((Json::Object(object), raw))
    }

    fn array(&mut self, depth: usize, want: Want<'_>) -> Read<'a> {
        let start = self.at;
        let mut items = Vec::new();
        let raw = self.elements(depth, b']', |reader| {
            let item = match want {
                Want::All => Some(Want::All),
                Want::Part(wanted) => wanted.of_item(items.len()),
            };
            match item {
                Some(item) => {
                    let (value, item_raw) = reader.value(depth, item)?;
                    items.push(value);
                    Ok(item_raw)
                }
                None => {
                    let item_raw = reader.skip(depth)?;
                    // Holds the item's place; nothing reads it.
                    items.push(Json::Null);
                    Ok(item_raw)
                }
            }
        })?;
        let Some((text, partial)) = self.kept(start, raw, want) else {
            return self.array(depth, Want::All);
        };
        let array = Array {
            items,
            text,
            partial,
        };
        Ok((Json::Array(array), raw))
    }

    /// For the array or object read from `start` to here: the text it keeps
    /// and whether it is partial; or `None` when it must be read again
    /// whole (from `start`, where this leaves the reader), because a
    /// `jsonb` column reads it and it has no text to give.
    fn kept(&mut self, start: usize, raw: bool, want: Want<'_>) -> Option<(Option<&'a str>, bool)> {
        let text = raw.then(|| &self.text[start..self.at]);
        match want {
            Want::All => Some((text, false)),
            Want::Part(wanted) => match wanted.whole {
                Whole::Text if !raw => {
                    self.at = start;
                    None
                }
                Whole::Text => Some((text, true)),
                // Nothing reads this value whole, so nothing reads its text.
                _ => Some((None, true)),
            },
        }
    }

    /// Reads through one value, building nothing; whether its text may go
    /// to `jsonb` as it is. Checks what [`Reader::value`] checks, at the
    /// same depths.
    fn skip(&mut self, depth: usize) -> Result<bool, Declined> {
        match self.peek().ok_or(Declined)? {
            b'{' => self.elements(depth + 1, b'}', |reader| {
                if reader.peek() != Some(b'"') {
                    return Err(Declined);
                }
                let key_holds_nul = reader.skip_string()?;
                reader.skip_whitespace();
                if !reader.eat(b':') {
                    return Err(Declined);
                }
                reader.skip_whitespace();
                let value_raw = reader.skip(depth + 1)?;
                Ok(!key_holds_nul && value_raw)
            }),
            b'[' => self.elements(depth + 1, b']', |reader| reader.skip(depth + 1)),
            b'"' => Ok(!self.skip_string()?),
            b't' => self.literal(b"true", Json::Bool(true)).map(|(_, raw)| raw),
            b'f' => self
                .literal(b"false", Json::Bool(false))
                .map(|(_, raw)| raw),
            b'n' => self.literal(b"null", Json::Null).map(|(_, raw)| raw),
            b'-' | b'0'..=b'9' => self.number().map(|(_, raw)| raw),
            _ => Err(Declined),
        }
    }

    /// The members of an object or items of an array, at its opening
    /// bracket: each read by `element`, comma-separated, up to `close`.
    /// `element` says whether its element's text may go to `jsonb` as it
    /// is; so does the result, for all of them.
    fn elements(
        &mut self,
        depth: usize,
        close: u8,
        mut element: impl FnMut(&mut Self) -> Result<bool, Declined>,
    ) -> Result<bool, Declined> {
        if depth > MAX_DEPTH {
            return Err(Declined);
        }
        self.at += 1; // the opening bracket
        self.skip_whitespace();
        let mut raw = true;
        if self.eat(close) {
            return Ok(raw);
        }
        loop {
            raw &= element(self)?;
            self.skip_whitespace();
            if self.eat(b',') {
                self.skip_whitespace();
            } else if self.eat(close) {
                return Ok(raw);
            } else {
                return Err(Declined);
            }
        }
    }

    /// A string at its opening quote: borrowed when it holds no escape, and
    /// whether it holds U+0000.
    fn string(&mut self) -> Result<(Cow<'a, str>, bool), Declined> {
        self.at += 1; // `"`
        let start = self.at;
        let mut at = next_escape(self.bytes, start).ok_or(Declined)?;
        if self.bytes[at] == b'"' {
            self.at = at + 1;
            // Quotes are ASCII: both ends are character boundaries.
            return Ok((Cow::Borrowed(&self.text[start..at]), false));
        }
        let mut owned = String::with_capacity(at - start + 16);
        let mut holds_nul = false;
        let mut run = start;
        loop {
            owned.push_str(&self.text[run..at]);
            match self.bytes[at] {
                b'"' => {
                    self.at = at + 1;
                    return Ok((Cow::Owned(owned), holds_nul));
                }
                b'\\' => {
                    let (ch, next) = self.escape(at + 1)?;
                    holds_nul |= ch == '\0';
                    owned.push(ch);
                    run = next;
                }
                // A control character must be escaped in JSON.
                _ => return Err(Declined),
            }
            at = next_escape(self.bytes, run).ok_or(Declined)?;
        }
    }

    /// Reads through a string at its opening quote, checking it as
    /// [`Reader::string`] does; whether it holds U+0000.
    fn skip_string(&mut self) -> Result<bool, Declined> {
        let mut holds_nul = false;
        let mut at = next_escape(self.bytes, self.at + 1).ok_or(Declined)?;
        loop {
            match self.bytes[at] {
                b'"' => {
                    self.at = at + 1;
                    return Ok(holds_nul);
                }
                b'\\' => {
                    let (ch, next) = self.escape(at + 1)?;
                    holds_nul |= ch == '\0';
                    at = next_escape(self.bytes, next).ok_or(Declined)?;
                }
                // A control character must be escaped in JSON.
                _ => return Err(Declined),
            }
        }
    }

    /// The escape whose letter is at `at`: its character and where the text
    /// goes on. Surrogates must come as a high-low pair of `\u` escapes.
    fn escape(&self, at: usize) -> Result<(char, usize), Declined> {
        let ch = match *self.bytes.get(at).ok_or(Declined)? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let high = self.hex4(at + 1)?;
                return match high {
                    0xD800..=0xDBFF => {
                        if self.bytes.get(at + 5..at + 7) != Some(b"\\u") {
                            return Err(Declined);
                        }
                        let low = self.hex4(at + 7)?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return Err(Declined);
                        }
                        let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                        Ok((char::from_u32(code).ok_or(Declined)?, at + 11))
                    }
                    _ => Ok((char::from_u32(high).ok_or(Declined)?, at + 5)),
                };
            }
            _ => return Err(Declined),
        };
        Ok((ch, at + 1))
    }

    /// Four hexadecimal digits at `at`.
    fn hex4(&self, at: usize) -> Result<u32, Declined> {
        let digits = self.bytes.get(at..at + 4).ok_or(Declined)?;
        digits.iter().try_fold(0u32, |code, digit| {
            let value = (*digit as char).to_digit(16).ok_or(Declined)?;
            Ok(code << 4 | value)
        })
    }

    fn number(&mut self) -> Read<'a> {
        let start = self.at;
        let negative = self.eat(b'-');
        let digits_start = self.at;
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => self.skip_digits(),
            _ => return Err(Declined),
        }
        let digits = self.at - digits_start;
        let mut plain = true;
        if self.eat(b'.') {
            plain = false;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(Declined);
            }
            self.skip_digits();
        }
        let mut exponent_digits = 0;
        if matches!(self.peek(), Some(b'e' | b'E')) {
            plain = false;
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            let exponent_start = self.at;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(Declined);
            }
            self.skip_digits();
            let exponent = &self.bytes[exponent_start..self.at];
            exponent_digits = exponent.iter().skip_while(|d| **d == b'0').count();
        }
        let text = &self.text[start..self.at];
        let raw = text.len() <= MAX_RAW_NUMBER && exponent_digits <= MAX_EXPONENT_DIGITS;
        // Up to 19 digits always fit a u64.
        if plain && digits <= 19 {
            let magnitude = self.bytes[digits_start..self.at]
                .iter()
                .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
            if !negative {
                return Ok((Json::Number(magnitude.into()), raw));
            }
            // serde_json reads `-0` as a float, and magnitudes past i64 as
            // floats: those go to it below.
            if (1..=1u64 << 63).contains(&magnitude) {
                let value = (magnitude as i64).wrapping_neg();
                return Ok((Json::Number(value.into()), raw));
            }
        }
        // Any other number: serde_json's reading of its text, so the value
        // is the one serde_json gives inside a document.
        match Json::parse_with_serde(text) {
            Ok(number @ Json::Number(_)) => Ok((number, raw)),
            _ => Err(Declined),
        }
    }

    fn skip_digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }
}
