//! What the instrument sends: replies, error replies, and unsolicited event lines, told
//! apart by their first word.

use super::command::{Channel, DeviceError, RunState, check_name, parse_u32};
use super::dialect::Dialect;
use super::error::{CyclerError, Rejected};
use super::line::{Line, MAX_LINE_LEN};
use crate::echo;

/// One cycle's raw fluorescence for one channel: one reading per well of the plate,
/// column-major (A1, B1, .., H1, A2, ..).
#[derive(Debug, Clone, PartialEq)]
pub struct CycleData {
    /// Data cycle, 1-based.
    pub cycle: u32,
    /// The channel read.
    pub channel: Channel,
    /// Raw readings, finite.
    pub values: Vec<f64>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every stage ran.
    Completed,
    /// Stopped by an abort command or a fault.
    Aborted,
}

/// A fault the instrument reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// The lid was opened (or found open) during a run.
    LidOpened,
    /// The block went above its safe temperature.
    BlockOverTemperature,
    /// The excitation lamp or LED failed: readings are not trustworthy.
    LampFault,
    /// A fault word the dialect does not name.
    Other(String),
}

/// An unsolicited line.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A run started with the named protocol.
    RunStarted {
        /// The protocol's name.
        protocol: String,
    },
    /// The run entered a stage (1-based).
    StageChanged {
        /// The stage.
        stage: u32,
    },
    /// A data cycle's readings for one channel.
    Cycle(CycleData),
    /// The run ended after `cycles` data cycles.
    RunFinished {
        /// How.
        outcome: Outcome,
        /// Data cycles the instrument completed.
        cycles: u32,
    },
    /// The instrument reports a fault.
    Fault {
        /// Which.
        kind: FaultKind,
        /// The instrument's words, possibly empty.
        detail: String,
    },
}

/// A line from the instrument, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The reply to the command in flight (its text; see
    /// [`super::command::CyclerCommand::parse_response`]).
    Reply(String),
    /// The command in flight failed: `ERR code,"text"`.
    Error(DeviceError),
    /// An unsolicited event.
    Event(Event),
}

/// Tells a line apart and parses it. A line starting with the event marker is an
/// event; one starting with the error word and a space is an error reply; anything else
/// is a reply. A refused line comes back whole in [`Rejected`].
pub fn parse_incoming(line: &str, dialect: &Dialect) -> Result<Incoming, Rejected> {
    let reject = |error| Rejected {
        line: line.to_owned(),
        error,
    };
    if !dialect.event_marker.is_empty() && line.starts_with(&dialect.event_marker) {
        return parse_event(line, dialect)
            .map(Incoming::Event)
            .map_err(reject);
    }
    if let Some(rest) = line
        .strip_prefix(dialect.error_word.as_str())
        .and_then(|r| r.strip_prefix(' '))
    {
        return DeviceError::parse(rest)
            .map(Incoming::Error)
            .map_err(reject);
    }
    Ok(Incoming::Reply(line.to_owned()))
}

fn parse_event(line: &str, dialect: &Dialect) -> Result<Event, CyclerError> {
    let (word, rest) = match line.split_once(' ') {
        Some((w, r)) => (w, Some(r)),
        None => (line, None),
    };
    let e = &dialect.events;
    let rest = |expected: &'static str| {
        rest.ok_or(CyclerError::BadShape {
            what: "event",
            expected,
        })
    };
    if word == e.run_started {
        let protocol = rest("!STARTED PROTOCOL")?;
        check_name("protocol name", protocol)?;
        Ok(Event::RunStarted {
            protocol: protocol.to_owned(),
        })
    } else if word == e.stage {
        let stage = parse_u32("stage", rest("!STAGE N")?)?;
        Ok(Event::StageChanged { stage })
    } else if word == e.cycle {
        parse_cycle(rest("!CYCLE N CHANNEL COUNT V1,V2,..")?).map(Event::Cycle)
    } else if word == e.finished {
        let expected = "!FINISHED COMPLETED|ABORTED CYCLES";
        let (outcome, cycles) = rest(expected)?
            .split_once(' ')
            .ok_or(CyclerError::BadShape {
                what: "event",
                expected,
            })?;
        let outcome = match RunState::from_word(outcome, dialect) {
            Some(RunState::Completed) => Outcome::Completed,
            Some(RunState::Aborted) => Outcome::Aborted,
            _ => {
                return Err(CyclerError::BadShape {
                    what: "run outcome",
                    expected,
                });
            }
        };
        Ok(Event::RunFinished {
            outcome,
            cycles: parse_u32("cycles", cycles)?,
        })
    } else if word == e.fault {
        let rest = rest("!FAULT KIND [DETAIL]")?;
        let (kind, detail) = rest.split_once(' ').unwrap_or((rest, ""));
        let f = &dialect.faults;
        let kind = if kind == f.lid_opened {
            FaultKind::LidOpened
        } else if kind == f.block_over_temperature {
            FaultKind::BlockOverTemperature
        } else if kind == f.lamp_fault {
            FaultKind::LampFault
        } else {
            check_name("fault", kind)?;
            FaultKind::Other(kind.to_owned())
        };
        Ok(Event::Fault {
            kind,
            detail: detail.to_owned(),
        })
    } else {
        Err(CyclerError::UnknownEvent { word: echo(word) })
    }
}

fn parse_cycle(rest: &str) -> Result<CycleData, CyclerError> {
    let shape = CyclerError::BadShape {
        what: "cycle event",
        expected: "!CYCLE N CHANNEL COUNT V1,V2,..",
    };
    let mut words = rest.split(' ');
    let (Some(cycle), Some(channel), Some(count), Some(values), None) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return Err(shape);
    };
    let cycle = parse_u32("cycle", cycle)?;
    if cycle == 0 {
        return Err(CyclerError::number("cycle", "0", "a cycle from 1"));
    }
    let channel = Channel::new(channel)?;
    let declared = parse_u32("reading count", count)? as usize;
    let mut parsed = Vec::with_capacity(declared.min(MAX_LINE_LEN));
    for (index, text) in values.split(',').enumerate() {
        let value = text
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| CyclerError::BadReading {
                index,
                well: index + 1,
                text: echo(text),
            })?;
        parsed.push(value);
    }
    if parsed.len() != declared {
        return Err(CyclerError::CountMismatch {
            declared,
            found: parsed.len(),
        });
    }
    Ok(CycleData {
        cycle,
        channel,
        values: parsed,
    })
}

/// An event as one line (the simulator's side).
pub fn encode_event(event: &Event, dialect: &Dialect) -> Result<Line, CyclerError> {
    let e = &dialect.events;
    let text = match event {
        Event::RunStarted { protocol } => {
            check_name("protocol name", protocol)?;
            format!("{} {protocol}", e.run_started)
        }
        Event::StageChanged { stage } => format!("{} {stage}", e.stage),
        Event::Cycle(data) => {
            if data.cycle == 0 {
                return Err(CyclerError::number("cycle", "0", "a cycle from 1"));
            }
            if data.values.is_empty() {
                return Err(CyclerError::Invalid {
                    reason: "a cycle line carries at least one reading".to_owned(),
                });
            }
            let mut text = format!(
                "{} {} {} {} ",
                e.cycle,
                data.cycle,
                data.channel,
                data.values.len()
            );
            for (i, v) in data.values.iter().enumerate() {
                if !v.is_finite() {
                    return Err(CyclerError::BadReading {
                        index: i,
                        well: i + 1,
                        text: v.to_string(),
                    });
                }
                if i > 0 {
                    text.push(',');
                }
                text.push_str(&v.to_string());
            }
            text
        }
        Event::RunFinished { outcome, cycles } => {
            let state = match outcome {
                Outcome::Completed => RunState::Completed,
                Outcome::Aborted => RunState::Aborted,
            };
            format!("{} {} {cycles}", e.finished, state.word(dialect))
        }
        Event::Fault { kind, detail } => {
            let f = &dialect.faults;
            let kind = match kind {
                FaultKind::LidOpened => f.lid_opened.as_str(),
                FaultKind::BlockOverTemperature => f.block_over_temperature.as_str(),
                FaultKind::LampFault => f.lamp_fault.as_str(),
                FaultKind::Other(word) => {
                    check_name("fault", word)?;
                    word.as_str()
                }
            };
            if detail.is_empty() {
                format!("{} {kind}", e.fault)
            } else {
                format!("{} {kind} {detail}", e.fault)
            }
        }
    };
    Ok(Line::new(&text, MAX_LINE_LEN)?)
}

/// An error reply as one line: `ERR code,"text"`.
pub fn encode_error(error: &DeviceError, dialect: &Dialect) -> Result<Line, CyclerError> {
    Ok(Line::new(
        &format!("{} {}", dialect.error_word, error.encode()),
        MAX_LINE_LEN,
    )?)
}

/// A reply as one line. Refuses text a parser would take for an event or an error
/// reply, so a reply can never be misread.
pub fn encode_reply(text: &str, dialect: &Dialect) -> Result<Line, CyclerError> {
    let looks_like_error = text
        .strip_prefix(dialect.error_word.as_str())
        .is_some_and(|r| r.starts_with(' '));
    let looks_like_event =
        !dialect.event_marker.is_empty() && text.starts_with(&dialect.event_marker);
    if looks_like_error || looks_like_event {
        return Err(CyclerError::Invalid {
            reason: format!("reply {:?} would be read as an event or error", echo(text)),
        });
    }
    Ok(Line::new(text, MAX_LINE_LEN)?)
}
