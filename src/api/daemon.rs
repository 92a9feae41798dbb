//! The Daemon service (proto/daemon.proto): hands an upgrade request to berthd's main loop,
//! which owns the process, and returns its answer.

use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::peer::{audit, peer, require_root};
use crate::daemon_proto;
use crate::error::Error;

/// A request for an in-place upgrade, answered once the new binary has been checked.
pub struct UpgradeOrder {
    pub reply: oneshot::Sender<Result<UpgradeReady, Error>>,
}

/// The checked binary the main loop is about to execute.
pub struct UpgradeReady {
    pub binary: String,
    pub version: String,
}

pub struct DaemonService {
    upgrades: mpsc::Sender<UpgradeOrder>,
    image_started: u64,
}

impl DaemonService {
    /// `image_started`: when this process image started, in nanoseconds since the epoch.
    pub fn new(upgrades: mpsc::Sender<UpgradeOrder>, image_started: u64) -> Self {
        DaemonService {
            upgrades,
            image_started,
        }
    }
}

#[tonic::async_trait]
impl daemon_proto::daemon_server::Daemon for DaemonService {
    async fn upgrade(
        &self,
        request: Request<daemon_proto::UpgradeRequest>,
    ) -> Result<Response<daemon_proto::UpgradeResponse>, Status> {
        let peer = peer(&request)?;
        let span = tracing::info_span!("upgrade", peer_uid = peer.uid, peer_pid = peer.pid);
        span.in_scope(|| audit(&peer, "Daemon.Upgrade", ""));
        require_root(&peer, "Daemon.Upgrade")?;
        span.in_scope(|| tracing::info!("upgrade requested"));
        let (reply, answer) = oneshot::channel();
        let busy = || {
            Status::from(Error::Unavailable(
                "berthd is stopping or already upgrading".into(),
            ))
        };
        self.upgrades
            .send(UpgradeOrder { reply })
            .await
            .map_err(|_| busy())?;
        let ready = answer.await.map_err(|_| busy())??;
        Ok(Response::new(daemon_proto::UpgradeResponse {
            binary: ready.binary,
            version: ready.version,
            pid: std::process::id(),
        }))
    }

    async fn info(
        &self,
        _request: Request<daemon_proto::InfoRequest>,
    ) -> Result<Response<daemon_proto::InfoResponse>, Status> {
        Ok(Response::new(daemon_proto::InfoResponse {
            pid: std::process::id(),
            version: format!("berthd {}", env!("CARGO_PKG_VERSION")),
            image_started: self.image_started,
        }))
    }
}
