//! The herald-operator command: parse arguments and run.

use std::net::SocketAddr;
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
    /// Run the controllers against the cluster of the current kubeconfig (or the in-cluster config).
    Run {
        /// Nameserver (ip:port) to verify DNS records against; repeat for several. Default: the system's.
        #[arg(long = "dns-nameserver")]
        nameservers: Vec<SocketAddr>,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, default_value = "0.0.0.0:8080")]
        health_address: SocketAddr,
        /// Namespace of the leader-election Lease (two replicas are safe: one reconciles).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Namespace of the operator's own pods, whose pods labelled app.kubernetes.io/name=herald-operator
        /// the relays' NetworkPolicy admits to the admin port. Unset (outside a cluster): none is.
        #[arg(long, env = "POD_NAMESPACE")]
        operator_namespace: Option<String>,
        /// Reconcile the resources of this namespace only; repeat for several (or a comma-separated list
        /// in HERALD_WATCH_NAMESPACES). Default: every namespace. A Role in each is then enough.
        #[arg(
            long = "watch-namespace",
            env = "HERALD_WATCH_NAMESPACES",
            value_delimiter = ','
        )]
        watch_namespaces: Vec<String>,
        /// /healthz fails when no watch event has arrived for this long.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        stale_after: std::time::Duration,
        /// How soon DNS records are checked again while some are missing.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        dns_recheck_pending: std::time::Duration,
        /// How often verified records are checked again (a removed record turns DnsVerified false).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        dns_recheck_verified: std::time::Duration,
    },
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
        Command::Run {
            nameservers,
            health_address,
            lease_namespace,
            operator_namespace,
            watch_namespaces,
            stale_after,
            dns_recheck_pending,
            dns_recheck_verified,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            // kube links rustls with ring; install it as the process default before any TLS is made.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = herald_operator::controller::run::RunOptions {
                nameservers,
                health_address,
                lease_namespace,
                stale_after,
                recheck_pending: dns_recheck_pending,
                recheck_verified: dns_recheck_verified,
                operator_namespace,
                watch_namespaces,
            };
            match runtime.block_on(herald_operator::controller::run::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
