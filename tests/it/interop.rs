//! The wire contract seen from a client that berth did not write: Python's grpc, with code
//! generated from proto/api.proto by grpc_tools, drives a real berthd (tests/it/interop/client.py).

use std::process::Command;

use crate::common::*;

/// Debian's python3-grpcio and python3-grpc-tools, installed by scripts/test.
const PYTHON: &str = "/usr/bin/python3";

fn python_has_grpc() -> Result<(), String> {
    let out = Command::new(PYTHON)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .map_err(|e| format!("{PYTHON}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err("python3-grpcio and python3-grpc-tools are not installed".into())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_generated_by_other_tools_gets_the_documented_semantics() {
    within(async {
        if !host_supports("needs python3 grpc and grpc_tools", python_has_grpc()) {
            return;
        }
        let mut daemon = daemon!();
        let generated = tempfile::TempDir::new().expect("temp dir");
        let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
        let protoc = Command::new(PYTHON)
            .args(["-m", "grpc_tools.protoc", "-I", proto])
            .arg(format!("--python_out={}", generated.path().display()))
            .arg(format!("--grpc_python_out={}", generated.path().display()))
            .arg(format!("{proto}/api.proto"))
            .output()
            .expect("run grpc_tools.protoc");
        assert!(protoc.status.success(), "grpc_tools.protoc: {protoc:?}");

        let bundle = Bundle::new(&["sleep", "1000"]);
        let container = id("interop");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/interop/client.py");
        let run = tokio::task::spawn_blocking({
            let args = [
                generated.path().display().to_string(),
                daemon.socket().display().to_string(),
                bundle.path_str(),
                container.clone(),
            ];
            move || Command::new(PYTHON).arg(script).args(args).output()
        })
        .await
        .expect("join")
        .expect("run the python client");
        let stdout = String::from_utf8_lossy(&run.stdout);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            run.status.success(),
            "python client failed:\n{stdout}\n{stderr}"
        );
        assert!(stdout.contains("interop ok"), "{stdout}");
        daemon.assert_no_zombies().await;
    })
    .await
}
