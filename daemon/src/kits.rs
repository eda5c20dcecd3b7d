//! The kit registry: the kits shipped in the binary plus any in the configured
//! directory, looked up by id (latest version) or `id@version`.

use std::collections::BTreeMap;
use std::path::Path;

use pcrd_protocol::kit::{KitDefinition, KitId};

include!(concat!(env!("OUT_DIR"), "/builtin_kits.rs"));

#[derive(Clone, Debug, Default)]
pub struct KitRegistry {
    /// id -> version -> definition
    kits: BTreeMap<KitId, BTreeMap<String, KitDefinition>>,
}

impl KitRegistry {
    /// The shipped kits, then every `*.toml` in `dir`. Returns every problem found, not
    /// just the first.
    pub fn load(dir: Option<&Path>) -> Result<KitRegistry, Vec<String>> {
        let mut registry = KitRegistry::default();
        let mut problems = Vec::new();
        for (name, text) in BUILTIN_KITS {
            if let Err(e) = registry.add_toml(text) {
                problems.push(format!("built-in kit {name}: {e}"));
            }
        }
        if let Some(dir) = dir {
            match std::fs::read_dir(dir) {
                Ok(entries) => {
                    let mut paths: Vec<_> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                        .collect();
                    paths.sort();
                    for path in paths {
                        let result = std::fs::read_to_string(&path)
                            .map_err(|e| e.to_string())
                            .and_then(|text| registry.add_toml(&text));
                        if let Err(e) = result {
                            problems.push(format!("kit file {}: {e}", path.display()));
                        }
                    }
                }
                Err(e) => problems.push(format!("kits directory {}: {e}", dir.display())),
            }
        }
        if problems.is_empty() {
            Ok(registry)
        } else {
            Err(problems)
        }
    }

    fn add_toml(&mut self, text: &str) -> Result<(), String> {
        let kit = KitDefinition::from_toml_str(text).map_err(|e| e.to_string())?;
        let versions = self.kits.entry(kit.id.clone()).or_default();
        if versions.contains_key(&kit.version) {
            return Err(format!("kit {} is defined twice", kit.key()));
        }
        versions.insert(kit.version.clone(), kit);
        Ok(())
    }

    /// Looks a kit up by `id` (its newest version) or `id@version`.
    pub fn find(&self, spec: &str) -> Result<&KitDefinition, String> {
        let (id, version) = match spec.split_once('@') {
            Some((id, version)) => (id, Some(version)),
            None => (spec, None),
        };
        let known = || {
            self.all()
                .map(KitDefinition::key)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let versions = id
            .parse::<KitId>()
            .ok()
            .and_then(|id| self.kits.get(&id))
            .ok_or_else(|| format!("unknown kit {spec:?}; known kits: {}", known()))?;
        match version {
            Some(v) => versions
                .get(v)
                .ok_or_else(|| format!("unknown kit version {spec:?}; known kits: {}", known())),
            None => versions
                .values()
                .max_by(|a, b| compare_versions(&a.version, &b.version))
                .ok_or_else(|| format!("unknown kit {spec:?}")),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &KitDefinition> {
        self.kits.values().flat_map(BTreeMap::values)
    }
}

/// Orders versions like "1.10" after "1.9": numeric where both parts are numbers.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<(u64, String)> {
        s.split(['.', '-'])
            .map(|p| (p.parse().unwrap_or(0), p.to_string()))
            .collect()
    };
    parts(a).cmp(&parts(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_kits_load_and_resolve_by_id_and_version() {
        let registry = KitRegistry::load(None).unwrap();
        assert!(registry.all().count() >= 2);
        let kit = registry.find("sarscov2-orf1ab-n-ic").unwrap();
        assert_eq!(registry.find(&kit.key()).unwrap(), kit);
        let err = registry.find("no-such-kit").unwrap_err();
        assert!(
            err.contains("unknown kit") && err.contains("sarscov2-orf1ab-n-ic"),
            "{err}"
        );
        assert!(registry.find("sarscov2-orf1ab-n-ic@9.9").is_err());
    }

    #[test]
    fn newest_version_is_numeric_not_lexical() {
        assert!(compare_versions("1.10", "1.9").is_gt());
        assert!(compare_versions("2.0", "10.0").is_lt());
    }
}
