//! A non-terminal init's FIFO stdio, which berthd relays through pipes of its own: output and
//! input across an in-place upgrade (nothing lost, stdin still open) and a restart (output
//! waited in the pipe; stdin was at end-of-file while berthd was away), and a client that does
//! not read holding the container up rather than berthd's memory. Checkpoints of such a
//! container are in `checkpoint`.

use std::time::{Duration, Instant};

use berth_api::proto::CreateContainerRequest;

use crate::common::*;

/// A counter printing n1, n2, ... five times a second on stdout, with a reader echoing each
/// line of stdin as `got <line>` (through fd 3: a background job's own stdin is /dev/null).
pub const TALKER: &str = "exec 3<&0; (while read l <&3; do echo \"got $l\"; done) & \
    i=0; while true; do i=$((i+1)); echo n$i; sleep 0.2; done";

/// The stdin and stdout FIFOs of one run of the talker, held open by the test: the stdin FIFO
/// read-write so it never reads as closed, and its output read from the start.
pub struct Talk {
    stdin: std::fs::File,
    pub reader: Reader,
    /// Of stdin and stdout.
    pub paths: (String, String),
}

impl Talk {
    pub fn new(d: &Daemon, name: &str) -> Talk {
        let (input, output) = (
            d.dir().join(format!("{name}-in")),
            d.dir().join(format!("{name}-out")),
        );
        mkfifo(&input);
        mkfifo(&output);
        Talk {
            stdin: open_rw(&input),
            reader: Reader::open(&output),
            paths: (path_str(&input), path_str(&output)),
        }
    }

    pub fn request(&self, id: &str, bundle: &Bundle, checkpoint: &str) -> CreateContainerRequest {
        let mut req = create_req(id, bundle);
        req.stdin = self.paths.0.clone();
        req.stdout = self.paths.1.clone();
        req.checkpoint = checkpoint.into();
        req
    }

    /// The counter's values printed so far.
    pub fn counts(&self) -> Vec<u64> {
        let text = self.reader.text();
        text.lines()
            .filter_map(|l| l.strip_prefix('n')?.parse().ok())
            .collect()
    }

    /// Waits until the counter printed `steps` more values than now; returns the last.
    pub async fn counted(&mut self, steps: usize) -> u64 {
        let wanted = self.counts().len() + steps;
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while self.counts().len() < wanted {
            assert!(
                Instant::now() < deadline,
                "the counter stalled: {:?}",
                self.reader.text()
            );
            let next = format!("n{}", self.counts().last().map_or(1, |n| n + 1));
            self.reader.read_until(&next).await;
        }
        *self.counts().last().expect("counted")
    }

    /// Sends a line to stdin and waits for its echo.
    pub async fn echoes(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}").expect("write stdin");
        let text = self.reader.read_until(&format!("got {line}")).await;
        assert!(text.contains(&format!("got {line}")), "output: {text:?}");
    }
}

/// The counter printed every value from its first to its last: none was lost on the way.
fn contiguous(talk: &Talk) {
    let counts = talk.counts();
    let first = counts[0];
    let expected: Vec<u64> = (first..first + counts.len() as u64).collect();
    assert_eq!(counts, expected, "values lost or repeated");
}

#[tokio::test(flavor = "multi_thread")]
async fn fifo_stdio_keeps_working_across_an_in_place_upgrade() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sh", "-c", TALKER]);
        let container = id("pipes-upgrade");
        let mut talk = Talk::new(&d, "talk");
        let pid = d.create(talk.request(&container, &bundle, "")).await;
        talk.counted(2).await;
        talk.echoes("before").await;

        upgrade_in_place(&d.socket()).await;

        talk.echoes("after").await;
        talk.counted(3).await;
        contiguous(&talk);
        let log = d.log();
        assert!(
            !log.contains("stdio not relayed") && !log.contains("stdin lost"),
            "stdio reported lost across the upgrade:\n{log}"
        );
        let mut events = d.events().await;
        d.kill_container(&mut events, &container, pid).await;
        talk.reader.read_to_end().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn fifo_output_waits_in_its_pipe_while_berthd_is_down_and_flows_after_a_restart() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sh", "-c", TALKER]);
        let container = id("pipes-restart");
        let mut talk = Talk::new(&d, "talk");
        let pid = d.create(talk.request(&container, &bundle, "")).await;
        talk.counted(2).await;
        // berthd's writer of the FIFO dies with it: a client that reads across a crash holds
        // one of its own, or sees end-of-file.
        let _out_kept = open_rw(std::path::Path::new(&talk.paths.1));

        d.crash();
        // Written while nobody relays: it waits in the pipe (the container holds a reader of
        // its own, so no SIGPIPE).
        tokio::time::sleep(Duration::from_millis(600)).await;
        d.start_again().await;
        talk.counted(3).await;
        contiguous(&talk);
        // Alive: a shell that has just written a line is running or about to sleep.
        let state = proc_stat(pid).map(|s| s.state);
        assert!(matches!(state, Some('R' | 'S')), "the init died: {state:?}");
        let mut events = d.events().await;
        d.kill_container(&mut events, &container, pid).await;
    })
    .await
}

/// berthd holds one chunk per stream: a container whose output nobody reads fills its pipe and
/// blocks, and berthd's memory does not grow with what it writes.
#[tokio::test(flavor = "multi_thread")]
async fn an_unread_fifo_blocks_the_container_not_berthds_memory() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sh", "-c", "while true; do echo 0123456789abcdef; done"]);
        let container = id("pipes-unread");
        let out = d.dir().join("out");
        mkfifo(&out);
        let mut req = create_req(&container, &bundle);
        req.stdout = path_str(&out);
        let pid = d.create(req).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = status_kib(d.pid(), "VmRSS");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let grown = status_kib(d.pid(), "VmRSS").saturating_sub(before);
        assert!(
            grown < 2048,
            "berthd grew by {grown} KiB with an unread FIFO"
        );
        let state = proc_stat(pid).map(|s| s.state);
        let mut reader = Reader::open(&out);
        let started = Instant::now();
        reader.read_until(&"0123456789abcdef\n".repeat(8192)).await;
        println!(
            "init state while unread: {state:?}; 128 KiB read in {:?}",
            started.elapsed()
        );
        let mut events = d.events().await;
        d.kill_container(&mut events, &container, pid).await;
    })
    .await
}

/// A create the runtime refuses after berthd made the pipes leaves none of them, nor a relay:
/// berthd's end of the client's FIFO closes (its reader sees end-of-file) and its fds settle.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_create_with_fifo_stdio_leaves_no_pipe_or_relay() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let mut warm = Talk::new(&d, "warm");
        let bundle = Bundle::new(&["sh", "-c", TALKER]);
        let warm_id = id("pipes-warm");
        let pid = d.create(warm.request(&warm_id, &bundle, "")).await;
        warm.echoes("warm").await;
        d.kill_container(&mut events, &warm_id, pid).await;
        warm.reader.read_to_end().await;
        let baseline = d.baseline();

        let missing = Bundle::new(&["/nonexistent"]);
        let container = id("pipes-refused");
        for attempt in 0..3 {
            let mut talk = Talk::new(&d, &format!("refused-{attempt}"));
            let refused = d
                .client
                .create_container(talk.request(&container, &missing, ""))
                .await;
            expect_code(refused, tonic::Code::FailedPrecondition);
            assert_eq!(talk.reader.read_to_end().await, "");
            d.assert_nothing_left(&container, &baseline).await;
        }
    })
    .await
}
