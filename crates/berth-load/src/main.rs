//! `berth-load`: the density benchmark's load client (see the `berth_load` library); `scripts/load` builds
//! and runs it.

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "berth-load",
    version,
    about = "Density benchmark: drives berthd through its gRPC API beside the OCI runtime run directly"
)]
struct Cli {
    #[command(flatten)]
    options: berth_load::Options,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = berth_load::prepare_process() {
        eprintln!("berth-load: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("berth-load: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(berth_load::bench(&cli.options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-load: {e}");
            ExitCode::FAILURE
        }
    }
}
