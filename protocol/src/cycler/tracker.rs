//! The run tracker: checks the stream of events of one run so that a curve never has a
//! silent gap. Per-cycle data must come in order — every channel of cycle n (in any
//! order) before any of cycle n+1 — with the plate's number of wells; a repeat of the
//! last cycle is accepted only if identical.

use super::command::{Channel, PlateMap, ThermalProtocol};
use super::message::{CycleData, Event, Outcome};

/// What the tracker made of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracked {
    /// New readings: store them. `cycle_complete` when every channel of the cycle is in.
    Accepted {
        /// The cycle.
        cycle: u32,
        /// Whether this completed the cycle.
        cycle_complete: bool,
    },
    /// An identical repeat of readings already accepted (a replay after a reconnect):
    /// nothing to store.
    Duplicate {
        /// The cycle.
        cycle: u32,
    },
    /// A new run started: the tracker was reset.
    RunStarted,
    /// The run ended with every data cycle it reports received.
    RunFinished {
        /// How it ended.
        outcome: Outcome,
    },
    /// Any other event; nothing for the tracker to check.
    Passed,
}

/// Why the tracker refused an event. The caller keeps the line it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrackError {
    /// The line carries a different number of readings than the plate has wells: the
    /// wrong plate map is loaded, or readings were lost.
    #[error("cycle {cycle} {channel}: {found} readings for a {expected}-well plate")]
    WrongWellCount {
        /// The cycle.
        cycle: u32,
        /// The channel.
        channel: String,
        /// Wells on the plate.
        expected: usize,
        /// Readings in the line.
        found: usize,
    },
    /// A channel the protocol does not read.
    #[error("cycle {cycle}: channel {channel} is not read by this run")]
    UnknownChannel {
        /// The cycle.
        cycle: u32,
        /// The channel.
        channel: String,
    },
    /// A cycle older than the last one received: a replay of old data or a confused
    /// instrument. Fetch the range explicitly instead.
    #[error("cycle {found} arrived after cycle {last}: cycles must not go backwards")]
    Backwards {
        /// The newest cycle received.
        last: u32,
        /// The cycle in the line.
        found: u32,
    },
    /// Cycles or channels were skipped: fetch `expected..found` with `DATA?`.
    #[error("cycle {found} arrived but cycle {expected} is incomplete{}", missing_text(.missing))]
    Gap {
        /// The first cycle not complete.
        expected: u32,
        /// The cycle in the line.
        found: u32,
        /// Channels of `expected` still missing (empty when none of it arrived).
        missing: Vec<String>,
    },
    /// Readings for a cycle and channel already received, but different: the
    /// instrument's data changed under us; neither copy can be trusted without a look.
    #[error("cycle {cycle} {channel} repeated with different readings")]
    Conflict {
        /// The cycle.
        cycle: u32,
        /// The channel.
        channel: String,
    },
    /// The run reports more data cycles than arrived, or ended mid-cycle: fetch the rest.
    #[error("run finished after {reported} cycles but {received} complete cycles arrived")]
    MissingCycles {
        /// Data cycles the instrument reports.
        reported: u32,
        /// Complete cycles received.
        received: u32,
    },
}

fn missing_text(missing: &[String]) -> String {
    if missing.is_empty() {
        String::new()
    } else {
        format!(" (missing {})", missing.join(", "))
    }
}

/// Per-run state: the last complete cycle, its readings (to recognise an identical
/// repeat), and the cycle in progress.
#[derive(Debug, Clone)]
pub struct RunTracker {
    wells: usize,
    channels: Vec<Channel>,
    last_complete: u32,
    /// Readings of `last_complete`, per channel (same order as `channels`).
    last: Vec<Vec<f64>>,
    /// The cycle being received and what has arrived of it.
    current: Option<(u32, Vec<Option<Vec<f64>>>)>,
}

impl RunTracker {
    /// A tracker for `wells` readings per line and these channels.
    pub fn new(wells: usize, channels: Vec<Channel>) -> RunTracker {
        RunTracker {
            wells,
            channels,
            last_complete: 0,
            last: Vec::new(),
            current: None,
        }
    }

    /// A tracker for a run of this plate map and protocol.
    pub fn for_run(plate: &PlateMap, protocol: &ThermalProtocol) -> RunTracker {
        RunTracker::new(plate.well_count(), protocol.channels.clone())
    }

    /// A tracker that already holds cycles `1..=cycles` (from the store, after a
    /// restart): the next cycle accepted is `cycles + 1`. An identical repeat of cycle
    /// `cycles` cannot be recognised, so it is refused as going backwards.
    pub fn resume_after(mut self, cycles: u32) -> RunTracker {
        self.last_complete = cycles;
        self.last.clear();
        self.current = None;
        self
    }

    /// The last cycle with every channel received (0: none).
    pub fn last_complete_cycle(&self) -> u32 {
        self.last_complete
    }

    /// Checks an event against the run so far and records it.
    pub fn observe(&mut self, event: &Event) -> Result<Tracked, TrackError> {
        match event {
            Event::RunStarted { .. } => {
                self.last_complete = 0;
                self.last.clear();
                self.current = None;
                Ok(Tracked::RunStarted)
            }
            Event::Cycle(data) => self.cycle(data),
            Event::RunFinished { outcome, cycles } => {
                if self.current.is_some() || *cycles != self.last_complete {
                    return Err(TrackError::MissingCycles {
                        reported: *cycles,
                        received: self.last_complete,
                    });
                }
                Ok(Tracked::RunFinished { outcome: *outcome })
            }
            Event::StageChanged { .. } | Event::Fault { .. } => Ok(Tracked::Passed),
        }
    }

    fn cycle(&mut self, data: &CycleData) -> Result<Tracked, TrackError> {
        let cycle = data.cycle;
        let channel = || data.channel.as_str().to_owned();
        let Some(index) = self.channels.iter().position(|c| *c == data.channel) else {
            return Err(TrackError::UnknownChannel {
                cycle,
                channel: channel(),
            });
        };
        if data.values.len() != self.wells {
            return Err(TrackError::WrongWellCount {
                cycle,
                channel: channel(),
                expected: self.wells,
                found: data.values.len(),
            });
        }
        if let Some((current, got)) = &mut self.current {
            let current = *current;
            if cycle > current {
                let missing = self
                    .channels
                    .iter()
                    .zip(got.iter())
                    .filter(|(_, g)| g.is_none())
                    .map(|(c, _)| c.as_str().to_owned())
                    .collect();
                return Err(TrackError::Gap {
                    expected: current,
                    found: cycle,
                    missing,
                });
            }
            if cycle < current {
                return Err(TrackError::Backwards {
                    last: current,
                    found: cycle,
                });
            }
            return match &got[index] {
                Some(values) if *values == data.values => Ok(Tracked::Duplicate { cycle }),
                Some(_) => Err(TrackError::Conflict {
                    cycle,
                    channel: channel(),
                }),
                None => {
                    got[index] = Some(data.values.clone());
                    if got.iter().all(Option::is_some) {
                        self.last = got.iter_mut().filter_map(Option::take).collect();
                        self.last_complete = cycle;
                        self.current = None;
                        Ok(Tracked::Accepted {
                            cycle,
                            cycle_complete: true,
                        })
                    } else {
                        Ok(Tracked::Accepted {
                            cycle,
                            cycle_complete: false,
                        })
                    }
                }
            };
        }
        let next = self.last_complete.saturating_add(1);
        if cycle == self.last_complete && !self.last.is_empty() {
            return if self.last.get(index) == Some(&data.values) {
                Ok(Tracked::Duplicate { cycle })
            } else {
                Err(TrackError::Conflict {
                    cycle,
                    channel: channel(),
                })
            };
        }
        if cycle < next {
            return Err(TrackError::Backwards {
                last: self.last_complete,
                found: cycle,
            });
        }
        if cycle > next {
            return Err(TrackError::Gap {
                expected: next,
                found: cycle,
                missing: Vec::new(),
            });
        }
        let mut got = vec![None; self.channels.len()];
        got[index] = Some(data.values.clone());
        if self.channels.len() == 1 {
            self.last = got.into_iter().flatten().collect();
            self.last_complete = cycle;
            return Ok(Tracked::Accepted {
                cycle,
                cycle_complete: true,
            });
        }
        self.current = Some((cycle, got));
        Ok(Tracked::Accepted {
            cycle,
            cycle_complete: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str) -> Channel {
        Channel::new(name).unwrap()
    }

    fn data(cycle: u32, channel: &str, v: f64) -> Event {
        Event::Cycle(CycleData {
            cycle,
            channel: ch(channel),
            values: vec![v; 2],
        })
    }

    #[test]
    fn cycles_in_order_with_channels_in_any_order() {
        let mut t = RunTracker::new(2, vec![ch("FAM"), ch("HEX")]);
        let ok = |cycle, cycle_complete| {
            Ok(Tracked::Accepted {
                cycle,
                cycle_complete,
            })
        };
        assert_eq!(t.observe(&data(1, "HEX", 1.0)), ok(1, false));
        assert_eq!(
            t.observe(&data(1, "HEX", 1.0)),
            Ok(Tracked::Duplicate { cycle: 1 })
        );
        assert_eq!(t.observe(&data(1, "FAM", 1.0)), ok(1, true));
        assert_eq!(
            t.observe(&data(1, "FAM", 1.0)),
            Ok(Tracked::Duplicate { cycle: 1 })
        );
        assert!(matches!(
            t.observe(&data(1, "FAM", 2.0)),
            Err(TrackError::Conflict { .. })
        ));
        assert_eq!(t.observe(&data(2, "FAM", 2.0)), ok(2, false));
        assert_eq!(
            t.observe(&data(3, "FAM", 2.0)),
            Err(TrackError::Gap {
                expected: 2,
                found: 3,
                missing: vec!["HEX".to_owned()]
            })
        );
        assert!(matches!(
            t.observe(&data(1, "FAM", 1.0)),
            Err(TrackError::Backwards { last: 2, found: 1 })
        ));
        assert_eq!(t.observe(&data(2, "HEX", 2.0)), ok(2, true));
        assert!(matches!(
            t.observe(&data(4, "HEX", 2.0)),
            Err(TrackError::Gap { expected: 3, .. })
        ));
        assert!(matches!(
            t.observe(&data(3, "ROX", 2.0)),
            Err(TrackError::UnknownChannel { .. })
        ));
        assert!(matches!(
            t.observe(&Event::RunFinished {
                outcome: Outcome::Completed,
                cycles: 3
            }),
            Err(TrackError::MissingCycles {
                reported: 3,
                received: 2
            })
        ));
        assert_eq!(
            t.observe(&Event::RunFinished {
                outcome: Outcome::Completed,
                cycles: 2
            }),
            Ok(Tracked::RunFinished {
                outcome: Outcome::Completed
            })
        );
    }

    #[test]
    fn resumed_tracker_continues_after_the_stored_cycles() {
        let mut t = RunTracker::new(2, vec![ch("FAM")]).resume_after(10);
        assert!(matches!(
            t.observe(&data(10, "FAM", 1.0)),
            Err(TrackError::Backwards { .. })
        ));
        assert!(t.observe(&data(11, "FAM", 1.0)).is_ok());
        assert_eq!(t.last_complete_cycle(), 11);
        let wrong = Event::Cycle(CycleData {
            cycle: 12,
            channel: ch("FAM"),
            values: vec![1.0; 3],
        });
        assert!(matches!(
            t.observe(&wrong),
            Err(TrackError::WrongWellCount {
                expected: 2,
                found: 3,
                ..
            })
        ));
    }
}
