//! Checks on request fields that need no daemon state: ids, bundles, signals.
//! Does not own: checks that need the registry (each operation makes those).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Process, Spec};

use super::caller::Caller;
use crate::client_fs::shown;
use crate::error::{Error, Result};

/// Whether `name` matches `^[A-Za-z0-9][A-Za-z0-9_.-]{0,max-1}$`: a plain file name that can
/// never be `.`, `..` or hold a slash.
pub fn plain_name(name: &str, max: usize) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`: safe as a file name, a cgroup name and a runtime id.
pub fn container_id(id: &str) -> Result<()> {
    if plain_name(id, 64) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid container id {}: use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            crate::error::quote(id)
        )))
    }
}

/// Signals 1 to 64 are the ones Linux has; 0 sends nothing and checks that the process exists,
/// as `kill -0` (the liveness check the original daemon passed through).
pub fn signal(signal: u32) -> Result<i32> {
    if (0..=64).contains(&signal) {
        Ok(signal as i32)
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid signal {signal}: use a number from 1 to 64, or 0 to check that the process exists (see man 7 signal)"
        )))
    }
}

/// Args plus env of one process must fit in `limit` bytes (each string with its NUL, as
/// `execve` counts them): they are stored, sent in State and events, and passed to the runtime.
pub fn process_spec_size(args: &[String], env: &[String], limit: usize) -> Result<()> {
    let size: usize = args.iter().chain(env).map(|s| s.len() + 1).sum();
    if size > limit {
        return Err(Error::ResourceExhausted(format!(
            "the process's args and env are {size} bytes, more than --max-process-spec-bytes ({limit})"
        )));
    }
    Ok(())
}

/// An absolute path to a directory holding a `config.json` that parses as an OCI runtime spec
/// with a process, both opened as `caller` may open them: no symbolic link on the way, the
/// config a regular file of bounded size, read off the reactor within a bound. Returns the
/// directory and the spec's process (the rest of the spec is the runtime's to read).
pub async fn bundle(path: &str, caller: &Caller) -> Result<(PathBuf, Process)> {
    if path.is_empty() {
        return Err(Error::InvalidArgument(
            "bundlePath is empty: give the absolute path of an OCI bundle".into(),
        ));
    }
    let dir = Path::new(path);
    if !dir.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "bundlePath {} is not absolute",
            shown(dir)
        )));
    }
    let config = dir.join("config.json");
    let Some(bytes) = caller.read_in_dir("bundle", dir, "config.json").await? else {
        return Err(Error::NotFound(format!(
            "{} does not exist: a bundle needs a config.json (runc spec makes one)",
            shown(&config)
        )));
    };
    let mut spec: Spec = serde_json::from_slice(&bytes).map_err(|e| {
        Error::InvalidArgument(format!(
            "{} is not a valid OCI runtime spec: {e}",
            shown(&config)
        ))
    })?;
    let Some(process) = spec.process_mut().take() else {
        return Err(Error::InvalidArgument(format!(
            "{} has no process to run",
            shown(&config)
        )));
    };
    Ok((dir.to_owned(), process))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        for ok in ["a", "A9", "web-1.prod_x", &"x".repeat(64)] {
            assert!(container_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "a/b",
            "a b",
            "../x",
            "é",
            &"x".repeat(65),
        ] {
            let err = container_id(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}");
        }
    }

    #[test]
    fn process_specs_are_bounded_by_args_and_env_together() {
        let args = vec!["sh".to_owned(), "-c".to_owned()];
        let env = vec!["A=1".to_owned()];
        // "sh\0" + "-c\0" + "A=1\0" = 10 bytes.
        assert!(process_spec_size(&args, &env, 10).is_ok());
        let err = process_spec_size(&args, &env, 9).unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)));
        assert_eq!(
            err.to_string(),
            "the process's args and env are 10 bytes, more than --max-process-spec-bytes (9)"
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::ResourceExhausted
        );
    }

    #[test]
    fn signals() {
        assert_eq!(signal(9).unwrap(), 9);
        assert_eq!(signal(64).unwrap(), 64);
        assert_eq!(signal(0).unwrap(), 0);
        assert!(signal(65).is_err());
    }

    #[tokio::test]
    async fn bundles() {
        use crate::client_fs::Peer;
        use crate::supervisor::caller::ClientFileLimits;
        let limits = ClientFileLimits {
            max_bytes: 1 << 20,
            timeout: std::time::Duration::from_secs(5),
        };
        let hand_back = crate::hand_back::HandBack::start().unwrap();
        let caller = Caller::new(Peer::root(), "/nonexistent-state".into(), limits, hand_back);
        let bundle = |path: &str| {
            let path = path.to_owned();
            let caller = caller.clone();
            async move { super::bundle(&path, &caller).await }
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        assert!(matches!(
            bundle("rel/path").await,
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(bundle("").await, Err(Error::InvalidArgument(_))));
        let missing = format!("{root}/missing");
        match bundle(&missing).await {
            Err(Error::NotFound(m)) => assert!(m.contains(&missing)),
            other => panic!("{other:?}"),
        }
        match bundle(root).await {
            Err(Error::NotFound(m)) => assert!(m.contains("config.json")),
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
        assert!(matches!(bundle(root).await, Err(Error::InvalidArgument(_))));
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#,
        )
        .unwrap();
        match bundle(root).await {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("has no process to run"), "{m}"),
            other => panic!("{other:?}"),
        }
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}}"#,
        )
        .unwrap();
        let (path, process) = bundle(root).await.unwrap();
        assert_eq!(path, dir.path());
        assert_eq!(process.args().as_deref(), Some(&["sh".to_owned()][..]));
    }
}
