//! `berth stats CONTAINER` (one table) and `berth top [CONTAINER]` (the same numbers, refreshed, for one
//! container or all of them, like `docker stats`).

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;

use crate::client::{Container, Hub};
use crate::output;
use crate::spec::duration_flag;

/// Stats requests in flight at once in `berth top` (each may reach a node through the hub).
const CONCURRENT: usize = 8;

/// Flags of `berth top`.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Container id or name; default: every container.
    pub container: Option<String>,
    /// Print one frame and exit.
    #[arg(long)]
    pub once: bool,
    /// Time between frames.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration_flag)]
    pub interval: String,
}

/// `berth stats CONTAINER`.
pub async fn stats(hub: &Hub, container: &str) -> Result<String> {
    let id = hub.container_id(container).await?;
    Ok(output::stats_table(&hub.stats(&id).await?))
}

/// How a container is named in `berth top`.
fn label(c: &Container) -> String {
    if c.name.is_empty() {
        c.container_id.clone()
    } else {
        c.name.clone()
    }
}

/// One frame: the stats of `only`, or of every container. A container that vanished or whose stats
/// failed gets a note instead of failing the frame.
async fn frame(hub: &Hub, only: Option<&str>) -> Result<String> {
    let containers = match only {
        Some(id) => vec![hub.container_view(id).await?],
        None => hub.containers().await?,
    };
    let entries: Vec<(String, Result<_, String>)> = futures::stream::iter(containers)
        .map(|c| async move {
            let stats = hub
                .stats(&c.container_id)
                .await
                .map_err(|e| format!("{e:#}"));
            (label(&c), stats)
        })
        .buffered(CONCURRENT)
        .collect()
        .await;
    Ok(output::top_frame(&entries))
}

/// `berth top [CONTAINER] [--once]`: a frame every `--interval`; on a terminal the screen is cleared
/// between frames.
pub async fn top(hub: &Hub, args: &TopArgs) -> Result<()> {
    let only = match &args.container {
        Some(c) => Some(hub.container_id(c).await?),
        None => None,
    };
    if args.once {
        return crate::emit(&frame(hub, only.as_deref()).await?);
    }
    let interval = berth_proto::duration::parse(&args.interval)
        .context("invalid --interval")?
        .max(Duration::from_millis(100));
    let tty = std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let text = frame(hub, only.as_deref()).await?;
        let framed = if tty {
            format!("\x1b[H\x1b[2J{text}")
        } else {
            format!("{text}\n")
        };
        if !crate::events::write_out(&framed)? {
            // Our reader went away (`berth top | head`).
            return Ok(());
        }
    }
}
