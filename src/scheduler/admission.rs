//! Admission: the limits, the query and its answer, and the view's
//! placement (pick a worker, explain the rejections, hold and settle
//! reservations).

use super::*;

/// Admission limits, read from the live config by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_ttl_ms: i64,
    pub max_sandboxes: u32,
    /// 0 = no per-owner limit.
    pub max_per_owner: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionQuery {
    pub provider: String,
    pub owner_id: String,
    pub ttl_ms: i64,
    pub limits: Limits,
    /// Hold a slot on the chosen worker until `settle` (a real spawn), or
    /// only answer (a preflight).
    pub reserve: bool,
}

/// Why admission said no; the names are the API's `reason` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    MaxTtl,
    MaxSandboxes,
    MaxSandboxesPerOwner,
    WorkerUnavailable,
    RemoteWorkerRpcUnavailable,
}

impl Denial {
    pub const ALL: [Denial; 5] = [
        Denial::MaxTtl,
        Denial::MaxSandboxes,
        Denial::MaxSandboxesPerOwner,
        Denial::WorkerUnavailable,
        Denial::RemoteWorkerRpcUnavailable,
    ];

    /// [`Denial::as_str`] of each denial, in [`Denial::ALL`] order: the
    /// names of the admission metrics' denial slots (`d as usize`).
    pub const LABELS: [&'static str; 5] = [
        "max_ttl",
        "max_sandboxes",
        "max_sandboxes_per_owner",
        "worker_unavailable",
        "remote_worker_rpc_unavailable",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Denial::MaxTtl => "max_ttl",
            Denial::MaxSandboxes => "max_sandboxes",
            Denial::MaxSandboxesPerOwner => "max_sandboxes_per_owner",
            Denial::WorkerUnavailable => "worker_unavailable",
            Denial::RemoteWorkerRpcUnavailable => "remote_worker_rpc_unavailable",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    pub denial: Option<Denial>,
    /// Live sandboxes plus reservations, fleet-wide and for this owner.
    pub active_sandboxes: u32,
    pub active_owner_sandboxes: u32,
    pub selected_worker_id: Option<String>,
    /// `local_fallback`, `no_eligible_worker` or `remote_worker_selected`.
    pub worker_reason: &'static str,
    /// Workers that could take it (only counted when `explain` was asked).
    pub eligible_workers: Option<usize>,
    /// reason -> workers filtered for it (only when `explain` was asked, or
    /// when no worker was eligible).
    pub rejections: BTreeMap<&'static str, usize>,
    pub reservation: Option<Reservation>,
}

/// A slot held on a worker for a spawn in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: u64,
    pub worker_id: String,
    pub owner_id: String,
}

impl ClusterView {
    /// Picks a worker for `provider` by policy from the eligible index; a
    /// candidate whose health lapsed since the last evaluation is skipped.
    pub(super) fn pick(&self, provider: &str, now: Instant) -> Option<&str> {
        let fits = |(_, id): &&(u32, String)| {
            self.workers.get(id).is_some_and(|e| {
                let health =
                    health::health(now.saturating_duration_since(e.last_seen), self.windows);
                health::supports(&e.worker, provider)
                    && health::ineligibility(&e.worker, health, e.load()).is_none()
            })
        };
        let found = match self.policy {
            PlacementPolicy::Spread => self.eligible.iter().find(fits),
            PlacementPolicy::Binpack => self.eligible.iter().rev().find(fits),
        };
        found.map(|(_, id)| id.as_str())
    }

    /// Each worker with why it cannot take a sandbox for `provider` now.
    pub(super) fn reasons(
        &self,
        provider: &str,
        now: Instant,
    ) -> Vec<(String, Option<&'static str>)> {
        self.workers
            .iter()
            .map(|(id, entry)| {
                let reason = if health::supports(&entry.worker, provider) {
                    self.view_ref(entry, now).ineligible
                } else {
                    Some(health::Ineligible::ProviderUnsupported)
                };
                (id.clone(), reason.map(|r| r.as_str()))
            })
            .collect()
    }

    /// Eligible workers for `provider` at `now`, and the others counted by
    /// reason, for explanations and for "nothing fits" answers. Read from
    /// the counts kept at filing, corrected for the workers that went
    /// stale since they were filed (at most the last health tick's worth):
    /// the same answer as judging every worker at `now`, without visiting
    /// every worker.
    pub(super) fn explain(
        &self,
        provider: &str,
        now: Instant,
    ) -> (usize, BTreeMap<&'static str, usize>) {
        let mut counts = self.reasons.supporting(provider);
        // Lapsed: still filed as fresh, but their age is past `stale_after`.
        for (_, id) in self.lapses.range(..(now, String::new())) {
            let Some(entry) = self.workers.get(id) else {
                continue;
            };
            if let Some(reason) = entry
                .counted
                .filter(|_| health::supports(&entry.worker, provider))
            {
                counts.take(reason);
                counts.put(Some(Ineligible::Stale));
            }
        }
        let mut rejections = BTreeMap::new();
        let unsupported = self.reasons.all.total() - counts.total();
        if unsupported > 0 {
            rejections.insert(Ineligible::ProviderUnsupported.as_str(), unsupported);
        }
        for reason in Ineligible::ALL {
            let n = counts.get(Some(reason));
            if n > 0 {
                rejections.insert(reason.as_str(), n);
            }
        }
        (counts.get(None), rejections)
    }

    pub(super) fn admit(&mut self, q: &AdmissionQuery, explain: bool, now: Instant) -> Admission {
        let owner_load = if q.owner_id.is_empty() {
            0
        } else {
            self.owners.get(&q.owner_id).copied().unwrap_or(0)
        };
        let mut answer = Admission {
            denial: None,
            active_sandboxes: self.total_live + self.reservations.len() as u32,
            active_owner_sandboxes: owner_load,
            selected_worker_id: None,
            worker_reason: "no_eligible_worker",
            eligible_workers: None,
            rejections: BTreeMap::new(),
            reservation: None,
        };
        if explain {
            let (eligible, rejections) = self.explain(&q.provider, now);
            answer.eligible_workers = Some(eligible);
            answer.rejections = rejections;
        }
        let limit_denial = if q.ttl_ms > q.limits.max_ttl_ms {
            Some(Denial::MaxTtl)
        } else if answer.active_sandboxes >= q.limits.max_sandboxes {
            Some(Denial::MaxSandboxes)
        } else if q.limits.max_per_owner > 0
            && !q.owner_id.is_empty()
            && owner_load >= q.limits.max_per_owner
        {
            Some(Denial::MaxSandboxesPerOwner)
        } else {
            None
        };
        let selected = self.pick(&q.provider, now).map(str::to_owned);
        answer.selected_worker_id = selected.clone();
        answer.worker_reason = match &selected {
            None => "no_eligible_worker",
            Some(id) if *id == self.local_worker_id => "local_fallback",
            Some(_) => "remote_worker_selected",
        };
        answer.denial = limit_denial.or(match &selected {
            None => Some(Denial::WorkerUnavailable),
            Some(id) if *id != self.local_worker_id => Some(Denial::RemoteWorkerRpcUnavailable),
            Some(_) => None,
        });
        if answer.denial == Some(Denial::WorkerUnavailable) && !explain {
            let (eligible, rejections) = self.explain(&q.provider, now);
            answer.eligible_workers = Some(eligible);
            answer.rejections = rejections;
        }
        if answer.denial.is_none() && q.reserve {
            let worker_id = selected.expect("an admitted spawn has a worker");
            let reservation = Reservation {
                id: self.next_reservation,
                worker_id,
                owner_id: q.owner_id.clone(),
            };
            self.next_reservation += 1;
            self.adjust(&reservation.worker_id, &reservation.owner_id, 0, 1, now);
            self.reservations
                .insert(reservation.id, reservation.clone());
            answer.reservation = Some(reservation);
        }
        METRICS.admission.observe(answer.denial.map(|d| d as usize));
        if let Some(denial) = answer.denial.filter(|_| q.reserve) {
            crate::events::publish(|| Event::AdmissionDenied {
                reason: denial.as_str(),
                provider: q.provider.clone(),
                owner_id: q.owner_id.clone(),
                rejections: answer.rejections.clone(),
            });
        }
        answer
    }

    /// Applies changes in live and reserved counts for a worker and owner.
    pub(super) fn adjust(
        &mut self,
        worker_id: &str,
        owner_id: &str,
        live: i32,
        reserved: i32,
        now: Instant,
    ) {
        if let Some(entry) = self.workers.get_mut(worker_id) {
            entry.active = entry.active.saturating_add_signed(live);
            entry.reserved = entry.reserved.saturating_add_signed(reserved);
        }
        self.total_live = self.total_live.saturating_add_signed(live);
        if !owner_id.is_empty() {
            let n = self.owners.entry(owner_id.to_owned()).or_default();
            *n = n.saturating_add_signed(live + reserved);
            if *n == 0 {
                self.owners.remove(owner_id);
            }
        }
        self.refile(worker_id, now);
    }

    pub(super) fn settle(&mut self, reservation: &Reservation, created: bool, now: Instant) {
        if self.reservations.remove(&reservation.id).is_some() {
            self.adjust(
                &reservation.worker_id,
                &reservation.owner_id,
                i32::from(created),
                -1,
                now,
            );
        }
    }
}
