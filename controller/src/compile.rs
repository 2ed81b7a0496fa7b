//! The controller's use of the policy compiler: a commit's tree and the agents' inventory in,
//! tables per host out. Error messages name files relative to the repository.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bulkhead_abi::model::HostTables;
use bulkhead_policy::load::{load_sources_live, load_sources_live_parsed, LoadError, Source};
use bulkhead_policy::types::{Interface, Inventory, Vm};

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

/// Compile a commit's tree for the reported inventory. An `inventory.yaml` in the repository
/// (an example for the CLI) is ignored: the agents say what runs where.
pub fn compile_tree(
    tree: &Path,
    vms: &[InventoryVm],
) -> Result<BTreeMap<String, HostTables>, Vec<String>> {
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
    const INVENTORY: &str = "<inventory reported by the agents>";
    // The inventory goes in as data (rendering and parsing it as YAML took longer than
    // compiling); only when it is invalid is it rendered, to locate the errors.
    let loaded =
        match load_sources_live_parsed(files.clone(), Source::new(INVENTORY, ""), inventory(vms)) {
            Err(LoadError::Invalid(_)) => {
                let text =
                    serde_yaml::to_string(&inventory(vms)).map_err(|e| vec![e.to_string()])?;
                load_sources_live(files, Source::new(INVENTORY, text))
            }
            other => other,
        };
    match loaded {
        Ok((_, resolved)) => Ok(bulkhead_policy::compile(&resolved)
            .hosts
            .into_iter()
            // The compiler hands each host out once: take the tables rather than copy them.
            .map(|(h, out)| {
                let tables = std::sync::Arc::try_unwrap(out)
                    .map(|o| o.tables)
                    .unwrap_or_else(|shared| shared.tables.clone());
                (h, tables)
            })
            .collect()),
        Err(LoadError::Invalid(diags)) => Err(diags.iter().map(|d| d.to_string()).collect()),
        Err(e) => Err(vec![e.to_string()]),
    }
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
