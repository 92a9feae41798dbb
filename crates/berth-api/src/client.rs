//! Connecting to berthd's unix socket: shared by the CLI, the load client and the tests.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::daemon_proto::daemon_client::DaemonClient;
use crate::proto::api_client::ApiClient;

/// A client of the API service of the berthd listening on the unix socket `path`.
pub async fn connect(path: &Path) -> Result<ApiClient<Channel>, tonic::transport::Error> {
    Ok(ApiClient::new(channel(path).await?))
}

/// A client of berthd's own Daemon service (proto/daemon.proto) on the same socket.
pub async fn connect_daemon(path: &Path) -> Result<DaemonClient<Channel>, tonic::transport::Error> {
    Ok(DaemonClient::new(channel(path).await?))
}

/// Opens a gRPC channel to the berthd listening on the unix socket `path`.
pub async fn channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_owned();
    // The URI is required by the HTTP/2 layer but never resolved: the connector dials the socket.
    Endpoint::from_static("http://berthd.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}
