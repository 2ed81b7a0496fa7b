//! Stand-alone wrapper around `bulkhead_audit::cli` (the admin CLI embeds the same enum as
//! `bulkhead audit …`).
use clap::Parser;

#[derive(Parser)]
#[command(name = "bulkhead-audit", about = "Bulkhead audit trail")]
struct Cli {
    #[command(subcommand)]
    cmd: bulkhead_audit::cli::AuditCommand,
}

fn main() {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match bulkhead_audit::cli::run(cli.cmd, &mut out) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
