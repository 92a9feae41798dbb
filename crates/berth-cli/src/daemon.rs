//! `berth daemon`: berthd's own Daemon service (proto/daemon.proto), Info and Upgrade.

use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use berth_api::daemon_proto::daemon_client::DaemonClient;
use berth_api::daemon_proto::{InfoRequest, InfoResponse, UpgradeRequest};
use clap::Subcommand;
use tonic::Code;
use tonic::transport::Channel;

use crate::error::{Error, code_name, root_cause, status_message};
use crate::output::{rfc3339, write_stdout};

/// How often and how long `upgrade` asks whether the new image serves.
const UPGRADE_POLL_INTERVAL: Duration = Duration::from_millis(50);
const UPGRADE_POLL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Subcommand)]
pub enum DaemonCommand {
    /// Show berthd's pid, version and when its running image started
    Info,
    /// Upgrade berthd in place to the binary now at its path, keeping every container
    ///
    /// berthd checks the new binary runs, then executes it in the same process; berth waits (up
    /// to 30 s) until the new image answers and says how long that took. A binary that does not
    /// run is refused and the old image keeps serving.
    Upgrade,
}

pub async fn execute(
    mut daemon: DaemonClient<Channel>,
    address: &Path,
    command: DaemonCommand,
) -> Result<(), Error> {
    match command {
        DaemonCommand::Info => {
            let info = daemon.info(InfoRequest {}).await?.into_inner();
            write_stdout(&info_text(&info))
        }
        DaemonCommand::Upgrade => upgrade(daemon, address).await,
    }
}

fn info_text(info: &InfoResponse) -> String {
    format!(
        "pid:           {}\nversion:       {}\nimage started: {}\n",
        info.pid,
        info.version,
        rfc3339(UNIX_EPOCH + Duration::from_nanos(info.image_started))
    )
}

async fn upgrade(mut daemon: DaemonClient<Channel>, address: &Path) -> Result<(), Error> {
    let before = daemon.info(InfoRequest {}).await?.into_inner();
    let started = Instant::now();
    let answer = daemon
        .upgrade(UpgradeRequest {})
        .await
        .map_err(|status| match status.code() {
            Code::FailedPrecondition => Error::UpgradeRefused(status),
            _ => Error::Rpc(status),
        })?
        .into_inner();
    write_stdout(&format!(
        "berthd {} is executing {} ({})\n",
        answer.pid, answer.binary, answer.version
    ))?;
    let after = wait_for_new_image(address, &before).await?;
    let took = started.elapsed().as_millis();
    let line = if after.pid == before.pid {
        format!(
            "berthd {} upgraded in place: {} ({took} ms)\n",
            after.pid, after.version
        )
    } else {
        // Another berthd took the socket: the containers were adopted, not kept as children.
        format!(
            "berthd {} was replaced by berthd {}, not upgraded in place: {} ({took} ms)\n",
            before.pid, after.pid, after.version
        )
    };
    write_stdout(&line)
}

/// Asks berthd on fresh connections until an image other than `before`'s answers: the old
/// image's connections close during the exec, and the socket queues new ones meanwhile.
async fn wait_for_new_image(address: &Path, before: &InfoResponse) -> Result<InfoResponse, Error> {
    let deadline = Instant::now() + UPGRADE_POLL_TIMEOUT;
    let mut last = "no answer yet".to_owned();
    while Instant::now() < deadline {
        tokio::time::sleep(UPGRADE_POLL_INTERVAL).await;
        let mut daemon = match berth_api::client::connect_daemon(address).await {
            Ok(daemon) => daemon,
            Err(error) => {
                last = root_cause(&error);
                continue;
            }
        };
        match daemon.info(InfoRequest {}).await {
            Ok(info) if info.get_ref().image_started != before.image_started => {
                return Ok(info.into_inner());
            }
            Ok(_) => last = "the old image still answers".to_owned(),
            Err(status) => {
                last = format!("{} ({})", status_message(&status), code_name(status.code()));
            }
        }
    }
    Err(Error::UpgradeUnseen {
        pid: before.pid,
        waited: UPGRADE_POLL_TIMEOUT,
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_shows_pid_version_and_image_start() {
        let info = InfoResponse {
            pid: 42,
            version: "berthd 0.1.0".to_owned(),
            image_started: 1_700_000_000_123_456_789,
        };
        assert_eq!(
            info_text(&info),
            "pid:           42\n\
             version:       berthd 0.1.0\n\
             image started: 2023-11-14T22:13:20.123Z\n"
        );
    }
}
