use bulkhead_policy::*;

fn src(name: &str, text: &str) -> Source {
    Source::new(name, text)
}

fn errors(files: Vec<Source>, inv: Option<Source>) -> Vec<String> {
    match load_sources(files, inv) {
        Ok(_) => panic!("expected errors"),
        Err(LoadError::Invalid(d)) => d.iter().map(|d| d.to_string()).collect(),
        Err(e) => panic!("{e}"),
    }
}

const INV: &str = "vms:
  - name: web-1
    uuid: u1
    labels: {app: web}
    host: h1
    interfaces:
      - mac: \"52:54:00:00:00:01\"
        ips: [10.0.0.1]
";

#[test]
fn unknown_field_is_located() {
    let e = errors(
        vec![src(
            "p.yaml",
            "settings:\n  tiers: [a]\n  defualt_action: deny\n",
        )],
        None,
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("p.yaml:3:3: settings: unknown field `defualt_action`"),
        "{}",
        e[0]
    );
}

#[test]
fn every_semantic_error_at_once_with_locations() {
    let text = "\
settings:
  tiers: [security, application]
groups:
  - name: web
    members: [{labels: {app: web}}]
  - name: web
    members: [{ip_block: {cidr: 10.0.0.0/33}}]
services:
  - name: bad-port
    ports: [{protocol: tcp, ports: \"80,70000\"}]
policies:
  - name: p1
    tier: application
    priority: 10
    applies_to: [{group: web}]
    ingress:
      - id: r1
        action: allow
        peers: [{group: wbe}]
        services: [https]
  - name: p2
    tier: nosuchtier
    priority: 10
    applies_to: [{vm: ghost}]
    ingress:
      - id: r1
        action: deny
        peers: [{ip_block: {cidr: 10.1.0.1/16}}]
  - name: p3
    tier: application
    priority: 10
    applies_to: [{group: web}]
";
    let e = errors(
        vec![src("bad.yaml", text)],
        Some(src("inventory.yaml", INV)),
    );
    let joined = e.join("\n");
    let want = [
        "bad.yaml:6:11: group `web` is defined twice",
        "bad.yaml:7:33: `10.0.0.0/33` has prefix length 33",
        "bad.yaml:10:40: `70000` is not a port or port range",
        "bad.yaml:19:25: group `wbe` is not defined; did you mean `web`?",
        "bad.yaml:20:20: service `https` is not defined",
        "bad.yaml:22:11: policy `p2` names tier `nosuchtier`",
        "bad.yaml:31:15: policy `p3` has priority 10 in tier `application`, the same as policy `p1`",
        "bad.yaml:24:23: VM `ghost` is not in the inventory",
        "bad.yaml:26:13: rule id `r1` is used twice",
        "bad.yaml:28:35: `10.1.0.1/16` has host bits set; did you mean `10.1.0.0/16`?",
    ];
    for w in want {
        assert!(joined.contains(w), "missing {w:?} in\n{joined}");
    }
}

#[test]
fn inventory_errors() {
    let inv = "vms:
  - name: a
    uuid: u1
    host: h1
    interfaces: [{mac: \"52:54:00:00:00:01\", ips: [10.0.0.1]}]
  - name: b
    uuid: u2
    host: h1
    interfaces: [{mac: \"52:54:00:00:00:0g\", ips: [10.0.0.1, 10.0.0.300]}]
";
    let e = errors(
        vec![src("s.yaml", "settings: {tiers: [a]}\n")],
        Some(src("inventory.yaml", inv)),
    );
    let j = e.join("\n");
    assert!(j.contains("is not a MAC address"), "{j}");
    assert!(
        j.contains("address 10.0.0.1 of VM `b` is also VM `a`'s"),
        "{j}"
    );
    assert!(j.contains("`10.0.0.300` is not an IP address"), "{j}");
}

#[test]
fn group_cycle_and_missing_settings() {
    let e = errors(
        vec![src(
            "g.yaml",
            "groups:\n  - name: a\n    members: [{group: b}]\n  - name: b\n    members: [{group: a}]\n",
        )],
        None,
    );
    let j = e.join("\n");
    assert!(j.contains("includes itself"), "{j}");
    assert!(
        j.contains("no file of the policy set has a `settings` section"),
        "{j}"
    );
}

#[test]
fn schema_is_published() {
    let s = policy_schema();
    let t = s.to_string();
    assert!(t.contains("applies_to") && t.contains("ip_block") && t.contains("icmp_type"));
    assert!(inventory_schema().to_string().contains("interfaces"));
}
