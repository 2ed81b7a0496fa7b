//! Interfaces appearing and disappearing, from rtnetlink link notifications.
//!
//! The message content is not decoded: any link event triggers a rescan of the inventory,
//! which resolves devices to ifindexes itself. A scan is cheap and this cannot drift.
use std::io;

use tokio::sync::mpsc;

/// Start a thread that sends `()` on every link change in this network namespace.
pub fn watch_links() -> io::Result<mpsc::Receiver<()>> {
    // SAFETY: plain socket syscalls; the fd is owned by the thread below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_nl is valid; we set family and groups.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = libc::RTMGRP_LINK as u32;
    // SAFETY: sa is a valid sockaddr_nl of the given size.
    let r = unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let (tx, rx) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("netlink-links".into())
        .spawn(move || {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&owned);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // SAFETY: buf is valid for its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    // ENOBUFS: we missed events; a rescan covers them all the same.
                    if e.raw_os_error() != Some(libc::ENOBUFS)
                        && e.kind() != io::ErrorKind::Interrupted
                    {
                        tracing::warn!(error = %e, "netlink link watch stopped");
                        return;
                    }
                }
                // Full channel: a rescan is already pending.
                if tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        })?;
    Ok(rx)
}
