//! Templates: named spawn bodies a caller saves once and spawns by name
//! (`/api/v1/templates`, docs/api.md). Pure data; the store keeps them
//! (migration 0005), the REST edge validates them with the spawn parser.
//!
//! Whose a template is: the owner the caller acts as (its key's, or the
//! one an admin names with `X-User-ID`), else nobody's (`""`): a caller
//! sees its own templates and the ones of nobody, and a name is looked up
//! in that order. Names are unique per owner.

use std::collections::BTreeMap;

/// How many templates one owner may keep.
pub const MAX_PER_OWNER: usize = 1000;
/// A template body's defaults (the SDK's): what a field left out means.
pub const DEFAULT_MEMORY_MB: u32 = 512;
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_TTL: &str = "30m";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub owner_id: String,
    pub name: String,
    pub image: String,
    /// Empty: the default provider.
    pub provider: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// As the caller wrote it (`"30m"`); checked by the spawn's parser.
    pub ttl: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What saving a template did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Created,
    Updated,
    /// The owner already has [`MAX_PER_OWNER`] templates.
    Full,
}

/// The longest template name.
pub const MAX_NAME_LEN: usize = 128;

/// A name is 1 to [`MAX_NAME_LEN`] ASCII letters, digits, `.`, `-` and
/// `_`, not starting with `.`: one path segment however it is written.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "field `name` must be 1 to {MAX_NAME_LEN} letters, digits, '.', '-' or '_', not starting with '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_plain_segment() {
        for good in ["py", "python-3.12", "a_b", "A9"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a b",
            "é",
            "..",
            long.as_str(),
            "a\nb",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
