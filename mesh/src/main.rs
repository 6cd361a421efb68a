//! The `mesh` binary: agent, operator CLI and demo. Parsing and dispatch live in
//! `mesh::cli`; this file only starts the runtime and reports errors.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = mesh::cli::Cli::parse();
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
    match runtime.block_on(mesh::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
