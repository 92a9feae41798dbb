//! What berthd reads about a process from `/proc`: its start time, which with its pid tells it
//! from a later process that reused the pid, and whether it has begun to exit; the type of a
//! mount of berthd's own; and how any file the kernel generates is read. Also a moment on the
//! wall clock as a start time counts it.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// The most berthd reads of a file the kernel generates (those it reads are a few KiB).
const GENERATED_MAX_BYTES: u64 = 256 * 1024;

/// Reads a file the kernel generates as it is read (`/proc`, cgroupfs). Such files say they are
/// empty, so `std::fs::read` begins with probes of 32 bytes and doubles from there, a syscall
/// each (six for a `/proc/<pid>/stat`); a buffer of `expected` bytes takes it in one read and
/// the one that finds its end. Bounded, as every read.
pub fn read_generated(path: impl AsRef<Path>, expected: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(expected);
    // Through `take`: `File`'s own `read_to_end` would first ask for a size (statx, lseek)
    // these files do not have.
    std::fs::File::open(path)?
        .take(GENERATED_MAX_BYTES)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 == GENERATED_MAX_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {GENERATED_MAX_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// `/proc/<pid>/<name>`, a generated file of about `expected` bytes: its path (for messages)
/// and its contents.
fn read_process_file(pid: u32, name: &str, expected: usize) -> Result<(String, Vec<u8>)> {
    let path = format!("/proc/{pid}/{name}");
    let contents = read_generated(&path, expected).map_err(|e| Error::io(&path, e))?;
    Ok((path, contents))
}

fn read_stat(pid: u32) -> Result<(String, Vec<u8>)> {
    read_process_file(pid, "stat", 512)
}

/// The cgroups of `pid` as `/proc/<pid>/cgroup` lists them: its path (for messages) and its
/// contents.
pub fn process_cgroups(pid: u32) -> Result<(String, Vec<u8>)> {
    read_process_file(pid, "cgroup", 2048)
}

/// The uid ranges of `pid`'s user namespace, from `/proc/<pid>/uid_map`: (inside, outside,
/// count).
pub fn process_uid_map(pid: u32) -> Result<Vec<(u32, u32, u32)>> {
    let (path, text) = read_process_file(pid, "uid_map", 512)?;
    parse_id_map(&text).ok_or_else(|| Error::Internal(format!("{path}: not a uid map")))
}

fn parse_id_map(text: &[u8]) -> Option<Vec<(u32, u32, u32)>> {
    let text = std::str::from_utf8(text).ok()?;
    text.lines()
        .map(|line| {
            let mut fields = line.split_ascii_whitespace().map(str::parse::<u32>);
            match (fields.next(), fields.next(), fields.next(), fields.next()) {
                (Some(Ok(inside)), Some(Ok(outside)), Some(Ok(count)), None) => {
                    Some((inside, outside, count))
                }
                _ => None,
            }
        })
        .collect()
}

/// The start time of `pid` in clock ticks since boot.
pub fn process_start_time(pid: u32) -> Result<u64> {
    let (path, stat) = read_stat(pid)?;
    parse_start_time(&stat)
        .ok_or_else(|| Error::Internal(format!("{path}: no start time in its contents")))
}

/// `time`, a moment on the wall clock (a file's mtime), in the clock ticks since boot a process
/// start time counts; `None` before boot. Moved with the wall clock if it was set since.
pub fn ticks_since_boot(time: std::time::SystemTime) -> Option<u64> {
    let boot = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let since_boot = std::time::Duration::new(boot.tv_sec as u64, boot.tv_nsec as u32);
    let booted = std::time::SystemTime::now().checked_sub(since_boot)?;
    let after = time.duration_since(booted).ok()?;
    let per_second = rustix::param::clock_ticks_per_second();
    Some((after.as_nanos() * u128::from(per_second) / 1_000_000_000) as u64)
}

/// The first number a run of berthd gives its scratch files and runtime logs: microseconds
/// since boot at its start. A berthd that died may have left runtime commands running that
/// still write the files it named (the spawn helper lets them run to their end); numbered from
/// where it began, at most one a microsecond, its names never reach this run's.
pub fn first_scratch_number() -> u64 {
    let boot = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (boot.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(boot.tv_nsec as u64 / 1000)
}

/// The parent of `pid`.
pub fn process_parent(pid: u32) -> Result<u32> {
    let (path, stat) = read_stat(pid)?;
    stat_field(&stat, 4)
        .and_then(|ppid| u32::try_from(ppid).ok())
        .ok_or_else(|| Error::Internal(format!("{path}: no parent in its contents")))
}

/// The kernel's `PF_EXITING`: set when a task begins to exit, never cleared.
const PF_EXITING: u64 = 0x4;

/// Whether `pid` has begun to exit (it may be a zombie). The kernel shows such a process in the
/// root of every v1 cgroup hierarchy.
pub fn process_exiting(pid: u32) -> Result<bool> {
    let (path, stat) = read_stat(pid)?;
    let flags: u64 = stat_field(&stat, 9)
        .ok_or_else(|| Error::Internal(format!("{path}: no flags in its contents")))?;
    Ok(flags & PF_EXITING != 0)
}

fn parse_start_time(stat: &[u8]) -> Option<u64> {
    stat_field(stat, 22)
}

/// The file system type (`fuse.bindfs`, `virtiofs`, ...) of the mount `mount_id` (statx's
/// `stx_mnt_id`) in berthd's own `/proc/self/mountinfo`; None where mountinfo cannot be read
/// within its bound or does not list the mount (detached since).
pub fn own_mount_type(mount_id: u64) -> Option<Vec<u8>> {
    let mountinfo = read_generated("/proc/self/mountinfo", 16 * 1024).ok()?;
    mount_type(&mountinfo, mount_id).map(<[u8]>::to_vec)
}

/// The type of mount `mount_id` in mountinfo text: each line is
/// `id parent major:minor root point options [optional...] - type source super-options`.
fn mount_type(mountinfo: &[u8], mount_id: u64) -> Option<&[u8]> {
    let id = mount_id.to_string();
    mountinfo.split(|&b| b == b'\n').find_map(|line| {
        let mut fields = line.split(|&b| b == b' ');
        if fields.next()? != id.as_bytes() {
            return None;
        }
        // Past parent, major:minor, root, mount point and options, the optional fields end at
        // the `-`.
        fields.nth(4)?;
        fields.skip_while(|&f| f != b"-").nth(1)
    })
}

/// The pids a kernel list of them holds (`cgroup.procs`, a thread's `children`): numbers
/// separated by white space; anything else is skipped.
pub fn parse_pids(list: &[u8]) -> Vec<i32> {
    list.split(u8::is_ascii_whitespace)
        .filter_map(|pid| std::str::from_utf8(pid).ok()?.parse().ok())
        .collect()
}

/// The pids listed in the kernel file at `path`, none when it cannot be read.
pub fn read_pids(path: impl AsRef<Path>) -> Vec<i32> {
    read_generated(path, 64)
        .map(|list| parse_pids(&list))
        .unwrap_or_default()
}

/// Field `n` (from 3, the state) of a `/proc/<pid>/stat` line. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted from the last `)`.
fn stat_field(stat: &[u8], n: usize) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    rest.split_ascii_whitespace().nth(n - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_lists_are_numbers_between_white_space() {
        assert_eq!(parse_pids(b"12\n345\n"), [12, 345]);
        assert_eq!(parse_pids(b"7 8 "), [7, 8]);
        assert_eq!(parse_pids(b""), Vec::<i32>::new());
        assert_eq!(parse_pids(b"1 x -\xff 2"), [1, 2]);
    }

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = b"4242 (sh (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 2461696 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(stat_field(stat, 4), Some(1));
        assert_eq!(parse_start_time(b"12 (sh) S 1 2"), None);
        assert_eq!(parse_start_time(b"garbage"), None);
    }

    #[test]
    fn a_moment_counts_in_the_ticks_of_the_start_times_of_processes_started_then() {
        let before = ticks_since_boot(std::time::SystemTime::now()).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let started = process_start_time(child.id()).unwrap();
        let after = ticks_since_boot(std::time::SystemTime::now()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // A tick either way: the two clocks are read apart, and each rounds down.
        assert!(
            before <= started + 1 && started <= after + 1,
            "{before} <= {started} <= {after}"
        );
        let epoch = std::time::SystemTime::UNIX_EPOCH;
        assert_eq!(ticks_since_boot(epoch), None);
    }

    #[test]
    fn a_uid_map_is_its_ranges() {
        let host = b"         0          0 4294967295\n";
        assert_eq!(parse_id_map(host), Some(vec![(0, 0, u32::MAX)]));
        let two = b"0 100000 65536\n65536 1000 1\n";
        assert_eq!(
            parse_id_map(two),
            Some(vec![(0, 100000, 65536), (65536, 1000, 1)])
        );
        assert_eq!(parse_id_map(b""), Some(vec![]));
        assert_eq!(parse_id_map(b"0 0\n"), None);
        assert_eq!(parse_id_map(b"0 0 1 2\n"), None);
        assert_eq!(parse_id_map(b"x 0 1\n"), None);
        assert!(!process_uid_map(std::process::id()).unwrap().is_empty());
    }

    #[test]
    fn a_generated_file_is_read_whole_and_an_oversize_one_is_refused() {
        let cmdline = Path::new("/proc/self/cmdline");
        assert_eq!(
            read_generated(cmdline, 8).unwrap(),
            std::fs::read(cmdline).unwrap()
        );
        let dir = tempfile::TempDir::new().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; GENERATED_MAX_BYTES as usize]).unwrap();
        let error = read_generated(&big, 512).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
    }

    #[test]
    fn a_mounts_type_is_found_by_its_id_after_the_optional_fields() {
        let mountinfo = b"22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
            140 22 0:54 / /mnt/a\\040b rw,nosuid,nodev shared:70 master:3 - fuse.bindfs /src rw,user_id=0\n\
            141 22 0:55 / /host rw - virtiofs shared rw\n\
            14 22 0:5 / /dev rw - devtmpfs";
        assert_eq!(mount_type(mountinfo, 140), Some(&b"fuse.bindfs"[..]));
        assert_eq!(mount_type(mountinfo, 141), Some(&b"virtiofs"[..]));
        assert_eq!(mount_type(mountinfo, 22), Some(&b"ext4"[..]));
        // Mount 14's line ends at its type; 4 and 1 are no mount's id, only a prefix or a parent.
        assert_eq!(mount_type(mountinfo, 14), Some(&b"devtmpfs"[..]));
        assert_eq!(mount_type(mountinfo, 4), None);
        assert_eq!(mount_type(mountinfo, 1), None);
        assert_eq!(mount_type(b"garbage\n\n", 22), None);
        // A root or mount point named `-` is not the separator.
        let dashes = b"7 1 0:9 - /- rw shared:2 - tmpfs none rw";
        assert_eq!(mount_type(dashes, 7), Some(&b"tmpfs"[..]));
    }

    #[test]
    fn own_root_mount_has_a_type() {
        let root = rustix::fs::statx(
            rustix::fs::CWD,
            "/",
            rustix::fs::AtFlags::empty(),
            rustix::fs::StatxFlags::MNT_ID,
        )
        .unwrap();
        // A kernel before 5.8 has no mount id to give.
        if root.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() != 0 {
            assert!(!own_mount_type(root.stx_mnt_id).unwrap().is_empty());
        }
    }

    #[test]
    fn own_start_time_is_readable() {
        assert!(process_start_time(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn a_zombie_is_exiting_and_a_live_process_is_not() {
        assert!(!process_exiting(std::process::id()).unwrap());
        let _children = crate::reaper::tests::CHILD_PROCESSES.blocking_lock();
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !process_exiting(pid).unwrap() {
            assert!(std::time::Instant::now() < deadline, "true never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
    }
}
