//! Pure parsers for the kernel's stats files: cgroup v1 and v2 files, `/proc/<pid>/net/dev` and
//! `/proc/<pid>/cgroup`.
//!
//! Owns: turning the bytes of one read into values. Every parser works on a borrowed `&[u8]` and
//! hands what it finds to a callback, so parsing allocates nothing (but the lossy copy of an
//! interface name that is not UTF-8); malformed input is an error
//! naming the file kind and the offending line, never a panic.
//! Does not own: which files exist or are read (cgroup), what the values mean in a snapshot
//! (snapshot), or reading (sampler).

use std::borrow::Cow;

use crate::error::{Error, Result};

/// The error for a line of `kind` that is not what the kernel writes.
fn malformed(kind: &str, why: &str, line: &[u8]) -> Error {
    Error::Internal(format!(
        "malformed {kind}: {why} in line {:?}",
        String::from_utf8_lossy(line)
    ))
}

/// Non-empty lines, without their newline.
fn lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    buf.split(|&b| b == b'\n').filter(|line| !line.is_empty())
}

/// Whitespace-separated fields of a line.
fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|b| b.is_ascii_whitespace())
        .filter(|field| !field.is_empty())
}

/// A decimal u64, rejecting signs, blanks and overflow.
fn number(field: &[u8]) -> Option<u64> {
    if field.is_empty() {
        return None;
    }
    field.iter().try_fold(0u64, |acc, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fn text<'a>(kind: &str, field: &'a [u8], line: &[u8]) -> Result<&'a str> {
    std::str::from_utf8(field).map_err(|_| malformed(kind, "a name that is not utf-8", line))
}

/// A file holding one number, like `memory.usage_in_bytes` or `memory.current`.
pub fn single_u64(kind: &str, buf: &[u8]) -> Result<u64> {
    let mut lines = lines(buf);
    let line = lines
        .next()
        .ok_or_else(|| malformed(kind, "no value", buf))?;
    if lines.next().is_some() {
        return Err(malformed(kind, "more than one line", buf));
    }
    let trimmed = line.trim_ascii();
    number(trimmed).ok_or_else(|| malformed(kind, "not a number", line))
}

/// A flat keyed file: `key value` per line (`memory.stat`, `cpu.stat`, `cpuacct.stat`,
/// `memory.events`, `memory.oom_control`, `hugetlb.<size>.events`).
pub fn flat_keyed(kind: &str, buf: &[u8], mut visit: impl FnMut(&str, u64)) -> Result<()> {
    for line in lines(buf) {
        let mut f = fields(line);
        let (Some(key), Some(value), None) = (f.next(), f.next(), f.next()) else {
            return Err(malformed(kind, "not a key and a value", line));
        };
        let value = number(value).ok_or_else(|| malformed(kind, "not a number", line))?;
        visit(text(kind, key, line)?, value);
    }
    Ok(())
}

/// Space-separated numbers on one line (`cpuacct.usage_percpu`).
pub fn u64_list(kind: &str, buf: &[u8], mut visit: impl FnMut(u64)) -> Result<()> {
    let mut lines = lines(buf);
    let Some(line) = lines.next() else {
        return Err(malformed(kind, "no values", buf));
    };
    if lines.next().is_some() {
        return Err(malformed(kind, "more than one line", buf));
    }
    for field in fields(line) {
        visit(number(field).ok_or_else(|| malformed(kind, "not a number", line))?);
    }
    Ok(())
}

/// `cpuacct.usage_all`: a `cpu user system` header, then one row of nanoseconds per CPU.
pub fn cpuacct_usage_all(buf: &[u8], mut visit: impl FnMut(u64, u64)) -> Result<()> {
    const KIND: &str = "cpuacct.usage_all";
    let mut lines = lines(buf);
    match lines.next() {
        Some(header) if fields(header).eq([&b"cpu"[..], b"user", b"system"]) => {}
        Some(other) => return Err(malformed(KIND, "not the cpu user system header", other)),
        None => return Err(malformed(KIND, "no header", buf)),
    }
    for line in lines {
        let mut f = fields(line).map(number);
        let (Some(Some(_cpu)), Some(Some(user)), Some(Some(system)), None) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return Err(malformed(KIND, "not three numbers", line));
        };
        visit(user, system);
    }
    Ok(())
}

/// One line of a cgroup v1 blkio file: `major:minor op value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkioLine<'a> {
    pub major: u64,
    pub minor: u64,
    pub op: &'a str,
    pub value: u64,
}

fn device(kind: &str, field: &[u8], line: &[u8]) -> Result<(u64, u64)> {
    let mut parts = field.splitn(2, |&b| b == b':');
    match (parts.next().and_then(number), parts.next().and_then(number)) {
        (Some(major), Some(minor)) => Ok((major, minor)),
        _ => Err(malformed(kind, "not a major:minor device", line)),
    }
}

/// A cgroup v1 blkio file (`blkio.*_recursive`); the closing `Total n` line is skipped, since a
/// total across devices is not a device entry.
pub fn blkio_v1(kind: &str, buf: &[u8], mut visit: impl FnMut(BlkioLine<'_>)) -> Result<()> {
    for line in lines(buf) {
        let f: [Option<&[u8]>; 4] = {
            let mut it = fields(line);
            [it.next(), it.next(), it.next(), it.next()]
        };
        match f {
            [Some(b"Total"), Some(value), None, None] if number(value).is_some() => {}
            [Some(dev), Some(op), Some(value), None] => {
                let (major, minor) = device(kind, dev, line)?;
                let value = number(value).ok_or_else(|| malformed(kind, "not a number", line))?;
                visit(BlkioLine {
                    major,
                    minor,
                    op: text(kind, op, line)?,
                    value,
                });
            }
            _ => return Err(malformed(kind, "not major:minor op value", line)),
        }
    }
    Ok(())
}

/// cgroup v2 `io.stat`: `major:minor key=value ...` per device.
pub fn io_stat(buf: &[u8], mut visit: impl FnMut(u64, u64, &str, u64)) -> Result<()> {
    const KIND: &str = "io.stat";
    for line in lines(buf) {
        let mut f = fields(line);
        let dev = f.next().ok_or_else(|| malformed(KIND, "no device", line))?;
        let (major, minor) = device(KIND, dev, line)?;
        for pair in f {
            let mut kv = pair.splitn(2, |&b| b == b'=');
            let (Some(key), Some(value)) = (kv.next(), kv.next()) else {
                return Err(malformed(KIND, "not key=value", line));
            };
            let value = number(value).ok_or_else(|| malformed(KIND, "not a number", line))?;
            visit(major, minor, text(KIND, key, line)?, value);
        }
    }
    Ok(())
}

/// One interface of `/proc/<pid>/net/dev`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetDevLine<'a> {
    /// Lossy: the kernel takes any bytes but `/`, `:` and white space in a name, and a container
    /// that may name its interfaces must not cost the others their stats.
    pub name: Cow<'a, str>,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// `/proc/<pid>/net/dev`: two header lines, then `name: 8 receive and 8 transmit counters`.
pub fn net_dev(buf: &[u8], mut visit: impl FnMut(&NetDevLine<'_>)) -> Result<()> {
    const KIND: &str = "net/dev";
    let mut lines = lines(buf);
    for _ in 0..2 {
        match lines.next() {
            Some(header) if header.contains(&b'|') => {}
            Some(other) => return Err(malformed(KIND, "not a header", other)),
            None => return Err(malformed(KIND, "no header", buf)),
        }
    }
    for line in lines {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| malformed(KIND, "no interface name", line))?;
        let name = String::from_utf8_lossy(line[..colon].trim_ascii());
        let mut counters = [0u64; 16];
        let mut f = fields(&line[colon + 1..]);
        for counter in &mut counters {
            *counter = f
                .next()
                .and_then(number)
                .ok_or_else(|| malformed(KIND, "not 16 counters", line))?;
        }
        if name.is_empty() || f.next().is_some() {
            return Err(malformed(KIND, "not name: 16 counters", line));
        }
        visit(&NetDevLine {
            name,
            rx_bytes: counters[0],
            rx_packets: counters[1],
            rx_errors: counters[2],
            rx_dropped: counters[3],
            tx_bytes: counters[8],
            tx_packets: counters[9],
            tx_errors: counters[10],
            tx_dropped: counters[11],
        });
    }
    Ok(())
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controllers:path`; v2 is `0::path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcCgroupLine<'a> {
    pub hierarchy: u64,
    /// Comma-separated controllers (v1), empty for v2.
    pub controllers: &'a str,
    pub path: &'a str,
}

pub fn proc_cgroup(buf: &[u8], mut visit: impl FnMut(&ProcCgroupLine<'_>)) -> Result<()> {
    const KIND: &str = "/proc/<pid>/cgroup";
    for line in lines(buf) {
        let mut parts = line.splitn(3, |&b| b == b':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed(KIND, "not id:controllers:path", line));
        };
        let hierarchy = number(id).ok_or_else(|| malformed(KIND, "not a hierarchy id", line))?;
        let path = text(KIND, path, line)?;
        if !path.starts_with('/') {
            return Err(malformed(KIND, "not an absolute cgroup path", line));
        }
        visit(&ProcCgroupLine {
            hierarchy,
            controllers: text(KIND, controllers, line)?,
            path,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(kind: &str, text: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        flat_keyed(kind, text.as_bytes(), |k, v| out.push((k.to_owned(), v)))?;
        Ok(out)
    }

    fn err_text<T: std::fmt::Debug>(result: Result<T>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn single_values_parse_and_reject_junk() {
        assert_eq!(
            single_u64("memory.usage_in_bytes", b"10834243584\n").unwrap(),
            10834243584
        );
        assert_eq!(single_u64("memory.current", b"0").unwrap(), 0);
        let err = err_text(single_u64("memory.current", b"max\n"));
        assert_eq!(
            err,
            "malformed memory.current: not a number in line \"max\""
        );
        assert!(err_text(single_u64("memory.current", b"")).contains("no value"));
        assert!(err_text(single_u64("memory.current", b"1\n2\n")).contains("more than one line"));
        assert!(err_text(single_u64("x", b"-1\n")).contains("not a number"));
        assert!(err_text(single_u64("x", b"18446744073709551616\n")).contains("not a number"));
        assert_eq!(
            single_u64("x", b"18446744073709551615\n").unwrap(),
            u64::MAX
        );
    }

    const MEMORY_STAT_V1: &str = "cache 42221568\nrss 5722112\nrss_huge 0\nshmem 9068544\n\
        mapped_file 6926336\nswap 0\npgfault 40793\nhierarchical_memory_limit 9223372036854771712\n\
        total_cache 10223808512\ntotal_rss 482537472\n";

    const MEMORY_STAT_V2: &str = "anon 1421312\nfile 4096000\nkernel 614400\nkernel_stack 16384\n\
        pagetables 49152\nsock 0\nshmem 0\nfile_mapped 0\nslab 450560\npgfault 1093\noom_kill 0\n";

    #[test]
    fn flat_keyed_files_of_both_versions() {
        let v1 = keyed("memory.stat", MEMORY_STAT_V1).unwrap();
        assert_eq!(v1.len(), 10);
        assert_eq!(v1[0], ("cache".into(), 42221568));
        assert_eq!(
            v1[7],
            ("hierarchical_memory_limit".into(), 9223372036854771712)
        );
        let v2 = keyed("memory.stat", MEMORY_STAT_V2).unwrap();
        assert_eq!(v2[1], ("file".into(), 4096000));
        assert_eq!(v2.len(), 11);
        let cpu_v1 = keyed(
            "cpu.stat",
            "nr_periods 12\nnr_throttled 3\nthrottled_time 4500\nnr_bursts 0\nburst_time 0\n",
        )
        .unwrap();
        assert_eq!(cpu_v1[2], ("throttled_time".into(), 4500));
        let cpu_v2 = keyed(
            "cpu.stat",
            "usage_usec 1831662252\nuser_usec 1612155011\nsystem_usec 219507241\nnice_usec 0\n\
             nr_periods 5\nnr_throttled 1\nthrottled_usec 77\n",
        )
        .unwrap();
        assert_eq!(cpu_v2[0], ("usage_usec".into(), 1831662252));
        let oom = keyed(
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(oom[2], ("oom_kill".into(), 2));
        let events = keyed(
            "memory.events",
            "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(events[2], ("max".into(), 12));
    }

    #[test]
    fn flat_keyed_rejects_malformed_lines() {
        assert_eq!(
            err_text(keyed("memory.stat", "cache 1\nrss\n")),
            "malformed memory.stat: not a key and a value in line \"rss\""
        );
        assert!(err_text(keyed("memory.stat", "cache 1 2\n")).contains("not a key and a value"));
        assert!(err_text(keyed("memory.stat", "cache x\n")).contains("not a number"));
        assert!(err_text(keyed("memory.stat", "cache -5\n")).contains("not a number"));
        let invalid = flat_keyed("memory.stat", b"\xff\xfe 1\n", |_, _| {});
        assert!(err_text(invalid).contains("not utf-8"));
        assert!(keyed("memory.stat", "").unwrap().is_empty());
    }

    #[test]
    fn percpu_lists() {
        let mut values = Vec::new();
        u64_list(
            "cpuacct.usage_percpu",
            b"898608012028 886911362398 \n",
            |v| values.push(v),
        )
        .unwrap();
        assert_eq!(values, [898608012028, 886911362398]);
        let bad = u64_list("cpuacct.usage_percpu", b"1 two 3\n", |_| {});
        assert!(err_text(bad).contains("not a number in line \"1 two 3\""));
        assert!(err_text(u64_list("cpuacct.usage_percpu", b"", |_| {})).contains("no values"));
    }

    #[test]
    fn usage_all_rows_per_cpu() {
        let text = b"cpu user system\n0 784791543193 108210388670\n1 774754709871 107248878536\n";
        let mut rows = Vec::new();
        cpuacct_usage_all(text, |user, system| rows.push((user, system))).unwrap();
        assert_eq!(
            rows,
            [(784791543193, 108210388670), (774754709871, 107248878536)]
        );
        assert!(err_text(cpuacct_usage_all(b"0 1 2\n", |_, _| {})).contains("header"));
        assert!(err_text(cpuacct_usage_all(b"", |_, _| {})).contains("no header"));
        let short = cpuacct_usage_all(b"cpu user system\n0 1\n", |_, _| {});
        assert!(err_text(short).contains("not three numbers"));
    }

    #[test]
    fn blkio_v1_entries_skip_the_total() {
        let text = b"8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 12288\n8:0 Discard 0\n\
            8:0 Total 12288\n253:1 Read 1\nTotal 12289\n";
        let mut entries = Vec::new();
        blkio_v1("blkio.throttle.io_service_bytes_recursive", text, |e| {
            entries.push((e.major, e.minor, e.op.to_owned(), e.value))
        })
        .unwrap();
        assert_eq!(entries.len(), 7);
        assert_eq!(entries[1], (8, 0, "Write".into(), 8192));
        assert_eq!(entries[6], (253, 1, "Read".into(), 1));
        let mut none = 0;
        blkio_v1("blkio", b"Total 0\n", |_| none += 1).unwrap();
        assert_eq!(none, 0);
        for bad in [
            &b"8-0 Read 1\n"[..],
            b"8:0 Read\n",
            b"8:0 Read x\n",
            b"8:0 Read 1 2\n",
            b"Total\n",
        ] {
            assert!(blkio_v1("blkio", bad, |_| {}).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn io_stat_v2_pairs() {
        let text = b"8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n\
            253:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n";
        let mut pairs = Vec::new();
        io_stat(text, |maj, min, key, value| {
            pairs.push((maj, min, key.to_owned(), value))
        })
        .unwrap();
        assert_eq!(pairs.len(), 12);
        assert_eq!(pairs[1], (8, 16, "wbytes".into(), 314773504));
        assert_eq!(pairs[6], (253, 0, "rbytes".into(), 4096));
        assert!(err_text(io_stat(b"8:16 rbytes\n", |_, _, _, _| {})).contains("not key=value"));
        assert!(err_text(io_stat(b"8:16 rbytes=x\n", |_, _, _, _| {})).contains("not a number"));
        assert!(err_text(io_stat(b"sda rbytes=1\n", |_, _, _, _| {})).contains("major:minor"));
    }

    const NET_DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    3193      29    0    0    0     0          0         0     3193      29    0    0    0     0       0          0
  eth0: 110834862    6105    1    2    0     0          0         0   497796    5336    3    4    0     0       0          0
";

    #[test]
    fn net_dev_interfaces() {
        let mut seen = Vec::new();
        net_dev(NET_DEV.as_bytes(), |l| {
            seen.push((
                l.name.to_string(),
                [l.rx_bytes, l.rx_packets, l.rx_errors, l.rx_dropped],
                [l.tx_bytes, l.tx_packets, l.tx_errors, l.tx_dropped],
            ))
        })
        .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, "lo");
        assert_eq!(seen[1].0, "eth0");
        assert_eq!(seen[1].1, [110834862, 6105, 1, 2]);
        assert_eq!(seen[1].2, [497796, 5336, 3, 4]);
    }

    #[test]
    fn net_dev_rejects_malformed_content() {
        assert!(err_text(net_dev(b"", |_| {})).contains("no header"));
        assert!(err_text(net_dev(b"lo: 1 2\n", |_| {})).contains("not a header"));
        let header = NET_DEV.lines().take(2).collect::<Vec<_>>().join("\n");
        let short = format!("{header}\n  lo: 1 2 3\n");
        assert!(err_text(net_dev(short.as_bytes(), |_| {})).contains("not 16 counters"));
        let long = format!("{header}\n  lo: {}\n", "1 ".repeat(17));
        assert!(err_text(net_dev(long.as_bytes(), |_| {})).contains("not name: 16 counters"));
        let nameless = format!("{header}\n  {}\n", "1 ".repeat(16));
        assert!(err_text(net_dev(nameless.as_bytes(), |_| {})).contains("no interface name"));
    }

    #[test]
    fn net_dev_keeps_every_interface_when_one_name_is_not_utf8() {
        let header = NET_DEV.lines().take(2).collect::<Vec<_>>().join("\n");
        let counters = "1 ".repeat(16);
        let mut file = format!("{header}\n").into_bytes();
        file.extend_from_slice(b"  \xff\xfe\xc3x: ");
        file.extend_from_slice(format!("{counters}\n    v0: {counters}\n").as_bytes());
        let mut names = Vec::new();
        net_dev(&file, |l| names.push(l.name.clone().into_owned())).unwrap();
        assert_eq!(names, ["\u{fffd}\u{fffd}\u{fffd}x", "v0"]);
    }

    #[test]
    fn proc_cgroup_lines_of_both_versions() {
        let hybrid = b"9:name=systemd:/\n4:memory:/ctr\n2:cpu,cpuacct:/ctr\n0::/\n";
        let mut lines = Vec::new();
        proc_cgroup(hybrid, |l| {
            lines.push((l.hierarchy, l.controllers.to_owned(), l.path.to_owned()))
        })
        .unwrap();
        assert_eq!(lines[1], (4, "memory".into(), "/ctr".into()));
        assert_eq!(lines[2], (2, "cpu,cpuacct".into(), "/ctr".into()));
        assert_eq!(lines[3], (0, "".into(), "/".into()));
        let mut v2 = Vec::new();
        proc_cgroup(b"0::/system.slice/x:y.scope\n", |l| {
            v2.push(l.path.to_owned())
        })
        .unwrap();
        assert_eq!(v2, ["/system.slice/x:y.scope"]);
        assert!(err_text(proc_cgroup(b"4:memory\n", |_| {})).contains("not id:controllers:path"));
        assert!(err_text(proc_cgroup(b"x:memory:/a\n", |_| {})).contains("hierarchy id"));
        assert!(err_text(proc_cgroup(b"4:memory:a\n", |_| {})).contains("absolute"));
    }
}
