//! Unit tests of commands, replies and events in the reference dialect.

use super::command::{
    FetchData, GetStatus, Identify, LidOpen, LoadPlate, NextError, OperationComplete, Start,
};
use super::*;
use crate::domain::{PlateFormat, Well};

fn reference() -> Dialect {
    Dialect::reference()
}

pub(super) fn protocol() -> ThermalProtocol {
    let step = |temperature_c, hold_s, read| Step {
        temperature_c,
        hold_s,
        read,
    };
    ThermalProtocol {
        name: "RT-QPCR".into(),
        channels: ["FAM", "HEX", "ROX"]
            .iter()
            .map(|c| Channel::new(c).unwrap())
            .collect(),
        stages: vec![
            Stage {
                cycles: 1,
                steps: vec![step(50.0, 900, false)],
            },
            Stage {
                cycles: 1,
                steps: vec![step(95.0, 120, false)],
            },
            Stage {
                cycles: 45,
                steps: vec![step(95.0, 3, false), step(60.5, 30, true)],
            },
        ],
    }
}

#[test]
fn every_command_encodes_to_its_line_and_parses_back() {
    let d = reference();
    let plate = PlateMap {
        plate_id: "P0001".into(),
        format: PlateFormat::Wells96,
        wells: vec![
            (Well::new(0, 0), "SPC0042".into()),
            (Well::new(7, 11), "NTC".into()),
        ],
    };
    let cases = [
        (Command::Identify, "*IDN?"),
        (Command::Reset, "*RST"),
        (Command::ClearStatus, "*CLS"),
        (Command::OperationComplete, "*OPC?"),
        (Command::NextError, "SYST:ERR?"),
        (Command::Status, "STAT?"),
        (Command::LidOpen, "LID:OPEN"),
        (Command::LidClose, "LID:CLOSE"),
        (
            Command::LoadPlate(plate),
            "PLATE:LOAD P0001 96 A1=SPC0042,H12=NTC",
        ),
        (
            Command::LoadProtocol(protocol()),
            "PROT:LOAD RT-QPCR FAM,HEX,ROX 1x50@900 1x95@120 45x95@3/60.5@30R",
        ),
        (Command::Start, "RUN:START"),
        (Command::Abort, "RUN:ABORT"),
        (
            Command::FetchData(CycleRange::new(3, 12).unwrap()),
            "DATA? 3,12",
        ),
    ];
    for (command, line) in cases {
        assert_eq!(command.encode(&d).unwrap().as_str(), line);
        assert_eq!(Command::parse(line, &d).unwrap(), command);
    }
    assert_eq!(
        Command::parse("stat?", &d).unwrap(),
        Command::Status,
        "SCPI words are case-insensitive"
    );
}

#[test]
fn bad_commands_are_refused_with_a_reason() {
    let d = reference();
    let cases = [
        ("FOO", "unknown command"),
        ("*IDN? now", "no parameters"),
        ("PROT:LOAD", "parameters"),
        ("PROT:LOAD X FAM 0x95@3R", "1 to 99 cycles"),
        ("PROT:LOAD X FAM 1x95@3", "no step reads"),
        ("PROT:LOAD X FAM 1x120@3R", "outside"),
        ("PROT:LOAD X FAM,FAM 1x95@3R", "twice"),
        ("PROT:LOAD X FAM 1x95@3R/60@3R", "one read step"),
        ("PROT:LOAD X FAM 1x95@-3R", "hold"),
        ("PLATE:LOAD P1 96 I1=S", "outside a 96-well plate"),
        ("PLATE:LOAD P1 48 A1=S", "96 or 384"),
        ("PLATE:LOAD P1 96 A1=S,A1=T", "twice"),
        ("DATA? 5,3", "first <= last"),
        ("DATA? 0,0", "first <= last"),
    ];
    for (line, needle) in cases {
        let e = Command::parse(line, &d).unwrap_err();
        assert!(
            e.to_string().contains(needle) || format!("{e:?}").contains(needle),
            "{line}: {e}"
        );
    }
}

#[test]
fn policies_never_resend_state_changes_blindly() {
    for op in Operation::ALL {
        let p = op.policy();
        assert!(p.attempts >= 1);
        if !p.resend_safe {
            assert_eq!(p.attempts, 1, "{op:?}");
        }
    }
    for op in [
        Operation::Start,
        Operation::Abort,
        Operation::LidOpen,
        Operation::LidClose,
        Operation::Reset,
    ] {
        assert!(!op.policy().resend_safe, "{op:?}");
    }
    assert!(Start.policy().attempts == 1 && Identify.policy().resend_safe);
    assert!(Operation::Status.expects_reply(&reference()));
    let mut silent = reference();
    silent.ack = None;
    assert!(!Operation::Start.expects_reply(&silent));
    assert!(Operation::Identify.expects_reply(&silent));
}

#[test]
fn typed_commands_read_their_replies() {
    let d = reference();
    assert_eq!(
        Identify
            .parse_response("pcrd,SIM-96,SN0001,0.1.0", &d)
            .unwrap()
            .model,
        "SIM-96"
    );
    assert!(Identify.parse_response("pcrd,SIM-96", &d).is_err());
    assert_eq!(NextError.parse_response("0,\"No error\"", &d), Ok(None));
    assert_eq!(
        NextError.parse_response("-222,\"Data out of range\"", &d),
        Ok(Some(DeviceError {
            code: -222,
            text: "Data out of range".into()
        }))
    );
    assert_eq!(OperationComplete.parse_response("1", &d), Ok(()));
    assert!(OperationComplete.parse_response("0", &d).is_err());
    assert_eq!(LidOpen.parse_response("OK", &d), Ok(()));
    assert!(LidOpen.parse_response("1", &d).is_err());
    let status = GetStatus
        .parse_response("RUNNING,3,12,CLOSED,60.5", &d)
        .unwrap();
    assert_eq!(status.state, RunState::Running);
    assert_eq!(status.cycle, 12);
    assert_eq!(status.lid, LidState::Closed);
    assert_eq!(status.encode(&d), "RUNNING,3,12,CLOSED,60.5");
    assert!(
        GetStatus
            .parse_response("RUNNING,3,12,AJAR,60.5", &d)
            .is_err()
    );
    let fetch = FetchData(CycleRange::new(3, 12).unwrap());
    assert_eq!(
        fetch.parse_response("3,10", &d),
        Ok(Some(CycleRange { first: 3, last: 10 }))
    );
    assert_eq!(fetch.parse_response("0,0", &d), Ok(None));
    assert!(fetch.parse_response("1,12", &d).is_err());
    let bad_plate = LoadPlate(PlateMap {
        plate_id: "P 1".into(),
        format: PlateFormat::Wells96,
        wells: vec![(Well::new(0, 0), "S".into())],
    });
    assert!(bad_plate.encode(&d).is_err());
}

#[test]
fn lines_are_told_apart_by_their_prefix() {
    let d = reference();
    assert_eq!(parse_incoming("OK", &d), Ok(Incoming::Reply("OK".into())));
    assert_eq!(
        parse_incoming("ERR -222,\"Data \"\"out\"\" of range\"", &d),
        Ok(Incoming::Error(DeviceError {
            code: -222,
            text: "Data \"out\" of range".into()
        }))
    );
    assert_eq!(
        parse_incoming("!CYCLE 2 FAM 3 1.5,2,-0.25", &d),
        Ok(Incoming::Event(Event::Cycle(CycleData {
            cycle: 2,
            channel: Channel::new("FAM").unwrap(),
            values: vec![1.5, 2.0, -0.25],
        })))
    );
    assert_eq!(
        parse_incoming("!FAULT LID_OPEN opened at cycle 12", &d),
        Ok(Incoming::Event(Event::Fault {
            kind: FaultKind::LidOpened,
            detail: "opened at cycle 12".into()
        }))
    );
    assert_eq!(
        parse_incoming("!FINISHED ABORTED 12", &d),
        Ok(Incoming::Event(Event::RunFinished {
            outcome: Outcome::Aborted,
            cycles: 12
        }))
    );
    let cases = [
        ("!CYCLE 2 FAM 3 1,x,3", "reading 1 (well 2)"),
        ("!CYCLE 2 FAM 3 1,NaN,3", "not a finite number"),
        ("!CYCLE 2 FAM 4 1,2,3", "declares 4"),
        ("!CYCLE 0 FAM 1 1", "cycle"),
        ("!CYCLE -1 FAM 1 1", "whole number"),
        ("!BOGUS 1", "unknown event"),
        ("ERR 12", "CODE"),
        ("ERR x,\"y\"", "whole number"),
        ("ERR 1,\"a\"b\"", "CODE"),
    ];
    for (line, needle) in cases {
        let rejected = parse_incoming(line, &d).unwrap_err();
        assert_eq!(rejected.line, line);
        assert!(rejected.to_string().contains(needle), "{line}: {rejected}");
    }
}

#[test]
fn replies_that_would_be_misread_are_not_encoded() {
    let d = reference();
    assert!(encode_reply("OK", &d).is_ok());
    assert!(encode_reply("!CYCLE", &d).is_err());
    assert!(encode_reply("ERR 1,\"x\"", &d).is_err());
    assert!(encode_reply("ERRATA", &d).is_ok());
    let e = DeviceError {
        code: 503,
        text: "lid \"stuck\"".into(),
    };
    let line = encode_error(&e, &d).unwrap();
    assert_eq!(line.as_str(), "ERR 503,\"lid \"\"stuck\"\"\"");
    assert_eq!(parse_incoming(line.as_str(), &d), Ok(Incoming::Error(e)));
}

#[test]
fn protocol_counts_its_data_cycles() {
    assert_eq!(protocol().data_cycles(), 45);
}

#[test]
fn a_384_well_cycle_line_with_long_readings_fits_in_a_line() {
    let d = reference();
    let data = CycleData {
        cycle: 45,
        channel: Channel::new("CY5.5").unwrap(),
        values: vec![-1_234_567.123_456_789; 384],
    };
    let line = encode_event(&Event::Cycle(data.clone()), &d).unwrap();
    assert!(
        line.as_str().len() < MAX_LINE_LEN / 2,
        "{}",
        line.as_str().len()
    );
    assert_eq!(
        parse_incoming(line.as_str(), &d),
        Ok(Incoming::Event(Event::Cycle(data)))
    );
}

/// Another instrument is a profile: the same structure with its own words, from TOML.
#[test]
fn another_instrument_is_a_profile_from_toml() {
    let profile = r##"
        name = "acme-q"
        event_marker = "#"
        error_word = "FAIL"
        ack = "DONE"
        [commands]
        identify = "*IDN?"
        reset = "*RST"
        clear_status = "*CLS"
        operation_complete = "*OPC?"
        next_error = "SYST:ERR?"
        status = "RUN:STAT?"
        lid_open = "DOOR:OPEN"
        lid_close = "DOOR:CLOSE"
        load_plate = "PLATE"
        load_protocol = "METHOD"
        start = "RUN"
        abort = "STOP"
        fetch_data = "READ?"
        [events]
        run_started = "#RUN"
        stage = "#SEGMENT"
        cycle = "#READ"
        finished = "#END"
        fault = "#ALARM"
        [faults]
        lid_opened = "DOOR"
        block_over_temperature = "HOT"
        lamp_fault = "LED"
        [states]
        idle = "READY"
        loaded = "ARMED"
        running = "BUSY"
        completed = "DONE_OK"
        aborted = "STOPPED"
        error = "FAULT"
    "##;
    let d: Dialect = toml::from_str(profile).unwrap();
    d.validate().unwrap();
    assert_eq!(Command::Start.encode(&d).unwrap().as_str(), "RUN");
    assert_eq!(Command::parse("door:open", &d).unwrap(), Command::LidOpen);
    assert_eq!(
        parse_incoming("#ALARM DOOR opened", &d),
        Ok(Incoming::Event(Event::Fault {
            kind: FaultKind::LidOpened,
            detail: "opened".into()
        }))
    );
    assert_eq!(
        parse_incoming("FAIL -222,\"x\"", &d),
        Ok(Incoming::Error(DeviceError {
            code: -222,
            text: "x".into()
        }))
    );
    assert_eq!(Command::Start.parse_reply("DONE", &d), Ok(Response::Ack));
    assert!(toml::from_str::<Dialect>(&format!("{profile}\nextra = 1")).is_err());
}

#[test]
fn dialects_that_would_misread_lines_are_refused() {
    reference().validate().unwrap();
    let mut d = reference();
    d.commands.start = "RUN:ABORT".into();
    assert!(d.validate().is_err());
    let mut d = reference();
    d.events.cycle = "CYCLE".into();
    assert!(d.validate().is_err());
    let mut d = reference();
    d.ack = Some("!OK".into());
    assert!(d.validate().is_err());
    let mut d = reference();
    d.states.idle = "ERR".into();
    assert!(d.validate().is_err());
    let mut d = reference();
    d.commands.status = "STAT ?".into();
    assert!(d.validate().is_err());
}
