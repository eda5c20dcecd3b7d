//! `pcrd instrument list` asks the daemon (see `client::run`).
//! `pcrd instrument check NAME --config FILE`: connect to one configured instrument,
//! identify it and print its status as JSON, without the daemon. For commissioning a
//! new instrument or register profile (docs/modbus-profiles.md) and for checking a
//! link from the instrument PC.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use pcrd_drivers::modbus::{ExtractorHandle, spawn_bus};

use super::exit;
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum InstrumentCommand {
    /// Every extractor and cycler the daemon follows, with its state (idle,
    /// running, offline, error with the reason) and run.
    List {
        #[command(flatten)]
        api: super::ApiArgs,
    },
    /// Connect to an instrument from the config, identify it and print its status as
    /// JSON; no daemon needed. Exit 4 when it cannot be reached.
    Check {
        /// The instrument's name in the config (`[[extractors]] name`).
        name: String,
        /// The daemon's configuration file.
        #[arg(long, short, env = "PCRD_CONFIG", default_value = "pcrd.toml")]
        config: PathBuf,
    },
}

pub(super) fn run(command: InstrumentCommand) -> ExitCode {
    let (name, config) = match command {
        InstrumentCommand::Check { name, config } => (name, config),
        list @ InstrumentCommand::List { .. } => {
            return super::client::run(super::Command::Instrument(list));
        }
    };
    let config = match Config::load(&config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("pcrd: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let Some(extractor) = config.extractors.iter().find(|x| x.name == name) else {
        let known: Vec<&str> = config.extractors.iter().map(|x| x.name.as_str()).collect();
        eprintln!(
            "pcrd: no instrument {name:?} in the config; configured: {}",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
        return ExitCode::from(exit::USAGE);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pcrd: cannot start the runtime: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    runtime.block_on(async {
        let bus = spawn_bus(extractor.bus.clone());
        let handle = ExtractorHandle::new(
            extractor.name.clone(),
            extractor.unit,
            extractor.profile.clone(),
            bus,
        );
        let report = async {
            let identity = handle.identify().await?;
            let status = handle.status().await?;
            Ok::<_, pcrd_drivers::modbus::ModbusError>((identity, status))
        }
        .await;
        match report {
            Ok((identity, status)) => {
                println!(
                    "{}",
                    serde_json::json!({
                        "instrument": extractor.name,
                        "unit": extractor.unit,
                        "profile": {
                            "name": extractor.profile.name,
                            "version": extractor.profile.version,
                            "path": extractor.profile_path.display().to_string(),
                        },
                        "identity": identity,
                        "status": status,
                    })
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pcrd: instrument {name}: {e}");
                ExitCode::from(exit::UNAVAILABLE)
            }
        }
    })
}
