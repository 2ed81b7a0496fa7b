//! The policy language and the inventory, as Rust types. These are the public format:
//! YAML files deserialize into them (unknown fields are errors) and the JSON Schema is
//! generated from them.
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One policy file. A policy set is the union of every `*.yaml` file in a directory
/// (except `inventory.yaml`); each section may appear in any file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Global settings (at most one file may carry them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Settings>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Policy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantine: Vec<Quarantine>,
}

/// Global settings: tiers, default action, system endpoints, shared addresses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Tier names, highest precedence first. Quarantine and system endpoints sit above all.
    pub tiers: Vec<String>,
    /// What happens to a flow no rule decides. Shipped as `deny` (MLPS default deny).
    #[serde(default = "default_deny")]
    pub default_action: DefaultAction,
    /// Infrastructure that policy must never cut off (controller, DHCP, DNS, NTP ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub system_endpoints: Vec<SystemEndpoint>,
    /// Addresses shared by several VMs (VIP / VRRP): each listed VM owns the address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_addresses: Vec<SharedAddress>,
    /// VMs whose interfaces run in monitor mode (every deny is only recorded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitor_endpoints: Vec<Peer>,
}

fn default_deny() -> DefaultAction {
    DefaultAction::Deny
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    Deny,
    Reject,
    Allow,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SystemEndpoint {
    pub name: String,
    /// Addresses (CIDR or single address) of the infrastructure.
    pub addresses: Vec<String>,
    /// Services allowed to and from them; empty means every protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SharedAddress {
    /// A single address (no prefix), e.g. a VRRP virtual IP.
    pub address: String,
    /// Names of the VMs that may own it.
    pub vms: Vec<String>,
}

/// A named set of workloads and/or address blocks (the union of its members).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub members: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One selector. Exactly one of `group`, `vm`, `labels`/`expressions`, `ip_block`, `any`.
/// `labels` and `expressions` together select VMs matching all of them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Reference to a named group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A VM by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// VMs carrying every one of these labels (key = value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// VMs matching every one of these label expressions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expressions: Option<Vec<LabelExpr>>,
    /// Addresses: a CIDR minus exceptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
    /// `any: true` — every address (0.0.0.0/0 and ::/0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelExpr {
    pub key: String,
    pub operator: LabelOp,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LabelOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// A named service: a list of protocol/port entries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Protocol and ports. `ports` is a list like `"80,443,8000-8080"` (tcp/udp/sctp);
/// `icmp_type`/`icmp_code` for icmp/icmpv6. No ports means every port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// tcp, udp, sctp, icmp, icmpv6, any, or an IP protocol number.
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
}

/// `443`, or `"80,443,8000-8080"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum PortList {
    One(u32),
    List(String),
}

/// A service in a rule: the name of a service, or an inline entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ServiceRef {
    Named(String),
    Inline(PortSpec),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    /// Record what would be denied, drop nothing.
    Monitor,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub tier: String,
    /// Lower runs first inside the tier. Two policies of one tier may not share a priority.
    pub priority: u32,
    #[serde(default)]
    pub mode: Mode,
    /// An allow between two managed VMs also opens the other end (default true).
    #[serde(default = "yes")]
    pub symmetric: bool,
    /// The VMs this policy protects.
    pub applies_to: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    Reject,
    /// Stop evaluating this tier; the next tier decides.
    Pass,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Stable rule id, unique across the set; the audit trail names it.
    pub id: String,
    pub action: Action,
    /// The other end. Empty or absent means any address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<Peer>,
    /// Empty or absent means every protocol and port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceRef>,
    #[serde(default)]
    pub log: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QuarantineMode {
    /// Nothing in or out (system endpoints excepted).
    Full,
    /// Only the `allow` peers (forensic / management group).
    Partial,
}

/// Isolate a VM, above every tier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Quarantine {
    pub vm: String,
    pub mode: QuarantineMode,
    /// For `partial`: who may still talk to the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

// ---------------------------------------------------------------- inventory ----

/// The inventory: every managed VM. Reused by the agent and controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub vms: Vec<Vm>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub name: String,
    pub uuid: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The hypervisor host the VM runs on.
    pub host: String,
    pub interfaces: Vec<Interface>,
    /// The VM serves DHCP / sends router advertisements.
    #[serde(default)]
    pub infra_server: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// `aa:bb:cc:dd:ee:ff`
    pub mac: String,
    pub ips: Vec<String>,
}
