//! The report of a run: a text a person reads, the same content as JSON, and a timeline
//! picture (SVG) of nodes, faults and release versions over time.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::byzantine::ByzantineStats;
use crate::faults::Damaged;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub seed: u64,
    pub nodes: usize,
    /// "loopback" or "netns".
    pub network: String,
    pub replay: String,
    pub out_dir: String,
    pub started_unix_ms: u64,
    /// Length of the workload phase, then of the whole run, seconds.
    pub workload_s: f64,
    pub total_s: f64,
    pub notes: Vec<String>,
    pub faults: Vec<FaultRecord>,
    pub publishes: Vec<PublishRecord>,
    pub incidents: Vec<Incident>,
    /// Time from the last heal (the end of the workload) to a converged fleet.
    pub convergence_ms: Option<u64>,
    pub converge_bound_s: u64,
    pub invariants: Vec<InvariantResult>,
    pub byzantine: Vec<ByzantineStats>,
    pub damaged: Vec<Damaged>,
    pub timeline: Vec<VersionMark>,
    /// Module message counters per node over the run (see `traffic.rs`).
    pub traffic: Vec<crate::traffic::Sample>,
    pub passed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    pub id: u32,
    pub kind: String,
    pub nodes: Vec<usize>,
    pub planned_start_ms: u64,
    pub planned_heal_ms: u64,
    pub start_ms: Option<u64>,
    pub heal_ms: Option<u64>,
    pub detail: String,
    pub heal_detail: String,
    pub skipped: Option<String>,
    pub error: Option<String>,
    /// From the heal until every reachable node held everything acknowledged before
    /// the heal and saw every other reachable node alive.
    pub convergence_ms: Option<u64>,
    /// Module messages delivered around the fault, when modules sent any.
    pub traffic: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PublishRecord {
    pub t_ms: u64,
    pub name: String,
    pub kind: String,
    pub version: u64,
    pub via: usize,
    pub content: String,
    pub bytes: u64,
    /// Firmware: the patches from earlier versions the release carries.
    pub patches: usize,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Incident {
    pub t_ms: u64,
    pub node: Option<usize>,
    pub what: String,
    pub log_excerpt: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Held,
    Failed,
    NotChecked,
}

#[derive(Clone, Debug, Serialize)]
pub struct InvariantResult {
    pub name: String,
    pub statement: String,
    pub status: Status,
    pub details: Vec<String>,
    pub excerpts: Vec<Excerpt>,
}

impl InvariantResult {
    /// Notes that the check held only `delay_ms` after the fleet converged.
    pub fn with_delay(mut self, delay_ms: u64) -> InvariantResult {
        if delay_ms > 0 && self.status == Status::Held {
            self.details.push(format!(
                "held from {:.1} s after the fleet converged",
                delay_ms as f64 / 1000.0
            ));
        }
        self
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Excerpt {
    pub node: usize,
    pub text: String,
}

/// A node first seen holding `name` at `version`.
#[derive(Clone, Debug, Serialize)]
pub struct VersionMark {
    pub t_ms: u64,
    pub node: usize,
    pub name: String,
    pub version: u64,
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

impl Report {
    pub fn text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "mesh-chaos run: {} (seed {}, {} nodes, {})",
            self.scenario, self.seed, self.nodes, self.network
        );
        if !self.description.is_empty() {
            let _ = writeln!(t, "{}", self.description.trim());
        }
        let _ = writeln!(t, "replay: {}", self.replay);
        let _ = writeln!(
            t,
            "workload {:.1} s, run {:.1} s; files in {}",
            self.workload_s, self.total_s, self.out_dir
        );
        for n in &self.notes {
            let _ = writeln!(t, "note: {n}");
        }
        let _ = writeln!(t, "\nFAULTS");
        if self.faults.is_empty() {
            let _ = writeln!(t, "  (none planned)");
        }
        for f in &self.faults {
            let when = match (f.start_ms, f.heal_ms) {
                (Some(s), Some(h)) => format!("{}..{}", secs(s), secs(h)),
                _ => format!(
                    "planned {}..{}",
                    secs(f.planned_start_ms),
                    secs(f.planned_heal_ms)
                ),
            };
            let _ = write!(t, "  #{:<3} {:<12} {:<14} ", f.id, f.kind, when);
            if let Some(s) = &f.skipped {
                let _ = writeln!(t, "SKIPPED: {s}");
                continue;
            }
            let _ = write!(t, "{}", f.detail);
            if !f.heal_detail.is_empty() {
                let _ = write!(t, "; heal: {}", f.heal_detail);
            }
            match f.convergence_ms {
                Some(c) => {
                    let _ = write!(t, "; converged {} after heal", secs(c));
                }
                None if f.error.is_none() => {
                    let _ = write!(t, "; not converged before the next fault or the end");
                }
                None => {}
            }
            if let Some(tr) = &f.traffic {
                let _ = write!(t, "; {tr}");
            }
            if let Some(e) = &f.error {
                let _ = write!(t, "; ERROR: {e}");
            }
            let _ = writeln!(t);
        }
        let _ = writeln!(t, "\nPUBLISHES");
        for p in &self.publishes {
            let _ = writeln!(
                t,
                "  {:>7} {} {} v{} via node{}: {}",
                secs(p.t_ms),
                p.kind,
                p.name,
                p.version,
                p.via,
                if p.ok {
                    format!(
                        "acknowledged ({} bytes, blake3 {}{})",
                        p.bytes,
                        &p.content[..12.min(p.content.len())],
                        match p.patches {
                            0 => String::new(),
                            n => format!(", with {n} patch(es) from earlier versions"),
                        }
                    )
                } else {
                    format!("refused: {}", p.error.clone().unwrap_or_default())
                }
            );
        }
        if !self.byzantine.is_empty() {
            let _ = writeln!(t, "\nBYZANTINE PEER");
            for b in &self.byzantine {
                let _ = writeln!(
                    t,
                    "  heard {} releases; lied {} times about holding blobs, served {} bad groups, replayed {} old manifests, sent {} forged manifests, {} flood messages, {} lying release lists",
                    b.releases_heard, b.have_lies, b.bad_groups_served, b.replays_sent, b.forged_sent, b.flood_sent, b.rpc_lies
                );
            }
        }
        if !self.incidents.is_empty() {
            let _ = writeln!(t, "\nINCIDENTS");
            for i in &self.incidents {
                let who = i.node.map(|n| format!("node{n}: ")).unwrap_or_default();
                let _ = writeln!(t, "  {:>7} {who}{}", secs(i.t_ms), i.what);
                for l in i.log_excerpt.lines() {
                    let _ = writeln!(t, "          | {l}");
                }
            }
        }
        let _ = writeln!(t, "\nINVARIANTS");
        for inv in &self.invariants {
            let tag = match inv.status {
                Status::Held => "held   ",
                Status::Failed => "FAILED ",
                Status::NotChecked => "n/a    ",
            };
            let _ = writeln!(t, "  {tag} {}: {}", inv.name, inv.statement);
            for d in &inv.details {
                let _ = writeln!(t, "          {d}");
            }
            for e in &inv.excerpts {
                let _ = writeln!(t, "          log of node{}:", e.node);
                for l in e.text.lines() {
                    let _ = writeln!(t, "          | {l}");
                }
            }
        }
        let held = self.count(Status::Held);
        let failed = self.count(Status::Failed);
        let na = self.count(Status::NotChecked);
        let _ = writeln!(
            t,
            "\nRESULT: {} ({held} held, {failed} failed, {na} not checked); convergence after the last heal: {}",
            if self.passed { "PASS" } else { "FAIL" },
            self.convergence_ms
                .map(secs)
                .unwrap_or_else(|| format!("not within {} s", self.converge_bound_s))
        );
        let _ = writeln!(t, "replay: {}", self.replay);
        t
    }

    fn count(&self, s: Status) -> usize {
        self.invariants.iter().filter(|i| i.status == s).count()
    }

    /// Writes report.txt, report.json and timeline.svg into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.txt"), self.text())?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("timeline.svg"), self.svg())?;
        Ok(())
    }

    /// The timeline: one row per node, faults as coloured spans, each node's first
    /// sight of a release version as a marker, publishes along the top.
    pub fn svg(&self) -> String {
        const LEFT: f64 = 80.0;
        const WIDTH: f64 = 1100.0;
        const TOP: f64 = 70.0;
        const ROW: f64 = 40.0;
        let end_ms = (self.total_s * 1000.0).max(1.0);
        let plot = WIDTH - LEFT - 20.0;
        let x = |ms: u64| LEFT + plot * (ms as f64 / end_ms).min(1.0);
        let height = TOP + ROW * self.nodes as f64 + 90.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="monospace" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="16" font-size="13">{} seed {} ({}, {} nodes): {}</text>"#,
            esc(&self.scenario),
            self.seed,
            self.network,
            self.nodes,
            if self.passed { "PASS" } else { "FAIL" }
        );
        // Time axis.
        let step_ms = nice_step(end_ms as u64);
        let mut tick = 0;
        while tick as f64 <= end_ms {
            let tx = x(tick);
            let _ = writeln!(
                s,
                r##"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#666">{}s</text>"##,
                TOP - 10.0,
                TOP + ROW * self.nodes as f64,
                TOP + ROW * self.nodes as f64 + 14.0,
                tick / 1000
            );
            tick += step_ms;
        }
        for n in 0..self.nodes {
            let y = TOP + ROW * n as f64;
            let _ = writeln!(
                s,
                r##"<text x="8" y="{:.1}">node{n}</text><line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#999"/>"##,
                y + ROW / 2.0 + 4.0,
                y + ROW / 2.0,
                LEFT + plot,
                y + ROW / 2.0
            );
        }
        for f in &self.faults {
            let (Some(start), Some(heal)) = (f.start_ms, f.heal_ms) else {
                continue;
            };
            let color = fault_color(&f.kind);
            for n in &f.nodes {
                let y = TOP + ROW * *n as f64 + 4.0;
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}" fill-opacity="0.35"><title>#{} {}: {}</title></rect>"#,
                    x(start),
                    (x(heal) - x(start)).max(2.0),
                    ROW - 8.0,
                    f.id,
                    esc(&f.kind),
                    esc(&f.detail)
                );
            }
        }
        for (k, p) in self.publishes.iter().filter(|p| p.ok).enumerate() {
            let px = x(p.t_ms);
            // Alternate label rows so publishes close in time stay readable.
            let label_y = TOP - 24.0 - 11.0 * (k % 2) as f64;
            let _ = writeln!(
                s,
                r##"<path d="M{:.1} {:.1} l-4 -8 h8 z" fill="#333"><title>publish {} v{} via node{}</title></path><text x="{px:.1}" y="{:.1}" text-anchor="middle" font-size="9">{} v{}</text>"##,
                px,
                TOP - 12.0,
                esc(&p.name),
                p.version,
                p.via,
                label_y,
                esc(&p.name),
                p.version
            );
        }
        let mut per_node = vec![0usize; self.nodes];
        for m in &self.timeline {
            let y = TOP + ROW * m.node as f64 + ROW / 2.0;
            // Alternate labels above and below the row so markers close in time stay
            // readable.
            let k = per_node.get(m.node).copied().unwrap_or(0);
            if let Some(c) = per_node.get_mut(m.node) {
                *c += 1;
            }
            let label_y = if k % 2 == 0 { y - 6.0 } else { y + 13.0 };
            let mx = x(m.t_ms);
            let _ = writeln!(
                s,
                r##"<circle cx="{mx:.1}" cy="{y:.1}" r="4" fill="#1f77b4"><title>node{} has {} v{} at {}</title></circle><text x="{:.1}" y="{:.1}" font-size="9" fill="#1f77b4">{}{}</text>"##,
                m.node,
                esc(&m.name),
                m.version,
                secs(m.t_ms),
                mx + 3.0,
                label_y,
                esc(&m.name.chars().take(6).collect::<String>()),
                m.version
            );
        }
        if let Some(c) = self.convergence_ms {
            let cx = x((self.workload_s * 1000.0) as u64 + c);
            let _ = writeln!(
                s,
                r##"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="green" stroke-dasharray="4 3"><title>converged</title></line>"##,
                TOP - 10.0,
                TOP + ROW * self.nodes as f64
            );
        }
        // Legend.
        let mut lx = LEFT;
        let ly = TOP + ROW * self.nodes as f64 + 40.0;
        for kind in [
            "kill",
            "pause",
            "partition",
            "loss",
            "slow",
            "disk_full",
            "corrupt_blob",
            "clock_skew",
            "byzantine",
        ] {
            let _ = writeln!(
                s,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}" fill-opacity="0.5"/><text x="{:.1}" y="{ly:.1}">{kind}</text>"#,
                ly - 10.0,
                fault_color(kind),
                lx + 16.0
            );
            lx += 16.0 + 8.0 * kind.len() as f64 + 14.0;
        }
        let _ = writeln!(
            s,
            r##"<circle cx="{LEFT}" cy="{:.1}" r="4" fill="#1f77b4"/><text x="{:.1}" y="{:.1}">a node first holds a release version</text><path d="M{:.1} {:.1} l-4 -8 h8 z" fill="#333"/><text x="{:.1}" y="{:.1}">a publish acknowledged</text>"##,
            ly + 20.0,
            LEFT + 10.0,
            ly + 24.0,
            LEFT + 330.0,
            ly + 26.0,
            LEFT + 340.0,
            ly + 24.0
        );
        s.push_str("</svg>\n");
        s
    }
}

fn fault_color(kind: &str) -> &'static str {
    match kind {
        "kill" => "#d62728",
        "pause" => "#ff7f0e",
        "partition" => "#9467bd",
        "loss" => "#8c564b",
        "slow" => "#e377c2",
        "disk_full" => "#7f7f7f",
        "corrupt_blob" => "#bcbd22",
        "clock_skew" => "#17becf",
        _ => "#2ca02c",
    }
}

/// A tick interval giving between about 5 and 15 ticks.
fn nice_step(end_ms: u64) -> u64 {
    for s in [1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600] {
        if end_ms / (s * 1000) <= 15 {
            return s * 1000;
        }
    }
    7200 * 1000
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_escapes_text_and_is_well_formed_enough() {
        let r = Report {
            scenario: "a<b & c".into(),
            description: String::new(),
            seed: 1,
            nodes: 2,
            network: "loopback".into(),
            replay: "mesh-chaos run x --seed 1".into(),
            out_dir: "/tmp/x".into(),
            started_unix_ms: 0,
            workload_s: 10.0,
            total_s: 12.0,
            notes: vec![],
            faults: vec![FaultRecord {
                id: 0,
                kind: "kill".into(),
                nodes: vec![1],
                planned_start_ms: 1000,
                planned_heal_ms: 3000,
                start_ms: Some(1000),
                heal_ms: Some(3000),
                detail: "kill -9 <node1>".into(),
                heal_detail: String::new(),
                skipped: None,
                error: None,
                convergence_ms: Some(500),
                traffic: None,
            }],
            publishes: vec![],
            incidents: vec![],
            convergence_ms: Some(900),
            converge_bound_s: 60,
            invariants: vec![InvariantResult {
                name: "x".into(),
                statement: "y".into(),
                status: Status::Failed,
                details: vec!["bad".into()],
                excerpts: vec![Excerpt {
                    node: 1,
                    text: "WARN something".into(),
                }],
            }],
            byzantine: vec![],
            damaged: vec![],
            timeline: vec![VersionMark {
                t_ms: 2000,
                node: 0,
                name: "m".into(),
                version: 1,
            }],
            traffic: vec![],
            passed: false,
        };
        let svg = r.svg();
        assert!(svg.contains("a&lt;b &amp; c"));
        assert!(svg.contains("&lt;node1&gt;"));
        assert!(!svg.contains("<node1>"));
        assert_eq!(svg.matches("<svg").count(), 1);
        assert!(svg.trim_end().ends_with("</svg>"));
        let text = r.text();
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("RESULT: FAIL"));
        assert!(text.contains("| WARN something"));
    }
}
