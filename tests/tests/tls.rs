//! Mutual TLS and identities against a real controller process: agents with a wrong, expired
//! or missing certificate are refused; hosts cannot use the admin API nor admins pose as hosts.
use std::time::Duration;

use bulkhead_e2e::{workspace_dir, ControllerProc, PolicyRepo, TestPki};
use bulkhead_wire::pb;
use bulkhead_wire::pki::{self, Subject};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Open a Sync stream as the holder of `cert`; Ok if the controller accepts it.
async fn sync_as(port: u16, ca: &str, cert: &pki::Pem) -> Result<(), String> {
    let ch = bulkhead_wire::connect(
        &format!("https://127.0.0.1:{port}"),
        "localhost",
        ca,
        &cert.cert,
        &cert.key,
    )
    .await
    .map_err(|e| format!("connect: {e}"))?;
    let mut c = pb::enforcement_client::EnforcementClient::new(ch);
    let hello = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello::default())),
    };
    let mut stream = c
        .sync(tokio_stream::iter(vec![hello]))
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    // The controller answers nothing until it knows our inventory; a refused stream ends.
    match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
        _ => Ok(()),
    }
}

#[test]
fn certificates_decide_who_may_do_what() {
    let bins = bulkhead_e2e::bin_path("bulkhead-controller");
    if let Err(e) = bins {
        eprintln!("SKIPPED certificates_decide_who_may_do_what: {e}");
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(root.path()).expect("pki");
    let repo = PolicyRepo::new(root.path(), &workspace_dir().join("policies")).expect("repo");
    let ctl = ControllerProc::start(root.path(), &repo.dir, &pki.dir).expect("controller");
    let rt = rt();
    let ca = pki.ca.cert.clone();
    let host = pki::issue(&pki.ca, &Subject::Host("hv1".into()), 30, 0).expect("cert");
    assert_eq!(
        rt.block_on(sync_as(ctl.port, &ca, &host)),
        Ok(()),
        "a valid host is served"
    );

    let expired = pki::issue(&pki.ca, &Subject::Host("hv1".into()), -1, -10).expect("cert");
    let e = rt
        .block_on(sync_as(ctl.port, &ca, &expired))
        .expect_err("expired refused");
    eprintln!("expired: {e}");

    let other_ca = pki::new_ca("someone else", 30).expect("ca");
    let foreign = pki::issue(&other_ca, &Subject::Host("hv1".into()), 30, 0).expect("cert");
    let e = rt
        .block_on(sync_as(ctl.port, &ca, &foreign))
        .expect_err("foreign CA refused");
    eprintln!("foreign CA: {e}");

    // No client certificate at all.
    let no_cert = rt.block_on(async {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .domain_name("localhost");
        let ch = Endpoint::from_shared(format!("https://127.0.0.1:{}", ctl.port))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await;
        match ch {
            Err(e) => Err(e.to_string()),
            Ok(ch) => pb::admin_client::AdminClient::new(ch)
                .status(pb::StatusRequest {})
                .await
                .map(|_| ())
                .map_err(|s| s.to_string()),
        }
    });
    assert!(
        no_cert.is_err(),
        "a client without a certificate is refused"
    );

    // An administrator cannot pose as a host; a host cannot use the admin API.
    let admin = pki.admin("alice", "security-admin").expect("admin");
    let e = rt
        .block_on(sync_as(ctl.port, &ca, &admin))
        .expect_err("admin as host refused");
    assert!(
        e.contains("PermissionDenied") || e.contains("permission"),
        "{e}"
    );
    let as_host = rt.block_on(async {
        let ch = bulkhead_wire::connect(
            &format!("https://127.0.0.1:{}", ctl.port),
            "localhost",
            &ca,
            &host.cert,
            &host.key,
        )
        .await
        .expect("connect");
        pb::admin_client::AdminClient::new(ch)
            .status(pb::StatusRequest {})
            .await
    });
    assert_eq!(
        as_host.expect_err("host on admin API").code(),
        tonic::Code::PermissionDenied
    );
    // The audit administrator reads the audit trail and nothing else (MLPS 8.1.5).
    let auditor = pki.admin("carol", "audit-admin").expect("auditor");
    assert!(bulkhead_e2e::status_blocking(ctl.port, &pki.ca, &auditor).is_err());
    let status = bulkhead_e2e::status_blocking(ctl.port, &pki.ca, &admin).expect("admin status");
    assert_eq!(
        status.hosts.len(),
        1,
        "only the valid host registered: {status:?}"
    );
}
