//! `mesh-chaos bench propagation`: how long one blob takes to reach every node of a
//! fleet of real `mesh` processes, against one point-to-point transfer of the same blob
//! and a raw quinn bulk transfer of the same bytes, measured in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mesh_transport::admin::{AdminClient, AdminServer};
use mesh_transport::SecretKey;
use rand::{RngCore, SeedableRng};

use crate::fleet::{find_mesh_bin, Fleet, FleetConfig, Topology};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Nodes in the fleet.
    #[arg(long, default_value_t = 16)]
    nodes: usize,
    /// Size of the blob, MiB.
    #[arg(long, default_value_t = 16)]
    size_mib: u64,
    /// Seed of the blob's random content (printed; the run replays with it).
    #[arg(long)]
    seed: Option<u64>,
    /// The mesh binary (default: beside this one, or MESH_BIN).
    #[arg(long)]
    mesh: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Put each node in its own network namespace with its uplink capped at this many
    /// Mbit/s (tbf). Needs root.
    #[arg(long)]
    rate_mbit: Option<u32>,
    /// Keep the nodes' state and logs here (`single/` and `fleet/`) instead of in a
    /// temporary directory, to see who sent what (`download complete ... from=`).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// How often the bench asks each node whether it has the blob yet: finer for small
/// fleets (a single transfer takes a fraction of a second), coarser for large ones so
/// the polling itself does not load the nodes.
fn poll_interval(nodes: usize) -> Duration {
    Duration::from_millis((5 * nodes as u64).clamp(10, 50))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.nodes < 2 {
        bail!("bench propagation: needs at least 2 nodes");
    }
    let mesh_bin = find_mesh_bin(args.mesh.clone())?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let size = args.size_mib * 1024 * 1024;
    let mut blob = vec![0u8; size as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut blob);
    println!(
        "bench propagation: {} nodes, {} MiB blob, seed {seed}, mesh {}",
        args.nodes,
        args.size_mib,
        mesh_bin.display()
    );
    let timeout = Duration::from_secs(args.timeout_s);
    if let Some(rate) = args.rate_mbit {
        crate::netns::available()
            .map_err(|why| anyhow::anyhow!("bench propagation --rate-mbit {rate}: {why}"))?;
        println!(
            "shaped: every node in its own network namespace, uplink capped at {rate} Mbit/s (tbf)"
        );
    }

    let gib = size as f64 / (1u64 << 30) as f64;
    let (quinn_s, quinn_cpu_s) = raw_quinn(&blob).await.context("raw quinn transfer")?;
    println!(
        "raw quinn bulk transfer: {quinn_s:.3} s ({:.1} MiB/s), {:.1} CPU s per GiB",
        mib_s(size, quinn_s),
        quinn_cpu_s / gib
    );

    let (single_s, single_cpu_s) = {
        let dir = args.dir.as_ref().map(|d| d.join("single"));
        let fleet = start_fleet(&mesh_bin, 2, args.rate_mbit, dir).await?;
        let (times, cpu_s) = propagate(&fleet, &blob, "bench-single", timeout).await?;
        fleet.stop().await;
        (times[1], cpu_s)
    };
    println!(
        "single transfer (2 nodes): {single_s:.3} s ({:.1} MiB/s), {:.1} CPU s per GiB",
        mib_s(size, single_s),
        single_cpu_s / gib
    );

    let dir = args.dir.as_ref().map(|d| d.join("fleet"));
    let fleet = start_fleet(&mesh_bin, args.nodes, args.rate_mbit, dir).await?;
    let (times, cpu_s) = propagate(&fleet, &blob, "bench-fleet", timeout).await?;
    let rss: Vec<Option<u64>> = (0..fleet.nodes.len()).map(|i| fleet.rss_kib(i)).collect();
    fleet.stop().await;
    let fleet_s = times.iter().cloned().fold(0.0, f64::max);

    println!("\n{:<8} {:>10} {:>12}", "NODE", "DONE_S", "RSS_MiB");
    for (i, t) in times.iter().enumerate() {
        let rss = rss[i]
            .map(|k| format!("{:.1}", k as f64 / 1024.0))
            .unwrap_or_default();
        println!("{:<8} {:>10.3} {:>12}", format!("node{i}"), t, rss);
    }
    let delivered_gib = (args.nodes - 1) as f64 * size as f64 / (1u64 << 30) as f64;
    let cpu_per_gib = cpu_s / delivered_gib;
    println!(
        "\nfleet {fleet_s:.3} s, single {single_s:.3} s, ratio {:.2}; our single transfer runs at {:.2}x raw quinn's throughput; {cpu_per_gib:.1} CPU s per delivered GiB",
        fleet_s / single_s,
        quinn_s / single_s
    );
    // All agents share this machine, so a fleet large enough to keep every core busy is
    // timed by the CPU, not by the links: its figures say nothing about the protocol.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu_busy = cpu_s / (fleet_s.max(1e-9) * cores as f64);
    println!(
        "the agents kept {cpu_busy:.2} of this machine's {cores} cores busy while the blob spread{}",
        if cpu_busy >= CPU_BOUND_BUSY_MIN {
            " (CPU-bound: the machine, not the network, set the fleet's time)"
        } else {
            ""
        }
    );
    let mut shaped = Vec::new();
    if let Some(rate) = args.rate_mbit {
        let bound_s = size as f64 * 8.0 / (rate as f64 * 1e6);
        println!(
            "physical bound at {rate} Mbit/s: {bound_s:.3} s (one blob-time); fleet/bound {:.2}; a star from the publisher would be {}",
            fleet_s / bound_s,
            args.nodes - 1
        );
        shaped.push(("rate_mbit", rate.to_string()));
        shaped.push(("bound_ratio", format!("{:.3}", fleet_s / bound_s)));
    }
    let mut pairs = vec![
        ("nodes", args.nodes.to_string()),
        ("size_mib", args.size_mib.to_string()),
        ("seed", seed.to_string()),
        ("fleet_s", format!("{fleet_s:.3}")),
        ("single_s", format!("{single_s:.3}")),
        ("ratio", format!("{:.3}", fleet_s / single_s)),
        ("quinn_s", format!("{quinn_s:.3}")),
        ("quinn_ratio", format!("{:.3}", quinn_s / single_s)),
        ("cpu_s_per_gib", format!("{cpu_per_gib:.2}")),
        ("single_cpu_s_per_gib", format!("{:.2}", single_cpu_s / gib)),
        ("quinn_cpu_s_per_gib", format!("{:.2}", quinn_cpu_s / gib)),
        ("cores", cores.to_string()),
        ("cpu_busy", format!("{cpu_busy:.3}")),
    ];
    pairs.extend(shaped);
    println!("{}", crate::key_values(&pairs));
    Ok(())
}

/// The share of the machine's cores the agents used above which a run is reported as
/// CPU-bound; below it, the scheduler can still run every agent when it has work.
const CPU_BOUND_BUSY_MIN: f64 = 0.8;

fn mib_s(size: u64, s: f64) -> f64 {
    size as f64 / (1024.0 * 1024.0) / s.max(1e-9)
}

async fn start_fleet(
    mesh_bin: &std::path::Path,
    nodes: usize,
    rate_mbit: Option<u32>,
    dir: Option<PathBuf>,
) -> anyhow::Result<Fleet> {
    let lab = match rate_mbit {
        Some(rate) => Some(std::sync::Arc::new(crate::netns::NetLab::create(
            nodes, rate,
        )?)),
        None => None,
    };
    let fleet = Fleet::start(&FleetConfig {
        lab,
        nodes,
        mesh_bin: mesh_bin.to_path_buf(),
        topology: Topology::Star,
        agent_args: vec!["--store-bytes-max".into(), (4u64 << 30).to_string()],
        dir,
    })
    .await?;
    // Everyone connected to everyone that kad found, at least to the publisher.
    fleet.wait_connected(1, Duration::from_secs(60)).await?;
    // Give gossipsub a few heartbeats to build its mesh so the announcement reaches all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(fleet)
}

/// Publishes `blob` at node 0 and returns, per node, the seconds until it held the blob
/// verified (0 for node 0), and the CPU seconds the fleet spent meanwhile.
async fn propagate(
    fleet: &Fleet,
    blob: &[u8],
    name: &str,
    timeout: Duration,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let id = fleet.publish_data(0, name, 1, blob).await?;
    let cpu0 = fleet.cpu_seconds();
    let t0 = Instant::now();
    let n = fleet.nodes.len();
    let mut done: Vec<Option<f64>> = vec![None; n];
    done[0] = Some(0.0);
    while done.iter().any(|d| d.is_none()) {
        for (i, d) in done.iter_mut().enumerate() {
            if d.is_none() && fleet.has(i, id).await? {
                *d = Some(t0.elapsed().as_secs_f64());
            }
        }
        if t0.elapsed() > timeout {
            let missing: Vec<String> = done
                .iter()
                .enumerate()
                .filter(|(_, d)| d.is_none())
                .map(|(i, _)| format!("node{i}"))
                .collect();
            bail!(
                "propagating {} bytes: not done after {timeout:?} on {}\n{}",
                blob.len(),
                missing.join(" "),
                fleet.log_tail(1, 20)
            );
        }
        tokio::time::sleep(poll_interval(n)).await;
    }
    let cpu = fleet.cpu_seconds() - cpu0;
    Ok((done.into_iter().map(|d| d.unwrap_or(0.0)).collect(), cpu))
}

/// One bulk transfer of `blob` over a bare quinn connection (same TLS stack and key
/// type as the mesh, no mesh protocol), as the ceiling for a single transfer: its
/// seconds, and the CPU seconds this process spent on it (both ends run here, and
/// nothing else does meanwhile).
async fn raw_quinn(blob: &[u8]) -> anyhow::Result<(f64, f64)> {
    let node = SecretKey::generate();
    let operator = SecretKey::generate();
    let server = AdminServer::bind("127.0.0.1:0".parse()?, &node, vec![operator.public()])?;
    let addr = server.local_addr().to_string();
    let size = blob.len();
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.context("accepting")?;
        let (_send, mut recv) = conn.accept_stream().await.context("accepting a stream")?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        while got < size {
            match recv.read(&mut buf).await? {
                Some(n) => got += n,
                None => break,
            }
        }
        anyhow::Ok((got, Instant::now()))
    });
    let client = AdminClient::connect(&addr, &operator, Some(node.public())).await?;
    let (mut send, _recv) = client.open_stream().await?;
    let cpu0 = crate::fleet::proc_cpu_seconds(std::process::id()).unwrap_or(0.0);
    let t0 = Instant::now();
    send.write_all(blob).await?;
    send.finish()?;
    let (got, t1) = receiver.await??;
    let cpu = crate::fleet::proc_cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu0;
    if got != size {
        bail!("raw quinn: received {got} of {size} bytes");
    }
    client.close().await;
    Ok((t1.duration_since(t0).as_secs_f64(), cpu))
}
