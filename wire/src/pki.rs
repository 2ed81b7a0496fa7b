//! Certificates for mutual TLS: a Bulkhead CA issues the controller's server certificate,
//! one client certificate per hypervisor host and one per administrator.
//!
//! Who a peer is comes from a URI in its certificate's subject alternative names, never from
//! anything it sends: `bulkhead://host/<host>` for agents, `bulkhead://role/<role>/<user>` for
//! administrators (one role per certificate, so no identity can combine roles).
use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

pub const HOST_URI: &str = "bulkhead://host/";
pub const ROLE_URI: &str = "bulkhead://role/";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("not a valid name for a certificate: {0:?}")]
    Name(String),
    #[error("peer certificate does not parse: {0}")]
    Parse(String),
    #[error(
        "peer certificate carries no Bulkhead identity (bulkhead://host/… or bulkhead://role/…)"
    )]
    NoIdentity,
    #[error("peer certificate carries {0} Bulkhead identities; exactly one is allowed")]
    SeveralIdentities(usize),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// What a certificate is issued for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// The controller's server certificate, valid for these DNS names and addresses.
    Controller { dns: Vec<String>, ips: Vec<IpAddr> },
    /// An agent on hypervisor `host`.
    Host(String),
    /// An administrator with one role.
    Admin { user: String, role: String },
}

/// Who a verified peer certificate says it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    Host(String),
    Admin { user: String, role: String },
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn validity(params: &mut CertificateParams, days: i64, not_before_days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now + Duration::days(not_before_days) - Duration::minutes(5);
    params.not_after = now + Duration::days(days);
}

/// A new self-signed CA valid for `days`.
pub fn new_ca(name: &str, days: i64) -> Result<Pem, PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name
        .push(DnType::OrganizationName, "Bulkhead");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, days, 0);
    let cert = p.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Issue a certificate for `subject`, signed by `ca`, valid from `not_before_days` (negative:
/// in the past) until `days` from now (negative: already expired, for tests).
pub fn issue(
    ca: &Pem,
    subject: &Subject,
    days: i64,
    not_before_days: i64,
) -> Result<Pem, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    let uri = |s: String| -> Result<SanType, PkiError> {
        Ok(SanType::URI(
            s.clone().try_into().map_err(|_| PkiError::Name(s))?,
        ))
    };
    match subject {
        Subject::Controller { dns, ips } => {
            p.distinguished_name
                .push(DnType::CommonName, "bulkhead-controller");
            for d in dns {
                p.subject_alt_names.push(SanType::DnsName(
                    d.clone()
                        .try_into()
                        .map_err(|_| PkiError::Name(d.clone()))?,
                ));
            }
            p.subject_alt_names
                .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Subject::Host(host) => {
            if !valid_name(host) {
                return Err(PkiError::Name(host.clone()));
            }
            p.distinguished_name.push(DnType::CommonName, host.as_str());
            p.subject_alt_names.push(uri(format!("{HOST_URI}{host}"))?);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        Subject::Admin { user, role } => {
            if !valid_name(user) || !valid_name(role) {
                return Err(PkiError::Name(format!("{role}/{user}")));
            }
            p.distinguished_name.push(DnType::CommonName, user.as_str());
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, role.as_str());
            p.subject_alt_names
                .push(uri(format!("{ROLE_URI}{role}/{user}"))?);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    validity(&mut p, days, not_before_days);
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The Bulkhead identity in a (TLS-verified) peer certificate, DER.
pub fn identity_of(der: &[u8]) -> Result<PeerIdentity, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let mut found = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                if let Some(host) = u.strip_prefix(HOST_URI) {
                    if valid_name(host) {
                        found.push(PeerIdentity::Host(host.to_string()));
                    }
                } else if let Some(rest) = u.strip_prefix(ROLE_URI) {
                    if let Some((role, user)) = rest.split_once('/') {
                        if valid_name(role) && valid_name(user) {
                            found.push(PeerIdentity::Admin {
                                user: user.to_string(),
                                role: role.to_string(),
                            });
                        }
                    }
                }
            }
        }
    }
    match found.len() {
        0 => Err(PkiError::NoIdentity),
        1 => Ok(found.remove(0)),
        n => Err(PkiError::SeveralIdentities(n)),
    }
}

/// Names in a certificate, as the audit trail and the role model want them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertNames {
    pub common_name: Option<String>,
    pub organizational_units: Vec<String>,
    pub san_uris: Vec<String>,
}

pub fn cert_names(der: &[u8]) -> Result<CertNames, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let text = |a: &x509_parser::x509::AttributeTypeAndValue| a.as_str().ok().map(str::to_string);
    let mut names = CertNames {
        common_name: subject.iter_common_name().next().and_then(text),
        organizational_units: subject
            .iter_organizational_unit()
            .filter_map(text)
            .collect(),
        san_uris: Vec::new(),
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                names.san_uris.push(u.to_string());
            }
        }
    }
    Ok(names)
}

/// Write `name.crt` and `name.key` (mode 0600) into `dir`.
pub fn write_pair(dir: &Path, name: &str, pem: &Pem) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let write = |file: String, data: &str, mode: u32| -> Result<(), PkiError> {
        let path = dir.join(file);
        let io = |source| PkiError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(io)?;
        std::io::Write::write_all(&mut f, data.as_bytes()).map_err(io)
    };
    write(format!("{name}.crt"), &pem.cert, 0o644)?;
    write(format!("{name}.key"), &pem.key, 0o600)
}

/// Read `name.crt` and `name.key` from `dir`.
pub fn read_pair(dir: &Path, name: &str) -> Result<Pem, PkiError> {
    let read = |file: String| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|source| PkiError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    Ok(Pem {
        cert: read(format!("{name}.crt"))?,
        key: read(format!("{name}.key"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }

    #[test]
    fn host_and_admin_identities_come_from_the_certificate() {
        let ca = new_ca("test CA", 30).unwrap();
        let host = issue(&ca, &Subject::Host("hv-01".into()), 30, 0).unwrap();
        assert_eq!(
            identity_of(&der(&host.cert)).unwrap(),
            PeerIdentity::Host("hv-01".into())
        );
        let admin = issue(
            &ca,
            &Subject::Admin {
                user: "alice".into(),
                role: "security-admin".into(),
            },
            30,
            0,
        )
        .unwrap();
        assert_eq!(
            identity_of(&der(&admin.cert)).unwrap(),
            PeerIdentity::Admin {
                user: "alice".into(),
                role: "security-admin".into()
            }
        );
        let server = issue(
            &ca,
            &Subject::Controller {
                dns: vec!["localhost".into()],
                ips: vec!["127.0.0.1".parse().unwrap()],
            },
            30,
            0,
        )
        .unwrap();
        assert!(matches!(
            identity_of(&der(&server.cert)),
            Err(PkiError::NoIdentity)
        ));
        assert!(issue(&ca, &Subject::Host("bad/name".into()), 30, 0).is_err());
    }
}
