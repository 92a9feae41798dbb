//! UpdateContainer: pausing and resuming a container, and signalling its init.
//!
//! Owns: the status a container moves between (running, paused) and the events that say so.
//! Does not own: freezing (the runtime) or signalling (reaper).

use std::sync::Arc;

use super::Supervisor;
use super::registry::Status;
use super::validate;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::runtime::{Asker, Operation};

impl Supervisor {
    /// Freezes ("paused") or thaws ("running") the container, then signals its init if `signal`
    /// is not 0, for `uid`. The update is the supervisor's: a caller that goes away between the
    /// runtime's pause and the recorded status cannot leave the two disagreeing.
    pub(crate) async fn update(
        self: &Arc<Self>,
        uid: u32,
        id: &str,
        status: &str,
        signal: u32,
    ) -> Result<()> {
        let supervisor = Arc::clone(self);
        let (id, status) = (id.to_owned(), status.to_owned());
        self.owned(uid, async move {
            supervisor.update_owned(uid, &id, &status, signal).await
        })
        .await
    }

    async fn update_owned(&self, uid: u32, id: &str, status: &str, signal: u32) -> Result<()> {
        let target = match status {
            "" => None,
            "paused" => Some(Status::Paused),
            "running" => Some(Status::Running),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "invalid status {}: use \"paused\" or \"running\"",
                    crate::error::quote(other)
                )));
            }
        };
        // 0 is no signal here, not Signal's check that the process exists.
        let signal = (signal != 0)
            .then(|| {
                validate::signal(signal).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "invalid signal {signal}: use a number from 1 to 64, or 0 for none (see man 7 signal)"
                    ))
                })
            })
            .transpose()?;
        let container = self.container(id)?;
        if let Some(target) = target {
            let _operations = container.operations.lock().await;
            if container.lock().status == target {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is already {}",
                    target.as_str()
                )));
            }
            let (op, kind) = match target {
                Status::Paused => (Operation::Pause { id }, EventKind::Pause),
                Status::Running => (Operation::Resume { id }, EventKind::Resume),
            };
            self.runtime.run(op, Asker::Uid(uid)).await.map_err(|e| {
                container.exit_seen_by_the_runtime(e, || format!("container {id} has exited"))
            })?;
            container.lock().status = target;
            self.events.publish(id, container.init.pid(), kind);
        }
        if let Some(signal) = signal {
            container.init.tracked.signal(signal)?;
        }
        Ok(())
    }
}
