//! Checks on request fields that need no daemon state: ids, bundles, signals, processes.
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

/// The longest path the kernel takes, with its NUL.
const PATH_MAX: usize = 4096;
/// The most supplementary groups a process can have: `setgroups` refuses more.
const NGROUPS_MAX: usize = 65536;
/// The longest single argument or environment string `execve` takes, with its NUL (the kernel's
/// MAX_ARG_STRLEN, 32 pages: 128 KiB with 4 KiB pages): a longer one fails the exec with E2BIG,
/// after the runtime has reported the process started.
fn max_arg_strlen() -> usize {
    32 * rustix::param::page_size()
}

/// What one process runs with, as an AddProcess request or a bundle's config.json gives it
/// (`field` names where, e.g. `"config.json: process."`). The kernel takes args, env and cwd as
/// C strings, so none may hold a NUL (runc would start the process and fail at its exec, or
/// refuse it as its own error); env entries are `NAME=value`, as runc requires; cwd is a path
/// the kernel takes; the groups are as many as `setgroups` takes. Then all of it must fit
/// `limit` ([`spec_bytes`]).
pub fn process(
    field: &str,
    args: &[String],
    env: &[String],
    cwd: &str,
    additional_gids: &[u32],
    limit: usize,
) -> Result<()> {
    let nul = |name: String, value: &str| {
        Error::InvalidArgument(format!(
            "{field}{name} {} contains a NUL byte",
            crate::error::quote(value)
        ))
    };
    let max_arg_strlen = max_arg_strlen();
    let too_long = |name: String, value: &str| {
        Error::InvalidArgument(format!(
            "{field}{name} is {} bytes, longer than the kernel takes one argument or environment string to be (MAX_ARG_STRLEN, {max_arg_strlen} with its NUL); pass it in a file",
            value.len()
        ))
    };
    for (i, arg) in args.iter().enumerate() {
        if arg.contains('\0') {
            return Err(nul(format!("args[{i}]"), arg));
        }
        if arg.len() >= max_arg_strlen {
            return Err(too_long(format!("args[{i}]"), arg));
        }
    }
    for (i, entry) in env.iter().enumerate() {
        if entry.contains('\0') {
            return Err(nul(format!("env[{i}]"), entry));
        }
        if entry.len() >= max_arg_strlen {
            return Err(too_long(format!("env[{i}]"), entry));
        }
        if matches!(entry.find('='), None | Some(0)) {
            return Err(Error::InvalidArgument(format!(
                "{field}env[{i}] {} is not NAME=value",
                crate::error::quote(entry)
            )));
        }
    }
    if args.first().is_some_and(|program| program.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "{field}args[0] is empty: give the program to run"
        )));
    }
    // The kernel takes the working directory as is; runc refuses a relative one.
    if !cwd.is_empty() && !cwd.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "{field}cwd {} is not absolute",
            crate::error::quote(cwd)
        )));
    }
    // No program by a longer name can be executed (ENAMETOOLONG); and the built-in runtime's
    // exec child blocks for good writing an error that quotes a name of hundreds of KB.
    if let Some(program) = args.first()
        && program.len() >= PATH_MAX
    {
        return Err(Error::InvalidArgument(format!(
            "{field}args[0] is {} bytes, longer than a path may be (PATH_MAX, {PATH_MAX} with its NUL); give the program's path or name",
            program.len()
        )));
    }
    if cwd.len() >= PATH_MAX {
        return Err(Error::InvalidArgument(format!(
            "{field}cwd is {} bytes, longer than a path may be (PATH_MAX, {PATH_MAX} with its NUL)",
            cwd.len()
        )));
    }
    if cwd.contains('\0') {
        return Err(nul("cwd".into(), cwd));
    }
    if additional_gids.len() > NGROUPS_MAX {
        return Err(Error::InvalidArgument(format!(
            "{field}user.additionalGids has {} entries, more than NGROUPS_MAX ({NGROUPS_MAX})",
            additional_gids.len()
        )));
    }
    let size = spec_bytes(args, env, cwd, additional_gids);
    if size > limit {
        return Err(Error::ResourceExhausted(format!(
            "the process's args, env, cwd and additional gids are {size} bytes, more than --max-process-spec-bytes ({limit})"
        )));
    }
    Ok(())
}

/// The largest uid or gid runc sets (it refuses the rest; the kernel's `(uid_t)-1` means "no
/// change", which would leave the process root's).
const MAX_ID: u32 = i32::MAX as u32;

/// A process's user: uid, gid and additional gids each within `0..=2147483647`.
pub fn user(field: &str, uid: u32, gid: u32, additional_gids: &[u32]) -> Result<()> {
    let out_of_range = |name: String, id: u32| {
        Error::InvalidArgument(format!(
            "{field}user.{name} {id} is out of range: uids and gids go from 0 to {MAX_ID}"
        ))
    };
    if uid > MAX_ID {
        return Err(out_of_range("uid".into(), uid));
    }
    if gid > MAX_ID {
        return Err(out_of_range("gid".into(), gid));
    }
    match additional_gids.iter().position(|&g| g > MAX_ID) {
        Some(i) => Err(out_of_range(
            format!("additionalGids[{i}]"),
            additional_gids[i],
        )),
        None => Ok(()),
    }
}

/// What args, env and cwd of one process (each string with its NUL, as the kernel counts them)
/// and its additional gids (4 bytes each) come to: what `--max-process-spec-bytes` holds a
/// process to, since they are stored, sent in State and events, and passed to the runtime.
pub(super) fn spec_bytes(
    args: &[String],
    env: &[String],
    cwd: &str,
    additional_gids: &[u32],
) -> usize {
    let strings: usize = args.iter().chain(env).map(|s| s.len() + 1).sum();
    let cwd = if cwd.is_empty() { 0 } else { cwd.len() + 1 };
    strings + cwd + 4 * additional_gids.len()
}

/// What berthd takes from a bundle; the rest of the spec is the runtime's to read.
#[derive(Debug)]
pub struct BundleConfig {
    pub dir: PathBuf,
    pub process: Process,
    /// The spec as berthd read it, written out again for the runtime
    /// ([`runtime_config`]).
    pub runtime_config: Vec<u8>,
    /// The names beside `config.json` in the bundle, which the runtime's copy mirrors.
    pub names: Vec<std::ffi::OsString>,
    /// `linux.cgroupsPath`, where the runtime puts the container's cgroups.
    pub cgroups_path: Option<PathBuf>,
    /// How the container's uids appear on the host.
    pub uids: UidMap,
}

/// How a container's uids appear on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UidMap {
    /// No user namespace of its own: as they are.
    Host,
    /// A user namespace with these ranges: (inside, outside, count).
    Mapped(Vec<(u32, u32, u32)>),
    /// A user namespace the container joins by path, whose ranges the bundle does not say.
    Unknown,
}

impl UidMap {
    /// The ranges of `/proc/<pid>/uid_map` for a process's user namespace: the host's own when
    /// it maps every uid to itself.
    pub fn of_ranges(ranges: Vec<(u32, u32, u32)>) -> UidMap {
        if ranges == [(0, 0, u32::MAX)] {
            UidMap::Host
        } else {
            UidMap::Mapped(ranges)
        }
    }

    /// The host uid of the container's `uid`; `None` if it is not mapped or not known.
    pub fn host_uid(&self, uid: u32) -> Option<u32> {
        match self {
            UidMap::Host => Some(uid),
            UidMap::Mapped(ranges) => ranges.iter().find_map(|&(inside, outside, count)| {
                let offset = uid.checked_sub(inside).filter(|&o| o < count)?;
                outside.checked_add(offset)
            }),
            UidMap::Unknown => None,
        }
    }

    /// Whether host uid `uid` has a uid in the container's user namespace; one berthd cannot
    /// tell is taken to have.
    pub fn maps_host_uid(&self, uid: u32) -> bool {
        match self {
            UidMap::Host | UidMap::Unknown => true,
            UidMap::Mapped(ranges) => ranges.iter().any(|&(_, outside, count)| {
                uid.checked_sub(outside)
                    .is_some_and(|offset| offset < count)
            }),
        }
    }

    fn of_spec(spec: &Spec) -> UidMap {
        let Some(linux) = spec.linux() else {
            return UidMap::Host;
        };
        let user_namespace = linux
            .namespaces()
            .iter()
            .flatten()
            .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::User);
        match user_namespace {
            None => UidMap::Host,
            Some(ns) if ns.path().is_some() => UidMap::Unknown,
            Some(_) => UidMap::Mapped(
                linux
                    .uid_mappings()
                    .iter()
                    .flatten()
                    .map(|m| (m.container_id(), m.host_id(), m.size()))
                    .collect(),
            ),
        }
    }
}

/// An absolute path to a directory holding a `config.json` that parses as an OCI runtime spec
/// with a process, both opened as `caller` may open them: no symbolic link on the way, the
/// config a regular file of bounded size, read off the reactor within a bound.
pub async fn bundle(path: &str, caller: &Caller) -> Result<BundleConfig> {
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
    let Some((bytes, names)) = caller.read_bundle(dir).await? else {
        return Err(Error::NotFound(format!(
            "{} does not exist: a bundle needs a config.json (runc spec makes one)",
            shown(&config)
        )));
    };
    // serde quotes a value of the wrong type whole: cut, as the file is the client's.
    let mut spec: Spec = serde_json::from_slice(&bytes).map_err(|e| {
        Error::InvalidArgument(format!(
            "{} is not a valid OCI runtime spec: {}",
            shown(&config),
            crate::error::bounded(&e.to_string())
        ))
    })?;
    let runtime_config = runtime_config(&mut spec, dir)?;
    let Some(process) = spec.process_mut().take() else {
        return Err(Error::InvalidArgument(format!(
            "{} has no process to run",
            shown(&config)
        )));
    };
    // An added process may leave these empty for the container's own; the init has none.
    if process.args().as_ref().is_none_or(|args| args.is_empty()) {
        return Err(Error::InvalidArgument(
            "config.json: process.args is empty: give the program to run and its arguments".into(),
        ));
    }
    if process.cwd().as_os_str().is_empty() {
        return Err(Error::InvalidArgument(
            "config.json: process.cwd is empty: give the working directory (runc spec gives /)"
                .into(),
        ));
    }
    Ok(BundleConfig {
        dir: dir.to_owned(),
        process,
        runtime_config,
        names,
        uids: UidMap::of_spec(&spec),
        // Empty is unset, as the runtime takes it.
        cgroups_path: spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .filter(|path| !path.as_os_str().is_empty()),
    })
}

/// The spec the runtime is given instead of the bundle's `config.json`, which its owner may
/// change between berthd's read and the runtime's, or write so that the runtime's JSON parser
/// reads it otherwise than berthd's (Go's takes `"User"` for `"user"`, the last of two): what
/// berthd checked is what runs. Paths the runtime takes as relative to the bundle (the root,
/// the source of a bind mount) are made absolute, since the copy lies elsewhere. A field
/// oci-spec does not know is not carried over.
fn runtime_config(spec: &mut Spec, bundle: &Path) -> Result<Vec<u8>> {
    if let Some(root) = spec.root_mut()
        && root.path().is_relative()
    {
        let absolute = bundle.join(root.path());
        root.set_path(absolute);
    }
    for mount in spec.mounts_mut().iter_mut().flatten() {
        let binds = mount.typ().as_deref() == Some("bind")
            || mount
                .options()
                .iter()
                .flatten()
                .any(|option| option == "bind" || option == "rbind");
        if let Some(source) = mount.source().as_ref().filter(|s| s.is_relative())
            && binds
        {
            let absolute = bundle.join(source);
            mount.set_source(Some(absolute));
        }
    }
    serde_json::to_vec(spec).map_err(|e| {
        Error::Internal(format!(
            "the spec of {} could not be written out again: {e}",
            shown(bundle)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_containers_uid_is_found_on_the_host_through_its_user_namespace() {
        let spec = |linux: serde_json::Value| -> Spec {
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "linux": linux}))
                .unwrap()
        };
        let host = spec(serde_json::json!({"namespaces": [{"type": "pid"}]}));
        assert_eq!(UidMap::of_spec(&host).host_uid(1000), Some(1000));
        let mapped = spec(serde_json::json!({
            "namespaces": [{"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]
        }));
        let map = UidMap::of_spec(&mapped);
        assert_eq!(map.host_uid(0), Some(100000));
        assert_eq!(map.host_uid(65535), Some(165535));
        assert_eq!(map.host_uid(65536), None);
        assert!(map.maps_host_uid(100000) && map.maps_host_uid(165535));
        assert!(!map.maps_host_uid(1000) && !map.maps_host_uid(165536));
        let joined = spec(serde_json::json!({
            "namespaces": [{"type": "user", "path": "/proc/1/ns/user"}]
        }));
        assert_eq!(UidMap::of_spec(&joined).host_uid(0), None);
        assert_eq!(UidMap::of_ranges(vec![(0, 0, u32::MAX)]), UidMap::Host);
        let overflow = UidMap::of_ranges(vec![(10, u32::MAX - 1, 5)]);
        assert_eq!(overflow.host_uid(11), Some(u32::MAX));
        assert_eq!(overflow.host_uid(12), None);
    }

    #[test]
    fn the_runtimes_spec_has_its_bundle_paths_absolute_and_no_field_berthd_did_not_read() {
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"cwd": "/", "user": {"uid": 0, "gid": 0}, "User": {"uid": 5, "gid": 5}},
            "mounts": [
                {"destination": "/a", "type": "bind", "source": "data"},
                {"destination": "/b", "type": "none", "source": "more", "options": ["rbind"]},
                {"destination": "/c", "source": "/abs", "options": ["bind"]},
                {"destination": "/proc", "type": "proc", "source": "proc"}
            ]
        }))
        .unwrap();
        let bytes = runtime_config(&mut spec, Path::new("/b/x")).unwrap();
        let copy: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(copy["root"]["path"], "/b/x/rootfs");
        let sources: Vec<&str> = copy["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["source"].as_str().unwrap())
            .collect();
        assert_eq!(sources, ["/b/x/data", "/b/x/more", "/abs", "proc"]);
        assert_eq!(
            copy["process"]["user"],
            serde_json::json!({"uid": 0, "gid": 0})
        );
        assert!(copy["process"].get("User").is_none(), "{copy}");
    }

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
    fn uids_and_gids_past_what_runc_sets_are_refused_by_name() {
        assert!(user("", 0, 0, &[]).is_ok());
        assert!(user("", MAX_ID, MAX_ID, &[MAX_ID]).is_ok());
        let refused = |uid, gid, gids: &[u32]| match user("config.json: process.", uid, gid, gids) {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(u32::MAX, 0, &[]),
            "config.json: process.user.uid 4294967295 is out of range: uids and gids go from 0 to 2147483647"
        );
        assert!(refused(0, MAX_ID + 1, &[]).contains("user.gid 2147483648"));
        assert!(refused(0, 0, &[5, u32::MAX]).contains("user.additionalGids[1] 4294967295"));
    }

    #[test]
    fn process_specs_are_bounded_by_args_env_cwd_and_gids_together() {
        let args = vec!["sh".to_owned(), "-c".to_owned()];
        let env = vec!["A=1".to_owned()];
        // "sh\0" + "-c\0" + "A=1\0" + "/tmp\0" + 2 gids of 4 bytes = 23 bytes.
        assert_eq!(spec_bytes(&args, &env, "/tmp", &[1, 2]), 23);
        assert!(process("", &args, &env, "/tmp", &[1, 2], 23).is_ok());
        let err = process("", &args, &env, "/tmp", &[1, 2], 22).unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)));
        assert_eq!(
            err.to_string(),
            "the process's args, env, cwd and additional gids are 23 bytes, more than --max-process-spec-bytes (22)"
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::ResourceExhausted
        );
        // An empty cwd (the container's own) counts nothing.
        assert_eq!(spec_bytes(&args, &env, "", &[]), 10);
    }

    #[test]
    fn processes_refuse_an_empty_program_and_a_relative_cwd() {
        let invalid = |result: Result<()>| match result {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("{other:?}"),
        };
        let args = vec![String::new(), "x".into()];
        let message = invalid(process("", &args, &[], "/", &[], 1024));
        assert_eq!(message, "args[0] is empty: give the program to run");
        let args = vec!["sh".to_owned()];
        let message = invalid(process(
            "config.json: process.",
            &args,
            &[],
            "tmp",
            &[],
            1024,
        ));
        assert_eq!(message, "config.json: process.cwd \"tmp\" is not absolute");
        assert!(
            process("", &args, &[], "", &[], 1024).is_ok(),
            "empty: the container's"
        );
    }

    #[test]
    fn processes_refuse_nul_bytes_bad_env_long_cwds_and_too_many_groups() {
        let check = |args: &[&str], env: &[&str], cwd: &str, gids: &[u32]| {
            let args: Vec<String> = args.iter().map(|&a| a.into()).collect();
            let env: Vec<String> = env.iter().map(|&e| e.into()).collect();
            process("", &args, &env, cwd, gids, usize::MAX)
        };
        let invalid = |result: Result<()>| match result {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("{other:?}"),
        };
        assert!(check(&["sh"], &["A=", "B=x=y"], "", &[]).is_ok());
        assert_eq!(
            invalid(check(&["sh", "a\0b"], &[], "", &[])),
            r#"args[1] "a\0b" contains a NUL byte"#
        );
        assert_eq!(
            invalid(check(&["sh"], &["A=1", "B=\0"], "", &[])),
            r#"env[1] "B=\0" contains a NUL byte"#
        );
        for bad in ["FOO", "=x", ""] {
            let message = invalid(check(&["sh"], &[bad], "", &[]));
            assert!(message.ends_with("is not NAME=value"), "{message}");
        }
        assert_eq!(
            invalid(check(&["sh"], &[], "/tm\0p", &[])),
            r#"cwd "/tm\0p" contains a NUL byte"#
        );
        let longest = format!("/{}", "d".repeat(PATH_MAX - 2));
        assert!(check(&["sh"], &[], &longest, &[]).is_ok());
        let message = invalid(check(&["sh"], &[], &format!("{longest}d"), &[]));
        assert_eq!(
            message,
            "cwd is 4096 bytes, longer than a path may be (PATH_MAX, 4096 with its NUL)"
        );
        // The kernel's per-string limit, for args and env alike: one byte under it runs.
        let longest = "v".repeat(max_arg_strlen() - 1);
        let longest_entry = format!("A={}", &longest[2..]);
        assert!(check(&["sh", &longest], &[&longest_entry], "", &[]).is_ok());
        let message = invalid(check(&["sh", "x", &format!("{longest}v")], &[], "", &[]));
        let limit = max_arg_strlen();
        assert_eq!(
            message,
            format!(
                "args[2] is {limit} bytes, longer than the kernel takes one argument or environment string to be (MAX_ARG_STRLEN, {limit} with its NUL); pass it in a file"
            )
        );
        let message = invalid(check(
            &["sh"],
            &["A=1", &format!("{longest_entry}v")],
            "",
            &[],
        ));
        assert!(
            message.starts_with(&format!("env[1] is {limit} bytes")),
            "{message}"
        );
        let groups = vec![7; NGROUPS_MAX];
        assert!(check(&["sh"], &[], "", &groups).is_ok());
        let message = invalid(check(&["sh"], &[], "", &vec![7; NGROUPS_MAX + 1]));
        assert_eq!(
            message,
            "user.additionalGids has 65537 entries, more than NGROUPS_MAX (65536)"
        );
        // A bundle's fields are named where they are.
        let args = vec!["a\0".to_owned()];
        let message = invalid(process("config.json: process.", &args, &[], "/", &[], 1024));
        assert!(
            message.starts_with("config.json: process.args[0] "),
            "{message}"
        );
        // Valid fields that do not fit the limit are a limit reached, not malformed input.
        let err = process("", &["sh".into()], &[], "/", &groups, 1024).unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
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
        let caller = Caller::new(
            Peer::root(),
            "/nonexistent-state".into(),
            limits,
            hand_back,
            std::sync::Arc::default(),
        );
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
        let refused = |config: String| {
            std::fs::write(dir.path().join("config.json"), config).unwrap();
            async {
                match bundle(root).await {
                    Err(Error::InvalidArgument(m)) => m,
                    other => panic!("{other:?}"),
                }
            }
        };
        let m = refused(
            r#"{"ociVersion":"1.0.2","process":{"cwd":"/","user":{"uid":0,"gid":0}}}"#.into(),
        )
        .await;
        assert!(m.starts_with("config.json: process.args is empty"), "{m}");
        let m = refused(
            r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"","user":{"uid":0,"gid":0}}}"#
                .into(),
        )
        .await;
        assert!(m.starts_with("config.json: process.cwd is empty"), "{m}");
        // A value of the wrong type is quoted by serde whole; the message keeps its ends.
        let long = "A".repeat(1 << 19);
        let m = refused(format!(
            r#"{{"ociVersion":"1.0.2","process":{{"terminal":"{long}"}}}}"#
        ))
        .await;
        assert!(
            m.len() < 1000 && m.contains("bytes cut") && m.contains("column"),
            "{m}"
        );
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}}"#,
        )
        .unwrap();
        let config = bundle(root).await.unwrap();
        assert_eq!(config.dir, dir.path());
        assert_eq!(
            config.process.args().as_deref(),
            Some(&["sh".to_owned()][..])
        );
        assert_eq!(config.cgroups_path, None);
    }
}
