//! AddProcess: what the added process runs as, where its stdio goes, and how it is tracked,
//! listed, signalled and reported.

use std::time::{Duration, Instant};

use crate::common::*;
use berth_api::proto::User;

#[tokio::test(flavor = "multi_thread")]
async fn add_process_runs_with_the_given_args_env_cwd_and_user() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("exec-spec", &["sleep", "1000"]).await;
        let out = d.dir().join("out");
        mkfifo(&out);
        let mut reader = Reader::open(&out);
        let script = "echo $GREETING; pwd; id -u; id -g; id -G";
        let mut req = exec_req(&ctr.id, &["/bin/sh", "-c", script]);
        req.env = vec!["PATH=/bin".into(), "GREETING=hello".into()];
        req.cwd = "/tmp".into();
        req.user = Some(User {
            uid: 1000,
            gid: 1001,
            additional_gids: vec![1002, 1003],
        });
        req.stdout = path_str(&out);
        let pid = d.exec(req.clone()).await;

        let text = reader.read_to_end().await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..4],
            ["hello", "/tmp", "1000", "1001"],
            "output: {text:?}"
        );
        let groups: Vec<&str> = lines[4].split_whitespace().collect();
        assert!(
            groups.contains(&"1002") && groups.contains(&"1003"),
            "groups: {groups:?}"
        );

        let started = events
            .wait_for("start-process", |e| {
                e.r#type == "start-process" && e.id == ctr.id
            })
            .await;
        assert_eq!(started.pid, pid);
        let process = started.process.expect("start-process carries the process");
        assert_eq!(process.args, req.args);
        assert_eq!(process.env, req.env);
        assert_eq!(process.cwd, "/tmp");
        assert_eq!(process.user, req.user);
        assert_eq!(events.exit_status(&ctr.id, pid).await, 0);

        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn add_process_defaults_to_the_container_user_and_env() {
    within(async {
        let mut d = daemon!();
        let id = id("exec-defaults");
        let bundle = Bundle::new(&["sleep", "1000"]);
        bundle.edit(|c| {
            c["process"]["user"] = serde_json::json!({"uid": 1234, "gid": 1234});
            let env = c["process"]["env"].as_array_mut().expect("spec env");
            env.push("FROM_SPEC=yes".into());
        });
        let mut events = d.events().await;
        let init = d.create(create_req(&id, &bundle)).await;
        let out = d.dir().join("out");
        mkfifo(&out);
        let mut reader = Reader::open(&out);
        let mut req = exec_req(&id, &["/bin/sh", "-c", "id -u; id -g; echo $FROM_SPEC"]);
        req.stdout = path_str(&out);
        let pid = d.exec(req).await;

        assert_eq!(reader.read_to_end().await, "1234\n1234\nyes\n");
        assert_eq!(events.exit_status(&id, pid).await, 0);
        d.kill_container(&mut events, &id, init).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// Whether `value` contains the string `s` anywhere in its tree.
fn holds_string(value: &serde_json::Value, s: &str) -> bool {
    match value {
        serde_json::Value::String(v) => v == s,
        serde_json::Value::Array(items) => items.iter().any(|v| holds_string(v, s)),
        serde_json::Value::Object(map) => map.values().any(|v| holds_string(v, s)),
        _ => false,
    }
}

fn saved_state(d: &Daemon, id: &str) -> serde_json::Value {
    let file = std::fs::read_to_string(d.state_file(id)).expect("state file");
    serde_json::from_str(&file).expect("state file is JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn added_process_is_a_child_of_berthd_listed_and_signalled() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("exec-track", &["sleep", "1000"]).await;
        let args = ["/bin/sleep", "999"];
        let mut req = exec_req(&ctr.id, &args);
        req.env = vec!["PATH=/bin".into(), "ADDED=1".into()];
        req.cwd = "/tmp".into();
        let child = d.exec(req).await;
        assert_eq!(proc_stat(child).expect("alive").ppid, d.pid());

        let st = d.state().await;
        let c = st
            .containers
            .iter()
            .find(|c| c.id == ctr.id)
            .expect("listed");
        let pids: Vec<u32> = c.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [ctr.pid, child], "init first, then the added process");
        let added = &c.processes[1];
        assert_eq!(added.args, args);
        assert_eq!(added.env, ["PATH=/bin", "ADDED=1"]);
        assert_eq!(added.cwd, "/tmp");
        assert!(!added.terminal);

        assert!(
            holds_string(&saved_state(&d, &ctr.id), "999"),
            "added process not saved"
        );

        d.signal(&ctr.id, child, SIGTERM).await;
        assert_eq!(events.exit_status(&ctr.id, child).await, 128 + SIGTERM);
        let st = d.state().await;
        let c = st
            .containers
            .iter()
            .find(|c| c.id == ctr.id)
            .expect("still listed");
        let pids: Vec<u32> = c.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [ctr.pid], "the exited process is no longer listed");
        assert!(proc_stat(child).is_none(), "the added process was reaped");
        // The exit is published first and the state file rewritten after it, by the store's
        // writer thread: the record drops the process within a bound, not at the event.
        let deadline = Instant::now() + SETTLE;
        loop {
            let saved = saved_state(&d, &ctr.id);
            if !holds_string(&saved, "999") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "state file still holds the exited process: {saved}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn added_process_exit_code_is_reported() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("exec-exit", &["sleep", "1000"]).await;
        for code in [0, 3, 255] {
            let script = format!("exit {code}");
            let pid = d.exec(exec_req(&ctr.id, &["/bin/sh", "-c", &script])).await;
            assert_eq!(events.exit_status(&ctr.id, pid).await, code);
        }
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn added_process_stdin_and_stdout_fifos() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("exec-stdin", &["sleep", "1000"]).await;
        let (input, output) = (d.dir().join("in"), d.dir().join("out"));
        mkfifo(&input);
        mkfifo(&output);
        // Held open across AddProcess so `cat` cannot see end-of-file before our data.
        let mut writer = open_rw(&input);
        let mut reader = Reader::open(&output);
        let mut req = exec_req(&ctr.id, &["/bin/cat"]);
        req.stdin = path_str(&input);
        req.stdout = path_str(&output);
        let pid = d.exec(req).await;

        std::io::Write::write_all(&mut writer, b"pong\n").expect("write stdin");
        assert_eq!(reader.read_until("pong\n").await, "pong\n");
        drop(writer);
        assert_eq!(reader.read_to_end().await, "pong\n");
        assert_eq!(events.exit_status(&ctr.id, pid).await, 0);
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// `/dev/null` is a stdio path like any other for a process with a terminal: input that ends at
/// once, output dropped (epoll takes no `/dev/null`, so it is relayed as a regular file is).
#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_relayed_to_dev_null_runs() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("tty-null", &["sleep", "1000"]).await;
        let mut req = exec_req(&ctr.id, &["/bin/sh", "-c", "[ -t 1 ] && echo tty-ok"]);
        req.terminal = true;
        req.stdin = "/dev/null".into();
        req.stdout = "/dev/null".into();
        let pid = d.exec(req).await;
        assert_eq!(events.exit_status(&ctr.id, pid).await, 0);

        let bundle = Bundle::new(&["/bin/sh", "-c", "[ -t 0 ] && exit 7"]);
        bundle.edit(|c| c["process"]["terminal"] = true.into());
        let id = id("tty-null-init");
        let mut req = create_req(&id, &bundle);
        req.stdin = "/dev/null".into();
        req.console = "/dev/null".into();
        let init = d.create(req).await;
        assert_eq!(events.exit_status(&id, init).await, 7);
        d.assert_gone(&id).await;
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn added_process_with_terminal_is_relayed_to_the_stdout_fifo() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("exec-tty", &["sleep", "1000"]).await;
        let out = d.dir().join("out");
        mkfifo(&out);
        let mut reader = Reader::open(&out);
        let mut req = exec_req(&ctr.id, &["/bin/sh", "-c", "[ -t 1 ] && echo tty-ok"]);
        req.terminal = true;
        req.stdout = path_str(&out);
        let pid = d.exec(req).await;

        // The newline's "\r\n" can come in a read of its own: wait for it too.
        let text = reader.read_until("tty-ok\r\n").await;
        assert_eq!(text, "tty-ok\r\n", "pty output");
        assert_eq!(events.exit_status(&ctr.id, pid).await, 0);
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_no_zombies().await;
    })
    .await
}
