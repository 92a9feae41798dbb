//! The Events stream: what is published, in which order, to whom, and what happens to a
//! subscriber that cannot keep up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::*;
use berth_api::proto::{Event, UpdateContainerRequest};
use tonic::Code;

/// Reads events of container `id` until the exit of `pid`, skipping other containers'.
async fn events_until_exit(events: &mut Events, id: &str, pid: u32) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = events.next().await;
        if event.id != id {
            continue;
        }
        let done = event.r#type == "exit" && event.pid == pid;
        seen.push(event);
        if done {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_lifecycle_publishes_its_events_in_order() {
    within(async {
        let mut d = daemon!();
        let id = id("ev-order");
        let bundle = Bundle::new(&["sleep", "1000"]);
        let mut events = d.events().await;
        let init = d.create(create_req(&id, &bundle)).await;
        let mut req = exec_req(&id, &["/bin/sleep", "1000"]);
        req.env = vec!["PATH=/bin".into(), "WHO=child".into()];
        req.cwd = "/tmp".into();
        let child = d.exec(req).await;
        for status in ["paused", "running"] {
            let req = UpdateContainerRequest {
                id: id.clone(),
                signal: 0,
                status: status.into(),
            };
            d.client.update_container(req).await.expect(status);
        }
        d.signal(&id, child, SIGTERM).await;
        // The child's exit comes first: killing the init would also end the child.
        let mut seen = events_until_exit(&mut events, &id, child).await;
        d.signal(&id, init, SIGKILL).await;
        seen.extend(events_until_exit(&mut events, &id, init).await);

        let kinds: Vec<&str> = seen.iter().map(|e| e.r#type.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "start-container",
                "start-process",
                "pause",
                "resume",
                "exit",
                "exit"
            ],
            "events: {seen:#?}"
        );
        let pids: Vec<u32> = [0, 1, 4, 5].iter().map(|&i| seen[i].pid).collect();
        assert_eq!(pids, [init, child, child, init]);
        assert_eq!(seen[0].bundle_path, bundle.path_str());
        let process = seen[1]
            .process
            .as_ref()
            .expect("start-process carries the process");
        assert_eq!(process.args, ["/bin/sleep", "1000"]);
        assert_eq!(process.env, ["PATH=/bin", "WHO=child"]);
        assert_eq!(process.cwd, "/tmp");
        assert_eq!(seen[4].status, 128 + SIGTERM);
        assert_eq!(seen[5].status, 128 + SIGKILL);
        d.assert_gone(&id).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// A paused init killed and then resumed exits as the resume thaws it: the `resume` still comes
/// before the `exit`, which is the container's last event.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_that_thaws_a_killed_init_is_published_before_its_exit() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let mut events = d.events().await;
        for round in 0..5 {
            let id = id(&format!("resume-into-exit-{round}"));
            let init = d.create(create_req(&id, &bundle)).await;
            let mut expected = vec!["start-container", "pause", "resume", "exit"];
            for status in ["paused", "running"] {
                if status == "running" {
                    d.signal(&id, init, SIGKILL).await;
                }
                let req = UpdateContainerRequest {
                    id: id.clone(),
                    signal: 0,
                    status: status.into(),
                };
                match d.client.update_container(req).await {
                    Ok(_) => {}
                    // cgroup v2's freezer lets a SIGKILL through: the init may be gone already.
                    Err(e) if status == "running" && e.code() == Code::NotFound => {
                        expected.retain(|&kind| kind != "resume");
                    }
                    Err(e) => panic!("{status}: {e:?}"),
                }
            }
            let mut seen = events_until_exit(&mut events, &id, init).await;
            // Anything published for it after its exit comes before a later container's start.
            let later = d.run(&format!("after-{round}"), &["sleep", "1000"]).await;
            loop {
                let event = events.next().await;
                if event.id == later.id {
                    break;
                }
                if event.id == id {
                    seen.push(event);
                }
            }
            d.kill_container(&mut events, &later.id, later.pid).await;
            let kinds: Vec<&str> = seen.iter().map(|e| e.r#type.as_str()).collect();
            assert_eq!(kinds, expected, "round {round}: {seen:#?}");
        }
    })
    .await
}

/// In a container without a pid namespace of its own, added processes outlive the init until
/// berthd kills them: their `exit`s still come before the init's, the container's last event.
#[tokio::test(flavor = "multi_thread")]
async fn added_processes_outliving_their_init_exit_before_it() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        bundle.share_the_hosts_pids();
        let mut events = d.events().await;
        for round in 0..3 {
            let id = id(&format!("outlived-{round}"));
            let init = d.create(create_req(&id, &bundle)).await;
            let added = [
                d.exec(exec_req(&id, &["sleep", "1000"])).await,
                d.exec(exec_req(&id, &["sleep", "1000"])).await,
            ];
            d.signal(&id, init, SIGKILL).await;
            let seen = events_until_exit(&mut events, &id, init).await;
            // Anything published for it after its exit comes before a later container's start.
            let later = d
                .run(&format!("after-outlived-{round}"), &["sleep", "1000"])
                .await;
            let mut after = Vec::new();
            loop {
                let event = events.next().await;
                if event.id == later.id {
                    break;
                }
                if event.id == id {
                    after.push(event);
                }
            }
            assert_eq!(after, [], "round {round}: events after the init's exit");
            let exits: Vec<(u32, u32)> = seen
                .iter()
                .filter(|e| e.r#type == "exit")
                .map(|e| (e.pid, e.status))
                .collect();
            let mut added_exits = exits[..exits.len() - 1].to_vec();
            added_exits.sort();
            let mut expected: Vec<(u32, u32)> = added.iter().map(|&p| (p, 137)).collect();
            expected.sort();
            assert_eq!(added_exits, expected, "round {round}: {seen:#?}");
            assert_eq!(exits.last(), Some(&(init, 137)), "round {round}: {seen:#?}");
            d.kill_container(&mut events, &later.id, later.pid).await;
            d.assert_gone(&id).await;
        }
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_sees_only_what_happens_after_it_subscribed() {
    within(async {
        let mut d = daemon!();
        let (before, after) = (id("ev-before"), id("ev-after"));
        let bundle = Bundle::new(&["sleep", "1000"]);
        let mut early = d.events().await;
        let first = d.create(create_req(&before, &bundle)).await;
        early.started(&before).await;

        let mut late = d.events().await;
        let second = d.create(create_req(&after, &bundle)).await;
        let event = late.next().await;
        assert_eq!(
            (event.r#type.as_str(), event.id.as_str(), event.pid),
            ("start-container", after.as_str(), second),
            "the first event after subscribing: {event:?}"
        );
        d.signal(&before, first, SIGKILL).await;
        assert_eq!(late.exit_status(&before, first).await, 137);
        d.signal(&after, second, SIGKILL).await;
        assert_eq!(late.exit_status(&after, second).await, 137);
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_subscriber_gets_every_event() {
    within(async {
        let mut d = daemon!();
        let mut other = d.connect().await;
        let mut subscribers = vec![
            d.events().await,
            d.events().await,
            Events::subscribe(&mut other).await,
        ];
        let ctr = d.run("ev-fanout", &["sh", "-c", "exit 5"]).await;
        for events in &mut subscribers {
            let seen = events_until_exit(events, &ctr.id, ctr.pid).await;
            let kinds: Vec<&str> = seen.iter().map(|e| e.r#type.as_str()).collect();
            assert_eq!(kinds, ["start-container", "exit"]);
            assert_eq!(seen[1].status, 5);
        }
        d.assert_no_zombies().await;
    })
    .await
}

/// Adds `n` processes running `/bin/true` with environment `env`, returning their pids and how
/// long each AddProcess took.
async fn timed_execs(
    d: &mut Daemon,
    id: &str,
    env: &[String],
    n: usize,
) -> (Vec<u32>, Vec<Duration>) {
    let (mut pids, mut took) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let mut req = exec_req(id, &["/bin/true"]);
        req.env = env.to_vec();
        let started = Instant::now();
        pids.push(d.exec(req).await);
        took.push(started.elapsed());
    }
    (pids, took)
}

fn median(durations: &[Duration]) -> Duration {
    let mut sorted = durations.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_subscriber_is_cut_off_without_slowing_anyone_else() {
    const BASELINE: usize = 20;
    const PROCESSES: usize = 40;
    within(async {
        let mut d = daemon!(Options::args(&["--events-buffer", "8"]));
        let c = d.run("ev-slow", &["sleep", "1000"]).await;
        let id = c.id.clone();
        // Each on its own connection, so HTTP/2 flow control of one cannot stall the other.
        let mut fast_client = d.connect().await;
        let mut fast = Events::subscribe(&mut fast_client).await;

        let reader_id = id.clone();
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.iter().filter(|e: &&Event| e.r#type == "exit").count() < BASELINE + PROCESSES
            {
                let event = fast.next().await;
                if event.id == reader_id {
                    seen.push(event);
                }
            }
            seen
        });

        // 128 KiB of environment per process makes each start-process event that large, so
        // the unread stream's socket and HTTP/2 windows fill after a few dozen events.
        let mut env: Vec<String> = (0..32)
            .map(|i| format!("BIG{i}={}", "x".repeat(4096)))
            .collect();
        env.push("PATH=/bin".into());
        // How long AddProcess takes here with no subscriber lagging, then with one that never
        // reads. A daemon that waited for it, even for a second, would slow every exec after
        // the stream's windows filled, which takes about 20 events: the median of the later
        // half shows it above the margin, where a maximum would also catch one exec the host
        // happened to stall.
        let (mut pids, base) = timed_execs(&mut d, &id, &env, BASELINE).await;
        let mut slow_client = d.connect().await;
        let mut slow = Events::subscribe(&mut slow_client).await;
        let (lagging_pids, lagging) = timed_execs(&mut d, &id, &env, PROCESSES).await;
        pids.extend(lagging_pids);
        let (base_median, lagging_median) = (median(&base), median(&lagging[PROCESSES / 2..]));
        assert!(
            lagging_median < base_median + Duration::from_millis(500),
            "AddProcess took {lagging_median:?} (median of the later half) with a lagging \
             subscriber, {base_median:?} without: {lagging:?}"
        );
        let seen = reader.await.expect("fast subscriber");

        let mut order: HashMap<u32, Vec<&str>> = HashMap::new();
        for event in &seen {
            if event.r#type == "exit" {
                assert_eq!(
                    event.status, 0,
                    "{} exited with {}",
                    event.pid, event.status
                );
            }
            order.entry(event.pid).or_default().push(&event.r#type);
        }
        for pid in &pids {
            assert_eq!(
                order.get(pid).map(Vec::as_slice),
                Some(&["start-process", "exit"][..]),
                "events of {pid}"
            );
        }
        d.state().await;

        // Reading the slow stream now drains what was buffered, then ends with the error.
        let mut drained = 0usize;
        let status = loop {
            match slow.next_result().await {
                Ok(Some(_)) => drained += 1,
                Ok(None) => panic!("slow stream ended without an error after {drained} events"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let message = status.message();
        let missed: u64 = message
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .max()
            .unwrap_or(0);
        assert!(
            message.contains("dropped before it read them") && missed > 0,
            "the error should say how many events were missed: {message:?}"
        );

        let mut events = d.events().await;
        d.signal(&id, c.pid, SIGKILL).await;
        assert_eq!(events.exit_status(&id, c.pid).await, 137);
        d.assert_no_zombies().await;
    })
    .await
}
