//! The lease state machine: who may mutate a resource, fenced by a
//! generation number. Pure: the current lease and `now` are parameters, the
//! new lease is the result. The store applies these rules inside its
//! transaction, so a decision and its write are atomic.
//!
//! Rules (DESIGN.md, "Leases"):
//! - acquire succeeds when there is no lease, the lease expired or was
//!   released, or the same holder asks again while it still holds it; it is
//!   refused while another holder has an unexpired lease, and a refusal
//!   changes nothing;
//! - renew succeeds only for the current holder before expiry;
//! - release succeeds only for the current holder; the row stays, so the
//!   generation is never lost;
//! - `generation` is the fencing token: strictly increasing per resource,
//!   bumped on every acquire after a gap (expiry or release) or by a new
//!   holder, never reused, never decreasing.

/// Times are epoch milliseconds (the store's representation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub resource_id: String,
    pub resource_type: String,
    /// Empty once released.
    pub holder_id: String,
    pub generation: u64,
    pub acquired_at_ms: i64,
    pub renewed_at_ms: i64,
    pub expires_at_ms: i64,
    /// How many times ownership changed hands (acquires after a gap).
    pub transitions: u64,
}

impl Lease {
    /// Held by someone and not yet expired at `now`.
    pub fn is_active(&self, now_ms: i64) -> bool {
        !self.holder_id.is_empty() && now_ms < self.expires_at_ms
    }

    pub fn is_held_by(&self, holder: &str, now_ms: i64) -> bool {
        self.is_active(now_ms) && self.holder_id == holder
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseError {
    /// Another holder owns an unexpired lease.
    Conflict {
        holder_id: String,
        expires_at_ms: i64,
    },
    /// Renew or release of a lease that does not exist.
    NotFound,
    /// Renew or release by someone who is not the holder.
    NotHolder { holder_id: String },
    /// Renew after expiry: the holder must acquire again (new generation).
    Expired { expired_at_ms: i64 },
    /// A fencing token older than one already seen for this resource.
    StaleGeneration { presented: u64, current: u64 },
    /// Bad arguments (empty ids, non-positive ttl).
    Invalid(String),
}

impl std::error::Error for LeaseError {}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseError::Conflict {
                holder_id,
                expires_at_ms,
            } => write!(
                f,
                "lease is held by {holder_id} until {}",
                crate::time::rfc3339(*expires_at_ms)
            ),
            LeaseError::NotFound => write!(f, "no lease for this resource"),
            LeaseError::NotHolder { holder_id } if holder_id.is_empty() => {
                write!(f, "the lease was released")
            }
            LeaseError::NotHolder { holder_id } => write!(f, "lease is held by {holder_id}"),
            LeaseError::Expired { expired_at_ms } => {
                write!(
                    f,
                    "lease expired at {}",
                    crate::time::rfc3339(*expired_at_ms)
                )
            }
            LeaseError::StaleGeneration { presented, current } => {
                write!(f, "generation {presented} is older than {current}")
            }
            LeaseError::Invalid(why) => f.write_str(why),
        }
    }
}

/// What an acquire did, for logs, events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// No lease existed: generation 1.
    New,
    /// Taken after expiry, release, or from a previous holder: generation+1.
    Transferred,
    /// The holder already held it: expiry extended, generation unchanged.
    Extended,
}

pub fn acquire(
    current: Option<&Lease>,
    resource_id: &str,
    resource_type: &str,
    holder_id: &str,
    ttl_ms: i64,
    now_ms: i64,
) -> Result<(Lease, Acquired), LeaseError> {
    if resource_id.is_empty() || holder_id.is_empty() {
        return Err(LeaseError::Invalid(
            "resource_id and holder_id must not be empty".into(),
        ));
    }
    if ttl_ms <= 0 {
        return Err(LeaseError::Invalid("ttl must be positive".into()));
    }
    let expires_at_ms = now_ms.saturating_add(ttl_ms);
    match current {
        None => Ok((
            Lease {
                resource_id: resource_id.to_owned(),
                resource_type: resource_type.to_owned(),
                holder_id: holder_id.to_owned(),
                generation: 1,
                acquired_at_ms: now_ms,
                renewed_at_ms: now_ms,
                expires_at_ms,
                transitions: 1,
            },
            Acquired::New,
        )),
        Some(lease) if lease.is_held_by(holder_id, now_ms) => Ok((
            Lease {
                renewed_at_ms: now_ms,
                expires_at_ms: expires_at_ms.max(lease.expires_at_ms),
                ..lease.clone()
            },
            Acquired::Extended,
        )),
        Some(lease) if lease.is_active(now_ms) => Err(LeaseError::Conflict {
            holder_id: lease.holder_id.clone(),
            expires_at_ms: lease.expires_at_ms,
        }),
        Some(lease) => Ok((
            Lease {
                resource_id: lease.resource_id.clone(),
                resource_type: if resource_type.is_empty() {
                    lease.resource_type.clone()
                } else {
                    resource_type.to_owned()
                },
                holder_id: holder_id.to_owned(),
                generation: lease.generation + 1,
                acquired_at_ms: now_ms,
                renewed_at_ms: now_ms,
                expires_at_ms,
                transitions: lease.transitions + 1,
            },
            Acquired::Transferred,
        )),
    }
}

/// Checks that `holder` may act on `lease` now: the common part of renew,
/// release and fenced mutations.
pub fn check_holder<'l>(
    current: Option<&'l Lease>,
    holder_id: &str,
    now_ms: i64,
) -> Result<&'l Lease, LeaseError> {
    let lease = current.ok_or(LeaseError::NotFound)?;
    if lease.holder_id != holder_id {
        return Err(LeaseError::NotHolder {
            holder_id: lease.holder_id.clone(),
        });
    }
    if now_ms >= lease.expires_at_ms {
        return Err(LeaseError::Expired {
            expired_at_ms: lease.expires_at_ms,
        });
    }
    Ok(lease)
}

pub fn renew(
    current: Option<&Lease>,
    holder_id: &str,
    ttl_ms: i64,
    now_ms: i64,
) -> Result<Lease, LeaseError> {
    if ttl_ms <= 0 {
        return Err(LeaseError::Invalid("ttl must be positive".into()));
    }
    let lease = check_holder(current, holder_id, now_ms)?;
    Ok(Lease {
        renewed_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(ttl_ms).max(lease.expires_at_ms),
        ..lease.clone()
    })
}

/// Releasing keeps the row (and its generation): holder cleared, expired now.
pub fn release(current: Option<&Lease>, holder_id: &str, now_ms: i64) -> Result<Lease, LeaseError> {
    let lease = check_holder(current, holder_id, now_ms)?;
    Ok(Lease {
        holder_id: String::new(),
        renewed_at_ms: now_ms,
        expires_at_ms: now_ms,
        ..lease.clone()
    })
}

/// The acting worker's fence: refuses a token older than the highest
/// generation it has seen for the resource.
pub fn check_generation(presented: u64, highest_seen: u64) -> Result<(), LeaseError> {
    if presented < highest_seen {
        Err(LeaseError::StaleGeneration {
            presented,
            current: highest_seen,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTL: i64 = 1000;

    #[test]
    fn acquire_table() {
        let (a, kind) = acquire(None, "sb-1", "sandbox", "w1", TTL, 0).unwrap();
        assert_eq!(
            (a.generation, kind, a.expires_at_ms),
            (1, Acquired::New, 1000)
        );
        // Same holder, unexpired: extended, same generation.
        let (b, kind) = acquire(Some(&a), "sb-1", "sandbox", "w1", TTL, 500).unwrap();
        assert_eq!(
            (b.generation, kind, b.expires_at_ms),
            (1, Acquired::Extended, 1500)
        );
        // Rival while unexpired: refused.
        assert!(matches!(
            acquire(Some(&b), "sb-1", "sandbox", "w2", TTL, 1499),
            Err(LeaseError::Conflict { .. })
        ));
        // Rival after expiry: transferred, generation bumped.
        let (c, kind) = acquire(Some(&b), "sb-1", "sandbox", "w2", TTL, 1500).unwrap();
        assert_eq!(
            (c.generation, kind, c.holder_id.as_str()),
            (2, Acquired::Transferred, "w2")
        );
        // Release keeps the generation; the next acquire bumps it, even by the same holder.
        let d = release(Some(&c), "w2", 1600).unwrap();
        assert_eq!((d.generation, d.holder_id.as_str()), (2, ""));
        let (e, _) = acquire(Some(&d), "sb-1", "sandbox", "w2", TTL, 1600).unwrap();
        assert_eq!(e.generation, 3);
    }

    #[test]
    fn renew_and_release_need_the_live_holder() {
        let (a, _) = acquire(None, "r", "t", "w1", TTL, 0).unwrap();
        assert_eq!(renew(Some(&a), "w1", TTL, 900).unwrap().expires_at_ms, 1900);
        assert!(matches!(
            renew(Some(&a), "w2", TTL, 900),
            Err(LeaseError::NotHolder { .. })
        ));
        assert!(matches!(
            renew(Some(&a), "w1", TTL, 1000),
            Err(LeaseError::Expired { .. })
        ));
        assert!(matches!(
            renew(None, "w1", TTL, 0),
            Err(LeaseError::NotFound)
        ));
        assert!(matches!(
            release(Some(&a), "w2", 10),
            Err(LeaseError::NotHolder { .. })
        ));
        let released = release(Some(&a), "w1", 10).unwrap();
        assert!(matches!(
            renew(Some(&released), "w1", TTL, 20),
            Err(LeaseError::NotHolder { .. })
        ));
    }

    #[test]
    fn fencing() {
        assert!(check_generation(3, 3).is_ok());
        assert!(check_generation(4, 3).is_ok());
        assert_eq!(
            check_generation(2, 3),
            Err(LeaseError::StaleGeneration {
                presented: 2,
                current: 3
            })
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire(u8),
        Renew(u8),
        Release(u8),
        Wait(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3).prop_map(Op::Acquire),
            (0u8..3).prop_map(Op::Renew),
            (0u8..3).prop_map(Op::Release),
            (0u16..1500).prop_map(Op::Wait),
        ]
    }

    /// The reference model: the simplest statement of the rules, kept apart
    /// from the implementation above.
    #[derive(Default)]
    struct Model {
        holder: Option<(u8, i64)>, // (holder, expires_at)
        generation: u64,
    }

    impl Model {
        fn live_holder(&self, now: i64) -> Option<u8> {
            self.holder.filter(|(_, exp)| now < *exp).map(|(h, _)| h)
        }
    }

    proptest! {
        #[test]
        fn matches_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
            let mut now = 0i64;
            let mut lease: Option<Lease> = None;
            let mut model = Model::default();
            let mut last_generation = 0;
            for op in ops {
                match op {
                    Op::Wait(ms) => now += i64::from(ms),
                    Op::Acquire(h) => {
                        let result = acquire(lease.as_ref(), "r", "t", &h.to_string(), TTL, now);
                        match model.live_holder(now) {
                            Some(owner) if owner != h => {
                                let refused = matches!(result, Err(LeaseError::Conflict { .. }));
                                prop_assert!(refused, "a rival's acquire must be refused");
                            }
                            Some(_) => {
                                let (l, _) = result.unwrap();
                                prop_assert_eq!(l.generation, model.generation);
                                model.holder = Some((h, now + TTL));
                                lease = Some(l);
                            }
                            None => {
                                let (l, _) = result.unwrap();
                                model.generation += 1;
                                prop_assert_eq!(l.generation, model.generation);
                                model.holder = Some((h, now + TTL));
                                lease = Some(l);
                            }
                        }
                    }
                    Op::Renew(h) => {
                        let result = renew(lease.as_ref(), &h.to_string(), TTL, now);
                        if model.live_holder(now) == Some(h) {
                            let l = result.unwrap();
                            model.holder = Some((h, now + TTL));
                            lease = Some(l);
                        } else {
                            prop_assert!(result.is_err());
                        }
                    }
                    Op::Release(h) => {
                        let result = release(lease.as_ref(), &h.to_string(), now);
                        if model.live_holder(now) == Some(h) {
                            lease = Some(result.unwrap());
                            model.holder = None;
                        } else {
                            prop_assert!(result.is_err());
                        }
                    }
                }
                // Invariants: never two live holders (one row, one holder),
                // generations never go back.
                let generation = lease.as_ref().map_or(0, |l| l.generation);
                prop_assert!(generation >= last_generation);
                last_generation = generation;
                prop_assert_eq!(lease.as_ref().map(|l| l.is_active(now)).unwrap_or(false), model.live_holder(now).is_some());
            }
        }
    }
}
