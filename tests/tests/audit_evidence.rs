//! End to end, MLPS evidence: the compliance report built from the live controller (real git
//! repository, real agents on namespace-VM hosts, gRPC over mutual TLS), the role check on
//! the evidence API and its audit records, and a scan alert from a real burst of denied
//! flows. Needs root and the built binaries (`cargo build -p bulkhead-agent
//! -p bulkhead-controller -p bulkhead-cli`); skips with a message otherwise.
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use bulkhead_audit::record::Event;
use bulkhead_audit::report::{build, Status};
use bulkhead_e2e::{audit_records, bin_path, evidence_blocking, wait_until, Cluster};

fn item_status(r: &bulkhead_audit::report::Report, control: &str) -> Status {
    r.items
        .iter()
        .find(|i| i.control == control)
        .unwrap_or_else(|| panic!("no item {control}"))
        .status
}

#[test]
fn compliance_evidence_from_the_live_controller_roles_and_a_scan_alert() {
    if bulkhead_testbed::skip("e2e-audit-evidence") {
        return;
    }
    let mut c = Cluster::start().unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let port = c.controller.as_ref().expect("controller").port;
    let auditor = c.pki.admin("carol", "audit-admin").expect("auditor");
    c.pki.admin("bob", "system-admin").expect("sysadmin");
    // One account cannot combine roles: the registry refuses a second one.
    assert!(c.pki.admin("carol", "security-admin").is_err());

    let commit = c.commit_revoke_jump_ssh().expect("commit");
    c.wait_enforced(&commit, Duration::from_secs(15))
        .expect("enforced");
    // Traffic: an allowed flow (a policy rule's counter) and a denied one.
    assert!(c.reach("emr-app", "emr-db", 5432), "{}", c.logs());
    assert!(!c.reach("pacs-1", "emr-db", 5432));

    // The evidence follows the agents' reports (after every apply, then every 10 s).
    let mut last = None;
    let ok = wait_until(Duration::from_secs(30), || {
        let Ok(ev) = evidence_blocking(port, &c.pki.ca, &auditor, false) else {
            return false;
        };
        let done = ev.enforcement.as_ref().is_some_and(|e| {
            e.len() == 5 && e.iter().all(|i| i.enforced && i.interface.contains('/'))
        }) && ev.rule_analysis.as_ref().is_some_and(|r| {
            r.rules
                .iter()
                .any(|s| s.id == "app-emr-db-from-app" && s.packets > 0)
        }) && ev
            .policy_distribution
            .as_ref()
            .is_some_and(|p| p.len() == 2 && p.iter().all(|h| h.in_sync && h.commit == commit));
        last = Some(ev);
        done
    });
    let ev = last.expect("evidence");
    assert!(ok, "evidence never complete: {ev:#?}\n{}", c.logs());

    // Default deny: the global scope from the served revision, in force on both hosts.
    let dd = ev.default_deny.as_ref().expect("default deny");
    assert_eq!(dd[0].scope, "global");
    assert_eq!(dd[0].action, "deny");
    let detail = dd[0].detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains(&commit[..12]) && detail.contains("in force on hv1, hv2"),
        "{detail}"
    );
    assert!(
        dd.iter()
            .any(|s| s.scope.starts_with("host hv1") && s.action == "deny"),
        "{dd:?}"
    );
    // Rule analysis: counters with a last-hit time; the revoked rule is gone; rules of
    // policies with no running VM can never match; rules with no hit are listed.
    let ra = ev.rule_analysis.as_ref().expect("rules");
    let hit = ra
        .rules
        .iter()
        .find(|s| s.id == "app-emr-db-from-app")
        .expect("rule");
    assert!(hit.last_hit.is_some() && hit.bytes > 0, "{hit:?}");
    assert!(!ra.rules.iter().any(|s| s.id == "sec-ssh-from-jump"));
    assert!(!ra.never_matching.is_empty(), "{ra:?}");
    assert!(!ra.never_hit.is_empty(), "{ra:?}");
    assert!(!ra.never_hit.contains(&"app-emr-db-from-app".to_string()));
    // Roles from the registry, clocks of the controller and both hosts, retention setting.
    let roles = ev.roles.as_ref().expect("roles");
    assert!(roles.separated(), "{roles:?}");
    let clocks = ev.time_sync.as_ref().expect("time sync");
    assert_eq!(clocks.len(), 3, "{clocks:?}");
    assert_eq!(ev.retention.as_ref().map(|r| r.retention_days), Some(184));

    let st = ev.stateful.as_deref().expect("session state");
    assert!(st.contains("hv1: ") && st.contains("hv2: "), "{st}");
    let r = build(&ev);
    assert_eq!(item_status(&r, "8.1.3.2 c"), Status::Met, "rule export");
    assert_eq!(item_status(&r, "8.1.3.2 d"), Status::Met, "session state");
    assert_eq!(item_status(&r, "8.1.3.1 a"), Status::Met);
    assert_eq!(item_status(&r, "8.1.3.2 a"), Status::Met);
    assert_eq!(
        item_status(&r, "8.1.5.1–8.1.5.3, 8.1.4.2 d"),
        Status::Met,
        "{r:#?}"
    );

    // Only the audit administrator may read the evidence; the refusal is audited.
    let e = evidence_blocking(port, &c.pki.ca, &c.admin, false).expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let records = audit_records(c.root.path()).expect("records");
    let refused = records.iter().any(|r| {
        matches!(&r.detail, Event::AdminAction { user, operation, success: false, .. }
            if user == "alice" && operation == "compliance_report")
    });
    let granted = records.iter().any(|r| {
        matches!(&r.detail, Event::AdminAction { user, operation, success: true, .. }
            if user == "carol" && operation == "compliance_report")
    });
    assert!(refused && granted, "refused {refused}, granted {granted}");
    // The controller records its clock state on a schedule (at start, then on change).
    assert!(records
        .iter()
        .any(|r| matches!(r.detail, Event::TimeSync { .. })));

    // A burst of denied flows from one VM to many ports: a scan alert with source, attack
    // type, target and time, recorded by the controller.
    let pacs = c.vm("pacs-1");
    let db = c.vm("emr-db").ipv4;
    pacs.enter(move || {
        for p in 2000..2030u16 {
            let _ = std::net::TcpStream::connect_timeout(
                &SocketAddr::new(IpAddr::V4(db), p),
                Duration::from_millis(30),
            );
        }
    })
    .expect("scan");
    let mut alert = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            alert = audit_records(c.root.path()).ok().and_then(|rs| {
                rs.into_iter().find_map(|r| match r.detail {
                    Event::Alert(a) if a.attack == "scan" => Some(a),
                    _ => None,
                })
            });
            alert.is_some()
        }),
        "no scan alert recorded: {}",
        c.logs()
    );
    let a = alert.expect("alert");
    assert_eq!(a.source_ip, pacs.ipv4.to_string());
    assert!(a.target.contains(&db.to_string()), "{a:?}");
    assert!(a.host == "hv1" || a.host == "hv2", "{a:?}");
    assert!(a.count >= 20 && !a.first_seen.is_empty(), "{a:?}");

    // The admin CLI builds the report from the live controller (store verified there).
    let dir = c.root.path().join("carol");
    bulkhead_wire::pki::write_pair(&dir, "carol", &auditor).expect("write cert");
    std::fs::write(dir.join("ca.crt"), &c.pki.ca.cert).expect("ca");

    // Audit settings are the audit administrator's alone: a security admin's attempt is
    // refused and audited; below the legal floor is refused; a change is audited with before
    // and after.
    let alice_dir = c.root.path().join("alice");
    bulkhead_wire::pki::write_pair(&alice_dir, "alice", &c.admin).expect("write cert");
    std::fs::write(alice_dir.join("ca.crt"), &c.pki.ca.cert).expect("ca");
    let retention = |user: &str, pki: &std::path::Path, days: Option<&str>| {
        let mut cmd = Command::new(bin_path("bulkhead").expect("bulkhead CLI built"));
        cmd.args(["compliance", "retention", "--controller"])
            .arg(format!("https://127.0.0.1:{port}"))
            .arg("--pki")
            .arg(pki)
            .args(["--user", user]);
        if let Some(d) = days {
            cmd.args(["--days", d]);
        }
        cmd.output().expect("run bulkhead")
    };
    let o = retention("alice", &alice_dir, Some("30"));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("PermissionDenied")
            || String::from_utf8_lossy(&o.stderr).contains("permission"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = retention("carol", &dir, Some("30"));
    assert!(!o.status.success(), "below 184 days refused");
    let o = retention("carol", &dir, Some("365"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = retention("carol", &dir, None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "audit retention: 365 days"
    );
    let records = audit_records(c.root.path()).expect("records");
    let configure = |who: &str, ok: bool| {
        records.iter().any(|r| {
            matches!(&r.detail, Event::AdminAction { user, operation, success, .. }
                if user == who && operation == "audit_configure" && *success == ok)
        })
    };
    assert!(configure("alice", false) && configure("carol", false) && configure("carol", true));
    assert!(records.iter().any(|r| matches!(&r.detail,
        Event::AuditService { action, detail } if action == "retention_changed" && detail.contains("184 -> 365"))));
    let out = c.root.path().join("report.json");
    let o = Command::new(bin_path("bulkhead").expect("bulkhead CLI built"))
        .args(["compliance", "report", "--controller"])
        .arg(format!("https://127.0.0.1:{port}"))
        .arg("--pki")
        .arg(&dir)
        .args(["--user", "carol", "--format", "json", "--out"])
        .arg(&out)
        .output()
        .expect("run bulkhead");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // For the documentation: keep the report, the CLI's output and a copy of the store.
    if let Some(keep) = std::env::var_os("BULKHEAD_E2E_ARTIFACTS") {
        let keep = std::path::PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(&out, keep.join("report.json"));
        let _ = std::fs::write(keep.join("cli-stdout.txt"), &o.stdout);
        let _ = Command::new("cp")
            .arg("-a")
            .arg(bulkhead_e2e::audit_dir(c.root.path()))
            .arg(keep.join("audit"))
            .status();
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out).expect("report")).expect("json");
    let status = |control: &str| {
        report["items"]
            .as_array()
            .and_then(|i| i.iter().find(|x| x["control"] == control))
            .map(|x| x["status"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(status("8.1.3.1 a"), "met");
    assert_eq!(status("8.1.3.2 a"), "met");
    assert_eq!(
        status("8.1.4.3 d"),
        "met",
        "a refused audit configuration is on record"
    );
    assert_eq!(report["evidence"]["retention"]["retention_days"], 365);
    assert_eq!(report["evidence"]["integrity"]["ok"], true, "{report:#}");
    assert!(
        report["evidence"]["recent_alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["attack"] == "scan")),
        "alerts in the report"
    );

    // A VM whose tap is missing on its host: reported not enforced, with the reason, and
    // audited as an unenforced interface.
    c.hosts[0]
        .add_phantom_vm(
            "ghost-1",
            "bhghost0",
            "52:54:00:ee:00:01",
            "10.77.0.99",
            &[("role", "app"), ("env", "prod")],
        )
        .expect("phantom");
    let mut last = None;
    let ok = wait_until(Duration::from_secs(30), || {
        let Ok(ev) = evidence_blocking(port, &c.pki.ca, &auditor, false) else {
            return false;
        };
        let found = ev.enforcement.as_ref().is_some_and(|e| {
            e.iter().any(|i| {
                i.vm == "ghost-1"
                    && !i.enforced
                    && i.reason
                        .as_deref()
                        .is_some_and(|r| r.contains("no interface bhghost0 on this host"))
            })
        });
        last = Some(ev);
        found
    });
    assert!(ok, "{:#?}\n{}", last.map(|e| e.enforcement), c.logs());
    let r = build(&last.expect("evidence"));
    assert_eq!(item_status(&r, "8.1.3.1 a"), Status::NotMet);
    assert!(
        wait_until(Duration::from_secs(10), || audit_records(c.root.path())
            .is_ok_and(|rs| {
                rs.iter().any(|r| {
                    matches!(&r.detail,
                Event::InterfaceUnenforced { vm, host, .. } if vm == "ghost-1" && host == "hv1")
                })
            })),
        "interface_unenforced recorded"
    );
}
