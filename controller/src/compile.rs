//! The controller's use of the policy compiler: a commit's tree and the agents' inventory in,
//! tables per host out. Error messages name files relative to the repository.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bulkhead_abi::model::HostTables;
use bulkhead_policy::load::{load_sources_live, LoadError, Source};
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
    let inv_text = serde_yaml::to_string(&inventory(vms)).map_err(|e| vec![e.to_string()])?;
    let inv = Source::new("<inventory reported by the agents>", inv_text);
    match load_sources_live(files, inv) {
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
