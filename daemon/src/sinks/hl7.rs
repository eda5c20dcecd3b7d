//! The hl7 sink (placeholder until its implementation lands).

use std::path::Path;

use serde::Deserialize;

use super::{ItemOutcome, OutboxItem, all_retry};

/// `[sinks.hl7]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
pub struct RawHl7Config {}

/// A validated `[sinks.hl7]`.
#[derive(Clone, Debug)]
pub struct Hl7Config {}

impl Hl7Config {
    /// Validates the raw config; relative paths resolve against `base`, `env` reads
    /// environment variables (secrets). Returns every problem at once.
    pub fn from_raw(
        raw: RawHl7Config,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Hl7Config, Vec<String>> {
        let _ = (raw, base, env);
        Ok(Hl7Config {})
    }
}

#[derive(Debug)]
pub struct Hl7Sink {}

impl Hl7Sink {
    pub fn new(config: &Hl7Config) -> Result<Hl7Sink, String> {
        let _ = config;
        Ok(Hl7Sink {})
    }

    pub async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        all_retry(items, "the hl7 sink is not built yet", None)
    }
}
