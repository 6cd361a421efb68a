//! `mesh-chaos bench delta`: patch sizes and costs of our delta codecs
//! (`mesh_actors::delta`) against Debian's `bsdiff`, `xdelta3` and `zstd --patch-from`,
//! on real old/new pairs: two versions of one file from two versions of a Debian
//! package (`apt-get download NAME=VERSION`, unpacked with `dpkg-deb -x`).
//!
//! Every apply, ours included, runs as a child process under `/usr/bin/time` so that its
//! peak resident memory is measured the same way; ours runs as the hidden
//! `bench delta --apply-worker` mode of this binary, reading the old image from its file
//! (`delta::apply_file`). Every result is checked against the new image.
//!
//! The last line is `key=value` pairs: `pairs` (measured), `skipped`,
//! `worst_vs_best_peer` (the largest, over the pairs, of our best patch divided by the
//! smallest peer patch; at most 1.0 means we never lose), `mean_vs_best_peer`, and the
//! largest apply peak RSS of ours and of each peer.

use anyhow::{bail, Context};
use mesh_actors::delta::{self, Codec};
use mesh_transport::ContentId;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The pairs measured when none are given: package and the file in it (a path inside
/// the package, or a file name to look for), oldest against newest available version.
const DEFAULT_PAIRS: &[&str] = &[
    "openssh-server:usr/sbin/sshd",
    "libssl3:libcrypto.so.3",
    "git:usr/bin/git",
    "nginx:usr/sbin/nginx",
    "libcurl4:libcurl.so.4.8.0",
];

/// The memory-measuring wrapper every apply runs under (Debian package `time`).
const TIME: &str = "/usr/bin/time";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Pairs to measure, comma-separated: `PACKAGE:FILE` compares the oldest and newest
    /// versions `apt-cache madison` lists, `PACKAGE=OLD=NEW:FILE` two given versions.
    /// FILE is a path inside the package or a file name to look for. Defaults to
    /// sshd, libcrypto, git, nginx and libcurl.
    #[arg(long, value_delimiter = ',')]
    pub pairs: Vec<String>,
    /// Where downloaded packages, unpacked trees and patches are kept between runs
    /// (default: $XDG_CACHE_HOME/mesh-delta-bench, else target/delta-bench).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Internal: apply one patch and exit (our apply, measured from the parent).
    #[arg(long, hide = true)]
    pub apply_worker: bool,
    #[arg(long, hide = true)]
    pub old: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub patch: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub out: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub expected: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        if args.apply_worker {
            apply_worker(&args)
        } else {
            bench(args)
        }
    })
    .await?
}

/// The child side of our apply measurement.
fn apply_worker(args: &Args) -> anyhow::Result<()> {
    let (Some(old), Some(patch), Some(out), Some(expected)) =
        (&args.old, &args.patch, &args.out, &args.expected)
    else {
        bail!("--apply-worker needs --old, --patch, --out and --expected");
    };
    let expected: ContentId = expected.parse().context("parsing --expected")?;
    let patch = std::io::BufReader::new(std::fs::File::open(patch).context("opening the patch")?);
    let out = std::io::BufWriter::new(std::fs::File::create(out).context("creating the output")?);
    delta::apply_file(old, patch, out, expected)?;
    Ok(())
}

/// One old/new pair to measure.
#[derive(Clone, Debug)]
struct PairSpec {
    package: String,
    versions: Option<(String, String)>,
    file: String,
}

fn parse_pair(s: &str) -> anyhow::Result<PairSpec> {
    // Versions may hold ':' (epochs), paths do not: the file is after the last one.
    let (spec, file) = s
        .rsplit_once(':')
        .with_context(|| format!("pair {s:?}: expected PACKAGE[=OLD=NEW]:FILE"))?;
    let mut parts = spec.split('=');
    let package = parts.next().unwrap_or_default().to_string();
    let versions = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => None,
        (Some(old), Some(new), None) => Some((old.to_string(), new.to_string())),
        _ => bail!("pair {s:?}: expected PACKAGE=OLD=NEW:FILE"),
    };
    if package.is_empty() || file.is_empty() {
        bail!("pair {s:?}: empty package or file");
    }
    Ok(PairSpec {
        package,
        versions,
        file: file.to_string(),
    })
}

/// A measured way of making and applying a patch.
struct Row {
    tool: String,
    ours: bool,
    patch_bytes: u64,
    create: Duration,
    apply: Duration,
    apply_rss_kb: u64,
}

/// A peer tool: how to create and apply a patch with it.
struct Peer {
    name: &'static str,
    binary: &'static str,
}

const PEERS: &[Peer] = &[
    Peer {
        name: "bsdiff",
        binary: "bsdiff",
    },
    Peer {
        name: "xdelta3 -9",
        binary: "xdelta3",
    },
    Peer {
        name: "zstd -19 --long --patch-from",
        binary: "zstd",
    },
];

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
}

fn run_checked(cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `cmd` under `/usr/bin/time`, returning wall time and peak RSS in KiB.
fn measured(
    program: &Path,
    args: &[&std::ffi::OsStr],
    scratch: &Path,
) -> anyhow::Result<(Duration, u64)> {
    let rss_file = scratch.join("rss.txt");
    let mut cmd = Command::new(TIME);
    cmd.arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(program)
        .args(args);
    let start = Instant::now();
    run_checked(&mut cmd)?;
    let took = start.elapsed();
    let rss = std::fs::read_to_string(&rss_file)?;
    let kb = rss
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("reading peak RSS from {rss:?}"))?;
    Ok((took, kb))
}

/// The versions `apt-cache madison` lists for a package, oldest first.
fn versions(package: &str) -> anyhow::Result<Vec<String>> {
    let out = run_checked(Command::new("apt-cache").arg("madison").arg(package))?;
    let mut found: Vec<String> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        if cols.len() == 3 && !cols[2].contains("Sources") && !found.iter().any(|v| v == cols[1]) {
            found.push(cols[1].to_string());
        }
    }
    // Sort with dpkg's own order (a few versions: a process per comparison is fine).
    let mut sorted: Vec<String> = Vec::new();
    for v in found {
        let at = sorted
            .iter()
            .position(|s| {
                Command::new("dpkg")
                    .args(["--compare-versions", &v, "lt", s])
                    .status()
                    .is_ok_and(|st| st.success())
            })
            .unwrap_or(sorted.len());
        sorted.insert(at, v);
    }
    Ok(sorted)
}

/// Downloads (once) and unpacks (once) a package version, returning the tree.
fn unpacked(cache: &Path, package: &str, version: &str) -> anyhow::Result<PathBuf> {
    let safe = format!("{package}_{}", version.replace([':', '~', '+'], "_"));
    let tree = cache.join("trees").join(&safe);
    if tree.join(".complete").exists() {
        return Ok(tree);
    }
    let debs = cache.join("debs").join(&safe);
    std::fs::create_dir_all(&debs)?;
    let has_deb = |dir: &Path| -> anyhow::Result<Option<PathBuf>> {
        Ok(std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb")))
    };
    let deb = match has_deb(&debs)? {
        Some(deb) => deb,
        None => {
            run_checked(
                Command::new("apt-get")
                    .arg("download")
                    .arg(format!("{package}={version}"))
                    .current_dir(&debs),
            )?;
            has_deb(&debs)?.context("apt-get download left no .deb")?
        }
    };
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    std::fs::create_dir_all(&tree)?;
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    std::fs::write(tree.join(".complete"), b"")?;
    Ok(tree)
}

/// The file `file` names in `tree`: a relative path, or a regular file of that name.
fn find_file(tree: &Path, file: &str) -> anyhow::Result<PathBuf> {
    if file.contains('/') {
        let p = tree.join(file);
        return if p.is_file() {
            Ok(p)
        } else {
            bail!("{file} is not in {}", tree.display())
        };
    }
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() && entry.file_name() == file {
                return Ok(entry.path());
            }
        }
    }
    bail!("no file named {file} in {}", tree.display())
}

fn check_same(path: &Path, expected: &[u8], what: &str) -> anyhow::Result<()> {
    let got = std::fs::read(path)?;
    if got != expected {
        bail!("{what}: the applied result differs from the new image");
    }
    Ok(())
}

/// Resolves a pair to two files (downloading and unpacking as needed): its label, the
/// old and new file, and a scratch directory for its patches.
fn resolve_pair(
    cache: &Path,
    pair: &PairSpec,
) -> anyhow::Result<(String, PathBuf, PathBuf, PathBuf)> {
    let (old_v, new_v) = match &pair.versions {
        Some(v) => v.clone(),
        None => {
            let all = versions(&pair.package)?;
            match (all.first(), all.last()) {
                (Some(o), Some(n)) if all.len() >= 2 => (o.clone(), n.clone()),
                _ => bail!(
                    "{}: fewer than two versions in the apt sources (found {all:?}; run apt-get update?)",
                    pair.package
                ),
            }
        }
    };
    let old_path = find_file(&unpacked(cache, &pair.package, &old_v)?, &pair.file)?;
    let new_path = find_file(&unpacked(cache, &pair.package, &new_v)?, &pair.file)?;
    let label = format!("{} {} -> {} {}", pair.package, old_v, new_v, pair.file);
    let scratch =
        cache
            .join("work")
            .join(format!("{}_{}", pair.package, pair.file.replace('/', "_")));
    Ok((label, old_path, new_path, scratch))
}

/// Measures one old/new pair of files: our codecs and every available peer.
fn measure_images(
    old_path: &Path,
    new_path: &Path,
    scratch: &Path,
    peers: &[&Peer],
    worker: &Path,
) -> anyhow::Result<(u64, Vec<Row>)> {
    let old = std::fs::read(old_path)?;
    let new = std::fs::read(new_path)?;
    std::fs::create_dir_all(scratch)?;
    let out_path = scratch.join("out");
    let expected = ContentId::of(&new);
    let mut rows = Vec::new();

    for codec in Codec::ALL {
        let start = Instant::now();
        let patch = delta::create(codec, &old, &new)?;
        let create = start.elapsed();
        let patch_path = scratch.join(format!("ours.{codec}"));
        std::fs::write(&patch_path, &patch)?;
        let expected_hex = expected.to_string();
        let args = worker_args(old_path, &patch_path, &out_path, &expected_hex);
        let (apply, rss) = measured(worker, &args, scratch)?;
        check_same(&out_path, &new, &format!("ours {codec}"))?;
        rows.push(Row {
            tool: format!("ours {codec}"),
            ours: true,
            patch_bytes: patch.len() as u64,
            create,
            apply,
            apply_rss_kb: rss,
        });
    }

    // zstd needs a window covering the larger image, for creating and applying alike.
    let window_log = (64 - (old.len().max(new.len()) as u64).leading_zeros()).clamp(27, 31);
    let long = format!("--long={window_log}");
    let patch_from = format!("--patch-from={}", old_path.display());
    for peer in peers {
        let patch_path = scratch.join(format!("peer.{}", peer.binary));
        let (o, n, p, out) = (
            old_path.as_os_str(),
            new_path.as_os_str(),
            patch_path.as_os_str(),
            out_path.as_os_str(),
        );
        let binary = Path::new(peer.binary);
        let (create_args, apply_args): (Vec<&std::ffi::OsStr>, Vec<&std::ffi::OsStr>) =
            match peer.binary {
                "bsdiff" => (vec![o, n, p], vec![o, out, p]),
                "xdelta3" => (
                    vec![
                        "-e".as_ref(),
                        "-9".as_ref(),
                        "-f".as_ref(),
                        "-s".as_ref(),
                        o,
                        n,
                        p,
                    ],
                    vec!["-d".as_ref(), "-f".as_ref(), "-s".as_ref(), o, p, out],
                ),
                _ => (
                    vec![
                        "-q".as_ref(),
                        "-f".as_ref(),
                        "-19".as_ref(),
                        long.as_ref(),
                        patch_from.as_ref(),
                        n,
                        "-o".as_ref(),
                        p,
                    ],
                    vec![
                        "-q".as_ref(),
                        "-d".as_ref(),
                        "-f".as_ref(),
                        long.as_ref(),
                        patch_from.as_ref(),
                        p,
                        "-o".as_ref(),
                        out,
                    ],
                ),
            };
        let (create, _) = measured(binary, &create_args, scratch)?;
        let apply_binary = if peer.binary == "bsdiff" {
            Path::new("bspatch")
        } else {
            binary
        };
        let (apply, rss) = measured(apply_binary, &apply_args, scratch)?;
        check_same(&out_path, &new, peer.name)?;
        rows.push(Row {
            tool: peer.name.to_string(),
            ours: false,
            patch_bytes: std::fs::metadata(&patch_path)?.len(),
            create,
            apply,
            apply_rss_kb: rss,
        });
    }
    Ok((new.len() as u64, rows))
}

/// The arguments that make this binary apply one patch (see [`apply_worker`]).
fn worker_args<'a>(
    old: &'a Path,
    patch: &'a Path,
    out: &'a Path,
    expected: &'a str,
) -> Vec<&'a std::ffi::OsStr> {
    vec![
        "bench".as_ref(),
        "delta".as_ref(),
        "--apply-worker".as_ref(),
        "--old".as_ref(),
        old.as_os_str(),
        "--patch".as_ref(),
        patch.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--expected".as_ref(),
        expected.as_ref(),
    ]
}

fn default_cache() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("mesh-delta-bench"),
        _ => PathBuf::from("target/delta-bench"),
    }
}

fn bench(args: Args) -> anyhow::Result<()> {
    let specs: Vec<String> = if args.pairs.is_empty() {
        DEFAULT_PAIRS.iter().map(|s| s.to_string()).collect()
    } else {
        args.pairs.clone()
    };
    let pairs = specs
        .iter()
        .map(|s| parse_pair(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cache = args.cache.clone().unwrap_or_else(default_cache);
    std::fs::create_dir_all(&cache)?;
    if !Path::new(TIME).is_file() {
        bail!("{TIME} is missing (apt-get install time): it measures every apply's peak memory");
    }
    for tool in ["apt-get", "apt-cache", "dpkg-deb"] {
        if !on_path(tool) {
            bail!("{tool} is missing: the pairs come from Debian packages");
        }
    }
    let mut peers: Vec<&Peer> = Vec::new();
    for peer in PEERS {
        let apply = if peer.binary == "bsdiff" {
            "bspatch"
        } else {
            peer.binary
        };
        if on_path(peer.binary) && on_path(apply) {
            peers.push(peer);
        } else {
            println!(
                "skipped peer {}: {} not installed (apt-get install bsdiff xdelta3 zstd)",
                peer.name, peer.binary
            );
        }
    }
    let worker = std::env::current_exe().context("finding this binary for the apply worker")?;
    // Our worker's footprint applying an empty patch: this binary, its async runtime and
    // the allocator, which every apply below carries on top of what the codec holds.
    let baseline_kb = {
        let dir = cache.join("work").join("idle");
        std::fs::create_dir_all(&dir)?;
        let (old, patch, out) = (dir.join("old"), dir.join("patch"), dir.join("out"));
        std::fs::write(&old, b"")?;
        std::fs::write(&patch, delta::create(Codec::Bsdiff, b"", b"")?)?;
        let expected = ContentId::of(b"").to_string();
        let args = worker_args(&old, &patch, &out, &expected);
        measured(&worker, &args, &dir)?.1
    };
    println!(
        "cache {}; our apply runs in this binary, whose peak RSS applying an empty patch is {baseline_kb} KiB",
        cache.display()
    );

    let (mut measured_pairs, mut skipped) = (0usize, 0usize);
    let (mut worst, mut ratio_sum) = (0f64, 0f64);
    // Largest apply peak RSS per tool, over the pairs.
    let mut rss_max: Vec<(String, u64)> = Vec::new();
    let mut wins = 0usize;
    let mut jobs: Vec<(String, PathBuf, PathBuf, PathBuf)> = Vec::new();
    for pair in &pairs {
        match resolve_pair(&cache, pair) {
            Ok(job) => jobs.push(job),
            Err(e) => {
                println!("skipped pair {}:{}: {e:#}", pair.package, pair.file);
                skipped += 1;
            }
        }
    }
    // A larger image, like a firmware bundle: every old file concatenated against every
    // new one. It shows how apply memory grows (or not) with the image.
    if jobs.len() >= 2 {
        let dir = cache.join("work").join("bundle");
        std::fs::create_dir_all(&dir)?;
        let (old_b, new_b) = (dir.join("old.img"), dir.join("new.img"));
        let concat = |pick: fn(&(String, PathBuf, PathBuf, PathBuf)) -> &PathBuf| -> anyhow::Result<Vec<u8>> {
            let mut all = Vec::new();
            for job in &jobs {
                all.extend_from_slice(&std::fs::read(pick(job))?);
            }
            Ok(all)
        };
        std::fs::write(&old_b, concat(|j| &j.1)?)?;
        std::fs::write(&new_b, concat(|j| &j.2)?)?;
        jobs.push((
            format!("bundle of the {} pairs above", jobs.len()),
            old_b,
            new_b,
            dir,
        ));
    }
    for (label, old_path, new_path, scratch) in &jobs {
        let (new_bytes, rows) = match measure_images(old_path, new_path, scratch, &peers, &worker) {
            Ok(r) => r,
            Err(e) => {
                println!("skipped {label}: {e:#}");
                skipped += 1;
                continue;
            }
        };
        measured_pairs += 1;
        println!();
        println!("{label} (new image {new_bytes} bytes)");
        println!(
            "  {:<30} {:>12} {:>9} {:>11} {:>10} {:>14}",
            "tool", "patch bytes", "% of new", "create ms", "apply ms", "apply peak KiB"
        );
        for r in &rows {
            println!(
                "  {:<30} {:>12} {:>8.2}% {:>11} {:>10} {:>14}",
                r.tool,
                r.patch_bytes,
                100.0 * r.patch_bytes as f64 / new_bytes.max(1) as f64,
                r.create.as_millis(),
                r.apply.as_millis(),
                r.apply_rss_kb
            );
        }
        let best_ours = rows.iter().filter(|r| r.ours).min_by_key(|r| r.patch_bytes);
        let best_peer = rows
            .iter()
            .filter(|r| !r.ours)
            .min_by_key(|r| r.patch_bytes);
        if let Some(ours) = best_ours {
            if let Some(peer) = best_peer {
                let ratio = ours.patch_bytes as f64 / peer.patch_bytes.max(1) as f64;
                worst = worst.max(ratio);
                ratio_sum += ratio;
                if ratio <= 1.0 {
                    wins += 1;
                }
                println!(
                    "  best ours ({}) / best peer ({}) = {ratio:.3}",
                    ours.tool, peer.tool
                );
            }
        }
        for r in &rows {
            match rss_max.iter_mut().find(|(t, _)| *t == r.tool) {
                Some((_, kb)) => *kb = (*kb).max(r.apply_rss_kb),
                None => rss_max.push((r.tool.clone(), r.apply_rss_kb)),
            }
        }
    }
    println!();
    let compared = if peers.is_empty() { 0 } else { measured_pairs };
    let mut kv: Vec<(&str, String)> = vec![
        ("pairs", measured_pairs.to_string()),
        ("skipped", skipped.to_string()),
        ("peers", peers.len().to_string()),
        (
            "worst_vs_best_peer",
            if compared > 0 {
                format!("{worst:.3}")
            } else {
                "n/a".into()
            },
        ),
        (
            "mean_vs_best_peer",
            if compared > 0 {
                format!("{:.3}", ratio_sum / compared as f64)
            } else {
                "n/a".into()
            },
        ),
        ("pairs_not_larger_than_best_peer", wins.to_string()),
        ("ours_worker_idle_rss_kb", baseline_kb.to_string()),
    ];
    let names = [
        ("ours bsdiff", "ours_bsdiff_rss_kb_max"),
        ("ours zstd", "ours_zstd_rss_kb_max"),
        ("bsdiff", "bspatch_rss_kb_max"),
        ("xdelta3 -9", "xdelta3_rss_kb_max"),
        ("zstd -19 --long --patch-from", "zstd_rss_kb_max"),
    ];
    for (tool, key) in names {
        if let Some((_, kb)) = rss_max.iter().find(|(t, _)| t == tool) {
            kv.push((key, kb.to_string()));
        }
    }
    println!("{}", crate::key_values(&kv));
    if measured_pairs == 0 {
        bail!("no pair could be measured");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_with_and_without_versions() {
        let p = parse_pair("openssh-server=1:9.2p1-2+deb12u7=1:9.2p1-2+deb12u10:usr/sbin/sshd")
            .unwrap();
        assert_eq!(p.package, "openssh-server");
        assert_eq!(
            p.versions,
            Some(("1:9.2p1-2+deb12u7".into(), "1:9.2p1-2+deb12u10".into()))
        );
        assert_eq!(p.file, "usr/sbin/sshd");
        let p = parse_pair("libssl3:libcrypto.so.3").unwrap();
        assert_eq!(
            (p.package.as_str(), p.versions, p.file.as_str()),
            ("libssl3", None, "libcrypto.so.3")
        );
        assert!(parse_pair("nofile").is_err());
        assert!(parse_pair("pkg=onlyone:file").is_err());
    }
}
