//! Workers counted by ineligibility reason, split by provider support.

use super::*;

/// Workers by reason (`None` = eligible), one slot per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counts([usize; 6]);

impl Counts {
    pub(super) fn slot(reason: Option<Ineligible>) -> usize {
        match reason {
            None => 0,
            Some(Ineligible::NotOnline) => 1,
            Some(Ineligible::Draining) => 2,
            Some(Ineligible::Stale) => 3,
            Some(Ineligible::Full) => 4,
            Some(Ineligible::ProviderUnsupported) => 5,
        }
    }
    pub(super) fn get(&self, reason: Option<Ineligible>) -> usize {
        self.0[Counts::slot(reason)]
    }
    pub(super) fn put(&mut self, reason: Option<Ineligible>) {
        self.0[Counts::slot(reason)] += 1;
    }
    pub(super) fn take(&mut self, reason: Option<Ineligible>) {
        let n = &mut self.0[Counts::slot(reason)];
        *n = n.saturating_sub(1);
    }
    pub(super) fn total(&self) -> usize {
        self.0.iter().sum()
    }
    pub(super) fn plus(mut self, other: &Counts) -> Counts {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
        self
    }
}

/// Filed workers counted by reason, split by provider support, so the
/// counts for one provider cost no walk over the workers.
#[derive(Default)]
pub(super) struct ReasonCounts {
    /// Every filed worker.
    pub(super) all: Counts,
    /// Workers with no provider list: they run every provider.
    pub(super) every_provider: Counts,
    /// provider -> workers that list it (once, however often listed).
    pub(super) listed: HashMap<String, Counts>,
}

impl ReasonCounts {
    /// The providers a worker lists, each once.
    pub(super) fn listed_by(worker: &Worker) -> impl Iterator<Item = &String> {
        worker
            .providers
            .iter()
            .enumerate()
            .filter(|(i, p)| !worker.providers[..*i].contains(p))
            .map(|(_, p)| p)
    }

    pub(super) fn add(&mut self, worker: &Worker, reason: Option<Ineligible>) {
        self.all.put(reason);
        if worker.providers.is_empty() {
            self.every_provider.put(reason);
        }
        for p in ReasonCounts::listed_by(worker) {
            self.listed.entry(p.clone()).or_default().put(reason);
        }
    }

    pub(super) fn remove(&mut self, worker: &Worker, reason: Option<Ineligible>) {
        self.all.take(reason);
        if worker.providers.is_empty() {
            self.every_provider.take(reason);
        }
        for p in ReasonCounts::listed_by(worker) {
            if let Some(counts) = self.listed.get_mut(p) {
                counts.take(reason);
                if counts.total() == 0 {
                    self.listed.remove(p);
                }
            }
        }
    }

    /// The workers that run `provider` (`""`: every worker), by reason.
    pub(super) fn supporting(&self, provider: &str) -> Counts {
        if provider.is_empty() {
            return self.all;
        }
        match self.listed.get(provider) {
            Some(listed) => self.every_provider.plus(listed),
            None => self.every_provider,
        }
    }
}
