//! Loud skips: a test that cannot run on this host says so where scripts/test counts it, and
//! with `CI` set a requirement this project's CI host meets fails the test instead.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use super::BUSYBOX;

/// The running test's name (libtest names each test's thread after it).
fn test_name() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_owned(),
        _ => "<unnamed test>".to_owned(),
    }
}

/// Writes `line` to stdout (shown for failing tests, or with --nocapture) and appends it to the
/// file `BERTH_SKIP_LOG` names, which scripts/test prints and counts: libtest hides the stdout
/// of passing tests, and a skipped test passes.
fn report(line: &str) {
    // One line per report, so scripts/test can count them.
    let line = line.replace('\n', "; ");
    println!("{line}");
    if let Some(path) = std::env::var_os("BERTH_SKIP_LOG") {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("BERTH_SKIP_LOG {}: {e}", Path::new(&path).display()));
        // One write per line, so lines of parallel tests never interleave.
        file.write_all(format!("{line}\n").as_bytes())
            .expect("write BERTH_SKIP_LOG");
    }
}

/// Records that the running test skips itself, and why. The caller returns right after.
pub fn skip(reason: &str) {
    report(&format!("SKIP {}: {reason}", test_name()));
}

/// Records something the running test could not check on this host while the rest of it ran.
pub fn note(what: &str) {
    report(&format!("NOTE {}: {what}", test_name()));
}

/// Whether a host-dependent mode can run. Where it cannot: with `CI` set the test fails (every
/// mode this project's CI host supports must run there), elsewhere it is a loud skip.
pub fn host_supports(what: &str, check: Result<(), String>) -> bool {
    let Err(why) = check else {
        return true;
    };
    if std::env::var_os("CI").is_some() {
        panic!("this test {what}, and with CI set a missing requirement fails: {why}");
    }
    skip(&format!("{what}: {why} (with CI set this fails)"));
    false
}

/// Root, runc and a static busybox: what every test that runs a berthd needs.
fn basic_requirements() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not running as root".into());
    }
    let runc = Command::new("runc").arg("--version").output();
    if !runc.is_ok_and(|out| out.status.success()) {
        return Err("runc is not installed (not found in PATH)".into());
    }
    match fs::read(BUSYBOX) {
        Err(e) => Err(format!("{BUSYBOX}: {e} (install busybox-static)")),
        Ok(elf) if has_interpreter(&elf) => Err(format!(
            "{BUSYBOX} is dynamically linked and cannot run in a bare rootfs (install busybox-static)"
        )),
        Ok(_) => Ok(()),
    }
}

/// Whether a 64-bit little-endian ELF file asks for a dynamic loader (has a PT_INTERP header).
fn has_interpreter(elf: &[u8]) -> bool {
    let read = |at: usize, len: usize| -> u64 {
        elf.get(at..at + len).map_or(0, |b| {
            b.iter().rev().fold(0, |n, &byte| n << 8 | u64::from(byte))
        })
    };
    let (phoff, phentsize, phnum) = (read(0x20, 8), read(0x36, 2), read(0x38, 2));
    const PT_INTERP: u64 = 3;
    (0..phnum).any(|i| read((phoff + i * phentsize) as usize, 4) == PT_INTERP)
}

/// Whether the host can run a berthd with containers (see `host_supports`).
pub fn ready() -> bool {
    static UNMET: OnceLock<Result<(), String>> = OnceLock::new();
    let check = UNMET.get_or_init(basic_requirements).clone();
    host_supports("needs root, runc and busybox-static", check)
}
