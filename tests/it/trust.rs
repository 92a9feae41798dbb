//! Who may do what (issue 11): a real berthd started with `--group 65534`, asked by root and by
//! a member of that group (uid/gid 65534, through `setpriv` around a Python grpc client), never
//! becomes the instrument of a request: paths are opened as the caller could open them, without
//! following links and never under the state dir; checkpoints stay beneath the bundle; Upgrade is
//! root's; state is private; restart adopts only what runc confirms; the lock file follows no
//! link; an upgrade whose pre-flight hangs or fails is refused while berthd keeps serving; a
//! member has at most its limit of operations in flight, also after giving up on them.

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_api::daemon_proto::{InfoRequest, UpgradeRequest};
use berth_api::proto::{DeleteCheckpointRequest, ListCheckpointRequest, StateRequest};
use tonic::Code;

use crate::common::*;

const PYTHON: &str = "/usr/bin/python3";
/// The unprivileged member of berthd's group.
const MEMBER: u32 = 65534;

/// `program` run as the member: uid and gid 65534, no other groups.
fn as_member(program: &str) -> Command {
    as_uid_in_group(MEMBER, program)
}

/// `program` run as `uid`, a member of berthd's group by its gid 65534, no other groups.
fn as_uid_in_group(uid: u32, program: &str) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args([
            format!("--reuid={uid}"),
            format!("--regid={MEMBER}"),
            "--clear-groups".into(),
        ])
        .arg(program);
    command
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

/// The Python client generated into a directory the member can read, or None after a loud skip.
struct MemberClient {
    generated: tempfile::TempDir,
    socket: PathBuf,
}

impl MemberClient {
    fn new(daemon: &Daemon) -> Option<MemberClient> {
        let python = Command::new(PYTHON)
            .args(["-c", "import grpc, grpc_tools"])
            .output()
            .map_err(|e| format!("{PYTHON}: {e}"))
            .and_then(|out| {
                out.status
                    .success()
                    .then_some(())
                    .ok_or_else(|| "python3-grpcio and python3-grpc-tools are not installed".into())
            });
        if !host_supports("needs python3 grpc and grpc_tools", python) {
            return None;
        }
        let setpriv = Command::new("setpriv").arg("--version").output();
        let setpriv = setpriv.map_err(|e| format!("setpriv: {e}")).map(|_| ());
        if !host_supports("needs setpriv (util-linux)", setpriv) {
            return None;
        }
        let generated = tempfile::TempDir::new().expect("temp dir");
        let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
        let protoc = Command::new(PYTHON)
            .args(["-m", "grpc_tools.protoc", "-I", proto])
            .arg(format!("--python_out={}", generated.path().display()))
            .arg(format!("--grpc_python_out={}", generated.path().display()))
            .args([
                format!("{proto}/api.proto"),
                format!("{proto}/daemon.proto"),
            ])
            .output()
            .expect("run grpc_tools.protoc");
        assert!(protoc.status.success(), "grpc_tools.protoc: {protoc:?}");
        chmod(generated.path(), 0o755);
        // The member reaches the socket through the daemon's temp dir.
        chmod(daemon.dir(), 0o711);
        Some(MemberClient {
            generated,
            socket: daemon.socket(),
        })
    }

    /// One request as uid/gid 65534 with no other groups: "OK …" or "<CODE> <message>".
    async fn ask(&self, op: &[&str]) -> String {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/trust/client.py");
        let mut command = as_member(PYTHON);
        command
            .arg(script)
            .arg(self.generated.path())
            .arg(&self.socket)
            .args(op);
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("run the member's client");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success() && !stdout.is_empty(),
            "member client failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    async fn create(&self, id: &str, bundle: &Bundle, stdio: [&str; 3]) -> String {
        let bundle = bundle.path_str();
        let [stdin, stdout, stderr] = stdio;
        self.ask(&["create", id, &bundle, stdin, stdout, stderr])
            .await
    }
}

/// A bundle the member may read (berthd checks that the caller can read what it names).
fn member_bundle(args: &[&str]) -> Bundle {
    let bundle = Bundle::new(args);
    chmod(bundle.path(), 0o755);
    chmod(&bundle.path().join("config.json"), 0o644);
    bundle
}

/// A bundle the member may read whose process runs as the member.
fn members_own_bundle(args: &[&str]) -> Bundle {
    let bundle = member_bundle(args);
    bundle.edit(|c| c["process"]["user"] = serde_json::json!({"uid": MEMBER, "gid": MEMBER}));
    bundle
}

/// A directory of the member's own, where it keeps its FIFOs and log files.
fn member_dir() -> tempfile::TempDir {
    let dir = tempfile::TempDir::new().expect("temp dir");
    chown(dir.path(), Some(MEMBER), Some(MEMBER)).expect("chown");
    chmod(dir.path(), 0o755);
    dir
}

fn member_file(path: &Path, text: &str) {
    fs::write(path, text).expect("write");
    chown(path, Some(MEMBER), Some(MEMBER)).expect("chown");
    chmod(path, 0o600);
}

/// Runs and kills one container (and an exec in it) so the baseline holds what berthd opens once
/// and keeps (io_uring, the events connection).
async fn warm_up(d: &mut Daemon) -> Baseline {
    let mut events = d.events().await;
    let ctr = d.run(&numbered("warm-up"), &["sleep", "1000"]).await;
    let child = d.exec(exec_req(&ctr.id, &["/bin/true"])).await;
    assert_eq!(events.exit_status(&ctr.id, child).await, 0);
    d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    d.assert_no_zombies().await;
    d.baseline()
}

fn expect(answer: &str, code: &str, words: &str) {
    assert!(
        answer.starts_with(code) && answer.contains(words),
        "expected {code} mentioning {words:?}, got: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_member_cannot_make_berthd_read_or_write_what_it_cannot() {
    within(async {
        let mut d = daemon!(Options::args(&["--group", "65534"]));
        let Some(member) = MemberClient::new(&d) else {
            return;
        };
        let baseline = warm_up(&mut d).await;
        let mine = member_dir();
        let out = mine.path().join("out.log");
        member_file(&out, "");
        let bundle = member_bundle(&["cat"]);
        let out_str = path_str(&out);

        // /etc/shadow as stdin: it may not read it, so nothing is copied.
        let id_ = id("shadow");
        let answer = member
            .create(&id_, &bundle, ["/etc/shadow", &out_str, ""])
            .await;
        expect(&answer, "PERMISSION_DENIED", "/etc/shadow");
        assert_eq!(fs::read_to_string(&out).unwrap(), "", "shadow was copied");

        // A root-only 0600 file as stdout: untouched.
        let secret = d.dir().join("root-only");
        fs::write(&secret, "root's\n").unwrap();
        chmod(&secret, 0o600);
        let secret_str = path_str(&secret);
        let answer = member.create(&id_, &bundle, ["", &secret_str, ""]).await;
        expect(&answer, "PERMISSION_DENIED", "may not");
        assert_eq!(fs::read_to_string(&secret).unwrap(), "root's\n");

        // A device other than /dev/null, and a directory: the wrong kind of file.
        let answer = member.create(&id_, &bundle, ["", "/dev/kmsg", ""]).await;
        expect(&answer, "INVALID_ARGUMENT", "character device");
        let answer = member
            .create(&id_, &bundle, [&path_str(mine.path()), "", ""])
            .await;
        expect(&answer, "INVALID_ARGUMENT", "directory");

        // A symbolic link to its own file: refused, no link is followed.
        let link = mine.path().join("link.log");
        symlink(&out, &link).unwrap();
        let answer = member
            .create(&id_, &bundle, ["", &path_str(&link), ""])
            .await;
        expect(&answer, "INVALID_ARGUMENT", "symbolic link");
        d.assert_nothing_left(&id_, &baseline).await;

        // The normal paths still work: a FIFO it made, /dev/null, its own log file (for a
        // process of its own uid: the runtime gives a stdio file to the process's user).
        let bundle = members_own_bundle(&["cat"]);
        let fifo = mine.path().join("in.fifo");
        mkfifo(&fifo);
        chown(&fifo, Some(MEMBER), Some(MEMBER)).unwrap();
        chmod(&fifo, 0o600);
        let mut events = d.events().await;
        // A writer before the create: a FIFO without one reads as end-of-file at once.
        let mut writer = open_rw(&fifo);
        std::io::Write::write_all(&mut writer, b"from the member\n").unwrap();
        let answer = member
            .create(&id_, &bundle, [&path_str(&fifo), &out_str, "/dev/null"])
            .await;
        assert!(answer.starts_with("OK "), "{answer}");
        let pid: u32 = answer[3..].parse().expect("a pid");
        drop(writer);
        assert_eq!(events.exit_status(&id_, pid).await, 0);
        assert_eq!(fs::read_to_string(&out).unwrap(), "from the member\n");
        d.assert_gone(&id_).await;
    })
    .await
}

/// runc gives each stdio file it is handed (but `/dev/null`) to the process's user: a chown
/// that would hand the member a file another user owns. So a member may not name one for a
/// process of its own uid, nor of root's, for a container or an added process; its own files
/// and FIFOs (which `berth exec` makes) work, as do the process's user's.
#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_never_takes_a_stdio_file_from_its_owner_for_a_member() {
    within(async {
        let mut d = daemon!(Options::args(&["--group", "65534"]));
        let Some(member) = MemberClient::new(&d) else {
            return;
        };
        let baseline = warm_up(&mut d).await;
        let mine = member_dir();
        let own = mine.path().join("own.log");
        member_file(&own, "");
        let others = mine.path().join("others.log");
        fs::write(&others, "").unwrap();
        chown(&others, Some(1234), Some(1234)).unwrap();
        chmod(&others, 0o666);
        let others_fifo = mine.path().join("others.fifo");
        mkfifo(&others_fifo);
        chown(&others_fifo, Some(1234), Some(1234)).unwrap();
        chmod(&others_fifo, 0o666);
        let as_root = member_bundle(&["sleep", "1000"]);
        let as_member = members_own_bundle(&["sleep", "1000"]);
        let owner = |path: &Path| std::os::unix::fs::MetadataExt::uid(&fs::metadata(path).unwrap());

        let id_ = id("given-away");
        let answer = member
            .create(&id_, &as_member, ["", &path_str(&others), ""])
            .await;
        expect(&answer, "PERMISSION_DENIED", "owned by uid 1234");
        let answer = member
            .create(&id_, &as_root, ["", "", &path_str(&others)])
            .await;
        expect(&answer, "PERMISSION_DENIED", "owned by uid 1234");
        d.assert_nothing_left(&id_, &baseline).await;

        let mut events = d.events().await;
        let answer = member
            .create(&id_, &as_member, ["", &path_str(&own), ""])
            .await;
        assert!(answer.starts_with("OK "), "{answer}");
        let pid: u32 = answer[3..].parse().expect("a pid");
        for (uid, stdout, owned_by) in [
            (MEMBER, &others, "owned by uid 1234"),
            (MEMBER, &others_fifo, "owned by uid 1234"),
            (0, &others_fifo, "owned by uid 1234"),
        ] {
            let answer = member
                .ask(&["exec", &id_, &uid.to_string(), &path_str(stdout), "true"])
                .await;
            expect(&answer, "PERMISSION_DENIED", owned_by);
        }
        let own_fifo = mine.path().join("own.fifo");
        mkfifo(&own_fifo);
        chown(&own_fifo, Some(MEMBER), Some(MEMBER)).unwrap();
        let mut reader = Reader::open(&own_fifo);
        let answer = member
            .ask(&["exec", &id_, "0", &path_str(&own_fifo), "echo", "as root"])
            .await;
        assert!(answer.starts_with("OK "), "{answer}");
        assert_eq!(reader.read_until("as root\n").await, "as root\n");
        let uid = MEMBER.to_string();
        let answer = member
            .ask(&["exec", &id_, &uid, &path_str(&own), "echo", "added"])
            .await;
        assert!(answer.starts_with("OK "), "{answer}");
        let added: u32 = answer[3..].parse().expect("a pid");
        assert_eq!(events.exit_status(&id_, added).await, 0);
        assert_eq!(fs::read_to_string(&own).unwrap(), "added\n");
        assert_eq!(
            (owner(&own), owner(&others), owner(&others_fifo)),
            (MEMBER, 1234, 1234)
        );
        d.kill_container(&mut events, &id_, pid).await;
    })
    .await
}

/// runc is given the spec berthd checked, not the bundle's `config.json`. Go's JSON parser takes
/// a later `"User"` for `"user"`: without the copy, a config berthd reads as a root process,
/// whose stdout may be a file of root's, would run as the member, and runc would give the
/// member that file. (Swapping `config.json` between berthd's read and runc's did the same.)
#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_runs_the_spec_berthd_checked() {
    within(async {
        let mut d = daemon!(Options::args(&["--group", "65534"]));
        let Some(member) = MemberClient::new(&d) else {
            return;
        };
        let mine = member_dir();
        let roots = mine.path().join("roots.log");
        fs::write(&roots, "").unwrap();
        chmod(&roots, 0o666);
        let bundle = member_bundle(&["sleep", "1000"]);
        let mut spec = bundle.config();
        spec["process"].as_object_mut().unwrap().remove("user");
        let text = serde_json::to_string_pretty(&spec).unwrap().replacen(
            "\"process\": {",
            &format!(
                "\"process\": {{\"user\": {{\"uid\": 0, \"gid\": 0}}, \"User\": {{\"uid\": {MEMBER}, \"gid\": {MEMBER}}},"
            ),
            1,
        );
        fs::write(bundle.path().join("config.json"), text).unwrap();

        let mut events = d.events().await;
        let id_ = id("checked-spec");
        let answer = member
            .create(&id_, &bundle, ["", &path_str(&roots), ""])
            .await;
        assert!(answer.starts_with("OK "), "{answer}");
        let pid: u32 = answer[3..].parse().expect("a pid");
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert_eq!(
            uids.split_whitespace().nth(1),
            Some("0"),
            "the init runs as berthd read the config: {uids}"
        );
        let owner = std::os::unix::fs::MetadataExt::uid(&fs::metadata(&roots).unwrap());
        assert_eq!(owner, 0, "runc gave root's file to the process's user");
        let given = d.state_dir().join("runtime.configs").join(&id_);
        let copy: serde_json::Value =
            serde_json::from_slice(&fs::read(given.join("config.json")).unwrap()).unwrap();
        assert!(copy["process"].get("User").is_none(), "{copy}");
        assert_eq!(
            copy["root"]["path"],
            path_str(&bundle.path().join("rootfs")).as_str()
        );
        d.kill_container(&mut events, &id_, pid).await;
    })
    .await
}

/// The runtime is given berthd's copy of the spec as the bundle, so OCI hooks run in it and are
/// told it: the files beside the client's `config.json` are there too (links to them), so a
/// relative hook path, a hook that reads a file in its working directory and one that reads
/// one in the bundle it is told still find them.
#[tokio::test(flavor = "multi_thread")]
async fn hooks_find_the_bundles_files_in_the_runtimes_copy() {
    within(async {
        if builtin_runtime() {
            return;
        }
        let mut d = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        fs::write(bundle.path().join("marker"), "beside the config\n").unwrap();
        let out = bundle.path().join("hook.out");
        write_script(
            bundle.path(),
            "hook.sh",
            &format!(
                "#!/bin/sh\nbundle=$(sed 's/.*\"bundle\": *\"\\([^\"]*\\)\".*/\\1/')\n\
                 {{ cat marker; cat \"$bundle/marker\"; }} > {}\n",
                path_str(&out)
            ),
        );
        bundle.edit(|c| {
            c["hooks"] = serde_json::json!({
                "createRuntime": [{"path": "./hook.sh", "args": ["hook.sh"]}]
            });
        });
        let mut events = d.events().await;
        let id_ = id("hooks-see-the-bundle");
        let pid = d.create(create_req(&id_, &bundle)).await;
        assert_eq!(
            fs::read_to_string(&out).unwrap(),
            "beside the config\nbeside the config\n"
        );
        d.kill_container(&mut events, &id_, pid).await;
    })
    .await
}

/// Sets `path`'s access ACL to `entries` (tag, permissions, id; the xattr form), as `setfacl`
/// would; false after a loud skip where the file system keeps no ACLs.
fn set_access_acl(path: &Path, entries: &[(u16, u16, u32)]) -> bool {
    let mut acl = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    let set = rustix::fs::setxattr(
        path,
        "system.posix_acl_access",
        &acl,
        rustix::fs::XattrFlags::empty(),
    );
    host_supports(
        "needs POSIX ACLs in the temp dir",
        set.map_err(|e| format!("setxattr {}: {e}", path.display())),
    )
}

/// Whether the kernel lets the member write `path` (`test -w`, which asks `access(2)`).
fn member_may_write(path: &Path) -> bool {
    as_member("test")
        .arg("-w")
        .arg(path)
        .status()
        .expect("setpriv test -w")
        .success()
}

/// A file's access ACL decides what the member may name, as the kernel decides, where its mode
/// bits alone would decide otherwise: a named entry that refuses the member a file every other
/// user may write, and one that grants it a file whose mode bits show only the ACL's mask.
#[tokio::test(flavor = "multi_thread")]
async fn a_files_acl_decides_what_the_member_may_name_as_the_kernel_does() {
    const UNDEFINED: u32 = u32::MAX;
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    within(async {
        let mut d = daemon!(Options::args(&["--group", "65534"]));
        let Some(member) = MemberClient::new(&d) else {
            return;
        };
        let dir = tempfile::TempDir::new().expect("temp dir");
        chmod(dir.path(), 0o755);
        let bundle = member_bundle(&["echo", "from the container"]);
        let id_ = id("acl");

        // Mode 0666, but u:65534:--- in its ACL.
        let refused = dir.path().join("refused.log");
        fs::write(&refused, "").unwrap();
        let denies_the_member = [
            (USER_OBJ, 6, UNDEFINED),
            (USER, 0, MEMBER),
            (GROUP_OBJ, 6, UNDEFINED),
            (MASK, 6, UNDEFINED),
            (OTHER, 6, UNDEFINED),
        ];
        if !set_access_acl(&refused, &denies_the_member) {
            return;
        }
        assert_eq!(mode(&refused), 0o666);
        assert!(!member_may_write(&refused), "the kernel refuses the member");
        let answer = member
            .create(&id_, &bundle, ["", &path_str(&refused), ""])
            .await;
        expect(&answer, "PERMISSION_DENIED", "may not");
        assert_eq!(fs::read_to_string(&refused).unwrap(), "");

        // Root's, mode 0660 (the group bits are the mask), and u:65534:rw in its ACL.
        let granted = dir.path().join("granted.log");
        fs::write(&granted, "").unwrap();
        let grants_the_member = [
            (USER_OBJ, 6, UNDEFINED),
            (USER, 6, MEMBER),
            (GROUP_OBJ, 0, UNDEFINED),
            (MASK, 6, UNDEFINED),
            (OTHER, 0, UNDEFINED),
        ];
        assert!(set_access_acl(&granted, &grants_the_member));
        assert_eq!(mode(&granted), 0o660);
        assert!(
            member_may_write(&granted),
            "the kernel lets the member write"
        );
        let mut events = d.events().await;
        let answer = member
            .create(&id_, &bundle, ["", &path_str(&granted), ""])
            .await;
        assert!(answer.starts_with("OK "), "{answer}");
        let pid: u32 = answer[3..].parse().expect("a pid");
        assert_eq!(events.exit_status(&id_, pid).await, 0);
        assert_eq!(
            fs::read_to_string(&granted).unwrap(),
            "from the container\n"
        );
        d.assert_gone(&id_).await;
    })
    .await
}

/// A cgroup the member owns (as systemd delegates them) has a `cgroup.procs` the member may
/// write; the kernel judges a write there by who opened the file, so berthd, which opens as
/// root, refuses it and every file of the kernel's interface file systems as stdio.
#[tokio::test(flavor = "multi_thread")]
async fn the_members_own_cgroup_procs_is_not_a_containers_stdout() {
    within(async {
        let mut d = daemon!(Options::args(&["--group", "65534"]));
        let Some(member) = MemberClient::new(&d) else {
            return;
        };
        let baseline = warm_up(&mut d).await;
        let mount = cgroup_mounts().into_iter().next().expect("a cgroup mount");
        let id_ = id("cgroup-procs");
        let cgroup = mount.dir.join(&id_);
        let made = fs::create_dir(&cgroup).map_err(|e| format!("mkdir {}: {e}", cgroup.display()));
        if !host_supports("needs a writable cgroup hierarchy", made) {
            return;
        }
        let procs = cgroup.join("cgroup.procs");
        chown(&procs, Some(MEMBER), Some(MEMBER)).expect("delegate cgroup.procs");
        assert!(member_may_write(&procs));
        // Were it taken, the pid written would be beyond any pid_max: no process would move.
        let bundle = member_bundle(&["echo", "4194305"]);
        let answer = member
            .create(&id_, &bundle, ["", &path_str(&procs), ""])
            .await;
        fs::remove_dir(&cgroup).expect("rmdir the member's cgroup");
        expect(&answer, "INVALID_ARGUMENT", "kernel interface");
        d.assert_nothing_left(&id_, &baseline).await;
    })
    .await
}

/// Opens argv[2] connections, each sending HTTP/2's preface and SETTINGS, waits (10 s at most)
/// until each has an answer (berthd's SETTINGS: it holds a place and has spoken) or is closed,
/// prints how many are answered and open, and holds them until stdin ends. Waiting for every
/// answer matters: one of them still silent when the table fills would give way to a newcomer.
const HOLD: &str = r#"
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    try:
        s.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    except OSError:
        pass
    s.setblocking(False)
    held.append(s)
answered, closed = set(), set()
deadline = time.monotonic() + 10
while len(answered | closed) < len(held) and time.monotonic() < deadline:
    for i, s in enumerate(held):
        if i in closed:
            continue
        try:
            while True:
                data = s.recv(4096)
                if data == b"":
                    closed.add(i)
                    break
                answered.add(i)
        except BlockingIOError:
            pass
        except OSError:
            closed.add(i)
    time.sleep(0.05)
print(len(answered - closed), flush=True)
sys.stdin.read()
"#;

/// Runs [`HOLD`] as `uid` (a member by its group, gid 65534) with `count` connections; returns
/// the process (holding them until dropped) and how many berthd kept.
async fn hold_as(d: &Daemon, uid: u32, count: usize) -> (tokio::process::Child, usize) {
    let mut holder = tokio::process::Command::from(as_uid_in_group(uid, PYTHON))
        .args(["-c", HOLD])
        .arg(d.socket())
        .arg(count.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run a member's connections");
    let mut kept = String::new();
    let stdout = holder.stdout.take().expect("stdout");
    tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(stdout), &mut kept)
        .await
        .expect("read the count");
    let kept = kept.trim().parse().expect("a count");
    (holder, kept)
}

/// `count` new connections of root's, each answered within [`SETTLE`] (`why` if one is not),
/// kept open by the caller.
async fn roots_answered(d: &Daemon, count: usize, why: &str) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..count {
        let mut client = d.connect().await;
        let answer = tokio::time::timeout(SETTLE, state(&mut client)).await;
        assert!(answer.is_ok(), "{why}");
        clients.push(client);
    }
    clients
}

/// The member's 12 connections ([`HOLD`]) must leave it 8 places, and root `free` more.
async fn member_keeps_8_of_12_and_root_gets_in(d: &Daemon, free: usize) {
    let (mut holder, kept) = hold_as(d, MEMBER, 12).await;
    assert_eq!(kept, 8, "connections berthd kept for the member");
    // The places the member could not take serve others meanwhile (the test's own client
    // holds one).
    let _clients = roots_answered(d, free, "a place was left for root").await;
    drop(holder.stdin.take());
    holder.wait().await.expect("the member's connections end");
}

/// One uid's connections, each of which has spoken (so none gives way), cannot take every place:
/// past `--max-connections-per-uid` the next is closed at once, and others still get in.
#[tokio::test(flavor = "multi_thread")]
async fn one_uids_connections_cannot_take_every_place() {
    within(async {
        let d = daemon!(Options::args(&[
            "--group",
            "65534",
            "--max-connections",
            "20",
            "--max-connections-per-uid",
            "8",
        ]));
        if MemberClient::new(&d).is_none() {
            return;
        }
        member_keeps_8_of_12_and_root_gets_in(&d, 10).await;
    })
    .await
}

/// Where the connections in effect are fewer than `--max-connections-per-uid` (its default 128
/// here; a quarter of a low open file limit does the same), one uid still gets at most half.
#[tokio::test(flavor = "multi_thread")]
async fn one_uid_gets_at_most_half_of_a_lowered_connection_limit() {
    within(async {
        let d = daemon!(Options::args(&[
            "--group",
            "65534",
            "--max-connections",
            "16"
        ]));
        if MemberClient::new(&d).is_none() {
            return;
        }
        member_keeps_8_of_12_and_root_gets_in(&d, 7).await;
        assert!(
            d.log().contains("--max-connections-per-uid lowered"),
            "the lowering is not logged:\n{}",
            d.log()
        );
    })
    .await
}

/// Two uids may hold every place between them (each at most half). Root still gets in, on
/// places of its own, and a third uid's connection is closed at once instead of holding up the
/// accept loop (and so root) until a place frees.
#[tokio::test(flavor = "multi_thread")]
async fn members_holding_every_place_lock_out_neither_root_nor_the_accept_loop() {
    within(async {
        let d = daemon!(Options::args(&[
            "--group",
            "65534",
            "--max-connections",
            "8",
            "--max-connections-per-uid",
            "4",
            "--handshake-timeout",
            "60s",
        ]));
        if MemberClient::new(&d).is_none() {
            return;
        }
        // The test's own client holds one of the 8 places.
        let (_first, kept) = hold_as(&d, MEMBER, 4).await;
        assert_eq!(kept, 4, "the first member's connections");
        let (_second, kept) = hold_as(&d, MEMBER - 1, 4).await;
        assert_eq!(kept, 3, "the second member's, with every place taken");
        let _roots = roots_answered(&d, 4, "root is locked out with every place held").await;
        let (_third, kept) = hold_as(&d, MEMBER - 2, 1).await;
        assert_eq!(kept, 0, "a third member's connection with every place held");
        let past = tokio::time::timeout(SETTLE, async {
            let mut client = d.connect().await;
            state(&mut client).await
        });
        assert!(
            past.await.is_err(),
            "root past its own places waits for one"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn berthds_own_state_is_refused_as_stdio_even_to_root() {
    within(async {
        let mut d = daemon!();
        let victim = d.run("victim", &["sleep", "1000"]).await;
        let baseline = warm_up(&mut d).await;
        let record = d.state_file(&victim.id);
        let before = fs::read(&record).unwrap();
        let id_ = id("overwrite");
        let bundle = Bundle::new(&["true"]);
        let mut req = create_req(&id_, &bundle);
        req.stdout = path_str(&record);
        let message = expect_code(d.client.create_container(req).await, Code::PermissionDenied);
        assert!(message.contains("state directory"), "{message}");
        assert_eq!(fs::read(&record).unwrap(), before, "the record was written");
        d.assert_nothing_left(&id_, &baseline).await;
        // A console is checked even where the process has no terminal to use it for.
        let mut req = create_req(&id_, &bundle);
        req.console = path_str(&record);
        let message = expect_code(d.client.create_container(req).await, Code::PermissionDenied);
        assert!(message.contains("state directory"), "{message}");
        d.assert_nothing_left(&id_, &baseline).await;

        // The wrong kind of file (issue 10): a directory as stdout, an overlong bundle path.
        let mut req = create_req(&id_, &bundle);
        req.stdout = path_str(bundle.path());
        expect_code(d.client.create_container(req).await, Code::InvalidArgument);
        let mut req = create_req(&id_, &bundle);
        req.bundle_path = format!("/{}", "b".repeat(300));
        expect_code(
            d.client.create_container(req.clone()).await,
            Code::InvalidArgument,
        );
        req.bundle_path = format!("/{}", "b/".repeat(3000));
        let message = expect_code(d.client.create_container(req).await, Code::InvalidArgument);
        assert!(message.chars().count() < 400, "{message}");
        d.assert_nothing_left(&id_, &baseline).await;
        // Paths a terminal replaces are checked all the same: stderr always, stdout beside a
        // console, stdin beside a console that is a terminal.
        let tty = Bundle::new(&["true"]);
        tty.edit(|c| c["process"]["terminal"] = true.into());
        let console = d.dir().join("console.fifo");
        mkfifo(&console);
        let mut req = create_req(&id_, &tty);
        req.stderr = path_str(&record);
        let message = expect_code(d.client.create_container(req).await, Code::PermissionDenied);
        assert!(message.contains("stderr"), "{message}");
        let mut req = create_req(&id_, &tty);
        req.console = path_str(&console);
        req.stdout = path_str(bundle.path());
        let message = expect_code(d.client.create_container(req).await, Code::InvalidArgument);
        assert!(message.contains("stdout"), "{message}");
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let terminal = ptsname(&master, Vec::new()).expect("ptsname");
        let mut req = create_req(&id_, &tty);
        req.console = terminal.to_str().expect("terminal path").to_owned();
        req.stdin = path_str(&record);
        let message = expect_code(d.client.create_container(req).await, Code::PermissionDenied);
        assert!(message.contains("stdin"), "{message}");
        d.assert_nothing_left(&id_, &baseline).await;
        let mut events = d.events().await;
        d.kill_container(&mut events, &victim.id, victim.pid).await;
    })
    .await
}

/// Every close of a regular file on FUSE waits, uninterruptibly, for its server to answer a
/// flush, and berthd, its spawn helper and runc each close their copy of a stdio descriptor;
/// every stat of a FIFO there asks the server too: a server that never answered would stall the
/// reactor, or the helper and with it every runtime command. So a FIFO or file on FUSE is
/// refused as stdio or console; the same file by its own path is taken.
#[tokio::test(flavor = "multi_thread")]
async fn stdio_on_fuse_is_refused() {
    within(async {
        let mut d = daemon!();
        let (source, mount) = (tempfile::TempDir::new(), tempfile::TempDir::new());
        let (source, mount) = (source.expect("temp dir"), mount.expect("temp dir"));
        let Some(_mirror) = FuseMirror::mount(source.path(), mount.path()) else {
            return;
        };
        let baseline = warm_up(&mut d).await;
        let log = source.path().join("log");
        fs::write(&log, "").unwrap();
        mkfifo(&source.path().join("fifo"));
        let id_ = id("fuse-stdio");
        let bundle = Bundle::new(&["echo", "written"]);
        for name in ["log", "fifo"] {
            let on_fuse = path_str(&mount.path().join(name));
            let mut req = create_req(&id_, &bundle);
            req.stdout = on_fuse.clone();
            let message = expect_code(d.client.create_container(req).await, Code::InvalidArgument);
            assert!(
                message.contains("FUSE") && message.contains("stdout"),
                "{message}"
            );
            d.assert_nothing_left(&id_, &baseline).await;
            let mut req = create_req(&id_, &bundle);
            req.console = on_fuse;
            let message = expect_code(d.client.create_container(req).await, Code::InvalidArgument);
            assert!(
                message.contains("FUSE") && message.contains("console"),
                "{message}"
            );
            d.assert_nothing_left(&id_, &baseline).await;
        }
        let mut events = d.events().await;
        let mut req = create_req(&id_, &bundle);
        req.stdout = path_str(&log);
        let pid = d
            .client
            .create_container(req)
            .await
            .expect("create")
            .into_inner()
            .pid;
        assert_eq!(events.exit_status(&id_, pid).await, 0);
        assert_eq!(fs::read_to_string(&log).unwrap(), "written\n");
        d.assert_gone(&id_).await;
        // An added process's stdio, read as well as written, is checked the same way.
        let ctr = d.run("fuse-exec", &["sleep", "1000"]).await;
        let mut req = exec_req(&ctr.id, &["true"]);
        req.stdin = path_str(&mount.path().join("fifo"));
        let message = expect_code(d.client.add_process(req).await, Code::InvalidArgument);
        assert!(
            message.contains("FUSE") && message.contains("stdin"),
            "{message}"
        );
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_or_dev_zero_config_is_refused_while_others_are_served() {
    within(async {
        // A berthd that opened or read either would wait the client-file timeout, far above
        // what a busy host adds to a State.
        let mut d = daemon!(Options::args(&["--client-file-timeout", "30"]));
        let mut other = d.connect().await;
        let baseline = warm_up(&mut d).await;
        let id_ = id("fifo-config");
        let fifo = Bundle::new(&["true"]);
        fs::remove_file(fifo.path().join("config.json")).unwrap();
        mkfifo(&fifo.path().join("config.json"));
        let zero = Bundle::new(&["true"]);
        fs::remove_file(zero.path().join("config.json")).unwrap();
        symlink("/dev/zero", zero.path().join("config.json")).unwrap();
        for (bundle, words) in [(&fifo, "FIFO"), (&zero, "symbolic link")] {
            let started = Instant::now();
            let (created, state) =
                tokio::join!(d.client.create_container(create_req(&id_, bundle)), async {
                    let answer = other.state(StateRequest::default()).await;
                    (answer, started.elapsed())
                });
            let message = expect_code(created, Code::InvalidArgument);
            assert!(message.contains(words), "{message}");
            let (state, took) = state;
            state.expect("State beside the refused create");
            assert!(took < Duration::from_secs(10), "State took {took:?}");
            d.assert_nothing_left(&id_, &baseline).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_config_at_restart_delays_nothing() {
    within(async {
        let mut d = daemon!();
        let c = d.run("fifo-restart", &["sleep", "1000"]).await;
        fs::remove_file(c.bundle.path().join("config.json")).unwrap();
        mkfifo(&c.bundle.path().join("config.json"));
        let started = Instant::now();
        // A restart that opened it would wait the client-file timeout (30 s here).
        d.crash();
        d.start_again_with(Options::args(&["--client-file-timeout", "30"]))
            .await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "restart took {took:?}");
        let state = d.state().await;
        assert!(
            state.containers.iter().any(|x| x.id == c.id),
            "not adopted: {state:?}"
        );
        let mut events = d.events().await;
        d.kill_container(&mut events, &c.id, c.pid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_through_a_symlink_are_neither_listed_nor_deleted() {
    within(async {
        let mut d = daemon!();
        let c = d.run("cp-link", &["sleep", "1000"]).await;
        let elsewhere = tempfile::TempDir::new().unwrap();
        let target = elsewhere.path().join("victim");
        fs::create_dir(&target).unwrap();
        chmod(&target, 0o700);
        fs::write(target.join("keep"), "precious").unwrap();
        symlink(elsewhere.path(), c.bundle.path().join("checkpoints")).unwrap();

        let listed = d
            .client
            .list_checkpoint(ListCheckpointRequest { id: c.id.clone() })
            .await;
        let message = expect_code(listed, Code::InvalidArgument);
        assert!(message.contains("symbolic link"), "{message}");
        let deleted = d
            .client
            .delete_checkpoint(DeleteCheckpointRequest {
                id: c.id.clone(),
                name: "victim".into(),
            })
            .await;
        let message = expect_code(deleted, Code::InvalidArgument);
        assert!(message.contains("symbolic link"), "{message}");
        assert_eq!(fs::read_to_string(target.join("keep")).unwrap(), "precious");
        assert_eq!(mode(&target), 0o700);

        // A real checkpoints directory holding a link named like a checkpoint: not listed, and
        // deleting it removes nothing it points to.
        fs::remove_file(c.bundle.path().join("checkpoints")).unwrap();
        fs::create_dir(c.bundle.path().join("checkpoints")).unwrap();
        symlink(&target, c.bundle.path().join("checkpoints/victim")).unwrap();
        let listed = d
            .client
            .list_checkpoint(ListCheckpointRequest { id: c.id.clone() })
            .await
            .expect("ListCheckpoint")
            .into_inner();
        assert!(listed.checkpoints.is_empty(), "{listed:?}");
        let deleted = d
            .client
            .delete_checkpoint(DeleteCheckpointRequest {
                id: c.id.clone(),
                name: "victim".into(),
            })
            .await;
        expect_code(deleted, Code::InvalidArgument);
        assert_eq!(fs::read_to_string(target.join("keep")).unwrap(), "precious");
        let mut events = d.events().await;
        d.kill_container(&mut events, &c.id, c.pid).await;
    })
    .await
}

/// An idle stream costs berthd a few KiB, so one uid (not root) has at most
/// `--max-streams-per-uid` Events and GetStats streams open at once; the one past it is
/// RESOURCE_EXHAUSTED naming the flag, and a stream that ends gives its place back.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_has_at_most_its_streams_open_and_gets_their_places_back() {
    within(async {
        let d = daemon!(Options::args(&[
            "--group",
            "65534",
            "--max-streams-per-uid",
            "2"
        ]));
        let Some(member) = MemberClient::new(&d) else {
            return;
        };
        let answer = member.ask(&["streams", "2"]).await;
        assert_eq!(answer, "OK open,open,RESOURCE_EXHAUSTED;open");
    })
    .await
}

/// A member that asks for State on many connections giving their streams no window, and reads
/// nothing, has berthd make answers ahead of its reading only within its uid's budget (four of
/// the largest messages, 16 MiB by default) across all its connections, not ANSWERS_AHEAD on
/// each (1 MB answers, 32 connections: 128 MB).
#[tokio::test(flavor = "multi_thread")]
async fn a_members_unread_answers_hold_no_more_than_its_budget_across_its_connections() {
    within(async {
        let mut d = daemon!(Options::args(&[
            "--group",
            "65534",
            "--max-process-spec-bytes",
            "1100000"
        ]));
        let Some(member) = MemberClient::new(&d) else {
            return;
        };
        // About 1 MB of State: its init's args, which `sh -c` takes past its script.
        let filler = "x".repeat(4000);
        let mut args = vec!["sh", "-c", "sleep 600", "sh"];
        args.extend(std::iter::repeat_n(filler.as_str(), 250));
        let big = d.run("big-unread", &args).await;
        let mut events = d.events().await;
        let rss_before = status_kib(d.pid(), "VmRSS");
        let holding =
            tokio::spawn(async move { member.ask(&["unread-state", "32", "4", "8"]).await });
        tokio::time::sleep(Duration::from_secs(5)).await;
        let grown = status_kib(d.pid(), "VmRSS").saturating_sub(rss_before);
        assert_eq!(holding.await.expect("join"), "OK 128");
        assert!(
            grown < 40 * 1024,
            "berthd's RSS grew by {grown} KiB for 128 unread answers of 1 MB"
        );
        d.kill_container(&mut events, &big.id, big.pid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_is_refused_to_a_group_member() {
    within(async {
        let mut d = daemon!(Options::args(&["--group", "65534"]));
        let Some(member) = MemberClient::new(&d) else {
            return;
        };
        let answer = member.ask(&["upgrade"]).await;
        expect(&answer, "PERMISSION_DENIED", "only uid 0");
        assert!(member.ask(&["state"]).await.starts_with("OK "));
        let mut admin = berth_api::client::connect_daemon(&d.socket())
            .await
            .expect("connect to the Daemon service");
        let info = admin.info(InfoRequest {}).await.expect("Info").into_inner();
        assert_eq!(info.pid, d.pid());
        let log = d.log();
        let audit = log
            .lines()
            .find(|l| l.contains("berth::audit") && l.contains("Daemon.Upgrade"));
        assert!(
            audit.is_some_and(|l| l.contains("65534")),
            "no audit line:\n{log}"
        );
        d.state().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn state_files_are_private() {
    within(async {
        let mut d = daemon!(Options::args(&["--group", "65534"]));
        let bundle = Bundle::new(&["sleep", "1000"]);
        bundle.edit(|c| c["process"]["env"] = vec!["PATH=/bin", "DB_PASSWORD=hunter2"].into());
        let id_ = id("private");
        let pid = d.create(create_req(&id_, &bundle)).await;
        let record = d.state_file(&id_);
        assert_eq!(mode(&d.state_dir()), 0o700);
        assert_eq!(mode(&record), 0o600);
        chmod(d.dir(), 0o711);
        let read = as_member("cat")
            .arg(&record)
            .output()
            .expect("run cat as the member");
        assert!(!read.status.success(), "the member read the record");
        assert!(!String::from_utf8_lossy(&read.stdout).contains("hunter2"));

        // An existing state dir with open modes is made private at start.
        chmod(&d.state_dir(), 0o755);
        d.kill_and_restart().await;
        assert_eq!(mode(&d.state_dir()), 0o700);
        let mut events = d.events().await;
        d.kill_container(&mut events, &id_, pid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_record_is_not_adopted() {
    within(async {
        let mut d = daemon!();
        let real = d.run("template", &["sleep", "1000"]).await;
        let tampered = d.run("tampered", &["sleep", "1000"]).await;
        // A host process the forged records name, with its true start time.
        let mut host = Command::new("sleep").arg("1000").spawn().expect("sleep");
        let stat = fs::read_to_string(format!("/proc/{}/stat", host.id())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let start_time: u64 = fields[19].parse().unwrap();
        let forge = |record: &mut serde_json::Value| {
            record["init"]["pid"] = host.id().into();
            record["init"]["start_time"] = start_time.into();
        };
        let read = |id: &str| -> serde_json::Value {
            serde_json::from_slice(&fs::read(d.state_file(id)).unwrap()).unwrap()
        };
        // A record of an id the runtime does not know, and a running container's own record.
        let forged = id("forged");
        let mut record = read(&real.id);
        record["id"] = forged.clone().into();
        forge(&mut record);
        fs::write(d.state_file(&forged), record.to_string()).unwrap();
        let mut record = read(&tampered.id);
        forge(&mut record);
        fs::write(d.state_file(&tampered.id), record.to_string()).unwrap();

        d.kill_and_restart().await;
        let state = d.state().await;
        let ids: Vec<&str> = state.containers.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            [real.id.as_str()],
            "only the confirmed record is adopted"
        );
        for id_ in [&forged, &tampered.id] {
            let signalled = d
                .client
                .signal(berth_api::proto::SignalRequest {
                    id: id_.clone(),
                    pid: host.id(),
                    signal: 9,
                })
                .await;
            expect_code(signalled, Code::NotFound);
        }
        assert!(host.try_wait().unwrap().is_none(), "the host process died");
        assert!(!d.state_file(&forged).exists(), "forged record left");
        assert!(d.state_file(&real.id).exists(), "the real record went too");
        assert!(d.log().contains("does not confirm"), "{}", d.log());
        // The tampered container itself is not killed on the forger's word: it is left running
        // in the runtime for an operator.
        assert!(proc_stat(tampered.pid).is_some_and(|s| s.state != 'Z'));
        let runtime = d.state_dir().join("runtime");
        let deleted = Command::new("runc")
            .arg("--root")
            .arg(&runtime)
            .args(["delete", "--force", &tampered.id])
            .output()
            .expect("runc delete");
        assert!(deleted.status.success(), "{deleted:?}");
        host.kill().unwrap();
        host.wait().unwrap();
        let mut events = d.events().await;
        d.kill_container(&mut events, &real.id, real.pid).await;
    })
    .await
}

/// A member's FIFOs replaced while berthd was down: the restarted berthd opens the recorded
/// paths again as the member may, and only as FIFOs, so neither a root-only file, nor a
/// root-only FIFO, nor even a file of the member's own receives the containers' output.
#[tokio::test(flavor = "multi_thread")]
async fn stdio_reopened_after_a_restart_is_opened_as_the_client_who_named_it() {
    within(async {
        let group = ["--group", "65534"];
        let mut d = daemon!(Options::args(&group));
        let Some(member) = MemberClient::new(&d) else {
            return;
        };
        let mine = member_dir();
        let bundle = member_bundle(&["sh", "-c", "while :; do echo tick; sleep 0.1; done"]);
        let mut readers = Vec::new();
        let mut created = Vec::new();
        for name in ["as-file", "as-fifo", "as-own-file"] {
            let fifo = mine.path().join(format!("{name}.fifo"));
            mkfifo(&fifo);
            chown(&fifo, Some(MEMBER), Some(MEMBER)).unwrap();
            chmod(&fifo, 0o600);
            readers.push(open_rw(&fifo));
            let id_ = id(&format!("reopen-{name}"));
            let answer = member
                .create(&id_, &bundle, ["", &path_str(&fifo), ""])
                .await;
            assert!(answer.starts_with("OK "), "{answer}");
            let pid: u32 = answer[3..].parse().expect("a pid");
            created.push((id_, pid, fifo));
        }
        d.crash();
        // Root's file and root's FIFO, each moved in where a member's FIFO was.
        let secret = mine.path().join("root-only");
        fs::write(&secret, "root's\n").unwrap();
        chmod(&secret, 0o600);
        fs::rename(&secret, &created[0].2).unwrap();
        let root_fifo = mine.path().join("root-only.fifo");
        mkfifo(&root_fifo);
        chmod(&root_fifo, 0o600);
        let mut root_reader = open_rw(&root_fifo);
        fs::rename(&root_fifo, &created[1].2).unwrap();
        let own = mine.path().join("own.log");
        member_file(&own, "the member's\n");
        fs::rename(&own, &created[2].2).unwrap();
        d.start_again_with(Options::args(&group)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            fs::read_to_string(&created[0].2).unwrap(),
            "root's\n",
            "berthd wrote a container's output into a file the member may not write"
        );
        assert_eq!(
            fs::read_to_string(&created[2].2).unwrap(),
            "the member's\n",
            "berthd took a regular file for the FIFO it recorded"
        );
        use std::os::fd::AsRawFd;
        let flags = rustix::fs::OFlags::NONBLOCK;
        rustix::fs::fcntl_setfl(&root_reader, flags).unwrap();
        let mut got = [0u8; 64];
        let read = std::io::Read::read(&mut root_reader, &mut got);
        assert!(
            read.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "berthd wrote to a FIFO the member may not write: {read:?} (fd {})",
            root_reader.as_raw_fd()
        );
        assert!(d.log().contains("stdio not relayed"), "{}", d.log());
        let mut events = d.events().await;
        for (id_, pid, _) in &created {
            d.kill_container(&mut events, id_, *pid).await;
        }
        drop(readers);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlinked_lock_file_is_left_untouched() {
    within(async {
        if !ready() {
            return;
        }
        let dir = tempfile::TempDir::new().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let socket = dir.path().join("berth.sock");
        symlink(&victim, dir.path().join("berth.sock.lock")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_berthd"))
            .arg("--listen")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .output()
            .expect("run berthd");
        assert!(
            !out.status.success(),
            "berthd started through a linked lock"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("symbolic link"), "{stderr}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    })
    .await
}

/// `--listen` (or `--metrics-listen`) naming a file by mistake: berthd replaced it with its
/// socket, deleting the file.
#[tokio::test(flavor = "multi_thread")]
async fn a_listen_path_that_is_not_a_socket_is_refused_and_kept() {
    within(async {
        if !ready() {
            return;
        }
        let dir = tempfile::TempDir::new().unwrap();
        let file = dir.path().join("notes");
        fs::write(&file, "precious").unwrap();
        let link = dir.path().join("link");
        symlink(&file, &link).unwrap();
        for (flag, path) in [
            ("--listen", &file),
            ("--listen", &link),
            ("--metrics-listen", &file),
        ] {
            let mut command = Command::new(env!("CARGO_BIN_EXE_berthd"));
            command.arg("--state-dir").arg(dir.path().join("state"));
            if flag == "--listen" {
                command.arg("--listen").arg(path);
            } else {
                command
                    .arg("--listen")
                    .arg(dir.path().join("berth.sock"))
                    .arg("--metrics-listen")
                    .arg(path);
            }
            let out = command.output().expect("run berthd");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "berthd started at {flag} {path:?}");
            assert!(stderr.contains("is not a socket"), "{stderr}");
            assert_eq!(fs::read_to_string(&file).unwrap(), "precious");
            assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_whose_preflight_hangs_or_fails_is_refused() {
    within(async {
        let bin_dir = tempfile::TempDir::new().unwrap();
        let binary = bin_dir.path().join("berthd");
        fs::copy(env!("CARGO_BIN_EXE_berthd"), &binary).expect("copy berthd");
        let mut d = daemon!(Options {
            binary: Some(&binary),
            ..Options::default()
        });
        let pid = d.pid();
        let mut admin = berth_api::client::connect_daemon(&d.socket())
            .await
            .expect("connect to the Daemon service");
        // Answers --version as berthd would, then hangs at start; then one that fails.
        let hangs = "#!/bin/sh\ncase \"$*\" in *--version*) echo 'berthd 9.9.9'; exit 0;; esac\nexec sleep 1000\n";
        let fails = "#!/bin/sh\necho 'berthd 9.9.9'\nexit 3\n";
        for (script, words) in [(hangs, "did not finish"), (fails, "failed")] {
            fs::remove_file(&binary).unwrap();
            fs::write(&binary, script).unwrap();
            chmod(&binary, 0o755);
            let started = Instant::now();
            let status = admin
                .upgrade(UpgradeRequest {})
                .await
                .expect_err("an upgrade to a binary that cannot start");
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert!(status.message().contains(words), "{status:?}");
            assert!(started.elapsed() < Duration::from_secs(20));
            let info = admin.info(InfoRequest {}).await.expect("Info").into_inner();
            assert_eq!(info.pid, pid);
            d.state().await;
        }
        let c = d.run("after-refusals", &["sleep", "1000"]).await;
        let mut events = d.events().await;
        d.kill_container(&mut events, &c.id, c.pid).await;
    })
    .await
}

/// An operation counts against its uid until it ends, not until its client stops waiting: a
/// member that asks for creates and gives up on each at once still has at most its limit in
/// flight, the next one refused before the runtime sees it, while root's go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_has_at_most_its_limit_of_operations_in_flight_after_giving_up_on_them() {
    within(async {
        let scripts = tempfile::tempdir().expect("temp dir");
        let hold = scripts.path().join("hold");
        let arrived = scripts.path().join("arrived");
        fs::write(&hold, "").unwrap();
        // Real runc, except that a command on a container named held-… waits for the test.
        let body = format!(
            r#"#!/bin/sh
for arg in "$@"; do
    case "$arg" in
    held-*)
        echo "$arg" >> '{arrived}'
        while [ -e '{hold}' ]; do sleep 0.05; done ;;
    esac
done
exec '{runc}' "$@"
"#,
            arrived = arrived.display(),
            hold = hold.display(),
            runc = runc_in_path().display()
        );
        let wrapper = write_script(scripts.path(), "holding-runc", &body);
        let runtime = path_str(&wrapper);
        let flags = [
            "--group",
            "65534",
            "--runtime",
            &runtime,
            "--max-operations-per-uid",
            "2",
        ];
        let mut d = daemon!(Options::args(&flags));
        let Some(member) = MemberClient::new(&d) else {
            return;
        };
        let mut events = d.events().await;
        let bundle = member_bundle(&["sleep", "1000"]);
        let bundle_str = bundle.path_str();
        let held = [id("held-a"), id("held-b")];
        for id_ in &held {
            let answer = member
                .ask(&["create-within", "1", id_, &bundle_str, "", "", ""])
                .await;
            // Given up at its deadline: by the client's own timer, or, where the client runs
            // later than berthd, by tonic's answer to the expired grpc-timeout.
            let given_up = answer.starts_with("DEADLINE_EXCEEDED")
                || answer.starts_with("CANCELLED Timeout expired");
            assert!(given_up, "{answer}");
        }

        // No request of the member's is open now, but both creates still are.
        let third = id("held-c");
        let answer = member
            .ask(&["create-within", "10", &third, &bundle_str, "", "", ""])
            .await;
        expect(&answer, "RESOURCE_EXHAUSTED", "--max-operations-per-uid");
        let runtime_saw = fs::read_to_string(&arrived).unwrap_or_default();
        assert!(!runtime_saw.contains(&third), "{runtime_saw}");
        let root_s = d.run("while-held", &["sleep", "1000"]).await;

        // Both creates finish for real once the runtime goes on, and give their places back.
        fs::remove_file(&hold).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut pids = Vec::new();
        while pids.len() < held.len() {
            assert!(Instant::now() < deadline, "the held creates did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let state = d.state().await;
            pids = held
                .iter()
                .filter_map(|id_| {
                    let container = state.containers.iter().find(|c| &c.id == id_)?;
                    Some((id_.clone(), container.processes.first()?.pid))
                })
                .collect();
        }
        let answer = member.create(&third, &bundle, ["", "", ""]).await;
        assert!(answer.starts_with("OK "), "{answer}");
        pids.push((third.clone(), answer[3..].parse().expect("a pid")));
        pids.push((root_s.id.clone(), root_s.pid));
        for (id_, pid) in pids {
            d.kill_container(&mut events, &id_, pid).await;
        }
        d.assert_no_zombies().await;
    })
    .await
}
