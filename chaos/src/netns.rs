//! A lab network: one network namespace per node, joined by a bridge in the root
//! namespace, each node's uplink shaped with tbf. Needs root and iproute2.
//!
//! Names carry a fixed prefix and the harness's pid, so a later run can find and remove
//! what an interrupted run left behind.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context};

/// Namespace and interface names start with this, then the owning process id.
pub const PREFIX: &str = "mshb";
/// A /24 leaves room for the bridge address and this many nodes.
pub const LAB_NODES_MAX: usize = 200;

/// The lab's subnet is 10.77.0.0/24; the bridge takes .254 and node i takes .(i + 1).
/// These addresses exist only inside namespaces this process created.
const SUBNET: [u8; 3] = [10, 77, 0];

#[derive(Debug)]
pub struct NetLab {
    pid: u32,
    nodes: usize,
    bridge: String,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
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
        remove_stale();
        let pid = std::process::id();
        let lab = NetLab {
            pid,
            nodes: 0,
            bridge: format!("{PREFIX}{pid}br"),
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

    fn add_node(&self, i: usize, rate_mbit: u32) -> anyhow::Result<()> {
        let ns = self.namespace(i);
        let host_if = format!("{PREFIX}{}h{i}", self.pid);
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
        // The burst must hold at least one full-size packet plus a little; a larger
        // burst lets short transfers beat the rate, so keep it near the minimum.
        let rate = format!("{rate_mbit}mbit");
        let burst = format!(
            "{}b",
            (rate_mbit as u64 * 1_000_000 / 8 / 100).max(16 * 1024)
        );
        run(&[
            "ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
            &rate, "burst", &burst, "latency", "200ms",
        ])?;
        Ok(())
    }

    pub fn namespace(&self, i: usize) -> String {
        format!("{PREFIX}{}n{i}", self.pid)
    }

    /// Node i's address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], i as u8 + 1)
    }

    /// The root namespace's address on the lab bridge.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 254)
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
            let _ = run(&["ip", "netns", "del", &self.namespace(i)]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
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
}
