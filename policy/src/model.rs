//! The YAML policy language, as written in the policy repository.
//!
//! A policy repository is a directory of `*.yaml` files; each may hold any of the sections
//! below, and together they form one policy set:
//!
//! ```yaml
//! settings:            # once in the whole set
//!   default_action: deny
//!   tiers: [emergency, security, application, baseline]
//! groups:
//!   - name: emr-app
//!     labels: {app: emr, role: app}          # all must match
//!     expressions: [{key: env, operator: In, values: [prod]}]
//!     vms: [emr-app-07]                      # by name, in addition
//!     groups: [other-group]                  # union
//!     ip_blocks: [{cidr: 10.20.0.0/16, except: [10.20.9.0/24]}]
//! services:
//!   - name: postgres
//!     ports: [{protocol: tcp, port: 5432}, {protocol: tcp, port: "6432-6433"}]
//! policies:
//!   - name: emr-database
//!     tier: application
//!     priority: 100
//!     mode: enforce                          # or monitor
//!     applies_to: [emr-db]
//!     ingress:
//!       - {id: emr-app-to-db, action: allow, from: [emr-app], services: [postgres], log: true}
//!     egress: []
//! quarantine:
//!   - {vm: pacs-02, allow: [forensics], reason: "ticket 4711"}
//! infrastructure:
//!   - {name: dhcp-dns, ip_blocks: [{cidr: 10.0.0.2/32}], services: [dns]}
//! ```
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub settings: Option<Settings>,
    #[serde(default)]
    pub groups: Vec<Group>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub quarantine: Vec<Quarantine>,
    #[serde(default)]
    pub infrastructure: Vec<Infrastructure>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// What no rule decides: `deny` (the shipped default; MLPS asks for default deny).
    #[serde(default = "default_deny")]
    pub default_action: Action,
    /// Tiers, highest precedence first.
    #[serde(default = "default_tiers")]
    pub tiers: Vec<String>,
}

fn default_deny() -> Action {
    Action::Deny
}

pub fn default_tiers() -> Vec<String> {
    ["emergency", "security", "application", "baseline"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_action: Action::Deny,
            tiers: default_tiers(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// VMs carrying all these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// VMs satisfying all these expressions (combined with `labels`).
    #[serde(default)]
    pub expressions: Vec<Expression>,
    #[serde(default)]
    pub vms: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<IpBlock>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Expression {
    pub key: String,
    pub operator: Operator,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default)]
    pub except: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub protocol: Protocol,
    /// A port (`5432`) or a range (`"8000-8099"`); absent = every port. TCP, UDP, SCTP only.
    #[serde(default)]
    pub port: Option<PortValue>,
    /// ICMP / ICMPv6 only.
    #[serde(default)]
    pub icmp_type: Option<u8>,
    #[serde(default)]
    pub icmp_code: Option<u8>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PortValue {
    One(u16),
    Range(String),
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
    Any,
}

impl Protocol {
    pub fn number(self) -> Option<u8> {
        match self {
            Protocol::Tcp => Some(6),
            Protocol::Udp => Some(17),
            Protocol::Sctp => Some(132),
            Protocol::Icmp => Some(1),
            Protocol::Icmpv6 => Some(58),
            Protocol::Any => None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub tier: String,
    pub priority: u32,
    #[serde(default)]
    pub mode: Mode,
    /// Groups whose VMs this policy applies to.
    pub applies_to: Vec<String>,
    #[serde(default)]
    pub ingress: Vec<Rule>,
    #[serde(default)]
    pub egress: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    /// Record what would be denied; drop nothing.
    Monitor,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Stable id: the audit trail and counters name it. Unique in the whole set.
    pub id: String,
    pub action: Action,
    /// Ingress: peers the traffic may come from (group names, or `any`).
    #[serde(default)]
    pub from: Vec<String>,
    /// Egress: peers the traffic may go to (group names, or `any`).
    #[serde(default)]
    pub to: Vec<String>,
    /// Service names, or `any`; empty = any.
    #[serde(default)]
    pub services: Vec<String>,
    /// Record every allowed flow too.
    #[serde(default)]
    pub log: bool,
    #[serde(default)]
    pub description: String,
    /// An allow between managed VMs also opens the other end (default true).
    #[serde(default = "yes")]
    pub symmetric: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Deny and tell the sender (TCP RST).
    Reject,
    /// Hand the decision to the next tier.
    Pass,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Quarantine {
    pub vm: String,
    /// Groups still allowed in and out (forensics, management); empty = fully isolated.
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub reason: String,
}

/// Addresses and services policy must never cut off (DHCP, DNS, NTP, the controller…).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Infrastructure {
    pub name: String,
    pub ip_blocks: Vec<IpBlock>,
    #[serde(default)]
    pub services: Vec<String>,
}

/// The inventory the compiler resolves selectors against.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub vms: Vec<VmRecord>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub name: String,
    #[serde(default)]
    pub uuid: String,
    pub host: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub interfaces: Vec<InterfaceRecord>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InterfaceRecord {
    /// Host-side device (tap); informational for the compiler.
    #[serde(default)]
    pub device: String,
    pub mac: String,
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
}
