//! Attaching the programs to VM interfaces with pinned TCX links.
//!
//! Links are pinned under `pin_root/links/{ifindex}-{hook}`, outside the layout-versioned
//! map directory, so that any later loader (this version or another) finds them and swaps
//! its own program in with `bpf_link_update`: the interface is never without a program,
//! not even for one packet, across restarts and upgrades.
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, SchedClassifierLinkId};
use aya::programs::{LinkOrder, SchedClassifier, TcAttach, TcAttachType};

use crate::{DatapathError, Hook};

/// How an interface's hook came to run this loader's program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    /// A pinned link of an earlier loader was updated in place to this program.
    Replaced,
    /// No live link existed: a new link was created and pinned.
    Created,
}

impl Hook {
    fn attach_type(self) -> TcAttachType {
        match self {
            // What the VM sends arrives at the host side of its tap as received traffic.
            Hook::FromVm | Hook::BenchBaseline => TcAttachType::Ingress,
            Hook::ToVm => TcAttachType::Egress,
        }
    }
}

/// Directory of the pinned links.
pub(crate) fn links_dir(pin_root: &Path) -> PathBuf {
    pin_root.join("links")
}

pub(crate) fn link_pin(pin_root: &Path, ifindex: u32, hook: Hook) -> PathBuf {
    links_dir(pin_root).join(format!("{ifindex}-{}", hook.program_name()))
}

/// Attach `prog` at `hook` of `ifindex`, replacing the program of a live pinned link
/// atomically, or creating and pinning a new link.
pub(crate) fn attach_hook(
    prog: &mut SchedClassifier,
    pin_root: &Path,
    ifindex: u32,
    hook: Hook,
) -> Result<AttachOutcome, DatapathError> {
    let name = hook.program_name();
    let prog_err = |source| DatapathError::Program { name, source };
    let pin = link_pin(pin_root, ifindex, hook);
    if pin.exists() {
        if let Some(link) = live_link(&pin)? {
            match prog.attach_to_link(link) {
                Ok(id) => {
                    // The link stays pinned; drop our handle without detaching it.
                    let link = prog.take_link(id).map_err(prog_err)?;
                    drop(FdLink::try_from(link).map_err(|e| DatapathError::Link {
                        path: pin.clone(),
                        source: e,
                    })?);
                    return Ok(AttachOutcome::Replaced);
                }
                // ENOLINK: the interface behind the link is gone (its ifindex was reused).
                Err(e) => tracing::info!(path = %pin.display(), error = %e, "stale link replaced"),
            }
        }
        remove_pin(&pin)?;
    }
    std::fs::create_dir_all(links_dir(pin_root)).map_err(|source| DatapathError::PinDir {
        path: links_dir(pin_root),
        source,
    })?;
    let id = prog
        .attach(
            ifindex,
            TcAttach::Tcx {
                attach_type: hook.attach_type(),
                // First at the hook: nothing else on the host sees a VM's packet before policy.
                order: LinkOrder::first(),
            },
        )
        .map_err(prog_err)?;
    let link = prog.take_link(id).map_err(prog_err)?;
    let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
        path: pin.clone(),
        source,
    })?;
    fd_link
        .pin(&pin)
        .map_err(|source| DatapathError::Pin { path: pin, source })?;
    Ok(AttachOutcome::Created)
}

/// Attach `prog` at ingress and egress of `ifindex` without pinning (benchmark baseline).
pub(crate) fn attach_unpinned(
    prog: &mut SchedClassifier,
    ifindex: u32,
) -> Result<Vec<SchedClassifierLinkId>, DatapathError> {
    let name = Hook::BenchBaseline.program_name();
    [TcAttachType::Ingress, TcAttachType::Egress]
        .into_iter()
        .map(|attach_type| {
            prog.attach(
                ifindex,
                TcAttach::Tcx {
                    attach_type,
                    order: LinkOrder::first(),
                },
            )
            .map_err(|source| DatapathError::Program { name, source })
        })
        .collect()
}

/// The pinned link at `pin` as a TC link, or `None` when the pin no longer holds a TCX link.
fn live_link(pin: &Path) -> Result<Option<SchedClassifierLink>, DatapathError> {
    let Ok(pinned) = PinnedLink::from_pin(pin) else {
        return Ok(None);
    };
    let fd = FdLink::from(pinned);
    Ok(SchedClassifierLink::try_from(fd).ok())
}

fn remove_pin(pin: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(pin) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DatapathError::PinDir {
            path: pin.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Detach both hooks of `ifindex` now and remove their pins. Idempotent.
pub(crate) fn detach(pin_root: &Path, ifindex: u32) -> Result<(), DatapathError> {
    for hook in [Hook::FromVm, Hook::ToVm] {
        let pin = link_pin(pin_root, ifindex, hook);
        if pin.exists() {
            // Dropping the last reference detaches too, but from a kernel work queue some
            // milliseconds later; BPF_LINK_DETACH is immediate.
            link_detach(&pin).map_err(|source| DatapathError::PinDir {
                path: pin.clone(),
                source,
            })?;
        }
        remove_pin(&pin)?;
    }
    Ok(())
}

/// `BPF_OBJ_GET` the pinned link, then `BPF_LINK_DETACH` it (aya 0.16 exposes neither for
/// a pinned link's fd).
fn link_detach(pin: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("NUL in pin path"))?;
    // union bpf_attr, zero-filled beyond the fields each command reads.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: attr outlives the call; the kernel reads only the obj_get fields.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd is ours and closed once below.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let mut attr = [0u64; 16];
    attr[0] = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64;
    // SAFETY: as above, link_detach reads one u32 fd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    // ENOLINK: already detached (its interface is gone).
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOLINK) {
            return Err(e);
        }
    }
    Ok(())
}

/// Interfaces with at least one pinned link, sorted.
pub(crate) fn pinned_interfaces(pin_root: &Path) -> Result<Vec<u32>, DatapathError> {
    let dir = links_dir(pin_root);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(DatapathError::PinDir { path: dir, source }),
    };
    let mut out: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let (ifindex, _) = name.to_str()?.split_once('-')?;
            ifindex.parse().ok()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}
