//! What berthd reads about a process from `/proc`: its start time, which with its pid tells it
//! from a later process that reused the pid.

use crate::error::{Error, Result};

/// The start time of `pid` in clock ticks since boot.
pub fn process_start_time(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    parse_start_time(&stat)
        .ok_or_else(|| Error::Internal(format!("{path}: no start time in its contents")))
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After ")" come field 3 (state) onwards; field 22 is the 20th of them.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = b"4242 (sh (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 2461696 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time(b"12 (sh) S 1 2"), None);
        assert_eq!(parse_start_time(b"garbage"), None);
    }

    #[test]
    fn own_start_time_is_readable() {
        assert!(process_start_time(std::process::id()).unwrap() > 0);
    }
}
