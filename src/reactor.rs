//! Registering owned descriptors with the tokio reactor, the one wrapper every pidfd, socket,
//! FIFO, pty and eventfd goes through; and the eventfd a task waits on.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::EventfdFlags;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers `fd` for `interest`. Must be called inside the tokio runtime.
pub fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    try_register(fd, interest).map_err(|(_, e)| e)
}

/// [`register`], giving `fd` back when epoll does not take it (EPERM: a file without poll,
/// such as `/dev/null`).
pub fn try_register(
    fd: OwnedFd,
    interest: Interest,
) -> Result<AsyncFd<OwnedFd>, (OwnedFd, io::Error)> {
    // SAFETY: an OwnedFd owns its descriptor and always reports the same one, so the descriptor
    // stays open and unchanged for as long as the AsyncFd holds it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts())
}

/// Registers a new descriptor of `fd`'s file for `interest`: how a socket registered for reading
/// only waits for space to write, without the write interest's wake-ups the rest of the time.
pub fn register_duplicate(fd: BorrowedFd<'_>, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    register(rustix::io::fcntl_dupfd_cloexec(fd, 0)?, interest)
}

/// An eventfd registered for reading: signalled from any thread (or by the kernel, as a v1
/// cgroup's OOM notification), waited on by a task.
pub struct Eventfd(AsyncFd<OwnedFd>);

impl Eventfd {
    /// Must be called inside the tokio runtime.
    pub fn new() -> io::Result<Self> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Eventfd(register(fd, Interest::READABLE)?))
    }

    /// Adds one to the counter, which wakes the waiting task.
    pub fn signal(&self) -> io::Result<()> {
        rustix::io::write(self.0.get_ref(), &1u64.to_ne_bytes())?;
        Ok(())
    }

    /// Waits until the counter is above zero, and resets it.
    pub async fn wait(&self) -> io::Result<()> {
        let mut counter = [0u8; 8];
        loop {
            let mut ready = self.0.readable().await?;
            let read = rustix::io::read(self.0.get_ref(), &mut counter);
            // Cleared whatever the read gives: a signal after it makes the eventfd ready again.
            ready.clear_ready();
            match read {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::AGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Eventfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
