//! The decisions of the reference fleet scheduler (`sevplacectl fleet`),
//! pure: the allocation-candidate queries in the agent's own preference
//! order, best fit among Placement's answer, the consumer UUID of a VM id,
//! and the host an L3 provider belongs to. The calls are in `ctl::fleet`.
//!
//! Placement does not rank candidates and never splits one amount across
//! providers (docs/fleet.md), so the scheduler asks stage by stage and
//! chooses itself:
//! 1. `pool`: one L3 domain already in the VM's pool;
//! 2. `empty`: one empty domain, taking its open token;
//! 3. `spread-k`: k domains (k = 2..=[`MAX_SPREAD`]) of the pool or empty,
//!    `group_policy=isolate`, kept only where all k hang under one NUMA
//!    provider.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::tree::{
    MANAGED_TRAIT, OPEN_CLASS, PCPU_CLASS, POOL_CONFIDENTIAL, POOL_EMPTY, POOL_GENERAL,
    SEV_ES_TRAIT, SEV_SNP_TRAIT, SEV_TRAIT,
};
use crate::types::ConfidentialClass;

/// Most L3 domains one VM is spread over.
pub(crate) const MAX_SPREAD: u32 = 8;

/// What a VM asks of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FleetAsk {
    pub(crate) vcpus: u32,
    pub(crate) class: ConfidentialClass,
}

/// A stage of the preference order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// One domain already in the VM's pool.
    Pool,
    /// One empty domain (with its open token).
    Empty,
    /// This many domains under one NUMA node.
    Spread(u32),
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pool => f.write_str("pool"),
            Self::Empty => f.write_str("empty"),
            Self::Spread(k) => write!(f, "spread-{k}"),
        }
    }
}

/// One `GET /allocation_candidates` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CandidateQuery {
    pub(crate) stage: Stage,
    /// The query string, without `?`.
    pub(crate) query: String,
}

/// The pool trait of a class's domains.
pub(crate) fn pool_trait(class: ConfidentialClass) -> &'static str {
    if class.is_confidential() {
        POOL_CONFIDENTIAL
    } else {
        POOL_GENERAL
    }
}

/// Traits the root (the host) must have: managed by sevplace, and the
/// class's os-traits SEV trait.
pub(crate) fn required_root_traits(class: ConfidentialClass) -> Vec<&'static str> {
    let mut t = vec![MANAGED_TRAIT];
    match class {
        ConfidentialClass::None => {}
        ConfidentialClass::Sev => t.push(SEV_TRAIT),
        ConfidentialClass::SevEs => t.push(SEV_ES_TRAIT),
        ConfidentialClass::SevSnp => t.push(SEV_SNP_TRAIT),
    }
    t
}

/// `n` split into `k` amounts that differ by at most one, largest first.
pub(crate) fn split(n: u32, k: u32) -> Vec<u32> {
    (0..k).map(|i| n / k + u32::from(i < n % k)).collect()
}

/// The queries, in preference order. A VM of `n` vCPUs is spread over at
/// most `min(n, MAX_SPREAD)` domains.
pub(crate) fn queries(ask: FleetAsk) -> Vec<CandidateQuery> {
    let n = ask.vcpus;
    let root = format!(
        "root_required={}",
        required_root_traits(ask.class).join(",")
    );
    let pool = pool_trait(ask.class);
    let mut q = vec![
        CandidateQuery {
            stage: Stage::Pool,
            query: format!("resources_L3={PCPU_CLASS}:{n}&required_L3={pool}&{root}"),
        },
        CandidateQuery {
            stage: Stage::Empty,
            query: format!(
                "resources_L3={PCPU_CLASS}:{n},{OPEN_CLASS}:1&required_L3={POOL_EMPTY}&{root}"
            ),
        },
    ];
    for k in 2..=n.min(MAX_SPREAD) {
        let groups: Vec<String> = split(n, k)
            .iter()
            .enumerate()
            .map(|(i, a)| {
                format!("resources_S{i}={PCPU_CLASS}:{a}&required_S{i}=in:{pool},{POOL_EMPTY}")
            })
            .collect();
        q.push(CandidateQuery {
            stage: Stage::Spread(k),
            query: format!("{}&group_policy=isolate&{root}", groups.join("&")),
        });
    }
    q
}

/// One candidate of Placement's answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate {
    /// The `allocations` object of its allocation request, claimed as is.
    pub(crate) allocations: Map<String, Value>,
    /// Providers that get `CUSTOM_SEVPLACE_PCPU`, sorted.
    pub(crate) l3: Vec<String>,
    /// CPUs left free on those providers after the claim.
    pub(crate) leftover: u64,
}

/// Why Placement's answer is not what the scheduler reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allocation candidates: {0}")]
pub(crate) struct AnswerError(pub String);

fn amount(v: &Value, class: &str) -> u64 {
    v["resources"][class].as_u64().unwrap_or(0)
}

/// The candidates of `answer`, best fit first: the least CPUs left free on
/// the chosen domains, then the fewest domains, then by provider UUID
/// (deterministic). A candidate spread over domains of different NUMA
/// nodes (different parents) is dropped.
pub(crate) fn rank(answer: &Value) -> Result<Vec<Candidate>, AnswerError> {
    let requests = answer["allocation_requests"]
        .as_array()
        .ok_or_else(|| AnswerError("no allocation_requests array".into()))?;
    let summaries = answer["provider_summaries"]
        .as_object()
        .ok_or_else(|| AnswerError("no provider_summaries object".into()))?;
    let mut out = Vec::with_capacity(requests.len());
    for r in requests {
        let allocations = r["allocations"]
            .as_object()
            .ok_or_else(|| AnswerError("an allocation request without allocations".into()))?
            .clone();
        let mut l3 = Vec::new();
        let mut leftover = 0u64;
        let mut parents = BTreeSet::new();
        for (rp, alloc) in &allocations {
            let want = amount(alloc, PCPU_CLASS);
            if want == 0 {
                continue;
            }
            let s = summaries
                .get(rp)
                .ok_or_else(|| AnswerError(format!("provider {rp} has no summary")))?;
            let pcpu = &s["resources"][PCPU_CLASS];
            let capacity = pcpu["capacity"].as_u64().unwrap_or(0);
            let used = pcpu["used"].as_u64().unwrap_or(0);
            leftover += capacity.saturating_sub(used).saturating_sub(want);
            parents.insert(s["parent_provider_uuid"].as_str().unwrap_or("").to_string());
            l3.push(rp.clone());
        }
        if l3.is_empty() || parents.len() > 1 {
            continue;
        }
        l3.sort();
        out.push(Candidate {
            allocations,
            l3,
            leftover,
        });
    }
    out.sort_by(|a, b| (a.leftover, a.l3.len(), &a.l3).cmp(&(b.leftover, b.l3.len(), &b.l3)));
    Ok(out)
}

/// The host of an L3 provider named `<host>_l3_<index>`.
pub(crate) fn host_of_l3(provider_name: &str) -> Option<&str> {
    let (host, index) = provider_name.rsplit_once("_l3_")?;
    (!host.is_empty() && !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
        .then_some(host)
}

/// The consumer UUID the scheduler gives VM `vm_id` when none is named: a
/// name-based UUID (RFC 9562 version 8, from SHA-256 of the id), so
/// `fleet release ID` finds the claim `fleet place ID` made.
pub(crate) fn consumer_uuid(vm_id: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("sevplace-fleet-consumer:{vm_id}").as_bytes(),
    );
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The claim body for `PUT /allocations/{consumer}` of a new consumer.
pub(crate) fn claim_body(candidate: &Candidate, project_id: &str, user_id: &str) -> Value {
    serde_json::json!({
        "allocations": candidate.allocations,
        "consumer_generation": null,
        "project_id": project_id,
        "user_id": user_id,
        "consumer_type": "INSTANCE",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn queries_follow_the_agents_preference_order() {
        let q = queries(FleetAsk {
            vcpus: 3,
            class: ConfidentialClass::SevEs,
        });
        let stages: Vec<String> = q.iter().map(|c| c.stage.to_string()).collect();
        assert_eq!(stages, ["pool", "empty", "spread-2", "spread-3"]);
        assert_eq!(
            q[0].query,
            "resources_L3=CUSTOM_SEVPLACE_PCPU:3&required_L3=CUSTOM_SEVPLACE_POOL_CONFIDENTIAL&root_required=CUSTOM_SEVPLACE_MANAGED,HW_CPU_X86_AMD_SEV_ES"
        );
        assert_eq!(
            q[1].query,
            "resources_L3=CUSTOM_SEVPLACE_PCPU:3,CUSTOM_SEVPLACE_L3_OPEN:1&required_L3=CUSTOM_SEVPLACE_POOL_EMPTY&root_required=CUSTOM_SEVPLACE_MANAGED,HW_CPU_X86_AMD_SEV_ES"
        );
        assert_eq!(
            q[2].query,
            "resources_S0=CUSTOM_SEVPLACE_PCPU:2&required_S0=in:CUSTOM_SEVPLACE_POOL_CONFIDENTIAL,CUSTOM_SEVPLACE_POOL_EMPTY&resources_S1=CUSTOM_SEVPLACE_PCPU:1&required_S1=in:CUSTOM_SEVPLACE_POOL_CONFIDENTIAL,CUSTOM_SEVPLACE_POOL_EMPTY&group_policy=isolate&root_required=CUSTOM_SEVPLACE_MANAGED,HW_CPU_X86_AMD_SEV_ES"
        );
        let plain = queries(FleetAsk {
            vcpus: 1,
            class: ConfidentialClass::None,
        });
        assert_eq!(plain.len(), 2, "one vCPU is never spread");
        assert!(plain[0].query.contains(
            "required_L3=CUSTOM_SEVPLACE_POOL_GENERAL&root_required=CUSTOM_SEVPLACE_MANAGED"
        ));
        assert!(!plain[0].query.contains("HW_CPU"));
        let big = queries(FleetAsk {
            vcpus: 100,
            class: ConfidentialClass::Sev,
        });
        assert_eq!(big.last().map(|c| c.stage), Some(Stage::Spread(MAX_SPREAD)));
    }

    #[test]
    fn split_is_even() {
        for (n, k, want) in [
            (4, 2, vec![2, 2]),
            (5, 2, vec![3, 2]),
            (7, 3, vec![3, 2, 2]),
            (2, 2, vec![1, 1]),
        ] {
            assert_eq!(split(n, k), want, "{n} over {k}");
            assert_eq!(split(n, k).iter().sum::<u32>(), n);
        }
    }

    fn summary(capacity: u64, used: u64, parent: &str) -> Value {
        json!({"resources": {PCPU_CLASS: {"capacity": capacity, "used": used}},
               "parent_provider_uuid": parent, "root_provider_uuid": "root"})
    }

    fn request(parts: &[(&str, u64)]) -> Value {
        let mut m = Map::new();
        for (rp, n) in parts {
            m.insert((*rp).into(), json!({"resources": {PCPU_CLASS: n}}));
        }
        json!({"allocations": m})
    }

    #[test]
    fn rank_is_best_fit_and_drops_cross_numa_spreads() {
        let answer = json!({
            "allocation_requests": [
                request(&[("roomy", 4)]),
                request(&[("tight", 4)]),
                request(&[("a", 2), ("b", 2)]),
                request(&[("a", 2), ("other-node", 2)]),
            ],
            "provider_summaries": {
                "roomy": summary(16, 0, "n0"),
                "tight": summary(16, 10, "n0"),
                "a": summary(16, 13, "n0"),
                "b": summary(16, 13, "n0"),
                "other-node": summary(16, 14, "n1"),
            }
        });
        let ranked = rank(&answer).unwrap();
        let order: Vec<(Vec<String>, u64)> =
            ranked.iter().map(|c| (c.l3.clone(), c.leftover)).collect();
        let want: Vec<(Vec<String>, u64)> = vec![
            (vec!["tight".into()], 2),
            (vec!["a".into(), "b".into()], 2),
            (vec!["roomy".into()], 12),
        ];
        assert_eq!(
            order, want,
            "best fit first; the cross-NUMA spread is dropped"
        );
    }

    #[test]
    fn rank_refuses_answers_it_cannot_read() {
        for bad in [
            json!({}),
            json!({"allocation_requests": []}),
            json!({"allocation_requests": [{"x": 1}], "provider_summaries": {}}),
            json!({"allocation_requests": [request(&[("ghost", 1)])], "provider_summaries": {}}),
        ] {
            assert!(rank(&bad).is_err(), "{bad}");
        }
        let empty = json!({"allocation_requests": [], "provider_summaries": {}});
        assert_eq!(rank(&empty).unwrap(), vec![]);
    }

    #[test]
    fn host_of_l3_names() {
        for (name, want) in [
            ("compute-17_l3_3", Some("compute-17")),
            ("a_l3_b_l3_12", Some("a_l3_b")),
            ("compute-17_numa0", None),
            ("compute-17_l3_", None),
            ("_l3_1", None),
            ("compute-17_l3_x", None),
        ] {
            assert_eq!(host_of_l3(name), want, "{name}");
        }
    }

    #[test]
    fn consumer_uuid_is_stable_and_well_formed() {
        let u = consumer_uuid("vm-1");
        assert_eq!(u, consumer_uuid("vm-1"));
        assert_ne!(u, consumer_uuid("vm-2"));
        let parts: Vec<&str> = u.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('8'), "version 8: {u}");
        assert!(
            matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
            "variant: {u}"
        );
        assert!(crate::fleet::consumer_from_parts(&u, "p", "u").is_ok());
    }
}
