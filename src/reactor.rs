//! Registering owned descriptors with the tokio reactor, the one wrapper every pidfd, socket,
//! FIFO and pty goes through.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers `fd` for `interest`. Must be called inside the tokio runtime.
pub fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd owns its descriptor and always reports the same one, so the descriptor
    // stays open and unchanged for as long as the AsyncFd holds it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}
