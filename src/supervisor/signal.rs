//! Signal: a signal to a container's init or one of its added processes, through its pidfd;
//! signal 0 only checks that the process exists (OK, or NOT_FOUND once it has exited).
//!
//! Owns: checking that the pid belongs to the container (pid 0, which names no process, is
//! malformed). Does not own: sending it (reaper).

use super::Supervisor;
use super::validate;
use crate::error::{Error, Result};

impl Supervisor {
    /// Sends `signal` to `pid`, which must be the init or an added process of container `id`.
    pub(crate) fn signal(&self, id: &str, pid: u32, signal: u32) -> Result<()> {
        let signal = validate::signal(signal)?;
        if pid == 0 {
            return Err(Error::InvalidArgument(
                "pid is 0: give the pid of the container's init or of one of its added processes (State lists them)".into(),
            ));
        }
        let container = self.container(id)?;
        if container.init.pid() == pid {
            return container.init.tracked.signal(signal);
        }
        let process = container
            .lock()
            .added
            .iter()
            .find(|p| p.pid() == pid)
            .cloned();
        match process {
            Some(process) => process.tracked.signal(signal),
            None => Err(Error::NotFound(format!(
                "process {pid} is not part of container {id}"
            ))),
        }
    }
}
