//! sevplaced: the per-host agent. Thin: parse flags, load settings, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sevplace::config::{self, FlagOverrides, LogFormat};

/// Places the vCPUs of AMD SEV guests on few L3 domains and serves the
/// sevplace.v1 gRPC API.
#[derive(Parser, Debug)]
#[command(name = "sevplaced", version)]
struct Args {
    /// Config file (default /etc/sevplace/sevplaced.toml; a missing default
    /// file means the embedded defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket of the gRPC API.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also serve gRPC on this TCP address (mutual TLS with the server.tls_*
    /// keys, or plaintext read-only with server.insecure_tcp).
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Option<String>,
    /// Address of /metrics (empty string: off).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
    /// Prefix of every host path (/sys, /proc, cgroupfs).
    #[arg(long, value_name = "DIR")]
    host_root: Option<PathBuf>,
    /// Directory of the intent checkpoint.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Move an unreadable (corrupt or newer) checkpoint aside to
    /// checkpoint.json.bad-<time> (its journal to
    /// checkpoint.json.journal.bad-<time>) and start without intents.
    #[arg(long)]
    reset_state: bool,
    /// Print the effective settings as JSON and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let flags = FlagOverrides {
        socket: args.socket,
        listen_tcp: args.listen_tcp,
        metrics_addr: args.metrics_addr,
        host_root: args.host_root,
        state_dir: args.state_dir,
        log_format: args.log_format,
    };
    let settings = match config::load(args.config.as_deref(), &env, &flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sevplaced: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        match serde_json::to_string_pretty(&settings) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("sevplaced: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::new(&settings.log_level);
    let ansi = settings
        .log_color
        .enabled(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match settings.log_format {
        // One flat object per line: the event's fields next to "message",
        // "level", "target" and "timestamp".
        LogFormat::Json => builder.json().flatten_event(true).with_ansi(false).init(),
        LogFormat::Text => builder.init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sevplaced: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sevplace::daemon::run(
        settings,
        sevplace::daemon::RunOptions {
            reset_state: args.reset_state,
        },
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sevplaced failed");
            eprintln!("sevplaced: {e}");
            ExitCode::FAILURE
        }
    }
}
