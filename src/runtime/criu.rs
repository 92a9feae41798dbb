//! Whether checkpoints can work on this host: `criu check`, run once through the [`Spawner`],
//! bounded, its verdict logged and kept so CreateCheckpoint and restore fail fast with CRIU's own
//! message instead of a long dump attempt that fails anyway.
//!
//! Owns: refusing a `--criu` the runtime cannot take, which CRIU binary is checked (the `--criu` one, else `criu` from `PATH`, as the runtime
//! would use it), running the check, and the FAILED_PRECONDITION it turns into.
//! Does not own: passing `--criu` to the runtime (the argv in [`super`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::{Outcome, RuntimeBinary, SpawnOptions, SpawnStdio, Spawner};
use crate::error::{Error, Result};

/// How long `criu check` may take; it answers in well under a second on an idle host.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// How many of the check's error lines a refusal quotes.
const MESSAGE_LINES: usize = 3;

/// The CRIU the runtime uses, and the verdict of its check once it has run.
pub(crate) struct Criu {
    /// `--criu`, or `None` for `criu` looked up in `PATH`.
    binary: Option<PathBuf>,
    verdict: OnceCell<std::result::Result<(), String>>,
}

impl Criu {
    pub(crate) fn new(binary: Option<PathBuf>) -> Self {
        Criu {
            binary,
            verdict: OnceCell::new(),
        }
    }

    fn program(&self) -> String {
        self.binary
            .as_ref()
            .map_or_else(|| "criu".to_owned(), |p| p.display().to_string())
    }

    /// Ok when `criu check` passed; else FAILED_PRECONDITION with its message. The first call
    /// runs the check (later and concurrent ones wait for that verdict) and logs it.
    pub(crate) async fn ready(&self, spawner: &Arc<dyn Spawner>) -> Result<()> {
        let verdict = self
            .verdict
            .get_or_init(|| async {
                let started = Instant::now();
                let verdict = self.check(spawner.as_ref()).await;
                let took_ms = started.elapsed().as_millis() as u64;
                match &verdict {
                    Ok(()) => tracing::info!(criu = %self.program(), took_ms, "criu check passed: checkpoints can work"),
                    Err(why) => tracing::warn!(criu = %self.program(), took_ms, reason = %why, "criu check failed: CreateCheckpoint and restores will be refused"),
                }
                verdict
            })
            .await;
        verdict.clone().map_err(|why| {
            Error::FailedPrecondition(format!(
                "checkpoints cannot work on this host: {why} (give berthd a CRIU that passes `criu check` with --criu)"
            ))
        })
    }

    async fn check(&self, spawner: &dyn Spawner) -> std::result::Result<(), String> {
        let program = self.program();
        let completion = spawner
            .spawn(
                vec![program.clone(), "check".into()],
                SpawnStdio::captured(),
                SpawnOptions {
                    timeout: CHECK_TIMEOUT,
                    log: None,
                    kill_if_berthd_dies: false,
                },
            )
            .await
            .map_err(|e| format!("{program} check could not run: {e}"))?;
        match completion.outcome {
            Outcome::Exited { code: Some(0) } => Ok(()),
            Outcome::Exited { code } => Err(format!(
                "{program} check failed: {}",
                check_message(&completion.stderr, &completion.stdout, code)
            )),
            Outcome::TimedOut => Err(format!(
                "{program} check did not finish within {} s",
                CHECK_TIMEOUT.as_secs()
            )),
            Outcome::SpawnFailed { error } => Err(format!("{program} cannot run: {error}")),
        }
    }
}

impl RuntimeBinary {
    /// Refuses a `criu` that is not an executable file, or given to a runtime without a
    /// `--criu` flag: crun and youki link libcriu, which runs the `criu` first in `PATH`.
    pub fn check_criu_flag(&self) -> Result<()> {
        let Some(criu) = &self.criu else {
            return Ok(());
        };
        let name = self.name();
        if name == "crun" || name == "youki" {
            return Err(Error::InvalidArgument(format!(
                "--criu {} cannot be used with {name}: it has no --criu flag and runs the criu first in PATH; put that CRIU first in berthd's PATH instead",
                criu.display()
            )));
        }
        if !super::executable_file(criu) {
            return Err(Error::InvalidArgument(format!(
                "--criu {} is not an executable file",
                criu.display()
            )));
        }
        Ok(())
    }
}

/// What a failed `criu check` said: its `Error` lines (the last few), else its last line.
fn check_message(stderr: &str, stdout: &str, code: Option<u32>) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("Error"))
        .collect();
    let quoted = if errors.is_empty() {
        lines.last().copied().into_iter().collect()
    } else {
        errors[errors.len().saturating_sub(MESSAGE_LINES)..].to_vec()
    };
    if quoted.is_empty() {
        match code {
            Some(code) => format!("exited with status {code} and no message"),
            None => "ended abnormally with no message".into(),
        }
    } else {
        quoted.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Operation;
    use std::path::Path;

    fn runc() -> RuntimeBinary {
        RuntimeBinary {
            path: "/usr/bin/runc".into(),
            root: "/run/berth/runtime".into(),
            criu: None,
        }
    }

    #[test]
    fn criu_is_a_global_flag_and_refused_for_crun_and_youki() {
        let with_criu = RuntimeBinary {
            criu: Some("/bin/sh".into()),
            ..runc()
        };
        let argv = with_criu.argv(&Operation::Start { id: "a" }, Path::new("/l.log"));
        assert_eq!(argv[7..], ["--criu", "/bin/sh", "start", "a"]);
        assert!(with_criu.check_criu_flag().is_ok());
        let missing = RuntimeBinary {
            criu: Some("/nonexistent/criu".into()),
            ..runc()
        };
        let err = missing.check_criu_flag().unwrap_err();
        assert!(err.to_string().contains("not an executable file"), "{err}");
        for other in ["/usr/bin/crun", "/usr/local/bin/youki"] {
            let refused = RuntimeBinary {
                path: other.into(),
                ..with_criu.clone()
            };
            let err = refused.check_criu_flag().unwrap_err();
            assert!(err.to_string().contains("has no --criu flag"), "{err}");
        }
        let crun_without = RuntimeBinary {
            path: "/usr/bin/crun".into(),
            ..runc()
        };
        assert!(crun_without.check_criu_flag().is_ok());
    }

    #[test]
    fn check_messages_quote_criu_errors() {
        let stderr = "Warn  (criu/kerndat.c:1290): Can't keep kdat cache on non-tempfs\n\
            Error (criu/kerndat.c:1615): kerndat_vdso_fill_symtable failed when initializing kerndat.\n\
            Error (criu/crtools.c:260): Could not initialize kernel features detection.\n";
        assert_eq!(
            check_message(stderr, "", Some(1)),
            "Error (criu/kerndat.c:1615): kerndat_vdso_fill_symtable failed when initializing kerndat.; \
             Error (criu/crtools.c:260): Could not initialize kernel features detection."
        );
        assert_eq!(check_message("", "odd\nlast\n", Some(1)), "last");
        assert_eq!(
            check_message("", "", Some(3)),
            "exited with status 3 and no message"
        );
    }
}
