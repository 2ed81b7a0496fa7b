//! End-to-end harness: a real git repository of policies, a PKI, the controller and one agent
//! per "hypervisor host" as real processes, each host a bridge of namespace VMs.
//!
//! Everything is removed on drop: processes are killed, pins and namespaces deleted.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_testbed::{Lab, PinRoot, Vm};
use bulkhead_wire::pb;
use bulkhead_wire::pki::{self, Pem, Subject};

/// A built binary of this workspace, next to the test executable's `deps/` directory.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("test executable without a directory")?;
    // Tests run from target/<profile>/deps, examples from target/<profile>/examples.
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir = dir.parent().context("deps without a parent")?;
    }
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not built; run `cargo build -p bulkhead-agent -p bulkhead-controller -p bulkhead-cli` first",
            p.display()
        );
    }
    Ok(p)
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A child process, killed (SIGKILL) on drop; its output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, bin: &Path, args: &[String], log: PathBuf) -> Result<Self> {
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            name: name.into(),
            child: Some(child),
            log,
        })
    }

    /// SIGKILL and reap: no chance to clean anything up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A policy repository in a temporary directory, committed to with `git`.
pub struct PolicyRepo {
    pub dir: PathBuf,
}

impl PolicyRepo {
    /// A new repository holding a copy of `policies` (a directory) under `policies/`.
    pub fn new(root: &Path, policies: &Path) -> Result<Self> {
        let dir = root.join("policy-repo");
        std::fs::create_dir_all(dir.join("policies"))?;
        copy_dir(policies, &dir.join("policies"))?;
        let r = Self { dir };
        r.git(&["init", "-q", "-b", "main"])?;
        r.git(&["add", "-A"])?;
        r.git(&["commit", "-q", "-m", "Initial policies"])?;
        Ok(r)
    }

    pub fn git(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "Security Admin")
            .env("GIT_AUTHOR_EMAIL", "secadmin@hospital.example")
            .env("GIT_COMMITTER_NAME", "Security Admin")
            .env("GIT_COMMITTER_EMAIL", "secadmin@hospital.example")
            .output()?;
        if !out.status.success() {
            bail!(
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Write `path` (relative to the repository) and commit it; returns the commit id.
    pub fn commit_file(&self, path: &str, content: &str, message: &str) -> Result<String> {
        let p = self.dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, content)?;
        self.git(&["add", "-A"])?;
        self.git(&["commit", "-q", "-m", message])?;
        self.git(&["rev-parse", "HEAD"])
    }

    pub fn head(&self) -> Result<String> {
        self.git(&["rev-parse", "HEAD"])
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// The CA, the controller's certificate, and certificates per host and admin.
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: Pem,
}

impl TestPki {
    pub fn new(root: &Path) -> Result<Self> {
        let dir = root.join("pki");
        let ca = pki::new_ca("Bulkhead test CA", 30)?;
        pki::write_pair(&dir, "ca", &ca)?;
        let server = pki::issue(
            &ca,
            &Subject::Controller {
                dns: vec!["localhost".into()],
                ips: vec!["127.0.0.1".parse()?],
            },
            30,
            0,
        )?;
        pki::write_pair(&dir, "controller", &server)?;
        Ok(Self { dir, ca })
    }

    /// A directory an agent can use as `--pki` (ca.crt, host.crt, host.key).
    pub fn host_dir(&self, host: &str, days: i64, not_before_days: i64) -> Result<PathBuf> {
        let d = self
            .dir
            .join(format!("host-{host}-{days}-{not_before_days}"));
        let cert = pki::issue(&self.ca, &Subject::Host(host.into()), days, not_before_days)?;
        pki::write_pair(&d, "host", &cert)?;
        std::fs::write(d.join("ca.crt"), &self.ca.cert)?;
        Ok(d)
    }

    /// An administrator certificate; the account's role is registered in the PKI directory's
    /// role registry, as `bulkhead-controller pki admin` does (a second role is refused).
    pub fn admin(&self, user: &str, role: &str) -> Result<Pem> {
        let registry = self.dir.join("roles.json");
        let mut roles = bulkhead_audit::roles::RoleAssignments::load(&registry)?;
        let r = bulkhead_audit::roles::Role::parse(role).context("unknown role")?;
        roles
            .assign(user, r)
            .map_err(|e| anyhow::anyhow!("{user}: {e}"))?;
        roles.save(&registry)?;
        Ok(pki::issue(
            &self.ca,
            &Subject::Admin {
                user: user.into(),
                role: role.into(),
            },
            30,
            0,
        )?)
    }
}

/// A hypervisor host: a bridge of namespace VMs and (when started) its agent.
pub struct Host {
    pub name: String,
    pub lab: Lab,
    pub agent: Option<Proc>,
    pub pins: PinRoot,
    pub state_dir: PathBuf,
    pub inventory: PathBuf,
    pub metrics_port: u16,
    /// VM name → labels, for the inventory file.
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
    /// VMs in the inventory whose tap device does not exist (name, device, MAC, address).
    pub phantoms: Vec<(String, String, String, String)>,
}

#[derive(serde::Serialize)]
struct InvFile {
    vms: Vec<InvVm>,
}

#[derive(serde::Serialize)]
struct InvVm {
    name: String,
    uuid: String,
    labels: BTreeMap<String, String>,
    interfaces: Vec<InvIface>,
}

#[derive(serde::Serialize)]
struct InvIface {
    device: String,
    mac: String,
    addresses: Vec<String>,
}

impl Host {
    pub fn new(root: &Path, name: &str) -> Result<Self> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            name: name.into(),
            lab: Lab::new()?,
            agent: None,
            pins: PinRoot::new(&format!("e2e-{name}")),
            state_dir: dir.join("state"),
            inventory: dir.join("inventory.yaml"),
            metrics_port: free_port()?,
            labels: BTreeMap::new(),
            phantoms: Vec::new(),
        })
    }

    /// Add a VM with addresses `10.77.0.{n}` / `fd77::{n}` and labels.
    pub fn add_vm(&mut self, name: &str, n: u8, labels: &[(&str, &str)]) -> Result<Vm> {
        let vm = self.lab.add_vm_with(
            name,
            Ipv4Addr::new(10, 77, 0, n),
            Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, u16::from(n)),
        )?;
        self.labels.insert(
            name.into(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        self.write_inventory()?;
        Ok(vm)
    }

    /// Put a VM into the inventory whose tap device does not exist on this host (defined but
    /// not plugged in): its interface cannot be enforced.
    pub fn add_phantom_vm(
        &mut self,
        name: &str,
        device: &str,
        mac: &str,
        ip: &str,
        labels: &[(&str, &str)],
    ) -> Result<()> {
        self.labels.insert(
            name.into(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        self.phantoms
            .push((name.into(), device.into(), mac.into(), ip.into()));
        self.write_inventory()
    }

    /// Forget a VM (it migrated away): its interface leaves this host's inventory.
    pub fn remove_vm_from_inventory(&mut self, name: &str) -> Result<()> {
        self.labels.remove(name);
        self.write_inventory()
    }

    pub fn write_inventory(&self) -> Result<()> {
        let mut vms: Vec<InvVm> = self
            .lab
            .vms
            .iter()
            .filter(|v| self.labels.contains_key(&v.name))
            .map(|v| InvVm {
                name: v.name.clone(),
                uuid: format!("00000000-0000-4000-8000-{:012x}", u64::from(v.ifindex)),
                labels: self.labels[&v.name].clone(),
                interfaces: vec![InvIface {
                    device: v.host_if.clone(),
                    mac: bulkhead_abi::model::format_mac(&v.mac),
                    addresses: vec![v.ipv4.to_string(), v.ipv6.to_string()],
                }],
            })
            .collect();
        vms.extend(self.phantoms.iter().map(|(name, device, mac, ip)| InvVm {
            name: name.clone(),
            uuid: format!("00000000-0000-4000-9000-{:012x}", vms_len_hash(name)),
            labels: self.labels.get(name).cloned().unwrap_or_default(),
            interfaces: vec![InvIface {
                device: device.clone(),
                mac: mac.clone(),
                addresses: vec![ip.clone()],
            }],
        }));
        let text = serde_yaml::to_string(&InvFile { vms })?;
        let tmp = self.inventory.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.inventory)?;
        Ok(())
    }

    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.lab.vms.iter().find(|v| v.name == name)
    }

    /// Start (or restart) this host's agent.
    pub fn start_agent(&mut self, root: &Path, controller: u16, pki_dir: &Path) -> Result<()> {
        let args = vec![
            "--controller".into(),
            format!("https://127.0.0.1:{controller}"),
            "--server-name".into(),
            "localhost".into(),
            "--pki".into(),
            pki_dir.display().to_string(),
            "--inventory".into(),
            self.inventory.display().to_string(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--pin-root".into(),
            self.pins.0.display().to_string(),
            "--metrics".into(),
            format!("127.0.0.1:{}", self.metrics_port),
            "--rescan-secs".into(),
            "0.5".into(),
        ];
        let log = root.join(format!("agent-{}.log", self.name));
        self.agent = Some(Proc::spawn(
            &format!("agent-{}", self.name),
            &bin_path("bulkhead-agent")?,
            &args,
            log,
        )?);
        Ok(())
    }

    pub fn metrics(&self) -> Result<String> {
        http_get(self.metrics_port, "/metrics")
    }
}

fn vms_len_hash(name: &str) -> u64 {
    name.bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        & 0xffff_ffff_ffff
}

/// A minimal HTTP GET on loopback (for `/metrics`).
pub fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(body)
}

/// Where a test controller keeps its audit trail.
pub fn audit_dir(root: &Path) -> PathBuf {
    root.join("audit")
}

/// Every audit record of a test controller, in order.
pub fn audit_records(root: &Path) -> Result<Vec<bulkhead_audit::Record>> {
    let mut out = Vec::new();
    bulkhead_audit::export::for_each_record(&audit_dir(root), 0, |r, _| {
        out.push(r.clone());
        Ok(true)
    })?;
    Ok(out)
}

pub struct ControllerProc {
    pub proc: Proc,
    pub port: u16,
    pub metrics_port: u16,
}

impl ControllerProc {
    pub fn start(root: &Path, repo: &Path, pki_dir: &Path) -> Result<Self> {
        Self::start_on(root, repo, pki_dir, free_port()?)
    }

    pub fn start_on(root: &Path, repo: &Path, pki_dir: &Path, port: u16) -> Result<Self> {
        let metrics_port = free_port()?;
        let args = vec![
            "serve".into(),
            "--repo".into(),
            repo.display().to_string(),
            "--rev".into(),
            "main".into(),
            "--poll-ms".into(),
            "100".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--pki".into(),
            pki_dir.display().to_string(),
            "--metrics".into(),
            format!("127.0.0.1:{metrics_port}"),
            "--audit-dir".into(),
            audit_dir(root).display().to_string(),
        ];
        let proc = Proc::spawn(
            "controller",
            &bin_path("bulkhead-controller")?,
            &args,
            root.join("controller.log"),
        )?;
        let c = Self {
            proc,
            port,
            metrics_port,
        };
        if !wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }) {
            bail!("controller did not start:\n{}", c.proc.log_text());
        }
        Ok(c)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// Ask the controller for its status with an administrator certificate.
pub async fn status(port: u16, ca: &Pem, admin: &Pem) -> Result<pb::StatusReply> {
    let ch = bulkhead_wire::connect(
        &format!("https://127.0.0.1:{port}"),
        "localhost",
        &ca.cert,
        &admin.cert,
        &admin.key,
    )
    .await?;
    let mut c = pb::admin_client::AdminClient::new(ch);
    Ok(c.status(pb::StatusRequest {}).await?.into_inner())
}

/// The controller's live compliance evidence (`Admin.Evidence`), with an administrator
/// certificate (only the audit administrator's is accepted).
pub async fn evidence(
    port: u16,
    ca: &Pem,
    admin: &Pem,
    include_store: bool,
) -> Result<bulkhead_audit::report::Evidence, tonic::Status> {
    let ch = bulkhead_wire::connect(
        &format!("https://127.0.0.1:{port}"),
        "localhost",
        &ca.cert,
        &admin.cert,
        &admin.key,
    )
    .await
    .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let mut c = pb::admin_client::AdminClient::new(ch);
    let json = c
        .evidence(pb::EvidenceRequest { include_store })
        .await?
        .into_inner()
        .evidence_json;
    serde_json::from_str(&json).map_err(|e| tonic::Status::internal(e.to_string()))
}

/// Blocking wrapper around [`evidence`].
pub fn evidence_blocking(
    port: u16,
    ca: &Pem,
    admin: &Pem,
    include_store: bool,
) -> Result<bulkhead_audit::report::Evidence, tonic::Status> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .block_on(evidence(port, ca, admin, include_store))
}

/// Blocking wrapper around [`status`].
pub fn status_blocking(port: u16, ca: &Pem, admin: &Pem) -> Result<pb::StatusReply> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(status(port, ca, admin))
}

/// The example's security-tier policy file.
pub const SECURITY_POLICY: &str = "policies/30-security.yaml";

/// Ports every cluster VM serves (TCP and UDP echo): postgres, ssh, https.
pub const SERVED_PORTS: [u16; 3] = [5432, 22, 443];

/// A VM of the standard cluster: name, host index, address byte, labels.
pub type Labels = &'static [(&'static str, &'static str)];

pub const CLUSTER_VMS: [(&str, usize, u8, Labels); 5] = [
    (
        "emr-app",
        0,
        21,
        &[("app", "emr"), ("role", "app"), ("env", "prod")],
    ),
    (
        "pacs-1",
        0,
        31,
        &[("app", "pacs"), ("role", "app"), ("env", "prod")],
    ),
    ("jump-1", 0, 61, &[("role", "jump"), ("env", "prod")]),
    (
        "emr-db",
        1,
        22,
        &[("app", "emr"), ("role", "db"), ("env", "prod")],
    ),
    (
        "his-app",
        1,
        11,
        &[("app", "his"), ("role", "app"), ("env", "prod")],
    ),
];

/// Two hypervisor hosts (bridges linked like hosts on one network), the controller on a
/// git repository holding the example `policies/`, one agent per host.
pub struct Cluster {
    // Drop order: agents and controller first (fields drop in order), then hosts, then files.
    pub controller: Option<ControllerProc>,
    pub servers: Vec<bulkhead_testbed::Server>,
    pub hosts: Vec<Host>,
    pub repo: PolicyRepo,
    pub pki: TestPki,
    pub admin: Pem,
    pub root: tempfile::TempDir,
}

pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

impl Cluster {
    /// Build everything and wait until both hosts enforce the repository's head.
    pub fn start() -> Result<Self> {
        let root = tempfile::tempdir()?;
        let pki = TestPki::new(root.path())?;
        let admin = pki.admin("alice", "security-admin")?;
        let repo = PolicyRepo::new(root.path(), &workspace_dir().join("policies"))?;
        let mut hosts = vec![
            Host::new(root.path(), "hv1")?,
            Host::new(root.path(), "hv2")?,
        ];
        let (a, b) = hosts.split_at_mut(1);
        a[0].lab.link_to(&b[0].lab)?;
        let mut servers = Vec::new();
        for (name, h, n, labels) in CLUSTER_VMS {
            let vm = hosts[h].add_vm(name, n, labels)?;
            for port in SERVED_PORTS {
                servers.push(vm.serve(port)?);
            }
        }
        let controller = ControllerProc::start(root.path(), &repo.dir, &pki.dir)?;
        let mut c = Self {
            controller: Some(controller),
            servers,
            hosts,
            repo,
            pki,
            admin,
            root,
        };
        for i in 0..c.hosts.len() {
            c.start_agent(i)?;
        }
        c.wait_enforced(&c.repo.head()?, Duration::from_secs(30))?;
        Ok(c)
    }

    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let port = self.controller.as_ref().map_or(1, |c| c.port);
        let name = self.hosts[i].name.clone();
        let dir = self.pki.host_dir(&name, 30, 0)?;
        let root = self.root.path().to_path_buf();
        self.hosts[i].start_agent(&root, port, &dir)
    }

    pub fn status(&self) -> Result<pb::StatusReply> {
        let port = self.controller.as_ref().context("controller stopped")?.port;
        status_blocking(port, &self.pki.ca, &self.admin)
    }

    /// Wait until every host acknowledges tables of `commit`; returns how long it took.
    pub fn wait_enforced(&self, commit: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let mut last = None;
        let ok = wait_until(timeout, || match self.status() {
            Ok(s) => {
                let done = s.hosts.len() == self.hosts.len()
                    && s.hosts.iter().all(|h| {
                        h.enforced_commit == commit
                            && !h.enforced_digest.is_empty()
                            && h.enforced_digest == h.desired_digest
                    });
                last = Some(s);
                done
            }
            Err(_) => false,
        });
        if !ok {
            bail!(
                "commit {commit} not enforced everywhere within {timeout:?}; last status {last:#?}\n{}",
                self.logs()
            );
        }
        Ok(start.elapsed())
    }

    pub fn vm(&self, name: &str) -> Vm {
        self.hosts
            .iter()
            .find_map(|h| h.vm(name))
            .cloned()
            .unwrap_or_else(|| panic!("no VM {name}"))
    }

    /// Whether a TCP connection from VM `from` to VM `to` on `port` works.
    pub fn reach(&self, from: &str, to: &str, port: u16) -> bool {
        let to = self.vm(to);
        self.vm(from).tcp_works(
            SocketAddr::new(std::net::IpAddr::V4(to.ipv4), port),
            Duration::from_millis(700),
        )
    }

    /// Assert that `from` reaches `to:port`; on failure the message says whether a second
    /// attempt got through (a slow machine) or not (a verdict), with the components' logs.
    pub fn assert_reach(&self, from: &str, to: &str, port: u16, what: &str) {
        if self.reach(from, to, port) {
            return;
        }
        let retry = if self.reach(from, to, port) {
            "a second attempt got through"
        } else {
            "a second attempt failed too"
        };
        panic!(
            "{what}: {from} → {to}:{port} not reached within 700 ms ({retry})\n{}",
            self.logs()
        );
    }

    /// Commit the example policy without the jump host's SSH/RDP rule (`sec-ssh-from-jump`);
    /// returns the commit id. The change the demo and the tests make.
    pub fn commit_revoke_jump_ssh(&self) -> Result<String> {
        let text = std::fs::read_to_string(self.repo.dir.join(SECURITY_POLICY))?;
        let start = text
            .find("      - id: sec-ssh-from-jump")
            .context("rule sec-ssh-from-jump not in the example")?;
        let end = text[start..]
            .find("      - id: sec-ssh-from-elsewhere")
            .context("rule sec-ssh-from-elsewhere not in the example")?
            + start;
        let changed = format!("{}{}", &text[..start], &text[end..]);
        self.repo.commit_file(
            SECURITY_POLICY,
            &changed,
            "Revoke jump-host SSH/RDP (change CHG-2211)",
        )
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Some(c) = &self.controller {
            out += &format!("--- controller\n{}\n", tail(&c.proc.log_text()));
        }
        for h in &self.hosts {
            if let Some(a) = &h.agent {
                out += &format!("--- agent {}\n{}\n", h.name, tail(&a.log_text()));
            }
        }
        out
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
