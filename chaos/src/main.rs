//! `mesh-chaos`: the fault-injection harness and the whole-system benchmarks. Parsing
//! and dispatch live in the library; this file only starts the runtime.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = mesh_chaos::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(mesh_chaos::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
