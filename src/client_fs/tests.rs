//! The client_fs functions against real files, directories, FIFOs, devices and links.

use super::peer::parse_status;
use super::*;
use rustix::fs::OFlags;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::sync::mpsc;
use std::time::Duration;

fn nobody() -> Peer {
    Peer {
        pid: 0,
        uid: 65534,
        gid: 65534,
        groups: Vec::new(),
    }
}

/// A temporary directory that everyone may search (tempfile makes them 0700).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::TempDir::new().unwrap();
    chmod(dir.path(), 0o755);
    dir
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    chmod(path, 0o666); // past the umask
}

/// Runs `f` on a thread and fails, instead of hanging, if it blocks.
fn within_a_second<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the call blocked")
}

fn stdio(path: &Path, access: Access, peer: &Peer) -> Result<OwnedFd> {
    open_stdio("stdout", path, access, peer, &[])
}

fn invalid(result: Result<impl std::fmt::Debug>) -> String {
    match result {
        Err(Error::InvalidArgument(message)) => message,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

fn denied(result: Result<impl std::fmt::Debug>) -> String {
    let err = result.expect_err("expected PermissionDenied");
    let message = err.to_string();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{message}");
    message
}

#[test]
fn symlinks_anywhere_on_the_path_are_refused() {
    let dir = open_tempdir();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("file"), "x").unwrap();
    symlink(&real, dir.path().join("via")).unwrap();
    symlink(real.join("file"), dir.path().join("link")).unwrap();
    let root = Peer::root();

    let leaf = dir.path().join("link");
    let message = invalid(stdio(&leaf, Access::Write, &root));
    assert!(
        message.contains("symbolic link") && message.contains(&shown(&leaf)),
        "{message}"
    );
    invalid(read_regular("config", &leaf, 100, &root, &[]));

    let middle = dir.path().join("via/file");
    let message = invalid(stdio(&middle, Access::Write, &root));
    assert!(
        message.contains(&format!(
            "{} is a symbolic link",
            shown(&dir.path().join("via"))
        )),
        "{message}"
    );
    invalid(read_regular("config", &middle, 100, &root, &[]));
    invalid(open_dir("bundle", &dir.path().join("via"), &root, &[]));
    // The real path works.
    assert_eq!(
        read_regular("config", &real.join("file"), 100, &root, &[]).unwrap(),
        b"x"
    );
}

#[test]
fn a_path_in_a_message_has_its_control_characters_escaped() {
    assert_eq!(shown(Path::new("/tmp/a b/ü")), "/tmp/a b/ü");
    assert_eq!(
        shown(Path::new("/tmp/f\0\n\x1b[2J")),
        "/tmp/f\\0\\n\\u{1b}[2J"
    );
    let message = invalid(stdio(
        Path::new(OsStr::from_bytes(b"/tmp/f\0x")),
        Access::Write,
        &Peer::root(),
    ));
    assert!(
        !message.contains('\0') && message.contains("\\0"),
        "{message}"
    );
}

#[test]
fn a_path_ending_in_a_slash_names_only_a_directory_as_the_kernel_takes_it() {
    let dir = open_tempdir();
    let root = Peer::root();
    let file = dir.path().join("out.log");
    std::fs::write(&file, "").unwrap();
    let fifo = dir.path().join("out.fifo");
    mkfifo(&fifo);
    for path in [&file, &fifo] {
        let slashed = PathBuf::from(format!("{}/", path.display()));
        let message = invalid(stdio(&slashed, Access::Write, &root));
        assert!(message.contains("ends in '/'"), "{message}");
        assert!(
            std::fs::File::open(&slashed).is_err(),
            "the kernel takes it"
        );
        stdio(path, Access::Write, &root).unwrap();
    }
}

#[test]
fn stdio_refuses_directories_sockets_and_devices_but_takes_dev_null() {
    let dir = open_tempdir();
    let root = Peer::root();
    let message = invalid(stdio(dir.path(), Access::Write, &root));
    assert!(
        message.contains("is a directory; give a FIFO, /dev/null or a regular file"),
        "{message}"
    );
    let socket = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    assert!(invalid(stdio(&socket, Access::Write, &root)).contains("a socket"));
    for device in ["/dev/zero", "/dev/kmsg", "/dev/tty"] {
        let device = Path::new(device);
        if device.exists() {
            let message = invalid(stdio(device, Access::Read, &root));
            assert!(
                message.contains("character device other than /dev/null"),
                "{message}"
            );
        }
    }
    for access in [Access::Read, Access::Write] {
        stdio(Path::new("/dev/null"), access, &root).unwrap();
        stdio(Path::new("/dev/null"), access, &nobody()).unwrap();
    }
}

#[test]
fn fifos_open_without_a_peer_and_are_handed_over_blocking() {
    let dir = open_tempdir();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let path = fifo.clone();
    let fd = within_a_second(move || stdio(&path, Access::Write, &Peer::root())).unwrap();
    let flags = rustix::fs::fcntl_getfl(&fd).unwrap();
    assert!(flags.contains(OFlags::RDWR) && !flags.contains(OFlags::NONBLOCK));
    let path = fifo.clone();
    within_a_second(move || stdio(&path, Access::Read, &Peer::root())).unwrap();
    // The 0666 FIFO is open to everyone; only its own directory matters.
    within_a_second(move || stdio(&fifo, Access::Write, &nobody())).unwrap();
}

#[test]
fn regular_files_for_output_are_appended_to_not_truncated() {
    let dir = open_tempdir();
    let file = dir.path().join("log");
    std::fs::write(&file, "kept\n").unwrap();
    let fd = stdio(&file, Access::Write, &Peer::root()).unwrap();
    rustix::io::write(&fd, b"added\n").unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept\nadded\n");
    let flags = rustix::fs::fcntl_getfl(&fd).unwrap();
    assert!(flags.contains(OFlags::WRONLY | OFlags::APPEND));
}

#[test]
fn missing_paths_are_never_created() {
    let dir = open_tempdir();
    let missing = dir.path().join("out");
    let message = invalid(stdio(&missing, Access::Write, &Peer::root()));
    assert!(
        message.contains(&shown(&missing)) && message.contains("mkfifo"),
        "{message}"
    );
    assert!(!missing.exists());
    let missing_dir = dir.path().join("no/config.json");
    assert!(matches!(
        read_regular("config", &missing_dir, 10, &Peer::root(), &[]),
        Err(Error::NotFound(m)) if m.contains(&shown(&missing_dir))
    ));
    assert!(matches!(
        open_dir("bundle", &dir.path().join("no"), &Peer::root(), &[]),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn the_peer_needs_the_access_it_asks_for() {
    let dir = open_tempdir();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root only").unwrap();
    chmod(&secret, 0o600);
    let message = denied(stdio(&secret, Access::Read, &nobody()));
    assert!(
        message.contains(&shown(&secret)) && message.contains("uid 65534"),
        "{message}"
    );
    denied(stdio(&secret, Access::Write, &nobody()));
    denied(read_regular("config", &secret, 100, &nobody(), &[]));
    assert_eq!(
        read_regular("config", &secret, 100, &Peer::root(), &[]).unwrap(),
        b"root only"
    );
    stdio(&secret, Access::Write, &Peer::root()).unwrap();

    // Readable by everyone but writable only by root.
    chmod(&secret, 0o644);
    read_regular("config", &secret, 100, &nobody(), &[]).unwrap();
    stdio(&secret, Access::Read, &nobody()).unwrap();
    denied(stdio(&secret, Access::Write, &nobody()));

    // Group bits count for the peer's primary and supplementary groups.
    chmod(&secret, 0o640);
    std::os::unix::fs::chown(&secret, Some(0), Some(4242)).unwrap();
    denied(read_regular("config", &secret, 100, &nobody(), &[]));
    let member = Peer {
        groups: vec![4242],
        ..nobody()
    };
    read_regular("config", &secret, 100, &member, &[]).unwrap();
    // The owner's bits apply to the owner, even when they grant less than the others'.
    chmod(&secret, 0o066);
    std::os::unix::fs::chown(&secret, Some(65534), Some(0)).unwrap();
    denied(read_regular("config", &secret, 100, &nobody(), &[]));
}

#[test]
fn a_file_in_a_directory_the_peer_cannot_search_is_refused() {
    let dir = open_tempdir();
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    chmod(&private, 0o700);
    let file = private.join("open");
    std::fs::write(&file, "{}").unwrap();
    chmod(&file, 0o644);
    let message = denied(read_regular("config", &file, 100, &nobody(), &[]));
    assert!(
        message.contains(&format!("may not search {}", shown(&private))),
        "{message}"
    );
    denied(stdio(&file, Access::Read, &nobody()));
    denied(open_dir("bundle", &private, &nobody(), &[]));
    assert_eq!(
        read_regular("config", &file, 100, &Peer::root(), &[]).unwrap(),
        b"{}"
    );
    chmod(&private, 0o711);
    read_regular("config", &file, 100, &nobody(), &[]).unwrap();
    open_dir("bundle", &private, &nobody(), &[]).unwrap();
}

#[test]
fn paths_inside_the_forbidden_directory_are_refused() {
    let dir = open_tempdir();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("containers")).unwrap();
    let record = state.join("containers/a.json");
    std::fs::write(&record, "{}").unwrap();
    let forbidden: &[&Path] = &[&state];
    let root = Peer::root();
    let message = denied(open_stdio(
        "stdout",
        &record,
        Access::Write,
        &root,
        forbidden,
    ));
    assert!(
        message.contains("inside berthd's state directory"),
        "{message}"
    );
    denied(read_regular("config", &record, 100, &root, forbidden));
    denied(open_dir("bundle", &state, &root, forbidden));
    denied(open_dir(
        "bundle",
        &state.join("containers"),
        &root,
        forbidden,
    ));
    // A bind mount or other name for the same directory is the same directory: a hard link
    // to a file in it is caught as that file is not, but its directory is.
    let outside = dir.path().join("outside");
    std::fs::write(&outside, "").unwrap();
    open_stdio("stdout", &outside, Access::Write, &root, forbidden).unwrap();
}

#[test]
fn read_regular_refuses_fifos_devices_and_large_files() {
    let dir = open_tempdir();
    let root = Peer::root();
    let fifo = dir.path().join("config.json");
    mkfifo(&fifo);
    let path = fifo.clone();
    let message = invalid(within_a_second(move || {
        read_regular("config", &path, 100, &Peer::root(), &[])
    }));
    assert!(
        message.contains("is a FIFO, not a regular file"),
        "{message}"
    );
    invalid(read_regular(
        "config",
        Path::new("/dev/zero"),
        100,
        &root,
        &[],
    ));
    invalid(read_regular(
        "config",
        Path::new("/dev/null"),
        100,
        &root,
        &[],
    ));
    invalid(read_regular("config", dir.path(), 100, &root, &[]));

    let big = dir.path().join("big.json");
    std::fs::write(&big, vec![b' '; 101]).unwrap();
    let message = invalid(read_regular("config", &big, 100, &root, &[]));
    assert!(
        message.contains("101 bytes") && message.contains("limit of 100 bytes"),
        "{message}"
    );
    assert_eq!(
        read_regular("config", &big, 101, &root, &[]).unwrap().len(),
        101
    );
    let small = dir.path().join("small.json");
    std::fs::write(&small, "{}").unwrap();
    assert_eq!(
        read_regular("config", &small, 100, &root, &[]).unwrap(),
        b"{}"
    );
}

#[test]
fn malformed_paths_are_refused_before_any_lookup() {
    let root = Peer::root();
    let long = format!("/{}", "a/".repeat(2100));
    for path in [
        "",
        "relative/config.json",
        "/tmp/../etc/shadow",
        "/tmp/./x",
        "/tmp/..",
        long.as_str(),
    ] {
        let message = invalid(read_regular("config", Path::new(path), 100, &root, &[]));
        assert!(message.chars().count() < 400, "{message}");
        invalid(stdio(Path::new(path), Access::Write, &root));
    }
    let nul = OsStr::from_bytes(b"/tmp/a\0b");
    invalid(open_dir("bundle", Path::new(nul), &root, &[]));
    invalid(stdio(Path::new("/"), Access::Write, &root));
}

#[test]
fn peers_get_their_groups_from_proc_and_must_still_hold_their_ids() {
    let me = Peer::from_credentials(std::process::id(), 0, 0).unwrap();
    assert!(me.is_root());
    let status =
        b"Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t4 27 100 \n";
    assert_eq!(
        parse_status(status, 7, 1000, 100).unwrap(),
        vec![4, 27, 100]
    );
    denied(parse_status(status, 7, 1001, 100));
    assert!(parse_status(b"Uid:\t1\t1\t1\t1\nGid:\t1\t1\t1\t1\nGroups:\t1 2", 7, 1, 1).is_err());
    // Our own process, as seen by a peer with our (root) ids but asked as non-root.
    let text = std::fs::read(format!("/proc/{}/status", std::process::id())).unwrap();
    assert!(parse_status(&text, 1, 0, 0).is_ok());
    assert!(matches!(
        Peer::from_credentials(u32::MAX - 1, 1000, 1000),
        Err(Error::Unavailable(_))
    ));
}

fn bundle() -> (tempfile::TempDir, OwnedFd) {
    let dir = open_tempdir();
    std::fs::create_dir(dir.path().join("checkpoints")).unwrap();
    let fd = open_dir("bundle", dir.path(), &Peer::root(), &[]).unwrap();
    (dir, fd)
}

#[test]
fn list_dirs_beneath_lists_real_directories_only() {
    let (dir, fd) = bundle();
    let checkpoints = dir.path().join("checkpoints");
    std::fs::create_dir(checkpoints.join("b")).unwrap();
    std::fs::create_dir(checkpoints.join("a")).unwrap();
    std::fs::write(checkpoints.join("file"), "").unwrap();
    let outside = open_tempdir();
    symlink(outside.path(), checkpoints.join("linked")).unwrap();
    let names = list_dirs_beneath(&fd, Path::new("checkpoints"), &Peer::root(), 10).unwrap();
    assert_eq!(names, ["a", "b"]);
    assert!(matches!(
        list_dirs_beneath(&fd, Path::new("checkpoints"), &Peer::root(), 1),
        Err(Error::ResourceExhausted(m)) if m.contains("more than 1 directories")
    ));
    let empty = bundle();
    std::fs::remove_dir(empty.0.path().join("checkpoints")).unwrap();
    assert!(
        list_dirs_beneath(&empty.1, Path::new("checkpoints"), &Peer::root(), 10)
            .unwrap()
            .is_empty()
    );

    // A symlinked checkpoints directory is not followed.
    let (dir, fd) = bundle();
    std::fs::remove_dir(dir.path().join("checkpoints")).unwrap();
    std::fs::create_dir(outside.path().join("theirs")).unwrap();
    symlink(outside.path(), dir.path().join("checkpoints")).unwrap();
    invalid(list_dirs_beneath(
        &fd,
        Path::new("checkpoints"),
        &Peer::root(),
        10,
    ));
}

#[test]
fn open_beneath_refuses_links_and_dot_dot() {
    let (dir, fd) = bundle();
    let root = Peer::root();
    std::fs::create_dir(dir.path().join("checkpoints/cp1")).unwrap();
    std::fs::write(
        dir.path().join("checkpoints/cp1/berth-checkpoint.json"),
        "{}",
    )
    .unwrap();
    open_beneath(
        &fd,
        Path::new("checkpoints/cp1"),
        OFlags::RDONLY | OFlags::DIRECTORY,
        &root,
    )
    .unwrap();
    let file = open_beneath(
        &fd,
        Path::new("checkpoints/cp1/berth-checkpoint.json"),
        OFlags::RDONLY,
        &root,
    )
    .unwrap();
    let mut text = String::new();
    std::fs::File::from(file).read_to_string(&mut text).unwrap();
    assert_eq!(text, "{}");
    assert!(matches!(
        open_beneath(&fd, Path::new("checkpoints/cp2"), OFlags::PATH, &root),
        Err(Error::NotFound(m)) if m.contains("cp2")
    ));
    for name in ["checkpoints/../..", "../x", "checkpoints/./cp1", "/etc", ""] {
        invalid(open_beneath(&fd, Path::new(name), OFlags::PATH, &root));
    }

    let outside = open_tempdir();
    std::fs::create_dir(outside.path().join("cp1")).unwrap();
    std::fs::remove_dir_all(dir.path().join("checkpoints")).unwrap();
    symlink(outside.path(), dir.path().join("checkpoints")).unwrap();
    let message = invalid(open_beneath(
        &fd,
        Path::new("checkpoints/cp1"),
        OFlags::PATH,
        &root,
    ));
    assert!(message.contains("symbolic link"), "{message}");
    // A link as the last component is refused too.
    std::fs::remove_file(dir.path().join("checkpoints")).unwrap();
    std::fs::create_dir(dir.path().join("checkpoints")).unwrap();
    symlink(
        outside.path().join("cp1"),
        dir.path().join("checkpoints/cp1"),
    )
    .unwrap();
    invalid(open_beneath(
        &fd,
        Path::new("checkpoints/cp1"),
        OFlags::PATH,
        &root,
    ));
    assert!(matches!(
        open_beneath(
            &fd,
            Path::new("checkpoints"),
            OFlags::RDONLY | OFlags::CREATE,
            &root
        ),
        Err(Error::Internal(_))
    ));
}

#[test]
fn open_beneath_checks_the_peer() {
    let (dir, fd) = bundle();
    std::fs::create_dir(dir.path().join("checkpoints/cp1")).unwrap();
    chmod(&dir.path().join("checkpoints"), 0o700);
    denied(open_beneath(
        &fd,
        Path::new("checkpoints/cp1"),
        OFlags::PATH,
        &nobody(),
    ));
    chmod(&dir.path().join("checkpoints"), 0o755);
    open_beneath(&fd, Path::new("checkpoints/cp1"), OFlags::RDONLY, &nobody()).unwrap();
    denied(remove_beneath(&fd, Path::new("checkpoints/cp1"), &nobody()));
    assert!(dir.path().join("checkpoints/cp1").exists());
}

/// A peer removes through berthd only what it could remove itself: not another uid's tree that
/// it may not empty, though it may write the directory holding it, nor another's entry in a
/// sticky directory; its own tree goes.
#[test]
fn remove_beneath_empties_only_what_the_peer_could() {
    use std::os::unix::fs::chown;
    let (dir, fd) = bundle();
    let checkpoints = dir.path().join("checkpoints");
    chmod(&checkpoints, 0o777);
    let others = checkpoints.join("others");
    std::fs::create_dir_all(others.join("inner")).unwrap();
    std::fs::write(others.join("inner/pages-1.img"), "x").unwrap();
    chmod(&others, 0o755);
    let message = denied(remove_beneath(
        &fd,
        Path::new("checkpoints/others"),
        &nobody(),
    ));
    assert!(
        message.contains("may not remove what is in it"),
        "{message}"
    );
    assert!(others.join("inner/pages-1.img").exists());

    let mine = checkpoints.join("mine");
    std::fs::create_dir_all(mine.join("inner")).unwrap();
    std::fs::write(mine.join("inner/pages-1.img"), "x").unwrap();
    for path in [&mine, &mine.join("inner/pages-1.img")] {
        chown(path, Some(65534), Some(65534)).unwrap();
    }
    // In a sticky directory that is not its own (as /tmp), another uid's file is not the
    // peer's to remove; its own is.
    chmod(&mine.join("inner"), 0o1777);
    std::fs::write(mine.join("inner/roots"), "x").unwrap();
    let message = denied(remove_beneath(
        &fd,
        Path::new("checkpoints/mine"),
        &nobody(),
    ));
    assert!(message.contains("sticky"), "{message}");
    assert!(mine.join("inner/roots").exists());
    std::fs::remove_file(mine.join("inner/roots")).unwrap();
    // An empty directory goes with write on its parent alone, as rmdir takes it.
    std::fs::create_dir(mine.join("empty-roots")).unwrap();
    chmod(&mine.join("empty-roots"), 0o555);
    remove_beneath(&fd, Path::new("checkpoints/mine"), &nobody()).unwrap();
    assert!(!mine.exists());
}

#[test]
fn remove_beneath_removes_a_tree_but_nothing_a_link_inside_points_to() {
    let (dir, fd) = bundle();
    let cp = dir.path().join("checkpoints/cp1");
    std::fs::create_dir_all(cp.join("work/deeper")).unwrap();
    std::fs::write(cp.join("pages-1.img"), "x").unwrap();
    std::fs::write(cp.join("work/deeper/log"), "x").unwrap();
    mkfifo(&cp.join("work/fifo"));
    let outside = open_tempdir();
    std::fs::write(outside.path().join("precious"), "keep").unwrap();
    std::fs::create_dir(outside.path().join("sub")).unwrap();
    symlink(outside.path(), cp.join("work/escape")).unwrap();
    symlink(outside.path().join("precious"), cp.join("file-link")).unwrap();
    remove_beneath(&fd, Path::new("checkpoints/cp1"), &Peer::root()).unwrap();
    assert!(!cp.exists());
    assert!(dir.path().join("checkpoints").is_dir());
    assert_eq!(
        std::fs::read_to_string(outside.path().join("precious")).unwrap(),
        "keep"
    );
    assert!(outside.path().join("sub").is_dir());
    assert!(matches!(
        remove_beneath(&fd, Path::new("checkpoints/cp1"), &Peer::root()),
        Err(Error::NotFound(_))
    ));
    // Only directories: a file or FIFO there is not one, and stays.
    std::fs::write(dir.path().join("checkpoints/stray"), "").unwrap();
    mkfifo(&dir.path().join("checkpoints/pipe"));
    for name in ["checkpoints/stray", "checkpoints/pipe"] {
        assert!(matches!(
            remove_beneath(&fd, Path::new(name), &Peer::root()),
            Err(Error::InvalidArgument(m)) if m.contains(", not a directory: no checkpoint")
        ));
        assert!(dir.path().join(name).symlink_metadata().is_ok(), "{name}");
    }
}

#[test]
fn remove_beneath_through_a_symlinked_directory_is_refused() {
    let (dir, fd) = bundle();
    let outside = open_tempdir();
    std::fs::create_dir(outside.path().join("cp1")).unwrap();
    std::fs::write(outside.path().join("cp1/pages-1.img"), "keep").unwrap();
    std::fs::remove_dir(dir.path().join("checkpoints")).unwrap();
    symlink(outside.path(), dir.path().join("checkpoints")).unwrap();
    let message = invalid(remove_beneath(
        &fd,
        Path::new("checkpoints/cp1"),
        &Peer::root(),
    ));
    assert!(message.contains("symbolic link"), "{message}");
    assert_eq!(
        std::fs::read_to_string(outside.path().join("cp1/pages-1.img")).unwrap(),
        "keep"
    );
    // The checkpoint directory itself being a link: refused, the link and its target stay.
    std::fs::remove_file(dir.path().join("checkpoints")).unwrap();
    std::fs::create_dir(dir.path().join("checkpoints")).unwrap();
    symlink(
        outside.path().join("cp1"),
        dir.path().join("checkpoints/cp1"),
    )
    .unwrap();
    invalid(remove_beneath(
        &fd,
        Path::new("checkpoints/cp1"),
        &Peer::root(),
    ));
    assert_eq!(
        std::fs::read_to_string(outside.path().join("cp1/pages-1.img")).unwrap(),
        "keep"
    );
    invalid(remove_beneath(
        &fd,
        Path::new("checkpoints/../.."),
        &Peer::root(),
    ));
}

#[test]
fn remove_beneath_stops_at_its_depth_limit() {
    let (dir, fd) = bundle();
    let mut deep = dir.path().join("checkpoints/cp1");
    for _ in 0..MAX_REMOVE_DEPTH {
        deep.push("d");
    }
    std::fs::create_dir_all(&deep).unwrap();
    assert!(matches!(
        remove_beneath(&fd, Path::new("checkpoints/cp1"), &Peer::root()),
        Err(Error::ResourceExhausted(m)) if m.contains("nested more than")
    ));
}

/// A bundle whose `checkpoints` anyone may write to, and `checkpoints/cp1` made there by
/// nobody, owned by `owner`.
fn cp1_made_by_nobody_for(owner: &Peer) -> (tempfile::TempDir, OwnedFd, OwnedFd) {
    let (dir, fd) = bundle();
    chmod(&dir.path().join("checkpoints"), 0o777);
    let made =
        create_dir_beneath(&fd, Path::new("checkpoints/cp1"), 0o700, &nobody(), owner).unwrap();
    (dir, fd, made)
}

#[test]
fn create_dir_beneath_makes_the_peers_directory_and_follows_no_link() {
    let (dir, fd, made) = cp1_made_by_nobody_for(&nobody());
    let st = rustix::fs::fstat(&made).unwrap();
    assert_eq!(
        (st.st_uid, st.st_gid, st.st_mode & 0o7777),
        (65534, 65534, 0o700)
    );
    assert!(matches!(
        create_dir_beneath(
            &fd,
            Path::new("checkpoints/cp1"),
            0o700,
            &nobody(),
            &nobody()
        ),
        Err(Error::AlreadyExists(_))
    ));
    chmod(&dir.path().join("checkpoints"), 0o755);
    denied(create_dir_beneath(
        &fd,
        Path::new("checkpoints/cp2"),
        0o700,
        &nobody(),
        &nobody(),
    ));
    assert!(!dir.path().join("checkpoints/cp2").exists());

    // Through a symlinked checkpoints directory: refused, nothing made at its target.
    let outside = open_tempdir();
    std::fs::remove_dir_all(dir.path().join("checkpoints")).unwrap();
    symlink(outside.path(), dir.path().join("checkpoints")).unwrap();
    invalid(create_dir_beneath(
        &fd,
        Path::new("checkpoints/cp3"),
        0o700,
        &Peer::root(),
        &Peer::root(),
    ));
    assert!(!outside.path().join("cp3").exists());
}

#[test]
fn a_console_is_a_terminal_read_and_written_or_else_output_only() {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let terminal = ptsname(&master, Vec::new()).unwrap();
    let terminal = Path::new(OsStr::from_bytes(terminal.as_bytes()));

    let Console::Terminal(console) = open_console(terminal, &Peer::root(), &[]).unwrap() else {
        panic!("{} was not opened as a terminal", terminal.display());
    };
    rustix::io::write(&console, b"out\n").unwrap();
    let mut buf = [0; 16];
    let n = rustix::io::read(&master, &mut buf).unwrap();
    assert!(buf[..n].starts_with(b"out"), "{:?}", &buf[..n]);
    // grantpt leaves the terminal its opener's (root) with mode 0620.
    denied(open_console(terminal, &nobody(), &[]));
    let message = invalid(stdio(terminal, Access::Write, &Peer::root()));
    assert!(message.contains("is a terminal; give a FIFO"), "{message}");

    let dir = open_tempdir();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let opened = within_a_second(move || open_console(&fifo, &nobody(), &[]));
    assert!(matches!(opened, Ok(Console::Output(_))), "{opened:?}");
    let message = invalid(open_console(Path::new("/dev/zero"), &Peer::root(), &[]));
    assert!(message.contains("character device other than"), "{message}");
}

#[test]
fn a_checkpoint_to_restore_holds_only_files_its_caller_may_read() {
    let (dir, fd) = bundle();
    let cp = dir.path().join("checkpoints/cp1");
    std::fs::create_dir(&cp).unwrap();
    std::fs::write(cp.join("core-1.img"), "x").unwrap();
    chmod(&cp.join("core-1.img"), 0o644);
    let image = open_beneath(
        &fd,
        Path::new("checkpoints/cp1"),
        OFlags::RDONLY | OFlags::DIRECTORY,
        &Peer::root(),
    )
    .unwrap();
    check_readable_files(&image, "cp1", &nobody(), 10).unwrap();
    // Root's own image, which nobody may read.
    std::fs::write(cp.join("pages-1.img"), "secret").unwrap();
    chmod(&cp.join("pages-1.img"), 0o600);
    denied(check_readable_files(&image, "cp1", &nobody(), 10));
    check_readable_files(&image, "cp1", &Peer::root(), 10).unwrap();
    std::fs::remove_file(cp.join("pages-1.img")).unwrap();
    // A link, even to a file the caller may read, and a FIFO: not what CRIU wrote.
    symlink(cp.join("core-1.img"), cp.join("mm-1.img")).unwrap();
    invalid(check_readable_files(&image, "cp1", &Peer::root(), 10));
    std::fs::remove_file(cp.join("mm-1.img")).unwrap();
    mkfifo(&cp.join("fifo"));
    invalid(check_readable_files(&image, "cp1", &Peer::root(), 10));
    std::fs::remove_file(cp.join("fifo")).unwrap();
    // A hard link to root's readable file, which CRIU would write as stats-restore.
    std::fs::hard_link(cp.join("core-1.img"), dir.path().join("elsewhere")).unwrap();
    denied(check_readable_files(&image, "cp1", &nobody(), 10));
    rustix::fs::chown(
        cp.join("core-1.img"),
        Some(rustix::process::Uid::from_raw(65534)),
        None,
    )
    .unwrap();
    check_readable_files(&image, "cp1", &nobody(), 10).unwrap();
    assert!(matches!(
        check_readable_files(&image, "cp1", &Peer::root(), 0),
        Err(Error::ResourceExhausted(_))
    ));
}

#[test]
fn a_directory_given_to_a_peer_is_its_own_with_its_files_and_no_links_target() {
    let (dir, _fd, made) = cp1_made_by_nobody_for(&Peer::root());
    let st = rustix::fs::fstat(&made).unwrap();
    assert_eq!((st.st_uid, st.st_gid), (0, 0));
    let cp = dir.path().join("checkpoints/cp1");
    std::fs::write(cp.join("core-1.img"), "x").unwrap();
    let outside = open_tempdir();
    std::fs::write(outside.path().join("precious"), "keep").unwrap();
    symlink(outside.path().join("precious"), cp.join("link")).unwrap();
    give_to(&made, "cp1", &nobody()).unwrap();
    let owner = |path: &Path| {
        let st = rustix::fs::lstat(path).unwrap();
        (st.st_uid, st.st_gid)
    };
    assert_eq!(owner(&cp), (65534, 65534));
    assert_eq!(owner(&cp.join("core-1.img")), (65534, 65534));
    assert_eq!(owner(&cp.join("link")), (65534, 65534));
    assert_eq!(owner(&outside.path().join("precious")), (0, 0));
}

#[test]
fn a_held_directory_is_emptied_whatever_its_name_names_now() {
    let (dir, fd) = bundle();
    let held = create_dir_beneath(
        &fd,
        Path::new("checkpoints/cp1"),
        0o700,
        &Peer::root(),
        &Peer::root(),
    )
    .unwrap();
    let checkpoints = dir.path().join("checkpoints");
    std::fs::write(checkpoints.join("cp1/pages-1.img"), "x").unwrap();
    // The name's owner moves the directory away and puts another, not empty, in its place.
    std::fs::rename(checkpoints.join("cp1"), checkpoints.join("moved")).unwrap();
    std::fs::create_dir(checkpoints.join("cp1")).unwrap();
    std::fs::write(checkpoints.join("cp1/precious"), "keep").unwrap();
    assert!(remove_held(&fd, Path::new("checkpoints/cp1"), held).is_err());
    assert_eq!(
        std::fs::read_dir(checkpoints.join("moved"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_to_string(checkpoints.join("cp1/precious")).unwrap(),
        "keep"
    );
}

#[test]
fn files_of_kernel_interface_file_systems_are_refused_even_to_root() {
    let root = Peer::root();
    let pid = std::process::id();
    for path in [
        format!("/proc/{pid}/oom_score_adj"),
        "/proc/sys/kernel/hostname".to_owned(),
        "/sys/kernel/uevent_seqnum".to_owned(),
    ] {
        let path = Path::new(&path);
        for access in [Access::Read, Access::Write] {
            let message = invalid(stdio(path, access, &root));
            assert!(message.contains("kernel interface"), "{message}");
        }
        let read = read_regular("config", path, 1 << 20, &root, &[]);
        assert!(invalid(read).contains("kernel interface"));
    }
    let dir = open_tempdir();
    let file = dir.path().join("out.log");
    std::fs::write(&file, "").unwrap();
    assert!(stdio(&file, Access::Write, &root).is_ok());
}

/// The peer swaps a directory of its own in for the one berthd just made (RENAME_EXCHANGE as
/// soon as the name exists), racing berthd's open of it: whatever the race's outcome, berthd
/// never hands back the peer's directory.
#[test]
fn a_directory_swapped_in_for_the_one_made_is_never_taken() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (dir, fd) = bundle();
    let checkpoints = dir.path().join("checkpoints");
    chmod(&checkpoints, 0o777);
    let parent = open_dir("checkpoints", &checkpoints, &Peer::root(), &[]).unwrap();
    let parent = Arc::new(parent);
    let (mut refused, mut taken) = (0, 0);
    // The swap lands between the mkdirat and the open about once in a few hundred tries here.
    for _ in 0..3000 {
        let decoy = checkpoints.join(".decoy");
        std::fs::create_dir(&decoy).unwrap();
        std::fs::write(decoy.join("inventory.img"), b"planted").unwrap();
        std::os::unix::fs::chown(&decoy, Some(65534), Some(65534)).unwrap();
        let decoy_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&decoy).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = std::thread::spawn({
            let (parent, stop) = (Arc::clone(&parent), Arc::clone(&stop));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let swapped = rustix::fs::renameat_with(
                        &*parent,
                        ".decoy",
                        &*parent,
                        "x",
                        rustix::fs::RenameFlags::EXCHANGE,
                    );
                    if swapped.is_ok() {
                        return;
                    }
                }
            }
        });
        let made = create_dir_beneath(
            &fd,
            Path::new("checkpoints/x"),
            0o700,
            &nobody(),
            &Peer::root(),
        );
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        match made {
            Ok(made) => {
                let st = rustix::fs::fstat(&made).unwrap();
                assert_ne!(
                    st.st_ino, decoy_ino,
                    "the peer's directory was taken as made"
                );
                assert_eq!((st.st_uid, st.st_mode & 0o7777), (0, 0o700));
                taken += 1;
            }
            Err(Error::FailedPrecondition(m)) => {
                assert!(m.contains("was replaced by another directory"), "{m}");
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e:?}"),
        }
        for name in ["x", ".decoy"] {
            let _ = std::fs::remove_dir_all(checkpoints.join(name));
        }
    }
    eprintln!("swapped in before berthd's open and refused: {refused}, made and kept: {taken}");
}
