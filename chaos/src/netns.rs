//! A lab network: one network namespace per node, joined by a bridge in the root
//! namespace, each node's uplink shaped with tbf. Needs root and iproute2.
//!
//! Names carry a fixed prefix and the harness's pid, so a later run can find and remove
//! what an interrupted run left behind.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context};

/// Namespace and interface names start with this, then the owning process id.
pub const PREFIX: &str = "mshb";
/// A /24 leaves room for the bridge address and this many nodes.
pub const LAB_NODES_MAX: usize = 200;

/// The lab's subnet is 10.77.X.0/24 with X drawn from the harness's pid, so labs of
/// concurrent harnesses rarely share one; the bridge takes .254 and node i takes
/// .(i + 1). These addresses exist only inside namespaces this process created.
fn subnet(pid: u32) -> [u8; 3] {
    [10, 77, (pid % 251) as u8]
}

#[derive(Debug)]
pub struct NetLab {
    pid: u32,
    nodes: usize,
    bridge: String,
    rate_mbit: u32,
}

/// Prefix of the nftables table the harness makes inside a node's namespace; the
/// harness's pid follows, and the table goes with the namespace.
pub const NFT_PREFIX: &str = "mshc";

/// One lab per process at a time: names carry only the pid, and every lab uses the same
/// subnet. `create` waits for the previous lab to be dropped (tests run in parallel).
static LAB_IN_USE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// How long `create` waits for another lab of this process to go away.
const LAB_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether nftables can be driven here; the reason when not.
pub fn nft_available() -> Result<(), String> {
    available()?;
    match Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("nft is not installed (Debian package nftables)".into()),
    }
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    run_output(args).map(|_| ())
}

/// Runs a command; its standard output, or an error with its standard error.
pub(crate) fn run_output(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "running {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn run_stdin(args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "running {}: {}\n{input}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether namespaces can be made here; the reason when not.
pub fn available() -> Result<(), String> {
    // Root is uid 0; /proc tells without a libc call.
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if uid != "0" {
        return Err("not root (network namespaces and tbf need root)".into());
    }
    for tool in ["ip", "tc"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Err(format!("{tool} is not installed (Debian package iproute2)"));
        }
    }
    Ok(())
}

impl NetLab {
    /// Creates `nodes` namespaces, each with its uplink capped at `rate_mbit`.
    pub fn create(nodes: usize, rate_mbit: u32) -> anyhow::Result<NetLab> {
        if nodes == 0 || nodes > LAB_NODES_MAX {
            bail!("creating a lab network: between 1 and {LAB_NODES_MAX} nodes");
        }
        let deadline = std::time::Instant::now() + LAB_WAIT;
        while LAB_IN_USE
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            if std::time::Instant::now() > deadline {
                bail!("creating a lab network: another lab of this process is still up");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // From here the flag is ours; a failed create drops the half-built lab, whose
        // Drop clears it.
        remove_stale();
        let pid = std::process::id();
        let lab = NetLab {
            pid,
            nodes: 0,
            bridge: format!("{PREFIX}{pid}br"),
            rate_mbit,
        };
        run(&["ip", "link", "add", &lab.bridge, "type", "bridge"])?;
        let bridge_addr = format!("{}/24", lab.host_addr());
        run(&["ip", "addr", "add", &bridge_addr, "dev", &lab.bridge])?;
        run(&["ip", "link", "set", &lab.bridge, "up"])?;
        let mut lab = lab;
        for i in 0..nodes {
            lab.add_node(i, rate_mbit)?;
            lab.nodes = i + 1;
        }
        Ok(lab)
    }

    /// The tbf command that caps node i's uplink at `kbit` ("add" or "change").
    fn tbf(&self, i: usize, verb: &str, kbit: u64) -> anyhow::Result<()> {
        let ns = self.namespace(i);
        // The burst must hold at least one full-size packet plus a little; a larger
        // burst lets short transfers beat the rate, so keep it near the minimum.
        let rate = format!("{kbit}kbit");
        let burst = format!("{}b", (kbit * 1000 / 8 / 100).max(16 * 1024));
        run(&[
            "ip", "netns", "exec", &ns, "tc", "qdisc", verb, "dev", "eth0", "root", "tbf", "rate",
            &rate, "burst", &burst, "latency", "200ms",
        ])
    }

    /// Caps node i's uplink at `kbit` (a slow link).
    pub fn set_rate_kbit(&self, i: usize, kbit: u32) -> anyhow::Result<()> {
        self.tbf(i, "change", kbit as u64)
    }

    /// Gives node i back the lab's uplink rate.
    pub fn restore_rate(&self, i: usize) -> anyhow::Result<()> {
        self.tbf(i, "change", self.rate_mbit as u64 * 1000)
    }

    /// The name of the nftables table inside each node's namespace.
    pub fn nft_table(&self) -> String {
        format!("{NFT_PREFIX}{}", self.pid)
    }

    /// Replaces node i's packet filter: traffic to and from `blocked` nodes is dropped
    /// (a partition), and `lossy` nodes' packets are dropped at random with the given
    /// percentage each way. Empty lists remove the filter.
    pub fn set_filter(
        &self,
        i: usize,
        blocked: &[usize],
        lossy: &[(usize, u8)],
    ) -> anyhow::Result<()> {
        let table = self.nft_table();
        let ns = self.namespace(i);
        // Declaring the table first makes the delete succeed whether or not it exists,
        // so the script replaces the filter atomically.
        let mut script = format!("table inet {table}\ndelete table inet {table}\n");
        if !blocked.is_empty() || !lossy.is_empty() {
            let mut out = String::new();
            let mut inp = String::new();
            if !blocked.is_empty() {
                let set: Vec<String> = blocked.iter().map(|n| self.addr(*n).to_string()).collect();
                let set = set.join(", ");
                out += &format!("    ip daddr {{ {set} }} drop\n");
                inp += &format!("    ip saddr {{ {set} }} drop\n");
            }
            for (n, pct) in lossy {
                let a = self.addr(*n);
                out += &format!("    ip daddr {a} numgen random mod 100 < {pct} drop\n");
                inp += &format!("    ip saddr {a} numgen random mod 100 < {pct} drop\n");
            }
            script += &format!(
                "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n{out}  }}\n  chain in {{\n    type filter hook input priority 0; policy accept;\n{inp}  }}\n}}\n"
            );
        }
        run_stdin(&["ip", "netns", "exec", &ns, "nft", "-f", "-"], &script)
    }

    /// The nftables tables in node i's namespace (to check that a heal left none).
    pub fn nft_tables(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let ns = self.namespace(i);
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "list", "tables"])
            .output()
            .context("running nft list tables")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    fn host_if(&self, i: usize) -> String {
        format!("{PREFIX}{}h{i}", self.pid)
    }

    fn add_node(&self, i: usize, rate_mbit: u32) -> anyhow::Result<()> {
        let ns = self.namespace(i);
        let host_if = self.host_if(i);
        run(&["ip", "netns", "add", &ns])?;
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        run(&["ip", "link", "set", &host_if, "master", &self.bridge])?;
        run(&["ip", "link", "set", &host_if, "up"])?;
        let addr = format!("{}/24", self.addr(i));
        for args in [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "addr", "add", &addr, "dev", "eth0"],
            vec!["ip", "link", "set", "eth0", "up"],
        ] {
            let mut full = vec!["ip", "netns", "exec", &ns];
            full.extend(args);
            run(&full)?;
        }
        self.tbf(i, "add", rate_mbit as u64 * 1000)
    }

    pub fn namespace(&self, i: usize) -> String {
        format!("{PREFIX}{}n{i}", self.pid)
    }

    /// Node i's address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = subnet(self.pid);
        Ipv4Addr::new(a, b, c, i as u8 + 1)
    }

    /// The root namespace's address on the lab bridge.
    pub fn host_addr(&self) -> Ipv4Addr {
        let [a, b, c] = subnet(self.pid);
        Ipv4Addr::new(a, b, c, 254)
    }

    /// The command prefix that runs a program inside node i's namespace.
    pub fn exec_prefix(&self, i: usize) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.namespace(i),
        ]
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            // The kernel tears a namespace down in the background, and its veth pair with
            // it; deleting the host end first removes the pair at once, so a lab created
            // next by this process (same names) does not find it still there.
            let _ = run(&["ip", "link", "del", &self.host_if(i)]);
            let _ = run(&["ip", "netns", "del", &self.namespace(i)]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
        LAB_IN_USE.store(false, Ordering::Release);
    }
}

/// Removes namespaces and bridges of earlier runs whose process is gone.
pub fn remove_stale() {
    let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if let Some(rest) = name.strip_prefix(PREFIX) {
                let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                if !pid.is_empty() && !alive(&pid) {
                    let _ = run(&["ip", "netns", "del", name]);
                }
            }
        }
    }
    if let Ok(out) = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(':').nth(1).map(str::trim).unwrap_or("");
            if let Some(rest) = name.strip_prefix(PREFIX) {
                let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                if !pid.is_empty() && !alive(&pid) {
                    let _ = run(&["ip", "link", "del", name]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Creates a two-node lab, checks the nodes reach each other through the bridge,
    /// and that dropping the lab leaves nothing behind. Skips, saying why, without root.
    #[test]
    fn lab_comes_up_and_cleans_up() {
        if let Err(why) = available() {
            println!("skipping lab_comes_up_and_cleans_up: {why}");
            return;
        }
        let lab = NetLab::create(2, 50).unwrap();
        let ns0 = lab.namespace(0);
        let ping = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns0,
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                &lab.addr(1).to_string(),
            ])
            .output();
        if let Ok(out) = ping {
            // ping may be missing on a minimal machine; a missing tool is not a lab fault.
            if out.status.code() != Some(127)
                && !String::from_utf8_lossy(&out.stderr).contains("No such file")
            {
                assert!(
                    out.status.success(),
                    "node0 cannot reach node1: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        let names = (lab.namespace(0), lab.namespace(1), lab.bridge.clone());
        drop(lab);
        let list = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        assert!(
            !list.contains(&names.0) && !list.contains(&names.1),
            "namespaces left: {list}"
        );
        let links =
            String::from_utf8_lossy(&Command::new("ip").args(["link"]).output().unwrap().stdout)
                .to_string();
        assert!(!links.contains(&names.2), "bridge left behind");
    }

    fn ping(lab: &NetLab, from: usize, to: usize) -> Option<bool> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.namespace(from),
                "ping",
                "-c",
                "1",
                "-W",
                "1",
            ])
            .arg(lab.addr(to).to_string())
            .output()
            .ok()?;
        // A missing ping (exit 127, or `ip netns exec` failing to find it) says nothing.
        if out.status.code() == Some(127)
            || String::from_utf8_lossy(&out.stderr).contains("No such file")
        {
            return None;
        }
        Some(out.status.success())
    }

    /// A partition filter cuts two nodes apart, a loss filter installs, a slow link
    /// changes the rate, and healing leaves no nftables table in either namespace.
    #[test]
    fn filters_cut_and_heal_leaving_no_table() {
        if let Err(why) = nft_available() {
            println!("skipping filters_cut_and_heal_leaving_no_table: {why}");
            return;
        }
        let lab = NetLab::create(2, 50).unwrap();
        lab.set_filter(0, &[1], &[]).unwrap();
        lab.set_filter(1, &[0], &[]).unwrap();
        assert!(lab
            .nft_tables(0)
            .unwrap()
            .iter()
            .any(|t| t.contains(&lab.nft_table())));
        if let Some(reached) = ping(&lab, 0, 1) {
            assert!(!reached, "the partition let a ping through");
        }
        lab.set_filter(0, &[], &[(1, 30)]).unwrap();
        lab.set_rate_kbit(1, 1000).unwrap();
        lab.restore_rate(1).unwrap();
        for i in 0..2 {
            lab.set_filter(i, &[], &[]).unwrap();
            assert!(
                lab.nft_tables(i).unwrap().is_empty(),
                "a table was left in node{i}"
            );
        }
        if let Some(reached) = ping(&lab, 0, 1) {
            assert!(reached, "the healed partition still blocks");
        }
    }
}
