//! The gRPC services. TLS has already verified the client certificate against the CA; here
//! the certificate's Bulkhead identity decides what the caller may do.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bulkhead_wire::pb;
use bulkhead_wire::pki::{identity_of, PeerIdentity};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use bulkhead_audit::record::Event;
use bulkhead_audit::roles::{principal_from_cert, Role};

use crate::{unix_now, Controller};

fn leaf_der<T>(req: &Request<T>) -> Option<Vec<u8>> {
    req.peer_certs()?.first().map(|c| c.as_ref().to_vec())
}

fn peer_identity<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    identity_of(leaf.as_ref()).map_err(|e| Status::permission_denied(e.to_string()))
}

pub struct EnforcementService(pub Arc<Controller>);
pub struct AdminService(pub Arc<Controller>);

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::enforcement_server::Enforcement for EnforcementService {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let ctl = self.0.clone();
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let subject = leaf_der(&req)
            .map(|d| crate::audit::cert_identity(&d))
            .unwrap_or_default();
        let host = match peer_identity(&req) {
            Ok(PeerIdentity::Host(h)) => h,
            other => {
                let error = match other {
                    Ok(PeerIdentity::Admin { user, .. }) => {
                        format!("{user} holds an administrator certificate, not a host certificate")
                    }
                    Err(s) => s.message().to_string(),
                    Ok(PeerIdentity::Host(_)) => String::new(),
                };
                if let Some(a) = &ctl.audit {
                    a.record(Event::AgentCertFailure {
                        peer,
                        cert_subject: subject.common_name.clone(),
                        error: error.clone(),
                    });
                }
                return Err(Status::permission_denied(error));
            }
        };
        if let Some(a) = &ctl.audit {
            a.record(Event::AgentConnected {
                host: host.clone(),
                peer: peer.clone(),
                cert_subject: subject.common_name.clone().unwrap_or_default(),
            });
        }
        let session = {
            let mut st = ctl.state();
            let h = st.hosts.entry(host.clone()).or_default();
            h.session += 1;
            h.connected = true;
            h.connected_since = unix_now();
            h.session
        };
        ctl.metrics.sessions.inc();
        tracing::info!(%host, session, "agent connected");
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(run_session(ctl, host, session, peer, req.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One agent's stream: read its messages, push its tables when they change.
async fn run_session(
    ctl: Arc<Controller>,
    host: String,
    session: u64,
    peer: String,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: mpsc::Sender<Result<pb::ControllerMessage, Status>>,
) {
    let mut serving = ctl.serving_tx.subscribe();
    // What the agent holds: from its hello, then from its acks.
    let mut held = String::new();
    let mut sent = String::new();
    let mut sent_at: Option<(String, Instant)> = None;
    let mut need_snapshot = false;
    loop {
        // Push if what the host should enforce differs from what we last sent it.
        if let Some((revision, want, detected)) = ctl.desired(&host) {
            if want.digests.tables != sent && want.digests.tables != held || need_snapshot {
                // The agent applies messages in order: what it holds once the last message is
                // applied is what we sent (a failed apply comes back as a resync request).
                let base_digest = if sent.is_empty() {
                    held.clone()
                } else {
                    sent.clone()
                };
                let base = (!need_snapshot && !base_digest.is_empty())
                    .then(|| ctl.known(&host, &base_digest))
                    .flatten();
                // Building a message is CPU work over the whole tables: keep it off the
                // threads that drive the other sessions' I/O.
                let msg = tokio::task::block_in_place(|| match base {
                    Some(base) => {
                        ctl.metrics.deltas.inc();
                        pb::controller_message::Kind::Delta(bulkhead_wire::delta_with_digests(
                            &base,
                            &base_digest,
                            &want.tables,
                            &want.digests.tables,
                            revision,
                        ))
                    }
                    None => {
                        ctl.metrics.snapshots.inc();
                        pb::controller_message::Kind::Snapshot(pb::Snapshot {
                            revision: Some(revision),
                            digest: want.digests.tables.clone(),
                            tables: Some(bulkhead_wire::tables_to_pb(&want.tables)),
                        })
                    }
                });
                if tx
                    .send(Ok(pb::ControllerMessage { kind: Some(msg) }))
                    .await
                    .is_err()
                {
                    break;
                }
                need_snapshot = false;
                sent = want.digests.tables.clone();
                sent_at = Some((want.digests.tables, detected));
            }
        }
        tokio::select! {
            changed = serving.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            msg = inbound.next() => {
                let Some(Ok(msg)) = msg else { break };
                match msg.kind {
                    Some(pb::agent_message::Kind::Hello(h)) => {
                        tracing::info!(%host, version = %h.agent_version, enforced = %h.enforced_digest, "hello");
                        held = h.enforced_digest;
                        let mut st = ctl.state();
                        let hs = st.hosts.entry(host.clone()).or_default();
                        if hs.enforced_digest != held {
                            hs.enforced_digest = held.clone();
                            hs.enforced_since = unix_now();
                        }
                    }
                    Some(pb::agent_message::Kind::Inventory(inv)) => {
                        ctl.set_inventory(&host, inv.vms);
                    }
                    Some(pb::agent_message::Kind::Ack(ack)) => {
                        on_ack(&ctl, &host, &ack, &sent_at);
                        if ack.ok {
                            held = ack.digest;
                        } else {
                            // Resend whole: the agent keeps its old tables meanwhile.
                            need_snapshot = ack.resync;
                            sent.clear();
                        }
                    }
                    Some(pb::agent_message::Kind::Events(ev)) => {
                        ctl.metrics.flow_records.inc_by(ev.records.len() as u64);
                        ctl.metrics.events_suppressed.inc_by(ev.suppressed);
                        if let Some(a) = &ctl.audit {
                            a.flows(&host, &ev);
                            a.alerts(&host, &ev.alerts);
                        }
                    }
                    Some(pb::agent_message::Kind::Report(r)) => {
                        ctl.host_report(&host, r);
                    }
                    None => {}
                }
            }
        }
    }
    {
        let mut st = ctl.state();
        if let Some(h) = st.hosts.get_mut(&host) {
            // A newer session of the same host may already be up.
            if h.session == session {
                h.connected = false;
                h.connected_since = unix_now();
            }
        }
    }
    if let Some(a) = &ctl.audit {
        a.record(Event::AgentDisconnected {
            host: host.clone(),
            peer,
            reason: "stream ended".into(),
        });
    }
    tracing::info!(%host, session, "agent disconnected");
}

fn on_ack(ctl: &Controller, host: &str, ack: &pb::Ack, sent_at: &Option<(String, Instant)>) {
    let mut st = ctl.state();
    let commit = st
        .serving
        .as_ref()
        .filter(|s| {
            s.hosts
                .get(host)
                .is_some_and(|t| t.digests.tables == ack.digest)
        })
        .map(|s| s.revision.commit.clone());
    let h = st.hosts.entry(host.to_string()).or_default();
    if ack.ok {
        if h.enforced_digest != ack.digest {
            h.enforced_since = unix_now();
            if let Some(a) = &ctl.audit {
                a.submit(vec![Event::PolicyEnforced {
                    commit: commit.clone().unwrap_or_default(),
                    host: host.to_string(),
                    enforced_at: crate::audit::rfc3339(h.enforced_since),
                    epoch: 0,
                }]);
            }
        }
        if ack.unbound != h.unbound {
            if let Some(a) = &ctl.audit {
                a.submit(
                    ack.unbound
                        .iter()
                        .map(|e| Event::InterfaceUnenforced {
                            vm: e.split('/').next().unwrap_or("").to_string(),
                            host: host.to_string(),
                            interface: e.clone(),
                            reason: "the compiled tables name it, the host has no such interface"
                                .into(),
                        })
                        .collect(),
                );
            }
        }
        h.enforced_digest = ack.digest.clone();
        if let Some(c) = commit {
            h.enforced_commit = c;
        }
        h.last_error.clear();
        h.unbound = ack.unbound.clone();
        if let Some((d, detected)) = sent_at {
            if *d == ack.digest {
                ctl.metrics
                    .commit_to_enforced_seconds
                    .observe(detected.elapsed().as_secs_f64());
            }
        }
        tracing::info!(%host, digest = %&ack.digest[..ack.digest.len().min(12)], micros = ack.apply_micros, "enforcing");
    } else {
        h.last_error = ack.error.clone();
        tracing::error!(%host, error = %ack.error, "agent could not apply");
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn evidence(
        &self,
        req: Request<pb::EvidenceRequest>,
    ) -> Result<Response<pb::EvidenceReply>, Status> {
        crate::evidence::evidence_rpc(self.0.clone(), req).await
    }

    async fn audit_settings(
        &self,
        req: Request<pb::AuditSettingsRequest>,
    ) -> Result<Response<pb::AuditSettingsReply>, Status> {
        crate::evidence::audit_settings_rpc(self.0.clone(), req).await
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let ctl = &self.0;
        let source = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let id = leaf_der(&req)
            .map(|d| crate::audit::cert_identity(&d))
            .unwrap_or_default();
        // Status is operations data: system and security administrators read it; the audit
        // administrator reads the audit trail and nothing else (MLPS 8.1.5).
        let principal = principal_from_cert(&id);
        let allowed = matches!(&principal, Ok(p) if p.role != Role::AuditAdmin);
        if let Some(a) = &ctl.audit {
            a.record(Event::AdminAction {
                user: principal
                    .as_ref()
                    .map(|p| p.user.clone())
                    .unwrap_or_else(|_| id.common_name.clone().unwrap_or_default()),
                role: principal.as_ref().ok().map(|p| p.role),
                source,
                operation: "status_read".into(),
                object: "controller".into(),
                before: None,
                after: None,
                success: allowed,
                reason: match &principal {
                    Err(r) => Some(format!("refused: {r}")),
                    Ok(p) if !allowed => {
                        Some(format!("refused: role {} may not read status", p.role))
                    }
                    Ok(_) => None,
                },
            });
        }
        match principal {
            Ok(_) if allowed => Ok(Response::new(ctl.status())),
            Ok(p) => Err(Status::permission_denied(format!(
                "role {} may not read controller status",
                p.role
            ))),
            Err(r) => Err(Status::permission_denied(r.to_string())),
        }
    }
}
