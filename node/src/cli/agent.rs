//! `weft agent` and `weft check-config`.

use std::path::Path;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::info;
use weft_discovery::Keyring;

use crate::agent::{Agent, Control};
use crate::config::Config;

/// Runs the agent until SIGTERM or SIGINT; SIGHUP reloads.
pub(super) fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.node.worker_threads)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async move {
        let log = crate::telemetry::init(&config.log.level, config.log.format);
        let mut hangup = signal(SignalKind::hangup())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let agent = Agent::start(config, Some(log)).await?;
        let (control, control_rx) = mpsc::channel(4);
        let running = tokio::spawn(agent.run(control_rx));
        loop {
            let message = tokio::select! {
                _ = hangup.recv() => { info!("SIGHUP: reloading"); Control::Reload }
                _ = terminate.recv() => { info!("SIGTERM: leaving"); Control::Stop }
                _ = interrupt.recv() => { info!("SIGINT: leaving"); Control::Stop }
            };
            let _ = control.send(message).await;
            if message == Control::Stop {
                break;
            }
        }
        running.await.context("agent task failed")?
    })
}

/// Validates the config file and the keyring it names.
pub(super) fn check_config(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let keyring = Keyring::load(&config.gossip.keyring)?;
    println!(
        "{}: ok (node {}, trust domain {}, {} service(s), gossip keyring with {} key(s))",
        config_path.display(),
        config.node.name,
        config.node.trust_domain,
        config.services.len(),
        keyring.keys().len()
    );
    Ok(())
}
