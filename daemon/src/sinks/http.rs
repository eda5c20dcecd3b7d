//! The http sink (placeholder until its implementation lands).

use std::path::Path;

use serde::Deserialize;

use super::{ItemOutcome, OutboxItem, all_retry};

/// `[sinks.http]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
pub struct RawHttpConfig {}

/// A validated `[sinks.http]`.
#[derive(Clone, Debug)]
pub struct HttpConfig {}

impl HttpConfig {
    /// Validates the raw config; relative paths resolve against `base`, `env` reads
    /// environment variables (secrets). Returns every problem at once.
    pub fn from_raw(
        raw: RawHttpConfig,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<HttpConfig, Vec<String>> {
        let _ = (raw, base, env);
        Ok(HttpConfig {})
    }
}

#[derive(Debug)]
pub struct HttpSink {}

impl HttpSink {
    pub fn new(config: &HttpConfig) -> Result<HttpSink, String> {
        let _ = config;
        Ok(HttpSink {})
    }

    pub async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        all_retry(items, "the http sink is not built yet", None)
    }
}
