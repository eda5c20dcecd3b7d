//! Dialects: the words an instrument uses for each operation and the prefixes that mark
//! its unsolicited lines, as data. Another instrument's command set is a new [`Dialect`]
//! (a TOML profile deserialises into one) plus, where its lines differ in shape and not
//! only in words, a small [`Adapter`] that rewrites lines on their way in and out.

use serde::Deserialize;

use super::error::CyclerError;

/// The command word (header) an instrument uses for each operation. Parameters follow
/// after one space, as in SCPI.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandWords {
    /// IEEE 488.2 identification query (`*IDN?`).
    pub identify: String,
    /// IEEE 488.2 reset (`*RST`).
    pub reset: String,
    /// IEEE 488.2 clear status (`*CLS`).
    pub clear_status: String,
    /// IEEE 488.2 operation-complete query (`*OPC?`).
    pub operation_complete: String,
    /// SCPI error-queue query (`SYST:ERR?`).
    pub next_error: String,
    /// Status query.
    pub status: String,
    /// Open the lid.
    pub lid_open: String,
    /// Close the lid.
    pub lid_close: String,
    /// Load a plate map.
    pub load_plate: String,
    /// Load a thermal protocol.
    pub load_protocol: String,
    /// Start the loaded protocol.
    pub start: String,
    /// Abort the run.
    pub abort: String,
    /// Fetch readings for a cycle range.
    pub fetch_data: String,
}

/// The first word of each unsolicited event line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventWords {
    /// A run started.
    pub run_started: String,
    /// The run entered another stage.
    pub stage: String,
    /// One cycle's readings for one channel.
    pub cycle: String,
    /// The run finished (completed or aborted).
    pub finished: String,
    /// The instrument reports a fault.
    pub fault: String,
}

/// The words for the faults pcrd knows by name; anything else is kept as text.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultWords {
    /// The lid was opened (or found open) during a run.
    pub lid_opened: String,
    /// The block went above its safe temperature.
    pub block_over_temperature: String,
    /// The excitation lamp or LED failed.
    pub lamp_fault: String,
}

/// Run-state words of the status reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateWords {
    /// Nothing loaded or running.
    pub idle: String,
    /// Plate map and protocol loaded; waiting for start.
    pub loaded: String,
    /// A run is under way.
    pub running: String,
    /// The last run completed.
    pub completed: String,
    /// The last run was aborted.
    pub aborted: String,
    /// Stopped on an instrument fault.
    pub error: String,
}

/// An instrument's command set as data.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dialect {
    /// A name for logs and configuration (`pcrd-ref-1`).
    pub name: String,
    /// Command words.
    pub commands: CommandWords,
    /// Event words. Every one must start with [`Dialect::event_marker`].
    pub events: EventWords,
    /// Fault words in the fault event.
    pub faults: FaultWords,
    /// Run-state words in the status reply.
    pub states: StateWords,
    /// Marks an unsolicited line (`!` in pcrd's reference dialect). A line starting with
    /// it is never a reply.
    pub event_marker: String,
    /// Starts an error reply (`ERR` in pcrd's reference dialect), followed by a space,
    /// the code, a comma and the quoted text.
    pub error_word: String,
    /// The reply to a command that returns nothing (`OK`). `None` for an instrument that,
    /// like plain SCPI, stays silent: the driver then asks `SYST:ERR?` instead.
    pub ack: Option<String>,
}

impl Dialect {
    /// pcrd's reference dialect, `pcrd-ref-1`, as docs/cycler-protocol.md describes it.
    pub fn reference() -> Dialect {
        let s = |t: &str| t.to_owned();
        Dialect {
            name: s("pcrd-ref-1"),
            commands: CommandWords {
                identify: s("*IDN?"),
                reset: s("*RST"),
                clear_status: s("*CLS"),
                operation_complete: s("*OPC?"),
                next_error: s("SYST:ERR?"),
                status: s("STAT?"),
                lid_open: s("LID:OPEN"),
                lid_close: s("LID:CLOSE"),
                load_plate: s("PLATE:LOAD"),
                load_protocol: s("PROT:LOAD"),
                start: s("RUN:START"),
                abort: s("RUN:ABORT"),
                fetch_data: s("DATA?"),
            },
            events: EventWords {
                run_started: s("!STARTED"),
                stage: s("!STAGE"),
                cycle: s("!CYCLE"),
                finished: s("!FINISHED"),
                fault: s("!FAULT"),
            },
            faults: FaultWords {
                lid_opened: s("LID_OPEN"),
                block_over_temperature: s("BLOCK_OVERTEMP"),
                lamp_fault: s("LAMP"),
            },
            states: StateWords {
                idle: s("IDLE"),
                loaded: s("LOADED"),
                running: s("RUNNING"),
                completed: s("COMPLETED"),
                aborted: s("ABORTED"),
                error: s("ERROR"),
            },
            event_marker: s("!"),
            error_word: s("ERR"),
            ack: Some(s("OK")),
        }
    }
}

impl Dialect {
    /// Checks a profile can be used: every word non-empty and without spaces, command
    /// words distinct, every event word starting with the event marker, and no reply
    /// word (the ack, a run state) that would be read as an event or an error.
    pub fn validate(&self) -> Result<(), CyclerError> {
        let invalid = |reason: String| {
            Err(CyclerError::Invalid {
                reason: format!("dialect {}: {reason}", self.name),
            })
        };
        let c = &self.commands;
        let commands = [
            &c.identify,
            &c.reset,
            &c.clear_status,
            &c.operation_complete,
            &c.next_error,
            &c.status,
            &c.lid_open,
            &c.lid_close,
            &c.load_plate,
            &c.load_protocol,
            &c.start,
            &c.abort,
            &c.fetch_data,
        ];
        let e = &self.events;
        let events = [&e.run_started, &e.stage, &e.cycle, &e.finished, &e.fault];
        let f = &self.faults;
        let s = &self.states;
        let replies = [
            &f.lid_opened,
            &f.block_over_temperature,
            &f.lamp_fault,
            &s.idle,
            &s.loaded,
            &s.running,
            &s.completed,
            &s.aborted,
            &s.error,
        ];
        let all = commands
            .iter()
            .chain(&events)
            .chain(&replies)
            .map(|w| w.as_str())
            .chain(std::iter::once(self.error_word.as_str()))
            .chain(self.ack.as_deref());
        for word in all {
            if word.is_empty() || !word.bytes().all(|b| b.is_ascii_graphic()) {
                return invalid(format!("{word:?} must be printable ASCII without spaces"));
            }
        }
        if self.event_marker.is_empty() || !self.event_marker.bytes().all(|b| b.is_ascii_graphic())
        {
            return invalid("the event marker must be printable ASCII without spaces".into());
        }
        for (i, a) in commands.iter().enumerate() {
            if commands[i + 1..].iter().any(|b| a.eq_ignore_ascii_case(b)) {
                return invalid(format!("command word {a:?} is used twice"));
            }
        }
        for (i, a) in events.iter().enumerate() {
            if !a.starts_with(&self.event_marker) {
                return invalid(format!("event word {a:?} must start with the event marker"));
            }
            if events[i + 1..].contains(a) {
                return invalid(format!("event word {a:?} is used twice"));
            }
        }
        let misread = |w: &str| w.starts_with(&self.event_marker) || w == self.error_word;
        if let Some(word) = replies
            .iter()
            .map(|w| w.as_str())
            .chain(self.ack.as_deref())
            .find(|w| misread(w))
        {
            return invalid(format!(
                "reply word {word:?} would be read as an event or error"
            ));
        }
        Ok(())
    }
}

/// Rewrites lines for an instrument whose lines differ from a [`Dialect`] in shape, not
/// only in words (an echo of each command before its reply, a trailing ` OK`, …). Both
/// methods are pure; the defaults change nothing.
pub trait Adapter {
    /// A line from the instrument, before it is classified. `None` drops it (an echo).
    fn inbound<'a>(&mut self, line: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        Some(std::borrow::Cow::Borrowed(line))
    }

    /// A command line pcrd encoded, before it is sent.
    fn outbound(&mut self, line: String) -> String {
        line
    }
}

/// The adapter of a dialect that needs none (pcrd's reference dialect).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAdapter;

impl Adapter for NoAdapter {}
