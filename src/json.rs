//! Checked JSON parsing for every edge that reads a client's JSON (REST
//! bodies, admin-socket envelopes and their params).
//!
//! serde_json keeps the last of two equal keys in an object without a word,
//! so `{"holder_id":"a","holder_id":"b"}` would act for `b` while a proxy
//! or a log that reads the first saw `a`. [`parse`] builds the same
//! [`Value`] as `serde_json::from_slice`, through a visitor whose map refuses
//! a key it has already seen, at any depth, and names it by its path.
//! Syntax errors, the recursion limit and trailing characters are
//! serde_json's own.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Why a client's bytes are not a JSON value.
#[derive(Debug)]
pub enum JsonError {
    /// Not JSON: serde_json's message (with line and column).
    Syntax(serde_json::Error),
    /// An object repeats a key; the path of the second one, as
    /// `capacity.max_sandboxes` or `items[2].name`.
    DuplicateKey(String),
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::Syntax(e) => write!(f, "{e}"),
            JsonError::DuplicateKey(path) => write!(f, "duplicate key `{path}`"),
        }
    }
}

/// Parses one JSON document, refusing a repeated key in any object.
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    // The path of a duplicate, innermost segment first; filled only on
    // the error path, so a good document pays for nothing but the lookups.
    let duplicate = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = Checked {
        duplicate: &duplicate,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value));
    match (parsed, duplicate.into_inner()) {
        (Ok(value), _) => Ok(value),
        (Err(_), Some(segments)) => Err(JsonError::DuplicateKey(render_path(segments))),
        (Err(e), None) => Err(JsonError::Syntax(e)),
    }
}

enum Segment {
    Key(String),
    Index(usize),
}

fn render_path(mut innermost_first: Vec<Segment>) -> String {
    innermost_first.reverse();
    let mut path = String::new();
    for segment in innermost_first {
        match segment {
            Segment::Key(key) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key);
            }
            Segment::Index(i) => path.push_str(&format!("[{i}]")),
        }
    }
    path
}

#[derive(Clone, Copy)]
struct Checked<'a> {
    duplicate: &'a RefCell<Option<Vec<Segment>>>,
}

impl Checked<'_> {
    /// On the way out of a failed nested value, adds this level's segment
    /// to a duplicate's path (a syntax error leaves no path).
    fn within(self, segment: impl FnOnce() -> Segment) {
        if let Some(path) = self.duplicate.borrow_mut().as_mut() {
            path.push(segment());
        }
    }
}

impl<'de> DeserializeSeed<'de> for Checked<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // Like serde_json: a non-finite float (not produced by its parser)
        // would be null.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        loop {
            match seq.next_element_seed(self) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return Ok(Value::Array(items)),
                Err(e) => {
                    self.within(|| Segment::Index(items.len()));
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                *self.duplicate.borrow_mut() = Some(vec![Segment::Key(key)]);
                return Err(de::Error::custom("duplicate key"));
            }
            match access.next_value_seed(self) {
                Ok(value) => {
                    map.insert(key, value);
                }
                Err(e) => {
                    self.within(|| Segment::Key(key));
                    return Err(e);
                }
            }
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duplicate(text: &str) -> Option<String> {
        match parse(text.as_bytes()) {
            Err(JsonError::DuplicateKey(path)) => Some(path),
            _ => None,
        }
    }

    #[test]
    fn good_documents_parse_like_serde_json() {
        for text in [
            "null",
            "true",
            "-1",
            "18446744073709551615",
            "1.5e300",
            r#""a\u00e9\n""#,
            r#"{"a":{"b":[1,{"c":null}],"d":"x"},"e":[]}"#,
            r#" [ {"a":1}, {"a":2} ] "#,
        ] {
            let ours = parse(text.as_bytes()).unwrap();
            let theirs: Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours, theirs, "{text}");
        }
    }

    #[test]
    fn a_repeated_key_is_refused_with_its_path() {
        let cases = [
            (r#"{"a":1,"a":2}"#, "a"),
            (r#"{"a":{"b":1,"b":1}}"#, "a.b"),
            (r#"{"a":[0,{"b":1},{"c":1,"c":2}]}"#, "a[2].c"),
            (r#"[[{"x":1,"x":1}]]"#, "[0][0].x"),
            // Escapes decode first: these are the same key.
            (r#"{"k":1,"\u006b":2}"#, "k"),
        ];
        for (text, path) in cases {
            assert_eq!(duplicate(text).as_deref(), Some(path), "{text}");
        }
        // Equal keys in different objects are fine.
        assert!(parse(br#"{"a":{"k":1},"b":{"k":1}}"#).is_ok());
    }

    #[test]
    fn syntax_errors_stay_syntax_errors() {
        for text in ["", "{", r#"{"a":1,}"#, "[1] x", "\u{0}"] {
            assert!(
                matches!(parse(text.as_bytes()), Err(JsonError::Syntax(_))),
                "{text:?}"
            );
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(matches!(parse(deep.as_bytes()), Err(JsonError::Syntax(_))));
    }
}
