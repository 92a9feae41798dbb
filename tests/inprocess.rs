//! The daemon run in-process with `berth::daemon::run`: no root, no runtime binary, no spawn
//! helper. A stub spawner fails every command it is given, so this covers what needs no
//! container: serving State, refusing a malformed request, refusing an upgrade whose pre-flight
//! fails, and stopping cleanly. Its own test binary, since `run` makes the process a child
//! subreaper and sweeps its orphans.

use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures_util::future::BoxFuture;
use tonic::Code;

use berth::config::Config;
use berth::daemon::{self, Exit};
use berth::error::Result;
use berth::runtime::{Completion, Outcome, SpawnOptions, SpawnStdio, Spawner};
use berth_api::daemon_proto::UpgradeRequest;
use berth_api::proto::{CreateContainerRequest, StateRequest};

/// Answers every command as one that could not be started, and remembers what it was asked.
#[derive(Default)]
struct RefusingSpawner {
    asked: Mutex<Vec<Vec<String>>>,
}

impl Spawner for RefusingSpawner {
    fn spawn(
        &self,
        argv: Vec<String>,
        _stdio: [SpawnStdio; 3],
        _options: SpawnOptions,
    ) -> BoxFuture<'_, Result<Completion>> {
        let error = format!("{} is not run in this test", argv[0]);
        self.asked.lock().unwrap().push(argv);
        Box::pin(async move {
            Ok(Completion {
                pid: 0,
                outcome: Outcome::SpawnFailed { error },
                stdout: String::new(),
                stderr: String::new(),
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_refuses_and_stops_without_root() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("berth.sock");
    let state_dir = dir.path().join("state");
    let config = Config::parse_from([
        "berthd".as_ref(),
        "--listen".as_ref(),
        socket.as_os_str(),
        "--state-dir".as_ref(),
        state_dir.as_os_str(),
        "--runtime".as_ref(),
        "/bin/sh".as_ref(),
    ]);
    let listener = UnixListener::bind(&socket).unwrap();
    let spawner = Arc::new(RefusingSpawner::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(daemon::run(
        config,
        Arc::clone(&spawner) as Arc<dyn Spawner>,
        listener,
        async {
            let _ = stopped.await;
        },
    ));

    let mut client = berth_api::client::connect(&socket)
        .await
        .expect("connect to the API");
    let state = client
        .state(StateRequest::default())
        .await
        .expect("State")
        .into_inner();
    assert!(state.containers.is_empty(), "{:?}", state.containers);
    assert!(state.machine.is_some_and(|m| m.cpus > 0 && m.memory > 0));

    let err = client
        .create_container(CreateContainerRequest {
            id: "../escape".into(),
            bundle_path: "/nonexistent".into(),
            ..Default::default()
        })
        .await
        .expect_err("CreateContainer with an invalid id");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("invalid container id"), "{err:?}");

    let mut admin = berth_api::client::connect_daemon(&socket)
        .await
        .expect("connect to the Daemon service");
    let err = admin
        .upgrade(UpgradeRequest {})
        .await
        .expect_err("Upgrade with a pre-flight that cannot run");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not upgrading to it"), "{err:?}");
    assert!(
        spawner
            .asked
            .lock()
            .unwrap()
            .iter()
            .any(|argv| argv.last().is_some_and(|arg| arg == "--preflight")),
        "the pre-flight did not go through the spawner"
    );
    client
        .state(StateRequest::default())
        .await
        .expect("State after a refused upgrade");

    drop((client, admin));
    stop.send(()).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("run returns after shutdown")
        .expect("run did not panic")
        .expect("run succeeded");
    assert!(matches!(exit, Exit::Stopped), "{exit:?}");
    assert!(!socket.exists(), "the socket file was left behind");
}
