//! The `twinwatch` binary: parses the command line, sets up logging, runs the
//! command, and turns errors into exit codes (0 ok, 1 runtime failure, 2 bad
//! usage or configuration).

use clap::Parser;
use tracing_subscriber::EnvFilter;
use twinwatch::cli::{Cli, Command, UsageError, dispatch};

fn main() {
    // Before any thread starts (the runtime's, the query stage's).
    let tuning = twinwatch::memory::tune();
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("TWINWATCH_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            // The bench runs the pipeline for thousands of machines: its per-machine news is noise there.
            EnvFilter::new(if matches!(cli.command, Command::Bench(_)) {
                "twinwatch=warn"
            } else {
                "twinwatch=info"
            })
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours on a terminal only: log files, journald and `docker logs` get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tracing::debug!(?tuning, "allocator");
    if let Err(e) = dispatch(cli) {
        eprintln!("twinwatch: {e:#}");
        let code = if e.downcast_ref::<UsageError>().is_some() {
            2
        } else {
            1
        };
        std::process::exit(code);
    }
}
