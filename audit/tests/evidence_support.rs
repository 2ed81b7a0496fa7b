//! What the controller's live evidence relies on: pausing the recorder for a consistent read
//! of a live store, and the role registry file.
mod common;

use std::time::Duration;

use bulkhead_audit::recorder::Recorder;
use bulkhead_audit::roles::{Role, RoleAssignments};
use bulkhead_audit::verify::verify;
use bulkhead_audit::Store;
use common::*;

#[test]
fn a_paused_recorder_leaves_the_store_still_and_complete() {
    let d = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(cfg(d.path())).unwrap();
    let rec = Recorder::spawn(store, 1024, 64);
    for i in 0..100 {
        rec.submit(admin(i)).unwrap();
    }
    let guard = rec.pause().unwrap();
    // Everything offered before the pause is durable and checkpointed.
    let r = verify(d.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    let before = r.records;
    assert!(before >= 100, "{before}");
    assert_eq!(r.last_checkpoint.map(|c| c.seq), r.last_seq);
    // While paused nothing is written; submits queue.
    rec.submit(admin(1000)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(verify(d.path(), None).unwrap().records, before);
    drop(guard);
    rec.record(admin(1001)).unwrap();
    let r = verify(d.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.records, before + 2);
    rec.shutdown().unwrap();
}

#[test]
fn role_registry_round_trip_and_one_role_per_account() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("roles.json");
    assert_eq!(
        RoleAssignments::load(&p).unwrap(),
        RoleAssignments::default()
    );
    let mut r = RoleAssignments::default();
    r.assign("alice", Role::SecurityAdmin).unwrap();
    r.assign("carol", Role::AuditAdmin).unwrap();
    assert!(r.assign("carol", Role::SystemAdmin).is_err());
    r.save(&p).unwrap();
    let back = RoleAssignments::load(&p).unwrap();
    assert_eq!(back, r);
    assert!(std::fs::read_to_string(&p)
        .unwrap()
        .contains("\"carol\": \"audit-admin\""));
    std::fs::write(&p, "not json").unwrap();
    assert!(RoleAssignments::load(&p).is_err());
}

/// A forwarder publishes its status next to the store; the report shows it (8.1.3.5 c).
#[test]
fn forwarding_status_reaches_the_report() {
    use bulkhead_audit::forward::{ForwardConfig, Forwarder, Payload, Transport};
    use bulkhead_audit::report::{build, Evidence, Status};
    use std::io::Read;

    let d = tempfile::tempdir().unwrap();
    populated(d.path(), 20);
    // A syslog receiver that reads everything (a real TCP peer).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 65536];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    let mut f = Forwarder::new(
        d.path(),
        ForwardConfig::new("siem", &addr, Transport::Tcp, Payload::Json),
    )
    .unwrap();
    let sent = f.pump().unwrap();
    f.settle().unwrap();
    assert!(sent >= 20);
    let ev = Evidence::from_store(d.path(), 184, 10).unwrap();
    let fwd = ev.forwarding.as_ref().expect("forwarding status");
    assert_eq!(fwd.len(), 1);
    assert_eq!(fwd[0].name, "siem");
    assert_eq!(fwd[0].confirmed, sent);
    assert!(fwd[0].updated_at.is_some());
    let r = build(&ev);
    let c = r.items.iter().find(|i| i.control == "8.1.3.5 c").unwrap();
    assert_eq!(c.status, Status::Met, "{c:?}");
    assert!(c.evidence.iter().any(|e| e.contains(&format!("→ {addr}"))));
}
