//! The controller's compliance evidence, from a real git repository holding the example
//! policies, the real compiler and linter, and a real audit store.
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_audit::record::Event;
use bulkhead_controller::audit::Audit;
use bulkhead_controller::repo::Repo;
use bulkhead_controller::Controller;
use bulkhead_wire::pb;

fn git(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Security Admin")
        .env("GIT_AUTHOR_EMAIL", "secadmin@hospital.example")
        .env("GIT_COMMITTER_NAME", "Security Admin")
        .env("GIT_COMMITTER_EMAIL", "secadmin@hospital.example")
        .status()
        .expect("git")
        .success();
    assert!(ok, "git {args:?}");
}

fn vm(name: &str, labels: &[(&str, &str)], mac: [u8; 6], ip: &str, device: &str) -> pb::Vm {
    pb::Vm {
        name: name.into(),
        uuid: format!("uuid-{name}"),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        interfaces: vec![pb::Interface {
            device: device.into(),
            mac: mac.to_vec(),
            addresses: vec![ip.into()],
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_from_the_served_revision_agent_reports_and_the_store() {
    let tmp = tempfile::tempdir().expect("tmp");
    let work = tmp.path().join("repo");
    let policies = work.join("policies");
    std::fs::create_dir_all(&policies).expect("mkdir");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    for e in std::fs::read_dir(&example).expect("example policies") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, policies.join(p.file_name().expect("name"))).expect("copy");
    }
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "Hospital policies"]);
    let audit_dir = tmp.path().join("audit");
    let audit = Audit::open(&audit_dir, "ctl-test").expect("audit");
    let ctl = Controller::new(
        Repo::new(&work, "main"),
        Arc::new(bulkhead_controller::compile::compile_tree),
        Some(audit),
    )
    .expect("controller");

    // Two VMs of the example on one host; the agent reports them.
    let web = vm(
        "his-web-1",
        &[
            ("app", "his"),
            ("role", "web"),
            ("env", "prod"),
            ("zone", "app"),
        ],
        [0x52, 0x54, 0, 0x10, 0, 1],
        "10.10.1.11",
        "vnet0",
    );
    let app = vm(
        "his-app-1",
        &[
            ("app", "his"),
            ("role", "app"),
            ("env", "prod"),
            ("zone", "app"),
        ],
        [0x52, 0x54, 0, 0x10, 0, 3],
        "10.10.2.11",
        "vnet1",
    );
    // A VM no policy applies to (no labels any policy selects).
    let stray = vm(
        "stray-1",
        &[("owner", "unknown")],
        [0x52, 0x54, 0, 0x99, 0, 1],
        "10.10.9.99",
        "vnet2",
    );
    ctl.set_inventory("kvm-01", vec![web, app, stray]);
    tokio::spawn(ctl.clone().follow_coverage());
    tokio::spawn(ctl.clone().follow_repo(Duration::from_millis(50)));
    tokio::spawn(ctl.clone().follow_inventory());
    let head = {
        let mut head = String::new();
        for _ in 0..200 {
            if let Some(s) = ctl.status().serving {
                head = s.commit;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        head
    };
    assert!(!head.is_empty(), "a revision is served");

    // The agent's report: one interface enforced, one whose attach failed; rule counters.
    let report = pb::HostReport {
        rules: vec![
            pb::RuleHits {
                rule: "app-his-app-from-web".into(),
                packets: 12,
                bytes: 3400,
                last_hit_unix_nanos: 1_790_000_000_000_000_000,
            },
            pb::RuleHits {
                rule: "default".into(),
                packets: 5,
                bytes: 300,
                last_hit_unix_nanos: 1_790_000_000_000_000_000,
            },
        ],
        interfaces: vec![
            pb::InterfaceState {
                vm: "his-web-1".into(),
                device: "vnet0".into(),
                endpoint: "his-web-1/52:54:00:10:00:01".into(),
                attached: true,
                error: String::new(),
            },
            pb::InterfaceState {
                vm: "his-app-1".into(),
                device: "vnet1".into(),
                endpoint: String::new(),
                attached: false,
                error: "attaching to interface 9: no such device".into(),
            },
        ],
        bootstrap_posture: "deny".into(),
        conntrack_entries: 17,
        conntrack_capacity: 262_144,
        clock: Some(pb::ClockState {
            synced: true,
            offset_us: 12,
            max_error_us: 800,
            source: "adjtimex".into(),
            problem: String::new(),
        }),
    };
    ctl.host_report("kvm-01", report.clone());
    // The same state again is not audited twice.
    ctl.host_report("kvm-01", report);

    // The uncovered VM is recorded once the revision is served.
    let mut uncovered = Vec::new();
    for _ in 0..100 {
        uncovered.clear();
        bulkhead_audit::export::for_each_record(&audit_dir, 0, |r, _| {
            if let Event::VmUncovered { vm, host, .. } = &r.detail {
                uncovered.push((vm.clone(), host.clone()));
            }
            Ok(true)
        })
        .expect("read");
        if !uncovered.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        uncovered,
        vec![("stray-1".to_string(), "kvm-01".to_string())]
    );

    // A flow record from the agent (after the served revision named things): times in the records' own format (UTC, +00:00, µs).
    ctl.audit.as_ref().expect("audit").flows(
        "kvm-01",
        &pb::FlowEvents {
            records: vec![pb::FlowRecord {
                first_seen_unix_nanos: 1_790_000_000_123_456_789,
                last_seen_unix_nanos: 1_790_000_001_000_000_000,
                vm: "his-web-1".into(),
                kind: u32::from(bulkhead_abi::EVENT_DENY),
                src: vec![10, 10, 1, 11],
                dst: vec![10, 10, 2, 11],
                dport: 22,
                proto: 6,
                rule: "base-deny-out".into(),
                packets: 3,
                bytes: 180,
                ..Default::default()
            }],
            ..Default::default()
        },
    );

    let me = ctl.clone();
    let ev = tokio::task::spawn_blocking(move || me.evidence(true))
        .await
        .expect("join")
        .expect("evidence");

    let dd = ev.default_deny.as_ref().expect("default deny");
    assert_eq!(
        (dd[0].scope.as_str(), dd[0].action.as_str()),
        ("global", "deny")
    );
    let detail = dd[0].detail.as_deref().unwrap_or_default();
    assert!(detail.contains(&head[..12]), "{detail}");
    // No agent acknowledged the tables: not claimed as in force.
    assert!(detail.contains("in force on no host yet"), "{detail}");
    assert!(dd.iter().any(|s| s.scope.starts_with("host kvm-01")));

    let en = ev.enforcement.as_ref().expect("enforcement");
    assert_eq!(en.len(), 2);
    let bad = en.iter().find(|i| i.vm == "his-app-1").expect("his-app-1");
    assert!(!bad.enforced);
    assert!(bad
        .reason
        .as_deref()
        .unwrap_or_default()
        .contains("no such device"));
    assert!(en.iter().any(|i| i.vm == "his-web-1" && i.enforced));

    let ra = ev.rule_analysis.as_ref().expect("rules");
    assert_eq!(ra.rules[0].id, "default");
    assert_eq!(ra.rules[0].packets, 5);
    let r = ra
        .rules
        .iter()
        .find(|r| r.id == "app-his-app-from-web")
        .expect("rule");
    assert_eq!((r.packets, r.bytes), (12, 3400));
    assert!(r.name.contains("tier application"), "{}", r.name);
    assert_eq!(
        r.last_hit.as_deref(),
        Some("2026-09-21T14:13:20.000000+00:00")
    );
    // Rules whose policy applies to none of the two VMs can never match; the rest of the
    // policy rules that saw no packet are never hit.
    assert!(
        ra.never_matching.iter().any(|r| r.starts_with("app-emr")),
        "{ra:?}"
    );
    assert!(!ra.never_hit.contains(&"app-his-app-from-web".to_string()));
    assert!(ra.never_hit.iter().all(|r| !ra.never_matching.contains(r)));

    let pd = ev.policy_distribution.as_ref().expect("distribution");
    assert_eq!(pd.len(), 1);
    assert!(!pd[0].in_sync, "nothing acknowledged yet");
    assert_eq!(ev.time_sync.as_ref().map(Vec::len), Some(2));
    assert!(ev.roles.is_none(), "no role registry configured");
    // Rule table, session state and zones (8.1.3.2 c, d; cloud ABS2-01/02).
    let export = ev.rule_export.as_deref().expect("rule export");
    assert!(
        export.contains(&head) && export.contains("bulkhead policy rules"),
        "{export}"
    );
    let st = ev.stateful.as_deref().expect("session state");
    assert!(st.contains("kvm-01: 17 of 262144 session entries"), "{st}");
    let zones = ev.zones.as_ref().expect("zones");
    assert!(zones.iter().any(|z| z.starts_with("group ")), "{zones:?}");
    let r = bulkhead_audit::report::build(&ev);
    for id in ["8.1.3.2 c", "8.1.3.2 d", "cloud ABS2-01/02"] {
        let item = r.items.iter().find(|i| i.control == id).expect("item");
        assert_eq!(
            item.status,
            bulkhead_audit::report::Status::Met,
            "{id}: {item:?}"
        );
    }

    // The store part: verified live, and the unenforced interface was audited once.
    let integrity = ev.integrity.as_ref().expect("integrity");
    assert!(integrity.ok, "{:?}", integrity.problems);
    let cov = ev.coverage.as_ref().expect("coverage");
    assert_eq!(cov.unenforced_interface_records, 1);
    assert_eq!(cov.flow_records, 1);
    assert_eq!(cov.uncovered_vm_records, 1);
    let mut flow = None;
    bulkhead_audit::export::for_each_record(&audit_dir, 0, |r, _| {
        if let Event::FlowVerdict(f) = &r.detail {
            flow = Some(f.clone());
        }
        Ok(true)
    })
    .expect("read");
    let flow = flow.expect("flow record");
    assert_eq!(flow.first_seen, "2026-09-21T14:13:20.123456+00:00");
    assert_eq!(flow.last_seen, "2026-09-21T14:13:21.000000+00:00");
    assert_eq!((flow.host.as_str(), flow.packets), ("kvm-01", 3));
    // Completed by the controller from the served revision and the live inventory.
    assert_eq!(flow.src_vm.as_deref(), Some("his-web-1"));
    assert_eq!(flow.dst_vm.as_deref(), Some("his-app-1"));
    assert_eq!(flow.tier.as_deref(), Some("baseline"));
    assert_eq!(flow.policy.as_deref(), Some("baseline"));
    assert_eq!(ev.retention.as_ref().map(|r| r.retention_days), Some(184));

    let report = bulkhead_audit::report::build(&ev);
    let get = |c: &str| {
        report
            .items
            .iter()
            .find(|i| i.control == c)
            .map(|i| i.status)
            .expect("item")
    };
    use bulkhead_audit::report::Status;
    assert_eq!(get("8.1.3.1 a"), Status::NotMet);
    assert_eq!(get("8.1.3.2 a"), Status::Met);
    assert_eq!(get("8.1.3.2 b"), Status::Partial);

    // Housekeeping: the retention job runs and the clock state is recorded.
    tokio::spawn(
        ctl.clone()
            .audit_housekeeping(Duration::from_secs(3600), Duration::from_secs(600)),
    );
    let mut seen = false;
    for _ in 0..100 {
        let mut found = false;
        bulkhead_audit::export::for_each_record(&audit_dir, 0, |r, _| {
            found |= matches!(r.detail, Event::TimeSync { .. });
            Ok(!found)
        })
        .expect("read");
        if found {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "time_sync record written");
    let purged = ctl
        .audit
        .as_ref()
        .expect("audit")
        .enforce_retention()
        .expect("retention");
    assert!(purged.is_empty(), "nothing is older than 184 days");

    // A commit that changes one rule's services and only the description of another: the
    // revision record names the changed rule (descriptions are not meaning).
    let file = policies.join("40-application.yaml");
    let text = std::fs::read_to_string(&file).expect("read");
    let text = text
        .replacen(
            "        services: [http-alt]\n",
            "        services: [http-alt, https]\n",
            1,
        )
        .replacen(
            "        services: [https]\n",
            "        services: [https]\n        description: clinic workstations and the DMZ proxies\n",
            1,
        );
    std::fs::write(&file, text).expect("write");
    git(&work, &["commit", "-q", "-am", "HIS app also on https"]);
    let mut rev = None;
    for _ in 0..200 {
        bulkhead_audit::export::for_each_record(&audit_dir, 0, |r, _| {
            if let Event::PolicyRevision {
                commit,
                rules_added,
                rules_removed,
                rules_changed,
                compile,
                ..
            } = &r.detail
            {
                if *commit != head {
                    rev = Some((
                        rules_added.clone(),
                        rules_removed.clone(),
                        rules_changed.clone(),
                        compile.ok,
                    ));
                }
            }
            Ok(true)
        })
        .expect("read");
        if rev.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (added, removed, changed, ok) = rev.expect("second revision recorded");
    assert!(ok);
    assert!(
        added.is_empty() && removed.is_empty(),
        "{added:?} {removed:?}"
    );
    assert_eq!(changed, vec!["app-his-app-from-web".to_string()]);
}
