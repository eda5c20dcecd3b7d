//! The postgres sink (placeholder until its implementation lands).

use std::path::Path;

use serde::Deserialize;

use super::{ItemOutcome, OutboxItem, all_retry};

/// `[sinks.postgres]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
pub struct RawPostgresConfig {}

/// A validated `[sinks.postgres]`.
#[derive(Clone, Debug)]
pub struct PostgresConfig {}

impl PostgresConfig {
    /// Validates the raw config; relative paths resolve against `base`, `env` reads
    /// environment variables (secrets). Returns every problem at once.
    pub fn from_raw(
        raw: RawPostgresConfig,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PostgresConfig, Vec<String>> {
        let _ = (raw, base, env);
        Ok(PostgresConfig {})
    }
}

#[derive(Debug)]
pub struct PostgresSink {}

impl PostgresSink {
    pub fn new(config: &PostgresConfig) -> Result<PostgresSink, String> {
        let _ = config;
        Ok(PostgresSink {})
    }

    pub async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        all_retry(items, "the postgres sink is not built yet", None)
    }
}
