//! The agent alone, as a real process: it enforces its persisted policy with no controller
//! reachable, and kill -9 leaves no gap and keeps an allowed long-lived connection.
//! Needs root and the built binaries; skips with a message otherwise.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bulkhead_abi::{DIR_EGRESS, DIR_INGRESS, PROTO_ANY};
use bulkhead_e2e::{free_port, wait_until, Host, TestPki};
use bulkhead_testbed::echo_roundtrip;
use bulkhead_wire::pb;
use prost::Message;

const T: Duration = Duration::from_millis(800);

#[test]
fn agent_enforces_persisted_policy_without_controller_and_survives_kill9() {
    if bulkhead_testbed::skip("agent_failstatic") {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(root.path()).expect("pki");
    let mut host = Host::new(root.path(), "hv1").expect("host");
    let client = host.add_vm("client", 11, &[("app", "emr")]).expect("vm");
    let db = host.add_vm("db", 12, &[("app", "db")]).expect("vm");
    let _srv = db.serve(5432).expect("serve");
    let _ssh = db.serve(22).expect("serve");

    // The agent's persisted state: what it last applied (written as the agent writes it).
    let rules = vec![
        bulkhead_testbed::rules::allow(0, DIR_EGRESS, None, PROTO_ANY, None),
        bulkhead_testbed::rules::allow(1, DIR_INGRESS, Some(0), 6, Some(5432)),
    ];
    let vms = host.lab.vms.clone();
    let mut tables = bulkhead_testbed::rules::tables(&vms, &rules);
    // The agent names endpoints `<vm>/<mac>` as the testbed does.
    for (e, vm) in tables.endpoints.iter_mut().zip(&vms) {
        e.id = bulkhead_testbed::rules::endpoint_id(vm);
    }
    let snap = pb::Snapshot {
        revision: Some(pb::Revision {
            commit: "persisted".into(),
            ..Default::default()
        }),
        digest: bulkhead_wire::digest(&tables),
        tables: Some(bulkhead_wire::tables_to_pb(&tables)),
    };
    std::fs::create_dir_all(&host.state_dir).expect("state dir");
    std::fs::write(host.state_dir.join("applied.pb"), snap.encode_to_vec()).expect("state");

    // No controller listens on this port.
    let nowhere = free_port().expect("port");
    let pki_dir = pki.host_dir("hv1", 30, 0).expect("host cert");
    host.start_agent(root.path(), nowhere, &pki_dir)
        .expect("agent");
    let to_db = SocketAddr::new(IpAddr::V4(db.ipv4), 5432);
    let to_ssh = SocketAddr::new(IpAddr::V4(db.ipv4), 22);
    // The metrics listener opens once the persisted policy is applied and attached.
    assert!(
        wait_until(Duration::from_secs(15), || host.metrics().is_ok()),
        "agent did not come up:\n{}",
        host.agent
            .as_ref()
            .map(|a| a.log_text())
            .unwrap_or_default()
    );
    assert!(client.tcp_works(to_db, T), "persisted policy allows 5432");
    assert!(!client.tcp_works(to_ssh, T), "persisted policy denies 22");

    // A long-lived connection, then kill -9 the agent.
    let mut conn = client.connect(to_db, T).expect("connect");
    assert!(echo_roundtrip(&mut conn, T));
    host.agent.as_mut().expect("agent").kill9();
    assert!(echo_roundtrip(&mut conn, T), "connection survives kill -9");
    assert!(
        !client.tcp_works(to_ssh, T),
        "still enforcing with no agent"
    );

    // Restart: the pinned links get the new program, the connection goes on.
    host.start_agent(root.path(), nowhere, &pki_dir)
        .expect("agent");
    assert!(wait_until(Duration::from_secs(15), || host
        .metrics()
        .is_ok_and(|m| m.contains("bulkhead_agent_applied_epoch"))));
    assert!(
        echo_roundtrip(&mut conn, T),
        "connection survives the restart"
    );
    assert!(!client.tcp_works(to_ssh, T));
    assert!(client.tcp_works(to_db, T));
    // The metrics parse with a Prometheus text-format parser and say what happened.
    let text = host.metrics().expect("metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("metrics parse");
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(value("bulkhead_agent_controller_connected"), Some(0.0));
    assert!(value("bulkhead_agent_applied_epoch").is_some_and(|e| e >= 2.0));
    assert_eq!(value("bulkhead_agent_interfaces_enforced"), Some(2.0));
    assert!(value("bulkhead_agent_conntrack_entries").is_some_and(|c| c >= 1.0));
    drop(client);
}
