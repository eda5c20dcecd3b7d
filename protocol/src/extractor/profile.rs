//! Register-map profiles: where an extractor keeps its state, progress and
//! commands, as data parsed from TOML text.
//!
//! Modbus has no profile for lab instruments (protocols.md §4): each vendor
//! has its own map, often 1-based, with 32-bit values in either word order and
//! temperatures as scaled integers. A profile says all of that per register so
//! a new instrument needs a file, not code. `docs/modbus-profiles.md` in the
//! repository explains how to write one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::echo;

/// Largest number of registers one read may ask for: Modbus Application
/// Protocol v1.1b3 §6.3/§6.4 (FC03/FC04 quantity 1–125).
pub const MAX_READ_REGISTERS: u16 = 125;
/// Largest number of registers one write may carry: §6.12 (FC16 quantity 1–123).
pub const MAX_WRITE_REGISTERS: u16 = 123;
/// Polling faster than this floods an RS-485 bus (a 10-register read takes
/// ~46 ms at 9600 Bd, field-notes §4); slower than this misses short steps.
pub const POLL_INTERVAL_MS: std::ops::RangeInclusive<u64> = 50..=60_000;
/// Longest plate barcode a profile may reserve: 32 registers = 64 characters,
/// more than any plate barcode symbology in use.
pub const MAX_BARCODE_REGISTERS: u16 = 32;

/// The Modbus table status registers are read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Holding registers: read with FC03, written with FC06/FC16.
    Holding,
    /// Input registers: read-only, FC04.
    Input,
}

/// How a number is laid out in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl ValueType {
    /// Registers the value occupies.
    pub fn width(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "u16" => ValueType::U16,
            "i16" => ValueType::I16,
            "u32" => ValueType::U32,
            "i32" => ValueType::I32,
            "f32" => ValueType::F32,
            _ => return None,
        })
    }
}

/// Order of the two registers of a 32-bit value. Modbus leaves it open
/// (protocols.md §4: libmodbus calls them ABCD and CDAB for the two orders
/// with big-endian bytes inside each register, which Modbus fixes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WordOrder {
    /// High word at the lower address ("ABCD"): the common default.
    HighFirst,
    /// Low word at the lower address ("CDAB").
    LowFirst,
}

/// One numeric field: its place, type, scaling and plausible range.
#[derive(Clone, Debug, PartialEq)]
pub struct NumberField {
    /// 0-based PDU address (the profile's numbering already converted).
    pub address: u16,
    pub kind: ValueType,
    pub word_order: WordOrder,
    /// Engineering value = raw × scale + offset.
    pub scale: f64,
    pub offset: f64,
    /// Values outside `[min, max]` are flagged as out of range.
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl NumberField {
    /// Registers covered, as a 0-based half-open range.
    pub fn span(&self) -> std::ops::Range<u32> {
        u32::from(self.address)..u32::from(self.address) + u32::from(self.kind.width())
    }
}

/// Text packed two ASCII characters per register, high byte first, padded
/// with NUL or spaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextField {
    /// 0-based PDU address.
    pub address: u16,
    pub registers: u16,
}

impl TextField {
    pub fn span(&self) -> std::ops::Range<u32> {
        u32::from(self.address)..u32::from(self.address) + u32::from(self.registers)
    }
}

/// Where the status lives. Everything is read in one request (see
/// [`Profile::status_block`]), so a status is one consistent snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusMap {
    pub state: NumberField,
    pub step: NumberField,
    pub progress: NumberField,
    pub remaining: NumberField,
    pub temperature: NumberField,
    pub error_code: NumberField,
    pub protocol: NumberField,
    pub barcode: TextField,
}

/// The device's state codes, by meaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateCodes {
    pub idle: u32,
    pub loaded: Option<u32>,
    pub running: u32,
    pub paused: Option<u32>,
    pub completed: u32,
    pub error: u32,
    pub aborted: Option<u32>,
}

/// The command handshake: arguments first, then the code into the command
/// register, which is what the device acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandMap {
    /// 0-based address of the command register.
    pub register: u16,
    /// 0-based address of the argument register (protocol number for load).
    pub argument: u16,
    /// Where `start` writes the plate barcode before the start code.
    pub barcode: TextField,
    pub load: u16,
    pub start: u16,
    pub pause: u16,
    pub resume: u16,
    pub abort: u16,
    pub acknowledge: u16,
}

/// Identification registers, read by `identify`.
#[derive(Clone, Debug, PartialEq)]
pub struct IdentifyMap {
    pub model: TextField,
    pub firmware: NumberField,
}

/// A validated extractor register map.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub name: String,
    pub version: String,
    /// Table status and identification are read from.
    pub table: Table,
    pub poll_interval: Duration,
    pub identify: IdentifyMap,
    pub status: StatusMap,
    pub states: StateCodes,
    pub commands: CommandMap,
    /// Device error code → readable reason, from the instrument's manual.
    pub errors: BTreeMap<u32, String>,
}

/// Why a profile was refused. Messages name the profile and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// Not TOML, a required key missing, a wrong value type or an unknown
    /// key (usually a typo): the parser's message with line and column.
    #[error("extractor profile is malformed: {message}")]
    Toml { message: String },
    /// The TOML is well formed but fields are wrong: each problem names its
    /// field (`status.progress.type`), all reported at once.
    #[error("extractor profile {profile:?} is invalid: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        profile: String,
        problems: Vec<Problem>,
    },
}

/// One problem in a profile, with the field it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path, e.g. `status.remaining.address`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    version: String,
    address_base: u32,
    #[serde(default = "default_table")]
    table: String,
    poll_interval_ms: u64,
    identify: RawIdentify,
    status: RawStatus,
    states: RawStates,
    commands: RawCommands,
    #[serde(default)]
    errors: BTreeMap<String, String>,
}

fn default_table() -> String {
    "holding".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentify {
    model: RawText,
    firmware: RawNumber,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatus {
    state: RawNumber,
    step: RawNumber,
    progress: RawNumber,
    remaining: RawNumber,
    temperature: RawNumber,
    error_code: RawNumber,
    protocol: RawNumber,
    barcode: RawText,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStates {
    idle: u32,
    loaded: Option<u32>,
    running: u32,
    paused: Option<u32>,
    completed: u32,
    error: u32,
    aborted: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommands {
    register: i64,
    argument: i64,
    barcode: RawText,
    codes: RawCodes,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCodes {
    load: u16,
    start: u16,
    pause: u16,
    resume: u16,
    abort: u16,
    acknowledge: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNumber {
    address: i64,
    #[serde(rename = "type")]
    kind: String,
    word_order: Option<String>,
    scale: Option<f64>,
    offset: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawText {
    address: i64,
    registers: i64,
}

/// Collects problems while converting the raw file.
struct Check {
    base: u32,
    problems: Vec<Problem>,
}

impl Check {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// Converts a profile address to a 0-based PDU address covering `width`
    /// registers, or records why it cannot be one.
    fn address(&mut self, field: &str, address: i64, width: u16) -> u16 {
        let base = i64::from(self.base);
        let pdu = address - base;
        if pdu < 0 {
            self.problem(
                &format!("{field}.address"),
                format!("{address} is below the profile's address_base {base}"),
            );
            return 0;
        }
        // PDU addresses are 16-bit (Modbus Application Protocol §4.4): the
        // last register of the field must be at most 65535.
        if pdu + i64::from(width) - 1 > i64::from(u16::MAX) {
            self.problem(
                &format!("{field}.address"),
                format!(
                    "{address} with {width} register(s) ends beyond the last Modbus address 65535 (after address_base {base})"
                ),
            );
            return 0;
        }
        u16::try_from(pdu).unwrap_or(0)
    }

    fn number(&mut self, field: &str, raw: RawNumber) -> NumberField {
        let kind = ValueType::parse(&raw.kind).unwrap_or_else(|| {
            self.problem(
                &format!("{field}.type"),
                format!(
                    "unknown type {:?}; expected u16, i16, u32, i32 or f32",
                    echo(&raw.kind)
                ),
            );
            ValueType::U16
        });
        let word_order = match raw.word_order.as_deref() {
            None | Some("high_first") => WordOrder::HighFirst,
            Some("low_first") => WordOrder::LowFirst,
            Some(other) => {
                self.problem(
                    &format!("{field}.word_order"),
                    format!(
                        "unknown word order {:?}; expected high_first or low_first",
                        echo(other)
                    ),
                );
                WordOrder::HighFirst
            }
        };
        if raw.word_order.is_some() && kind.width() == 1 {
            self.problem(
                &format!("{field}.word_order"),
                "only 32-bit types (u32, i32, f32) have a word order",
            );
        }
        let scale = raw.scale.unwrap_or(1.0);
        if !scale.is_finite() || scale == 0.0 {
            self.problem(
                &format!("{field}.scale"),
                "must be a finite, non-zero number",
            );
        }
        let offset = raw.offset.unwrap_or(0.0);
        if !offset.is_finite() {
            self.problem(&format!("{field}.offset"), "must be finite");
        }
        if let (Some(min), Some(max)) = (raw.min, raw.max)
            && min > max
        {
            self.problem(
                &format!("{field}.min"),
                format!("min {min} is above max {max}"),
            );
        }
        let address = self.address(field, raw.address, kind.width());
        NumberField {
            address,
            kind,
            word_order,
            scale,
            offset,
            min: raw.min,
            max: raw.max,
        }
    }

    fn text(&mut self, field: &str, raw: RawText) -> TextField {
        let registers = match u16::try_from(raw.registers) {
            Ok(n) if (1..=MAX_BARCODE_REGISTERS).contains(&n) => n,
            _ => {
                self.problem(
                    &format!("{field}.registers"),
                    format!(
                        "{} is not between 1 and {MAX_BARCODE_REGISTERS}",
                        raw.registers
                    ),
                );
                1
            }
        };
        TextField {
            address: self.address(field, raw.address, registers),
            registers,
        }
    }

    fn register(&mut self, field: &str, address: i64) -> u16 {
        self.address(field, address, 1)
    }
}

impl Profile {
    /// Parses and validates a profile. Every field problem is reported at
    /// once, each naming its field.
    pub fn from_toml_str(text: &str) -> Result<Profile, ProfileError> {
        let raw: RawProfile = toml::from_str(text).map_err(|e| ProfileError::Toml {
            message: e.to_string().trim_end().to_owned(),
        })?;
        let mut check = Check {
            base: raw.address_base,
            problems: Vec::new(),
        };
        if raw.address_base > 1 {
            check.problem("address_base", "must be 0 or 1");
            check.base = 0;
        }
        if raw.name.trim().is_empty() {
            check.problem("name", "must not be empty");
        }
        let table = match raw.table.as_str() {
            "holding" => Table::Holding,
            "input" => Table::Input,
            other => {
                check.problem(
                    "table",
                    format!("unknown table {:?}; expected holding or input", echo(other)),
                );
                Table::Holding
            }
        };
        if !POLL_INTERVAL_MS.contains(&raw.poll_interval_ms) {
            check.problem(
                "poll_interval_ms",
                format!(
                    "{} is not between {} and {}",
                    raw.poll_interval_ms,
                    POLL_INTERVAL_MS.start(),
                    POLL_INTERVAL_MS.end()
                ),
            );
        }
        let identify = IdentifyMap {
            model: check.text("identify.model", raw.identify.model),
            firmware: check.number("identify.firmware", raw.identify.firmware),
        };
        let s = raw.status;
        let status = StatusMap {
            state: check.number("status.state", s.state),
            step: check.number("status.step", s.step),
            progress: check.number("status.progress", s.progress),
            remaining: check.number("status.remaining", s.remaining),
            temperature: check.number("status.temperature", s.temperature),
            error_code: check.number("status.error_code", s.error_code),
            protocol: check.number("status.protocol", s.protocol),
            barcode: check.text("status.barcode", s.barcode),
        };
        for (name, field) in [
            ("status.state", &status.state),
            ("status.step", &status.step),
            ("status.error_code", &status.error_code),
            ("status.protocol", &status.protocol),
        ] {
            if field.kind == ValueType::F32 {
                check.problem(
                    &format!("{name}.type"),
                    "a code or count must be an integer type",
                );
            }
        }
        let c = raw.commands;
        let commands = CommandMap {
            register: check.register("commands.register", c.register),
            argument: check.register("commands.argument", c.argument),
            barcode: check.text("commands.barcode", c.barcode),
            load: c.codes.load,
            start: c.codes.start,
            pause: c.codes.pause,
            resume: c.codes.resume,
            abort: c.codes.abort,
            acknowledge: c.codes.acknowledge,
        };
        let codes = [
            ("load", commands.load),
            ("start", commands.start),
            ("pause", commands.pause),
            ("resume", commands.resume),
            ("abort", commands.abort),
            ("acknowledge", commands.acknowledge),
        ];
        let mut seen = BTreeMap::new();
        for (name, code) in codes {
            if let Some(other) = seen.insert(code, name) {
                check.problem(
                    &format!("commands.codes.{name}"),
                    format!("code {code} is also the code of {other}"),
                );
            }
        }
        let st = raw.states;
        let states = StateCodes {
            idle: st.idle,
            loaded: st.loaded,
            running: st.running,
            paused: st.paused,
            completed: st.completed,
            error: st.error,
            aborted: st.aborted,
        };
        let mut seen = BTreeMap::new();
        for (name, code) in [
            ("idle", Some(st.idle)),
            ("loaded", st.loaded),
            ("running", Some(st.running)),
            ("paused", st.paused),
            ("completed", Some(st.completed)),
            ("error", Some(st.error)),
            ("aborted", st.aborted),
        ] {
            if let Some(code) = code
                && let Some(other) = seen.insert(code, name)
            {
                check.problem(
                    &format!("states.{name}"),
                    format!("code {code} is also the code of {other}"),
                );
            }
        }
        let mut errors = BTreeMap::new();
        for (key, reason) in raw.errors {
            match key.parse::<u32>() {
                Ok(0) => check.problem(
                    &format!("errors.{}", echo(&key)),
                    "0 means \"no error\" and cannot have a reason",
                ),
                Ok(code) => {
                    errors.insert(code, reason);
                }
                Err(_) => check.problem(
                    &format!("errors.{}", echo(&key)),
                    "an error code must be a whole number",
                ),
            }
        }
        let profile = Profile {
            name: raw.name,
            version: raw.version,
            table,
            poll_interval: Duration::from_millis(raw.poll_interval_ms),
            identify,
            status,
            states,
            commands,
            errors,
        };
        if check.problems.is_empty() {
            profile.check_layout(&mut check);
        }
        if check.problems.is_empty() {
            Ok(profile)
        } else {
            Err(ProfileError::Invalid {
                profile: echo(&profile.name),
                problems: check.problems,
            })
        }
    }

    /// Overlaps and request sizes, once every address is known.
    fn check_layout(&self, check: &mut Check) {
        let s = &self.status;
        let c = &self.commands;
        let mut spans: Vec<(&str, std::ops::Range<u32>)> = vec![
            ("status.state", s.state.span()),
            ("status.step", s.step.span()),
            ("status.progress", s.progress.span()),
            ("status.remaining", s.remaining.span()),
            ("status.temperature", s.temperature.span()),
            ("status.error_code", s.error_code.span()),
            ("status.protocol", s.protocol.span()),
            ("status.barcode", s.barcode.span()),
            ("identify.model", self.identify.model.span()),
            ("identify.firmware", self.identify.firmware.span()),
        ];
        // Commands are writes to holding registers; when status is read
        // from input registers the two are different tables and cannot
        // collide.
        if self.table == Table::Holding {
            spans.extend([
                (
                    "commands.register",
                    u32::from(c.register)..u32::from(c.register) + 1,
                ),
                (
                    "commands.argument",
                    u32::from(c.argument)..u32::from(c.argument) + 1,
                ),
                ("commands.barcode", c.barcode.span()),
            ]);
        } else {
            let mut writes = [
                (
                    "commands.register",
                    u32::from(c.register)..u32::from(c.register) + 1,
                ),
                (
                    "commands.argument",
                    u32::from(c.argument)..u32::from(c.argument) + 1,
                ),
                ("commands.barcode", c.barcode.span()),
            ];
            writes.sort_by_key(|(_, r)| r.start);
            overlaps(&writes, check);
        }
        spans.sort_by_key(|(_, r)| r.start);
        overlaps(&spans, check);
        let (start, count) = self.status_block();
        if count > MAX_READ_REGISTERS {
            check.problem(
                "status",
                format!(
                    "status registers span {count} registers from 0-based address {start}; one read carries at most {MAX_READ_REGISTERS}"
                ),
            );
        }
        let (_, count) = self.identify_block();
        if count > MAX_READ_REGISTERS {
            check.problem(
                "identify",
                format!(
                    "identify registers span {count} registers; one read carries at most {MAX_READ_REGISTERS}"
                ),
            );
        }
    }

    /// The one read that fetches every status field: (0-based start, count).
    pub fn status_block(&self) -> (u16, u16) {
        let s = &self.status;
        block(&[
            s.state.span(),
            s.step.span(),
            s.progress.span(),
            s.remaining.span(),
            s.temperature.span(),
            s.error_code.span(),
            s.protocol.span(),
            s.barcode.span(),
        ])
    }

    /// The one read that fetches the identification fields.
    pub fn identify_block(&self) -> (u16, u16) {
        block(&[self.identify.model.span(), self.identify.firmware.span()])
    }

    /// The readable reason for a device error code, if the profile has one.
    pub fn error_reason(&self, code: u32) -> Option<&str> {
        self.errors.get(&code).map(String::as_str)
    }
}

fn overlaps(sorted: &[(&str, std::ops::Range<u32>)], check: &mut Check) {
    let mut reported = BTreeSet::new();
    for (i, (a, ra)) in sorted.iter().enumerate() {
        for (b, rb) in &sorted[i + 1..] {
            if rb.start >= ra.end {
                break;
            }
            if reported.insert((*a, *b)) {
                check.problem(
                    b,
                    format!(
                        "registers {}..{} overlap {a} ({}..{}, 0-based)",
                        rb.start,
                        rb.end - 1,
                        ra.start,
                        ra.end - 1
                    ),
                );
            }
        }
    }
}

/// Smallest block covering every span, as (start, count); count saturates.
fn block(spans: &[std::ops::Range<u32>]) -> (u16, u16) {
    let start = spans.iter().map(|r| r.start).min().unwrap_or(0);
    let end = spans.iter().map(|r| r.end).max().unwrap_or(0);
    (
        u16::try_from(start).unwrap_or(u16::MAX),
        u16::try_from(end - start).unwrap_or(u16::MAX),
    )
}
