//! `berth node drain NODE [--live]` (cordon a node and send its instances away) and
//! `berth node uncordon NODE` (let it receive instances again).

use anyhow::Result;
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::Hub;

/// `berth node …`
#[derive(clap::Subcommand, Debug)]
pub enum NodeCommand {
    /// Mark a node unschedulable and move every instance away: with --live by live migration
    /// (no restart), else stopped there and started again on other nodes.
    Drain {
        /// Node id.
        node: String,
        /// Live-migrate each running instance instead of restarting it elsewhere.
        #[arg(long)]
        live: bool,
    },
    /// Let a drained node receive instances again (what moved away stays where it went).
    Uncordon {
        /// Node id.
        node: String,
    },
}

/// Runs one `berth node` command and returns what to print.
pub async fn run(hub: &Hub, command: &NodeCommand) -> Result<String> {
    match command {
        NodeCommand::Drain { node, live } => {
            let answer = hub
                .call(
                    Method::POST,
                    &["v1", "nodes", node, "drain"],
                    Some(&drain_body(*live)),
                )
                .await?;
            Ok(drain_report(&answer))
        }
        NodeCommand::Uncordon { node } => {
            let answer = hub
                .call(Method::POST, &["v1", "nodes", node, "uncordon"], None)
                .await?;
            let id = answer["node_id"].as_str().unwrap_or(node);
            Ok(format!("{id} uncordoned\n"))
        }
    }
}

/// The body of `POST /v1/nodes/{id}/drain`.
pub fn drain_body(live: bool) -> Value {
    json!({ "live": live })
}

/// What a drain did, a line per instance: migrations started, replicas restarted elsewhere, and
/// those left where they are with the hub's reason.
pub fn drain_report(answer: &Value) -> String {
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let list = |k: &str| answer[k].as_array().cloned().unwrap_or_default();
    let (migrations, replaced, skipped) = (list("migrations"), list("replaced"), list("skipped"));
    let mut out = format!(
        "{} cordoned (SchedulingDisabled): {} migrating, {} restarting elsewhere, {} skipped\n",
        s(answer, "node_id"),
        migrations.len(),
        replaced.len(),
        skipped.len()
    );
    for m in &migrations {
        out.push_str(&format!(
            "migrating {} ({}): {}\n",
            s(m, "instance_id"),
            s(m, "container_id"),
            s(m, "migration_id")
        ));
    }
    for r in &replaced {
        out.push_str(&format!(
            "restarting elsewhere {} ({})\n",
            s(r, "instance_id"),
            s(r, "container_id")
        ));
    }
    for k in &skipped {
        out.push_str(&format!(
            "skipped {}: {}\n",
            s(k, "instance_id"),
            s(k, "reason")
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied()))
    }

    fn node_command(args: &[&str]) -> NodeCommand {
        match parse(args).unwrap().command {
            Command::Node(c) => c,
            _ => panic!("{args:?} is not a node command"),
        }
    }

    #[test]
    fn drain_and_uncordon_parse() {
        assert!(matches!(
            node_command(&["node", "drain", "n1", "--live"]),
            NodeCommand::Drain { node, live: true } if node == "n1"
        ));
        assert!(matches!(
            node_command(&["node", "drain", "n1"]),
            NodeCommand::Drain { live: false, .. }
        ));
        assert!(matches!(
            node_command(&["node", "uncordon", "n2"]),
            NodeCommand::Uncordon { node } if node == "n2"
        ));
        assert!(parse(&["node", "drain"]).is_err(), "a node is required");
        assert!(parse(&["node", "uncordon", "n1", "--live"]).is_err());
        assert_eq!(drain_body(true), json!({"live": true}));
        assert_eq!(drain_body(false), json!({"live": false}));
    }

    #[test]
    fn a_live_drain_lists_each_migration_and_each_skip() {
        let answer = json!({
            "node_id": "n1", "unschedulable": true,
            "migrations": [
                {"instance_id": "ins-a", "container_id": "ctr-1", "migration_id": "mig-1"},
                {"instance_id": "ins-b", "container_id": "ctr-1", "migration_id": "mig-2"}
            ],
            "skipped": [{"instance_id": "ins-c",
                         "reason": "no node has 0.1 cpu and 4GiB free (1 node: 1 lacks memory)"}],
            "replaced": []
        });
        assert_eq!(
            drain_report(&answer),
            "n1 cordoned (SchedulingDisabled): 2 migrating, 0 restarting elsewhere, 1 skipped\n\
             migrating ins-a (ctr-1): mig-1\n\
             migrating ins-b (ctr-1): mig-2\n\
             skipped ins-c: no node has 0.1 cpu and 4GiB free (1 node: 1 lacks memory)\n"
        );
    }

    #[test]
    fn a_plain_drain_lists_the_replicas_restarted_elsewhere() {
        let answer = json!({
            "node_id": "n1", "unschedulable": true, "migrations": [], "skipped": [],
            "replaced": [{"instance_id": "ins-a", "container_id": "ctr-1"}]
        });
        assert_eq!(
            drain_report(&answer),
            "n1 cordoned (SchedulingDisabled): 0 migrating, 1 restarting elsewhere, 0 skipped\n\
             restarting elsewhere ins-a (ctr-1)\n"
        );
        // An older hub without `replaced` still reads.
        let bare = json!({"node_id": "n2", "unschedulable": true, "migrations": [], "skipped": []});
        assert_eq!(
            drain_report(&bare),
            "n2 cordoned (SchedulingDisabled): 0 migrating, 0 restarting elsewhere, 0 skipped\n"
        );
    }
}
