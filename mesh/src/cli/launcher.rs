//! `mesh launcher --state DIR [-- AGENT FLAGS]`: runs the agent binary from the active
//! slot of the agent's own firmware target, the way a boot loader runs a device's image.
//!
//! The launcher is the part that does not update itself: it holds no node, only the
//! slots in `STATE/firmware/agent`. At every start of the agent it runs the boot
//! transition (a binary on trial uses one boot attempt; when none are left the record
//! switches back to the confirmed binary), then starts `SLOT agent --state DIR ...` with
//! the slot and the health gate in its environment. The agent confirms a healthy binary
//! itself; the launcher watches for what a broken one cannot report:
//!
//! - it exits or crashes before it is confirmed: the exit is noted and the next start
//!   uses another attempt;
//! - it stays up but is not confirmed by the deadline: it is killed and the record
//!   switches back at once.
//!
//! Exit code 75 from the agent means "start the active slot again" (after an
//! activation or a rollback it recorded). A confirmed binary that crashes is restarted
//! with a growing delay; one that exits 0 ends the launcher.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use mesh_actors::firmware::{
    AGENT_SLOT_MODE, AGENT_TARGET, DEADLINE_DEFAULT, GRACE_DEFAULT, LAUNCHER_DEADLINE_MS_ENV,
    LAUNCHER_GRACE_MS_ENV, LAUNCHER_HEALTH_ENV, LAUNCHER_SLOT_ENV, RESTART_EXIT_CODE,
};
use mesh_actors::slots::{Boot, Phase, Recovery, SlotStore, BOOT_ATTEMPTS_DEFAULT};

/// How often the launcher looks at the record while a binary on trial runs.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Time the agent gets beyond its own deadline to switch back by itself (and report
/// why) before the launcher kills it.
const DEADLINE_SLACK: Duration = Duration::from_secs(5);
/// Wait before starting again after a binary on trial exited.
const TRIAL_RESTART_DELAY: Duration = Duration::from_millis(200);
/// First wait before restarting a confirmed binary that crashed; doubles up to the max.
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A confirmed binary that ran this long before crashing restarts after the initial
/// delay again.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// How long the agent gets to stop after the launcher forwards a SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub struct LauncherArgs {
    /// The agent's state directory; the slots live in STATE/firmware/agent.
    #[arg(long)]
    state: PathBuf,
    /// The binary slot A starts with when the slots are created. Default: this program.
    #[arg(long)]
    agent_image: Option<PathBuf>,
    /// Starts a new binary gets to be confirmed healthy (set when the slots are created).
    #[arg(long, default_value_t = BOOT_ATTEMPTS_DEFAULT)]
    boot_attempts: u32,
    /// How long a new binary must stay up before it is confirmed, in milliseconds.
    #[arg(long, default_value_t = GRACE_DEFAULT.as_millis() as u64)]
    grace_ms: u64,
    /// How long a new binary has to be confirmed before the switch back, in milliseconds.
    #[arg(long, default_value_t = DEADLINE_DEFAULT.as_millis() as u64)]
    deadline_ms: u64,
    /// A command (run with `sh -c`) that must succeed before a new binary is confirmed.
    #[arg(long)]
    health: Option<String>,
    /// Flags for `mesh agent`, after `--` (`--state` is passed for you).
    #[arg(last = true)]
    agent_args: Vec<String>,
}

enum Ended {
    Exited(std::process::ExitStatus),
    Deadline,
    Stopped,
}

pub async fn run(args: &LauncherArgs) -> anyhow::Result<()> {
    super::agent::init_logging();
    let dir = mesh_actors::slots::target_dir(&args.state, AGENT_TARGET);
    let image = match &args.agent_image {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding this program to use as slot A")?,
    };
    let deadline = Duration::from_millis(args.deadline_ms);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    let mut backoff = BACKOFF_INITIAL;
    loop {
        let boot = boot(&dir, &image, args.boot_attempts).await?;
        let slot_path = dir.join(format!("slot-{}", boot.slot.name()));
        let mut cmd = tokio::process::Command::new(&slot_path);
        cmd.arg("agent")
            .arg("--state")
            .arg(&args.state)
            .args(&args.agent_args)
            .env(LAUNCHER_SLOT_ENV, boot.slot.name())
            .env(LAUNCHER_GRACE_MS_ENV, args.grace_ms.to_string())
            .env(LAUNCHER_DEADLINE_MS_ENV, args.deadline_ms.to_string())
            .env_remove(LAUNCHER_HEALTH_ENV);
        if let Some(h) = &args.health {
            cmd.env(LAUNCHER_HEALTH_ENV, h);
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the agent from {}", slot_path.display()))?;
        tracing::info!(slot = %boot.slot, trial = boot.trial, pid = child.id(), "started the agent");
        let ended = loop {
            tokio::select! {
                status = child.wait() => break Ended::Exited(status.context("waiting for the agent")?),
                _ = tokio::signal::ctrl_c() => {
                    stop(&mut child).await;
                    break Ended::Stopped;
                }
                _ = term.recv() => {
                    stop(&mut child).await;
                    break Ended::Stopped;
                }
                _ = tokio::time::sleep(WATCH_INTERVAL), if boot.trial => {
                    if started.elapsed() > deadline + DEADLINE_SLACK && still_on_trial(&dir, &boot) {
                        tracing::error!(slot = %boot.slot, "the new agent was not confirmed in time: killing it");
                        let _ = child.kill().await;
                        break Ended::Deadline;
                    }
                }
            }
        };
        // The agent is down: the slots are the launcher's again.
        let (mut store, _) = open(&dir, &image, args.boot_attempts).await?;
        let on_trial = still_on_trial(&dir, &boot);
        match ended {
            Ended::Stopped => {
                tracing::info!("stopped");
                return Ok(());
            }
            Ended::Deadline => {
                let reason = format!(
                    "not confirmed healthy within {} s of starting",
                    deadline.as_secs()
                );
                // The agent may have confirmed itself at the last moment.
                if let Err(e) = store.rollback(reason, mesh_actors::unix_ms()) {
                    tracing::warn!("switching back after the deadline: {e}");
                }
            }
            Ended::Exited(status) if status.code() == Some(RESTART_EXIT_CODE) => {
                tracing::info!("the agent asked to be started again");
            }
            Ended::Exited(status) if on_trial => {
                tracing::error!(slot = %boot.slot, %status, "the new agent exited before it was confirmed");
                if let Err(e) = store.note_trial_failure(format!("the agent exited with {status}"))
                {
                    tracing::warn!("noting the failed start: {e}");
                }
                tokio::time::sleep(TRIAL_RESTART_DELAY).await;
            }
            Ended::Exited(status) if status.success() => {
                tracing::info!("the agent exited cleanly");
                return Ok(());
            }
            Ended::Exited(status) => {
                if started.elapsed() > BACKOFF_RESET {
                    backoff = BACKOFF_INITIAL;
                }
                tracing::error!(%status, ?backoff, "the agent exited; restarting it");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn open(
    dir: &std::path::Path,
    image: &std::path::Path,
    attempts: u32,
) -> anyhow::Result<(SlotStore, Recovery)> {
    let (d, i) = (dir.to_path_buf(), image.to_path_buf());
    let opened = tokio::task::spawn_blocking(move || {
        SlotStore::open_or_create(&d, AGENT_TARGET, Some(&i), attempts, AGENT_SLOT_MODE)
    })
    .await?;
    let (store, recovery) = opened?;
    match recovery {
        Recovery::Clean | Recovery::Created => {}
        _ => tracing::warn!(?recovery, "recovered the agent's slots"),
    }
    Ok((store, recovery))
}

/// Runs the boot transition and checks the slot to run against its record.
async fn boot(
    dir: &std::path::Path,
    image: &std::path::Path,
    attempts: u32,
) -> anyhow::Result<Boot> {
    let (mut store, _) = open(dir, image, attempts).await?;
    let (boot, store) = tokio::task::spawn_blocking(move || {
        let boot = store.boot(mesh_actors::unix_ms());
        (boot, store)
    })
    .await?;
    let boot = boot?;
    if let Some(rb) = &boot.rolled_back {
        tracing::error!(
            from = rb.from.version,
            to = rb.to.version,
            "switched back to the confirmed agent: {}",
            rb.reason
        );
    }
    if let Err(e) = store.check() {
        bail!("the agent's slots are inconsistent: {e}");
    }
    Ok(boot)
}

fn still_on_trial(dir: &std::path::Path, boot: &Boot) -> bool {
    match SlotStore::load(dir) {
        Ok(r) => matches!(r.phase, Phase::Trial { slot, .. } if slot == boot.slot),
        Err(_) => false,
    }
}

/// Forwards a stop to the agent and waits for it, killing it if it lingers.
async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
