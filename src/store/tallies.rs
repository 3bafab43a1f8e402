//! [`Tallies`]: committed lease holders and sandbox counts by state,
//! provider and worker, mirrored in memory by the single writer after each
//! COMMIT, so metrics and `worker.status` never scan the database. Pure:
//! no I/O, time is a parameter.

use std::collections::{BTreeMap, HashMap};

use crate::leases::Lease;
use crate::sandboxes::{Sandbox, SandboxState};

/// Committed lease holders and sandbox counts, mirrored in memory.
#[derive(Default)]
pub struct Tallies {
    /// resource_id -> (holder, expires_at); holder '' when released.
    leases: HashMap<String, (String, i64)>,
    /// (state, provider, worker) -> sandboxes.
    pub(crate) sandboxes: HashMap<(SandboxState, String, String), u64>,
    /// Bumped by every lease change; a [`HeldCount`] is valid for one.
    lease_changes: u64,
    held: Option<HeldCount>,
}

/// One holder's active-lease count, as counted at `counted_at_ms`.
struct HeldCount {
    holder: String,
    lease_changes: u64,
    counted_at_ms: i64,
    /// The earliest expiry among the counted leases: the count can only
    /// fall, and only when one of them expires.
    valid_until_ms: i64,
    count: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TallyFigures {
    pub leases_total: u64,
    pub leases_active: u64,
    pub leases_expired: u64,
    /// holder -> active leases.
    pub leases_by_holder: BTreeMap<String, u64>,
    pub sandboxes: Vec<(SandboxState, String, String, u64)>,
}

impl crate::metrics::FleetTallies for TallyFigures {
    fn lease_counts(&self) -> (u64, u64, u64) {
        (self.leases_total, self.leases_active, self.leases_expired)
    }
    fn leases_by_holder(&self) -> impl Iterator<Item = (&str, u64)> {
        self.leases_by_holder.iter().map(|(h, n)| (h.as_str(), *n))
    }
    fn sandbox_rows(&self) -> impl Iterator<Item = (&str, &str, &str, u64)> {
        self.sandboxes
            .iter()
            .map(|(state, p, w, n)| (state.as_str(), p.as_str(), w.as_str(), *n))
    }
    fn sandbox_row_count(&self) -> usize {
        self.sandboxes.len()
    }
}

impl Tallies {
    pub(crate) fn lease(&mut self, lease: &Lease) {
        self.set_lease(
            lease.resource_id.clone(),
            lease.holder_id.clone(),
            lease.expires_at_ms,
        );
    }

    pub(crate) fn set_lease(&mut self, resource_id: String, holder: String, expires_at_ms: i64) {
        self.leases.insert(resource_id, (holder, expires_at_ms));
        self.lease_changes += 1;
    }

    /// Leases `holder` holds at `now_ms` (held and unexpired), as
    /// [`Tallies::figures`] counts them. The count is reused while no lease
    /// changed and `now_ms` lies between when it was counted and the first
    /// expiry among them (a wall clock stepped back recounts); otherwise it
    /// is recounted, O(leases).
    pub(crate) fn held(&mut self, holder: &str, now_ms: i64) -> u64 {
        if let Some(c) = &self.held {
            if c.holder == holder
                && c.lease_changes == self.lease_changes
                && c.counted_at_ms <= now_ms
                && now_ms < c.valid_until_ms
            {
                return c.count;
            }
        }
        let mut count = 0;
        let mut valid_until_ms = i64::MAX;
        for (h, expires) in self.leases.values() {
            if h == holder && !h.is_empty() && now_ms < *expires {
                count += 1;
                valid_until_ms = valid_until_ms.min(*expires);
            }
        }
        self.held = Some(HeldCount {
            holder: holder.to_owned(),
            lease_changes: self.lease_changes,
            counted_at_ms: now_ms,
            valid_until_ms,
            count,
        });
        count
    }

    /// Rows the retention purge removed.
    pub(crate) fn purged(
        &mut self,
        leases: &[String],
        sandboxes: &[(SandboxState, String, String)],
    ) {
        for id in leases {
            self.leases.remove(id);
        }
        if !leases.is_empty() {
            self.lease_changes += 1;
        }
        for key in sandboxes {
            if let Some(n) = self.sandboxes.get_mut(key) {
                *n = n.saturating_sub(1);
            }
        }
    }

    pub(crate) fn moved(&mut self, from: Option<&Sandbox>, to: &Sandbox) {
        if let Some(old) = from {
            if let Some(n) =
                self.sandboxes
                    .get_mut(&(old.state, old.provider.clone(), old.worker_id.clone()))
            {
                *n = n.saturating_sub(1);
            }
        }
        *self
            .sandboxes
            .entry((to.state, to.provider.clone(), to.worker_id.clone()))
            .or_default() += 1;
    }

    pub(crate) fn figures(&self, now_ms: i64) -> TallyFigures {
        let mut f = TallyFigures {
            leases_total: self.leases.len() as u64,
            ..Default::default()
        };
        for (holder, expires) in self.leases.values() {
            if !holder.is_empty() && now_ms < *expires {
                f.leases_active += 1;
                *f.leases_by_holder.entry(holder.clone()).or_default() += 1;
            } else {
                f.leases_expired += 1;
            }
        }
        f.sandboxes = self
            .sandboxes
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|((s, p, w), n)| (*s, p.clone(), w.clone(), *n))
            .collect();
        f.sandboxes.sort();
        f
    }
}

/// A lease as far as the tallies care: who holds it until when.
pub(crate) fn tally_lease(resource_id: String, holder: &str, expires_at_ms: i64) -> Lease {
    Lease {
        resource_id,
        resource_type: String::new(),
        holder_id: holder.to_owned(),
        generation: 1,
        acquired_at_ms: 0,
        renewed_at_ms: 0,
        expires_at_ms,
        transitions: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached count always equals what `figures` counts, across lease
    /// changes, expiries and a wall clock stepped back.
    #[test]
    fn held_leases_match_the_full_count() {
        let mut t = Tallies::default();
        let check = |t: &mut Tallies, now: i64| {
            let full = t
                .figures(now)
                .leases_by_holder
                .get("me")
                .copied()
                .unwrap_or(0);
            assert_eq!(t.held("me", now), full, "at {now}");
            // Asked twice: the cached answer is the same.
            assert_eq!(t.held("me", now), full, "cached at {now}");
        };
        check(&mut t, 0);
        t.lease(&tally_lease("a".into(), "me", 100));
        t.lease(&tally_lease("b".into(), "me", 200));
        t.lease(&tally_lease("c".into(), "other", 150));
        for now in [0, 50, 99, 100, 150, 199, 200, 250] {
            check(&mut t, now);
        }
        // The clock steps back: expired leases count again.
        check(&mut t, 10);
        assert_eq!(t.held("me", 10), 2);
        // A renew, a release and a new holder each change the count.
        t.lease(&tally_lease("a".into(), "me", 1_000));
        check(&mut t, 300);
        assert_eq!(t.held("me", 300), 1);
        t.lease(&tally_lease("a".into(), "", 1_000));
        check(&mut t, 300);
        t.lease(&tally_lease("c".into(), "me", 1_000));
        check(&mut t, 300);
        assert_eq!(t.held("me", 300), 1);
        assert_eq!(t.held("other", 300), 0);
        check(&mut t, 300);
    }

    fn sandbox(state: SandboxState, worker: &str) -> Sandbox {
        Sandbox {
            id: "sb".into(),
            state,
            provider: "mock".into(),
            image: "default".into(),
            memory_mb: 1,
            vcpus: 1,
            owner_id: String::new(),
            metadata: Default::default(),
            worker_id: worker.into(),
            created_at_ms: 0,
            expires_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    /// A sandbox moving between states leaves one count behind, and a
    /// purge takes it away; empty counts are not reported.
    #[test]
    fn sandbox_counts_follow_moves_and_purges() {
        let mut t = Tallies::default();
        let creating = sandbox(SandboxState::Creating, "w");
        let running = sandbox(SandboxState::Running, "w");
        let destroyed = sandbox(SandboxState::Destroyed, "w");
        t.moved(None, &creating);
        t.moved(Some(&creating), &running);
        assert_eq!(
            t.figures(0).sandboxes,
            vec![(SandboxState::Running, "mock".into(), "w".into(), 1)]
        );
        t.moved(Some(&running), &destroyed);
        t.purged(&[], &[(SandboxState::Destroyed, "mock".into(), "w".into())]);
        assert!(t.figures(0).sandboxes.is_empty());
        // A purge of a row the tallies never saw does not go below zero.
        t.purged(&[], &[(SandboxState::Lost, "mock".into(), "w".into())]);
        assert!(t.figures(0).sandboxes.is_empty());
    }
}
