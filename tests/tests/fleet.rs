//! The fleet reporter against the real OpenStack Placement service
//! (openstack-placement from PyPI, gunicorn, SQLite; tests/src/openstack.rs):
//! several sevplaced on different host-root fixtures publish their L3
//! providers and keep their VMs' consumers' allocations true. After every
//! step the invariant is read back from Placement: per L3 provider,
//! `total` = CPUs of the domain and usage + reserved = CPUs of the domain
//! the agent uses; each consumer's allocation = its VM's CPUs per domain.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sevplace::fleet::PlacementClient;
use sevplace::topology::Topology;
use sevplace::CpuSet;
use sevplace_proto::v1 as pb;
use sevplace_tests::openstack::PlacementService;
use sevplace_tests::{wait_until, Daemon};

/// kvm_amd parameters of a host root: (name, value).
type SevParams<'a> = &'a [(&'a str, &'a str)];

/// One agent of the test fleet: name, fixture, extra config keys, root provider.
type AgentSpec<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures")
        .join(name)
}

/// A host root whose `sys/devices` is the fixture's and whose kvm_amd
/// parameters say which SEV classes KVM offers.
fn host_root(dir: &Path, name: &str, fixture_name: &str, sev: &[(&str, &str)]) -> PathBuf {
    let root = dir.join(format!("root-{name}"));
    std::fs::create_dir_all(root.join("sys/module/kvm_amd/parameters")).unwrap();
    // An empty procfs: the hosts run no VM process.
    std::fs::create_dir_all(root.join("proc")).unwrap();
    std::os::unix::fs::symlink(
        fixture(fixture_name).join("sys/devices"),
        root.join("sys/devices"),
    )
    .unwrap();
    for (k, v) in sev {
        std::fs::write(root.join("sys/module/kvm_amd/parameters").join(k), v).unwrap();
    }
    root
}

struct Host {
    name: String,
    root: PathBuf,
    config: String,
    daemon: Option<Daemon>,
    topology: Topology,
}

impl Host {
    fn start(name: &str, root: PathBuf, config: String) -> Self {
        let topology = Topology::from_sysfs(&root.join("sys")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("sevplaced.toml"), &config).unwrap();
        let daemon = Daemon::start_in(dir, &["--host-root", root.to_str().unwrap()], &[]);
        Self {
            name: name.to_string(),
            root,
            config,
            daemon: Some(daemon),
            topology,
        }
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    fn kill9_and_restart(&mut self) {
        let dir = self.daemon.take().unwrap().kill9();
        std::fs::write(dir.path().join("sevplaced.toml"), &self.config).unwrap();
        self.daemon = Some(Daemon::start_in(
            dir,
            &["--host-root", self.root.to_str().unwrap()],
            &[],
        ));
    }

    fn place(
        &self,
        id: &str,
        vcpus: u32,
        class: pb::ConfidentialClass,
        shared: bool,
        consumer: Option<&str>,
    ) -> Result<CpuSet, tonic::Status> {
        let socket = self.daemon().socket.clone();
        sevplace_tests::runtime().block_on(async {
            let mut c = sevplace::client::connect(&socket).await.unwrap();
            let r = c
                .place_vm(pb::PlaceVmRequest {
                    vm_id: id.into(),
                    vcpus,
                    confidential_class: class as i32,
                    shared,
                    placement_consumer: consumer.map(|u| pb::PlacementConsumer {
                        uuid: u.into(),
                        project_id: "project-a".into(),
                        user_id: "user-a".into(),
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let cpus =
                r.vm.and_then(|v| v.placement)
                    .map(|p| p.cpus)
                    .unwrap_or_default();
            Ok(CpuSet::from_iter(cpus))
        })
    }

    fn release(&self, id: &str) {
        let socket = self.daemon().socket.clone();
        sevplace_tests::runtime().block_on(async {
            let mut c = sevplace::client::connect(&socket).await.unwrap();
            c.release_vm(pb::ReleaseVmRequest { vm_id: id.into() })
                .await
                .unwrap();
        });
    }

    /// (vm id, CPUs) of every placed VM.
    fn placed(&self) -> Vec<(String, CpuSet)> {
        self.placed_vms()
            .into_iter()
            .map(|(id, cpus, _)| (id, cpus))
            .collect()
    }

    /// (vm id, CPUs, shared) of every placed VM.
    fn placed_vms(&self) -> Vec<(String, CpuSet, bool)> {
        let socket = self.daemon().socket.clone();
        sevplace_tests::runtime().block_on(async {
            let mut c = sevplace::client::connect(&socket).await.unwrap();
            let r = c
                .list_vms(pb::ListVmsRequest {
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            r.vms
                .into_iter()
                .filter_map(|v| Some((v.vm_id, CpuSet::from_iter(v.placement?.cpus), v.shared)))
                .collect()
        })
    }

    fn conditions(&self) -> Vec<i32> {
        let socket = self.daemon().socket.clone();
        sevplace_tests::runtime().block_on(async {
            let mut c = sevplace::client::connect(&socket).await.unwrap();
            let h = c
                .get_host(pb::GetHostRequest {})
                .await
                .unwrap()
                .into_inner();
            h.host
                .unwrap()
                .conditions
                .iter()
                .map(|c| c.r#type)
                .collect()
        })
    }
}

fn provider(p: &PlacementClient, name: &str) -> Option<Value> {
    p.get(&format!("/resource_providers?name={name}")).ok()?["resource_providers"][0]
        .as_object()
        .map(|o| Value::Object(o.clone()))
}

/// What Placement holds for `host`, checked against the agent; `Err` says
/// what differs (the caller waits for it to converge).
fn check_host(
    p: &PlacementClient,
    h: &Host,
    consumers: &BTreeMap<String, String>,
) -> Result<(), String> {
    let placed = h.placed_vms();
    let mut in_use = CpuSet::new();
    for (_, cpus, _) in &placed {
        in_use = in_use.union(cpus);
    }
    // One listing of the tree, and one per pool trait, instead of reads per
    // provider.
    let root = provider(p, &h.name).ok_or(format!("no root provider {}", h.name))?;
    let root_uuid = root["uuid"].as_str().unwrap();
    let list = |extra: &str| -> Result<BTreeMap<String, String>, String> {
        let v = p
            .get(&format!("/resource_providers?in_tree={root_uuid}{extra}"))
            .map_err(|e| e.to_string())?;
        Ok(v["resource_providers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rp| {
                (
                    rp["name"].as_str().unwrap().to_string(),
                    rp["uuid"].as_str().unwrap().to_string(),
                )
            })
            .collect())
    };
    let tree = list("")?;
    let mut pools_of: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for pool in ["CONFIDENTIAL", "GENERAL", "EMPTY"] {
        for name in list(&format!("&required=CUSTOM_SEVPLACE_POOL_{pool}"))?.into_keys() {
            pools_of.entry(name).or_default().push(pool);
        }
    }
    let mut usage_of: BTreeMap<String, u64> = BTreeMap::new();
    for d in &h.topology.l3_domains {
        let name = format!("{}_l3_{}", h.name, d.index);
        let uuid = tree.get(&name).ok_or(format!("no provider {name}"))?;
        let inv = p
            .get(&format!("/resource_providers/{uuid}/inventories"))
            .map_err(|e| e.to_string())?;
        let pcpu = &inv["inventories"]["CUSTOM_SEVPLACE_PCPU"];
        let total = pcpu["total"]
            .as_u64()
            .ok_or(format!("{name}: no inventory"))?;
        let reserved = pcpu["reserved"].as_u64().unwrap();
        if total != d.cpus.len() as u64 {
            return Err(format!("{name}: total {total} != {}", d.cpus.len()));
        }
        let usages = p
            .get(&format!("/resource_providers/{uuid}/usages"))
            .map_err(|e| e.to_string())?;
        let used = usages["usages"]["CUSTOM_SEVPLACE_PCPU"]
            .as_u64()
            .unwrap_or(0);
        let want = in_use.intersection(&d.cpus).len() as u64;
        if used + reserved != want {
            return Err(format!(
                "{name}: usage {used} + reserved {reserved} != {want} in use"
            ));
        }
        if used + reserved > total {
            return Err(format!("{name}: over-allocated"));
        }
        let pools = pools_of.get(&name).cloned().unwrap_or_default();
        if pools.len() != 1 {
            return Err(format!("{name}: pool traits {pools:?}"));
        }
        usage_of.insert(uuid.clone(), used);
    }
    // Each consumer's allocation on this host's L3 providers is its VM's CPUs.
    for (vm, consumer) in consumers {
        let a = p
            .get(&format!("/allocations/{consumer}"))
            .map_err(|e| e.to_string())?;
        let held: u64 = a["allocations"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(rp, _)| usage_of.contains_key(*rp))
                    .map(|(_, r)| r["resources"]["CUSTOM_SEVPLACE_PCPU"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0);
        // A shared VM's CPUs are counted in `reserved`: its consumer holds
        // nothing on the L3 providers.
        let want = placed
            .iter()
            .find(|(id, _, _)| id == vm)
            .map_or(0, |(_, c, shared)| if *shared { 0 } else { c.len() as u64 });
        if held != want {
            return Err(format!(
                "consumer {consumer} of {vm} holds {held}, VM has {want} CPUs"
            ));
        }
    }
    Ok(())
}

fn converge(
    p: &PlacementClient,
    hosts: &[&Host],
    consumers: &BTreeMap<String, BTreeMap<String, String>>,
    what: &str,
) {
    let start = Instant::now();
    let mut last = String::new();
    // Each agent's tree is a few REST calls per provider, all served by the
    // one Placement on this machine: the time to converge grows with the
    // hosts (the scale bench starts 100).
    let within = Duration::from_secs(60)
        .max(Duration::from_secs(6) * u32::try_from(hosts.len()).unwrap_or(u32::MAX));
    let ok = wait_until(within, || {
        for h in hosts {
            let empty = BTreeMap::new();
            if let Err(e) = check_host(p, h, consumers.get(&h.name).unwrap_or(&empty)) {
                last = format!("{}: {e}", h.name);
                return false;
            }
        }
        true
    });
    assert!(
        ok,
        "{what}: Placement did not converge in {within:?}: {last}"
    );
    eprintln!("{what}: converged in {:?}", start.elapsed());
}

fn uuid(n: u32) -> String {
    format!("5e7b1ace-0000-4000-8000-{n:012x}")
}

#[test]
fn fleet_reporter_keeps_placement_true() {
    let test = "fleet_reporter_keeps_placement_true";
    let Some(mut service) = PlacementService::start_sqlite(test) else {
        return;
    };
    let p = service.client();
    let tmp = tempfile::tempdir().unwrap();
    // A pre-created root standing in for Nova's compute node provider.
    p.post("/resource_providers", &json!({"name": "nova-cn-1"}))
        .unwrap();
    let cn = provider(&p, "nova-cn-1").unwrap();
    let cn_uuid = cn["uuid"].as_str().unwrap().to_string();
    p.put(
        &format!("/resource_providers/{cn_uuid}/traits"),
        &json!({"traits": ["COMPUTE_NODE"], "resource_provider_generation": 0}),
    )
    .unwrap();
    let specs: [AgentSpec; 6] = [
        (
            "milan-a",
            "milan-64c",
            &[("sev", "Y"), ("sev_es", "Y"), ("sev_snp", "N")],
            "",
        ),
        (
            "genoa-nps1",
            "genoa-2x96-nps1",
            &[("sev", "Y"), ("sev_es", "Y"), ("sev_snp", "Y")],
            "",
        ),
        ("genoa-nps4", "genoa-2x96-nps4", &[], ""),
        ("rome-a", "rome-64c", &[("sev", "1")], ""),
        ("rome-offline", "rome-64c-offline", &[], ""),
        (
            "nova-cn-1",
            "milan-64c",
            &[("sev", "Y")],
            "root_provider_name = \"nova-cn-1\"\n",
        ),
    ];
    let mut hosts: Vec<Host> = specs
        .iter()
        .map(|(name, fx, sev, extra)| {
            let root = host_root(tmp.path(), name, fx, sev);
            Host::start(name, root, service.fleet_config(name, extra))
        })
        .collect();
    let mut consumers: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    converge(
        &p,
        &hosts.iter().collect::<Vec<_>>(),
        &consumers,
        "empty trees",
    );

    // Root traits: managed, the host's SEV classes only, the flush mode;
    // the Nova root keeps its own traits and holds the agent's children.
    let traits_of = |name: &str| -> Vec<String> {
        let rp = provider(&p, name).unwrap();
        let t = p
            .get(&format!(
                "/resource_providers/{}/traits",
                rp["uuid"].as_str().unwrap()
            ))
            .unwrap();
        t["traits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let t = traits_of("milan-a");
    assert!(
        t.contains(&"CUSTOM_SEVPLACE_MANAGED".into())
            && t.contains(&"HW_CPU_X86_AMD_SEV_ES".into()),
        "{t:?}"
    );
    assert!(!t.contains(&"HW_CPU_X86_AMD_SEV_SNP".into()), "{t:?}");
    assert!(
        t.contains(&"CUSTOM_SEVPLACE_FLUSH_STOCK".into()),
        "no module loaded: {t:?}"
    );
    assert!(traits_of("genoa-nps1").contains(&"HW_CPU_X86_AMD_SEV_SNP".into()));
    assert!(!traits_of("genoa-nps4")
        .iter()
        .any(|t| t.starts_with("HW_CPU_X86_AMD_SEV")));
    let cn_traits = traits_of("nova-cn-1");
    assert!(
        cn_traits.contains(&"COMPUTE_NODE".into())
            && cn_traits.contains(&"CUSTOM_SEVPLACE_MANAGED".into()),
        "{cn_traits:?}"
    );
    let numa = provider(&p, "nova-cn-1_numa0").unwrap();
    assert_eq!(
        numa["parent_provider_uuid"].as_str(),
        Some(cn_uuid.as_str())
    );
    let l3 = provider(&p, "genoa-nps4_l3_23").unwrap();
    let numa7 = provider(&p, "genoa-nps4_numa7").unwrap();
    assert_eq!(l3["parent_provider_uuid"], numa7["uuid"]);

    // Placements with and without consumers, dedicated and shared.
    let classes = [
        pb::ConfidentialClass::Sev,
        pb::ConfidentialClass::None,
        pb::ConfidentialClass::SevEs,
    ];
    let mut n = 0;
    for (hi, h) in hosts.iter().enumerate() {
        for k in 0..6u32 {
            n += 1;
            let id = format!("vm-{hi}-{k}");
            let with_consumer = k % 3 != 2;
            let c = uuid(n);
            h.place(
                &id,
                1 + (k * 3) % 7,
                classes[k as usize % 3],
                k == 4,
                with_consumer.then_some(c.as_str()),
            )
            .unwrap();
            if with_consumer {
                consumers.entry(h.name.clone()).or_default().insert(id, c);
            }
        }
    }
    converge(
        &p,
        &hosts.iter().collect::<Vec<_>>(),
        &consumers,
        "after placements",
    );

    // A stale claim: the scheduler claimed 4 CPUs on an empty domain in the
    // middle of the host, which the agent does not choose (it packs the
    // confidential pool from the top and opens domains next to it); the
    // agent moves the claim to the CPUs it chose.
    let h = &hosts[1];
    let in_use = h
        .placed()
        .into_iter()
        .fold(CpuSet::new(), |a, (_, c)| a.union(&c));
    let mid = &h.topology.l3_domains[h.topology.l3_domains.len() / 2];
    assert!(
        mid.cpus.is_disjoint(&in_use),
        "domain {} holds VMs",
        mid.index
    );
    let mid_rp = provider(&p, &format!("{}_l3_{}", h.name, mid.index)).unwrap();
    let stale = uuid(999);
    p.put(
        &format!("/allocations/{stale}"),
        &json!({"allocations": {mid_rp["uuid"].as_str().unwrap(): {"resources": {"CUSTOM_SEVPLACE_PCPU": 4}}},
                "consumer_generation": null, "project_id": "project-a", "user_id": "user-a", "consumer_type": "INSTANCE"}),
    )
    .unwrap();
    let cpus = h
        .place(
            "stale-vm",
            4,
            pb::ConfidentialClass::Sev,
            false,
            Some(&stale),
        )
        .unwrap();
    assert!(
        cpus.is_disjoint(&mid.cpus),
        "the agent chose the claimed domain {}",
        mid.index
    );
    consumers
        .entry(h.name.clone())
        .or_default()
        .insert("stale-vm".into(), stale.clone());
    converge(
        &p,
        &hosts.iter().collect::<Vec<_>>(),
        &consumers,
        "stale claim corrected",
    );

    // Releases: the consumers' allocations go.
    for h in &hosts[..3] {
        let hi = hosts.iter().position(|x| x.name == h.name).unwrap();
        let id = format!("vm-{hi}-0");
        h.release(&id);
        consumers
            .get_mut(&h.name)
            .unwrap()
            .insert(id, String::new());
    }
    for c in consumers.values_mut() {
        c.retain(|_, u| !u.is_empty());
    }
    converge(
        &p,
        &hosts.iter().collect::<Vec<_>>(),
        &consumers,
        "after releases",
    );
    let gone = p.get(&format!("/allocations/{}", uuid(1))).unwrap();
    assert!(
        gone["allocations"].as_object().unwrap().is_empty(),
        "released VM's consumer still holds {gone}"
    );

    // kill -9, a placement while down is impossible; restart converges.
    hosts[3].kill9_and_restart();
    let c = uuid(2000);
    hosts[3]
        .place(
            "after-restart",
            3,
            pb::ConfidentialClass::Sev,
            false,
            Some(&c),
        )
        .unwrap();
    consumers
        .entry(hosts[3].name.clone())
        .or_default()
        .insert("after-restart".into(), c);
    converge(
        &p,
        &hosts.iter().collect::<Vec<_>>(),
        &consumers,
        "after kill -9 and restart",
    );

    // Placement stopped for 30 s: PlaceVm goes on, the condition is raised,
    // and the agents catch up when it returns.
    service.pause();
    let outage = Instant::now();
    let h = &hosts[0];
    let c = uuid(3000);
    let t0 = Instant::now();
    h.place(
        "during-outage",
        2,
        pb::ConfidentialClass::Sev,
        false,
        Some(&c),
    )
    .unwrap();
    let place_time = t0.elapsed();
    assert!(
        wait_until(Duration::from_secs(20), || h
            .conditions()
            .contains(&(pb::ConditionType::FleetSyncFailing as i32))),
        "fleet_sync_failing not raised while Placement is down"
    );
    consumers
        .entry(h.name.clone())
        .or_default()
        .insert("during-outage".into(), c);
    std::thread::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed()));
    service.resume();
    converge(
        &p,
        &hosts.iter().collect::<Vec<_>>(),
        &consumers,
        "after Placement returned",
    );
    assert!(
        wait_until(Duration::from_secs(20), || !h
            .conditions()
            .contains(&(pb::ConditionType::FleetSyncFailing as i32))),
        "fleet_sync_failing not cleared: {:?}",
        h.conditions()
    );
    eprintln!("PlaceVm during the outage took {place_time:?}");
}

/// Runs `sevplacectl --json fleet ... args`; `Ok(json)` on success,
/// `Err((code, message))` from the JSON error on stderr otherwise.
fn fleet_ctl(
    service: &PlacementService,
    hosts_file: &Path,
    args: &[&str],
) -> Result<Value, (String, String)> {
    let out = std::process::Command::new(sevplace_tests::bin("sevplacectl"))
        .arg("--json")
        .arg("fleet")
        .arg("--placement-url")
        .arg(service.url())
        .arg("--token-file")
        .arg(service.token_file())
        .arg("--hosts")
        .arg(hosts_file)
        .args(args)
        .output()
        .expect("run sevplacectl fleet");
    if out.status.success() {
        return Ok(serde_json::from_slice(&out.stdout).expect("fleet output is JSON"));
    }
    assert_eq!(out.status.code(), Some(1), "exit code of {args:?}: {out:?}");
    let e: Value = serde_json::from_slice(&out.stderr)
        .unwrap_or_else(|_| panic!("{args:?}: stderr is not one JSON error: {out:?}"));
    Err((
        e["error"]["code"].as_str().unwrap_or("").to_string(),
        e["error"]["message"].as_str().unwrap_or("").to_string(),
    ))
}

/// One VM of the burst: id, vCPUs, class, shared.
type Ask = (String, u32, &'static str, bool);

/// 200 mixed VMs: a third SEV, a sixth SEV-ES, the rest plain (one in five
/// of them shared); sizes 1 to 12 vCPUs, odd ones included.
fn burst() -> Vec<Ask> {
    const SIZES: [u32; 8] = [1, 2, 3, 4, 6, 8, 2, 12];
    (0..200u32)
        .map(|i| {
            let class = match i % 6 {
                0 | 3 => "sev",
                1 => "sev-es",
                _ => "none",
            };
            let shared = class == "none" && i % 5 == 0;
            (
                format!("fvm-{i}"),
                SIZES[(i as usize * 7) % SIZES.len()],
                class,
                shared,
            )
        })
        .collect()
}

#[test]
fn fleet_scheduler_places_concurrent_bursts_without_over_allocation() {
    let test = "fleet_scheduler_places_concurrent_bursts_without_over_allocation";
    let Some(service) = PlacementService::start_mariadb(test, 4) else {
        return;
    };
    let p = service.client();
    let tmp = tempfile::tempdir().unwrap();
    let sev_es = &[("sev", "Y"), ("sev_es", "Y"), ("sev_snp", "N")][..];
    let sev_only = &[("sev", "Y")][..];
    let specs: [(&str, &str, SevParams); 8] = [
        ("f-milan-a", "milan-64c", sev_es),
        ("f-milan-b", "milan-64c", sev_only),
        ("f-genoa-nps1", "genoa-2x96-nps1", sev_es),
        ("f-genoa-nps4", "genoa-2x96-nps4", sev_es),
        ("f-rome-a", "rome-64c", sev_es),
        ("f-rome-b", "rome-64c", sev_only),
        ("f-rome-offline", "rome-64c-offline", sev_es),
        ("f-plain", "milan-64c", &[]),
    ];
    let mut hosts: Vec<Host> = specs
        .iter()
        .map(|(name, fx, sev)| {
            let root = host_root(tmp.path(), name, fx, sev);
            Host::start(name, root, service.fleet_config(name, ""))
        })
        .collect();
    let hosts_file = tmp.path().join("hosts.toml");
    let mut text = String::new();
    for h in &hosts {
        text.push_str(&format!(
            "[hosts.{}]\nsocket = {:?}\n",
            h.name,
            h.daemon().socket
        ));
    }
    std::fs::write(&hosts_file, text).unwrap();
    converge(
        &p,
        &hosts.iter().collect::<Vec<_>>(),
        &BTreeMap::new(),
        "fleet trees",
    );

    // 8 scheduler clients place 200 VMs at once; one agent is killed with
    // kill -9 a third of the way through and restarted.
    let asks = burst();
    let acked: std::sync::Mutex<Vec<(Ask, String, String)>> = Default::default();
    let refused: std::sync::Mutex<Vec<(String, String)>> = Default::default();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for client in 0..8 {
            let (asks, acked, refused, done, service, hosts_file) =
                (&asks, &acked, &refused, &done, &service, &hosts_file);
            s.spawn(move || {
                for a in asks.iter().skip(client).step_by(8) {
                    let (id, vcpus, class, shared) = a;
                    let n = vcpus.to_string();
                    let mut args = vec!["place", id, "--vcpus", &n, "--confidential", class];
                    if *shared {
                        args.push("--shared");
                    }
                    match fleet_ctl(service, hosts_file, &args) {
                        Ok(v) => acked.lock().unwrap().push((
                            a.clone(),
                            v["host"].as_str().unwrap().to_string(),
                            v["consumer"].as_str().unwrap().to_string(),
                        )),
                        Err((code, msg)) => {
                            assert_eq!(code, "no-room", "{id}: {msg}");
                            refused.lock().unwrap().push((id.clone(), msg));
                        }
                    }
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        while done.load(std::sync::atomic::Ordering::Relaxed) < 66 {
            std::thread::sleep(Duration::from_millis(50));
        }
        hosts[4].kill9_and_restart();
    });
    let acked = acked.into_inner().unwrap();
    let refused = refused.into_inner().unwrap();
    eprintln!(
        "200 fleet placements from 8 clients in {:?}: {} placed, {} refused for want of room",
        start.elapsed(),
        acked.len(),
        refused.len()
    );
    assert!(acked.len() >= 150, "too few placed: {refused:?}");

    // Every acknowledged placement is on its host, no CPU is given twice
    // to dedicated VMs, and Placement holds exactly the agents' truth.
    let mut consumers: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for h in &hosts {
        let placed: BTreeMap<String, CpuSet> = h.placed().into_iter().collect();
        let mine: Vec<&(Ask, String, String)> = acked
            .iter()
            .filter(|(_, host, _)| host == &h.name)
            .collect();
        let mut taken = CpuSet::new();
        for ((id, vcpus, class, shared), _, consumer) in &mine {
            let cpus = placed
                .get(id)
                .unwrap_or_else(|| panic!("{id} acknowledged on {} but not placed there", h.name));
            assert!(cpus.len() >= *vcpus as usize, "{id}: {cpus:?}");
            if !*shared {
                assert!(
                    taken.is_disjoint(cpus),
                    "{id} on {}: CPUs given twice",
                    h.name
                );
                taken = taken.union(cpus);
            }
            if *class != "none" {
                assert_ne!(
                    h.name, "f-plain",
                    "{id}: confidential VM on a host without SEV"
                );
            }
            // check_host expects nothing on L3 providers for shared VMs.
            consumers
                .entry(h.name.clone())
                .or_default()
                .insert(id.clone(), consumer.clone());
        }
        assert_eq!(
            placed.len(),
            mine.len(),
            "{}: VMs placed that nobody acknowledged",
            h.name
        );
    }
    converge(
        &p,
        &hosts.iter().collect::<Vec<_>>(),
        &consumers,
        "after the burst",
    );

    // Packing: confidential domains in use against the lower bound.
    let status = fleet_ctl(&service, &hosts_file, &["status"]).unwrap();
    let rows = status["hosts"].as_array().unwrap();
    assert_eq!(rows.len(), 8, "{status}");
    assert!(rows.iter().all(|r| r["agent"] == "ok"), "{status}");
    let conf_domains: u64 = rows
        .iter()
        .map(|r| r["confidential_domains"].as_u64().unwrap())
        .sum();
    let conf_cpus: usize = hosts
        .iter()
        .map(|h| {
            let placed: BTreeMap<String, CpuSet> = h.placed().into_iter().collect();
            acked
                .iter()
                .filter(|((_, _, class, _), host, _)| host == &h.name && *class != "none")
                .map(|((id, ..), _, _)| placed[id].len())
                .sum::<usize>()
        })
        .sum();
    let largest = hosts
        .iter()
        .flat_map(|h| h.topology.l3_domains.iter().map(|d| d.cpus.len()))
        .max()
        .unwrap();
    eprintln!(
        "confidential domains in use: {conf_domains} for {conf_cpus} confidential CPUs (at least {} domains of {largest})",
        conf_cpus.div_ceil(largest)
    );
    assert!(usize::try_from(conf_domains).unwrap() >= conf_cpus.div_ceil(largest));

    // Releases through the scheduler: the claims go, the domains free up.
    for ((id, ..), _, _) in acked.iter().step_by(2) {
        let r = fleet_ctl(&service, &hosts_file, &["release", id]).unwrap();
        assert_eq!(r["hosts"].as_array().unwrap().len(), 1, "{id}: {r}");
    }
    for ((id, ..), host, _) in acked.iter().step_by(2) {
        if let Some(c) = consumers.get_mut(host) {
            c.remove(id);
        }
    }
    converge(
        &p,
        &hosts.iter().collect::<Vec<_>>(),
        &consumers,
        "after fleet releases",
    );
    for ((id, ..), _, consumer) in acked.iter().step_by(2) {
        let a = p.get(&format!("/allocations/{consumer}")).unwrap();
        assert!(
            a["allocations"].as_object().unwrap().is_empty(),
            "{id}: released but its consumer holds {a}"
        );
    }
    // A retry of an acknowledged place of a dedicated VM answers its host
    // (the claim names it).
    let ((id, vcpus, class, _), host, _) = acked
        .iter()
        .skip(1)
        .step_by(2)
        .find(|((_, _, _, shared), _, _)| !shared)
        .unwrap();
    let n = vcpus.to_string();
    let again = fleet_ctl(
        &service,
        &hosts_file,
        &["place", id, "--vcpus", &n, "--confidential", class],
    )
    .unwrap();
    assert_eq!(again["host"].as_str(), Some(host.as_str()), "{again}");
    assert_eq!(again["stage"], "retry", "{again}");
}

/// `sevplace_fleet_sync_duration_seconds` of one daemon: (sum, count).
fn sync_seconds(h: &Host) -> (f64, f64) {
    let body = sevplace_tests::http_get(&h.daemon().metrics_addr, "/metrics", None);
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("sevplace_fleet_sync_duration_seconds_sum "),
        value("sevplace_fleet_sync_duration_seconds_count "),
    )
}

// (len - 1) * q with q in 0..=1, rounded, is a whole index in 0..len: the
// cast neither truncates nor drops a sign.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// The end-to-end scale bench (docs/benchmarks.md, "Fleet"): not in CI.
/// `SEVPLACE_FLEET_HOSTS` agents (default 100) on the real Placement over
/// MariaDB with 4 API threads, then `SEVPLACE_FLEET_PLACEMENTS` (default
/// 600) `sevplacectl fleet place` from 8 clients. Prints the time per
/// placement (p50/p99), the time until every tree is in Placement, and
/// each agent's mean sync time.
///
/// `cargo test --release -p sevplace-tests --test fleet -- --ignored --nocapture fleet_scale_bench`
#[test]
#[ignore = "scale bench: minutes; run by hand (docs/benchmarks.md)"]
fn fleet_scale_bench() {
    let test = "fleet_scale_bench";
    let env_n = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (n_hosts, n_places) = (
        env_n("SEVPLACE_FLEET_HOSTS", 100),
        env_n("SEVPLACE_FLEET_PLACEMENTS", 600),
    );
    let Some(service) = PlacementService::start_mariadb(test, 4) else {
        return;
    };
    let p = service.client();
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = [
        "milan-64c",
        "genoa-2x96-nps1",
        "rome-64c",
        "genoa-2x96-nps4",
    ];
    let sev = &[("sev", "Y"), ("sev_es", "Y")][..];
    let t0 = Instant::now();
    let hosts: Vec<Host> = (0..n_hosts)
        .map(|i| {
            let name = format!("s-{i:04}");
            let root = host_root(tmp.path(), &name, fixtures[i % fixtures.len()], sev);
            Host::start(&name, root, service.fleet_config(&name, ""))
        })
        .collect();
    let hosts_file = tmp.path().join("hosts.toml");
    let text: String = hosts
        .iter()
        .map(|h| format!("[hosts.{}]\nsocket = {:?}\n", h.name, h.daemon().socket))
        .collect();
    std::fs::write(&hosts_file, text).unwrap();
    converge(
        &p,
        &hosts.iter().collect::<Vec<_>>(),
        &BTreeMap::new(),
        "scale trees",
    );
    let trees = t0.elapsed();
    let asks: Vec<Ask> = burst()
        .into_iter()
        .cycle()
        .take(n_places)
        .enumerate()
        .map(|(i, (_, v, c, s))| (format!("svm-{i}"), v, c, s))
        .collect();
    let times: std::sync::Mutex<Vec<Duration>> = Default::default();
    let start = Instant::now();
    std::thread::scope(|s| {
        for client in 0..8 {
            let (asks, times, service, hosts_file) = (&asks, &times, &service, &hosts_file);
            s.spawn(move || {
                for (id, vcpus, class, shared) in asks.iter().skip(client).step_by(8) {
                    let n = vcpus.to_string();
                    let mut args = vec!["place", id, "--vcpus", &n, "--confidential", class];
                    if *shared {
                        args.push("--shared");
                    }
                    let t = Instant::now();
                    if let Err(e) = fleet_ctl(service, hosts_file, &args) {
                        eprintln!("{id}: {e:?}");
                    }
                    times.lock().unwrap().push(t.elapsed());
                }
            });
        }
    });
    let total = start.elapsed();
    let mut times = times.into_inner().unwrap();
    times.sort();
    let (sum, count) = hosts
        .iter()
        .map(sync_seconds)
        .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d));
    eprintln!(
        "fleet scale: {n_hosts} hosts, trees in Placement after {trees:?}; {n_places} placements from 8 clients in {total:?}: p50 {:?}, p99 {:?} per placement; mean agent sync {:.1} ms over {count} syncs",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        if count > 0.0 { sum / count * 1e3 } else { 0.0 }
    );
}
