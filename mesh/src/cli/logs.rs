//! `mesh logs`: recent module log lines on the attached node.

use anyhow::bail;
use clap::Args;

use super::client::Session;
use super::Cli;
use crate::proto::{Request, Response};

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Only this module's lines.
    module: Option<String>,
    /// How many of the most recent lines.
    #[arg(long, short = 'n', default_value_t = 50)]
    lines: u32,
}

pub async fn run(cli: &Cli, args: &LogsArgs) -> anyhow::Result<()> {
    let session = Session::attach(cli).await?;
    let req = Request::Logs {
        module: args.module.clone(),
        limit: args.lines,
    };
    let Response::Logs(lines) = session.request(&req).await? else {
        bail!("reading module logs: unexpected response");
    };
    session.close().await;
    if cli.json {
        return super::print_json(&lines);
    }
    for l in lines {
        let trunc = if l.truncated { " [truncated]" } else { "" };
        println!("{} v{}: {}{}", l.module, l.version, l.text, trunc);
    }
    Ok(())
}
