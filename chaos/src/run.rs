//! `mesh-chaos run SCENARIO.toml [--seed N] [--nodes N] [--out DIR]`: a fleet of real
//! nodes, a workload and faults drawn from the seed, a convergence wait, the invariants,
//! and a report. Exits non-zero when an invariant fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mesh::proto::{ReleaseInfo, Request, Response};
use mesh_actors::manifest::ReleaseKind;
use mesh_actors::peers::{PeerState, PeerView};
use mesh_transport::ContentId;
use rand::{RngCore, SeedableRng};

use crate::faults::{self, Caps, Env, NodeState, REQUEST_TIMEOUT};
use crate::firmware;
use crate::fleet::{find_mesh_bin, Fleet, FleetConfig, FleetExtras, NodeOptions, Topology};
use crate::invariants::{self, Final, ModuleExpect};
use crate::netns::NetLab;
use crate::registry::Registry;
use crate::report::{
    FaultRecord, Incident, InvariantResult, PublishRecord, Report, Status, VersionMark,
};
use crate::scenario::{FaultKind, Kind, Network, Scenario, RUN_NODES_MAX};
use crate::schedule::{Action, Plan};
use crate::traffic;

/// How often every node is asked for its releases and peers during a run.
const ROUND: Duration = Duration::from_secs(1);
/// How long the fleet may take to connect before the workload starts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one publish may take (upload and the node's checks).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a publish looks whether the node it publishes through still runs.
const PUBLISH_WATCH: Duration = Duration::from_millis(200);
/// Incidents recorded per run; past this only the count grows.
const INCIDENTS_MAX: usize = 200;
/// Version markers kept for the timeline.
const MARKS_MAX: usize = 20_000;
/// Rounds between two checks of every node's firmware slots during the workload: each
/// check hashes two images per node and target, cheap but not free on a small machine.
const SLOT_CHECK_ROUNDS: u64 = 3;
/// Rounds between two samples of every node's module counters during the workload.
const TRAFFIC_SAMPLE_ROUNDS: u64 = 2;
/// How long the fleet's module traffic is watched once it converged, for
/// `messages_flow`: several ticks of every module.
const TRAFFIC_WINDOW: Duration = Duration::from_secs(4);
/// How long after convergence module messages may take to flow between every node
/// again before `messages_flow` fails.
const TRAFFIC_FLOW_BOUND: Duration = Duration::from_secs(30);
/// Slot violations seen during the workload that are kept; past this only the first
/// ones matter.
const SLOT_VIOLATIONS_MAX: usize = 100;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The scenario file (see chaos/scenarios/).
    pub scenario: PathBuf,
    /// The seed every random choice comes from; printed, drawn at random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Fleet size, overriding the scenario's.
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Where the report, the logs and the nodes' state go
    /// (default target/chaos/SCENARIO-SEED).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The mesh binary (default: beside this one, or MESH_BIN).
    #[arg(long)]
    pub mesh: Option<PathBuf>,
}

/// The CLI entry: runs the scenario, cleaning up on Ctrl-C or SIGTERM, and fails when
/// an invariant did.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let report = tokio::select! {
        r = run_scenario(&args) => r?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted by Ctrl-C: nodes killed, faults undone, lab removed"),
        _ = term.recv() => bail!("terminated: nodes killed, faults undone, lab removed"),
    };
    if !report.passed {
        let failed: Vec<&str> = report
            .invariants
            .iter()
            .filter(|i| i.status == Status::Failed)
            .map(|i| i.name.as_str())
            .collect();
        bail!(
            "invariants failed: {}; report in {}; replay: {}",
            failed.join(", "),
            report.out_dir,
            report.replay
        );
    }
    Ok(())
}

/// One convergence round's summary, for per-fault convergence times.
struct RoundSummary {
    t_ms: u64,
    all_answered: bool,
    membership_ok: bool,
    /// The lowest version of each name across the nodes that answered.
    min_version: BTreeMap<String, u64>,
}

struct Run {
    t0: Instant,
    seed: u64,
    scenario: Scenario,
    publishes: Vec<PublishRecord>,
    faults: BTreeMap<u32, FaultRecord>,
    incidents: Vec<Incident>,
    rounds: Vec<RoundSummary>,
    marks: Vec<VersionMark>,
    /// Per node, every version of every name it was ever seen holding.
    held: Vec<BTreeMap<String, BTreeSet<u64>>>,
    /// Per node, every release it ever listed (name, version, content).
    seen: Vec<BTreeMap<(String, u64), ReleaseInfo>>,
    /// The firmware targets every node has, one per firmware release.
    targets: Vec<firmware::Target>,
    /// Slot records found broken during the workload: (time, node, what).
    slot_violations: Vec<(u64, usize, String)>,
    /// Workload rounds so far, to space out the slot checks.
    workload_rounds: u64,
    /// Module message counters per node over time.
    samples: Vec<traffic::Sample>,
}

impl Run {
    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn say(&self, what: &str) {
        println!("[{:>7.1}s] {what}", self.now_ms() as f64 / 1000.0);
    }
}

/// Runs a scenario and returns its report (also written to the output directory).
pub async fn run_scenario(args: &Args) -> anyhow::Result<Report> {
    let scenario = Scenario::load(&args.scenario)?;
    let nodes = args.nodes.unwrap_or(scenario.nodes);
    if !(2..=RUN_NODES_MAX).contains(&nodes) {
        bail!(
            "running {}: between 2 and {RUN_NODES_MAX} nodes",
            scenario.name
        );
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let replay = format!(
        "mesh-chaos run {} --seed {seed} --nodes {nodes}",
        args.scenario.display()
    );
    println!(
        "mesh-chaos run: scenario {} seed {seed} nodes {nodes}",
        scenario.name
    );
    println!("replay: {replay}");
    let plan = Plan::draw(seed, &scenario, nodes)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/chaos").join(format!("{}-{seed}", scenario.name)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let fleet_dir = out.join("fleet");
    let registry = Arc::new(Registry::open()?);
    if fleet_dir.exists() {
        // A previous run of the same seed: its mounts were swept with its record.
        std::fs::remove_dir_all(&fleet_dir)
            .with_context(|| format!("removing the previous run's {}", fleet_dir.display()))?;
    }
    std::fs::create_dir_all(&fleet_dir)?;
    let mesh_bin = find_mesh_bin(args.mesh.clone())?;

    let caps = Caps::detect();
    let mut notes: Vec<String> = plan
        .unplaced
        .iter()
        .map(|u| format!("not placed: {u}"))
        .collect();
    let wants_network = plan.faults().any(|f| f.kind.is_network());
    let use_netns = match scenario.network {
        Network::Loopback => false,
        Network::Netns | Network::Auto => {
            let wanted = scenario.network == Network::Netns || wants_network;
            match (&caps.network, wanted) {
                (Ok(()), true) => true,
                (Err(why), true) => {
                    notes.push(format!("network faults skipped: {why}"));
                    println!("note: network faults skipped: {why}");
                    false
                }
                _ => false,
            }
        }
    };
    let lab = if use_netns {
        Some(Arc::new(NetLab::create(nodes, scenario.rate_mbit)?))
    } else {
        None
    };

    // Per-node options: libfaketime for nodes whose clock the plan skews, tmpfs for
    // nodes whose disk it fills (when root).
    let mut per_node = vec![NodeOptions::default(); nodes];
    let mut faketime_files = vec![None; nodes];
    let mut tmpfs = vec![None; nodes];
    for f in plan.faults() {
        for n in &f.nodes {
            match f.kind {
                FaultKind::ClockSkew if caps.faketime.is_ok() && faketime_files[*n].is_none() => {
                    let file = fleet_dir.join(format!("node{n}.faketime"));
                    std::fs::write(&file, "+0\n")?;
                    per_node[*n].env = vec![
                        ("LD_PRELOAD".into(), faults::FAKETIME_LIB.into()),
                        ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
                        // Re-read the file every second, so a skew applies while running.
                        ("FAKETIME_CACHE_DURATION".into(), "1".into()),
                        // Only the wall clock moves; timers and timeouts keep real time.
                        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
                        ("DONT_FAKE_MONOTONIC".into(), "1".into()),
                    ];
                    faketime_files[*n] = Some(file);
                }
                FaultKind::DiskFull if caps.root.is_ok() && tmpfs[*n].is_none() => {
                    let state = fleet_dir.join(format!("node{n}"));
                    registry.add_mount(&state)?;
                    faults::mount_tmpfs(&state, faults::TMPFS_BYTES)?;
                    tmpfs[*n] = Some(state);
                }
                _ => {}
            }
        }
    }
    if plan.has(FaultKind::ClockSkew) {
        if let Err(why) = &caps.faketime {
            notes.push(format!("clock skew skipped: {why}"));
        }
    }
    if plan.has(FaultKind::DiskFull) && caps.root.is_err() {
        notes.push("disk full by a store cap (no tmpfs without root)".into());
    }
    let targets = firmware::prepare(seed, &scenario, &fleet_dir)?;
    let mut agent_args = scenario.agent_args.clone();
    if scenario.config.is_some() || !targets.is_empty() {
        let mut config = scenario.config.clone().unwrap_or_default();
        config.push_str(&firmware::config_text(&targets));
        let path = fleet_dir.join("mesh.toml");
        std::fs::write(&path, config)?;
        agent_args.extend(["--config".to_string(), path.display().to_string()]);
    }
    let cfg = FleetConfig {
        nodes,
        mesh_bin,
        topology: Topology::Star,
        agent_args,
        dir: Some(fleet_dir.clone()),
        lab: lab.clone(),
    };
    let extras = FleetExtras {
        per_node: per_node.clone(),
        registry: Some(registry.clone()),
    };
    let started_unix_ms = mesh_actors::unix_ms();
    let t_start = Instant::now();
    let fleet = Fleet::start_with(&cfg, &extras).await?;
    fleet
        .wait_connected(nodes - 1, CONNECT_TIMEOUT)
        .await
        .context("waiting for the fleet to form before the workload")?;
    println!(
        "fleet up: {nodes} nodes on {} in {:.1} s",
        if use_netns {
            "network namespaces"
        } else {
            "loopback"
        },
        t_start.elapsed().as_secs_f64()
    );
    let mut env = Env::new(
        fleet,
        lab,
        registry.clone(),
        caps,
        per_node,
        faketime_files,
        tmpfs,
    );
    let mut run = Run {
        t0: Instant::now(),
        seed,
        scenario: scenario.clone(),
        publishes: Vec::new(),
        faults: BTreeMap::new(),
        incidents: Vec::new(),
        rounds: Vec::new(),
        marks: Vec::new(),
        held: vec![BTreeMap::new(); nodes],
        seen: vec![BTreeMap::new(); nodes],
        targets,
        slot_violations: Vec::new(),
        workload_rounds: 0,
        samples: Vec::new(),
    };

    let result = workload(&mut run, &mut env, &plan).await;
    // Whatever happened, every fault is undone before the end.
    for e in env.heal_all().await {
        notes.push(e);
    }
    for n in 0..nodes {
        if env.states[n] != NodeState::Up || !env.fleet.is_up(n) {
            if let Err(e) = env.fleet.restart(n, Some(env.base[n].clone())).await {
                notes.push(format!("restarting node{n} after the workload: {e:#}"));
            }
            env.states[n] = NodeState::Up;
        }
    }
    if let Err(e) = result {
        notes.push(format!("the workload stopped early: {e:#}"));
    }
    let workload_ms = run.now_ms();
    run.say("workload over, every fault healed; waiting for convergence");

    // Convergence: all nodes hold everything acknowledged, run what they should, and
    // see each other.
    let acked = invariants::newest_acked(&run.publishes);
    let expect = module_expectations(&run.scenario, &run.publishes);
    let fw_expect = firmware::expectations(&run.targets, &run.publishes)?;
    let bound = Duration::from_secs(scenario.converge_s);
    // A node's peer id is its key, which a restart keeps.
    let peer_ids: Vec<String> = env
        .fleet
        .nodes
        .iter()
        .map(|n| n.info.peer_id.clone())
        .collect();
    let wait_start = Instant::now();
    let mut fin;
    let convergence_ms = loop {
        fin = snapshot(&mut run, &mut env, true).await;
        let releases_ok = fin.releases.iter().all(|r| {
            r.as_ref().is_some_and(|list| {
                acked
                    .iter()
                    .all(|(name, (v, _))| list.iter().any(|x| &x.name == name && x.version >= *v))
            })
        });
        read_firmware(&run, &env, &mut fin);
        let states: Vec<PathBuf> = env.fleet.nodes.iter().map(|n| n.state.clone()).collect();
        let repaired = env
            .damaged
            .iter()
            .all(|d| invariants::repaired(d, &states) != Some(false));
        let ok = releases_ok
            && repaired
            && invariants::firmware(&fin, &fw_expect, &[]).status != Status::Failed
            && invariants::membership(&fin, &peer_ids, &[]).status == Status::Held
            && (expect.is_empty()
                || invariants::modules(&fin, &expect, &run.held, &[]).status == Status::Held);
        if ok {
            break Some(wait_start.elapsed().as_millis() as u64);
        }
        if wait_start.elapsed() > bound {
            break None;
        }
        tokio::time::sleep(ROUND).await;
    };
    match convergence_ms {
        Some(c) => run.say(&format!(
            "converged {:.1} s after the last heal",
            c as f64 / 1000.0
        )),
        None => run.say(&format!("not converged within {} s", scenario.converge_s)),
    }
    // Module traffic once the fleet settled: windows of a few ticks of every module,
    // until every subscriber hears the others or the bound passes (gossip may take a
    // few heartbeats to take a node that was away back into its mesh).
    let settled_ms = run.now_ms();
    let mut traffic_from = settled_ms;
    let mut traffic_to = settled_ms;
    if convergence_ms.is_some() && run.samples.iter().any(|s| s.published > 0) {
        loop {
            traffic_from = run.now_ms();
            tokio::time::sleep(TRAFFIC_WINDOW).await;
            fin = snapshot(&mut run, &mut env, true).await;
            read_firmware(&run, &env, &mut fin);
            traffic_to = run.now_ms();
            let flow = traffic::messages_flow(&run.samples, nodes, (traffic_from, traffic_to), &[]);
            if flow.status != Status::Failed
                || traffic_to - settled_ms > TRAFFIC_FLOW_BOUND.as_millis() as u64
            {
                break;
            }
        }
    }
    for n in 0..nodes {
        let mut holds = BTreeMap::new();
        for (name, (_, id)) in &acked {
            if fw_expect.contains_key(name) {
                // A node that installed firmware through a patch never holds the whole
                // image: its slots are what count (acknowledged_not_lost reads them).
                continue;
            }
            let has = tokio::time::timeout(REQUEST_TIMEOUT, env.fleet.has(n, *id))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or(false);
            holds.insert(*id, has);
        }
        fin.holds.push(holds);
    }
    let total_ms = run.now_ms();

    // The invariants.
    let logs: Vec<PathBuf> = env.fleet.nodes.iter().map(|n| n.log.clone()).collect();
    let states: Vec<PathBuf> = env.fleet.nodes.iter().map(|n| n.state.clone()).collect();
    if let Some(b) = env.byzantine.take() {
        let (stats, forged) = b.stop();
        env.byzantine_stats.push(stats);
        env.forged.extend(forged);
    }
    let mut seen_lists: Vec<Vec<ReleaseInfo>> = run
        .seen
        .iter()
        .map(|m| m.values().cloned().collect())
        .collect();
    for (n, r) in fin.releases.iter().enumerate() {
        if let Some(r) = r {
            seen_lists[n].extend(r.iter().cloned());
        }
    }
    let byzantine_ran = !env.byzantine_stats.is_empty();
    let invariants: Vec<InvariantResult> = vec![
        invariants::convergence(convergence_ms, scenario.converge_s, &fin, &acked, &logs),
        invariants::acknowledged_not_lost(&fin, &run.publishes, &fw_expect, &logs),
        invariants::verified_storage(&states, &env.damaged, &logs),
        invariants::damaged_not_served(&env.damaged, &logs),
        invariants::damaged_repaired(&env.damaged, &states, &logs),
        invariants::byzantine_rejected(byzantine_ran, &env.forged, &seen_lists, &states, &logs),
        invariants::modules(&fin, &expect, &run.held, &logs),
        invariants::rollbacks_recorded(&fin, &logs),
        invariants::membership(&fin, &peer_ids, &logs),
        invariants::nodes_stay_up(&run.incidents, &logs),
        traffic::messages_flow(&run.samples, nodes, (traffic_from, traffic_to), &logs)
            .with_delay(traffic_from - settled_ms),
        invariants::bootable_slot(&fin, &run.targets, &run.slot_violations, &logs),
        invariants::firmware(&fin, &fw_expect, &logs),
    ];
    let passed = invariants.iter().all(|i| i.status != Status::Failed);

    // Per-fault convergence from the rounds.
    let mut fault_records: Vec<FaultRecord> = run.faults.values().cloned().collect();
    fault_records.sort_by_key(|f| (f.planned_start_ms, f.id));
    for f in &mut fault_records {
        if let (Some(h), None) = (f.heal_ms, &f.skipped) {
            f.convergence_ms = convergence_after(&run, h);
        }
    }
    traffic::annotate(&mut fault_records, &run.samples, nodes);

    let damaged = env.damaged.clone();
    let byzantine = env.byzantine_stats.clone();
    // Stop everything before writing the report, so the report is the last word.
    shutdown(env).await;

    let report = Report {
        scenario: scenario.name.clone(),
        description: scenario.description.clone(),
        seed,
        nodes,
        network: if use_netns {
            "netns".into()
        } else {
            "loopback".into()
        },
        replay: replay.clone(),
        out_dir: out.display().to_string(),
        started_unix_ms,
        workload_s: workload_ms as f64 / 1000.0,
        total_s: total_ms as f64 / 1000.0,
        notes,
        faults: fault_records,
        publishes: run.publishes.clone(),
        incidents: run.incidents.clone(),
        convergence_ms,
        converge_bound_s: scenario.converge_s,
        invariants,
        byzantine,
        damaged,
        timeline: run.marks.clone(),
        traffic: run.samples.clone(),
        passed,
    };
    report.write(&out)?;
    print!("\n{}", report.text());
    println!(
        "report: {}/report.txt, report.json, timeline.svg",
        out.display()
    );
    drop(registry);
    Ok(report)
}

/// Kills the nodes, unmounts tmpfs state directories and removes the lab.
async fn shutdown(env: Env) {
    let Env {
        fleet,
        lab,
        registry,
        tmpfs,
        ..
    } = env;
    fleet.stop().await;
    for m in tmpfs.into_iter().flatten() {
        if let Err(e) = faults::unmount(&m) {
            tracing::warn!("unmounting {}: {e:#}", m.display());
        }
        let _ = registry.remove_mount(&m);
    }
    drop(lab);
}

/// Carries out the plan: publishes and faults at their times, a poll of every node
/// every round.
async fn workload(run: &mut Run, env: &mut Env, plan: &Plan) -> anyhow::Result<()> {
    let end_ms = run.scenario.duration_s * 1000;
    let mut next = 0usize;
    let mut next_round_ms = 0u64;
    loop {
        let now = run.now_ms();
        if next < plan.events.len() && plan.events[next].at_ms <= now {
            let action = plan.events[next].action.clone();
            next += 1;
            execute(run, env, &action).await;
            continue;
        }
        if now >= next_round_ms {
            let sample = run.scenario.releases.iter().any(|r| r.kind == Kind::Module)
                && run.workload_rounds % TRAFFIC_SAMPLE_ROUNDS == 0;
            let _ = snapshot(run, env, sample).await;
            run.workload_rounds += 1;
            if !run.targets.is_empty() && run.workload_rounds % SLOT_CHECK_ROUNDS == 0 {
                check_slots_live(run, env);
            }
            next_round_ms = run.now_ms() + ROUND.as_millis() as u64;
            continue;
        }
        if next >= plan.events.len() && now >= end_ms {
            return Ok(());
        }
        let mut wake = next_round_ms.min(end_ms.max(now + 1));
        if let Some(e) = plan.events.get(next) {
            wake = wake.min(e.at_ms);
        }
        tokio::time::sleep(Duration::from_millis(wake.saturating_sub(now).max(1))).await;
    }
}

async fn execute(run: &mut Run, env: &mut Env, action: &Action) {
    match action {
        Action::Publish {
            release,
            name,
            version,
            via,
        } => {
            let rec = publish(run, env, *release, name, *version, *via).await;
            match &rec.error {
                None => run.say(&format!(
                    "published {} v{} via node{}",
                    rec.name, rec.version, rec.via
                )),
                Some(e) => run.say(&format!(
                    "publish of {} v{} via node{} refused: {e}",
                    rec.name, rec.version, rec.via
                )),
            }
            run.publishes.push(rec);
        }
        Action::Start(f) => {
            let mut rec = FaultRecord {
                id: f.id,
                kind: f.kind.to_string(),
                nodes: f.nodes.clone(),
                planned_start_ms: f.start_ms,
                planned_heal_ms: f.heal_ms,
                start_ms: None,
                heal_ms: None,
                detail: String::new(),
                heal_detail: String::new(),
                skipped: env.unsupported(f.kind),
                error: None,
                convergence_ms: None,
                traffic: None,
            };
            if rec.skipped.is_none() {
                rec.start_ms = Some(run.now_ms());
                match env.apply(f).await {
                    Ok(d) => {
                        run.say(&format!("fault #{} {}: {d}", f.id, f.kind));
                        rec.detail = d;
                    }
                    Err(e) => {
                        run.say(&format!(
                            "fault #{} {} failed to apply: {e:#}",
                            f.id, f.kind
                        ));
                        rec.error = Some(format!("{e:#}"));
                    }
                }
            }
            run.faults.insert(f.id, rec);
        }
        Action::Heal { id } => {
            let skipped = run.faults.get(id).is_none_or(|r| r.skipped.is_some());
            if skipped {
                return;
            }
            let t = run.now_ms();
            let result = env.heal(*id).await;
            let rec = run.faults.get_mut(id);
            if let Some(rec) = rec {
                rec.heal_ms = Some(t);
                match result {
                    Ok(d) => rec.heal_detail = d,
                    Err(e) => {
                        let e = format!("healing: {e:#}");
                        rec.error = Some(match rec.error.take() {
                            Some(prev) => format!("{prev}; {e}"),
                            None => e,
                        })
                    }
                }
                let line = format!("fault #{id} healed: {}", rec.heal_detail);
                run.say(&line);
            }
        }
    }
}

/// The content of a data release: drawn from the run's seed, the name and the version,
/// so a replay publishes the same bytes.
fn data_bytes(seed: u64, name: &str, version: u64, size: u64) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(name.as_bytes());
    h.update(&version.to_le_bytes());
    let mut s = [0u8; 32];
    s.copy_from_slice(h.finalize().as_bytes());
    let mut b = vec![0u8; size as usize];
    rand::rngs::StdRng::from_seed(s).fill_bytes(&mut b);
    b
}

async fn publish(
    run: &mut Run,
    env: &mut Env,
    release: usize,
    name: &str,
    version: u64,
    via: usize,
) -> PublishRecord {
    let spec = run.scenario.releases[release].clone();
    let t_ms = run.now_ms();
    let n = env.states.len();
    // The planned node, or the next one that is up: an operator publishes through a
    // node that answers.
    let via = (0..n)
        .map(|k| (via + k) % n)
        .find(|i| env.states[*i] == NodeState::Up && env.fleet.is_up(*i))
        .unwrap_or(via);
    let (kind, bytes) = match spec.kind {
        Kind::Data => (
            ReleaseKind::Data,
            Ok(data_bytes(run.seed, name, version, spec.bytes.unwrap_or(1))),
        ),
        Kind::Module | Kind::Firmware => {
            let file = if spec.kind == Kind::Module {
                spec.files
                    .get(version as usize - 1)
                    .map(|f| run.scenario.module_file(f))
            } else {
                run.targets
                    .iter()
                    .find(|t| t.name == name)
                    .and_then(|t| t.images.get(version as usize).cloned())
            };
            let kind = if spec.kind == Kind::Module {
                ReleaseKind::Module
            } else {
                ReleaseKind::Firmware
            };
            (
                kind,
                match file {
                    Some(f) => {
                        std::fs::read(&f).with_context(|| format!("reading {}", f.display()))
                    }
                    None => Err(anyhow::anyhow!("no file for version {version}")),
                },
            )
        }
    };
    let bases = run
        .targets
        .iter()
        .find(|t| t.name == name && spec.kind == Kind::Firmware)
        .map(|t| t.bases(version))
        .unwrap_or_default();
    let mut rec = PublishRecord {
        t_ms,
        name: name.to_string(),
        kind: kind.to_string(),
        version,
        via,
        content: String::new(),
        bytes: 0,
        patches: 0,
        ok: false,
        error: None,
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(e) => {
            rec.error = Some(format!("{e:#}"));
            return rec;
        }
    };
    rec.bytes = bytes.len() as u64;
    rec.content = ContentId::of(&bytes).to_string();
    let result = async {
        use mesh::cli::publish as p;
        // Firmware carries patches from earlier versions, as `mesh publish firmware
        // --delta-from` makes them; the patches are stored before the manifest names them.
        let patches = p::make_patches(&bytes, &bases, true).await?;
        let mut manifest = p::release_manifest(kind, name, version, &bytes, None);
        manifest.deltas = patches.iter().map(|(d, _)| d.clone()).collect();
        let signed = p::sign_manifest(manifest, std::slice::from_ref(&env.fleet.operator))?;
        let node = &env.fleet.nodes[via];
        let upload = tokio::time::timeout(PUBLISH_TIMEOUT, async {
            for (_, patch) in &patches {
                p::put_blob(&node.session, patch).await?;
            }
            p::upload(&node.session, &signed, &bytes).await
        });
        // A node that dies during the publish (a power cut) never answers: stop waiting
        // for it at once, not when the connection times out.
        let pid = node.info.pid;
        let died = async {
            while crate::fleet::proc_running(pid) {
                tokio::time::sleep(PUBLISH_WATCH).await;
            }
        };
        tokio::select! {
            r = upload => r
                .map_err(|_| anyhow::anyhow!("publishing: no answer within {PUBLISH_TIMEOUT:?}"))?
                .map(|info| (info, patches.len())),
            _ = died => Err(anyhow::anyhow!("publishing: the node died before it answered")),
        }
    }
    .await;
    match result {
        Ok((_, patches)) => {
            rec.ok = true;
            rec.patches = patches;
        }
        Err(e) => rec.error = Some(format!("{e:#}")),
    }
    rec
}

async fn ask(env: &Env, n: usize, req: &Request) -> Option<Response> {
    tokio::time::timeout(REQUEST_TIMEOUT, env.fleet.nodes[n].session.request(req))
        .await
        .ok()?
        .ok()
}

/// Reads every node's firmware slots from its state directory into `fin`.
fn read_firmware(run: &Run, env: &Env, fin: &mut Final) {
    for (n, node) in env.fleet.nodes.iter().enumerate() {
        fin.firmware[n] = run
            .targets
            .iter()
            .map(|t| (t.name.clone(), firmware::read_slots(&node.state, &t.name)))
            .collect();
    }
}

/// Checks every node's firmware slots while the workload runs (killed nodes too: their
/// disks must stay bootable), keeping what is broken for `bootable_slot`.
fn check_slots_live(run: &mut Run, env: &Env) {
    let t_ms = run.now_ms();
    for (n, node) in env.fleet.nodes.iter().enumerate() {
        for t in &run.targets {
            if let Some(Err(why)) = firmware::read_slots_live(&node.state, &t.name) {
                if run.slot_violations.len() < SLOT_VIOLATIONS_MAX {
                    run.say(&format!("node{n}: firmware target {}: {why}", t.name));
                    run.slot_violations
                        .push((t_ms, n, format!("{}: {why}", t.name)));
                }
            }
        }
    }
}

/// Asks every node that is up for its releases and peers (and modules when
/// `modules`), notes unexpected exits, and records a round.
async fn snapshot(run: &mut Run, env: &mut Env, modules: bool) -> Final {
    let n = env.states.len();
    let mut fin = Final {
        releases: vec![None; n],
        modules: vec![None; n],
        peers: vec![None; n],
        holds: Vec::new(),
        firmware: vec![BTreeMap::new(); n],
    };
    let mut up = vec![false; n];
    #[allow(clippy::needless_range_loop)] // `i` indexes the fleet, the states and `fin` too.
    for i in 0..n {
        if env.states[i] != NodeState::Up {
            continue;
        }
        if let Some(status) = env.fleet.exit_status(i) {
            if let Some((fault, what)) = env.power_cut_fired(i).await {
                run.say(&format!("fault #{fault} power_cut: {what}"));
                let at_s = run.now_ms() as f64 / 1000.0;
                if let Some(rec) = run.faults.get_mut(&fault) {
                    rec.detail.push_str(&format!("; at {at_s:.1} s {what}"));
                }
                continue;
            }
            let t_ms = run.now_ms();
            run.say(&format!(
                "node{i} exited on its own ({status}); restarting it"
            ));
            if run.incidents.len() < INCIDENTS_MAX {
                run.incidents.push(Incident {
                    t_ms,
                    node: Some(i),
                    what: format!("exited unexpectedly ({status})"),
                    log_excerpt: invariants::excerpt(&env.fleet.nodes[i].log),
                });
            }
            let base = env.base[i].clone();
            if let Err(e) = env.fleet.restart(i, Some(base)).await {
                run.say(&format!("restarting node{i}: {e:#}"));
            }
            continue;
        }
        up[i] = true;
        if let Some(Response::Releases(r)) = ask(env, i, &Request::Releases).await {
            fin.releases[i] = Some(r);
        }
        if let Some(Response::Peers(p)) = ask(env, i, &Request::Peers).await {
            fin.peers[i] = Some(p);
        }
        if modules {
            if let Some(Response::Modules(m)) = ask(env, i, &Request::Modules { all: false }).await
            {
                let sample = traffic::Sample::of(run.now_ms(), i, &m);
                traffic::push(&mut run.samples, sample);
                fin.modules[i] = Some(m);
            }
        }
    }
    let t_ms = run.now_ms();
    record_round(run, env, &fin, &up, t_ms);
    fin
}

fn record_round(run: &mut Run, env: &Env, fin: &Final, up: &[bool], t_ms: u64) {
    let peer_ids: Vec<&String> = env.fleet.nodes.iter().map(|n| &n.info.peer_id).collect();
    let mut all_answered = true;
    let mut membership_ok = true;
    let mut min_version: BTreeMap<String, u64> = BTreeMap::new();
    let names: BTreeSet<String> = run
        .scenario
        .releases
        .iter()
        .map(|r| r.name.clone())
        .collect();
    for name in &names {
        min_version.insert(name.clone(), u64::MAX);
    }
    for i in 0..up.len() {
        if !up[i] {
            continue;
        }
        let (Some(rel), Some(peers)) = (&fin.releases[i], &fin.peers[i]) else {
            all_answered = false;
            continue;
        };
        for r in rel {
            let versions = run.held[i].entry(r.name.clone()).or_default();
            if versions.insert(r.version) && run.marks.len() < MARKS_MAX {
                run.marks.push(VersionMark {
                    t_ms,
                    node: i,
                    name: r.name.clone(),
                    version: r.version,
                });
            }
            run.seen[i]
                .entry((r.name.clone(), r.version))
                .or_insert_with(|| r.clone());
        }
        for name in &names {
            let v = rel
                .iter()
                .find(|r| &r.name == name)
                .map(|r| r.version)
                .unwrap_or(0);
            let e = min_version.entry(name.clone()).or_insert(u64::MAX);
            *e = (*e).min(v);
        }
        membership_ok &= sees_all(peers, &peer_ids, up, i);
    }
    run.rounds.push(RoundSummary {
        t_ms,
        all_answered,
        membership_ok,
        min_version,
    });
}

fn sees_all(peers: &[PeerView], ids: &[&String], up: &[bool], me: usize) -> bool {
    (0..ids.len()).filter(|m| *m != me && up[*m]).all(|m| {
        peers
            .iter()
            .any(|p| &p.peer_id == ids[m] && p.state == PeerState::Alive)
    })
}

/// Time from `heal_ms` to the first round in which every node that was up answered,
/// saw the others, and held everything acknowledged before the heal.
fn convergence_after(run: &Run, heal_ms: u64) -> Option<u64> {
    let before: Vec<PublishRecord> = run
        .publishes
        .iter()
        .filter(|p| p.t_ms <= heal_ms)
        .cloned()
        .collect();
    let acked = invariants::newest_acked(&before);
    run.rounds
        .iter()
        .filter(|r| r.t_ms >= heal_ms)
        .find(|r| {
            r.all_answered
                && r.membership_ok
                && acked
                    .iter()
                    .all(|(name, (v, _))| r.min_version.get(name).is_some_and(|m| m >= v))
        })
        .map(|r| r.t_ms - heal_ms)
}

/// What the module invariant expects per module name, from what was acknowledged.
fn module_expectations(
    scenario: &Scenario,
    publishes: &[PublishRecord],
) -> BTreeMap<String, ModuleExpect> {
    let mut out = BTreeMap::new();
    for spec in scenario.releases.iter().filter(|r| r.kind == Kind::Module) {
        let mut versions: Vec<u64> = publishes
            .iter()
            .filter(|p| p.ok && p.name == spec.name)
            .map(|p| p.version)
            .collect();
        versions.sort_unstable();
        let Some(newest) = versions.last().copied() else {
            continue;
        };
        let previous = versions
            .iter()
            .rev()
            .nth(1)
            .copied()
            .filter(|p| !spec.crashing.contains(p));
        out.insert(
            spec.name.clone(),
            ModuleExpect {
                newest,
                crashing: spec.crashing.contains(&newest),
                previous,
            },
        );
    }
    out
}
