mod common;

use bulkhead_audit::cli::{run, AuditCommand};
use clap::Parser;
use common::*;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: AuditCommand,
}

fn cli(args: &[&str]) -> (i32, String) {
    let mut argv = vec!["bulkhead-audit"];
    argv.extend_from_slice(args);
    let c = Cli::try_parse_from(argv).unwrap();
    let mut out = Vec::new();
    let code = run(c.cmd, &mut out).unwrap();
    (code, String::from_utf8(out).unwrap())
}

#[test]
fn verify_export_report_through_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let seg = populated(d.path(), 10);
    let dir = d.path().to_str().unwrap();
    let (code, out) = cli(&["verify", "--dir", dir]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("result:       OK"));
    let (code, out) = cli(&[
        "export",
        "--dir",
        dir,
        "--format",
        "csv",
        "--type",
        "admin_action",
    ]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 11);
    let (code, out) = cli(&["report", "--dir", dir, "--format", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["items"].as_array().unwrap().len() >= 18);
    // Pinned key: the store's own key verifies, another key does not.
    let key = std::fs::read_to_string(d.path().join("keys/checkpoint.pub")).unwrap();
    assert_eq!(cli(&["verify", "--dir", dir, "--pubkey", key.trim()]).0, 0);
    let other = "11".repeat(32);
    let (code, out) = cli(&["verify", "--dir", dir, "--pubkey", &other]);
    assert!(code == 2 || out.contains("BadSignature"), "{out}");
    // Tamper: exit status 2 and the location.
    let mut l = lines(&seg);
    l[3] = l[3].replace("alice1", "eve");
    write_lines(&seg, &l);
    let (code, out) = cli(&["verify", "--dir", dir]);
    assert_eq!(code, 2);
    assert!(
        out.contains("Modified in seg-00000000000000000000.log line 4 seq 2"),
        "{out}"
    );
    // There is no delete subcommand.
    let argv = ["bulkhead-audit", "delete", "--dir", dir];
    assert!(Cli::try_parse_from(argv).is_err());
}
