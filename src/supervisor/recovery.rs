//! Taking containers back after berthd restarts (stop, crash, kill -9) or upgrades in place:
//! adopting the ones still running, reporting the ones that ended while berthd was away, and
//! removing runtime leftovers of requests that never finished.
//! Does not own: telling a process from a later one with its pid (reaper), the state files
//! (store).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::registry::{Container, Mutable, Process, Status};
use super::{StdioPaths, Supervisor, validate};
use crate::error::Result;
use crate::events::EventKind;
use crate::reaper::UNKNOWN_EXIT;
use crate::runtime::Operation;
use crate::store::{ContainerRecord, ProcessRecord};

/// What a recovery found, for the start-up log.
#[derive(Debug, Default)]
pub struct Recovery {
    pub adopted: usize,
    pub ended: usize,
    pub leftovers: usize,
    pub took: Duration,
}

impl Supervisor {
    /// Adopts every container recorded in the state directory whose init is still the process
    /// that was started, and reports the others with an `exit` of unknown status. Runs before
    /// berthd serves and before its orphan sweep starts, so no status can be reaped from under
    /// it. The `live` and `exit` events it makes are replayed to subscribers for `replay`.
    pub async fn recover(self: &Arc<Self>, replay: Duration) -> Result<Recovery> {
        let started = Instant::now();
        let mut recovery = Recovery::default();
        let listed = self.runtime_statuses().await;
        let records = self.store.load_all()?;
        for record in &records {
            if let Err(e) = validate::container_id(&record.id) {
                tracing::error!(error = %e, "state file with an invalid id skipped");
                continue;
            }
            let init = match self
                .reaper
                .adopt(record.init.pid as i32, record.init.start_time)
            {
                Ok(init) => init,
                Err(e) => {
                    tracing::error!(id = %record.id, error = %e, "could not adopt; left as it is");
                    continue;
                }
            };
            match init {
                Some(init) => {
                    let status = match listed.get(&record.id).map(String::as_str) {
                        Some("paused") => Status::Paused,
                        Some(_) => Status::Running,
                        None => {
                            tracing::warn!(id = %record.id, "the runtime no longer knows this running container; pause and resume will fail");
                            Status::Running
                        }
                    };
                    self.adopt(record, init, status, replay);
                    recovery.adopted += 1;
                }
                None => {
                    tracing::info!(id = %record.id, pid = record.init.pid, "container ended while berthd was down");
                    self.delete_from_runtime(&record.id).await;
                    if let Err(e) = self.store.remove(&record.id) {
                        tracing::error!(id = %record.id, error = %e, "could not remove the state file");
                    }
                    self.events.record_recovery(
                        &record.id,
                        record.init.pid,
                        EventKind::Exit {
                            status: UNKNOWN_EXIT,
                        },
                        replay,
                    );
                    recovery.ended += 1;
                }
            }
        }
        for id in listed.keys() {
            if !records.iter().any(|r| &r.id == id) {
                tracing::info!(id = %id, "removing a runtime container no request finished creating");
                self.delete_from_runtime(id).await;
                recovery.leftovers += 1;
            }
        }
        recovery.took = started.elapsed();
        Ok(recovery)
    }

    /// Status of every container the runtime holds, by id.
    async fn runtime_statuses(&self) -> HashMap<String, String> {
        #[derive(serde::Deserialize)]
        struct Listed {
            id: String,
            status: String,
        }
        match self.runtime.run(Operation::List).await {
            Ok(out) => serde_json::from_str::<Option<Vec<Listed>>>(&out)
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "could not parse the runtime's container list");
                    None
                })
                .unwrap_or_default()
                .into_iter()
                .map(|l| (l.id, l.status))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "could not list the runtime's containers");
                HashMap::new()
            }
        }
    }

    fn adopt(
        self: &Arc<Self>,
        record: &ContainerRecord,
        init: crate::reaper::TrackedProcess,
        status: Status,
        replay: Duration,
    ) {
        let base_process = super::validate::bundle(&record.bundle.display().to_string())
            .ok()
            .and_then(|(_, spec)| spec.process().clone())
            .and_then(|process| serde_json::to_value(process).ok())
            .unwrap_or_else(|| {
                tracing::warn!(id = %record.id, "bundle config unreadable; added processes will run with the recorded process only");
                minimal_process(&record.init)
            });
        let mut added = Vec::new();
        for process in &record.processes {
            match self.reaper.adopt(process.pid as i32, process.start_time) {
                Ok(Some(tracked)) => added.push(Arc::new(Process {
                    tracked,
                    spec: process.spec.clone(),
                    start_time: process.start_time,
                })),
                Ok(None) | Err(_) => self.events.record_recovery(
                    &record.id,
                    process.pid,
                    EventKind::Exit {
                        status: UNKNOWN_EXIT,
                    },
                    replay,
                ),
            }
        }
        let container = Arc::new(Container {
            id: record.id.clone(),
            bundle: record.bundle.clone(),
            stdio: StdioPaths {
                stdin: record.stdin.clone(),
                stdout: record.stdout.clone(),
                stderr: record.stderr.clone(),
                console: record.console.clone(),
            },
            base_process,
            init: Arc::new(Process {
                tracked: init,
                spec: record.init.spec.clone(),
                start_time: record.init.start_time,
            }),
            mutable: Mutex::new(Mutable {
                status,
                added: added.clone(),
            }),
            operations: tokio::sync::Mutex::new(()),
        });
        self.save(&container);
        self.insert(Arc::clone(&container));
        if let Err(e) = self.stats.register(&record.id, record.init.pid) {
            tracing::warn!(id = %record.id, error = %e, "no stats or OOM events for this adopted container");
        }
        self.events
            .record_recovery(&record.id, record.init.pid, EventKind::Live, replay);
        for process in added {
            self.watch_process(Arc::clone(&container), process);
        }
        self.watch_init(container);
    }
}

/// The process an added process starts from when the bundle can no longer be read.
fn minimal_process(init: &ProcessRecord) -> serde_json::Value {
    serde_json::json!({
        "args": init.spec.args,
        "env": init.spec.env,
        "cwd": init.spec.cwd,
        "user": {
            "uid": init.spec.uid,
            "gid": init.spec.gid,
            "additionalGids": init.spec.additional_gids,
        },
        "terminal": false,
    })
}
