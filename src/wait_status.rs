//! Decoding raw wait statuses, in exactly one function, for every source of them: the reaper's
//! `waitid` and pidfd reads, and the spawn helper's runtime commands.

/// The exit code the API reports for a raw wait status (as `waitpid` gives it): the code for a
/// normal exit, 128 + the signal number for a process killed by a signal. `None` for states
/// that are not an exit (stopped, continued).
pub fn exit_code(raw: i32) -> Option<u32> {
    if libc::WIFEXITED(raw) {
        Some(libc::WEXITSTATUS(raw) as u32)
    } else if libc::WIFSIGNALED(raw) {
        Some(128 + libc::WTERMSIG(raw) as u32)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(0), Some(0));
        assert_eq!(exit_code(7 << 8), Some(7));
        assert_eq!(exit_code(255 << 8), Some(255));
        assert_eq!(exit_code(libc::SIGKILL), Some(137));
        assert_eq!(exit_code(libc::SIGTERM), Some(143));
        // Killed by SIGSEGV with a core dump.
        assert_eq!(exit_code(libc::SIGSEGV | 0x80), Some(139));
        // Real-time signals are signals too: 128 + 64.
        assert_eq!(exit_code(64), Some(192));
        // Stopped by SIGSTOP, and continued: not exits.
        assert_eq!(exit_code((libc::SIGSTOP << 8) | 0x7f), None);
        assert_eq!(exit_code(0xffff), None);
    }
}
