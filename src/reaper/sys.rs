//! The raw system calls the reaper needs, where the wrappers in nix and rustix fall short:
//! `waitid` that keeps the waited pid and real-time signals (nix turns the siginfo into a
//! `Signal`, which has no 34..=64), `pidfd_send_signal` for any signal 1..=64, `PIDFD_GET_INFO`
//! and the `PIDFD_GET_*_NAMESPACE` requests.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Which children `waitid` looks at.
#[derive(Clone, Copy)]
pub enum WaitTarget<'a> {
    Any,
    Pid(i32),
    PidFd(BorrowedFd<'a>),
}

/// `waitid(target, WEXITED | WNOHANG | extra)`: the pid and raw wait status of an exited child,
/// `None` when none has exited. With `peek`, the child is left unreaped (`WNOWAIT`).
pub fn waitid(target: WaitTarget<'_>, peek: bool) -> io::Result<Option<(i32, i32)>> {
    let (idtype, id) = match target {
        WaitTarget::Any => (libc::P_ALL, 0),
        WaitTarget::Pid(pid) => (libc::P_PID, pid as libc::id_t),
        WaitTarget::PidFd(fd) => (libc::P_PIDFD, fd.as_raw_fd() as libc::id_t),
    };
    let flags = libc::WEXITED | libc::WNOHANG | if peek { libc::WNOWAIT } else { 0 };
    // SAFETY: an all-zero siginfo_t is a valid value, and waitid writes only into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` outlives the call; `idtype`, `id` and `flags` are plain integers.
    if unsafe { libc::waitid(idtype, id, &mut info, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: for SIGCHLD-style results the kernel fills si_pid and si_status (the union's child
    // fields); with WNOHANG and nothing to report it leaves si_pid 0.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    // The wait status word, as waitpid would have given it, so one decoder serves every source.
    let raw = match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => status & 0x7f,
    };
    Ok(Some((pid, raw)))
}

pub fn open(pid: i32) -> io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

pub fn send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: a null siginfo is allowed (the kernel fills in a SI_USER one); the fd is borrowed
    // for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct pidfd_info` as of its first version (PIDFD_INFO_SIZE_VER0, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

const PIDFD_INFO_EXIT: u64 = 1 << 3;
/// `_IOWR(0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PidfdInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;

/// The raw wait status of the exited process behind `pidfd`, whoever reaped it (Linux ≥ 6.15).
/// `Ok(None)` while it runs; an error where the kernel does not offer `PIDFD_INFO_EXIT`.
pub fn exit_status(pidfd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: PIDFD_GET_INFO reads and writes at most size_of::<PidfdInfo>() bytes (the size is
    // encoded in the request number) of the struct we own for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            PIDFD_GET_INFO,
            &mut info as *mut PidfdInfo,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.mask & PIDFD_INFO_EXIT != 0).then_some(info.exit_code))
}

/// `_IO(0xFF, 3)`: the mount namespace of a pidfd's process (libc's `PIDFD_GET_MNT_NAMESPACE`).
pub const PIDFD_GET_MNT_NAMESPACE: libc::c_ulong = (0xFF << 8) | 3;
/// `_IO(0xFF, 4)`: its network namespace (`PIDFD_GET_NET_NAMESPACE`).
pub const PIDFD_GET_NET_NAMESPACE: libc::c_ulong = (0xFF << 8) | 4;

/// Opens a namespace of the process behind `pidfd` through the pidfd (`request` is one of the
/// `PIDFD_GET_*_NAMESPACE`, Linux ≥ 6.11): no path to look up, and no pid to be reused. ENOTTY
/// from an older kernel; ESRCH once the process has left its namespaces (exited).
pub fn pidfd_namespace(pidfd: BorrowedFd<'_>, request: libc::c_ulong) -> io::Result<OwnedFd> {
    // SAFETY: these requests read no memory: their argument must be 0 (else EINVAL), passed at
    // the width of the pointer the kernel takes. The kernel returns a new fd or -1.
    let rc = unsafe { libc::ioctl(pidfd.as_raw_fd(), request, 0 as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative result is a new fd (opened O_CLOEXEC) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}
