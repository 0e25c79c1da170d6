//! The herald-operator command: parse arguments and run.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "herald-operator",
    version,
    about = "Herald's Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (YAML) for `kubectl apply --server-side -f -`.
    Crds,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crds => match herald_operator::crds::yaml() {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRDs: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
