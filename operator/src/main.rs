//! herald-operator: reconciles SendingDomain, SmtpRelay and IpPool into relays and DNS records.
//!
//! Only the command line exists so far; the controllers are not written yet (see the README's status table).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "herald-operator",
    version,
    about = "Herald's Kubernetes operator"
)]
struct Cli {}

fn main() -> ExitCode {
    let _cli = Cli::parse();
    eprintln!("herald-operator: the controllers are not implemented yet");
    ExitCode::FAILURE
}
