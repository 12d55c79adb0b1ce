//! The `fikra-ratelimit` binary: parse the command line and run it.

use std::process::ExitCode;

use clap::Parser;
use fikra_ratelimit::cli::{self, Cli};

/// mimalloc keeps per-thread free lists, so the many small buffers of each
/// call are reused without the locking and consolidation of the system
/// allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::runtime(&cli) {
        Ok(runtime) => runtime.block_on(cli::run(cli)),
        Err(error) => {
            eprintln!("fikra-ratelimit: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}
