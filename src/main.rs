//! The `fikra-ratelimit` binary: parse the command line and run it.

use std::process::ExitCode;

use clap::Parser;
use fikra_ratelimit::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    cli::run(Cli::parse()).await
}
