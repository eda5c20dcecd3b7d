//! The files sink (placeholder until its implementation lands).

use std::path::Path;

use serde::Deserialize;

use super::{ItemOutcome, OutboxItem, all_retry};

/// `[sinks.files]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
pub struct RawFilesConfig {}

/// A validated `[sinks.files]`.
#[derive(Clone, Debug)]
pub struct FilesConfig {}

impl FilesConfig {
    /// Validates the raw config; relative paths resolve against `base`, `env` reads
    /// environment variables (secrets). Returns every problem at once.
    pub fn from_raw(
        raw: RawFilesConfig,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<FilesConfig, Vec<String>> {
        let _ = (raw, base, env);
        Ok(FilesConfig {})
    }
}

#[derive(Debug)]
pub struct FilesSink {}

impl FilesSink {
    pub fn new(config: &FilesConfig) -> Result<FilesSink, String> {
        let _ = config;
        Ok(FilesSink {})
    }

    pub async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        all_retry(items, "the files sink is not built yet", None)
    }
}
