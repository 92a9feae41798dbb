//! Terminals across a restart and an in-place upgrade: an upgrade hands the pty masters over
//! and the relays resume (the init's and an added process's); a restart loses them, which the
//! log and the container's record say.

use std::io::Write;
use std::path::Path;

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
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.state_file(&id)).expect("state file"))
                .expect("state file is JSON");
        assert_eq!(
            record["lost_terminals"],
            serde_json::json!([pid]),
            "record: {record}"
        );
        let mut events = d.events().await;
        d.kill_container(&mut events, &id, pid).await;
    })
    .await
}

/// A process echoing each line it reads, its terminal relayed to FIFOs the test holds open (so
/// neither reads as hung up while one image hands over to the next).
struct Echo {
    stdin: std::fs::File,
    reader: Reader,
    _out_kept: std::fs::File,
}

impl Echo {
    const SCRIPT: &str = "while read l; do echo \"got $l\"; done";

    fn fifos(d: &Daemon, name: &str) -> (String, String) {
        let (input, out) = (
            d.dir().join(format!("{name}-in")),
            d.dir().join(format!("{name}-out")),
        );
        mkfifo(&input);
        mkfifo(&out);
        (path_str(&input), path_str(&out))
    }

    /// Opens the FIFOs once berthd relays them (the stdin FIFO for writing needs its reader).
    fn open(stdin: &str, stdout: &str) -> Echo {
        Echo {
            stdin: open_rw(Path::new(stdin)),
            reader: Reader::open(Path::new(stdout)),
            _out_kept: open_rw(Path::new(stdout)),
        }
    }

    async fn echoes(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write stdin");
        let text = self.reader.read_until(&format!("got {line}")).await;
        assert!(
            text.contains(&format!("got {line}")),
            "pty output: {text:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_keeps_working_across_an_in_place_upgrade() {
    within(async {
        let mut d = daemon!();
        let id = id("tty-upgrade");
        let bundle = Bundle::new(&["sh", "-c", Echo::SCRIPT]);
        bundle.edit(|c| c["process"]["terminal"] = true.into());
        let (stdin, stdout) = Echo::fifos(&d, "init");
        let mut req = create_req(&id, &bundle);
        req.stdin = stdin.clone();
        req.stdout = stdout.clone();
        let pid = d.create(req).await;
        let mut init = Echo::open(&stdin, &stdout);
        init.echoes("before").await;
        // An added process's terminal is handed over and resumed too.
        let (stdin, stdout) = Echo::fifos(&d, "added");
        let mut req = exec_req(&id, &["sh", "-c", Echo::SCRIPT]);
        req.terminal = true;
        req.stdin = stdin.clone();
        req.stdout = stdout.clone();
        d.exec(req).await;
        let mut added = Echo::open(&stdin, &stdout);
        added.echoes("added-before").await;

        upgrade_in_place(&d.socket()).await;

        init.echoes("after").await;
        added.echoes("added-after").await;
        let log = d.log();
        assert!(
            !log.lines()
                .any(|l| l.contains("terminal lost") && l.contains(&id)),
            "terminal reported lost across the upgrade:\n{log}"
        );
        let record = std::fs::read_to_string(d.state_file(&id)).expect("state file");
        assert!(!record.contains("lost_terminals"), "record: {record}");
        let mut events = d.events().await;
        d.kill_container(&mut events, &id, pid).await;
    })
    .await
}
