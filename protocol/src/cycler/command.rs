//! Commands as types: what each operation sends, what it answers, and its policy
//! (timeout, attempts, whether a resend is safe).

use std::collections::BTreeSet;
use std::time::Duration;

use super::dialect::Dialect;
use super::error::CyclerError;
use super::line::{Line, MAX_LINE_LEN};
use crate::domain::{PlateFormat, Well};
use crate::echo;

/// Longest name (channel, plate id, protocol name, well label).
pub const MAX_NAME_LEN: usize = 32;
/// Most channels a protocol may read (real-time cyclers have 4 to 6 optical channels).
pub const MAX_CHANNELS: usize = 6;
/// Most stages of a thermal protocol.
pub const MAX_STAGES: usize = 16;
/// Most steps of a stage.
pub const MAX_STEPS: usize = 8;
/// Most cycles of a stage (RT-qPCR kits run 40 to 50).
pub const MAX_CYCLES: u32 = 99;
/// Block temperatures a step may ask for, °C: 4 °C (hold) to 100 °C (denaturation).
pub const TEMPERATURE_RANGE_C: (f64, f64) = (4.0, 100.0);
/// Longest hold of one step, seconds (RT steps are 10 to 30 min; 2 h is generous).
pub const MAX_HOLD_S: u32 = 7_200;

/// Checks a name: 1 to [`MAX_NAME_LEN`] of `A-Z a-z 0-9 _ . -`.
pub(crate) fn check_name(what: &'static str, text: &str) -> Result<(), CyclerError> {
    let ok = !text.is_empty()
        && text.len() <= MAX_NAME_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CyclerError::BadName {
            what,
            text: echo(text),
        })
    }
}

/// Parses a decimal `u32`: digits only (no sign, no spaces).
pub(crate) fn parse_u32(what: &'static str, text: &str) -> Result<u32, CyclerError> {
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CyclerError::number(what, text, "a whole number"));
    }
    text.parse()
        .map_err(|_| CyclerError::number(what, text, "a whole number"))
}

/// Parses a finite `f64`.
pub(crate) fn parse_f64(text: &str) -> Option<f64> {
    // Rust's parser also takes "inf" and "NaN"; a reading or a temperature never is one.
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// An optical channel (dye), as the instrument names it: `FAM`, `HEX`, `ROX`, `CY5`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(String);

impl Channel {
    /// Checks and wraps a channel name.
    pub fn new(name: &str) -> Result<Channel, CyclerError> {
        check_name("channel", name)?;
        Ok(Channel(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One step of a stage: go to a temperature, hold, and optionally read fluorescence.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Block temperature, °C.
    pub temperature_c: f64,
    /// Hold at that temperature, seconds.
    pub hold_s: u32,
    /// Read every channel at the end of the hold.
    pub read: bool,
}

/// A stage: its steps, repeated `cycles` times.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// Repetitions, 1 to [`MAX_CYCLES`].
    pub cycles: u32,
    /// The steps, 1 to [`MAX_STEPS`]; at most one reads.
    pub steps: Vec<Step>,
}

/// A thermal protocol: stages, and the channels read at each read step.
#[derive(Debug, Clone, PartialEq)]
pub struct ThermalProtocol {
    /// A name for the instrument's display and the run record.
    pub name: String,
    /// Channels read at each read step, 1 to [`MAX_CHANNELS`], distinct.
    pub channels: Vec<Channel>,
    /// Stages in order, 1 to [`MAX_STAGES`].
    pub stages: Vec<Stage>,
}

impl ThermalProtocol {
    /// Checks the protocol can be run and sent: the limits above, at least one read step
    /// and at most one per stage.
    pub fn validate(&self) -> Result<(), CyclerError> {
        let invalid = |reason: String| Err(CyclerError::Invalid { reason });
        check_name("protocol name", &self.name)?;
        if self.channels.is_empty() || self.channels.len() > MAX_CHANNELS {
            return invalid(format!("a protocol reads 1 to {MAX_CHANNELS} channels"));
        }
        if self.channels.iter().collect::<BTreeSet<_>>().len() != self.channels.len() {
            return invalid("a channel is listed twice".to_owned());
        }
        if self.stages.is_empty() || self.stages.len() > MAX_STAGES {
            return invalid(format!("a protocol has 1 to {MAX_STAGES} stages"));
        }
        for (i, stage) in self.stages.iter().enumerate() {
            let n = i + 1;
            if !(1..=MAX_CYCLES).contains(&stage.cycles) {
                return invalid(format!("stage {n}: 1 to {MAX_CYCLES} cycles"));
            }
            if stage.steps.is_empty() || stage.steps.len() > MAX_STEPS {
                return invalid(format!("stage {n}: 1 to {MAX_STEPS} steps"));
            }
            if stage.steps.iter().filter(|s| s.read).count() > 1 {
                return invalid(format!("stage {n}: at most one read step"));
            }
            for step in &stage.steps {
                let (low, high) = TEMPERATURE_RANGE_C;
                if !(low..=high).contains(&step.temperature_c) {
                    return invalid(format!(
                        "stage {n}: temperature {} °C outside {low} to {high} °C",
                        step.temperature_c
                    ));
                }
                if step.hold_s > MAX_HOLD_S {
                    return invalid(format!("stage {n}: hold longer than {MAX_HOLD_S} s"));
                }
            }
        }
        if self.data_cycles() == 0 {
            return invalid("no step reads fluorescence".to_owned());
        }
        Ok(())
    }

    /// Cycles that produce readings: the cycles of every stage with a read step. A run
    /// that completes sends this many `!CYCLE` rounds.
    pub fn data_cycles(&self) -> u32 {
        self.stages
            .iter()
            .filter(|s| s.steps.iter().any(|st| st.read))
            .map(|s| s.cycles)
            .fold(0u32, u32::saturating_add)
    }

    fn encode_params(&self) -> String {
        let channels: Vec<&str> = self.channels.iter().map(Channel::as_str).collect();
        let mut out = format!("{} {}", self.name, channels.join(","));
        for stage in &self.stages {
            let steps: Vec<String> = stage
                .steps
                .iter()
                .map(|s| {
                    format!(
                        "{}@{}{}",
                        s.temperature_c,
                        s.hold_s,
                        if s.read { "R" } else { "" }
                    )
                })
                .collect();
            out.push_str(&format!(" {}x{}", stage.cycles, steps.join("/")));
        }
        out
    }

    fn parse_params(params: &str) -> Result<ThermalProtocol, CyclerError> {
        let shape = CyclerError::BadShape {
            what: "thermal protocol",
            expected: "NAME CH,CH.. CYCLESxTEMP@HOLD[R]/.. (one stage per word)",
        };
        let mut words = params.split(' ');
        let (Some(name), Some(channels)) = (words.next(), words.next()) else {
            return Err(shape);
        };
        let channels = channels
            .split(',')
            .map(Channel::new)
            .collect::<Result<Vec<_>, _>>()?;
        let mut stages = Vec::new();
        for word in words {
            let Some((cycles, steps)) = word.split_once('x') else {
                return Err(shape);
            };
            let cycles = parse_u32("cycles", cycles)?;
            let steps = steps
                .split('/')
                .map(|step| {
                    let (step, read) = match step.strip_suffix('R') {
                        Some(s) => (s, true),
                        None => (step, false),
                    };
                    let (temp, hold) = step.split_once('@').ok_or(CyclerError::BadShape {
                        what: "step",
                        expected: "TEMP@HOLD or TEMP@HOLDR",
                    })?;
                    let temperature_c = parse_f64(temp).ok_or_else(|| {
                        CyclerError::number("temperature", temp, "a temperature in °C")
                    })?;
                    Ok(Step {
                        temperature_c,
                        hold_s: parse_u32("hold", hold)?,
                        read,
                    })
                })
                .collect::<Result<Vec<_>, CyclerError>>()?;
            stages.push(Stage { cycles, steps });
        }
        let protocol = ThermalProtocol {
            name: name.to_owned(),
            channels,
            stages,
        };
        protocol.validate()?;
        Ok(protocol)
    }
}

/// What the cycler needs of a plate: its id, its format, and a label for each used well.
/// Readings always cover every well of the format, column-major (A1, B1, .., H1, A2, ..).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlateMap {
    /// The plate's barcode or id.
    pub plate_id: String,
    /// 96 or 384 wells.
    pub format: PlateFormat,
    /// Used wells and their labels (sample id, `NTC`, `PC`, ..), at least one, each
    /// well once.
    pub wells: Vec<(Well, String)>,
}

impl PlateMap {
    /// Checks names, wells on the plate, and no well twice.
    pub fn validate(&self) -> Result<(), CyclerError> {
        check_name("plate id", &self.plate_id)?;
        if self.wells.is_empty() {
            return Err(CyclerError::Invalid {
                reason: "a plate map names at least one well".to_owned(),
            });
        }
        let mut seen = BTreeSet::new();
        for (well, label) in &self.wells {
            if !self.format.contains(*well) {
                return Err(CyclerError::Invalid {
                    reason: format!("well {well} is not on a {}-well plate", self.format),
                });
            }
            if !seen.insert(*well) {
                return Err(CyclerError::Invalid {
                    reason: format!("well {well} is listed twice"),
                });
            }
            check_name("well label", label)?;
        }
        Ok(())
    }

    /// Readings per channel and cycle: every well of the format.
    pub fn well_count(&self) -> usize {
        self.format.well_count()
    }

    fn encode_params(&self) -> String {
        let wells: Vec<String> = self
            .wells
            .iter()
            .map(|(w, label)| format!("{w}={label}"))
            .collect();
        format!("{} {} {}", self.plate_id, self.format, wells.join(","))
    }

    fn parse_params(params: &str) -> Result<PlateMap, CyclerError> {
        let shape = CyclerError::BadShape {
            what: "plate map",
            expected: "PLATE-ID 96|384 WELL=LABEL,WELL=LABEL..",
        };
        let mut words = params.split(' ');
        let (Some(plate_id), Some(format), Some(wells), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(shape);
        };
        let format: PlateFormat = format
            .parse()
            .map_err(|_| CyclerError::number("plate format", format, "96 or 384"))?;
        let wells = wells
            .split(',')
            .map(|pair| {
                let (well, label) = pair.split_once('=').ok_or(CyclerError::BadShape {
                    what: "plate map",
                    expected: "WELL=LABEL",
                })?;
                let well = Well::parse_in(well, format).map_err(|e| CyclerError::Invalid {
                    reason: e.to_string(),
                })?;
                Ok((well, label.to_owned()))
            })
            .collect::<Result<Vec<_>, CyclerError>>()?;
        let map = PlateMap {
            plate_id: plate_id.to_owned(),
            format,
            wells,
        };
        map.validate()?;
        Ok(map)
    }
}

/// An inclusive range of cycles, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CycleRange {
    /// First cycle, at least 1.
    pub first: u32,
    /// Last cycle, at least `first`.
    pub last: u32,
}

impl CycleRange {
    /// A range, checked: `1 <= first <= last`.
    pub fn new(first: u32, last: u32) -> Result<CycleRange, CyclerError> {
        if first == 0 || first > last {
            return Err(CyclerError::Invalid {
                reason: format!("cycle range {first}..{last}: need 1 <= first <= last"),
            });
        }
        Ok(CycleRange { first, last })
    }

    fn parse(text: &str) -> Result<Option<CycleRange>, CyclerError> {
        let (first, last) = text.split_once(',').ok_or(CyclerError::BadShape {
            what: "cycle range",
            expected: "FIRST,LAST",
        })?;
        let (first, last) = (parse_u32("cycle", first)?, parse_u32("cycle", last)?);
        if (first, last) == (0, 0) {
            return Ok(None);
        }
        CycleRange::new(first, last).map(Some)
    }
}

/// The instrument's answer to `*IDN?` (IEEE 488.2 §10.14: four comma-separated fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Manufacturer.
    pub maker: String,
    /// Model.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// Firmware version.
    pub firmware: String,
}

/// What the instrument is doing, from the status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Nothing loaded or running.
    Idle,
    /// Loaded, waiting for start.
    Loaded,
    /// A run is under way.
    Running,
    /// The last run completed.
    Completed,
    /// The last run was aborted.
    Aborted,
    /// Stopped on an instrument fault.
    Error,
}

impl RunState {
    const ALL: [RunState; 6] = [
        RunState::Idle,
        RunState::Loaded,
        RunState::Running,
        RunState::Completed,
        RunState::Aborted,
        RunState::Error,
    ];

    /// The dialect's word for this state.
    pub fn word(self, dialect: &Dialect) -> &str {
        let w = &dialect.states;
        match self {
            RunState::Idle => &w.idle,
            RunState::Loaded => &w.loaded,
            RunState::Running => &w.running,
            RunState::Completed => &w.completed,
            RunState::Aborted => &w.aborted,
            RunState::Error => &w.error,
        }
    }

    /// The state a word names in this dialect.
    pub fn from_word(word: &str, dialect: &Dialect) -> Option<RunState> {
        RunState::ALL
            .into_iter()
            .find(|s| s.word(dialect).eq_ignore_ascii_case(word))
    }
}

/// The lid, from the status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LidState {
    /// Open: no run can start.
    Open,
    /// Closed and heated.
    Closed,
    /// Opening or closing.
    Moving,
}

impl LidState {
    fn word(self) -> &'static str {
        match self {
            LidState::Open => "OPEN",
            LidState::Closed => "CLOSED",
            LidState::Moving => "MOVING",
        }
    }
}

/// The reply to the status query: `STATE,STAGE,CYCLE,LID,BLOCK_C`.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Run state.
    pub state: RunState,
    /// Current stage, 1-based; 0 when not running.
    pub stage: u32,
    /// Last completed data cycle; 0 before the first.
    pub cycle: u32,
    /// The lid.
    pub lid: LidState,
    /// Block temperature, °C.
    pub block_c: f64,
}

impl Status {
    /// The reply line's text.
    pub fn encode(&self, dialect: &Dialect) -> String {
        format!(
            "{},{},{},{},{}",
            self.state.word(dialect),
            self.stage,
            self.cycle,
            self.lid.word(),
            self.block_c
        )
    }

    /// Reads a status reply.
    pub fn parse(text: &str, dialect: &Dialect) -> Result<Status, CyclerError> {
        let fields: Vec<&str> = text.split(',').collect();
        let [state, stage, cycle, lid, block] = fields[..] else {
            return Err(unexpected("status", text, "STATE,STAGE,CYCLE,LID,BLOCK_C"));
        };
        let state = RunState::from_word(state, dialect)
            .ok_or_else(|| unexpected("status", text, "a run state word"))?;
        let lid = [LidState::Open, LidState::Closed, LidState::Moving]
            .into_iter()
            .find(|l| l.word().eq_ignore_ascii_case(lid))
            .ok_or_else(|| unexpected("status", text, "OPEN, CLOSED or MOVING"))?;
        Ok(Status {
            state,
            stage: parse_u32("stage", stage)?,
            cycle: parse_u32("cycle", cycle)?,
            lid,
            block_c: parse_f64(block)
                .ok_or_else(|| CyclerError::number("block temperature", block, "°C"))?,
        })
    }
}

/// An error the instrument reports: an `ERR` reply or an entry of its SCPI error queue.
/// Data for the caller to decide on, not a failure of the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceError {
    /// SCPI code: -1xx command, -2xx execution, -3xx device, -4xx query errors;
    /// positive codes are the vendor's (protocols.md §5).
    pub code: i32,
    /// The instrument's text.
    pub text: String,
}

impl DeviceError {
    /// `code,"text"`, with `"` inside the text doubled (SCPI string data).
    pub fn encode(&self) -> String {
        format!("{},\"{}\"", self.code, self.text.replace('"', "\"\""))
    }

    /// Reads `code,"text"`.
    pub fn parse(text: &str) -> Result<DeviceError, CyclerError> {
        let shape = CyclerError::BadShape {
            what: "error",
            expected: "CODE,\"TEXT\"",
        };
        let (code, quoted) = text.split_once(',').ok_or(shape.clone())?;
        let digits = code.strip_prefix('-').unwrap_or(code);
        let magnitude = parse_u32("error code", digits)?;
        let code = i32::try_from(magnitude)
            .map(|m| if code.starts_with('-') { -m } else { m })
            .map_err(|_| CyclerError::number("error code", code, "a 32-bit code"))?;
        let inner = quoted
            .strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .filter(|_| quoted.len() >= 2)
            .ok_or(shape.clone())?;
        // Inside, a quote only ever comes doubled.
        if inner.replace("\"\"", "").contains('"') {
            return Err(shape);
        }
        Ok(DeviceError {
            code,
            text: inner.replace("\"\"", "\""),
        })
    }
}

/// How a command may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How long to wait for the reply (or, for `DATA?`, between two lines).
    pub timeout: Duration,
    /// Attempts in all, including the first.
    pub attempts: u8,
    /// Whether sending it again can do no harm. When `false`, `attempts` is 1 and after
    /// a timeout the driver reads the state back (`STAT?`) instead of resending.
    pub resend_safe: bool,
}

/// The operations of a cycler, without their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `*IDN?`
    Identify,
    /// `*RST`
    Reset,
    /// `*CLS`
    ClearStatus,
    /// `*OPC?`
    OperationComplete,
    /// `SYST:ERR?`
    NextError,
    /// Status query.
    Status,
    /// Open the lid.
    LidOpen,
    /// Close the lid.
    LidClose,
    /// Load a plate map.
    LoadPlate,
    /// Load a thermal protocol.
    LoadProtocol,
    /// Start the run.
    Start,
    /// Abort the run.
    Abort,
    /// Fetch readings for a cycle range.
    FetchData,
}

/// Queries: answered quickly, retried (protocols.md §5: "queries may be retried").
const QUERY: Policy = Policy {
    timeout: Duration::from_secs(2),
    attempts: 3,
    resend_safe: true,
};

/// Start, abort, reset: one attempt, then read the state back (protocols.md §5: "start,
/// abort and lid commands are never resent blindly").
const ONCE: Policy = Policy {
    timeout: Duration::from_secs(10),
    attempts: 1,
    resend_safe: false,
};

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 13] = [
        Operation::Identify,
        Operation::Reset,
        Operation::ClearStatus,
        Operation::OperationComplete,
        Operation::NextError,
        Operation::Status,
        Operation::LidOpen,
        Operation::LidClose,
        Operation::LoadPlate,
        Operation::LoadProtocol,
        Operation::Start,
        Operation::Abort,
        Operation::FetchData,
    ];

    /// The command's policy.
    pub fn policy(self) -> Policy {
        match self {
            Operation::Identify
            | Operation::ClearStatus
            | Operation::OperationComplete
            | Operation::NextError
            | Operation::Status => QUERY,
            // Lid motors are slow: 40 s, as the Opentrons driver allows for M126/M127
            // (protocols.md §5). Never resent: read the lid state back.
            Operation::LidOpen | Operation::LidClose => Policy {
                timeout: Duration::from_secs(40),
                ..ONCE
            },
            // Loading the same plate map or protocol twice leaves the same state.
            Operation::LoadPlate | Operation::LoadProtocol => Policy {
                timeout: Duration::from_secs(5),
                attempts: 2,
                resend_safe: true,
            },
            Operation::Reset | Operation::Start | Operation::Abort => ONCE,
            // The replayed lines come first: the timeout runs between two lines.
            Operation::FetchData => Policy {
                timeout: Duration::from_secs(10),
                ..QUERY
            },
        }
    }

    /// Whether the command asks a question (its word ends in `?`) and so always
    /// gets a reply, whatever the dialect's `ack`.
    pub fn is_query(self, dialect: &Dialect) -> bool {
        self.word(dialect).ends_with('?')
    }

    /// Whether a reply line is expected: always for a query, and for other commands
    /// when the dialect acknowledges them.
    pub fn expects_reply(self, dialect: &Dialect) -> bool {
        self.is_query(dialect) || dialect.ack.is_some()
    }

    /// The dialect's command word.
    pub fn word(self, dialect: &Dialect) -> &str {
        let c = &dialect.commands;
        match self {
            Operation::Identify => &c.identify,
            Operation::Reset => &c.reset,
            Operation::ClearStatus => &c.clear_status,
            Operation::OperationComplete => &c.operation_complete,
            Operation::NextError => &c.next_error,
            Operation::Status => &c.status,
            Operation::LidOpen => &c.lid_open,
            Operation::LidClose => &c.lid_close,
            Operation::LoadPlate => &c.load_plate,
            Operation::LoadProtocol => &c.load_protocol,
            Operation::Start => &c.start,
            Operation::Abort => &c.abort,
            Operation::FetchData => &c.fetch_data,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Operation::Identify => "identify",
            Operation::Reset => "reset",
            Operation::ClearStatus => "clear status",
            Operation::OperationComplete => "operation complete",
            Operation::NextError => "next error",
            Operation::Status => "status",
            Operation::LidOpen => "lid open",
            Operation::LidClose => "lid close",
            Operation::LoadPlate => "load plate",
            Operation::LoadProtocol => "load protocol",
            Operation::Start => "start",
            Operation::Abort => "abort",
            Operation::FetchData => "fetch data",
        }
    }
}

fn unexpected(command: &'static str, text: &str, expected: &'static str) -> CyclerError {
    CyclerError::UnexpectedReply {
        command,
        text: echo(text),
        expected,
    }
}

/// Any command, with its data: what the driver sends and the simulator receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `*IDN?`
    Identify,
    /// `*RST`
    Reset,
    /// `*CLS`
    ClearStatus,
    /// `*OPC?`
    OperationComplete,
    /// `SYST:ERR?`
    NextError,
    /// Status query.
    Status,
    /// Open the lid.
    LidOpen,
    /// Close the lid.
    LidClose,
    /// Load a plate map.
    LoadPlate(PlateMap),
    /// Load a thermal protocol.
    LoadProtocol(ThermalProtocol),
    /// Start the loaded protocol.
    Start,
    /// Abort the run.
    Abort,
    /// Fetch readings for a cycle range.
    FetchData(CycleRange),
}

impl Command {
    /// The operation, without data.
    pub fn operation(&self) -> Operation {
        match self {
            Command::Identify => Operation::Identify,
            Command::Reset => Operation::Reset,
            Command::ClearStatus => Operation::ClearStatus,
            Command::OperationComplete => Operation::OperationComplete,
            Command::NextError => Operation::NextError,
            Command::Status => Operation::Status,
            Command::LidOpen => Operation::LidOpen,
            Command::LidClose => Operation::LidClose,
            Command::LoadPlate(_) => Operation::LoadPlate,
            Command::LoadProtocol(_) => Operation::LoadProtocol,
            Command::Start => Operation::Start,
            Command::Abort => Operation::Abort,
            Command::FetchData(_) => Operation::FetchData,
        }
    }

    /// The command's policy.
    pub fn policy(&self) -> Policy {
        self.operation().policy()
    }

    /// The command as one line in `dialect`. Refuses data that does not validate.
    pub fn encode(&self, dialect: &Dialect) -> Result<Line, CyclerError> {
        let word = self.operation().word(dialect);
        let text = match self {
            Command::LoadPlate(map) => {
                map.validate()?;
                format!("{word} {}", map.encode_params())
            }
            Command::LoadProtocol(protocol) => {
                protocol.validate()?;
                format!("{word} {}", protocol.encode_params())
            }
            Command::FetchData(range) => {
                CycleRange::new(range.first, range.last)?;
                format!("{word} {},{}", range.first, range.last)
            }
            _ => word.to_owned(),
        };
        Ok(Line::new(&text, MAX_LINE_LEN)?)
    }

    /// Reads a command line (the simulator's side). Command words are matched
    /// case-insensitively, as SCPI does.
    pub fn parse(line: &str, dialect: &Dialect) -> Result<Command, CyclerError> {
        let (word, params) = match line.split_once(' ') {
            Some((w, p)) => (w, Some(p)),
            None => (line, None),
        };
        let operation = Operation::ALL
            .into_iter()
            .find(|op| op.word(dialect).eq_ignore_ascii_case(word))
            .ok_or_else(|| CyclerError::UnknownCommand { word: echo(word) })?;
        let no_params = |command: Command| match params {
            None => Ok(command),
            Some(_) => Err(CyclerError::BadShape {
                what: operation.name(),
                expected: "no parameters",
            }),
        };
        let params = || {
            params.ok_or(CyclerError::BadShape {
                what: operation.name(),
                expected: "parameters after one space",
            })
        };
        match operation {
            Operation::Identify => no_params(Command::Identify),
            Operation::Reset => no_params(Command::Reset),
            Operation::ClearStatus => no_params(Command::ClearStatus),
            Operation::OperationComplete => no_params(Command::OperationComplete),
            Operation::NextError => no_params(Command::NextError),
            Operation::Status => no_params(Command::Status),
            Operation::LidOpen => no_params(Command::LidOpen),
            Operation::LidClose => no_params(Command::LidClose),
            Operation::Start => no_params(Command::Start),
            Operation::Abort => no_params(Command::Abort),
            Operation::LoadPlate => PlateMap::parse_params(params()?).map(Command::LoadPlate),
            Operation::LoadProtocol => {
                ThermalProtocol::parse_params(params()?).map(Command::LoadProtocol)
            }
            Operation::FetchData => match CycleRange::parse(params()?)? {
                Some(range) => Ok(Command::FetchData(range)),
                None => Err(CyclerError::Invalid {
                    reason: "cycle range 0,0: need 1 <= first <= last".to_owned(),
                }),
            },
        }
    }
}

/// A command as a type (FactbirdHQ/atat style): it knows its operation, its policy,
/// its line, and how to read its reply.
pub trait CyclerCommand {
    /// What a successful reply means.
    type Response;
    /// The operation.
    const OPERATION: Operation;

    /// The command with its data.
    fn to_command(&self) -> Command;

    /// Reads the reply line's text (already told apart from events and `ERR` replies by
    /// [`super::message::parse_incoming`]).
    fn parse_response(&self, reply: &str, dialect: &Dialect)
    -> Result<Self::Response, CyclerError>;

    /// Timeout, attempts, resend safety.
    fn policy(&self) -> Policy {
        Self::OPERATION.policy()
    }

    /// The command as one line.
    fn encode(&self, dialect: &Dialect) -> Result<Line, CyclerError> {
        self.to_command().encode(dialect)
    }
}

fn parse_ack(op: Operation, reply: &str, dialect: &Dialect) -> Result<(), CyclerError> {
    match &dialect.ack {
        Some(ack) if ack == reply => Ok(()),
        _ => Err(unexpected(op.name(), reply, "the acknowledgement")),
    }
}

macro_rules! ack_command {
    ($(#[$doc:meta] $name:ident => $op:ident),* $(,)?) => {$(
        #[$doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name;

        impl CyclerCommand for $name {
            type Response = ();
            const OPERATION: Operation = Operation::$op;

            fn to_command(&self) -> Command {
                Command::$op
            }

            fn parse_response(&self, reply: &str, dialect: &Dialect) -> Result<(), CyclerError> {
                parse_ack(Self::OPERATION, reply, dialect)
            }
        }
    )*};
}

ack_command! {
    /// `*RST`: back to the power-on state (aborts a run). Answered with the ack.
    Reset => Reset,
    /// `*CLS`: clears the error queue and status registers.
    ClearStatus => ClearStatus,
    /// Opens the lid; read the lid back with `STAT?` after a timeout.
    LidOpen => LidOpen,
    /// Closes the lid; read the lid back with `STAT?` after a timeout.
    LidClose => LidClose,
    /// Starts the loaded protocol; never resent: read `STAT?` after a timeout.
    Start => Start,
    /// Aborts the run; never resent: read `STAT?` after a timeout.
    Abort => Abort,
}

/// `*IDN?`: who the instrument is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Identify;

impl CyclerCommand for Identify {
    type Response = Identity;
    const OPERATION: Operation = Operation::Identify;

    fn to_command(&self) -> Command {
        Command::Identify
    }

    fn parse_response(&self, reply: &str, _: &Dialect) -> Result<Identity, CyclerError> {
        let fields: Vec<&str> = reply.split(',').map(str::trim).collect();
        match fields[..] {
            [maker, model, serial, firmware] if !maker.is_empty() && !model.is_empty() => {
                Ok(Identity {
                    maker: maker.to_owned(),
                    model: model.to_owned(),
                    serial: serial.to_owned(),
                    firmware: firmware.to_owned(),
                })
            }
            _ => Err(unexpected("identify", reply, "MAKER,MODEL,SERIAL,FIRMWARE")),
        }
    }
}

/// `*OPC?`: answered `1` once pending operations are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OperationComplete;

impl CyclerCommand for OperationComplete {
    type Response = ();
    const OPERATION: Operation = Operation::OperationComplete;

    fn to_command(&self) -> Command {
        Command::OperationComplete
    }

    fn parse_response(&self, reply: &str, _: &Dialect) -> Result<(), CyclerError> {
        if reply == "1" {
            Ok(())
        } else {
            Err(unexpected("operation complete", reply, "1"))
        }
    }
}

/// `SYST:ERR?`: pops the oldest error; `None` when the queue is empty (`0,"No error"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NextError;

impl CyclerCommand for NextError {
    type Response = Option<DeviceError>;
    const OPERATION: Operation = Operation::NextError;

    fn to_command(&self) -> Command {
        Command::NextError
    }

    fn parse_response(&self, reply: &str, _: &Dialect) -> Result<Option<DeviceError>, CyclerError> {
        let error = DeviceError::parse(reply)?;
        Ok((error.code != 0).then_some(error))
    }
}

/// The status query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GetStatus;

impl CyclerCommand for GetStatus {
    type Response = Status;
    const OPERATION: Operation = Operation::Status;

    fn to_command(&self) -> Command {
        Command::Status
    }

    fn parse_response(&self, reply: &str, dialect: &Dialect) -> Result<Status, CyclerError> {
        Status::parse(reply, dialect)
    }
}

/// Loads a plate map. Answered with the ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlate(pub PlateMap);

impl CyclerCommand for LoadPlate {
    type Response = ();
    const OPERATION: Operation = Operation::LoadPlate;

    fn to_command(&self) -> Command {
        Command::LoadPlate(self.0.clone())
    }

    fn parse_response(&self, reply: &str, dialect: &Dialect) -> Result<(), CyclerError> {
        parse_ack(Self::OPERATION, reply, dialect)
    }
}

/// Loads a thermal protocol. Answered with the ack.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadProtocol(pub ThermalProtocol);

impl CyclerCommand for LoadProtocol {
    type Response = ();
    const OPERATION: Operation = Operation::LoadProtocol;

    fn to_command(&self) -> Command {
        Command::LoadProtocol(self.0.clone())
    }

    fn parse_response(&self, reply: &str, dialect: &Dialect) -> Result<(), CyclerError> {
        parse_ack(Self::OPERATION, reply, dialect)
    }
}

/// Fetches readings: the instrument replays one `!CYCLE` line per cycle and channel in
/// the range it has, then replies with the range it sent (`0,0`, read as `None`, when it
/// has none of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchData(pub CycleRange);

impl CyclerCommand for FetchData {
    type Response = Option<CycleRange>;
    const OPERATION: Operation = Operation::FetchData;

    fn to_command(&self) -> Command {
        Command::FetchData(self.0)
    }

    fn parse_response(&self, reply: &str, _: &Dialect) -> Result<Option<CycleRange>, CyclerError> {
        let sent = CycleRange::parse(reply)
            .map_err(|_| unexpected("fetch data", reply, "FIRST,LAST or 0,0"))?;
        match sent {
            Some(r) if r.first < self.0.first || r.last > self.0.last => Err(unexpected(
                "fetch data",
                reply,
                "a range inside the one asked for",
            )),
            other => Ok(other),
        }
    }
}

/// A reply read for the [`Command`] it answers (the untyped counterpart of
/// [`CyclerCommand::parse_response`], for a driver that queues [`Command`] values).
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// The acknowledgement of a command that returns nothing.
    Ack,
    /// The reply to `*IDN?`.
    Identity(Identity),
    /// `*OPC?` answered `1`.
    Complete,
    /// The reply to `SYST:ERR?`: `None` when the queue is empty.
    NextError(Option<DeviceError>),
    /// The reply to the status query.
    Status(Status),
    /// The range `DATA?` sent, `None` when it had none of it.
    Fetched(Option<CycleRange>),
}

impl Command {
    /// Reads the reply line's text as the answer to this command.
    pub fn parse_reply(&self, reply: &str, dialect: &Dialect) -> Result<Response, CyclerError> {
        match self {
            Command::Identify => Identify
                .parse_response(reply, dialect)
                .map(Response::Identity),
            Command::OperationComplete => OperationComplete
                .parse_response(reply, dialect)
                .map(|()| Response::Complete),
            Command::NextError => NextError
                .parse_response(reply, dialect)
                .map(Response::NextError),
            Command::Status => GetStatus
                .parse_response(reply, dialect)
                .map(Response::Status),
            Command::FetchData(range) => FetchData(*range)
                .parse_response(reply, dialect)
                .map(Response::Fetched),
            _ => parse_ack(self.operation(), reply, dialect).map(|()| Response::Ack),
        }
    }
}
