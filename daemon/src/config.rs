//! The daemon's configuration: one TOML file describing what is deployed.
//!
//! Unknown keys are rejected by name, and every problem in the file is reported at
//! once, so an operator fixes a config in one pass rather than one error per restart.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pcrd_drivers::modbus::{BusConfig, LinkConfig, Parity, SerialConfig, StopBits};
use pcrd_protocol::extractor::Profile;
use serde::Deserialize;

use crate::store::StoreOptions;

/// A user's role, from the token they present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Receives tubes, builds and seals plates, starts runs.
    Technician,
    /// Reviews and releases results.
    Reviewer,
    /// Everything.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Technician => "technician",
            Role::Reviewer => "reviewer",
            Role::Admin => "admin",
        })
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    lab: RawLab,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    kits: RawKits,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    extractors: Vec<RawExtractor>,
    #[serde(default)]
    sinks: Vec<RawSink>,
    /// Watched export folders (`[[folders]]`, see `crate::folders`).
    #[serde(default)]
    folders: Vec<crate::folders::RawFolder>,
    /// Review and release policy (`[review]`, see `crate::review`).
    review: Option<crate::review::RawReview>,
    /// Analysers reporting over ASTM (`[[analysers]]`, see `crate::analysers`).
    #[serde(default)]
    analysers: Vec<crate::analysers::RawAnalyser>,
    #[serde(default)]
    cyclers: Vec<RawCycler>,
    /// The gateway's panel (`[panel]`, see `crate::panel`).
    panel: Option<crate::panel::RawPanel>,
}

#[derive(Debug, Deserialize)]
struct RawCycler {
    name: String,
    tcp: Option<String>,
    serial: Option<RawCyclerSerial>,
    dialect: Option<PathBuf>,
    timeout_ms: Option<u64>,
    settle_ms: Option<u64>,
    reconnect_max_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RawCyclerSerial {
    path: String,
    baud: u32,
}

/// `[[sinks]]`: where released results go (issue 6); exactly one kind table each.
#[derive(Debug, Deserialize)]
struct RawSink {
    name: String,
    batch_size: Option<u64>,
    http: Option<crate::sinks::http::RawHttpConfig>,
    postgres: Option<crate::sinks::postgres::RawPostgresConfig>,
    files: Option<crate::sinks::files::RawFilesConfig>,
    hl7: Option<crate::sinks::hl7::RawHl7Config>,
}

#[derive(Debug, Deserialize)]
struct RawExtractor {
    name: String,
    profile: PathBuf,
    unit: Option<u8>,
    tcp: Option<String>,
    serial: Option<RawSerial>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RawSerial {
    path: String,
    baud: u32,
    parity: Option<String>,
    stop_bits: Option<u8>,
}

#[derive(Debug, Deserialize)]
struct RawLab {
    id: String,
}

#[derive(Debug, Default, Deserialize)]
struct RawServer {
    listen: Option<String>,
    max_body_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawStore {
    path: Option<PathBuf>,
    cache_mb: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawKits {
    dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct RawUser {
    name: String,
    role: Role,
    token: Option<String>,
    token_env: Option<String>,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub lab_id: String,
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub store: StoreOptions,
    pub kits_dir: Option<PathBuf>,
    pub users: Vec<User>,
    /// Extraction instruments over Modbus (`[[extractors]]`).
    pub extractors: Vec<ExtractorConfig>,
    /// Where released results go (`[[sinks]]`).
    pub sinks: Vec<crate::sinks::SinkConfig>,
    /// Watched export folders of file-only instruments (`[[folders]]`).
    pub folders: Vec<crate::folders::FolderConfig>,
    /// Review and release policy (`[review]`).
    pub review: crate::review::ReviewPolicy,
    /// Analysers reporting over ASTM (`[[analysers]]`).
    pub analysers: Vec<crate::analysers::AnalyserConfig>,
    /// Real-time PCR cyclers (`[[cyclers]]`).
    pub cyclers: Vec<CyclerConfig>,
    /// The gateway's lamp, buzzer and button (`[panel]`); `None` without one.
    pub panel: Option<crate::panel::PanelConfig>,
}

/// One real-time PCR cycler: where it is and the command dialect it speaks.
#[derive(Clone, Debug)]
pub struct CyclerConfig {
    pub name: String,
    pub link: pcrd_drivers::cycler::CyclerLink,
    /// The dialect profile (`dialect = "FILE.toml"`); pcrd's reference dialect
    /// (docs/cycler-protocol.md) when none is given.
    pub dialect: pcrd_protocol::cycler::Dialect,
    /// Caps each command's timeout (`timeout_ms`); `None` keeps the dialect
    /// policy's own timeouts.
    pub timeout: Option<Duration>,
    /// After a lost reply, how long late lines are drained (`settle_ms`).
    pub settle: Duration,
    /// Longest wait between reconnects (`reconnect_max_ms`).
    pub reconnect_max: Duration,
}

/// One extractor: where it is and the register-map profile it is read with.
#[derive(Clone, Debug)]
pub struct ExtractorConfig {
    pub name: String,
    /// Modbus unit id (RTU address 1–247; for TCP usually 1 or 255).
    pub unit: u8,
    pub profile_path: PathBuf,
    pub profile: Arc<Profile>,
    /// Link and timing for the driver's bus task.
    pub bus: BusConfig,
}

/// Per-request timeout when the config gives none: above the 5–45 ms turnaround
/// of real devices plus ~20 ms of an Ethernet–serial bridge (field-notes §4), with
/// room for a busy PLC.
pub const DEFAULT_EXTRACTOR_TIMEOUT_MS: u64 = 500;
/// Baud rates an RS-485 extractor line runs at (issue 4: 9600..115200).
const SERIAL_BAUDS: std::ops::RangeInclusive<u32> = 9600..=115_200;

/// Checks a serial line's port path and baud rate against the range the instrument
/// kind runs at, naming the entry (`at`) in each problem.
pub(crate) fn check_serial_line(
    at: &str,
    path: Option<&str>,
    baud: u32,
    bauds: &std::ops::RangeInclusive<u32>,
    problems: &mut Vec<String>,
) {
    if !bauds.contains(&baud) {
        problems.push(format!(
            "{at}: serial.baud {baud} is outside {}..={}",
            bauds.start(),
            bauds.end()
        ));
    }
    if path.is_some_and(|p| p.trim().is_empty()) {
        problems.push(format!("{at}: serial.path must not be empty"));
    }
}

/// A user allowed to call the API.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub token: String,
}

/// Everything wrong with a config file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {}", problems.join("; "))]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8440";
/// Large enough for a batch of 10,000 tubes with room to spare, small enough that a runaway client
/// cannot make the daemon buffer gigabytes.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// sled's page cache. sled's real memory use is several times this figure, and a
/// larger cache buys little speed for pcrd's access pattern; see BENCHMARKS.md.
pub const DEFAULT_CACHE_MB: u64 = 4;
const MIN_TOKEN_LEN: usize = 16;

impl Config {
    /// Reads and validates a config file. Relative paths are resolved against the
    /// file's directory so the daemon behaves the same from any working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let fail = |problems: Vec<String>| ConfigError {
            path: path.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(vec![e.to_string()]))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base, |name| std::env::var(name).ok()).map_err(fail)
    }

    /// Parses config text; `env` resolves `token_env` names.
    pub fn parse(
        text: &str,
        base: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        let mut unknown = Vec::new();
        let deserializer = toml::Deserializer::new(text);
        let raw: Result<RawConfig, _> =
            serde_ignored::deserialize(deserializer, |key| unknown.push(key.to_string()));
        // The raw structs accept unknown keys so that serde_ignored can collect every
        // one of them; `deny_unknown_fields` would stop at the first.
        problems.extend(unknown.iter().map(|k| format!("unknown key `{k}`")));
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                problems.push(e.to_string().trim().replace('\n', " "));
                return Err(problems);
            }
        };

        let lab_id = raw.lab.id.trim().to_string();
        if lab_id.is_empty() {
            problems.push("lab.id must not be empty".into());
        }
        let listen_text = raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|e| {
            problems.push(format!(
                "server.listen {listen_text:?} is not an address like 127.0.0.1:8440: {e}"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let max_body_bytes = raw.server.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if !(1024..=1024 * 1024 * 1024).contains(&max_body_bytes) {
            problems.push(format!(
                "server.max_body_bytes {max_body_bytes} is outside 1024..=1073741824"
            ));
        }
        let cache_mb = raw.store.cache_mb.unwrap_or(DEFAULT_CACHE_MB);
        if !(1..=65536).contains(&cache_mb) {
            problems.push(format!("store.cache_mb {cache_mb} is outside 1..=65536"));
        }
        let store_path = base.join(raw.store.path.unwrap_or_else(|| "pcrd-data".into()));
        let kits_dir = raw.kits.dir.map(|d| base.join(d));

        let mut users = Vec::new();
        let mut names = BTreeSet::new();
        let mut tokens = BTreeSet::new();
        if raw.users.is_empty() {
            problems.push("no [[users]]: nobody could call the API".into());
        }
        for (i, user) in raw.users.into_iter().enumerate() {
            let at = format!("users[{i}] ({:?})", user.name);
            if user.name.trim().is_empty() {
                problems.push(format!("users[{i}].name must not be empty"));
            }
            if !names.insert(user.name.clone()) {
                problems.push(format!("{at}: user name appears twice"));
            }
            let token = match (user.token, user.token_env) {
                (Some(token), None) => Some(token),
                (None, Some(var)) => {
                    let value = env(&var);
                    if value.is_none() {
                        problems.push(format!("{at}: environment variable {var} is not set"));
                    }
                    value
                }
                (Some(_), Some(_)) => {
                    problems.push(format!("{at}: give token or token_env, not both"));
                    None
                }
                (None, None) => {
                    problems.push(format!("{at}: needs token or token_env"));
                    None
                }
            };
            if let Some(token) = token {
                if token.len() < MIN_TOKEN_LEN {
                    problems.push(format!(
                        "{at}: token is shorter than {MIN_TOKEN_LEN} characters"
                    ));
                }
                if !tokens.insert(token.clone()) {
                    problems.push(format!("{at}: token is shared with another user"));
                }
                users.push(User {
                    name: user.name,
                    role: user.role,
                    token,
                });
            }
        }

        let extractors = parse_extractors(raw.extractors, base, &mut problems);
        let cyclers = parse_cyclers(raw.cyclers, base, &extractors, &mut problems);
        let sinks = parse_sinks(raw.sinks, base, &env, &mut problems);
        let folders = crate::folders::parse_folders(raw.folders, base, &mut problems);
        let review = crate::review::parse_policy(raw.review, &mut problems);
        let analysers = crate::analysers::parse_analysers(raw.analysers, base, &mut problems);
        let panel = crate::panel::parse_panel(raw.panel, &mut problems);

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Config {
            lab_id,
            listen,
            max_body_bytes: max_body_bytes as usize,
            store: StoreOptions {
                path: store_path,
                cache_bytes: cache_mb * 1024 * 1024,
            },
            kits_dir,
            users,
            extractors,
            sinks,
            folders,
            review,
            analysers,
            cyclers,
            panel,
        })
    }
}

/// Validates `[[cyclers]]` and loads each one's dialect profile (relative to `base`).
fn parse_cyclers(
    raw: Vec<RawCycler>,
    base: &Path,
    extractors: &[ExtractorConfig],
    problems: &mut Vec<String>,
) -> Vec<CyclerConfig> {
    use pcrd_drivers::cycler::CyclerLink;
    use pcrd_protocol::cycler::Dialect;
    let mut names: BTreeSet<String> = extractors.iter().map(|x| x.name.clone()).collect();
    let mut out = Vec::new();
    for (i, c) in raw.into_iter().enumerate() {
        let at = format!("cyclers[{i}] ({:?})", c.name);
        let before = problems.len();
        if c.name.trim().is_empty() {
            problems.push(format!("cyclers[{i}].name must not be empty"));
        }
        if !names.insert(c.name.clone()) {
            problems.push(format!(
                "{at}: instrument name appears twice (names are shared by extractors and cyclers)"
            ));
        }
        let link = match (c.tcp, c.serial) {
            (Some(addr), None) => match addr.parse::<SocketAddr>() {
                Ok(_) => Some(CyclerLink::Tcp(addr)),
                Err(e) => {
                    problems.push(format!(
                        "{at}: tcp {addr:?} is not an address like 192.168.1.60:5025: {e}"
                    ));
                    None
                }
            },
            (None, Some(serial)) => {
                check_serial_line(
                    &at,
                    Some(&serial.path),
                    serial.baud,
                    &SERIAL_BAUDS,
                    problems,
                );
                Some(CyclerLink::Serial {
                    path: serial.path,
                    baud: serial.baud,
                })
            }
            (Some(_), Some(_)) => {
                problems.push(format!("{at}: give tcp or serial, not both"));
                None
            }
            (None, None) => {
                problems.push(format!(
                    "{at}: needs tcp = \"HOST:PORT\" or serial = {{ path = .., baud = .. }}"
                ));
                None
            }
        };
        let mut ms =
            |key: &str, value: Option<u64>, default: u64, range: std::ops::RangeInclusive<u64>| {
                let v = value.unwrap_or(default);
                if !range.contains(&v) {
                    problems.push(format!(
                        "{at}: {key} {v} is outside {}..={}",
                        range.start(),
                        range.end()
                    ));
                }
                Duration::from_millis(v)
            };
        let timeout = c
            .timeout_ms
            .map(|t| ms("timeout_ms", Some(t), t, 10..=120_000));
        let settle = ms("settle_ms", c.settle_ms, 500, 0..=10_000);
        let reconnect_max = ms("reconnect_max_ms", c.reconnect_max_ms, 10_000, 50..=300_000);
        let dialect = match c.dialect {
            None => Some(Dialect::reference()),
            Some(file) => {
                let path = base.join(file);
                match std::fs::read_to_string(&path) {
                    Ok(text) => match toml::from_str::<Dialect>(&text) {
                        Ok(d) => match d.validate() {
                            Ok(()) => Some(d),
                            Err(e) => {
                                problems.push(format!("{at}: dialect {}: {e}", path.display()));
                                None
                            }
                        },
                        Err(e) => {
                            problems.push(format!(
                                "{at}: dialect {}: {}",
                                path.display(),
                                e.to_string().trim().replace('\n', " ")
                            ));
                            None
                        }
                    },
                    Err(e) => {
                        problems.push(format!("{at}: dialect {}: {e}", path.display()));
                        None
                    }
                }
            }
        };
        if problems.len() != before {
            continue;
        }
        if let (Some(link), Some(dialect)) = (link, dialect) {
            out.push(CyclerConfig {
                name: c.name,
                link,
                dialect,
                timeout,
                settle,
                reconnect_max,
            });
        }
    }
    out
}

/// Items per delivery when a sink gives no `batch_size`: large enough that per-batch
/// costs (a round trip, a COPY, three fsyncs) are amortised, small enough that one
/// batch is a few hundred kilobytes.
pub const DEFAULT_SINK_BATCH: u64 = 500;
/// Largest `batch_size`: bounds the memory one batch takes.
pub const MAX_SINK_BATCH: u64 = 10_000;

/// Validates `[[sinks]]`: unique names, a bounded batch size, exactly one kind table,
/// each kind's own checks (its `from_raw`).
fn parse_sinks(
    raw: Vec<RawSink>,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Vec<crate::sinks::SinkConfig> {
    use crate::sinks::{SinkConfig, SinkKind, files, hl7, http, postgres};
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let at = format!("sinks[{i}] ({:?})", s.name);
        let before = problems.len();
        let name = s.name.trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            problems.push(format!(
                "{at}: name must be letters, digits, - or _ (it names the sink's cursor)"
            ));
        }
        if !names.insert(name.clone()) {
            problems.push(format!("{at}: sink name appears twice"));
        }
        let batch_size = s.batch_size.unwrap_or(DEFAULT_SINK_BATCH);
        // The PostgreSQL sink's own default: fewer, larger transactions.
        let batch_size = match (&s.postgres, s.batch_size) {
            (Some(_), None) => postgres::DEFAULT_BATCH_SIZE,
            _ => batch_size,
        };
        if !(1..=MAX_SINK_BATCH).contains(&batch_size) {
            problems.push(format!(
                "{at}: batch_size {batch_size} is outside 1..={MAX_SINK_BATCH}"
            ));
        }
        let given = [
            s.http.is_some(),
            s.postgres.is_some(),
            s.files.is_some(),
            s.hl7.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given != 1 {
            problems.push(format!(
                "{at}: needs exactly one of [sinks.http], [sinks.postgres], [sinks.files], [sinks.hl7] (found {given})"
            ));
            continue;
        }
        let mut kind_problems = |list: Vec<String>| {
            problems.extend(list.into_iter().map(|p| format!("{at}: {p}")));
        };
        let kind = if let Some(raw) = s.http {
            http::HttpConfig::from_raw(raw, base, env)
                .map(SinkKind::Http)
                .map_err(&mut kind_problems)
                .ok()
        } else if let Some(raw) = s.postgres {
            postgres::PostgresConfig::from_raw(raw, base, env)
                .map(SinkKind::Postgres)
                .map_err(&mut kind_problems)
                .ok()
        } else if let Some(raw) = s.files {
            files::FilesConfig::from_raw(raw, base, env)
                .map(SinkKind::Files)
                .map_err(&mut kind_problems)
                .ok()
        } else if let Some(raw) = s.hl7 {
            hl7::Hl7Config::from_raw(raw, base, env)
                .map(SinkKind::Hl7)
                .map_err(&mut kind_problems)
                .ok()
        } else {
            None
        };
        if problems.len() != before {
            continue;
        }
        if let Some(kind) = kind {
            out.push(SinkConfig {
                name,
                batch_size: batch_size as usize,
                kind,
            });
        }
    }
    out
}

/// Validates `[[extractors]]` and loads each one's profile (relative to `base`).
fn parse_extractors(
    raw: Vec<RawExtractor>,
    base: &Path,
    problems: &mut Vec<String>,
) -> Vec<ExtractorConfig> {
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for (i, x) in raw.into_iter().enumerate() {
        let at = format!("extractors[{i}] ({:?})", x.name);
        let before = problems.len();
        if x.name.trim().is_empty() {
            problems.push(format!("extractors[{i}].name must not be empty"));
        }
        if !names.insert(x.name.clone()) {
            problems.push(format!("{at}: extractor name appears twice"));
        }
        let timeout_ms = x.timeout_ms.unwrap_or(DEFAULT_EXTRACTOR_TIMEOUT_MS);
        if !(10..=10_000).contains(&timeout_ms) {
            problems.push(format!(
                "{at}: timeout_ms {timeout_ms} is outside 10..=10000"
            ));
        }
        let on_serial_line = x.serial.is_some();
        let link = match (x.tcp, x.serial) {
            (Some(addr), None) => match addr.parse::<SocketAddr>() {
                Ok(addr) => Some(LinkConfig::Tcp { addr }),
                Err(e) => {
                    problems.push(format!(
                        "{at}: tcp {addr:?} is not an address like 192.168.1.50:502: {e}"
                    ));
                    None
                }
            },
            (None, Some(serial)) => parse_serial(serial, &at, problems).map(LinkConfig::Rtu),
            (Some(_), Some(_)) => {
                problems.push(format!("{at}: give tcp or serial, not both"));
                None
            }
            (None, None) => {
                problems.push(format!("{at}: needs tcp = \"HOST:PORT\" or a serial table"));
                None
            }
        };
        let unit = x.unit.unwrap_or(1);
        if on_serial_line && !(1..=247).contains(&unit) {
            // Modbus over Serial Line v1.02 §2.2: 0 is broadcast, 248–255 reserved.
            problems.push(format!(
                "{at}: unit {unit} is outside 1..=247 for a serial line"
            ));
        }
        let profile_path = base.join(&x.profile);
        let profile = match std::fs::read_to_string(&profile_path) {
            Ok(text) => match Profile::from_toml_str(&text) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    problems.push(format!("{at}: profile {}: {e}", profile_path.display()));
                    None
                }
            },
            Err(e) => {
                problems.push(format!("{at}: profile {}: {e}", profile_path.display()));
                None
            }
        };
        if problems.len() != before {
            continue;
        }
        if let (Some(link), Some(profile)) = (link, profile) {
            let mut bus = BusConfig::new(x.name.clone(), link);
            bus.timeout = Duration::from_millis(timeout_ms);
            // Wait out a late reply as long as one could take.
            bus.settle = bus.timeout;
            out.push(ExtractorConfig {
                name: x.name,
                unit,
                profile_path,
                profile,
                bus,
            });
        }
    }
    out
}

fn parse_serial(raw: RawSerial, at: &str, problems: &mut Vec<String>) -> Option<SerialConfig> {
    let before = problems.len();
    check_serial_line(at, None, raw.baud, &SERIAL_BAUDS, problems);
    // Modbus over Serial Line v1.02 §2.5.1: even parity is the default.
    let parity = match raw.parity.as_deref().unwrap_or("even") {
        "none" => Parity::None,
        "even" => Parity::Even,
        "odd" => Parity::Odd,
        other => {
            problems.push(format!(
                "{at}: serial.parity {other:?} is not none, even or odd"
            ));
            Parity::Even
        }
    };
    let stop_bits = match raw.stop_bits.unwrap_or(1) {
        1 => StopBits::One,
        2 => StopBits::Two,
        other => {
            problems.push(format!("{at}: serial.stop_bits {other} is not 1 or 2"));
            StopBits::One
        }
    };
    if raw.path.trim().is_empty() {
        problems.push(format!("{at}: serial.path must not be empty"));
    }
    (problems.len() == before).then_some(SerialConfig {
        path: raw.path,
        baud: raw.baud,
        parity,
        stop_bits,
        exclusive: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::parse(text, Path::new("/etc/pcrd"), |v| {
            (v == "TOKEN_B").then(|| "from-the-environment-0001".to_string())
        })
    }

    const GOOD: &str = r#"
        [lab]
        id = "LAB-01"
        [server]
        listen = "127.0.0.1:9000"
        [store]
        path = "data"
        [[users]]
        name = "alice"
        role = "technician"
        token = "alice-token-0123456789"
        [[users]]
        name = "bob"
        role = "reviewer"
        token_env = "TOKEN_B"
    "#;

    #[test]
    fn a_good_config_resolves_paths_and_tokens() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.store.path, Path::new("/etc/pcrd/data"));
        assert_eq!(config.users[1].token, "from-the-environment-0001");
        assert_eq!(config.users[1].role, Role::Reviewer);
    }

    #[test]
    fn every_unknown_key_is_named() {
        let text = GOOD
            .replace("[server]", "[server]\nport = 1\n")
            .replace("[store]", "[store]\nflavour = \"x\"\n");
        let problems = parse(&text).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("server.port")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("store.flavour")),
            "{problems:?}"
        );
    }

    #[test]
    fn all_semantic_problems_are_reported_together() {
        let text = GOOD
            .replace("127.0.0.1:9000", "localhost")
            .replace("alice-token-0123456789", "short")
            .replace("TOKEN_B", "MISSING_VAR");
        let problems = parse(&text).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("server.listen"));
        assert!(problems[1].contains("shorter"));
        assert!(problems[2].contains("MISSING_VAR"));
    }

    #[test]
    fn a_type_error_names_the_key() {
        let problems = parse(&GOOD.replace("role = \"reviewer\"", "role = \"boss\"")).unwrap_err();
        assert!(problems[0].contains("boss"), "{problems:?}");
    }

    proptest::proptest! {
        /// Whatever bytes end up in the file, the answer is a config or a list of
        /// problems, never a panic.
        #[test]
        fn parsing_never_panics(text in "\\PC{0,400}") {
            let _ = parse(&text);
        }

        #[test]
        fn mutated_good_configs_never_panic(cut in 0usize..400, junk in "[\\[\\]=\"a-z0-9_. \n]{0,12}") {
            let mut text = GOOD.to_string();
            let at = text.char_indices().map(|(i, _)| i).nth(cut % GOOD.len()).unwrap_or(0);
            text.insert_str(at, &junk);
            let _ = parse(&text);
        }
    }

    #[test]
    fn cyclers_are_validated() {
        let text = format!(
            "{GOOD}\n[[cyclers]]\nname = \"qpcr-1\"\ntcp = \"127.0.0.1:5025\"\ntimeout_ms = 2000\n\n[[cyclers]]\nname = \"qpcr-2\"\nserial = {{ path = \"/dev/ttyUSB1\", baud = 115200 }}\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.cyclers.len(), 2);
        assert_eq!(config.cyclers[0].timeout, Some(Duration::from_secs(2)));
        assert_eq!(config.cyclers[1].dialect.name, "pcrd-ref-1");
        let bad = text
            .replace("baud = 115200", "baud = 300")
            .replace("127.0.0.1:5025", "nowhere")
            .replace("qpcr-2", "qpcr-1");
        let problems = parse(&bad).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("serial.baud 300")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("\"nowhere\"")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("appears twice")),
            "{problems:?}"
        );
    }

    #[test]
    fn extractors_are_validated_with_their_profiles() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let env = |_: &str| Some("from-the-environment-0001".to_string());
        let text = format!(
            "{GOOD}\n[[extractors]]\nname = \"ext-1\"\nprofile = \"profiles/sim-extractor.toml\"\ntcp = \"127.0.0.1:1502\"\n\n[[extractors]]\nname = \"ext-2\"\nprofile = \"profiles/sim-extractor.toml\"\nunit = 3\nserial = {{ path = \"/dev/ttyUSB0\", baud = 19200, parity = \"none\", stop_bits = 2 }}\n"
        );
        let config = Config::parse(&text, &repo, env).unwrap();
        assert_eq!(config.extractors.len(), 2);
        assert_eq!(config.extractors[0].profile.name, "pcrd-sim-extractor");
        let LinkConfig::Rtu(serial) = &config.extractors[1].bus.link else {
            panic!("serial expected");
        };
        assert_eq!(serial.parity, Parity::None);
        assert_eq!(config.extractors[1].unit, 3);

        let bad = text
            .replace("baud = 19200", "baud = 300")
            .replace("unit = 3", "unit = 0\nport = 1")
            .replace("tcp = \"127.0.0.1:1502\"", "tcp = \"nowhere\"");
        let problems = Config::parse(&bad, &repo, env).unwrap_err();
        for needle in [
            "extractors.1.port",
            "serial.baud 300",
            "unit 0",
            "tcp \"nowhere\"",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle}: {problems:?}"
            );
        }
        let missing = text.replace(
            "profiles/sim-extractor.toml\"\ntcp",
            "profiles/none.toml\"\ntcp",
        );
        let problems = Config::parse(&missing, &repo, env).unwrap_err();
        assert!(problems[0].contains("none.toml"), "{problems:?}");
    }

    #[test]
    fn sinks_are_validated_together() {
        let good = format!(
            "{GOOD}\n[[sinks]]\nname = \"export\"\n[sinks.files]\ndir = \"out\"\nndjson = true\n"
        );
        let config = parse(&good).unwrap();
        assert_eq!(config.sinks.len(), 1);
        assert_eq!(config.sinks[0].batch_size, DEFAULT_SINK_BATCH as usize);
        let crate::sinks::SinkKind::Files(files) = &config.sinks[0].kind else {
            panic!("files sink expected");
        };
        assert_eq!(files.dir, Path::new("/etc/pcrd/out"));
        assert!(files.ndjson);

        let bad = format!(
            "{good}\n[[sinks]]\nname = \"export\"\nbatch_size = 0\ncolour = 1\n[sinks.files]\n\n[[sinks]]\nname = \"none\"\n"
        );
        let problems = parse(&bad).unwrap_err();
        for needle in [
            "sinks.1.colour",
            "appears twice",
            "batch_size 0",
            "files.dir is required",
            "exactly one of",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle}: {problems:?}"
            );
        }
    }

    #[test]
    fn the_example_config_in_the_repo_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pcrd.example.toml");
        let config = Config::load(&path).unwrap();
        assert!(config.listen.ip().is_loopback());
        assert!(config.users.iter().any(|u| u.role == Role::Technician));
    }
}
