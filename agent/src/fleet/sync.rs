//! The reporter: makes Placement hold the [`DesiredTree`] of this host.
//!
//! Each sync lists the tree (one call), creates or re-parents missing
//! providers, deletes this host's providers that no longer exist, sets
//! traits and inventories where they differ, and rewrites the allocations
//! of this host's consumers to the CPUs the agent chose. Every write names
//! the generation it read; a 409 for a moved generation is answered by
//! reading again and retrying. What was read is kept per provider and
//! reused while the provider's generation is unchanged.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::client::{FleetError, PlacementClient};
use super::tree::{self, DesiredTree, L3Provider};

/// Retries of one write after generation conflicts.
const GENERATION_RETRIES: usize = 8;

pub(crate) use crate::config::fleet::RootChoice;

/// A provider as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProviderInfo {
    uuid: String,
    name: String,
    generation: u64,
    parent: Option<String>,
}

fn provider_info(v: &Value) -> Option<ProviderInfo> {
    Some(ProviderInfo {
        uuid: v["uuid"].as_str()?.to_string(),
        name: v["name"].as_str()?.to_string(),
        generation: v["generation"].as_u64()?,
        parent: v["parent_provider_uuid"].as_str().map(str::to_string),
    })
}

/// Traits and inventories of one provider at one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProviderState {
    generation: u64,
    traits: BTreeSet<String>,
    inventories: Inventories,
}

/// Inventories of one provider: class -> (total, reserved).
type Inventories = BTreeMap<String, (u64, u64)>;

/// One part of a provider's state that one PUT replaces whole (see
/// [`Reporter::put_part`]).
struct ProviderPart<T> {
    /// The path under `/resource_providers/{uuid}/`, also the body's key.
    path: &'static str,
    /// What an error message calls the part.
    label: &'static str,
    /// The part within a provider's state.
    field: fn(&mut ProviderState) -> &mut T,
    /// The part as the PUT body carries it.
    body: fn(&T) -> Value,
}

/// A provider's traits.
const TRAITS: ProviderPart<BTreeSet<String>> = ProviderPart {
    path: "traits",
    label: "traits",
    field: traits_of,
    body: traits_json,
};

/// A provider's inventories.
const INVENTORIES: ProviderPart<Inventories> = ProviderPart {
    path: "inventories",
    label: "inventory",
    field: inventories_of,
    body: inventories_json,
};

fn traits_of(s: &mut ProviderState) -> &mut BTreeSet<String> {
    &mut s.traits
}

fn traits_json(traits: &BTreeSet<String>) -> Value {
    json!(traits)
}

fn inventories_of(s: &mut ProviderState) -> &mut Inventories {
    &mut s.inventories
}

fn inventories_json(want: &Inventories) -> Value {
    let mut inv = serde_json::Map::new();
    for (class, (total, reserved)) in want {
        inv.insert(
            class.clone(),
            json!({ "total": total, "reserved": reserved }),
        );
    }
    Value::Object(inv)
}

/// A consumer's allocations as read: provider UUID -> class -> amount.
type Allocations = BTreeMap<String, BTreeMap<String, u64>>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct ConsumerState {
    generation: Option<u64>,
    allocations: Allocations,
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SyncOutcome {
    /// Writes made (0 when Placement already held the tree).
    pub(crate) writes: usize,
    /// Consumers of gone VMs whose allocations were removed: the store can
    /// forget them.
    pub(crate) forgotten: Vec<String>,
    /// Consumers whose allocation Placement refused (no room): their CPUs
    /// are counted in `reserved` until a later sync succeeds.
    pub(crate) unpublished: Vec<String>,
    /// Problems that did not stop the sync (a stale provider in use).
    pub(crate) warnings: Vec<String>,
}

/// Keeps Placement true for one host.
pub(crate) struct Reporter {
    client: PlacementClient,
    root: RootChoice,
    classes_ready: bool,
    known: BTreeMap<String, ProviderState>,
    consumers: BTreeMap<String, ConsumerState>,
}

fn body_error(path: &str, reason: &str) -> FleetError {
    FleetError::Body {
        method: "GET",
        path: path.to_string(),
        reason: reason.to_string(),
    }
}

fn allocations_of(v: &Value) -> Allocations {
    let mut out = Allocations::new();
    if let Some(map) = v["allocations"].as_object() {
        for (rp, a) in map {
            let mut res = BTreeMap::new();
            if let Some(r) = a["resources"].as_object() {
                for (class, n) in r {
                    res.insert(class.clone(), n.as_u64().unwrap_or(0));
                }
            }
            out.insert(rp.clone(), res);
        }
    }
    out
}

fn allocations_json(a: &Allocations) -> Value {
    let mut m = serde_json::Map::new();
    for (rp, res) in a {
        m.insert(rp.clone(), json!({ "resources": res }));
    }
    Value::Object(m)
}

impl Reporter {
    /// A reporter that writes through `client`, under the root provider `root` chooses.
    pub(crate) fn new(client: PlacementClient, root: RootChoice) -> Self {
        Self {
            client,
            root,
            classes_ready: false,
            known: BTreeMap::new(),
            consumers: BTreeMap::new(),
        }
    }

    /// Forgets what was read, so the next sync reads everything again.
    pub(crate) fn forget_cache(&mut self) {
        self.known.clear();
        self.consumers.clear();
    }

    /// Forgets the consumers' allocations read, so the next sync reads each
    /// again. The providers' traits and inventories stay: each sync checks
    /// them against the generations of the tree listing, which Placement
    /// moves on every change of a provider's traits, inventories or
    /// allocations.
    pub(crate) fn forget_consumers(&mut self) {
        self.consumers.clear();
    }

    fn ensure_names(&mut self) -> Result<usize, FleetError> {
        if self.classes_ready {
            return Ok(0);
        }
        for c in tree::CUSTOM_CLASSES {
            self.client
                .call("PUT", &format!("/resource_classes/{c}"), None)?;
        }
        for t in tree::CUSTOM_TRAITS {
            self.client.call("PUT", &format!("/traits/{t}"), None)?;
        }
        self.classes_ready = true;
        Ok(tree::CUSTOM_CLASSES.len() + tree::CUSTOM_TRAITS.len())
    }

    fn by_name(&self, name: &str) -> Result<Option<ProviderInfo>, FleetError> {
        let path = format!("/resource_providers?name={name}");
        let v = self.client.get(&path)?;
        Ok(v["resource_providers"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(provider_info))
    }

    fn resolve_root(&self, host: &str) -> Result<(ProviderInfo, usize), FleetError> {
        match &self.root {
            RootChoice::ExistingUuid(u) => {
                let path = format!("/resource_providers/{u}");
                let v = self.client.get(&path).map_err(|e| {
                    if e.is_not_found() {
                        FleetError::Tree(format!("fleet.root_provider_uuid {u} does not exist"))
                    } else {
                        e
                    }
                })?;
                Ok((
                    provider_info(&v).ok_or_else(|| body_error(&path, "no provider"))?,
                    0,
                ))
            }
            RootChoice::ExistingName(n) => self.by_name(n)?.map(|p| (p, 0)).ok_or_else(|| {
                FleetError::Tree(format!("fleet.root_provider_name {n:?} does not exist"))
            }),
            RootChoice::Own => {
                if let Some(p) = self.by_name(host)? {
                    return Ok((p, 0));
                }
                let v = self
                    .client
                    .post("/resource_providers", &json!({ "name": host }))?;
                Ok((
                    provider_info(&v)
                        .ok_or_else(|| body_error("/resource_providers", "no provider"))?,
                    1,
                ))
            }
        }
    }

    fn list_tree(&self, root: &str) -> Result<Vec<ProviderInfo>, FleetError> {
        let path = format!("/resource_providers?in_tree={root}");
        let v = self.client.get(&path)?;
        Ok(v["resource_providers"]
            .as_array()
            .map(|a| a.iter().filter_map(provider_info).collect())
            .unwrap_or_default())
    }

    /// The provider `name` under `parent`: found in the tree, moved there,
    /// or created.
    fn ensure_child(
        &self,
        tree: &BTreeMap<String, ProviderInfo>,
        name: &str,
        parent: &str,
        writes: &mut usize,
    ) -> Result<ProviderInfo, FleetError> {
        let found = match tree.get(name) {
            Some(p) => Some(p.clone()),
            None => self.by_name(name)?,
        };
        match found {
            Some(p) if p.parent.as_deref() == Some(parent) => Ok(p),
            Some(p) => {
                *writes += 1;
                let v = self.client.put(
                    &format!("/resource_providers/{}", p.uuid),
                    &json!({ "name": name, "parent_provider_uuid": parent }),
                )?;
                provider_info(&v).ok_or_else(|| body_error(name, "no provider"))
            }
            None => {
                *writes += 1;
                let v = self.client.post(
                    "/resource_providers",
                    &json!({ "name": name, "parent_provider_uuid": parent }),
                )?;
                provider_info(&v).ok_or_else(|| body_error(name, "no provider"))
            }
        }
    }

    fn read_state(&self, uuid: &str) -> Result<ProviderState, FleetError> {
        let traits = self
            .client
            .get(&format!("/resource_providers/{uuid}/traits"))?;
        let inv = self
            .client
            .get(&format!("/resource_providers/{uuid}/inventories"))?;
        let mut inventories = BTreeMap::new();
        if let Some(m) = inv["inventories"].as_object() {
            for (class, i) in m {
                inventories.insert(
                    class.clone(),
                    (
                        i["total"].as_u64().unwrap_or(0),
                        i["reserved"].as_u64().unwrap_or(0),
                    ),
                );
            }
        }
        // Inventories are read last: their generation is the newer one.
        let generation = inv["resource_provider_generation"]
            .as_u64()
            .or_else(|| traits["resource_provider_generation"].as_u64())
            .unwrap_or(0);
        Ok(ProviderState {
            generation,
            traits: traits["traits"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            inventories,
        })
    }

    /// The provider's state at `generation` (from what was read, or a
    /// fresh read).
    fn state(&mut self, uuid: &str, generation: u64) -> Result<ProviderState, FleetError> {
        match self.known.get(uuid) {
            Some(s) if s.generation == generation => Ok(s.clone()),
            _ => {
                let s = self.read_state(uuid)?;
                self.known.insert(uuid.to_string(), s.clone());
                Ok(s)
            }
        }
    }

    /// Sets one part of provider `uuid` (its traits or its inventories) to
    /// `make(current part)`: a PUT naming the provider generation; on a
    /// 409 for a moved generation, a fresh read and another PUT, at most
    /// `GENERATION_RETRIES` more times. Returns the provider's generation
    /// after the write, or the one read when the part already holds the
    /// wanted value.
    fn put_part<T: Clone + PartialEq>(
        &mut self,
        uuid: &str,
        generation: u64,
        part: &ProviderPart<T>,
        make: impl Fn(&T) -> T,
        writes: &mut usize,
    ) -> Result<u64, FleetError> {
        let mut generation = generation;
        for attempt in 0..=GENERATION_RETRIES {
            let mut s = self.state(uuid, generation)?;
            let current = (part.field)(&mut s);
            let want = make(current);
            if want == *current {
                return Ok(s.generation);
            }
            let mut body = serde_json::Map::new();
            body.insert(part.path.to_string(), (part.body)(&want));
            body.insert(
                "resource_provider_generation".to_string(),
                json!(s.generation),
            );
            *writes += 1;
            match self.client.put(
                &format!("/resource_providers/{uuid}/{}", part.path),
                &Value::Object(body),
            ) {
                Ok(v) => {
                    s.generation = v["resource_provider_generation"]
                        .as_u64()
                        .unwrap_or(s.generation + 1);
                    *(part.field)(&mut s) = want;
                    let g = s.generation;
                    self.known.insert(uuid.to_string(), s);
                    return Ok(g);
                }
                Err(e) if e.is_generation_conflict() && attempt < GENERATION_RETRIES => {
                    self.known.remove(uuid);
                    generation = u64::MAX;
                }
                Err(e) => return Err(e),
            }
        }
        Err(FleetError::Tree(format!(
            "{} of {uuid}: generation kept moving",
            part.label
        )))
    }

    fn read_consumer(&mut self, uuid: &str) -> Result<ConsumerState, FleetError> {
        if let Some(c) = self.consumers.get(uuid) {
            return Ok(c.clone());
        }
        let v = self.client.get(&format!("/allocations/{uuid}"))?;
        let c = ConsumerState {
            generation: v["consumer_generation"].as_u64(),
            allocations: allocations_of(&v),
        };
        self.consumers.insert(uuid.to_string(), c.clone());
        Ok(c)
    }

    /// Makes the consumer's allocations on `ours` (this host's L3
    /// providers) equal `want`, keeping its allocations elsewhere (a Nova
    /// instance's on the compute node). `Ok(false)`: Placement refused for
    /// want of room; the consumer then holds nothing on `ours`.
    fn set_consumer(
        &mut self,
        uuid: &str,
        project: &str,
        user: &str,
        ours: &BTreeSet<String>,
        want: &Allocations,
        writes: &mut usize,
    ) -> Result<bool, FleetError> {
        let mut target = want.clone();
        for attempt in 0..=GENERATION_RETRIES {
            let current = self.read_consumer(uuid)?;
            let mut next: Allocations = current
                .allocations
                .iter()
                .filter(|(rp, _)| !ours.contains(*rp))
                .map(|(rp, r)| (rp.clone(), r.clone()))
                .collect();
            next.extend(target.clone());
            if next == current.allocations {
                return Ok(target == *want);
            }
            *writes += 1;
            let path = format!("/allocations/{uuid}");
            let result = if next.is_empty() {
                self.client.delete(&path).map(|_| Value::Null)
            } else {
                self.client.put(
                    &path,
                    &json!({
                        "allocations": allocations_json(&next),
                        "consumer_generation": current.generation,
                        "project_id": project,
                        "user_id": user,
                        "consumer_type": "INSTANCE",
                    }),
                )
            };
            self.consumers.remove(uuid);
            match result {
                Ok(_) => {
                    if !next.is_empty() {
                        self.consumers.insert(
                            uuid.to_string(),
                            ConsumerState {
                                generation: Some(current.generation.map_or(1, |g| g + 1)),
                                allocations: next,
                            },
                        );
                    }
                    return Ok(target == *want);
                }
                Err(e) if e.is_generation_conflict() && attempt < GENERATION_RETRIES => {}
                // No room for the truth: hold nothing here; the caller
                // counts the CPUs in `reserved`.
                Err(e) if e.is_conflict() && !target.is_empty() => target.clear(),
                Err(e) => return Err(e),
            }
        }
        Err(FleetError::Tree(format!(
            "allocations of consumer {uuid}: generation kept moving"
        )))
    }

    /// Makes consumer `uuid` hold `a` on this host's L3 providers;
    /// `Ok(false)` when Placement had no room (see [`Self::set_consumer`]).
    fn publish(
        &mut self,
        uuid: &str,
        a: &tree::DesiredAllocation,
        l3_uuid: &BTreeMap<usize, String>,
        ours: &BTreeSet<String>,
        writes: &mut usize,
    ) -> Result<bool, FleetError> {
        let target: Allocations = a
            .per_l3
            .iter()
            .filter_map(|(d, n)| {
                let rp = l3_uuid.get(d)?;
                Some((
                    rp.clone(),
                    BTreeMap::from([(tree::PCPU_CLASS.to_string(), u64::from(*n))]),
                ))
            })
            .collect();
        self.set_consumer(
            uuid,
            &a.consumer.project_id,
            &a.consumer.user_id,
            ours,
            &target,
            writes,
        )
    }

    fn l3_inventory(p: &L3Provider, extra_reserved: u32) -> Inventories {
        BTreeMap::from([
            (
                tree::PCPU_CLASS.to_string(),
                (
                    u64::from(p.total),
                    u64::from(p.reserved.saturating_add(extra_reserved).min(p.total)),
                ),
            ),
            (
                tree::OPEN_CLASS.to_string(),
                (1, u64::from(p.open_reserved)),
            ),
        ])
    }

    /// One sync. `gone`: consumers of VMs the agent no longer holds.
    pub(crate) fn sync(
        &mut self,
        want: &DesiredTree,
        gone: &[tree::Consumer],
    ) -> Result<SyncOutcome, FleetError> {
        let mut out = SyncOutcome::default();
        let mut writes = self.ensure_names()?;
        let (root, created) = self.resolve_root(&want.names.host)?;
        writes += created;
        let listed: BTreeMap<String, ProviderInfo> = self
            .list_tree(&root.uuid)?
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();

        // Providers, parents first.
        let mut numa_uuid: BTreeMap<u32, String> = BTreeMap::new();
        let mut generations: BTreeMap<String, u64> = BTreeMap::new();
        for (name, node) in &want.numa {
            let p = self.ensure_child(&listed, name, &root.uuid, &mut writes)?;
            numa_uuid.insert(*node, p.uuid.clone());
        }
        let mut l3_uuid: BTreeMap<usize, String> = BTreeMap::new();
        for l3 in &want.l3 {
            let parent = numa_uuid
                .get(&l3.numa)
                .cloned()
                .unwrap_or_else(|| root.uuid.clone());
            let p = self.ensure_child(&listed, &l3.name, &parent, &mut writes)?;
            generations.insert(p.uuid.clone(), p.generation);
            l3_uuid.insert(l3.index, p.uuid);
        }
        // This host's providers that no longer exist, leaves first.
        let wanted: BTreeSet<&str> = want
            .numa
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(want.l3.iter().map(|l| l.name.as_str()))
            .collect();
        let mut stale: Vec<&ProviderInfo> = listed
            .values()
            .filter(|p| want.names.is_child(&p.name) && !wanted.contains(p.name.as_str()))
            .collect();
        stale.sort_by_key(|p| !p.name.contains("_l3_"));
        for p in stale {
            writes += 1;
            if let Err(e) = self
                .client
                .delete(&format!("/resource_providers/{}", p.uuid))
            {
                out.warnings
                    .push(format!("stale provider {} not deleted: {e}", p.name));
            }
        }

        // Traits.
        let ours = want.root_traits.clone();
        self.put_part(
            &root.uuid,
            root.generation,
            &TRAITS,
            |cur| tree::merged_root_traits(cur, &ours),
            &mut writes,
        )?;
        for l3 in &want.l3 {
            let uuid = &l3_uuid[&l3.index];
            let g = generations.get(uuid).copied().unwrap_or(u64::MAX);
            let pool = l3.pool_trait.to_string();
            let g = self.put_part(
                uuid,
                g,
                &TRAITS,
                |_| BTreeSet::from([pool.clone()]),
                &mut writes,
            )?;
            let inventory = Self::l3_inventory(l3, 0);
            let g = self.put_part(uuid, g, &INVENTORIES, |_| inventory.clone(), &mut writes)?;
            generations.insert(uuid.clone(), g);
        }

        // Allocations of this host's consumers.
        let ours: BTreeSet<String> = l3_uuid.values().cloned().collect();
        let mut extra: BTreeMap<usize, u32> = BTreeMap::new();
        // A consumer refused for want of room is tried once more after the
        // others: a stale claim of another consumer on its domain is moved
        // away by that consumer's own rewrite in the same pass.
        let mut refused = Vec::new();
        for (uuid, a) in &want.allocations {
            if !self.publish(uuid, a, &l3_uuid, &ours, &mut writes)? {
                refused.push((uuid, a));
            }
        }
        for (uuid, a) in refused {
            if !self.publish(uuid, a, &l3_uuid, &ours, &mut writes)? {
                out.unpublished.push(uuid.clone());
                for (d, n) in &a.per_l3 {
                    *extra.entry(*d).or_default() += n;
                }
            }
        }
        for l3 in &want.l3 {
            if let Some(n) = extra.get(&l3.index) {
                let uuid = &l3_uuid[&l3.index];
                let g = generations.get(uuid).copied().unwrap_or(u64::MAX);
                let inventory = Self::l3_inventory(l3, *n);
                self.put_part(uuid, g, &INVENTORIES, |_| inventory.clone(), &mut writes)?;
            }
        }
        for c in gone {
            if want.allocations.contains_key(&c.uuid) {
                continue;
            }
            self.set_consumer(
                &c.uuid,
                &c.project_id,
                &c.user_id,
                &ours,
                &Allocations::new(),
                &mut writes,
            )?;
            out.forgotten.push(c.uuid.clone());
        }
        out.writes = writes;
        Ok(out)
    }
}
