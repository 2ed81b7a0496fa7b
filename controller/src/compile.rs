//! The controller's use of the policy compiler: a commit's tree and the agents' inventory in,
//! tables per host out. Error messages name files relative to the repository.
use std::collections::BTreeMap;
use std::path::Path;

use bulkhead_abi::model::HostTables;
use bulkhead_policy::model::{InterfaceRecord, Inventory, VmRecord};

use crate::InventoryVm;

/// Where policies live in a repository: `policies/`, else the top directory.
pub fn policy_dir(tree: &Path) -> std::path::PathBuf {
    let p = tree.join("policies");
    if p.is_dir() {
        p
    } else {
        tree.to_path_buf()
    }
}

pub fn inventory(vms: &[InventoryVm]) -> Inventory {
    Inventory {
        vms: vms
            .iter()
            .map(|v| VmRecord {
                name: v.vm.name.clone(),
                uuid: v.vm.uuid.clone(),
                host: v.host.clone(),
                labels: v.vm.labels.clone().into_iter().collect(),
                interfaces: v
                    .vm
                    .interfaces
                    .iter()
                    .filter(|i| i.mac.len() == 6)
                    .map(|i| InterfaceRecord {
                        device: i.device.clone(),
                        mac: i
                            .mac
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":"),
                        addresses: i.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Compile a commit's tree for the reported inventory.
pub fn compile_tree(
    tree: &Path,
    vms: &[InventoryVm],
) -> Result<BTreeMap<String, HostTables>, Vec<String>> {
    let set = bulkhead_policy::load_dir(&policy_dir(tree)).map_err(|diags| {
        diags
            .iter()
            .map(|d| {
                let mut d = d.clone();
                if let Ok(rel) = d.file.strip_prefix(tree) {
                    d.file = rel.to_path_buf();
                }
                d.to_string()
            })
            .collect::<Vec<_>>()
    })?;
    Ok(bulkhead_policy::compile(&set, &inventory(vms)))
}
