//! What a pooled tube's call means for its members (protocols.md §10, CDC
//! App. B-C Dorfman deconvolution).

use std::collections::BTreeSet;

use serde::Serialize;

use super::{Call, KitRef, WellCall};
use crate::domain::{Barcode, PoolSize};
use crate::kit::KitDefinition;

/// One member of a not-detected pool, released on the pool's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberRelease {
    /// The member's tube.
    pub barcode: Barcode,
    /// Always [`Call::NotDetected`].
    pub call: Call,
    /// Says that pooling was used, as CDC App. C asks for every member of
    /// a negative pool.
    pub note: String,
}

/// What a pool's call means.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum PoolOutcome {
    /// The tube's own call is reported with its pool size: a single swab,
    /// or a pool whose members pcrd does not know (mixed sampling at
    /// collection, where a positive tube sends every member to be
    /// re-sampled outside the lab's records).
    Reported {
        /// Kit id and version that decided the call.
        kit: KitRef,
        /// The call reported for the tube.
        call: Call,
        /// How many swabs the tube holds.
        pool_size: PoolSize,
        /// What the pool size means for the result.
        note: String,
    },
    /// A not-detected pool: every member released as not detected, each
    /// with a note that pooling was used.
    MembersReleased {
        /// Kit id and version that decided the pool's call.
        kit: KitRef,
        /// The pool size.
        pool_size: PoolSize,
        /// One entry per member, in the order given.
        members: Vec<MemberRelease>,
    },
    /// Nothing is reported for the pool; each member is tested and
    /// reported on its own: the pool was detected, inconclusive, to be
    /// retested or invalid, or larger than the kit accepts.
    MembersRetest {
        /// Kit id and version that decided the pool's call.
        kit: KitRef,
        /// The pool size.
        pool_size: PoolSize,
        /// The pool's own call.
        pool_call: Call,
        /// Why the members are retested.
        reason: String,
        /// The members to test individually, in the order given.
        members: Vec<Barcode>,
    },
}

/// Why a pool's outcome could not be worked out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// Members were registered, but not as many as the pool size says:
    /// releasing on the pool's result could skip or invent a member.
    #[error("pool of {pool_size} has {members} registered members; register all of them or none")]
    MemberCount {
        /// The pool size.
        pool_size: u8,
        /// How many members were given.
        members: usize,
    },
    /// The same tube is listed twice among the members.
    #[error("pool member {barcode} is listed more than once")]
    DuplicateMember {
        /// The repeated barcode.
        barcode: Barcode,
    },
    /// The call was made by another kit (or another version of it).
    #[error("the pool's call was made with kit {call_kit}, not {kit}")]
    OtherKit {
        /// The kit that made the call.
        call_kit: String,
        /// This kit.
        kit: String,
    },
}

impl KitDefinition {
    /// What a pooled tube's `call` means for the tube and its
    /// `registered_members` (empty when pcrd does not know them).
    ///
    /// - A single swab (pool size 1): the call is reported.
    /// - No registered members: the call is reported with the pool size;
    ///   a detected pool means every member must be re-sampled.
    /// - Registered members, pool not detected: every member is released as
    ///   not detected with a "pooled" note.
    /// - Registered members, any other call: each member is retested on its
    ///   own and nothing is reported for the pool (CDC App. C).
    /// - A pool larger than the kit's `max_pool_size` is not validated: a
    ///   not-detected result says nothing about its members, so its members
    ///   are retested (or, unknown, the tube is reported invalid); a
    ///   detected one is still detected.
    ///
    /// A call held for QC review ([`WellCall::is_held`]) holds what follows
    /// from it as well; that is the caller's to enforce.
    pub fn pool_outcome(
        &self,
        call: &WellCall,
        pool_size: PoolSize,
        registered_members: &[Barcode],
    ) -> Result<PoolOutcome, PoolError> {
        let kit = self.kit_ref();
        if call.kit != kit {
            return Err(PoolError::OtherKit {
                call_kit: call.kit.to_string(),
                kit: kit.to_string(),
            });
        }
        let n = pool_size.get();
        if !registered_members.is_empty() && registered_members.len() != usize::from(n) {
            return Err(PoolError::MemberCount {
                pool_size: n,
                members: registered_members.len(),
            });
        }
        let mut seen = BTreeSet::new();
        if let Some(repeated) = registered_members.iter().find(|b| !seen.insert(*b)) {
            return Err(PoolError::DuplicateMember {
                barcode: repeated.clone(),
            });
        }
        let pool_call = call.call;
        if n == 1 {
            return Ok(PoolOutcome::Reported {
                kit,
                call: pool_call,
                pool_size,
                note: "single specimen, not pooled".to_owned(),
            });
        }
        let over = self.max_pool_size().filter(|&max| pool_size > max);
        if registered_members.is_empty() {
            let (call, note) = match (pool_call, over) {
                (Call::NotDetected, Some(max)) => (
                    Call::Invalid,
                    format!(
                        "pool of {n} is larger than kit {kit} accepts ({max}): a not-detected result cannot be reported; re-sample each member and test individually"
                    ),
                ),
                (Call::NotDetected, None) => (
                    Call::NotDetected,
                    format!("pool of {n}: not detected for every swab in the tube"),
                ),
                (Call::Detected, _) => (
                    Call::Detected,
                    format!(
                        "pool of {n}: detected in the pooled tube; re-sample each member and test individually"
                    ),
                ),
                (other, _) => (
                    other,
                    format!("pool of {n}: {other}; the members are not known to the lab"),
                ),
            };
            return Ok(PoolOutcome::Reported {
                kit,
                call,
                pool_size,
                note,
            });
        }
        let retest = |reason: String| PoolOutcome::MembersRetest {
            kit: kit.clone(),
            pool_size,
            pool_call,
            reason,
            members: registered_members.to_vec(),
        };
        Ok(match (pool_call, over) {
            (_, Some(max)) => retest(format!(
                "pool of {n} is larger than kit {kit} accepts ({max}): test and report each member individually"
            )),
            (Call::NotDetected, None) => PoolOutcome::MembersReleased {
                kit: kit.clone(),
                pool_size,
                members: registered_members
                    .iter()
                    .map(|barcode| MemberRelease {
                        barcode: barcode.clone(),
                        call: Call::NotDetected,
                        note: format!(
                            "pooled: tested in a pool of {n} that was not detected (kit {kit})"
                        ),
                    })
                    .collect(),
            },
            (other, None) => retest(format!(
                "pool {other}: report nothing for the pool; test and report each member individually"
            )),
        })
    }
}
