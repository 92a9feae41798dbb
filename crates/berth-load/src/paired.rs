//! Paired creates (`--paired P`): P creates through berthd and P `run -d` of the runtime by hand,
//! one after the other at concurrency 1, which of the two goes first swapping every pair, so both
//! see the host in the same state. A level's berthd phase and its floor run minutes apart, and
//! this VM's speed drifts between them by more than the gap being measured (the direct `run -d`
//! rate moved 1.6× within an hour); interleaved, the drift falls on both alike.
//!
//! Owns: the paired phase and its figures. Does not own: starting berthd (lib), running the
//! runtime (session), the target it is held to (report).

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_api::proto::CreateContainerRequest;
use serde::Serialize;

use super::LoadError;
use super::daemon::{self, Client};
use super::direct;
use super::metrics;
use super::progress::Progress;
use super::session::{Runtime, Session, reap_zombie_children};
use super::summary::Percentiles;

#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    pub pairs: usize,
    /// CreateContainer, from the request to its answer.
    pub berthd: Option<Percentiles>,
    /// `run -d --pid-file`, from the spawn to the runtime's exit.
    pub direct: Option<Percentiles>,
    /// Where berthd's creates spent their time, from its metrics.
    pub inside_berthd: Option<InsideBerthd>,
}

/// Means over the paired creates from berthd's own histograms (scraped before and after): the
/// gap to `run -d` split into the runtime command, the rest of the handler, and what is outside
/// the handler (the client, HTTP/2, the socket).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct InsideBerthd {
    /// `berth_grpc_server_handling_seconds` of CreateContainer.
    pub handling_ms: f64,
    /// `berth_runtime_command_duration_seconds` of `run`: the spawn to the runtime's exit, as
    /// the direct figure is taken.
    pub runtime_ms: f64,
}

impl Paired {
    /// The direct mean over berthd's: at concurrency 1 a create rate is one over the mean
    /// create, so this is berthd's rate as a share of `run -d`'s.
    pub fn rate_ratio(&self) -> Option<f64> {
        Some(self.direct?.mean_ms / self.berthd?.mean_ms)
    }
}

/// Creates `pairs` containers each way, interleaved, then kills and deletes them all: berthd's
/// through `client` (each exit awaited, as in a level's teardown), the runtime's by hand.
pub async fn measure(
    session: &Arc<Session>,
    client: &Client,
    metrics_address: Option<&str>,
    runtime: &Runtime,
    pairs: usize,
) -> Result<Paired, LoadError> {
    let root = session.runtime_root(runtime, &format!("{}-paired", runtime.name));
    let pid_dir = root.with_extension("pids");
    fs::create_dir_all(&pid_dir).map_err(|e| LoadError(format!("{}: {e}", pid_dir.display())))?;
    let stderr = session.dir.join(format!("{}-paired.err", runtime.name));
    let bundle = session.bundle_str();
    let mut client = client.clone();
    let (mut berthd, mut direct) = (Vec::with_capacity(pairs), Vec::with_capacity(pairs));
    let mut containers = Vec::with_capacity(pairs);
    let mut by_hand = Vec::with_capacity(pairs);
    crate::memory::cgroups_settled().await;
    let metrics_before = scrape(metrics_address).await;
    let progress = Progress::start(
        format!("paired berthd / {} run -d C=1", runtime.name),
        pairs,
    );
    for i in 0..pairs {
        for berthd_turn in [i % 2 == 0, i % 2 == 1] {
            if berthd_turn {
                let id = session.id(format_args!("paired-{i}"));
                let req = CreateContainerRequest {
                    id: id.clone(),
                    bundle_path: bundle.clone(),
                    ..Default::default()
                };
                let began = Instant::now();
                let pid = daemon::rpc(
                    format!("CreateContainer {id}"),
                    client.create_container(req),
                )
                .await?
                .pid;
                berthd.push(began.elapsed());
                session.track(&id, pid);
                containers.push((id, pid));
            } else {
                let id = session.id(format_args!("direct-paired-{i}"));
                let pid_file = pid_dir.join(format!("{id}.pid"));
                let pid_arg = pid_file.to_string_lossy();
                let args = direct::run_detached_args(&bundle, &pid_arg, &id);
                let began = Instant::now();
                runtime.run(&root, &args, &stderr).await?;
                direct.push(began.elapsed());
                by_hand.push((id, pid_file));
            }
        }
        progress.inc();
    }
    progress.finish();
    let metrics_after = scrape(metrics_address).await;
    let inside_berthd = metrics_before
        .zip(metrics_after)
        .and_then(|(before, after)| {
            Some(InsideBerthd {
                handling_ms: metrics::histogram_mean_ms(
                    &before,
                    &after,
                    "berth_grpc_server_handling_seconds",
                    "grpc_method=\"CreateContainer\"",
                )?,
                runtime_ms: metrics::histogram_mean_ms(
                    &before,
                    &after,
                    "berth_runtime_command_duration_seconds",
                    "operation=\"run\"",
                )?,
            })
        });
    let label = "berthd paired kill C=1";
    daemon::kill_all(session, std::slice::from_ref(&client), &containers, label).await?;
    delete_by_hand(runtime, &root, &by_hand, &stderr).await?;
    Ok(Paired {
        pairs,
        berthd: Percentiles::of(&berthd),
        direct: Percentiles::of(&direct),
        inside_berthd,
    })
}

/// berthd's metrics, or None where there is no endpoint or it cannot be read (the split is then
/// left out, not guessed).
async fn scrape(address: Option<&str>) -> Option<Vec<metrics::Sample>> {
    metrics::scrape_samples(Some(address?))
        .await
        .map_err(|e| eprintln!("paired: no split of berthd's time: {e}"))
        .ok()
}

/// SIGKILL and reap each init started by hand (this process is their subreaper), then `delete`.
async fn delete_by_hand(
    runtime: &Runtime,
    root: &std::path::Path,
    containers: &[(String, std::path::PathBuf)],
    stderr: &std::path::Path,
) -> Result<(), LoadError> {
    for (id, pid_file) in containers {
        direct::kill_and_reap(direct::init_pid(pid_file)?, id).await?;
        runtime.run(root, &["delete", id], stderr).await?;
    }
    reap_zombie_children(Duration::from_secs(5)).await;
    Ok(())
}
