//! The `pcrd` command line: `pcrd serve` runs the daemon; the other subcommands are
//! clients of its HTTP API.

mod analyze;
mod client;
#[cfg(feature = "demo")]
mod demo;
mod import;
mod instrument;
mod outbox;
mod render;
mod result;
mod serve;
mod sink;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// Exit codes, so scripts can tell a refused request from a broken installation.
pub mod exit {
    /// The API refused the request (4xx) or a local input was invalid.
    pub const REJECTED: u8 = 1;
    /// Bad command line or configuration.
    pub const USAGE: u8 = 2;
    /// The store cannot be opened or used.
    pub const STORE: u8 = 3;
    /// The daemon could not be reached or failed (5xx).
    pub const UNAVAILABLE: u8 = 4;
}

#[derive(Debug, Parser)]
#[command(
    name = "pcrd",
    version,
    about = "pcrd: the PCR lab gateway daemon and its command line",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// The whole lab on this machine, no set-up: simulated instruments, the daemon
    /// on a temporary store, plates from tubes to results in the batch-file sink.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Receive, import and look up tubes.
    #[command(subcommand)]
    Tube(TubeCommand),
    /// Create, fill, seal, show and transfer plates.
    #[command(subcommand)]
    Plate(PlateCommand),
    /// Show the audit trail: who did what, when and why.
    Audit(AuditArgs),
    /// List the kits the daemon knows.
    Kits(KitsArgs),
    /// Ct values (and with --kit, calls and plate validity) from an RDML file;
    /// no daemon needed.
    Analyze(analyze::AnalyzeArgs),
    /// List the daemon's instruments, or talk to one directly (no daemon needed).
    #[command(subcommand)]
    Instrument(instrument::InstrumentCommand),
    /// Start, watch and abort runs on instruments; a finished run's analysis.
    #[command(subcommand)]
    Run(client::run::RunCommand),
    /// Work on the store directly (the daemon must be stopped).
    #[command(subcommand)]
    Store(StoreCommand),
    /// The outbox of released results: status per sink, dead letters, retry.
    #[command(subcommand)]
    Outbox(outbox::OutboxCommand),
    /// Offline sink helpers: `pcrd sink schema postgres` prints the exchange table's DDL.
    #[command(subcommand)]
    Sink(sink::SinkCommand),
    /// Review results: list, show, release, rerun, reject, correct.
    #[command(subcommand)]
    Result(result::ResultCommand),
    /// The rerun list: tubes to test again and positive pools to follow up.
    #[command(subcommand)]
    Rerun(result::RerunCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration file.
    #[arg(long, short, env = "PCRD_CONFIG", default_value = "pcrd.toml")]
    pub config: PathBuf,
    /// Listen here instead of the config's server.listen (port 0 picks a free port; the
    /// address is printed on stdout as `listening on http://ADDR`).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Use this store directory instead of the config's store.path.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

/// Where the API is and who we are.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The daemon's address.
    #[arg(
        long,
        global = true,
        env = "PCRD_API",
        default_value = "http://127.0.0.1:8440"
    )]
    pub api: String,
    /// An API token from the daemon's config.
    #[arg(long, global = true, env = "PCRD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TubeCommand {
    /// Receive tubes by barcode.
    Receive {
        #[arg(required = true)]
        barcodes: Vec<String>,
        /// Swabs pooled in each tube (1..=20).
        #[arg(long, default_value_t = 1)]
        pool: u32,
        /// routine or urgent.
        #[arg(long, default_value = "routine")]
        priority: String,
        /// Due within this long after receipt (e.g. 4h, 6h).
        #[arg(long)]
        due: Option<String>,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Receive tubes from a CSV file with a header: barcode, and optionally pool_size,
    /// priority, due_in or due_at.
    Import {
        file: PathBuf,
        /// Tubes per request. 1,000 is faster than larger batches and keeps the
        /// daemon's memory low (BENCHMARKS.md).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=10_000))]
        batch: u16,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one tube.
    Show {
        barcode: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List tubes waiting for a plate, in plating order.
    Waiting {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Tubes without a released result: past due and at risk first.
    Due {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum PlateCommand {
    /// Create an extraction plate with the kit's controls.
    Create {
        /// Kit id or id@version.
        #[arg(long)]
        kit: String,
        /// 96 or 384.
        #[arg(long, default_value_t = 96)]
        format: u16,
        /// The plate's barcode (generated when absent).
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Put tubes on a plate: BARCODE fills the next free well, BARCODE@WELL a named one.
    Assign {
        plate: String,
        #[arg(required = true)]
        tubes: Vec<String>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Fill the plate from the tubes waiting (urgent and due-soonest first).
    Fill {
        plate: String,
        /// At most this many tubes.
        #[arg(long)]
        max: Option<usize>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Take tubes off an open plate by well.
    Unassign {
        plate: String,
        #[arg(required = true)]
        wells: Vec<String>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a plate as a map.
    Show {
        plate: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List plates.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Seal an open plate.
    Seal {
        plate: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Transfer a sealed extraction plate 1:1 to a new PCR plate, or four 96-well
    /// plates (in quadrant order) to one 384-well PCR plate.
    Transfer {
        #[arg(required = true, num_args = 1..=4)]
        plates: Vec<String>,
        /// The new PCR plate's barcode (generated when absent).
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[arg(long, conflicts_with = "tube")]
    pub plate: Option<String>,
    #[arg(long)]
    pub tube: Option<String>,
    /// The newest N entries.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Check the hash chain of the whole trail instead of listing it.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Read and decode every record, walk the audit chain and check that tubes, plates
    /// and the plating queue agree. Exit 0 when intact, 3 when not.
    Check {
        /// The daemon's configuration file (for the store's path).
        #[arg(long, short, env = "PCRD_CONFIG", default_value = "pcrd.toml")]
        config: PathBuf,
        /// Check this store directory instead of the config's store.path.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct KitsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `pcrd store check`.
fn check_store(config: &std::path::Path, data_dir: Option<PathBuf>, json: bool) -> ExitCode {
    let (config, kits) = match serve::load(config, data_dir) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let lab = match serve::open_lab(&config, kits) {
        Ok(lab) => lab,
        Err(code) => return code,
    };
    let started = std::time::Instant::now();
    let outcome = lab.scrub();
    let closed = lab.store().close();
    let path = config.store.path.display();
    match outcome.and_then(|report| closed.map(|()| report)) {
        Ok(report) => {
            let seconds = started.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "store": path.to_string(),
                        "intact": true,
                        "tubes": report.tubes,
                        "plates": report.plates,
                        "audit_entries": report.audit_entries,
                        "seconds": seconds,
                    })
                );
            } else {
                println!(
                    "store {path} is intact: {} tubes, {} plates, {} audit entries (checked in {seconds:.1} s)",
                    report.tubes, report.plates, report.audit_entries
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pcrd: {e}");
            ExitCode::from(exit::STORE)
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(args),
        Command::Store(StoreCommand::Check {
            config,
            data_dir,
            json,
        }) => check_store(&config, data_dir, json),
        Command::Analyze(args) => analyze::run(args),
        Command::Instrument(command) => instrument::run(command),
        Command::Outbox(command) => outbox::run(command),
        Command::Sink(command) => sink::run(command),
        Command::Result(command) => result::run_result(command),
        Command::Rerun(command) => result::run_rerun(command),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "pcrd", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        other => client::run(other),
    }
}
