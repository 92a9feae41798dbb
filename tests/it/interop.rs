//! The wire contract seen from clients that berth did not write, each dialing berthd the way its
//! own docs say, with no berth-specific option: Python's grpc (Debian's 1.51, which sends
//! `localhost` as `:authority`, and the newest from PyPI, which sends the socket path) with code
//! generated from proto/api.proto by grpc_tools (tests/it/interop/client.py), and Node's grpc-js
//! from npm (tests/it/interop/client.js), Go's grpc-go as Debian packages it, built from
//! tests/it/interop/client.go, and grpc-java with netty as Debian packages them, built from
//! tests/it/interop/Client.java (over a loopback port forwarded to the socket: grpc-java reaches
//! a unix socket only through netty's native epoll library, which Debian does not ship).
//! scripts/test installs them: the PyPI one in a virtualenv and grpc-js in a folder, both under
//! target/interop/, and the rest from Debian.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

/// Debian's python3-grpcio and python3-grpc-tools, installed by scripts/test.
const DEBIAN_PYTHON: &str = "/usr/bin/python3";
/// What scripts/test installs from PyPI and npm.
const INTEROP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/interop");
const PROTO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");

fn runs(program: &str, args: &[&str], what: &str) -> Result<(), String> {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("{what}: {program}: {e}")),
    }
}

/// Runs a client program to its end, and checks it said "interop ok". A client still running
/// when the test times out is killed with it.
async fn run_client(command: Command, what: &str) {
    let run: Output = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run the {what} client: {e}"));
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "{what} client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("interop ok"), "{stdout}");
    println!("{what}: {}", stdout.trim());
}

/// Generates the Python code for proto/api.proto with `python`'s grpc_tools and runs client.py.
/// Runs the Python client with `python`; `name` makes its container's id, which must differ
/// between clients that run at once (the id names the container's cgroup).
async fn python_client(python: &str, what: &str, name: &str) {
    if !host_supports(
        &format!("needs {what}"),
        runs(python, &["-c", "import grpc, grpc_tools"], what),
    ) {
        return;
    }
    let Some(mut daemon) = Daemon::start(Options::default()).await else {
        return;
    };
    let generated = tempfile::TempDir::new().expect("temp dir");
    let protoc = Command::new(python)
        .args(["-m", "grpc_tools.protoc", "-I", PROTO])
        .arg(format!("--python_out={}", generated.path().display()))
        .arg(format!("--grpc_python_out={}", generated.path().display()))
        .arg(format!("{PROTO}/api.proto"))
        .output()
        .expect("run grpc_tools.protoc");
    assert!(protoc.status.success(), "grpc_tools.protoc: {protoc:?}");

    let bundle = Bundle::new(&["sleep", "1000"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/interop/client.py");
    let mut command = Command::new(python);
    command
        .arg(script)
        .arg(generated.path())
        .arg(daemon.socket())
        .arg(bundle.path())
        .arg(id(name));
    run_client(command, what).await;
    daemon.assert_no_zombies().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn debian_grpcio_gets_the_documented_semantics() {
    within(python_client(
        DEBIAN_PYTHON,
        "Debian's python3-grpcio",
        "interop-debian",
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_newest_grpcio_from_pypi_dials_the_socket_path_unchanged() {
    let python = format!("{INTEROP}/venv/bin/python3");
    within(python_client(
        &python,
        "grpcio from PyPI (target/interop/venv)",
        "interop-pypi",
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn node_grpc_js_gets_state_error_codes_and_an_events_stream() {
    within(async {
        let modules = format!("{INTEROP}/npm/node_modules");
        let installed = if Path::new(&format!("{modules}/@grpc/grpc-js")).is_dir() {
            runs("node", &["--version"], "node")
        } else {
            Err(format!(
                "{modules}/@grpc/grpc-js is missing (scripts/test installs it)"
            ))
        };
        if !host_supports("needs node and @grpc/grpc-js", installed) {
            return;
        }
        let mut daemon = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/interop/client.js");
        let mut command = Command::new("node");
        command
            .arg(script)
            .arg(&modules)
            .arg(PROTO)
            .arg(daemon.socket())
            .arg(bundle.path())
            .arg(id("interop-node"));
        run_client(command, "grpc-js from npm").await;
        daemon.assert_no_zombies().await;
    })
    .await
}

/// Builds client.go with Debian's Go, grpc-go and protoc-gen-go (GOPATH mode, nothing fetched),
/// returning the binary, or why this host cannot.
async fn build_go_client(dir: &Path) -> Result<std::path::PathBuf, String> {
    const GOCODE: &str = "/usr/share/gocode";
    runs("go", &["version"], "go")?;
    runs("protoc", &["--version"], "protoc")?;
    if !Path::new(&format!("{GOCODE}/src/google.golang.org/grpc")).is_dir() {
        return Err(format!("{GOCODE}/src/google.golang.org/grpc is missing"));
    }
    let api = dir.join("src/berthapi");
    let main = dir.join("src/berthclient");
    for made in [&api, &main] {
        std::fs::create_dir_all(made).map_err(|e| format!("{}: {e}", made.display()))?;
    }
    let generate = format!("--go_out=plugins=grpc:{}", api.display());
    runs(
        "protoc",
        &["-I", PROTO, &generate, &format!("{PROTO}/api.proto")],
        "protoc-gen-go",
    )?;
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/interop/client.go");
    std::fs::copy(source, main.join("main.go")).map_err(|e| format!("{source}: {e}"))?;
    let binary = dir.join("client");
    // Debian's Go packages are GOPATH sources; the build cache outlives the test.
    let build = tokio::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg("berthclient")
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:{GOCODE}", dir.display()))
        .env("GOCACHE", format!("{INTEROP}/go-cache"))
        .env("GOFLAGS", "")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("go build: {e}"))?;
    if !build.status.success() {
        // The packages are there, so a failure is the client's or the generated code's.
        panic!("go build: {}", String::from_utf8_lossy(&build.stderr));
    }
    Ok(binary)
}

/// grpc-go dials the socket path itself as its target (as the 2016 containerd client did), so
/// it sends that path as :authority; then as its docs say today.
#[tokio::test(flavor = "multi_thread")]
async fn debian_grpc_go_dialing_the_socket_path_gets_the_documented_semantics() {
    within_for(std::time::Duration::from_secs(300), async {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let built = build_go_client(dir.path()).await;
        let requirement = built.as_ref().map(|_| ()).map_err(String::clone);
        if !host_supports("needs Debian's Go and grpc-go", requirement) {
            return;
        }
        let mut daemon = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let mut command = Command::new(built.expect("checked"));
        command
            .arg(daemon.socket())
            .arg(bundle.path())
            .arg(id("interop-go"));
        run_client(command, "grpc-go (Debian)").await;
        daemon.assert_no_zombies().await;
    })
    .await
}

/// The jars of grpc-java, netty, protobuf and their dependencies as Debian installs them, and
/// javax.annotation.Generated, which the generated stubs name and Java 11 dropped.
const JAVA_JARS: [&str; 21] = [
    "grpc-api",
    "grpc-core",
    "grpc-context",
    "grpc-netty",
    "grpc-protobuf",
    "grpc-protobuf-lite",
    "grpc-stub",
    "guava",
    "protobuf",
    "perfmark-api",
    "netty-buffer",
    "netty-codec",
    "netty-codec-http",
    "netty-codec-http2",
    "netty-codec-socks",
    "netty-common",
    "netty-handler",
    "netty-handler-proxy",
    "netty-resolver",
    "netty-transport",
    "geronimo-annotation-1.3-spec",
];

/// Builds Client.java and the stubs protoc's grpc-java plugin generates for proto/api.proto
/// into `dir`, returning the class path to run it with, or why this host cannot.
async fn build_java_client(dir: &Path) -> Result<String, String> {
    const PLUGIN: &str = "/usr/bin/grpc_java_plugin";
    runs("javac", &["-version"], "javac")?;
    runs("protoc", &["--version"], "protoc")?;
    let mut class_path = vec![dir.join("classes").display().to_string()];
    for jar in JAVA_JARS {
        let path = format!("/usr/share/java/{jar}.jar");
        if !Path::new(&path).is_file() {
            return Err(format!("{path} is missing"));
        }
        class_path.push(path);
    }
    if !Path::new(PLUGIN).is_file() {
        return Err(format!("{PLUGIN} is missing"));
    }
    let generated = dir.join("generated");
    std::fs::create_dir_all(&generated).map_err(|e| format!("{}: {e}", generated.display()))?;
    runs(
        "protoc",
        &[
            "-I",
            PROTO,
            &format!("--plugin=protoc-gen-grpc-java={PLUGIN}"),
            &format!("--java_out={}", generated.display()),
            &format!("--grpc-java_out={}", generated.display()),
            &format!("{PROTO}/api.proto"),
        ],
        "protoc with the grpc-java plugin",
    )?;
    let class_path = class_path.join(":");
    let build = tokio::process::Command::new("javac")
        .arg("-nowarn")
        .arg("-d")
        .arg(dir.join("classes"))
        .args(["-cp", &class_path])
        .arg(generated.join("types/Api.java"))
        .arg(generated.join("types/APIGrpc.java"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/it/interop/Client.java"
        ))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("javac: {e}"))?;
    if !build.status.success() {
        // The packages are there, so a failure is the client's or the generated code's.
        panic!("javac: {}", String::from_utf8_lossy(&build.stderr));
    }
    Ok(class_path)
}

/// Forwards the first connection to a loopback port to `socket`, and takes no other: the
/// forward reaches berthd as root, which no other local user may borrow. Returns the port.
async fn forward_loopback_to(socket: std::path::PathBuf) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        drop(listener);
        if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn debian_grpc_java_gets_state_error_codes_and_an_events_stream() {
    within_for(std::time::Duration::from_secs(300), async {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let built = build_java_client(dir.path()).await;
        let requirement = built.as_ref().map(|_| ()).map_err(String::clone);
        if !host_supports("needs a JDK and Debian's grpc-java", requirement) {
            return;
        }
        let mut daemon = daemon!();
        let port = forward_loopback_to(daemon.socket()).await;
        let bundle = Bundle::new(&["sleep", "1000"]);
        let mut command = Command::new("java");
        command
            .args(["-cp", &built.expect("checked"), "Client"])
            .arg(port.to_string())
            .arg(bundle.path())
            .arg(id("interop-java"));
        run_client(command, "grpc-java (Debian)").await;
        daemon.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn signal_0_checks_that_the_process_exists() {
    within(async {
        let mut daemon = daemon!();
        let mut events = daemon.events().await;
        let ctr = daemon.run("signal-zero", &["sleep", "1000"]).await;
        daemon.signal(&ctr.id, ctr.pid, 0).await;
        let short = daemon.exec(exec_req(&ctr.id, &["true"])).await;
        assert_eq!(events.exit_status(&ctr.id, short).await, 0);
        let gone = berth_api::proto::SignalRequest {
            id: ctr.id.clone(),
            pid: short,
            signal: 0,
        };
        expect_code(daemon.client.signal(gone).await, tonic::Code::NotFound);
        daemon.kill_container(&mut events, &ctr.id, ctr.pid).await;
    })
    .await
}
