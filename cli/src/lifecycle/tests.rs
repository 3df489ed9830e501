#![allow(clippy::unwrap_used)] // a failing test should point at the line

use super::*;
use crate::client::{Instance, LastRollout, Rollout};

fn container(revision: u64, instances: &[(u64, &str)]) -> Container {
    Container {
        container_id: "ctr-1".into(),
        replicas: 2,
        revision,
        instances: instances
            .iter()
            .map(|(rev, status)| Instance {
                revision: *rev,
                status: (*status).into(),
                ..Instance::default()
            })
            .collect(),
        ..Container::default()
    }
}

#[test]
fn outcomes_of_a_rollout() {
    // Not started yet (nothing seen, no record of revision 4).
    let c = container(3, &[(3, "RUNNING"), (3, "RUNNING")]);
    assert!(
        matches!(rollout_outcome(&c, 4, false, false), Outcome::InProgress(t) if t.contains("to start"))
    );

    let mut c = container(4, &[(4, "RUNNING"), (3, "RUNNING")]);
    c.rollout = Some(Rollout {
        state: "UPDATING".into(),
        revision: 4,
        from_revision: 3,
        ..Rollout::default()
    });
    assert_eq!(
        rollout_outcome(&c, 4, true, false),
        Outcome::InProgress("UPDATING to revision 4: 1/2 replicas ready".into())
    );

    c.rollout = None;
    c.last_rollout = Some(LastRollout {
        revision: 4,
        result: "COMPLETE".into(),
        ..LastRollout::default()
    });
    assert_eq!(rollout_outcome(&c, 4, false, false), Outcome::Complete);

    c.last_rollout = Some(LastRollout {
        revision: 4,
        result: "ROLLED_BACK".into(),
        reason: "ins-1 crashed 3 times".into(),
        ..LastRollout::default()
    });
    assert_eq!(
        rollout_outcome(&c, 4, true, false),
        Outcome::RolledBack("ins-1 crashed 3 times".into())
    );

    // The record names the revision the rollback returned to.
    let mut c = container(3, &[(3, "RUNNING"), (3, "RUNNING")]);
    c.last_rollout = Some(LastRollout {
        revision: 3,
        result: "COMPLETE".into(),
        ..LastRollout::default()
    });
    assert_eq!(
        rollout_outcome(&c, 4, true, false),
        Outcome::RolledBack("the container is at revision 3".into())
    );
    // ... but unseen, it is an older rollout: keep waiting.
    assert!(matches!(
        rollout_outcome(&c, 4, false, false),
        Outcome::InProgress(_)
    ));
    c.last_rollout = None;
    assert_eq!(
        rollout_outcome(&c, 4, true, false),
        Outcome::RolledBack("the container is at revision 3".into())
    );
    c.revision = 4;
    assert_eq!(rollout_outcome(&c, 4, true, false), Outcome::Complete);

    // A rollback to 3 that the hub records as ROLLED_BACK still reached its goal.
    let mut c = container(3, &[(3, "RUNNING"), (3, "RUNNING")]);
    c.last_rollout = Some(LastRollout {
        revision: 3,
        result: "ROLLED_BACK".into(),
        ..LastRollout::default()
    });
    assert_eq!(rollout_outcome(&c, 3, true, true), Outcome::Complete);
    assert!(matches!(
        rollout_outcome(&c, 3, true, false),
        Outcome::RolledBack(_)
    ));
}

#[test]
fn outcome_lines() {
    assert_eq!(outcome_line(4, &Outcome::Complete), "COMPLETE revision 4\n");
    assert_eq!(
        outcome_line(4, &Outcome::RolledBack("probe failed".into())),
        "ROLLED_BACK revision 4: probe failed\n"
    );
}

#[test]
fn bodies() {
    assert_eq!(action_body(None), json!({}));
    assert_eq!(
        action_body(Some("ins-1")),
        json!({ "instance_id": "ins-1" })
    );
    assert_eq!(rollback_body(None), json!({}));
    assert_eq!(rollback_body(Some(2)), json!({ "revision": 2 }));
}
