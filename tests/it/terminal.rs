//! Terminals across a restart: berthd does not yet hand pty masters over, so an adopted
//! container with a terminal keeps running and its lost terminal is stated in the log.

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_lost_at_restart_is_logged_and_the_container_adopted() {
    within(async {
        let mut d = daemon!();
        let id = id("tty-restart");
        let bundle = Bundle::new(&["sh", "-c", "echo up; sleep 1000"]);
        bundle.edit(|c| c["process"]["terminal"] = true.into());
        let out = d.dir().join("out");
        mkfifo(&out);
        let mut reader = Reader::open(&out);
        let mut req = create_req(&id, &bundle);
        req.stdout = path_str(&out);
        let pid = d.create(req).await;
        reader.read_until("up").await;

        d.kill_and_restart().await;
        let listed = d.state().await;
        let adopted = listed
            .containers
            .iter()
            .find(|c| c.id == id)
            .expect("adopted after the restart");
        assert_eq!(adopted.processes[0].pid, pid);
        let log = d.log();
        assert!(
            log.lines()
                .any(|l| l.contains("terminal lost") && l.contains(&id)),
            "no terminal-lost line for {id} in:\n{log}"
        );
        let mut events = d.events().await;
        d.kill_container(&mut events, &id, pid).await;
    })
    .await
}
