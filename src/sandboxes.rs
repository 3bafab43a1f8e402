//! Sandbox domain types and input rules, shared by the HTTP edge, the
//! service layer, the store and the scheduler. No JSON here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SandboxState {
    Creating,
    Running,
    Destroyed,
    Error,
    Lost,
}

impl SandboxState {
    pub const ALL: [SandboxState; 5] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Destroyed,
        SandboxState::Error,
        SandboxState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Destroyed => "destroyed",
            SandboxState::Error => "error",
            SandboxState::Lost => "lost",
        }
    }

    pub fn parse(text: &str) -> Option<SandboxState> {
        SandboxState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Counts against capacity and limits.
    pub fn is_live(self) -> bool {
        matches!(self, SandboxState::Creating | SandboxState::Running)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    pub id: String,
    pub state: SandboxState,
    pub provider: String,
    pub image: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub owner_id: String,
    pub metadata: BTreeMap<String, String>,
    pub worker_id: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A validated spawn request, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct SpawnSpec {
    pub image: String,
    pub provider: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub ttl_ms: i64,
    pub owner_id: String,
    pub metadata: BTreeMap<String, String>,
}

/// Which sandboxes a caller may see and act on: decided once from the key
/// it presented (`http::auth`), then passed to every lifecycle call. A
/// sandbox outside the scope is treated exactly as a missing one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerScope {
    /// Admin keys, and no keys configured (the loopback default): every
    /// owner; the caller may name the owner of what it creates.
    All,
    /// A key bound to this owner (never empty): only its sandboxes.
    Owner(String),
    /// A legacy `auth.api_keys` entry, bound to no one: only sandboxes
    /// without an owner.
    Unowned,
}

impl OwnerScope {
    /// The owner the caller acts as when its key fixes it (`""` for no
    /// owner); `None` when it may act for anyone.
    pub fn fixed_owner(&self) -> Option<&str> {
        match self {
            OwnerScope::All => None,
            OwnerScope::Owner(owner) => Some(owner),
            OwnerScope::Unowned => Some(""),
        }
    }

    /// Whether a sandbox of `owner_id` is visible to the caller.
    pub fn permits(&self, owner_id: &str) -> bool {
        self.fixed_owner().is_none_or(|fixed| fixed == owner_id)
    }
}

pub const MAX_OWNER_ID_LEN: usize = 128;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY_LEN: usize = 128;
pub const MAX_METADATA_VALUE_LEN: usize = 1024;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Owner ids end up in audit rows, metric-free logs and idempotency keys:
/// `[A-Za-z0-9._@:-]`, at most 128 characters. Empty means "no owner".
pub fn validate_owner_id(owner: &str) -> Result<(), String> {
    if owner.len() > MAX_OWNER_ID_LEN {
        return Err(format!(
            "owner_id is longer than {MAX_OWNER_ID_LEN} characters"
        ));
    }
    if let Some(c) = owner
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._@:-".contains(*c)))
    {
        return Err(format!(
            "owner_id must not contain {c:?} (allowed: letters, digits, . _ @ : -)"
        ));
    }
    Ok(())
}

/// Sandbox ids as this daemon makes them: `sb-` and 16 lowercase hex digits.
pub fn is_sandbox_id(id: &str) -> bool {
    id.strip_prefix("sb-").is_some_and(|hex| {
        hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Makes unique sandbox ids: a random per-boot seed mixed with a counter
/// through splitmix64, so ids are unguessable in order and never repeat
/// within a boot.
pub struct SandboxIds {
    seed: u64,
    counter: AtomicU64,
}

impl SandboxIds {
    pub fn new() -> SandboxIds {
        let mut bytes = [0u8; 8];
        let seeded = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
        let seed = match seeded {
            Ok(()) => u64::from_le_bytes(bytes),
            Err(_) => crate::time::now_ms() as u64 ^ (u64::from(std::process::id()) << 32),
        };
        SandboxIds {
            seed,
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!(
            "sb-{:016x}",
            splitmix64(
                self.seed
                    .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            )
        )
    }
}

impl Default for SandboxIds {
    fn default() -> Self {
        SandboxIds::new()
    }
}

/// A bijection on u64, so distinct inputs give distinct ids.
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_ids() {
        for good in ["", "alice", "team-1.eu@corp:x", &"a".repeat(128)] {
            assert!(validate_owner_id(good).is_ok(), "{good:?}");
        }
        for bad in [
            "a b",
            "a/b",
            "../x",
            "a\u{0}",
            "ä",
            &"a".repeat(129),
            "x;drop",
        ] {
            assert!(validate_owner_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_unique_and_well_formed() {
        let ids = SandboxIds::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.next();
            assert!(is_sandbox_id(&id), "{id}");
            assert!(seen.insert(id));
        }
        assert!(!is_sandbox_id("sb-XYZ"));
        assert!(!is_sandbox_id("sb-0123456789abcdef0"));
    }

    #[test]
    fn states_round_trip() {
        for s in SandboxState::ALL {
            assert_eq!(SandboxState::parse(s.as_str()), Some(s));
        }
        assert!(SandboxState::Running.is_live() && !SandboxState::Lost.is_live());
    }
}
