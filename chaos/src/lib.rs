//! mesh-chaos: the fault-injection harness and the whole-system benchmarks.
//!
//! It starts fleets of real `mesh` processes, injects faults, checks invariants, and
//! hosts the `bench` commands. Each benchmark is one file under `bench/` and ends its
//! output with one line of `key=value` pairs, so scripts can read the figures.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod byzantine;
pub mod faults;
pub mod firmware;
pub mod fleet;
pub mod invariants;
pub mod netns;
pub mod registry;
pub mod report;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod traffic;

#[derive(Parser, Debug)]
#[command(
    name = "mesh-chaos",
    version,
    about = "Fault injection and whole-system benchmarks for mesh"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Whole-system benchmarks.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Run a chaos scenario: a fleet, a workload, seeded faults, invariants, a report.
    Run(run::Args),
    /// Remove what interrupted runs left behind (agents, mounts, namespaces).
    Clean,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(b) => bench::run(b).await,
        Command::Run(a) => run::run(a).await,
        Command::Clean => {
            let s = registry::remove_stale();
            println!(
                "removed {} run record(s), {} agent(s), {} mount(s), and stale namespaces",
                s.records, s.agents, s.mounts
            );
            Ok(())
        }
    }
}

/// Formats the last line of a benchmark: `key=value` pairs separated by spaces.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn key_values_line() {
        let line = super::key_values(&[("nodes", "16".into()), ("ratio", "1.25".into())]);
        assert_eq!(line, "nodes=16 ratio=1.25");
    }
}
