//! The VMs on this host and their interfaces, from a static file or from libvirt.
//!
//! Each VM interface is an endpoint with id `<vm-name>/<mac>` (the guest MAC, lower-case),
//! the id the policy compiler gives it. The host-side device (tap) is where the datapath
//! attaches; its ifindex is looked up when the inventory is scanned.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Parse { path: PathBuf, msg: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub name: String,
    #[serde(default)]
    pub uuid: String,
    /// The host the VM runs on; informational here (the agent reports its own VMs).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub interfaces: Vec<Interface>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Host-side device (tap), e.g. `vnet3`.
    pub device: String,
    /// Guest MAC, `52:54:00:12:34:56`.
    pub mac: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticFile {
    vms: Vec<Vm>,
}

/// Where the agent learns its VMs.
#[derive(Clone, Debug)]
pub enum Source {
    /// A YAML file `{vms: [{name, uuid, labels, interfaces: [{device, mac, addresses}]}]}`.
    File(PathBuf),
    /// A directory of libvirt domain XML (`/run/libvirt/qemu` holds the running domains').
    Libvirt(PathBuf),
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

impl Vm {
    /// Endpoint id of an interface (`<vm>/<mac>`).
    pub fn endpoint_id(&self, iface: &Interface) -> String {
        match parse_mac(&iface.mac) {
            Some(m) => bulkhead_abi::model::endpoint_id(&self.name, &m),
            None => format!("{}/{}", self.name, iface.mac.to_lowercase()),
        }
    }
}

impl Source {
    pub fn scan(&self) -> Result<Vec<Vm>, InventoryError> {
        let mut vms = match self {
            Source::File(p) => read_file(p)?,
            Source::Libvirt(dir) => read_libvirt_dir(dir)?,
        };
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }
}

fn read_file(path: &Path) -> Result<Vec<Vm>, InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let f: StaticFile = serde_yaml::from_str(&text).map_err(|e| InventoryError::Parse {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    for vm in &f.vms {
        for i in &vm.interfaces {
            if parse_mac(&i.mac).is_none() {
                return Err(InventoryError::Parse {
                    path: path.to_path_buf(),
                    msg: format!("VM {}: {:?} is not a MAC address", vm.name, i.mac),
                });
            }
        }
    }
    Ok(f.vms)
}

/// Namespace of Bulkhead's element in a domain's `<metadata>`.
pub const LIBVIRT_NS: &str = "https://bulkhead.dev/xmlns/libvirt/1";

fn read_libvirt_dir(dir: &Path) -> Result<Vec<Vm>, InventoryError> {
    let entries = std::fs::read_dir(dir).map_err(|source| InventoryError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut vms = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "xml") {
            let text = std::fs::read_to_string(&path).map_err(|source| InventoryError::Read {
                path: path.clone(),
                source,
            })?;
            vms.push(parse_domain(&text).map_err(|msg| InventoryError::Parse { path, msg })?);
        }
    }
    Ok(vms)
}

/// One libvirt domain (or `<domstatus>` wrapping one). Labels and addresses come from
/// `<metadata><bulkhead:vm xmlns:bulkhead="…"><label key="app">emr</label>
/// <interface mac="…"><address>10.0.0.5</address></interface></bulkhead:vm></metadata>`
/// because libvirt itself knows no labels and, for bridged guests, no addresses.
pub fn parse_domain(xml: &str) -> Result<Vm, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let domain = doc
        .descendants()
        .find(|n| n.has_tag_name("domain"))
        .ok_or("no <domain> element")?;
    let child_text = |parent: roxmltree::Node, tag: &str| {
        parent
            .children()
            .find(|n| n.has_tag_name(tag))
            .and_then(|n| n.text())
            .map(|s| s.trim().to_string())
    };
    let name = child_text(domain, "name").ok_or("domain without <name>")?;
    let uuid = child_text(domain, "uuid").unwrap_or_default();
    let meta = domain
        .children()
        .find(|n| n.has_tag_name("metadata"))
        .and_then(|m| m.children().find(|n| n.has_tag_name((LIBVIRT_NS, "vm"))));
    let mut labels = BTreeMap::new();
    let mut meta_addrs: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    if let Some(meta) = meta {
        for n in meta.children().filter(|n| n.is_element()) {
            if n.has_tag_name((LIBVIRT_NS, "label")) {
                let key = n.attribute("key").ok_or("<label> without key")?;
                labels.insert(key.to_string(), n.text().unwrap_or("").trim().to_string());
            } else if n.has_tag_name((LIBVIRT_NS, "interface")) {
                let mac = n.attribute("mac").ok_or("<interface> without mac")?;
                let addrs = n
                    .children()
                    .filter(|a| a.has_tag_name((LIBVIRT_NS, "address")))
                    .map(|a| {
                        let t = a.text().unwrap_or("").trim();
                        t.parse::<IpAddr>()
                            .map_err(|_| format!("VM {name}: {t:?} is not an IP address"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                meta_addrs.insert(mac.to_lowercase(), addrs);
            }
        }
    }
    let mut interfaces = Vec::new();
    if let Some(devices) = domain.children().find(|n| n.has_tag_name("devices")) {
        for iface in devices.children().filter(|n| n.has_tag_name("interface")) {
            let mac = iface
                .children()
                .find(|n| n.has_tag_name("mac"))
                .and_then(|n| n.attribute("address"));
            let dev = iface
                .children()
                .find(|n| n.has_tag_name("target"))
                .and_then(|n| n.attribute("dev"));
            // An interface without a target device is not running here: nothing to enforce.
            if let (Some(mac), Some(dev)) = (mac, dev) {
                if parse_mac(mac).is_none() {
                    return Err(format!("VM {name}: {mac:?} is not a MAC address"));
                }
                interfaces.push(Interface {
                    device: dev.to_string(),
                    mac: mac.to_lowercase(),
                    addresses: meta_addrs.remove(&mac.to_lowercase()).unwrap_or_default(),
                });
            }
        }
    }
    Ok(Vm {
        name,
        uuid,
        host: None,
        labels,
        interfaces,
    })
}

/// The ifindex of a host device, if it exists now.
pub fn ifindex(device: &str) -> Option<u32> {
    if device.contains('/') || device.is_empty() {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{device}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_domain_with_bulkhead_metadata() {
        let xml = format!(
            r#"<domstatus state='running'><domain type='kvm'>
              <name>emr-db-01</name><uuid>6f1c0f0e-1111-2222-3333-444455556666</uuid>
              <metadata><bh:vm xmlns:bh="{LIBVIRT_NS}">
                <bh:label key="app">emr</bh:label><bh:label key="tier">db</bh:label>
                <bh:interface mac="52:54:00:AA:00:01"><bh:address>10.1.0.5</bh:address>
                  <bh:address>fd00::5</bh:address></bh:interface>
              </bh:vm></metadata>
              <devices>
                <interface type='bridge'><mac address='52:54:00:aa:00:01'/><target dev='vnet7'/></interface>
                <interface type='bridge'><mac address='52:54:00:aa:00:02'/></interface>
              </devices></domain></domstatus>"#
        );
        let vm = parse_domain(&xml).unwrap();
        assert_eq!(vm.name, "emr-db-01");
        assert_eq!(vm.labels["tier"], "db");
        assert_eq!(
            vm.interfaces.len(),
            1,
            "only interfaces with a target device"
        );
        assert_eq!(vm.interfaces[0].device, "vnet7");
        assert_eq!(vm.interfaces[0].addresses.len(), 2);
        assert_eq!(
            vm.endpoint_id(&vm.interfaces[0]),
            "emr-db-01/52:54:00:aa:00:01"
        );
        assert!(parse_domain("<domain><uuid>x</uuid></domain>").is_err());
    }

    #[test]
    fn static_file_rejects_unknown_fields_and_bad_macs() {
        let dir = std::env::temp_dir().join(format!("bh-inv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("inv.yaml");
        std::fs::write(
            &p,
            "vms:\n- name: a\n  interfaces:\n  - {device: tap0, mac: '52:54:00:00:00:01', addresses: [10.0.0.1]}\n",
        )
        .unwrap();
        assert_eq!(Source::File(p.clone()).scan().unwrap()[0].name, "a");
        std::fs::write(&p, "vms:\n- name: a\n  colour: red\n  interfaces: []\n").unwrap();
        let e = Source::File(p.clone()).scan().unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        std::fs::write(
            &p,
            "vms:\n- name: a\n  interfaces:\n  - {device: tap0, mac: 'zz'}\n",
        )
        .unwrap();
        assert!(Source::File(p.clone()).scan().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
