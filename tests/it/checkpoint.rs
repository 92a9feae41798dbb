//! Checkpoints through a real berthd, runc and CRIU. CRIU cannot dump on some kernels (`criu
//! check` fails on this development machine's vDSO): there the full cycle is skipped with the
//! reason printed, and the failure path runs for real instead.

use std::process::Command;

use crate::common::*;
use berth_api::proto::{
    Checkpoint, CreateCheckpointRequest, DeleteCheckpointRequest, ListCheckpointRequest,
};
use tonic::Code;

/// `Ok` when CRIU can checkpoint on this host, else why not.
fn criu_works() -> Result<(), String> {
    match Command::new("criu").arg("check").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            Err(format!("criu check failed: {}", lines.join("; ")))
        }
        Err(e) => Err(format!("criu is not installed ({e})")),
    }
}

fn checkpoint(id: &str, name: &str, exit: bool) -> CreateCheckpointRequest {
    CreateCheckpointRequest {
        id: id.to_owned(),
        checkpoint: Some(Checkpoint {
            name: name.to_owned(),
            exit,
            ..Default::default()
        }),
    }
}

async fn list(client: &mut Client, id: &str) -> Vec<Checkpoint> {
    client
        .list_checkpoint(ListCheckpointRequest { id: id.to_owned() })
        .await
        .expect("ListCheckpoint")
        .into_inner()
        .checkpoints
}

fn delete(id: &str, name: &str) -> DeleteCheckpointRequest {
    DeleteCheckpointRequest {
        id: id.to_owned(),
        name: name.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_requests_are_validated() {
    within(async {
        let mut d = daemon!();
        let unknown = id("cp-unknown");
        let c = &mut d.client;
        expect_code(
            c.create_checkpoint(checkpoint(&unknown, "a", false)).await,
            Code::NotFound,
        );
        let listed = c
            .list_checkpoint(ListCheckpointRequest {
                id: unknown.clone(),
            })
            .await;
        expect_code(listed, Code::NotFound);
        expect_code(
            c.delete_checkpoint(delete(&unknown, "a")).await,
            Code::NotFound,
        );

        let bundle = Bundle::new(&["sleep", "1000"]);
        let running = id("cp-validate");
        d.create(create_req(&running, &bundle)).await;
        let c = &mut d.client;
        for bad in ["", "-x", "a/b", "..", &"n".repeat(129)] {
            let message = expect_code(
                c.create_checkpoint(checkpoint(&running, bad, false)).await,
                Code::InvalidArgument,
            );
            assert!(message.contains("checkpoint name"), "{message}");
        }
        let missing = CreateCheckpointRequest {
            id: running.clone(),
            checkpoint: None,
        };
        expect_code(c.create_checkpoint(missing).await, Code::InvalidArgument);
        expect_code(
            c.delete_checkpoint(delete(&running, "")).await,
            Code::InvalidArgument,
        );
        expect_code(
            c.delete_checkpoint(delete(&running, "nope")).await,
            Code::NotFound,
        );
        assert!(list(c, &running).await.is_empty());
        assert!(!bundle.path().join("checkpoints").join("n").exists());
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn hand_made_checkpoints_are_listed_refused_as_duplicates_and_deleted() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let container = id("cp-hand-made");
        d.create(create_req(&container, &bundle)).await;
        let dir = bundle.path().join("checkpoints");
        std::fs::create_dir_all(dir.join("plain")).unwrap();
        std::fs::create_dir_all(dir.join("flagged")).unwrap();
        std::fs::write(
            dir.join("flagged").join("berth-checkpoint.json"),
            r#"{"name":"flagged","exit":true,"tcp":true,"unix_sockets":false,"shell":true,"created":1}"#,
        )
        .unwrap();

        let c = &mut d.client;
        let listed = list(c, &container).await;
        let summary: Vec<_> = listed
            .iter()
            .map(|cp| (cp.name.as_str(), cp.exit, cp.tcp, cp.unix_sockets, cp.shell))
            .collect();
        assert_eq!(
            summary,
            [
                ("flagged", true, true, false, true),
                ("plain", false, false, false, false)
            ]
        );
        let message = expect_code(
            c.create_checkpoint(checkpoint(&container, "plain", false)).await,
            Code::AlreadyExists,
        );
        assert!(message.contains("plain"), "{message}");
        c.delete_checkpoint(delete(&container, "plain"))
            .await
            .expect("DeleteCheckpoint");
        assert!(!dir.join("plain").exists());
        let names: Vec<_> = list(c, &container).await.into_iter().map(|cp| cp.name).collect();
        assert_eq!(names, ["flagged"]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_dump_reports_criu_and_leaves_the_container_running() {
    within(async {
        if criu_works().is_ok() {
            skip("criu works on this host, so a dump does not fail here");
            return;
        }
        let mut d = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let container = id("cp-fails");
        let pid = d.create(create_req(&container, &bundle)).await;
        let mut events = d.events().await;

        let message = expect_code(
            d.client
                .create_checkpoint(checkpoint(&container, "c1", false))
                .await,
            Code::FailedPrecondition,
        );
        assert!(message.contains("runc checkpoint failed"), "{message}");
        assert!(
            message.to_lowercase().contains("criu"),
            "no CRIU text in: {message}"
        );
        assert!(!bundle.path().join("checkpoints").join("c1").exists());
        assert!(list(&mut d.client, &container).await.is_empty());

        let state = d.state().await;
        let still = state
            .containers
            .iter()
            .find(|c| c.id == container)
            .expect("still listed");
        assert_eq!(still.status, "running");
        assert_eq!(
            proc_stat(pid).map(|s| s.state),
            Some('S'),
            "the init still runs"
        );
        d.signal(&container, pid, SIGKILL).await;
        assert_eq!(events.exit_status(&container, pid).await, 137);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn dump_list_restore_delete_with_real_criu() {
    within(async {
        // Not CI-strict yet: this host's CRIU (3.17) fails `criu check` on its kernel, and
        // berthd cannot be pointed at another CRIU (no `--criu` flag yet).
        if let Err(why) = criu_works() {
            skip(&format!(
                "no working CRIU for a real checkpoint/restore cycle: {why} \
                 (berthd has no --criu flag to use another one yet)"
            ));
            return;
        }
        let mut d = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let container = id("cp-cycle");
        let pid = d.create(create_req(&container, &bundle)).await;
        let mut events = d.events().await;
        d.client
            .create_checkpoint(checkpoint(&container, "c1", true))
            .await
            .expect("CreateCheckpoint");
        let event = events
            .wait_for("checkpoint", |e| e.r#type == "checkpoint")
            .await;
        assert_eq!(event.checkpoint.map(|c| c.name).as_deref(), Some("c1"));
        // exit = true: the dump stops the container.
        events.exit_status(&container, pid).await;
        d.assert_gone(&container).await;

        let mut restore = create_req(&container, &bundle);
        restore.checkpoint = "c1".into();
        let restored = d.create(restore).await;
        let state = d.state().await;
        assert!(
            state
                .containers
                .iter()
                .any(|c| c.id == container && c.status == "running")
        );
        let names: Vec<_> = list(&mut d.client, &container)
            .await
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["c1"]);
        d.client
            .delete_checkpoint(delete(&container, "c1"))
            .await
            .expect("DeleteCheckpoint");
        d.signal(&container, restored, SIGKILL).await;
        assert_eq!(events.exit_status(&container, restored).await, 137);
    })
    .await
}
