//! A lab of "VMs" for tests, benchmarks and the demo: each VM is a network namespace whose
//! `eth0` is one end of a veth pair; the other end sits on a Linux bridge in the host
//! namespace and plays the VM's tap, where the datapath attaches.
//!
//! Everything a [`Lab`] creates is removed when it drops — also when a test panics — and
//! leftovers of labs whose process died are removed when the next lab starts. Names carry
//! the owning process id so that concurrent test binaries never collide.
pub mod rules;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("`{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("entering network namespace {netns}: {source}")]
    Setns {
        netns: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Why privileged tests cannot run here, or `None` when they can.
pub fn unprivileged_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (eBPF, network namespaces)".into());
    }
    if !std::path::Path::new("/sys/fs/bpf").exists() {
        return Some("needs bpffs mounted at /sys/fs/bpf".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs iproute2 (`ip`)".into());
    }
    None
}

/// Print a clear skip message and return true when privileged tests cannot run.
pub fn skip(test: &str) -> bool {
    match unprivileged_reason() {
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            true
        }
        None => false,
    }
}

/// Run a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, LabError> {
    let line = format!("{cmd} {}", args.join(" "));
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: line.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: line,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A bridge with namespace VMs on it.
pub struct Lab {
    tag: String,
    pub bridge: String,
    pub vms: Vec<Vm>,
    netns: Vec<String>,
    /// Next interface number: never reused, so names and MACs stay unique in a lab.
    next_if: u8,
}

/// One namespace VM.
#[derive(Clone, Debug)]
pub struct Vm {
    pub name: String,
    pub netns: String,
    /// Host end of the veth pair: the VM's "tap".
    pub host_if: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Lab {
    /// A new, empty lab with its own bridge (bridge netfilter off: iptables rules of the host,
    /// Docker's among them, must not judge the lab's traffic).
    pub fn new() -> Result<Self, LabError> {
        remove_stale();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}.{:x}", std::process::id(), n);
        let lab = Self {
            bridge: format!("bhb{tag}"),
            tag,
            vms: Vec::new(),
            netns: Vec::new(),
            next_if: 1,
        };
        run("ip", &["link", "add", &lab.bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "link",
                "set",
                &lab.bridge,
                "type",
                "bridge",
                "nf_call_iptables",
                "0",
                "nf_call_ip6tables",
                "0",
                "nf_call_arptables",
                "0",
            ],
        )?;
        run("ip", &["link", "set", &lab.bridge, "up"])?;
        Ok(lab)
    }

    /// Turn bridge netfilter on or off (the iptables baseline of the benchmarks needs it on).
    pub fn set_bridge_netfilter(&self, on: bool) -> Result<(), LabError> {
        let v = if on { "1" } else { "0" };
        run(
            "ip",
            &[
                "link",
                "set",
                &self.bridge,
                "type",
                "bridge",
                "nf_call_iptables",
                v,
                "nf_call_ip6tables",
                v,
            ],
        )
        .map(|_| ())
    }

    /// Add a VM named `name` with `10.77.0.{n}/24` and `fd77::{n}/64`, n = its index + 1.
    pub fn add_vm(&mut self, name: &str) -> Result<Vm, LabError> {
        let idx = self.vms.len() as u8 + 1;
        self.add_vm_with(
            name,
            Ipv4Addr::new(10, 77, 0, idx),
            Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, u16::from(idx)),
        )
    }

    pub fn add_vm_with(
        &mut self,
        name: &str,
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
    ) -> Result<Vm, LabError> {
        let idx = self.next_if;
        self.next_if = self.next_if.wrapping_add(1);
        let netns = format!("bhlab-{}-{name}", self.tag);
        let host_if = format!("bhv{}.{idx}", self.tag);
        let pid = std::process::id();
        let mac = [
            0x52,
            0x54,
            pid as u8,
            (pid >> 8) as u8,
            self.tag_byte(),
            idx,
        ];
        let mac_s = bulkhead_abi::model::format_mac(&mac);
        run("ip", &["netns", "add", &netns])?;
        self.netns.push(netns.clone());
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        let v4 = format!("{ipv4}/24");
        let v6 = format!("{ipv6}/64");
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "set", "eth0", "address", &mac_s],
            &["addr", "add", &v4, "dev", "eth0"],
            &["addr", "add", &v6, "dev", "eth0", "nodad"],
            &["link", "set", "eth0", "up"],
        ] {
            let mut a = vec!["-n", &netns];
            a.extend_from_slice(args);
            run("ip", &a)?;
        }
        run("ip", &["link", "set", &host_if, "master", &self.bridge])?;
        run("ip", &["link", "set", &host_if, "up"])?;
        let ifindex = read_ifindex(&host_if)?;
        let vm = Vm {
            name: name.to_string(),
            netns,
            host_if,
            ifindex,
            mac,
            ipv4,
            ipv6,
        };
        self.vms.push(vm.clone());
        Ok(vm)
    }

    /// Remove a VM: its namespace and with it both ends of its veth pair.
    pub fn remove_vm(&mut self, name: &str) -> Result<(), LabError> {
        if let Some(i) = self.vms.iter().position(|v| v.name == name) {
            let vm = self.vms.remove(i);
            run("ip", &["netns", "del", &vm.netns])?;
            self.netns.retain(|n| *n != vm.netns);
        }
        Ok(())
    }

    /// Connect this lab's bridge to another's with a veth pair: two hypervisor hosts on one
    /// physical network. The pair goes when either lab drops.
    pub fn link_to(&mut self, other: &Lab) -> Result<(), LabError> {
        let a = format!("bhv{}.x", self.tag);
        let b = format!("bhv{}.x", other.tag);
        run(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        )?;
        for (end, bridge) in [(&a, &self.bridge), (&b, &other.bridge)] {
            run("ip", &["link", "set", end, "master", bridge])?;
            run("ip", &["link", "set", end, "up"])?;
        }
        Ok(())
    }

    fn tag_byte(&self) -> u8 {
        self.tag
            .bytes()
            .fold(0u8, |a, b| a.wrapping_mul(31).wrapping_add(b))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, and with them the host ends.
        for ns in &self.netns {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
        let _ = run("ip", &["link", "del", &format!("bhv{}.x", self.tag)]);
    }
}

fn read_ifindex(ifname: &str) -> Result<u32, LabError> {
    let path = format!("/sys/class/net/{ifname}/ifindex");
    let s = std::fs::read_to_string(&path).map_err(|source| LabError::Io {
        what: path.clone(),
        source,
    })?;
    s.trim().parse().map_err(|_| LabError::Io {
        what: path,
        source: std::io::Error::other("not a number"),
    })
}

/// Remove namespaces and links left by labs whose process is gone.
fn remove_stale() {
    let dead = |pid_hex: &str| {
        u32::from_str_radix(pid_hex, 16)
            .map(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
            .unwrap_or(false)
    };
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix("bhlab-") {
                if rest.split('.').next().is_some_and(dead) {
                    let _ = run("ip", &["netns", "del", &name]);
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name
                .strip_prefix("bhb")
                .or_else(|| name.strip_prefix("bhv"));
            if rest.and_then(|r| r.split('.').next()).is_some_and(dead) {
                let _ = run("ip", &["link", "del", &name]);
            }
        }
    }
}

impl Vm {
    /// Run `f` on a thread inside this VM's network namespace (sockets it opens live there).
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, LabError> {
        let path = format!("/run/netns/{}", self.netns);
        let netns = self.netns.clone();
        let handle = std::thread::spawn(move || -> Result<T, LabError> {
            let file = File::open(&path).map_err(|source| LabError::Setns {
                netns: netns.clone(),
                source,
            })?;
            // SAFETY: a valid namespace fd; affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(LabError::Setns {
                    netns,
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        });
        handle.join().unwrap_or_else(|_| {
            Err(LabError::Io {
                what: format!("thread in {}", self.netns),
                source: std::io::Error::other("panicked"),
            })
        })
    }

    /// Open a TCP connection from this VM (the stream stays usable from any thread).
    pub fn connect(&self, to: SocketAddr, timeout: Duration) -> Result<TcpStream, LabError> {
        self.enter(move || TcpStream::connect_timeout(&to, timeout))?
            .map_err(|source| LabError::Io {
                what: format!("connect to {to}"),
                source,
            })
    }

    /// Whether a TCP connection to `to` completes and echoes a message within `timeout`.
    pub fn tcp_works(&self, to: SocketAddr, timeout: Duration) -> bool {
        let Ok(mut s) = self.connect(to, timeout) else {
            return false;
        };
        echo_roundtrip(&mut s, timeout)
    }

    /// Whether a UDP datagram to `to` is echoed within `timeout`.
    pub fn udp_works(&self, to: SocketAddr, timeout: Duration) -> bool {
        self.enter(move || -> std::io::Result<bool> {
            let bind: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let s = UdpSocket::bind(bind)?;
            s.set_read_timeout(Some(timeout))?;
            s.send_to(b"bulkhead-probe", to)?;
            let mut buf = [0u8; 64];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok(from == to && &buf[..n] == b"bulkhead-probe")
        })
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or(false)
    }

    /// Send one datagram to `to` on a connected UDP socket and wait up to `timeout` for
    /// an answer: `Ok(true)` if echoed, `Ok(false)` on timeout, `Err` with the error an ICMP
    /// answer raised on the socket (for example "host unreachable").
    pub fn udp_probe(&self, to: SocketAddr, timeout: Duration) -> std::io::Result<bool> {
        self.enter(move || -> std::io::Result<bool> {
            let bind: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let s = UdpSocket::bind(bind)?;
            s.connect(to)?;
            s.set_read_timeout(Some(timeout))?;
            s.send(b"bulkhead-probe")?;
            let mut buf = [0u8; 64];
            match s.recv(&mut buf) {
                Ok(n) => Ok(&buf[..n] == b"bulkhead-probe"),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
        .map_err(std::io::Error::other)?
    }

    /// Whether one ICMP/ICMPv6 echo to `to` is answered within a second.
    pub fn ping(&self, to: IpAddr) -> bool {
        let ns = self.netns.clone();
        let to = to.to_string();
        run(
            "ip",
            &["netns", "exec", &ns, "ping", "-c", "1", "-W", "1", &to],
        )
        .is_ok()
    }

    /// Start TCP and UDP echo servers on `port` (IPv4 and IPv6) inside this VM.
    pub fn serve(&self, port: u16) -> Result<Server, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for any in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let addr = SocketAddr::new(any, port);
            let (tcp, udp) = self
                .enter(move || -> std::io::Result<_> {
                    let tcp = bind_tcp(addr)?;
                    let udp = bind_udp(addr)?;
                    Ok((tcp, udp))
                })?
                .map_err(|source| LabError::Io {
                    what: format!("listen on {addr}"),
                    source,
                })?;
            let s = stop.clone();
            threads.push(std::thread::spawn(move || tcp_echo_loop(tcp, s)));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || udp_echo_loop(udp, s)));
        }
        Ok(Server { stop, threads })
    }
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    // Both families listen on the same port, so the IPv6 socket must be v6-only.
    if addr.is_ipv6() {
        let fd = socket_v6only(libc::SOCK_STREAM)?;
        bind_listen(fd, addr, true)?;
        // SAFETY: fd is a fresh, owned, listening socket.
        return Ok(unsafe { <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    let l = TcpListener::bind(addr)?;
    Ok(l)
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    if addr.is_ipv6() {
        let fd = socket_v6only(libc::SOCK_DGRAM)?;
        bind_listen(fd, addr, false)?;
        // SAFETY: fd is a fresh, owned, bound socket.
        return Ok(unsafe { <UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    UdpSocket::bind(addr)
}

fn socket_v6only(kind: i32) -> std::io::Result<i32> {
    // SAFETY: plain socket syscalls on a fd we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, kind | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        Ok(fd)
    }
}

fn bind_listen(fd: i32, addr: SocketAddr, listen: bool) -> std::io::Result<()> {
    let SocketAddr::V6(a) = addr else {
        return Err(std::io::Error::other("IPv6 only"));
    };
    let sa = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as u16,
        sin6_port: a.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: a.ip().octets(),
        },
        sin6_scope_id: 0,
    };
    // SAFETY: sa is a valid sockaddr_in6 of the given size; fd is ours.
    unsafe {
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        ) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        if listen && libc::listen(fd, 128) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
    }
    Ok(())
}

/// Send a line and expect it back.
pub fn echo_roundtrip(s: &mut TcpStream, timeout: Duration) -> bool {
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let msg = b"bulkhead-probe\n";
    if s.write_all(msg).is_err() {
        return false;
    }
    let mut buf = [0u8; 15];
    s.read_exact(&mut buf).is_ok() && &buf == msg
}

/// Echo servers of one VM; stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_echo_loop(l: TcpListener, stop: Arc<AtomicBool>) {
    // A blocking accept that wakes every 100 ms to look at `stop` (SO_RCVTIMEO applies to
    // accept), so a connection is served the moment it arrives.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: valid option value of the right size on a socket we own.
    unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok((s, _)) = l.accept() else {
            continue;
        };
        let stop = stop.clone();
        conns.retain(|c| !c.is_finished());
        conns.push(std::thread::spawn(move || echo_connection(s, &stop)));
    }
    for c in conns {
        let _ = c.join();
    }
}

fn echo_connection(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
}

fn udp_echo_loop(s: UdpSocket, stop: Arc<AtomicBool>) {
    if s.set_read_timeout(Some(Duration::from_millis(50))).is_err() {
        return;
    }
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
}

/// A bpffs pin directory of a test's own, removed on drop (which unpins its maps and links,
/// detaching the programs), also when the test fails.
pub struct PinRoot(pub std::path::PathBuf);

static PIN_COUNTER: AtomicU32 = AtomicU32::new(0);

impl PinRoot {
    /// Unique per call, also among concurrent tests of one process. Removes first what
    /// processes that are gone left behind (a test or benchmark killed before its drops ran:
    /// pinned maps keep their kernel memory until they are unpinned).
    pub fn new(test: &str) -> Self {
        remove_stale_pins();
        Self(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/bulkhead-test-{test}-{}-{}",
            std::process::id(),
            PIN_COUNTER.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

/// The pid in a pin directory name made by [`PinRoot::new`] (`bulkhead-test-{test}-{pid}-{n}`).
fn pin_dir_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("bulkhead-test-")?;
    let mut fields = rest.rsplitn(3, '-');
    let n = fields.next()?;
    let pid = fields.next()?;
    fields.next()?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn remove_stale_pins() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = pin_dir_pid(&name) {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::pin_dir_pid;

    #[test]
    fn pin_dir_names_give_their_pid() {
        assert_eq!(
            pin_dir_pid("bulkhead-test-bench-netns-17650-0"),
            Some(17650)
        );
        assert_eq!(pin_dir_pid("bulkhead-test-ns-vlan-42-3"), Some(42));
        // Other layouts (the verdict tests' own `bulkhead-test-{name}-{pid}`) are left alone.
        assert_eq!(pin_dir_pid("bulkhead-test-rejudge-12345"), None);
        assert_eq!(pin_dir_pid("bulkhead-7-1"), None);
        assert_eq!(pin_dir_pid("bulkhead-test-x-y-z"), None);
    }
}
