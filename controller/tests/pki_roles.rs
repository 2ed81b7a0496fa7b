//! `bulkhead-controller pki admin` keeps the role registry the compliance report exports, and
//! refuses a second role for an account (MLPS 8.1.5: no account combines roles).
use std::process::Command;

fn pki(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bulkhead-controller"))
        .arg("pki")
        .args(args)
        .output()
        .expect("run bulkhead-controller")
}

#[test]
fn admin_certificates_register_one_role_per_account() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("pki");
    let d = dir.to_str().expect("utf-8");
    let out = t.path().join("out");
    let o = out.to_str().expect("utf-8");
    assert!(pki(&["init", "--pki", d]).status.success());
    for (user, role) in [("alice", "security-admin"), ("carol", "audit-admin")] {
        let r = pki(&["admin", user, "--role", role, "--pki", d, "--out", o]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    // The same role again (a renewed certificate) is fine; another role is refused.
    assert!(pki(&[
        "admin",
        "carol",
        "--role",
        "audit-admin",
        "--pki",
        d,
        "--out",
        o
    ])
    .status
    .success());
    let r = pki(&[
        "admin",
        "carol",
        "--role",
        "security-admin",
        "--pki",
        d,
        "--out",
        o,
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("one account cannot combine roles"), "{err}");
    let roles =
        bulkhead_audit::roles::RoleAssignments::load(&dir.join("roles.json")).expect("registry");
    assert_eq!(roles.accounts.len(), 2);
    assert_eq!(
        roles.accounts.get("carol"),
        Some(&bulkhead_audit::roles::Role::AuditAdmin)
    );
}
