//! Checks on request fields that need no daemon state: ids, bundles, signals.
//! Does not own: checks that need the registry (each operation makes those).

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

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
            "invalid container id {id:?}: use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
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

/// An absolute path to a directory holding a `config.json` that parses as an OCI runtime spec.
pub fn bundle(path: &str) -> Result<(PathBuf, Spec)> {
    if path.is_empty() {
        return Err(Error::InvalidArgument(
            "bundlePath is empty: give the absolute path of an OCI bundle".into(),
        ));
    }
    let dir = Path::new(path);
    if !dir.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "bundlePath {path} is not absolute"
        )));
    }
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Error::InvalidArgument(format!(
                "bundlePath {path} is not a directory"
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!("bundle {path} does not exist")));
        }
        Err(e) => return Err(Error::io(dir, e)),
    }
    let config = dir.join("config.json");
    let bytes = match std::fs::read(&config) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!(
                "{} does not exist: a bundle needs a config.json (runc spec makes one)",
                config.display()
            )));
        }
        Err(e) => return Err(Error::io(&config, e)),
    };
    let spec: Spec = serde_json::from_slice(&bytes).map_err(|e| {
        Error::InvalidArgument(format!(
            "{} is not a valid OCI runtime spec: {e}",
            config.display()
        ))
    })?;
    if spec.process().is_none() {
        return Err(Error::InvalidArgument(format!(
            "{} has no process to run",
            config.display()
        )));
    }
    Ok((dir.to_owned(), spec))
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
    fn signals() {
        assert_eq!(signal(9).unwrap(), 9);
        assert_eq!(signal(64).unwrap(), 64);
        assert_eq!(signal(0).unwrap(), 0);
        assert!(signal(65).is_err());
    }

    #[test]
    fn bundles() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        assert!(matches!(bundle("rel/path"), Err(Error::InvalidArgument(_))));
        assert!(matches!(bundle(""), Err(Error::InvalidArgument(_))));
        let missing = format!("{root}/missing");
        match bundle(&missing) {
            Err(Error::NotFound(m)) => assert!(m.contains(&missing)),
            other => panic!("{other:?}"),
        }
        match bundle(root) {
            Err(Error::NotFound(m)) => assert!(m.contains("config.json")),
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
        assert!(matches!(bundle(root), Err(Error::InvalidArgument(_))));
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}}"#,
        )
        .unwrap();
        let (path, spec) = bundle(root).unwrap();
        assert_eq!(path, dir.path());
        assert!(spec.process().is_some());
    }
}
