//! `mesh-chaos bench ...`: one file per benchmark.

use clap::Subcommand;

pub mod delta;
pub mod propagation;
pub mod sandbox;

#[derive(Subcommand, Debug)]
pub enum Bench {
    /// Time for one blob to reach every node of a fleet, against one transfer and raw quinn.
    Propagation(propagation::Args),
    /// Instantiation, dispatch overhead and neighbour isolation, against raw wasmtime.
    Sandbox(sandbox::Args),
    /// Patch sizes and costs of our delta codecs against bsdiff, xdelta3 and zstd.
    Delta(delta::Args),
}

pub async fn run(b: Bench) -> anyhow::Result<()> {
    match b {
        Bench::Propagation(a) => propagation::run(a).await,
        Bench::Sandbox(a) => sandbox::run(a).await,
        Bench::Delta(a) => delta::run(a).await,
    }
}
