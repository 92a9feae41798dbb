//! The Events stream across berthd's upgrades and restarts: an upgrade in place ends every
//! stream (UNAVAILABLE) and the new image serves on the same socket within seconds, replaying
//! the `live` and `exit` events of its recovery to whoever subscribes soon after. So a lost
//! stream is subscribed to again, for a while, rather than given up.

use std::time::Duration;

use berth_api::proto::api_client::ApiClient;
use berth_api::proto::{Event, EventsRequest, StateRequest};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

/// How long berth waits for berthd to serve again once its event stream is lost.
pub const BERTHD_BACK_WITHIN: Duration = Duration::from_secs(15);

/// Whether `status` ended a stream because berthd went away (a stop, an upgrade, a crash)
/// rather than because of the stream itself.
pub fn berthd_went_away(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown)
}

/// A new Events stream once berthd serves again, within [`BERTHD_BACK_WITHIN`] (each attempt
/// bounded by it too: a socket handed to a new image accepts before that image answers);
/// `Ok(None)` if it does not. An answer other than berthd being away is returned as it is.
pub async fn resubscribe(
    client: &mut ApiClient<Channel>,
) -> Result<Option<Streaming<Event>>, Status> {
    let deadline = Instant::now() + BERTHD_BACK_WITHIN;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match tokio::time::timeout_at(deadline, client.events(EventsRequest {})).await {
            Ok(Ok(events)) => return Ok(Some(events.into_inner())),
            Ok(Err(status)) if !berthd_went_away(&status) => return Err(status),
            Ok(Err(_)) if Instant::now() < deadline => {}
            Ok(Err(_)) | Err(_) => return Ok(None),
        }
    }
}

/// Whether container `id` still lists process `pid`: after a stream was lost, one that is gone
/// exited meanwhile.
pub async fn still_runs(
    client: &mut ApiClient<Channel>,
    id: &str,
    pid: u32,
) -> Result<bool, Status> {
    let request = StateRequest { id: id.to_owned() };
    match client.state(request).await {
        Ok(state) => Ok(state
            .into_inner()
            .containers
            .iter()
            .any(|c| c.id == id && c.processes.iter().any(|p| p.pid == pid))),
        Err(status) if status.code() == Code::NotFound => Ok(false),
        Err(status) => Err(status),
    }
}

/// The note on stderr when the stream is lost: why, and that berth waits.
pub fn note_lost(why: Option<&Status>) {
    let why = why.map_or_else(
        || "berthd ended it".to_owned(),
        |status| crate::error::status_message(status).to_owned(),
    );
    eprintln!(
        "berth: lost berthd's event stream ({why}); waiting up to {} s for berthd to serve again",
        BERTHD_BACK_WITHIN.as_secs()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_berthd_going_away_is_waited_out() {
        assert!(berthd_went_away(&Status::unavailable(
            "berthd is upgrading"
        )));
        assert!(berthd_went_away(&Status::unknown("transport error")));
        assert!(!berthd_went_away(&Status::resource_exhausted(
            "12 events were dropped before it read them"
        )));
        assert!(!berthd_went_away(&Status::permission_denied(
            "not a member"
        )));
    }
}
