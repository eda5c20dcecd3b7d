//! Nucleic-acid extractors over Modbus, as data and pure functions.
//!
//! An extractor is a PLC-driven machine whose remote interface is a set of
//! Modbus registers (protocols.md §4). This module knows what those registers
//! mean for a given instrument — through a [`Profile`] parsed from TOML — and
//! turns a block of register values into an [`ExtractorStatus`] and an
//! [`ExtractorCommand`] into the register writes that perform it.
//!
//! It does not speak Modbus on a wire, open a port or keep time: the driver in
//! `pcrd-drivers` reads the block [`Profile::status_block`] names, hands the
//! values to [`Profile::decode_status`], and writes what
//! [`Profile::encode_command`] returns. The simulator uses
//! [`Profile::encode_status`] to lay its state out the same way.
//!
//! A value from a device is never trusted into a completion: a state code the
//! profile does not know, a progress of 140 %, a temperature outside its
//! range, a barcode with bytes that are not printable ASCII all become
//! [`Anomaly`] entries, and [`ExtractorStatus::completed`] is true only when
//! the device says "completed" and nothing in the snapshot is anomalous.

mod profile;

pub use profile::{
    CommandMap, IdentifyMap, MAX_BARCODE_REGISTERS, MAX_READ_REGISTERS, MAX_WRITE_REGISTERS,
    NumberField, POLL_INTERVAL_MS, Problem, Profile, ProfileError, StateCodes, StatusMap, Table,
    TextField, ValueType, WordOrder,
};

use serde::Serialize;

/// What the device says it is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtractorState {
    Idle,
    /// A protocol is loaded and the machine waits for start.
    Loaded,
    Running,
    Paused,
    Completed,
    /// Stopped on a device error: see [`ExtractorStatus::error`].
    Error,
    Aborted,
    /// A code the profile does not list (also reported as an [`Anomaly`]).
    Unknown(u32),
}

impl ExtractorState {
    /// Whether a run is under way (it can still complete).
    pub fn in_run(self) -> bool {
        matches!(self, ExtractorState::Running | ExtractorState::Paused)
    }
}

/// A device error code with the profile's reason for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceError {
    pub code: u32,
    /// From the profile's `[errors]` table; `None` for a code it does not list.
    pub reason: Option<String>,
}

/// Something in a status snapshot that cannot be right. A status with any
/// anomaly is never taken as a completion.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum Anomaly {
    /// The state register holds a code the profile does not list.
    UnknownState { code: u32 },
    /// A value outside the profile's (or the quantity's natural) range;
    /// NaN and infinities from f32 registers land here too.
    OutOfRange {
        field: &'static str,
        value: f64,
        min: Option<f64>,
        max: Option<f64>,
    },
    /// An integer field whose raw value is negative or does not fit.
    BadInteger { field: &'static str, raw: i64 },
    /// The barcode registers hold bytes that are not printable ASCII.
    BadText { field: &'static str },
}

/// One decoded status snapshot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExtractorStatus {
    pub state: ExtractorState,
    /// Current protocol step, as the device numbers them.
    pub step: u32,
    /// Percent, 0–100.
    pub progress: f64,
    /// Seconds left in the run, as the device estimates.
    pub remaining_s: f64,
    /// Block (heater/shaker) temperature, °C.
    pub temperature_c: f64,
    /// Non-zero error register, with its reason.
    pub error: Option<DeviceError>,
    /// Loaded protocol number (0: none).
    pub protocol: u32,
    /// Plate barcode of the current or last run; empty when none.
    pub barcode: String,
    pub anomalies: Vec<Anomaly>,
}

impl ExtractorStatus {
    /// True only for a clean completion: the device reports "completed",
    /// no error code and nothing anomalous in the snapshot.
    pub fn completed(&self) -> bool {
        self.state == ExtractorState::Completed && self.error.is_none() && self.anomalies.is_empty()
    }
}

/// What `identify` returns.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Identity {
    pub model: String,
    pub firmware: f64,
    pub anomalies: Vec<Anomaly>,
}

/// A command to an extractor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtractorCommand {
    LoadProtocol(u16),
    /// Start the loaded protocol for this plate.
    Start {
        barcode: String,
    },
    Pause,
    Resume,
    Abort,
    AcknowledgeError,
}

/// What a driver may do when a command's outcome is unknown (timeout):
/// commands carry their policy (style.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResendPolicy {
    /// Writing it twice does the same as once: the driver may resend after
    /// reading the state back and seeing it did not take effect.
    AfterReadBack,
    /// Start and abort: never resent. The state read back decides whether it
    /// took effect; if it did not, the caller is told and decides.
    Never,
}

impl ExtractorCommand {
    pub fn policy(&self) -> ResendPolicy {
        match self {
            ExtractorCommand::Start { .. } | ExtractorCommand::Abort => ResendPolicy::Never,
            _ => ResendPolicy::AfterReadBack,
        }
    }

    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            ExtractorCommand::LoadProtocol(_) => "load",
            ExtractorCommand::Start { .. } => "start",
            ExtractorCommand::Pause => "pause",
            ExtractorCommand::Resume => "resume",
            ExtractorCommand::Abort => "abort",
            ExtractorCommand::AcknowledgeError => "acknowledge",
        }
    }

    /// Whether `status` (read after the command) shows the command took
    /// effect. Used after a timeout, when the reply was lost.
    pub fn took_effect(&self, status: &ExtractorStatus) -> bool {
        use ExtractorState as S;
        match self {
            ExtractorCommand::LoadProtocol(n) => {
                status.protocol == u32::from(*n) && !matches!(status.state, S::Running | S::Paused)
            }
            ExtractorCommand::Start { barcode } => {
                status.barcode == *barcode
                    && matches!(status.state, S::Running | S::Paused | S::Completed)
            }
            ExtractorCommand::Pause => status.state == S::Paused,
            ExtractorCommand::Resume => matches!(status.state, S::Running | S::Completed),
            ExtractorCommand::Abort => matches!(status.state, S::Aborted | S::Idle),
            ExtractorCommand::AcknowledgeError => status.error.is_none(),
        }
    }
}

/// One write: consecutive registers from a 0-based address (FC16, or FC06
/// for a single register).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterWrite {
    pub address: u16,
    pub values: Vec<u16>,
}

/// Why a register block could not be decoded or a command encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractorError {
    /// The driver read a block of the wrong length: a reply that does not
    /// match the request (a late answer to another request, or a broken
    /// device). The driver treats it as a protocol error.
    #[error("expected {expected} registers from the device, got {got}")]
    BlockLength { expected: u16, got: usize },
    /// The plate barcode does not fit the profile's barcode registers or is
    /// not printable ASCII.
    #[error("plate barcode {barcode:?} is not 1 to {max} printable ASCII characters")]
    BadBarcode { barcode: String, max: usize },
}

impl Profile {
    /// Decodes the block read from [`Profile::status_block`]. Never panics;
    /// a wrong block length is an error, implausible values are anomalies.
    pub fn decode_status(&self, block: &[u16]) -> Result<ExtractorStatus, ExtractorError> {
        let (start, count) = self.status_block();
        if block.len() != usize::from(count) {
            return Err(ExtractorError::BlockLength {
                expected: count,
                got: block.len(),
            });
        }
        let s = &self.status;
        let mut anomalies = Vec::new();
        let state_code = integer(block, start, &s.state, "state", &mut anomalies);
        let state = self.state_of(state_code);
        if let ExtractorState::Unknown(code) = state {
            anomalies.push(Anomaly::UnknownState { code });
        }
        let step = integer(block, start, &s.step, "step", &mut anomalies);
        let progress = number(
            block,
            start,
            &s.progress,
            "progress",
            (Some(0.0), Some(100.0)),
            &mut anomalies,
        );
        let remaining_s = number(
            block,
            start,
            &s.remaining,
            "remaining",
            (Some(0.0), None),
            &mut anomalies,
        );
        let temperature_c = number(
            block,
            start,
            &s.temperature,
            "temperature",
            (None, None),
            &mut anomalies,
        );
        let error_code = integer(block, start, &s.error_code, "error_code", &mut anomalies);
        let protocol = integer(block, start, &s.protocol, "protocol", &mut anomalies);
        let barcode = text(block, start, &s.barcode, "barcode", &mut anomalies);
        let error = (error_code != 0).then(|| DeviceError {
            code: error_code,
            reason: self.error_reason(error_code).map(str::to_owned),
        });
        Ok(ExtractorStatus {
            state,
            step,
            progress,
            remaining_s,
            temperature_c,
            error,
            protocol,
            barcode,
            anomalies,
        })
    }

    /// Decodes the block read from [`Profile::identify_block`].
    pub fn decode_identity(&self, block: &[u16]) -> Result<Identity, ExtractorError> {
        let (start, count) = self.identify_block();
        if block.len() != usize::from(count) {
            return Err(ExtractorError::BlockLength {
                expected: count,
                got: block.len(),
            });
        }
        let mut anomalies = Vec::new();
        let model = text(block, start, &self.identify.model, "model", &mut anomalies);
        let firmware = number(
            block,
            start,
            &self.identify.firmware,
            "firmware",
            (None, None),
            &mut anomalies,
        );
        Ok(Identity {
            model,
            firmware,
            anomalies,
        })
    }

    fn state_of(&self, code: u32) -> ExtractorState {
        let st = &self.states;
        if code == st.idle {
            ExtractorState::Idle
        } else if code == st.running {
            ExtractorState::Running
        } else if code == st.completed {
            ExtractorState::Completed
        } else if code == st.error {
            ExtractorState::Error
        } else if Some(code) == st.loaded {
            ExtractorState::Loaded
        } else if Some(code) == st.paused {
            ExtractorState::Paused
        } else if Some(code) == st.aborted {
            ExtractorState::Aborted
        } else {
            ExtractorState::Unknown(code)
        }
    }

    fn state_code(&self, state: ExtractorState) -> u32 {
        let st = &self.states;
        match state {
            ExtractorState::Idle => st.idle,
            ExtractorState::Loaded => st.loaded.unwrap_or(st.idle),
            ExtractorState::Running => st.running,
            ExtractorState::Paused => st.paused.unwrap_or(st.running),
            ExtractorState::Completed => st.completed,
            ExtractorState::Error => st.error,
            ExtractorState::Aborted => st.aborted.unwrap_or(st.idle),
            ExtractorState::Unknown(code) => code,
        }
    }

    /// The register writes that perform `command`, in order: arguments
    /// first, the command code last (the device acts on the code).
    pub fn encode_command(
        &self,
        command: &ExtractorCommand,
    ) -> Result<Vec<RegisterWrite>, ExtractorError> {
        let c = &self.commands;
        let code = |code: u16| RegisterWrite {
            address: c.register,
            values: vec![code],
        };
        Ok(match command {
            ExtractorCommand::LoadProtocol(n) => vec![
                RegisterWrite {
                    address: c.argument,
                    values: vec![*n],
                },
                code(c.load),
            ],
            ExtractorCommand::Start { barcode } => {
                let values = pack_text(barcode, c.barcode.registers).ok_or_else(|| {
                    ExtractorError::BadBarcode {
                        barcode: crate::echo(barcode),
                        max: usize::from(c.barcode.registers) * 2,
                    }
                })?;
                vec![
                    RegisterWrite {
                        address: c.barcode.address,
                        values,
                    },
                    code(c.start),
                ]
            }
            ExtractorCommand::Pause => vec![code(c.pause)],
            ExtractorCommand::Resume => vec![code(c.resume)],
            ExtractorCommand::Abort => vec![code(c.abort)],
            ExtractorCommand::AcknowledgeError => vec![code(c.acknowledge)],
        })
    }

    /// Decodes a write to the command register back into a command, given
    /// the argument and barcode registers' contents: what a device (the
    /// simulator) does with it.
    pub fn decode_command(
        &self,
        code: u16,
        argument: u16,
        barcode: &[u16],
    ) -> Option<ExtractorCommand> {
        let c = &self.commands;
        Some(if code == c.load {
            ExtractorCommand::LoadProtocol(argument)
        } else if code == c.start {
            ExtractorCommand::Start {
                barcode: unpack_text(barcode).unwrap_or_default(),
            }
        } else if code == c.pause {
            ExtractorCommand::Pause
        } else if code == c.resume {
            ExtractorCommand::Resume
        } else if code == c.abort {
            ExtractorCommand::Abort
        } else if code == c.acknowledge {
            ExtractorCommand::AcknowledgeError
        } else {
            return None;
        })
    }

    /// Lays a status out in registers as the device would: the inverse of
    /// [`Profile::decode_status`], for simulators and tests. Returns the
    /// block starting at [`Profile::status_block`]'s address. Values are
    /// rounded to the register's resolution and saturate at its range.
    pub fn encode_status(&self, status: &ExtractorStatus) -> Vec<u16> {
        let (start, count) = self.status_block();
        let mut block = vec![0u16; usize::from(count)];
        let s = &self.status;
        let state = f64::from(self.state_code(status.state));
        put_number(&mut block, start, &s.state, state);
        put_number(&mut block, start, &s.step, f64::from(status.step));
        put_number(&mut block, start, &s.progress, status.progress);
        put_number(&mut block, start, &s.remaining, status.remaining_s);
        put_number(&mut block, start, &s.temperature, status.temperature_c);
        let error = status.error.as_ref().map_or(0, |e| e.code);
        put_number(&mut block, start, &s.error_code, f64::from(error));
        put_number(&mut block, start, &s.protocol, f64::from(status.protocol));
        let text = pack_text_lossy(&status.barcode, s.barcode.registers);
        put_words(&mut block, start, s.barcode.address, &text);
        block
    }

    /// Lays identification out in registers (for simulators).
    pub fn encode_identity(&self, model: &str, firmware: f64) -> Vec<u16> {
        let (start, count) = self.identify_block();
        let mut block = vec![0u16; usize::from(count)];
        let text = pack_text_lossy(model, self.identify.model.registers);
        put_words(&mut block, start, self.identify.model.address, &text);
        put_number(&mut block, start, &self.identify.firmware, firmware);
        block
    }
}

/// The registers of `field` inside `block` (which starts at `start`).
/// Fields lie inside the block by construction ([`Profile::status_block`]).
fn words(block: &[u16], start: u16, address: u16, width: u16) -> &[u16] {
    let from = usize::from(address.saturating_sub(start));
    let to = from + usize::from(width);
    block.get(from..to).unwrap_or(&[])
}

fn put_words(block: &mut [u16], start: u16, address: u16, values: &[u16]) {
    let from = usize::from(address.saturating_sub(start));
    if let Some(slot) = block.get_mut(from..from + values.len()) {
        slot.copy_from_slice(values);
    }
}

/// The raw value of a numeric field, before scaling.
fn raw_value(block: &[u16], start: u16, field: &NumberField) -> f64 {
    let w = words(block, start, field.address, field.kind.width());
    let pair = || -> u32 {
        let (a, b) = (
            u32::from(w.first().copied().unwrap_or(0)),
            u32::from(w.get(1).copied().unwrap_or(0)),
        );
        match field.word_order {
            WordOrder::HighFirst => (a << 16) | b,
            WordOrder::LowFirst => (b << 16) | a,
        }
    };
    match field.kind {
        ValueType::U16 => f64::from(w.first().copied().unwrap_or(0)),
        ValueType::I16 => f64::from(w.first().copied().unwrap_or(0).cast_signed()),
        ValueType::U32 => f64::from(pair()),
        ValueType::I32 => f64::from(pair().cast_signed()),
        ValueType::F32 => f64::from(f32::from_bits(pair())),
    }
}

/// A scaled number, flagged when outside the profile's range or `natural`.
fn number(
    block: &[u16],
    start: u16,
    field: &NumberField,
    name: &'static str,
    natural: (Option<f64>, Option<f64>),
    anomalies: &mut Vec<Anomaly>,
) -> f64 {
    let value = raw_value(block, start, field) * field.scale + field.offset;
    let min = field.min.or(natural.0);
    let max = field.max.or(natural.1);
    let below = min.is_some_and(|m| value < m);
    let above = max.is_some_and(|m| value > m);
    if !value.is_finite() || below || above {
        anomalies.push(Anomaly::OutOfRange {
            field: name,
            value,
            min,
            max,
        });
    }
    value
}

/// An integer field (state, step, codes): scale is ignored, the raw value
/// must be a non-negative integer.
fn integer(
    block: &[u16],
    start: u16,
    field: &NumberField,
    name: &'static str,
    anomalies: &mut Vec<Anomaly>,
) -> u32 {
    let raw = raw_value(block, start, field);
    // Integer types only (checked at load), so `raw` is exact.
    let raw = raw as i64;
    match u32::try_from(raw) {
        Ok(v) => {
            let out = field.min.is_some_and(|m| (v as f64) < m)
                || field.max.is_some_and(|m| (v as f64) > m);
            if out {
                anomalies.push(Anomaly::OutOfRange {
                    field: name,
                    value: v as f64,
                    min: field.min,
                    max: field.max,
                });
            }
            v
        }
        Err(_) => {
            anomalies.push(Anomaly::BadInteger { field: name, raw });
            0
        }
    }
}

fn text(
    block: &[u16],
    start: u16,
    field: &TextField,
    name: &'static str,
    anomalies: &mut Vec<Anomaly>,
) -> String {
    let w = words(block, start, field.address, field.registers);
    match unpack_text(w) {
        Some(t) => t,
        None => {
            anomalies.push(Anomaly::BadText { field: name });
            String::new()
        }
    }
}

/// Two ASCII characters per register, high byte first, trailing NUL or
/// space padding removed; `None` if a byte is not printable ASCII or a NUL
/// is followed by text.
pub fn unpack_text(words: &[u16]) -> Option<String> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    if bytes[end..].iter().any(|&b| b != 0) {
        return None;
    }
    let text = &bytes[..end];
    if !text.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return None;
    }
    Some(String::from_utf8_lossy(text).trim_end().to_owned())
}

/// Packs `text` into `registers` registers, NUL-padded; `None` if it is
/// empty, too long or not printable ASCII.
pub fn pack_text(text: &str, registers: u16) -> Option<Vec<u16>> {
    let bytes = text.as_bytes();
    let fits = !bytes.is_empty() && bytes.len() <= usize::from(registers) * 2;
    if !fits || !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return None;
    }
    Some(pack_text_lossy(text, registers))
}

fn pack_text_lossy(text: &str, registers: u16) -> Vec<u16> {
    let mut bytes: Vec<u8> = text.bytes().take(usize::from(registers) * 2).collect();
    bytes.resize(usize::from(registers) * 2, 0);
    bytes
        .chunks_exact(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect()
}

/// Writes an engineering value into the registers of `field`, rounding to
/// the register's resolution and saturating at the type's range.
fn put_number(block: &mut [u16], start: u16, field: &NumberField, value: f64) {
    let raw = (value - field.offset) / field.scale;
    let bits: u32 = match field.kind {
        ValueType::U16 => u32::from(raw.round().clamp(0.0, f64::from(u16::MAX)) as u16),
        ValueType::I16 => u32::from(
            (raw.round().clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16).cast_unsigned(),
        ),
        ValueType::U32 => raw.round().clamp(0.0, f64::from(u32::MAX)) as u32,
        ValueType::I32 => {
            (raw.round().clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32).cast_unsigned()
        }
        ValueType::F32 => (raw as f32).to_bits(),
    };
    let hi = (bits >> 16) as u16;
    let lo = (bits & 0xffff) as u16;
    let values: Vec<u16> = match (field.kind.width(), field.word_order) {
        (1, _) => vec![lo],
        (_, WordOrder::HighFirst) => vec![hi, lo],
        (_, WordOrder::LowFirst) => vec![lo, hi],
    };
    put_words(block, start, field.address, &values);
}

#[cfg(test)]
mod tests;
