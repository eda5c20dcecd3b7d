//! Property tests of the cycler codec: arbitrary bytes never make the line decoder, the
//! reply/event parser, the command and reply parsers or the run tracker panic; the decoder gives
//! the same lines however the bytes are split into reads; every command, event, error
//! reply and status encodes to a line that parses back to the same value; and whatever
//! the tracker is fed, the cycles it completes run 1, 2, 3… without a gap.

use pcrd_protocol::cycler::{
    Channel, Command, CycleData, CycleRange, DeviceError, Dialect, Event, FaultKind, Incoming,
    LidState, LineDecoder, Outcome, PlateMap, RunState, RunTracker, Stage, Status, Step,
    ThermalProtocol, Tracked, encode_error, encode_event, parse_incoming,
};
use pcrd_protocol::domain::{PlateFormat, Well};
use proptest::prelude::*;

const SESSION: &str = include_str!("../src/cycler/testdata/session.txt");

/// Bytes that matter to the codec, mixed with anything.
fn byte() -> impl Strategy<Value = u8> {
    let interesting =
        prop::sample::select(b"\r\n!,\" 0123456789.-ERR CYCLE FAM OK ?:*x@R".to_vec());
    prop_oneof![any::<u8>(), interesting]
}

/// Runs every decoded line through everything that reads lines.
fn consume(bytes: &[u8], chunks: &[usize], max: usize) -> Vec<String> {
    let dialect = Dialect::reference();
    let fam = Channel::new("FAM").expect("a channel");
    let mut tracker = RunTracker::new(4, vec![fam]);
    let mut decoder = LineDecoder::new(max);
    let mut buf = Vec::new();
    let mut results = Vec::new();
    let mut rest = bytes;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = sizes
            .next()
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match decoder.decode(&mut buf) {
                Ok(None) => break,
                Ok(Some(line)) => {
                    let text = line.as_str();
                    assert!(text.len() <= max);
                    assert!(text.bytes().all(|b| (0x20..=0x7E).contains(&b)));
                    let _ = Command::parse(text, &dialect);
                    if let Ok(Incoming::Event(e)) = parse_incoming(text, &dialect) {
                        let _ = tracker.observe(&e);
                    }
                    results.push(format!("ok {text}"));
                }
                Err(e) => results.push(format!("err {e:?}")),
            }
        }
    }
    results
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_and_splitting_does_not_matter(
        bytes in prop::collection::vec(byte(), 0..600),
        chunks in prop::collection::vec(1usize..50, 1..8),
        max in 1usize..80,
    ) {
        let whole = consume(&bytes, &[bytes.len().max(1)], max);
        let split = consume(&bytes, &chunks, max);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn a_damaged_session_never_panics(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..20),
    ) {
        let mut bytes: Vec<u8> = SESSION
            .lines()
            .filter_map(|l| l.strip_prefix("> "))
            .flat_map(pcrd_protocol::astm::from_mnemonics)
            .collect();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        consume(&bytes, &[7], 200);
    }

    #[test]
    fn arbitrary_lines_never_panic_the_parsers(text in "[ -~]{0,200}") {
        let d = Dialect::reference();
        let _ = Command::parse(&text, &d);
        let _ = Status::parse(&text, &d);
        let _ = DeviceError::parse(&text);
        for command in [
            Command::Identify,
            Command::OperationComplete,
            Command::NextError,
            Command::Status,
            Command::Start,
            Command::FetchData(CycleRange { first: 3, last: 12 }),
        ] {
            let _ = command.parse_reply(&text, &d);
        }
        if let Err(rejected) = parse_incoming(&text, &d) {
            prop_assert_eq!(rejected.line, text);
        }
    }

    #[test]
    fn every_command_round_trips(command in command()) {
        let d = Dialect::reference();
        let line = command.encode(&d).expect("a valid command encodes");
        prop_assert_eq!(Command::parse(line.as_str(), &d).expect("parses"), command);
    }

    #[test]
    fn every_event_round_trips(event in event()) {
        let d = Dialect::reference();
        let line = encode_event(&event, &d).expect("a valid event encodes");
        prop_assert_eq!(
            parse_incoming(line.as_str(), &d).expect("parses"),
            Incoming::Event(event)
        );
    }

    #[test]
    fn error_replies_and_status_round_trip(
        code in any::<i32>().prop_filter("i32::MIN has no positive twin", |c| *c != i32::MIN),
        text in "[ -~]{0,60}",
        status in status(),
    ) {
        let d = Dialect::reference();
        let error = DeviceError { code, text };
        let line = encode_error(&error, &d).expect("encodes");
        prop_assert_eq!(
            parse_incoming(line.as_str(), &d).expect("parses"),
            Incoming::Error(error.clone())
        );
        prop_assert_eq!(DeviceError::parse(&error.encode()).expect("parses"), error);
        prop_assert_eq!(Status::parse(&status.encode(&d), &d).expect("parses"), status);
    }

    /// However events arrive (repeats, gaps, going back, wrong counts), the cycles the
    /// tracker reports complete are exactly 1, 2, 3, … and each complete cycle had
    /// every channel accepted once.
    #[test]
    fn the_tracker_never_leaves_a_silent_gap(
        events in prop::collection::vec(
            (1u32..6, prop::sample::select(vec!["FAM", "HEX", "ROX"]), 0u8..3, 3usize..5),
            0..80,
        ),
    ) {
        let channels = vec![Channel::new("FAM").expect("ch"), Channel::new("HEX").expect("ch")];
        let mut tracker = RunTracker::new(4, channels);
        let mut completed = Vec::new();
        let mut accepted_in_cycle = 0;
        for (cycle, channel, value, wells) in events {
            let event = Event::Cycle(CycleData {
                cycle,
                channel: Channel::new(channel).expect("ch"),
                values: vec![f64::from(value); wells],
            });
            if let Ok(Tracked::Accepted {
                cycle,
                cycle_complete,
            }) = tracker.observe(&event)
            {
                accepted_in_cycle += 1;
                if cycle_complete {
                    prop_assert_eq!(accepted_in_cycle, 2);
                    accepted_in_cycle = 0;
                    completed.push(cycle);
                }
            }
            prop_assert_eq!(tracker.last_complete_cycle(), completed.last().copied().unwrap_or(0));
        }
        let expected: Vec<u32> = (1..=u32::try_from(completed.len()).expect("small")).collect();
        prop_assert_eq!(completed, expected);
    }
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.-]{1,32}"
}

fn channels() -> impl Strategy<Value = Vec<Channel>> {
    let all = vec!["FAM", "HEX", "VIC", "ROX", "CY5", "CY5.5"];
    prop::sample::subsequence(all, 1..=6).prop_map(|names| {
        names
            .into_iter()
            .map(|n| Channel::new(n).expect("a channel"))
            .collect()
    })
}

fn stage() -> impl Strategy<Value = Stage> {
    let step = (4.0f64..=100.0, 0u32..=7200).prop_map(|(temperature_c, hold_s)| Step {
        temperature_c,
        hold_s,
        read: false,
    });
    (
        1u32..=99,
        prop::collection::vec(step, 1..=8),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(cycles, mut steps, at, read)| {
            if read {
                let i = at.index(steps.len());
                steps[i].read = true;
            }
            Stage { cycles, steps }
        })
}

fn protocol() -> impl Strategy<Value = ThermalProtocol> {
    (name(), channels(), prop::collection::vec(stage(), 1..=16)).prop_map(
        |(name, channels, mut stages)| {
            // At least one read step.
            if stages.iter().all(|s| s.steps.iter().all(|st| !st.read)) {
                stages[0].steps[0].read = true;
            }
            ThermalProtocol {
                name,
                channels,
                stages,
            }
        },
    )
}

fn plate() -> impl Strategy<Value = PlateMap> {
    prop::sample::select(vec![PlateFormat::Wells96, PlateFormat::Wells384])
        .prop_flat_map(|format| {
            let wells: Vec<Well> = format.wells_column_major().collect();
            (
                Just(format),
                name(),
                prop::sample::subsequence(wells, 1..=24),
                prop::collection::vec(name(), 24),
            )
        })
        .prop_map(|(format, plate_id, wells, labels)| PlateMap {
            plate_id,
            format,
            wells: wells.into_iter().zip(labels).collect(),
        })
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        prop::sample::select(vec![
            Command::Identify,
            Command::Reset,
            Command::ClearStatus,
            Command::OperationComplete,
            Command::NextError,
            Command::Status,
            Command::LidOpen,
            Command::LidClose,
            Command::Start,
            Command::Abort,
        ]),
        plate().prop_map(Command::LoadPlate),
        protocol().prop_map(Command::LoadProtocol),
        (1u32..1000, 0u32..1000).prop_map(|(first, extra)| Command::FetchData(
            CycleRange::new(first, first + extra).expect("a valid range")
        )),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let fault_kind = prop_oneof![
        Just(FaultKind::LidOpened),
        Just(FaultKind::BlockOverTemperature),
        Just(FaultKind::LampFault),
        name()
            .prop_filter("not a named fault", |n| {
                !["LID_OPEN", "BLOCK_OVERTEMP", "LAMP"].contains(&n.as_str())
            })
            .prop_map(FaultKind::Other),
    ];
    let reading = prop_oneof![-1e6f64..1e7, (0u32..70_000).prop_map(f64::from)];
    prop_oneof![
        name().prop_map(|protocol| Event::RunStarted { protocol }),
        any::<u32>().prop_map(|stage| Event::StageChanged { stage }),
        (
            1u32..=u32::MAX,
            channels(),
            prop::collection::vec(reading, 1..=384)
        )
            .prop_map(|(cycle, channels, values)| Event::Cycle(CycleData {
                cycle,
                channel: channels[0].clone(),
                values,
            })),
        (any::<bool>(), any::<u32>()).prop_map(|(done, cycles)| Event::RunFinished {
            outcome: if done {
                Outcome::Completed
            } else {
                Outcome::Aborted
            },
            cycles,
        }),
        (fault_kind, "[ -~]{0,60}").prop_map(|(kind, detail)| Event::Fault { kind, detail }),
    ]
}

fn status() -> impl Strategy<Value = Status> {
    (
        prop::sample::select(vec![
            RunState::Idle,
            RunState::Loaded,
            RunState::Running,
            RunState::Completed,
            RunState::Aborted,
            RunState::Error,
        ]),
        any::<u32>(),
        any::<u32>(),
        prop::sample::select(vec![LidState::Open, LidState::Closed, LidState::Moving]),
        -40.0f64..130.0,
    )
        .prop_map(|(state, stage, cycle, lid, block_c)| Status {
            state,
            stage,
            cycle,
            lid,
            block_c,
        })
}
