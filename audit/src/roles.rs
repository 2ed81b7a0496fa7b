//! The three built-in administrator roles (MLPS 8.1.5.1–8.1.5.3, 8.1.4.2 d) and authorization.
//!
//! Identity comes from the caller's client certificate:
//!
//! * a SAN URI `bulkhead://role/<role>/<user>` (preferred), e.g.
//!   `bulkhead://role/security-admin/alice`;
//! * or subject `OU=<role>` with `CN=<user>`.
//!
//! `<role>` is `system-admin`, `security-admin` or `audit-admin`. An identity that carries two
//! different roles (two URIs, or a URI and an OU that disagree) is refused, as is one whose URI
//! user and CN disagree. Every refusal yields an `admin_action` audit record with
//! `success: false`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::record::Event;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Hosts, agents, certificates, accounts, backup.
    SystemAdmin,
    /// Policy, labels, quarantine.
    SecurityAdmin,
    /// Read, search, verify and export the audit trail; configure auditing. Nothing else.
    AuditAdmin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::SystemAdmin, Role::SecurityAdmin, Role::AuditAdmin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::SystemAdmin => "system-admin",
            Role::SecurityAdmin => "security-admin",
            Role::AuditAdmin => "audit-admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s.trim().to_ascii_lowercase().as_str() {
            "system-admin" | "sysadmin" | "system" => Some(Role::SystemAdmin),
            "security-admin" | "secadmin" | "security" => Some(Role::SecurityAdmin),
            "audit-admin" | "auditadmin" | "audit" | "auditor" => Some(Role::AuditAdmin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every operation the controller exposes, with the one role allowed to perform it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    // System administrator.
    HostRegister,
    HostRemove,
    AgentUpgrade,
    CertificateIssue,
    CertificateRevoke,
    AccountCreate,
    AccountDisable,
    RoleAssign,
    Backup,
    Restore,
    // Security administrator.
    PolicyCommit,
    PolicyApply,
    PolicyRollback,
    PolicyModeSet,
    GlobalDefaultSet,
    LabelSet,
    Quarantine,
    Unquarantine,
    // Audit administrator.
    AuditRead,
    AuditSearch,
    AuditExport,
    AuditVerify,
    ComplianceReport,
    /// Change forwarding / audit configuration, stop or start auditing (8.1.4.3 d).
    AuditConfigure,
}

impl Operation {
    pub const ALL: [Operation; 24] = [
        Operation::HostRegister,
        Operation::HostRemove,
        Operation::AgentUpgrade,
        Operation::CertificateIssue,
        Operation::CertificateRevoke,
        Operation::AccountCreate,
        Operation::AccountDisable,
        Operation::RoleAssign,
        Operation::Backup,
        Operation::Restore,
        Operation::PolicyCommit,
        Operation::PolicyApply,
        Operation::PolicyRollback,
        Operation::PolicyModeSet,
        Operation::GlobalDefaultSet,
        Operation::LabelSet,
        Operation::Quarantine,
        Operation::Unquarantine,
        Operation::AuditRead,
        Operation::AuditSearch,
        Operation::AuditExport,
        Operation::AuditVerify,
        Operation::ComplianceReport,
        Operation::AuditConfigure,
    ];

    pub fn required_role(self) -> Role {
        use Operation::*;
        match self {
            HostRegister | HostRemove | AgentUpgrade | CertificateIssue | CertificateRevoke
            | AccountCreate | AccountDisable | RoleAssign | Backup | Restore => Role::SystemAdmin,
            PolicyCommit | PolicyApply | PolicyRollback | PolicyModeSet | GlobalDefaultSet
            | LabelSet | Quarantine | Unquarantine => Role::SecurityAdmin,
            AuditRead | AuditSearch | AuditExport | AuditVerify | ComplianceReport
            | AuditConfigure => Role::AuditAdmin,
        }
    }

    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// What the controller extracted from the caller's verified client certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertIdentity {
    pub common_name: Option<String>,
    pub organizational_units: Vec<String>,
    pub san_uris: Vec<String>,
}

/// An authenticated administrator with exactly one role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub user: String,
    pub role: Role,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum Refusal {
    #[error("the certificate carries no Bulkhead role")]
    NoRole,
    #[error("the identity holds more than one role ({0:?}); roles cannot be combined")]
    MultipleRoles(Vec<Role>),
    #[error("the certificate names no user")]
    NoUser,
    #[error("the certificate names different users ({0:?})")]
    UserMismatch(Vec<String>),
    #[error("malformed role URI {0:?}")]
    MalformedUri(String),
    #[error("operation {op} requires role {need}, caller has {have}")]
    WrongRole { op: String, need: Role, have: Role },
}

/// A refused request and the audit record of the refusal (which must be recorded).
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    pub refusal: Refusal,
    pub record: Event,
}

const URI_PREFIX: &str = "bulkhead://role/";

/// Map a certificate identity to a principal (exactly one role, one user).
pub fn principal_from_cert(id: &CertIdentity) -> Result<Principal, Refusal> {
    let mut roles: Vec<Role> = Vec::new();
    let mut users: Vec<String> = Vec::new();
    for uri in &id.san_uris {
        let Some(rest) = uri.strip_prefix(URI_PREFIX) else {
            continue; // other URIs (e.g. SPIFFE) are not ours
        };
        let mut it = rest.splitn(2, '/');
        let (Some(r), Some(u)) = (it.next(), it.next()) else {
            return Err(Refusal::MalformedUri(uri.clone()));
        };
        let role = Role::parse(r).ok_or_else(|| Refusal::MalformedUri(uri.clone()))?;
        if u.is_empty() || u.contains('/') {
            return Err(Refusal::MalformedUri(uri.clone()));
        }
        roles.push(role);
        users.push(u.to_string());
    }
    for ou in &id.organizational_units {
        if let Some(r) = Role::parse(ou) {
            roles.push(r);
        }
    }
    if let Some(cn) = &id.common_name {
        users.push(cn.clone());
    }
    roles.sort();
    roles.dedup();
    users.sort();
    users.dedup();
    match roles.len() {
        0 => return Err(Refusal::NoRole),
        1 => {}
        _ => return Err(Refusal::MultipleRoles(roles)),
    }
    match users.len() {
        0 => Err(Refusal::NoUser),
        1 => Ok(Principal {
            user: users.remove(0),
            role: roles[0],
        }),
        _ => Err(Refusal::UserMismatch(users)),
    }
}

/// Authorize `op` for the caller. On refusal the returned event must be recorded (it is the
/// audit record of the refused attempt). On success, the controller records the action's
/// outcome with [`admin_event`] after performing it.
pub fn authorize(
    id: &CertIdentity,
    op: Operation,
    source: &str,
    object: &str,
) -> Result<Principal, Box<Refused>> {
    let refused = |refusal: Refusal, user: String, role: Option<Role>| {
        let ev = Event::AdminAction {
            user,
            role,
            source: source.to_string(),
            operation: op.name(),
            object: object.to_string(),
            before: None,
            after: None,
            success: false,
            reason: Some(format!("refused: {refusal}")),
        };
        Box::new(Refused {
            refusal,
            record: ev,
        })
    };
    let display_user = || {
        id.common_name
            .clone()
            .or_else(|| id.san_uris.first().cloned())
            .unwrap_or_else(|| "<unknown>".into())
    };
    match principal_from_cert(id) {
        Err(r) => Err(refused(r, display_user(), None)),
        Ok(p) => {
            let need = op.required_role();
            if p.role == need {
                Ok(p)
            } else {
                Err(refused(
                    Refusal::WrongRole {
                        op: op.name(),
                        need,
                        have: p.role,
                    },
                    p.user.clone(),
                    Some(p.role),
                ))
            }
        }
    }
}

/// The audit record of a performed administrator action.
pub fn admin_event(
    p: &Principal,
    source: &str,
    op: Operation,
    object: &str,
    before: Option<Value>,
    after: Option<Value>,
    result: Result<(), String>,
) -> Event {
    Event::AdminAction {
        user: p.user.clone(),
        role: Some(p.role),
        source: source.to_string(),
        operation: op.name(),
        object: object.to_string(),
        before,
        after,
        success: result.is_ok(),
        reason: result.err(),
    }
}

/// Role assignments held by the controller: one role per account, never two.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleAssignments {
    pub accounts: BTreeMap<String, Role>,
}

impl RoleAssignments {
    /// Assign a role; refused if the account already holds a different role.
    pub fn assign(&mut self, user: &str, role: Role) -> Result<(), Refusal> {
        match self.accounts.get(user) {
            Some(r) if *r != role => Err(Refusal::MultipleRoles(vec![*r, role])),
            _ => {
                self.accounts.insert(user.to_string(), role);
                Ok(())
            }
        }
    }

    /// Check a certificate principal against the registry (a certificate issued for a role
    /// the account no longer holds is refused).
    pub fn check(&self, p: &Principal) -> Result<(), Refusal> {
        match self.accounts.get(&p.user) {
            Some(r) if *r == p.role => Ok(()),
            Some(r) => Err(Refusal::MultipleRoles(vec![*r, p.role])),
            None => Err(Refusal::NoRole),
        }
    }

    /// Whether every role has at least one account and no account has two roles.
    /// Read a registry file (JSON: `{"accounts": {"alice": "security-admin", …}}`); a
    /// missing file is an empty registry.
    pub fn load(path: &std::path::Path) -> crate::Result<RoleAssignments> {
        match std::fs::read_to_string(path) {
            Ok(t) => Ok(serde_json::from_str(&t)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(crate::Error::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }

    /// Write the registry atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &std::path::Path) -> crate::Result<()> {
        let io = |e| crate::Error::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let tmp = path.with_extension("tmp");
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    pub fn separated(&self) -> bool {
        Role::ALL
            .iter()
            .all(|r| self.accounts.values().any(|x| x == r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(role: &str, user: &str) -> CertIdentity {
        CertIdentity {
            san_uris: vec![format!("bulkhead://role/{role}/{user}")],
            ..Default::default()
        }
    }

    #[test]
    fn uri_maps_to_principal() {
        let p = principal_from_cert(&uri("security-admin", "alice")).unwrap();
        assert_eq!(p.role, Role::SecurityAdmin);
        assert_eq!(p.user, "alice");
    }

    #[test]
    fn ou_and_cn_map_to_principal() {
        let id = CertIdentity {
            common_name: Some("bob".into()),
            organizational_units: vec!["Hospital IT".into(), "audit-admin".into()],
            san_uris: vec!["spiffe://x/y".into()],
        };
        let p = principal_from_cert(&id).unwrap();
        assert_eq!(p.role, Role::AuditAdmin);
        assert_eq!(p.user, "bob");
    }

    #[test]
    fn two_roles_refused_and_audited() {
        let mut id = uri("security-admin", "alice");
        id.san_uris.push("bulkhead://role/audit-admin/alice".into());
        let refused =
            authorize(&id, Operation::PolicyApply, "10.0.0.5:4431", "policy/web").unwrap_err();
        let (r, ev) = (refused.refusal, refused.record);
        assert!(matches!(r, Refusal::MultipleRoles(_)));
        match ev {
            Event::AdminAction {
                success, operation, ..
            } => {
                assert!(!success);
                assert_eq!(operation, "policy_apply");
            }
            _ => panic!("wrong event"),
        }
        // OU disagreeing with the URI also counts as two roles.
        let mut id = uri("system-admin", "carol");
        id.organizational_units.push("security-admin".into());
        assert!(matches!(
            principal_from_cert(&id),
            Err(Refusal::MultipleRoles(_))
        ));
    }

    #[test]
    fn user_mismatch_and_malformed_refused() {
        let mut id = uri("system-admin", "carol");
        id.common_name = Some("mallory".into());
        assert!(matches!(
            principal_from_cert(&id),
            Err(Refusal::UserMismatch(_))
        ));
        assert!(matches!(
            principal_from_cert(&uri("root", "x")),
            Err(Refusal::MalformedUri(_))
        ));
        assert_eq!(
            principal_from_cert(&CertIdentity::default()),
            Err(Refusal::NoRole)
        );
    }

    #[test]
    fn least_privilege_matrix() {
        for op in Operation::ALL {
            for role in Role::ALL {
                let res = authorize(&uri(role.as_str(), "u"), op, "src", "obj");
                assert_eq!(res.is_ok(), op.required_role() == role, "{op:?} {role:?}");
            }
        }
        // The audit administrator can read the trail but not change policy or stop auditing
        // by another role.
        assert!(authorize(&uri("audit-admin", "a"), Operation::AuditExport, "s", "o").is_ok());
        assert!(authorize(&uri("audit-admin", "a"), Operation::PolicyApply, "s", "o").is_err());
        assert!(authorize(
            &uri("system-admin", "s"),
            Operation::AuditConfigure,
            "s",
            "o"
        )
        .is_err());
    }

    #[test]
    fn registry_refuses_second_role() {
        let mut ra = RoleAssignments::default();
        ra.assign("alice", Role::SecurityAdmin).unwrap();
        assert!(ra.assign("alice", Role::AuditAdmin).is_err());
        ra.assign("bob", Role::AuditAdmin).unwrap();
        ra.assign("sys", Role::SystemAdmin).unwrap();
        assert!(ra.separated());
        let p = Principal {
            user: "alice".into(),
            role: Role::AuditAdmin,
        };
        assert!(ra.check(&p).is_err());
    }
}
