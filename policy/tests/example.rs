//! The example in `policies/` is valid and means what its comments say.
use std::path::Path;

use bulkhead_abi::*;
use bulkhead_policy::eval::{evaluate, Flow};
use bulkhead_policy::resolve::Resolved;
use bulkhead_policy::{load_dir, Inventory};

fn example() -> (bulkhead_policy::PolicySet, Inventory) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let set = load_dir(&root.join("policies")).unwrap_or_else(|e| {
        panic!("policies/ must be valid: {e:#?}");
    });
    let inv: Inventory = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("examples/hospital-inventory.yaml")).unwrap(),
    )
    .unwrap();
    (set, inv)
}

#[test]
fn the_hospital_example_is_valid_and_enforces_its_intent() {
    let (set, inv) = example();
    let res = Resolved::new(&set, &inv);
    let vm = |n: &str| inv.vms.iter().position(|v| v.name == n).unwrap();
    let ip = |s: &str| s.parse().unwrap();
    let judge = |local: &str, dir, peer: &str, proto, port| {
        evaluate(
            &res,
            &Flow {
                vm: vm(local),
                direction: dir,
                peer: ip(peer),
                proto,
                port,
            },
        )
    };
    // emr-app → emr-db:5432, both ends (the symmetric counterpart opens the client's egress).
    let d = judge("emr-db-01", DIR_INGRESS, "10.77.1.21", 6, 5432);
    assert_eq!(
        (d.action, d.rule.unwrap().id.as_str()),
        (ACTION_ALLOW, "emr-app-to-db")
    );
    let d = judge("emr-app-01", DIR_EGRESS, "10.77.2.22", 6, 5432);
    assert_eq!(d.action, ACTION_ALLOW);
    // PACS may not reach the EMR database: default deny.
    let d = judge("emr-db-01", DIR_INGRESS, "10.77.2.31", 6, 5432);
    assert_eq!((d.action, d.rule.is_none()), (ACTION_DENY, true));
    // Clinical systems reject the internet.
    let d = judge("his-app-01", DIR_EGRESS, "8.8.8.8", 6, 443);
    assert_eq!(d.action, ACTION_REJECT);
    // The monitor-mode trial records, drops nothing.
    let d = judge("emr-app-01", DIR_EGRESS, "10.77.3.42", 6, 445);
    assert_eq!(d.action, ACTION_MONITOR);
    // Infrastructure is always reachable.
    let d = judge("lis-db-01", DIR_EGRESS, "10.77.0.250", 17, 53);
    assert_eq!(d.action, ACTION_ALLOW);
    // The portal answers the internet over IPv6 too.
    let d = judge("portal-01", DIR_INGRESS, "2001:db8:1::5", 6, 443);
    assert_eq!(d.action, ACTION_ALLOW);

    let hosts = bulkhead_policy::compile(&set, &inv);
    assert_eq!(hosts.len(), 3);
    for t in hosts.values() {
        assert!(!t.policy.is_empty());
        assert_eq!(t.rules[0], "default");
    }
    // Deterministic.
    assert_eq!(hosts, bulkhead_policy::compile(&set, &inv));
}
