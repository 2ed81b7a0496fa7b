//! End to end: the controller on a real git repository, one agent per namespace-VM host, real
//! gRPC over mutual TLS, real traffic. Needs root and the built binaries
//! (`cargo build -p bulkhead-agent -p bulkhead-controller`); skips with a message otherwise.
use std::time::Duration;

use bulkhead_e2e::{wait_until, Cluster};

fn cluster(test: &str) -> Option<Cluster> {
    if bulkhead_testbed::skip(test) {
        return None;
    }
    Some(Cluster::start().unwrap_or_else(|e| panic!("{test}: cluster did not start: {e:#}")))
}

#[test]
fn commits_are_enforced_everywhere_and_an_invalid_commit_changes_nothing() {
    let Some(c) = cluster("e2e-commits") else {
        return;
    };
    // Revision 1, across hosts: emr-app (hv1) → emr-db (hv2) on 5432 only.
    c.assert_reach("emr-app", "emr-db", 5432, "revision 1");
    assert!(!c.reach("pacs-1", "emr-db", 5432));
    assert!(!c.reach("emr-app", "emr-db", 22));
    c.assert_reach("jump-1", "emr-db", 22, "jump host SSH");
    assert!(!c.reach("his-app", "emr-app", 443));

    // Revision 2 revokes the jump host's SSH.
    let commit = c.commit_revoke_jump_ssh().expect("commit");
    let took = c
        .wait_enforced(&commit, Duration::from_secs(10))
        .expect("enforced");
    eprintln!("commit-to-enforced on all hosts: {took:?}");
    assert!(!c.reach("jump-1", "emr-db", 22), "revoked");
    c.assert_reach("emr-app", "emr-db", 5432, "the rest unchanged");

    // An invalid commit: rejected whole, reported, the previous revision still enforced.
    let bad = c
        .repo
        .commit_file(
            "policies/50-broken.yaml",
            "policies:\n  - name: broken\n    tier: application\n    priority: 999\n    applies_to: [{group: no-such-group}]\n",
            "Broken policy",
        )
        .expect("commit");
    assert!(
        wait_until(Duration::from_secs(10), || c.status().is_ok_and(|s| s
            .rejected
            .iter()
            .any(|r| r.revision.as_ref().is_some_and(|v| v.commit == bad)))),
        "rejected commit listed: {}",
        c.logs()
    );
    let s = c.status().expect("status");
    let rejected = s
        .rejected
        .iter()
        .find(|r| r.revision.as_ref().is_some_and(|v| v.commit == bad))
        .expect("rejected");
    assert!(
        rejected
            .errors
            .iter()
            .any(|e| e.contains("50-broken.yaml:5:") && e.contains("no-such-group")),
        "{:?}",
        rejected.errors
    );
    assert_eq!(
        s.serving.as_ref().map(|r| r.commit.as_str()),
        Some(commit.as_str())
    );
    assert!(s.hosts.iter().all(|h| h.enforced_commit == commit));
    c.assert_reach("emr-app", "emr-db", 5432, "allowed");
    assert!(!c.reach("jump-1", "emr-db", 22));
}

#[test]
fn agents_keep_enforcing_without_the_controller_and_resync_when_it_returns() {
    let Some(mut c) = cluster("e2e-controller-down") else {
        return;
    };
    let ctl = c.controller.take().expect("controller");
    let port = ctl.port;
    drop(ctl); // SIGKILL
    c.assert_reach("emr-app", "emr-db", 5432, "still allowed");
    assert!(!c.reach("pacs-1", "emr-db", 5432), "still denied");
    let commit = c.commit_revoke_jump_ssh().expect("commit");
    assert!(
        c.reach("jump-1", "emr-db", 22),
        "old policy while the controller is away"
    );
    // Back on the same address: the agents reconnect (backoff with jitter) and resync.
    let root = c.root.path().to_path_buf();
    let ctl = bulkhead_e2e::ControllerProc::start_on(&root, &c.repo.dir, &c.pki.dir, port)
        .expect("restart controller");
    c.controller = Some(ctl);
    c.wait_enforced(&commit, Duration::from_secs(40))
        .expect("resync");
    assert!(!c.reach("jump-1", "emr-db", 22));
}

#[test]
fn agent_kill9_leaves_no_gap_and_keeps_long_lived_connections() {
    let Some(mut c) = cluster("e2e-agent-kill") else {
        return;
    };
    let db = c.vm("emr-db");
    let to = std::net::SocketAddr::new(std::net::IpAddr::V4(db.ipv4), 5432);
    let mut conn = c
        .vm("emr-app")
        .connect(to, Duration::from_secs(1))
        .expect("connect");
    let t = Duration::from_millis(700);
    assert!(bulkhead_testbed::echo_roundtrip(&mut conn, t));
    c.hosts[1].agent.as_mut().expect("agent").kill9();
    assert!(
        bulkhead_testbed::echo_roundtrip(&mut conn, t),
        "survives kill -9"
    );
    assert!(!c.reach("pacs-1", "emr-db", 5432), "no gap: still denied");
    c.start_agent(1).expect("restart agent");
    let head = c.repo.head().expect("head");
    c.wait_enforced(&head, Duration::from_secs(20))
        .expect("back in sync");
    assert!(
        bulkhead_testbed::echo_roundtrip(&mut conn, t),
        "survives the restart"
    );
    assert!(!c.reach("pacs-1", "emr-db", 5432));
}

#[test]
fn a_vm_moved_to_another_host_keeps_its_verdicts() {
    let Some(mut c) = cluster("e2e-migration") else {
        return;
    };
    c.assert_reach("emr-app", "emr-db", 5432, "allowed");
    // emr-db leaves hv2 and starts on hv1 with the same address and labels.
    c.hosts[1]
        .remove_vm_from_inventory("emr-db")
        .expect("inventory");
    c.hosts[1].lab.remove_vm("emr-db").expect("remove");
    let vm = c.hosts[0]
        .add_vm(
            "emr-db",
            22,
            &[("app", "emr"), ("role", "db"), ("env", "prod")],
        )
        .expect("add");
    for port in bulkhead_e2e::SERVED_PORTS {
        c.servers.push(vm.serve(port).expect("serve"));
    }
    assert!(
        wait_until(Duration::from_secs(15), || c.status().is_ok_and(|s| s
            .hosts
            .iter()
            .any(|h| h.host == "hv1"
                && h.vms.iter().any(|v| v == "emr-db")
                && h.enforced_digest == h.desired_digest))),
        "hv1 reports and enforces emr-db: {}",
        c.logs()
    );
    assert!(
        wait_until(Duration::from_secs(10), || c
            .reach("emr-app", "emr-db", 5432)),
        "allowed after the move"
    );
    assert!(!c.reach("pacs-1", "emr-db", 5432), "denied after the move");
    assert!(!c.reach("emr-app", "emr-db", 22), "denied after the move");
    // The move is on the audit trail (MLPS cloud extension: policy migrates with the VM).
    let moved = |r: &bulkhead_audit::Record| {
        matches!(&r.detail, bulkhead_audit::record::Event::VmMoved { vm, from, to, .. }
            if vm == "emr-db" && from == "hv2" && to == "hv1")
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            bulkhead_e2e::audit_records(c.root.path()).is_ok_and(|rs| rs.iter().any(moved))
        }),
        "vm_moved recorded: {}",
        c.logs()
    );
}
