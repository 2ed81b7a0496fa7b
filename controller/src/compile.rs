//! The controller's use of the policy compiler: a commit's tree and the agents' inventory in,
//! tables per host out. Error messages name files relative to the repository.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bulkhead_abi::model::HostTables;
use bulkhead_policy::load::{
    load_sources_live, load_sources_live_parsed, LoadError, PolicySet, Source,
};
use bulkhead_policy::types::{Interface, Inventory, Vm};
use bulkhead_policy::Resolved;

use crate::InventoryVm;

/// Where policies live in a repository: `policies/`, else the top directory.
pub fn policy_dir(tree: &Path) -> PathBuf {
    let p = tree.join("policies");
    if p.is_dir() {
        p
    } else {
        tree.to_path_buf()
    }
}

/// The inventory the agents reported, in the policy language's inventory form.
pub fn inventory(vms: &[InventoryVm]) -> Inventory {
    Inventory {
        vms: vms
            .iter()
            .map(|v| Vm {
                name: v.vm.name.clone(),
                uuid: v.vm.uuid.clone(),
                labels: v.vm.labels.clone().into_iter().collect(),
                host: v.host.clone(),
                interfaces: v
                    .vm
                    .interfaces
                    .iter()
                    .filter_map(|i| {
                        let mac: [u8; 6] = i.mac.as_slice().try_into().ok()?;
                        Some(Interface {
                            mac: bulkhead_abi::model::format_mac(&mac),
                            ips: i.addresses.clone(),
                        })
                    })
                    .collect(),
                infra_server: false,
            })
            .collect(),
    }
}

/// A commit's policy files as compiler sources.
fn sources(tree: &Path) -> Result<Vec<Source>, Vec<String>> {
    let dir = policy_dir(tree);
    let rel = |p: &Path| p.strip_prefix(tree).unwrap_or(p).to_path_buf();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| vec![format!("{}: {e}", rel(&dir).display())])?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && !p.file_stem().is_some_and(|s| s == "inventory")
        })
        .collect();
    names.sort();
    let mut files = Vec::new();
    for p in names {
        let text =
            std::fs::read_to_string(&p).map_err(|e| vec![format!("{}: {e}", rel(&p).display())])?;
        files.push(Source::new(rel(&p), text));
    }
    Ok(files)
}

/// Load a commit's tree with the reported inventory. The inventory goes in as data
/// (rendering and parsing it as YAML took longer than compiling); only when it is invalid is
/// it rendered, to locate the errors.
fn load_tree(tree: &Path, vms: &[InventoryVm]) -> Result<(PolicySet, Resolved), Vec<String>> {
    const INVENTORY: &str = "<inventory reported by the agents>";
    let files = sources(tree)?;
    match load_sources_live_parsed(files.clone(), Source::new(INVENTORY, ""), inventory(vms)) {
        Err(LoadError::Invalid(_)) => {
            let text = serde_yaml::to_string(&inventory(vms)).map_err(|e| vec![e.to_string()])?;
            load_sources_live(files, Source::new(INVENTORY, text))
        }
        other => other,
    }
    .map_err(load_errors)
}

fn load_errors(e: LoadError) -> Vec<String> {
    match e {
        LoadError::Invalid(diags) => diags.iter().map(|d| d.to_string()).collect(),
        e => vec![e.to_string()],
    }
}

/// Compile a commit's tree for the reported inventory. An `inventory.yaml` in the repository
/// (an example for the CLI) is ignored: the agents say what runs where.
pub fn compile_tree(
    tree: &Path,
    vms: &[InventoryVm],
) -> Result<BTreeMap<String, HostTables>, Vec<String>> {
    let (_, resolved) = load_tree(tree, vms)?;
    Ok(bulkhead_policy::compile(&resolved)
        .hosts
        .into_iter()
        // The compiler hands each host out once: take the tables rather than copy them.
        .map(|(h, out)| {
            let tables = std::sync::Arc::try_unwrap(out)
                .map(|o| o.tables)
                .unwrap_or_else(|shared| shared.tables.clone());
            (h, tables)
        })
        .collect())
}

/// Every policy rule of a commit's tree, by id, as canonical text: the rule and the policy
/// header it inherits (name, tier, priority, mode, symmetry, applied-to; the description is
/// not part of the meaning). Files that do not parse are skipped (the compiler reports them).
pub fn rule_texts(tree: &Path) -> BTreeMap<String, String> {
    let dir = policy_dir(tree);
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if !p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let Ok(file) = serde_yaml::from_str::<bulkhead_policy::PolicyFile>(&text) else {
            continue;
        };
        for mut policy in file.policies {
            let rules: Vec<(&str, bulkhead_policy::types::Rule)> =
                std::mem::take(&mut policy.ingress)
                    .into_iter()
                    .map(|r| ("ingress", r))
                    .chain(
                        std::mem::take(&mut policy.egress)
                            .into_iter()
                            .map(|r| ("egress", r)),
                    )
                    .collect();
            policy.description = None;
            let header = serde_json::to_string(&policy).unwrap_or_default();
            for (dir, mut rule) in rules {
                rule.description = None;
                let body = serde_json::to_string(&rule).unwrap_or_default();
                out.insert(rule.id.clone(), format!("{header}\n{dir}\n{body}"));
            }
        }
    }
    out
}

/// Rules present in both trees whose meaning changed.
pub fn changed_rules(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<String> {
    after
        .iter()
        .filter(|(id, text)| before.get(*id).is_some_and(|b| b != *text))
        .map(|(id, _)| id.clone())
        .collect()
}

/// One rule of a revision: its stable id and what it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleName {
    pub id: String,
    pub name: String,
    /// Tier and policy of a policy rule.
    pub tier: Option<String>,
    pub policy: Option<String>,
    /// A rule of a policy (not the default, a system endpoint or a quarantine).
    pub policy_rule: bool,
}

/// What the compliance report needs from a revision beyond its tables: the default action,
/// monitor-mode VMs, every rule, and the linter's findings (MLPS 8.1.3.2 a, b).
#[derive(Clone, Debug)]
pub struct TreeAnalysis {
    /// `deny`, `reject` or `allow`.
    pub default_action: String,
    /// Running VMs whose interfaces are in monitor mode (denies recorded, not enforced).
    pub monitor_vms: Vec<String>,
    pub rules: Vec<RuleName>,
    pub findings: Vec<bulkhead_policy::lint::Finding>,
    /// Running VMs (name, host) that no policy applies to: only the default action (and
    /// system endpoints) judge their traffic.
    pub uncovered: Vec<(String, String)>,
    /// Rows of the assessors' rule table (`bulkhead policy rules`).
    pub rule_rows: usize,
    /// Per named group with VMs: (group, VMs, rules applying to them: ingress, egress).
    pub zones: Vec<(String, usize, usize, usize)>,
}

/// Load, compile and lint a commit's tree for the reported inventory.
pub fn analyse_tree(tree: &Path, vms: &[InventoryVm]) -> Result<TreeAnalysis, Vec<String>> {
    let (set, res) = load_tree(tree, vms)?;
    let compiled = bulkhead_policy::compile(&res);
    let findings = bulkhead_policy::lint::lint(&set, &res, &compiled);
    let specials = 1 + res.system.len() + res.quarantine.len();
    let rules = res
        .rule_ids()
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let r = i.checked_sub(specials).and_then(|k| res.rules.get(k));
            RuleName {
                name: match r {
                    Some(r) => format!(
                        "policy {} (tier {})",
                        r.policy,
                        res.tiers.get(r.tier).map_or("?", String::as_str)
                    ),
                    None if i == 0 => "default action".into(),
                    None => id.clone(),
                },
                id,
                tier: r.map(|r| res.tiers.get(r.tier).cloned().unwrap_or_default()),
                policy: r.map(|r| r.policy.clone()),
                policy_rule: r.is_some(),
            }
        })
        .collect();
    let zones = zones(&res);
    Ok(TreeAnalysis {
        rule_rows: bulkhead_policy::export::row_count(&res),
        zones,
        default_action: format!("{:?}", res.default_action).to_lowercase(),
        monitor_vms: res
            .monitor_vms
            .iter()
            .filter_map(|&i| res.vms.get(i).map(|v| v.name.clone()))
            .collect(),
        rules,
        findings,
        uncovered: res
            .vms
            .iter()
            .zip(&res.vm_rules)
            .filter(|(_, rules)| rules.iter().all(|(_, reflected)| *reflected))
            .map(|(v, _)| (v.name.clone(), v.host.clone()))
            .collect(),
    })
}

/// Per named group with VMs: (group, VMs, ingress and egress rules applying to any of them).
/// One pass over the rules' applied-to VMs, through each VM's groups.
fn zones(res: &Resolved) -> Vec<(String, usize, usize, usize)> {
    let mut groups_of: Vec<Vec<usize>> = vec![Vec::new(); res.vms.len()];
    for (g, (_, vms, _)) in res.groups.iter().enumerate() {
        for &v in vms {
            if let Some(of) = groups_of.get_mut(v) {
                of.push(g);
            }
        }
    }
    let mut counts = vec![[0usize; 2]; res.groups.len()];
    // The last rule counted for each group: a rule counts once however many VMs it shares.
    let mut counted = vec![usize::MAX; res.groups.len()];
    for (ri, r) in res.rules.iter().enumerate() {
        let d = usize::from(r.dir != bulkhead_abi::DIR_INGRESS);
        for &v in &r.applies {
            for &g in groups_of.get(v).map_or(&[][..], Vec::as_slice) {
                if counted[g] != ri {
                    counted[g] = ri;
                    counts[g][d] += 1;
                }
            }
        }
    }
    res.groups
        .iter()
        .zip(counts)
        .filter(|((_, vms, _), _)| !vms.is_empty())
        .map(|((name, vms, _), [i, e])| (name.clone(), vms.len(), i, e))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_wire::pb;

    fn vm(host: &str, name: &str, addr: &str) -> InventoryVm {
        InventoryVm {
            host: host.into(),
            vm: pb::Vm {
                name: name.into(),
                uuid: format!("uuid-{name}"),
                labels: [("role".to_string(), "web".to_string())].into(),
                interfaces: vec![pb::Interface {
                    device: "vnet0".into(),
                    mac: vec![0x52, 0x54, 0, 0, 0, name.len() as u8],
                    addresses: vec![addr.into()],
                }],
            },
        }
    }

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            t.path().join("p.yaml"),
            "settings:\n  tiers: [app]\n  default_action: deny\n\
             groups:\n  - name: web\n    members: [{labels: {role: web}}]\n\
             policies:\n  - name: web\n    tier: app\n    priority: 1\n    applies_to: [{group: web}]\n    ingress:\n      - id: web-to-web\n        action: allow\n        peers: [{group: web}]\n",
        )
        .expect("write");
        t
    }

    #[test]
    fn reported_inventory_compiles_and_its_errors_are_located() {
        let t = tree();
        let hosts = compile_tree(
            t.path(),
            &[vm("hv-1", "a", "10.0.0.1"), vm("hv-2", "bb", "10.0.0.2")],
        )
        .expect("compiles");
        assert_eq!(hosts.keys().collect::<Vec<_>>(), ["hv-1", "hv-2"]);
        assert!(hosts["hv-1"]
            .ipcache
            .iter()
            .any(|e| e.addr == "10.0.0.2".parse::<std::net::IpAddr>().unwrap()));

        let errors = compile_tree(
            t.path(),
            &[
                vm("hv-1", "a", "10.0.0.1"),
                vm("hv-2", "bb", "not-an-address"),
            ],
        )
        .expect_err("an invalid address is an error");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("<inventory reported by the agents>:")
                    && e.contains("not-an-address")
                    && !e.contains(":1:1:")),
            "{errors:?}"
        );
    }
}
