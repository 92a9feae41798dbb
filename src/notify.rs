//! Telling the service manager how berthd is doing (`sd_notify`): `READY=1` once recovery has
//! finished and the listener serves, `RELOADING=1` when an in-place upgrade begins (the new
//! image sends `READY=1` again), `STOPPING=1` on shutdown, and `WATCHDOG=1` pings at half of
//! `WATCHDOG_USEC` while the daemon runs.
//!
//! Owns: the notify socket protocol (a datagram to `NOTIFY_SOCKET`, a path or an abstract name
//! starting with `@`) and the watchdog interval. Does not own: when each state is reached
//! (`daemon`). Without `NOTIFY_SOCKET` every call does nothing. The variables stay in the
//! environment, so an upgraded image notifies the same manager.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager, if any. A failure
/// is logged, never fatal: berthd serves the same without a manager listening.
pub fn send(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = address(&socket).and_then(|address| {
        let datagram = UnixDatagram::unbound()?;
        datagram.send_to_addr(state.as_bytes(), &address)
    });
    match sent {
        Ok(_) => tracing::debug!(state, "notified the service manager"),
        Err(e) => {
            tracing::warn!(socket = ?socket, error = %e, "could not notify the service manager")
        }
    }
}

fn address(socket: &std::ffi::OsStr) -> std::io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    match socket.as_bytes() {
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        _ => SocketAddr::from_pathname(socket),
    }
}

/// Ready: recovery has finished and the listener serves.
pub fn ready(containers: usize) {
    send(&format!(
        "READY=1\nSTATUS=serving, {containers} containers adopted at start\nMAINPID={}",
        std::process::id()
    ));
}

/// An in-place upgrade begins; the new image's [`ready`] ends it.
pub fn reloading() {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let micros = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    send(&format!(
        "RELOADING=1\nSTATUS=upgrading in place\nMONOTONIC_USEC={micros}"
    ));
}

pub fn stopping() {
    send("STOPPING=1\nSTATUS=stopping; containers keep running");
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, if it is set for this process.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog until the runtime it was spawned on ends, if one is asked for.
pub fn spawn_watchdog() {
    if let Some(interval) = watchdog_interval() {
        tracing::info!(interval_ms = interval.as_millis() as u64, "watchdog pings");
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            loop {
                ticks.tick().await;
                send("WATCHDOG=1");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let datagram = UnixDatagram::unbound().unwrap();
        datagram
            .send_to_addr(b"READY=1", &address(path.as_os_str()).unwrap())
            .unwrap();
        let mut buf = [0; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let name = format!("@berth-notify-test-{}", std::process::id());
        let address = address(std::ffi::OsStr::new(&name)).unwrap();
        use std::os::linux::net::SocketAddrExt;
        assert_eq!(address.as_abstract_name(), Some(&name.as_bytes()[1..]));
    }
}
