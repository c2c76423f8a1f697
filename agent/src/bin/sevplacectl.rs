//! sevplacectl: command-line client of sevplaced. Exit status: 0 on
//! success, 2 on bad usage, 1 with a one-line error otherwise (with
//! `--json`: one JSON object `{"error":{"code","message"}}` on stderr).

use std::process::ExitCode;

use clap::Parser;
use sevplace::ctl::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let report = |e: &ctl::CtlError| {
        if json {
            eprintln!("{}", e.to_json());
        } else {
            eprintln!("sevplacectl: {e}");
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sevplacectl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ctl::CtlError::Usage(_)) => {
            report(&e);
            ExitCode::from(2)
        }
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}
