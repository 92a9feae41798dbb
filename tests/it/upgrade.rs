//! README's in-place upgrade by SIGUSR2, with a request in flight: "lets requests in flight
//! finish, then `execve`s it in the same process".

use std::time::{Duration, Instant};

use berth_api::daemon_proto::InfoRequest;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn sigusr2_upgrades_in_place_and_a_create_in_flight_finishes() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let wrapper = delayed_runtime(scripts.path(), "start", 2);
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&wrapper)]));
        let mut admin = berth_api::client::connect_daemon(&d.socket())
            .await
            .expect("connect to the Daemon service");
        let old_image = admin.info(InfoRequest {}).await.expect("Info").into_inner();

        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("usr2-inflight");
        let mut client = d.connect().await;
        let request = create_req(&id, &bundle);
        let in_flight = tokio::spawn(async move { client.create_container(request).await });
        let berthd = d.pid();
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while slow_starts(berthd, 2).is_empty() {
            assert!(Instant::now() < deadline, "the delayed start never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        kill(Pid::from_raw(berthd as i32), Signal::SIGUSR2).expect("SIGUSR2 to berthd");

        let pid = in_flight
            .await
            .expect("create task")
            .expect("the create in flight at the upgrade finishes")
            .into_inner()
            .pid;
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let new_image = loop {
            assert!(Instant::now() < deadline, "the new image never answered");
            if let Ok(mut admin) = berth_api::client::connect_daemon(&d.socket()).await
                && let Ok(info) = admin.info(InfoRequest {}).await
                && info.get_ref().image_started != old_image.image_started
            {
                break info.into_inner();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(new_image.pid, old_image.pid, "an upgrade keeps the process");
        assert_eq!(d.try_wait(), None, "berthd exited");

        let mut client = d.connect().await;
        let state = state(&mut client).await;
        let container = state
            .containers
            .iter()
            .find(|c| c.id == id)
            .expect("the new image lists the container created across the upgrade");
        assert_eq!(container.processes[0].pid, pid);
        assert_eq!(
            proc_stat(pid).map(|s| s.ppid),
            Some(berthd),
            "the init's parent"
        );
        d.client = client;
        let mut events = d.events().await;
        d.record_cgroups(&id, pid);
        d.kill_container(&mut events, &id, pid).await;
    })
    .await
}
