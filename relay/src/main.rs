//! The herald-relay command: parse arguments, load config, run.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use herald_config::Config;
use herald_relay::admin::client::{self, AdminCommand, Target};

#[derive(Parser)]
#[command(name = "herald-relay", version, about = "Herald's mail transfer agent")]
struct Cli {
    /// Config file; without it the relay runs on an embedded default (loopback only).
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file; exits non-zero with a message naming the bad field.
    CheckConfig,
    /// Read a password on stdin and print its argon2id hash for `users[].password_hash`.
    HashPassword,
    /// Ask a running relay's admin API (address and token from the config's admin section).
    Admin {
        /// Base URL of the admin API instead of the config's `admin.address`.
        #[arg(long)]
        url: Option<String>,
        /// Bearer token file instead of the config's `admin.token_file`.
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    return_large_buffers_to_the_system();
    // rustls chooses a process-wide crypto provider by itself only when exactly one is compiled in, and
    // aws-lc-rs is linked too (for RSA DKIM signatures): name ring, which every TLS connection here uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig) => check_config(cli.config),
        Some(Command::HashPassword) => hash_password(),
        Some(Command::Admin {
            url,
            token_file,
            command,
        }) => admin(cli.config, url, token_file, &command),
        None => run(cli.config, cli.log_format),
    }
}

/// Message bodies are megabytes each and short-lived. glibc serves such blocks from mmap, but after the
/// first one is freed it raises its mmap threshold past that size and serves the next ones from its heaps,
/// which it rarely gives back: the process then keeps the memory of its largest burst for good (measured:
/// 360 MB resident after 200 ten-megabyte messages, against 150 MB after 50). A fixed threshold keeps
/// large blocks in mmap, so freeing one returns it to the system at once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_buffers_to_the_system() {
    // SAFETY: mallopt only changes an allocator parameter; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_buffers_to_the_system() {}

fn load(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| format!("{}: {e}", p.display())),
        None => Ok(Config::embedded_default()),
    }
}

fn check_config(path: Option<PathBuf>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("error: check-config needs --config FILE");
        return ExitCode::from(2);
    };
    // The shaping table too: a back-off rule may name a provider only the shipped tables know.
    let checked = Config::load(&path)
        .map_err(|e| e.to_string())
        .and_then(|c| {
            herald_relay::shaping::Table::load(&c.shaping)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
    match checked {
        Ok(()) => {
            println!("config OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn admin(
    path: Option<PathBuf>,
    url: Option<String>,
    token_file: Option<PathBuf>,
    command: &AdminCommand,
) -> ExitCode {
    let result = load(path.as_ref())
        .and_then(|config| Target::resolve(&config, url, token_file).map_err(|e| e.to_string()))
        .and_then(|target| client::run(&target, command).map_err(|e| e.to_string()));
    match result {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
        eprintln!("error: reading the password from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("error: empty password on stdin");
        return ExitCode::FAILURE;
    }
    match herald_config::password::hash(password) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: hashing failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: Option<PathBuf>, format: LogFormat) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .event_format(herald_relay::logging::JsonLines)
            .init(),
    }
    let config = match load(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(herald_relay::app::run(config, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "herald-relay failed");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
