use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bulkhead"))
}

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run bulkhead")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn copy_example(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(example_dir()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn validate_example_ok() {
    let d = example_dir();
    let o = run(&["policy", "validate", "-p", d.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("ok: 6 policy file(s), 15 VM(s)"),
        "{}",
        stdout(&o)
    );
    let o = run(&[
        "policy",
        "validate",
        "-p",
        d.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], true);
}

#[test]
fn validate_reports_errors_with_locations_and_exit_1() {
    let t = tempfile::tempdir().unwrap();
    copy_example(t.path());
    let p = t.path().join("40-application.yaml");
    let s = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        s.replace(
            "peers: [{group: his-app}]\n        services: [oracle]",
            "peers: [{group: his-ap}]\n        services: [oracle]",
        ),
    )
    .unwrap();
    let p2 = t.path().join("60-bad.yaml");
    std::fs::write(&p2, "policies:\n  - name: x\n    tier: application\n    priority: 900\n    applies_to: [{vm: pacs-1}]\n    ingres: []\n").unwrap();
    let o = run(&["policy", "validate", "-p", t.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(
            "40-application.yaml:24:25: group `his-ap` is not defined; did you mean `his-app`?"
        ),
        "{e}"
    );
    assert!(
        e.contains("60-bad.yaml:6:5: policies[0]: unknown field `ingres`"),
        "{e}"
    );
    assert!(
        e.contains("2 error(s); the policy set was not applied."),
        "{e}"
    );
    // missing directory: usage/IO error, exit 2
    let o = run(&["policy", "validate", "-p", "/nonexistent/dir"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/dir"));
}

#[test]
fn explain_names_the_rule_and_the_path() {
    let d = example_dir();
    let d = d.to_str().unwrap();
    let o = run(&[
        "policy",
        "explain",
        "-p",
        d,
        "his-app-1",
        "db-his-1",
        "--proto",
        "tcp",
        "--port",
        "1521",
    ]);
    let s = stdout(&o);
    assert!(
        s.starts_with("his-app-1 (10.10.2.11) → db-his-1 (10.10.5.11) tcp/1521: ALLOW"),
        "{s}"
    );
    assert!(
        s.contains("sec-db-pass-apps             security     pass    matched"),
        "{s}"
    );
    let o = run(&[
        "policy",
        "explain",
        "-p",
        d,
        "10.30.0.11",
        "db-his-1",
        "--port",
        "1521",
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["sides"][0]["rule"], "sec-dmz-no-data");
    assert_eq!(v["sides"][1]["rule"], "sec-db-deny-rest");
    let o = run(&[
        "policy",
        "explain",
        "-p",
        d,
        "jump-1",
        "his-web-1",
        "--proto",
        "icmp",
        "--icmp-type",
        "8",
    ]);
    assert!(stdout(&o).contains("ALLOW"), "{}", stdout(&o));
    let o = run(&["policy", "explain", "-p", d, "nosuchvm", "his-web-1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("neither a VM of the inventory nor an IP address"));
}

#[test]
fn lint_finds_redundant_rules() {
    let t = tempfile::tempdir().unwrap();
    copy_example(t.path());
    std::fs::write(
        t.path().join("60-lint.yaml"),
        "groups:
  - name: orphan
    members: [{ip_block: {cidr: 192.0.2.0/24}}]
policies:
  - name: redundant
    tier: baseline
    priority: 5
    applies_to: [{vm: pacs-1}]
    ingress:
      - id: lint-wide-open
        action: allow
      - id: lint-never
        action: deny
        peers: [{ip_block: {cidr: 10.0.0.0/8}}]
  - name: nobody
    tier: baseline
    priority: 6
    applies_to: [{labels: {app: nonexistent}}]
    ingress:
      - id: lint-no-vm
        action: allow
",
    )
    .unwrap();
    let o = run(&[
        "policy",
        "lint",
        "-p",
        t.path().to_str().unwrap(),
        "--deny-findings",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let s = stdout(&o);
    for w in [
        "unused-group: group `orphan`",
        "over-broad: rule `lint-wide-open`",
        "shadowed: rule `lint-never`",
        "no-vm: rule `lint-no-vm`",
    ] {
        assert!(s.contains(w), "missing {w} in {s}");
    }
    let o = run(&["policy", "lint", "-p", example_dir().to_str().unwrap()]);
    assert!(o.status.success());
}

#[test]
fn compile_summary_and_dump() {
    let t = tempfile::tempdir().unwrap();
    let dump = t.path().join("tables.json");
    let o = run(&[
        "policy",
        "compile",
        "-p",
        example_dir().to_str().unwrap(),
        "--dump",
        dump.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("kvm-01") && s.contains("kvm-03"), "{s}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dump).unwrap()).unwrap();
    assert_eq!(v["hosts"]["kvm-01"]["rules"][0], "default");
    assert!(v["hosts"]["kvm-01"]["ipcache"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["prefix"] == "0.0.0.0/0"));
    // deterministic
    let o2 = run(&["policy", "compile", "-p", example_dir().to_str().unwrap()]);
    assert_eq!(stdout(&o2).lines().next(), s.lines().next());
}

#[test]
fn rules_export_names_addresses_protocols_and_ports() {
    let dir = example_dir();
    let p = dir.to_str().unwrap();
    let o = run(&["policy", "rules", "-p", p, "--csv"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    let mut lines = s.lines();
    assert_eq!(
        lines.next(),
        Some("rule,tier,priority,policy,direction,action,mode,log,source,destination,services,defined_at")
    );
    let rows: Vec<&str> = lines.collect();
    // Evaluation order: system endpoints first, the default action last.
    assert!(
        rows[0].starts_with("system:controller,system,"),
        "{}",
        rows[0]
    );
    assert!(rows.last().unwrap().starts_with("default,default,"), "{s}");
    // An ingress rule: peers are the source, the protected VMs (with addresses) the
    // destination; ports and the defining file:line are named.
    let jump = rows
        .iter()
        .find(|r| r.starts_with("sec-jump-from-admins,"))
        .expect("rule row");
    assert!(jump.contains(",ingress,allow,"), "{jump}");
    assert!(
        jump.contains("172.16.50.0/24 except 172.16.50.0/28"),
        "{jump}"
    );
    assert!(jump.contains("jump-1 (10.10.9.21"), "{jump}");
    assert!(jump.contains("tcp/22 tcp/3389"), "{jump}");
    assert!(jump.contains(".yaml:"), "{jump}");
    // JSON carries the same rows.
    let o = run(&["-o", "json", "policy", "rules", "-p", p]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["rules"].as_array().unwrap().len(), rows.len());
}

fn git(dir: &Path, args: &[&str]) {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn plan_between_git_revisions() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path();
    git(repo, &["init", "-q"]);
    git(repo, &["config", "user.email", "t@example.com"]);
    git(repo, &["config", "user.name", "t"]);
    copy_example(&repo.join("policies"));
    git(repo, &["add", "."]);
    git(repo, &["commit", "-qm", "v1"]);
    // Open postgres from his-app to emr-db and drop the PACS https access.
    let p = repo.join("policies/40-application.yaml");
    let s = std::fs::read_to_string(&p).unwrap();
    let s = s.replace(
        "peers: [{group: emr-app}]\n        services: [postgres]",
        "peers: [{group: emr-app}, {group: his-app}]\n        services: [postgres]",
    );
    let s = s.replace("services: [dicom, https]", "services: [dicom]");
    std::fs::write(&p, s).unwrap();
    // Working tree plan first.
    let r = repo.to_str().unwrap();
    let o = run(&[
        "policy",
        "plan",
        "--repo",
        r,
        "--from",
        "HEAD",
        "--detailed-exitcode",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}{}", stdout(&o), stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("+ his-app-1 → db-emr-1 tcp/5432: deny"), "{s}");
    assert!(s.contains("- his-web-1 → pacs-1 tcp/443: allow"), "{s}");
    git(repo, &["commit", "-qam", "v2"]);
    let o = run(&[
        "policy", "diff", "--repo", r, "--from", "HEAD~1", "--to", "HEAD", "-o", "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ch = v["changes"].as_array().unwrap();
    assert!(ch.iter().any(|c| c["src"] == "his-app-1"
        && c["dst"] == "db-emr-1"
        && c["service"] == "tcp/5432"
        && c["after"] == "allow"));
    assert!(!v["hosts_changed"].as_array().unwrap().is_empty());
    let o = run(&[
        "policy", "plan", "--repo", r, "--from", "HEAD", "--to", "HEAD",
    ]);
    assert!(stdout(&o).contains("no VM-to-VM verdict changes."));
    let o = run(&["policy", "plan", "--repo", r, "--from", "nosuchrev"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn help_teaches() {
    let o = run(&["policy", "validate", "--help"]);
    assert!(stdout(&o).contains("pre-commit hook"));
    let o = run(&["policy", "schema"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.to_string().contains("applies_to"));
}

#[test]
fn quarantine_as_an_emergency_action() {
    let t = tempfile::tempdir().unwrap();
    copy_example(t.path());
    let d = t.path().to_str().unwrap();
    let o = run(&[
        "policy",
        "quarantine",
        "add",
        "-p",
        d,
        "db-his-1",
        "--mode",
        "full",
        "--reason",
        "INC-1",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let o = run(&[
        "policy",
        "explain",
        "-p",
        d,
        "his-app-1",
        "db-his-1",
        "--port",
        "1521",
    ]);
    assert!(
        stdout(&o).contains("DENY") && stdout(&o).contains("quarantine/db-his-1"),
        "{}",
        stdout(&o)
    );
    // Invalid (unknown group): refused, file unchanged.
    let before = std::fs::read_to_string(t.path().join("90-quarantine.yaml")).unwrap();
    let o = run(&[
        "policy",
        "quarantine",
        "add",
        "-p",
        d,
        "pacs-1",
        "--mode",
        "partial",
        "--allow-group",
        "nosuch",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("group `nosuch` is not defined"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(t.path().join("90-quarantine.yaml")).unwrap(),
        before
    );
    let o = run(&["policy", "quarantine", "release", "-p", d, "db-his-1"]);
    assert!(o.status.success());
    let o = run(&[
        "policy",
        "explain",
        "-p",
        d,
        "his-app-1",
        "db-his-1",
        "--port",
        "1521",
    ]);
    assert!(stdout(&o).contains("ALLOW"), "{}", stdout(&o));
}

/// `bulkhead audit …` inside the admin CLI, whose global `-o/--output` is the output format:
/// export and report take `--out FILE`.
#[test]
fn audit_export_and_report_through_the_admin_cli() {
    use bulkhead_audit::record::Event;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("audit");
    let (mut store, _) =
        bulkhead_audit::Store::open(bulkhead_audit::StoreConfig::new(&dir, "ctl-01")).unwrap();
    store
        .append(Event::AdminAction {
            user: "bob".into(),
            role: Some(bulkhead_audit::roles::Role::SystemAdmin),
            source: "10.0.0.6:40022".into(),
            operation: "audit_configure".into(),
            object: "audit/forwarding".into(),
            before: None,
            after: None,
            success: false,
            reason: Some("refused".into()),
        })
        .unwrap();
    store.close().unwrap();
    let d = dir.to_str().unwrap();
    let o = run(&[
        "audit",
        "export",
        "--dir",
        d,
        "--format",
        "csv",
        "--type",
        "admin_action",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("audit_configure"), "{}", stdout(&o));
    let out = t.path().join("export.jsonl");
    let o = run(&[
        "audit",
        "export",
        "--dir",
        d,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read_to_string(&out).unwrap().contains("\"seq\":0"));
    let report = t.path().join("report.json");
    let o = run(&[
        "audit",
        "report",
        "--dir",
        d,
        "--format",
        "json",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(v["items"].as_array().unwrap().len() >= 18);
}
