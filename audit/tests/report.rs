mod common;

use bulkhead_audit::report::{build, html, Evidence, ScopeDefault, Status};
use bulkhead_audit::roles::{authorize, CertIdentity, Operation, Role, RoleAssignments};
use bulkhead_audit::Store;
use common::*;

#[test]
fn every_control_item_is_reported_and_gaps_are_plain() {
    let d = tempfile::tempdir().unwrap();
    let (mut s, _) = Store::open(cfg(d.path())).unwrap();
    s.append(admin(1)).unwrap();
    s.append(flow(1)).unwrap();
    let sys = CertIdentity {
        san_uris: vec!["bulkhead://role/system-admin/bob".into()],
        ..Default::default()
    };
    let refused = authorize(&sys, Operation::AuditConfigure, "10.0.0.6", "audit").unwrap_err();
    s.append(refused.record).unwrap();
    s.close().unwrap();

    // Only what the store can provide.
    let ev = Evidence::from_store(d.path(), 184, 10).unwrap();
    let r = build(&ev);
    let controls: Vec<&str> = r.items.iter().map(|i| i.control.as_str()).collect();
    for c in [
        "8.1.3.1 a",
        "8.1.3.2 a",
        "8.1.3.2 b",
        "8.1.3.2 c",
        "8.1.3.2 d",
        "8.1.3.2 e",
        "8.1.3.3 a–d",
        "8.1.3.5 a",
        "8.1.3.5 b",
        "8.1.3.5 c",
        "8.1.3.5 d",
        "8.1.4.3 d",
        "8.1.5.1–8.1.5.3, 8.1.4.2 d",
        "8.1.5.4",
        "cloud ABS2-01/02",
        "cloud ABS2-03..06",
        "cloud CES2-02/03",
        "cloud intrusion (L3)",
    ] {
        assert!(controls.contains(&c), "missing {c}");
    }
    let get = |c: &str| r.items.iter().find(|i| i.control == c).unwrap();
    assert_eq!(get("8.1.3.2 a").status, Status::NoEvidence);
    assert!(get("8.1.3.2 a").gaps[0].starts_with("No evidence supplied"));
    assert_eq!(get("8.1.4.3 d").status, Status::Met);
    assert_eq!(get("8.1.3.5 a").status, Status::Met);
    assert_eq!(get("8.1.3.5 b").status, Status::Met);
    // Integrity fine but no forwarding: partial.
    assert_eq!(get("8.1.3.5 c").status, Status::Partial);
    assert_eq!(get("8.1.3.2 e").status, Status::OutOfScope);
    // No move recorded yet: the migration item says so.
    assert_eq!(get("cloud CES2-02/03").status, Status::NoEvidence);

    // With controller evidence.
    let mut ev = ev;
    ev.default_deny = Some(vec![
        ScopeDefault {
            scope: "global".into(),
            action: "deny".into(),
            detail: None,
        },
        ScopeDefault {
            scope: "zone/lab".into(),
            action: "allow".into(),
            detail: None,
        },
    ]);
    let mut ra = RoleAssignments::default();
    ra.assign("alice", Role::SecurityAdmin).unwrap();
    ra.assign("bob", Role::SystemAdmin).unwrap();
    ra.assign("carol", Role::AuditAdmin).unwrap();
    ev.roles = Some(ra);
    let r = build(&ev);
    let get = |c: &str| r.items.iter().find(|i| i.control == c).unwrap().clone();
    assert_eq!(get("8.1.3.2 a").status, Status::NotMet);
    assert!(get("8.1.3.2 a").gaps.iter().any(|g| g.contains("zone/lab")));
    assert_eq!(get("8.1.5.1–8.1.5.3, 8.1.4.2 d").status, Status::Met);
    let h = html(&r);
    assert!(h.contains("NO EVIDENCE") && h.contains("NOT MET") && h.contains("8.1.4.3 d"));
    let j = serde_json::to_value(&r).unwrap();
    assert!(j["items"].as_array().unwrap().len() >= 18);

    // Tampering shows in the report.
    let seg = active_segment(d.path());
    let mut l = lines(&seg);
    l[2] = l[2].replace("alice1", "eve");
    write_lines(&seg, &l);
    let ev = Evidence::from_store(d.path(), 184, 10).unwrap();
    let r = build(&ev);
    let c = r.items.iter().find(|i| i.control == "8.1.3.5 c").unwrap();
    assert_eq!(c.status, Status::NotMet);
    assert!(c.gaps.iter().any(|g| g.contains("INTEGRITY")));
}

#[test]
fn a_recorded_vm_move_is_the_migration_evidence() {
    use bulkhead_audit::record::Event;
    let d = tempfile::tempdir().unwrap();
    let (mut s, _) = Store::open(cfg(d.path())).unwrap();
    s.append(Event::VmMoved {
        vm: "emr-db".into(),
        from: "hv2".into(),
        to: "hv1".into(),
        commit: "0123456789abcdef".into(),
    })
    .unwrap();
    s.close().unwrap();
    let ev = Evidence::from_store(d.path(), 184, 10).unwrap();
    let m = ev.migration.as_deref().expect("migration evidence");
    assert!(
        m.starts_with("1 VM move(s)") && m.contains("emr-db from hv2 to hv1"),
        "{m}"
    );
    let r = build(&ev);
    let item = r
        .items
        .iter()
        .find(|i| i.control == "cloud CES2-02/03")
        .unwrap();
    assert_eq!(item.status, Status::Met);
}
