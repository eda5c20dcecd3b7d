//! `pcrd sink ...`: offline helpers for the sinks (no daemon needed).

use std::process::ExitCode;

use clap::Subcommand;

use super::exit;
use crate::sinks::postgres::{DEFAULT_TABLE, TableName, schema_sql};

#[derive(Debug, Subcommand)]
pub enum SinkCommand {
    /// Print what a sink needs on the receiving side.
    #[command(subcommand)]
    Schema(SchemaCommand),
}

#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// The PostgreSQL exchange table's DDL (table, index, per-target view); pipe it
    /// to psql on the central system's database.
    Postgres {
        /// The table's name, optionally schema-qualified (schema.table).
        #[arg(long, default_value = DEFAULT_TABLE)]
        table: String,
    },
}

pub(super) fn run(command: SinkCommand) -> ExitCode {
    match command {
        SinkCommand::Schema(SchemaCommand::Postgres { table }) => match TableName::parse(&table) {
            Ok(table) => {
                print!("{}", schema_sql(&table));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pcrd: --table: {e}");
                ExitCode::from(exit::USAGE)
            }
        },
    }
}
