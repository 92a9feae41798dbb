//! The built-in runtime: a [`BuiltinCall`] carried out with youki's libcontainer, in a child the
//! spawn helper forked for it (so the container's init is that child's child, and becomes
//! berthd's when the child exits, as runc's init does when `runc create` exits).
//!
//! Owns: the libcontainer calls for each operation, `list` in runc's JSON, and the failure line
//! in the call's log. Does not own: the fork, stdio or exit (the helper's `fork` module), or what
//! the operations mean (runtime, supervisor).

use crate::runtime::builtin::BuiltinCall;

/// Carries out `call`; on failure writes why to its log (one JSON line, as runc's
/// `--log-format json`) and returns false.
pub(super) fn run(call: &BuiltinCall) -> bool {
    // The helper inherited berthd's subscriber, writing to fd 2, which here is the container's
    // stderr: libcontainer's log lines must not land in the container's output. Its failure is
    // the returned error, written to the log below.
    let _silenced = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
    match execute(call) {
        Ok(()) => true,
        Err(message) => {
            let line = serde_json::json!({ "level": "error", "msg": message });
            let _ = std::fs::write(&call.log, format!("{line}\n"));
            false
        }
    }
}

#[cfg(not(feature = "builtin"))]
fn execute(_call: &BuiltinCall) -> Result<(), String> {
    Err("this berthd was built without the builtin feature".into())
}

#[cfg(feature = "builtin")]
fn execute(call: &BuiltinCall) -> Result<(), String> {
    use libcontainer::container::Container;
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;

    use crate::runtime::builtin::BuiltinOp;

    let builder = |id: &str| {
        ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_root_path(&call.root)
            .map_err(|e| chain(&e))
    };
    let load = |id: &str| {
        let dir = call.root.join(id);
        if !dir.is_dir() {
            return Err(format!("container \"{id}\" does not exist"));
        }
        Container::load(dir).map_err(|e| chain(&e))
    };
    let create = |id: &str,
                  bundle: &std::path::Path,
                  pid_file: &std::path::Path,
                  console_socket: Option<&std::path::Path>| {
        let private = private_bundle(call, id, bundle)?;
        // As runc does, it runs in the bundle it is given: berthd's copy of the spec, whose
        // relative bind-mount sources are already the client's bundle's, made absolute.
        std::env::set_current_dir(bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
        builder(id)?
            .validate_id()
            .map_err(|e| chain(&e))?
            .with_pid_file(Some(pid_file))
            .map_err(|e| chain(&e))?
            .with_console_socket(console_socket)
            .as_init(private)
            // cgroupfs, as berthd runs runc (without --systemd-cgroup).
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| chain(&e))
    };
    match &call.op {
        BuiltinOp::Create {
            id,
            bundle,
            pid_file,
            console_socket,
        } => {
            create(id, bundle, pid_file, console_socket.as_deref())?;
        }
        BuiltinOp::Run {
            id,
            bundle,
            pid_file,
            console_socket,
        } => create(id, bundle, pid_file, console_socket.as_deref())?
            .start()
            .map_err(|e| chain(&e))?,
        BuiltinOp::Start { id } => load(id)?.start().map_err(|e| chain(&e))?,
        BuiltinOp::Exec {
            id,
            process,
            pid_file,
            console_socket,
        } => {
            builder(id)?
                .with_pid_file(Some(pid_file))
                .map_err(|e| chain(&e))?
                .with_console_socket(console_socket.as_ref())
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map_err(|e| chain(&e))?;
        }
        BuiltinOp::Pause { id } => load(id)?.pause().map_err(|e| chain(&e))?,
        BuiltinOp::Resume { id } => load(id)?.resume().map_err(|e| chain(&e))?,
        BuiltinOp::Delete { id } => {
            if call.root.join(id).is_dir() {
                load(id)?.delete(true).map_err(|e| chain(&e))?;
            }
            remove_private_bundle(call, id)?;
        }
        BuiltinOp::List => list(call)?,
    }
    Ok(())
}

/// The bundle libcontainer is given: `<bundles>/<id>/config.json`, the spec in `bundle`
/// (berthd's copy of the one it checked, its root already absolute) with its cgroups path
/// where runc would put it (libcontainer puts a spec
/// without one at `:youki:<id>` at each hierarchy's root), beside a `bundle` file naming the
/// bundle it came from. libcontainer reads the spec again at every exec: from this copy, an
/// edit of the client's `config.json` after the create cannot move an added process into
/// another cgroup. Removed by the delete.
#[cfg(feature = "builtin")]
fn private_bundle(
    call: &BuiltinCall,
    id: &str,
    bundle: &std::path::Path,
) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;

    use libcontainer::oci_spec::runtime::{LinuxNamespaceType, Spec};

    use crate::runtime::builtin::{cgroup_placement, own_cgroup};

    let mut spec = Spec::load(bundle.join("config.json")).map_err(|e| chain(&e))?;
    refuse_unenforced_seccomp(&spec)?;
    let own = crate::procfs::read_generated("/proc/self/cgroup", 2048)
        .map_err(|e| format!("/proc/self/cgroup: {e}"))
        .and_then(|text| own_cgroup(&text).map_err(|e| e.to_string()))?;
    if let Some(linux) = spec.linux_mut() {
        let placed = cgroup_placement(linux.cgroups_path().as_deref(), id, &own);
        linux.set_cgroups_path(Some(placed));
    }
    let shares_pids = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_none_or(|ns| !ns.iter().any(|n| n.typ() == LinuxNamespaceType::Pid));
    if shares_pids {
        leave_for_the_v1_roots()?;
    }
    let dir = call.bundles.join(id);
    remove_private_bundle(call, id)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    spec.save(dir.join("config.json")).map_err(|e| chain(&e))?;
    let source = dir.join("bundle");
    std::fs::write(&source, bundle.as_os_str().as_encoded_bytes())
        .map_err(|e| format!("{}: {e}", source.display()))?;
    Ok(dir)
}

/// Moves this process to the root of every v1 hierarchy. For a container that shares the
/// host's pid namespace, libcontainer bind-mounts the container's own v1 cgroups into it by
/// their paths relative to the cgroups of the init's parent, this process: from berthd's
/// cgroups, beneath which the container's lie, the paths would come out short and the create
/// would fail; from the roots they come out whole.
#[cfg(feature = "builtin")]
fn leave_for_the_v1_roots() -> Result<(), String> {
    for point in crate::stats::cgroup::Mounts::discover().v1_points() {
        let procs = point.join("cgroup.procs");
        std::fs::write(&procs, "0").map_err(|e| format!("{}: {e}", procs.display()))?;
    }
    Ok(())
}

#[cfg(feature = "builtin")]
fn remove_private_bundle(call: &BuiltinCall, id: &str) -> Result<(), String> {
    let dir = call.bundles.join(id);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("{}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The bundle container `id` was created from, as the create recorded it beside the private
/// copy; libcontainer's own state names the copy.
#[cfg(feature = "builtin")]
fn source_bundle(call: &BuiltinCall, id: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let bytes = std::fs::read(call.bundles.join(id).join("bundle")).ok()?;
    Some(std::ffi::OsString::from_vec(bytes).into())
}

/// Without the `builtin-seccomp` feature libcontainer skips a `linux.seccomp` profile with only
/// a log line; a container that asked for a filter must not run without it.
#[cfg(all(feature = "builtin", not(feature = "builtin-seccomp")))]
fn refuse_unenforced_seccomp(spec: &libcontainer::oci_spec::runtime::Spec) -> Result<(), String> {
    if spec
        .linux()
        .as_ref()
        .and_then(|l| l.seccomp().as_ref())
        .is_some()
    {
        return Err("config.json sets linux.seccomp, and this berthd's built-in runtime was built without seccomp (cargo feature builtin-seccomp); run it with --runtime runc".into());
    }
    Ok(())
}

#[cfg(feature = "builtin-seccomp")]
fn refuse_unenforced_seccomp(_spec: &libcontainer::oci_spec::runtime::Spec) -> Result<(), String> {
    Ok(())
}

/// Writes every container under the root to stdout as `runc list --format json` does (the
/// fields berthd's recovery reads).
#[cfg(feature = "builtin")]
fn list(call: &BuiltinCall) -> Result<(), String> {
    use libcontainer::container::{Container, ContainerStatus};

    let entries = match std::fs::read_dir(&call.root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return print_json(&[]),
        Err(e) => return Err(format!("{}: {e}", call.root.display())),
    };
    let mut listed = Vec::new();
    for entry in entries.flatten() {
        let Ok(mut container) = Container::load(entry.path()) else {
            continue;
        };
        let _ = container.refresh_status();
        let status = match container.status() {
            ContainerStatus::Creating => "creating",
            ContainerStatus::Created => "created",
            ContainerStatus::Running => "running",
            ContainerStatus::Stopped => "stopped",
            ContainerStatus::Paused => "paused",
        };
        listed.push(serde_json::json!({
            "id": container.id(),
            "pid": container.pid().map_or(0, |p| p.as_raw()),
            "status": status,
            "bundle": source_bundle(call, container.id()).unwrap_or_else(|| container.bundle().to_path_buf()),
        }));
    }
    print_json(&listed)
}

#[cfg(feature = "builtin")]
fn print_json(listed: &[serde_json::Value]) -> Result<(), String> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, listed)
        .map_err(|e| format!("write the list: {e}"))
        .and_then(|()| stdout.flush().map_err(|e| format!("write the list: {e}")))
}

/// The error and its sources, outermost first: libcontainer's own messages are terse
/// ("failed to create container") and the cause is in the chain.
#[cfg(feature = "builtin")]
fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(all(test, feature = "builtin"))]
mod tests {
    use super::*;

    #[test]
    fn the_chain_names_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&error), "outer: inner");
    }
}
