//! Admission on the control plane: a spawn request with defaults and
//! limits applied (`resolve`), the owner's limits (`limits_for`), and the
//! question put to the scheduler.

use std::collections::BTreeMap;

use super::{Lifecycle, LifecycleError};
use crate::sandboxes::{SpawnSpec, validate_owner_id};
use crate::scheduler::{Admission, AdmissionQuery, Limits};

/// A spawn as asked, before defaults and limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpawnRequest {
    pub image: Option<String>,
    pub provider: Option<String>,
    pub memory_mb: Option<u64>,
    pub vcpus: Option<u64>,
    pub ttl_ms: Option<i64>,
    pub owner_id: String,
    pub metadata: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    /// The id to create (worker.spawn names the sandbox by its lease);
    /// `None` makes a fresh one.
    pub sandbox_id: Option<String>,
}

/// The admission limits for `owner`: `[sandboxes]`, tightened by the
/// owner's `[quotas.<owner>]` policy where it has one (a quota can only
/// lower a fleet-wide limit, never raise it).
pub fn limits_for(config: &crate::config::Config, owner: &str) -> Limits {
    let fleet = &config.sandboxes;
    let mut limits = Limits {
        max_ttl_ms: fleet.max_ttl.as_millis() as i64,
        max_sandboxes: fleet.max_sandboxes,
        max_per_owner: fleet.max_per_owner,
    };
    if let Some(q) = (!owner.is_empty())
        .then(|| config.quotas.get(owner))
        .flatten()
    {
        if let Some(ttl) = q.max_ttl {
            limits.max_ttl_ms = limits.max_ttl_ms.min(ttl.as_millis() as i64);
        }
        if let Some(n) = q.max_sandboxes {
            limits.max_per_owner = match limits.max_per_owner {
                0 => n,
                fleet => fleet.min(n),
            };
        }
    }
    limits
}

impl Lifecycle {
    /// Applies defaults and limits. An unknown provider is `NotFound`.
    pub fn resolve(&self, req: &SpawnRequest) -> Result<SpawnSpec, LifecycleError> {
        let config = self.live.get();
        let c = &config.sandboxes;
        let provider = req
            .provider
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| self.providers().default_name().to_owned());
        if self.providers().get(&provider).is_none() {
            return Err(LifecycleError::NotFound(format!(
                "unknown provider {provider:?} (configured: {})",
                self.providers().names().join(", ")
            )));
        }
        let image = req
            .image
            .clone()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| c.default_image.clone());
        crate::workers::validate_name("image", &image).map_err(LifecycleError::Invalid)?;
        if let Some(p) = self.providers().get(&provider) {
            p.check_image(&image).map_err(LifecycleError::Invalid)?;
        }
        let memory_mb = req.memory_mb.unwrap_or(u64::from(c.default_memory_mb));
        if memory_mb == 0 || memory_mb > u64::from(c.max_memory_mb) {
            return Err(LifecycleError::Invalid(format!(
                "field `memory_mb` must be from 1 to {}",
                c.max_memory_mb
            )));
        }
        let vcpus = req.vcpus.unwrap_or(u64::from(c.default_vcpus));
        if vcpus == 0 || vcpus > u64::from(c.max_vcpus) {
            return Err(LifecycleError::Invalid(format!(
                "field `vcpus` must be from 1 to {}",
                c.max_vcpus
            )));
        }
        let ttl_ms = req.ttl_ms.unwrap_or(c.default_ttl.as_millis() as i64);
        if ttl_ms <= 0 {
            return Err(LifecycleError::Invalid(
                "field `ttl` must be positive".into(),
            ));
        }
        validate_owner_id(&req.owner_id).map_err(LifecycleError::Invalid)?;
        Ok(SpawnSpec {
            image,
            provider,
            memory_mb: memory_mb as u32,
            vcpus: vcpus as u32,
            ttl_ms,
            owner_id: req.owner_id.clone(),
            metadata: req.metadata.clone(),
        })
    }

    pub(super) fn query(&self, spec: &SpawnSpec, reserve: bool) -> AdmissionQuery {
        let config = self.live.get();
        AdmissionQuery {
            provider: spec.provider.clone(),
            owner_id: spec.owner_id.clone(),
            ttl_ms: spec.ttl_ms,
            limits: limits_for(&config, &spec.owner_id),
            reserve,
        }
    }

    /// Preflight: what a spawn would be told now, creating nothing.
    pub fn admission(&self, req: &SpawnRequest) -> Result<Admission, LifecycleError> {
        let spec = self.resolve(req)?;
        Ok(self.scheduler.admit(self.query(&spec, false), true)?)
    }
}
