use proptest::prelude::*;

use super::*;

const SIM: &str = include_str!("../../../profiles/sim-extractor.toml");

fn sim() -> Profile {
    Profile::from_toml_str(SIM).unwrap()
}

fn problems(text: &str) -> Vec<String> {
    match Profile::from_toml_str(text) {
        Err(ProfileError::Invalid { problems, .. }) => {
            problems.into_iter().map(|p| p.to_string()).collect()
        }
        other => panic!("expected invalid, got {other:?}"),
    }
}

fn running(profile: &Profile) -> ExtractorStatus {
    let _ = profile;
    ExtractorStatus {
        state: ExtractorState::Running,
        step: 3,
        progress: 42.5,
        remaining_s: 70_000.0,
        temperature_c: -2.5,
        error: None,
        protocol: 7,
        barcode: "EXT-000123".into(),
        anomalies: vec![],
    }
}

#[test]
fn sim_profile_loads_with_one_based_addresses_converted() {
    let p = sim();
    assert_eq!(p.status.state.address, 10);
    assert_eq!(p.status_block(), (10, 16));
    assert_eq!(p.identify_block(), (0, 9));
    assert_eq!(p.commands.register, 40);
    assert_eq!(p.poll_interval.as_millis(), 500);
    assert_eq!(p.error_reason(103), Some("Door opened during run"));
}

#[test]
fn status_round_trips_through_registers() {
    let p = sim();
    let status = running(&p);
    let block = p.encode_status(&status);
    let back = p.decode_status(&block).unwrap();
    assert_eq!(back, status);
    assert!(!back.completed());
}

#[test]
fn known_register_values_decode_as_the_manual_says() {
    // Independent of encode_status: the block written out by hand.
    let p = sim();
    let mut block = vec![0u16; 16];
    block[0] = 4; // completed
    block[1] = 9;
    block[2] = 1000; // 100.0 %
    block[3] = 0x0001; // remaining high word
    block[4] = 0x0002; // low word -> 65538 s
    block[5] = (-55i16).cast_unsigned(); // -5.5 °C
    block[8] = u16::from_be_bytes(*b"AB");
    block[9] = u16::from_be_bytes(*b"C\0");
    let s = p.decode_status(&block).unwrap();
    assert_eq!(s.state, ExtractorState::Completed);
    assert_eq!(s.remaining_s, 65538.0);
    assert_eq!(s.temperature_c, -5.5);
    assert_eq!(s.barcode, "ABC");
    assert!(s.completed());
}

#[test]
fn out_of_range_progress_is_flagged_and_not_a_completion() {
    let p = sim();
    let mut status = running(&p);
    status.state = ExtractorState::Completed;
    let mut block = p.encode_status(&status);
    block[2] = 1400; // 140 %
    let s = p.decode_status(&block).unwrap();
    assert_eq!(s.state, ExtractorState::Completed);
    assert!(!s.completed());
    assert!(matches!(
        s.anomalies[..],
        [Anomaly::OutOfRange {
            field: "progress",
            ..
        }]
    ));
}

#[test]
fn unknown_state_and_garbage_barcode_are_anomalies() {
    let p = sim();
    let mut block = p.encode_status(&running(&p));
    block[0] = 77;
    block[8] = 0xFFFF;
    let s = p.decode_status(&block).unwrap();
    assert_eq!(s.state, ExtractorState::Unknown(77));
    assert!(s.anomalies.contains(&Anomaly::UnknownState { code: 77 }));
    assert!(s.anomalies.contains(&Anomaly::BadText { field: "barcode" }));
}

#[test]
fn wrong_block_length_is_an_error() {
    let p = sim();
    assert_eq!(
        p.decode_status(&[0; 3]),
        Err(ExtractorError::BlockLength {
            expected: 16,
            got: 3
        })
    );
}

#[test]
fn device_error_code_carries_the_profile_reason() {
    let p = sim();
    let mut status = running(&p);
    status.state = ExtractorState::Error;
    status.error = Some(DeviceError {
        code: 102,
        reason: None,
    });
    let s = p.decode_status(&p.encode_status(&status)).unwrap();
    assert_eq!(
        s.error,
        Some(DeviceError {
            code: 102,
            reason: Some("Magnetic rod head blocked".into())
        })
    );
}

#[test]
fn commands_write_arguments_before_the_code() {
    let p = sim();
    let writes = p
        .encode_command(&ExtractorCommand::Start {
            barcode: "PL-1".into(),
        })
        .unwrap();
    assert_eq!(writes.len(), 2);
    assert_eq!(writes[0].address, 42);
    assert_eq!(writes[0].values[..2], [0x504C, 0x2D31]);
    assert_eq!(
        writes[1],
        RegisterWrite {
            address: 40,
            values: vec![2]
        }
    );
    let load = p
        .encode_command(&ExtractorCommand::LoadProtocol(7))
        .unwrap();
    assert_eq!(
        load[0],
        RegisterWrite {
            address: 41,
            values: vec![7]
        }
    );
    assert_eq!(
        p.decode_command(2, 0, &writes[0].values),
        Some(ExtractorCommand::Start {
            barcode: "PL-1".into()
        })
    );
    assert!(matches!(
        p.encode_command(&ExtractorCommand::Start {
            barcode: "x".repeat(17)
        }),
        Err(ExtractorError::BadBarcode { .. })
    ));
    assert!(
        p.encode_command(&ExtractorCommand::Start {
            barcode: "é".into()
        })
        .is_err()
    );
    assert_eq!(ExtractorCommand::Abort.policy(), ResendPolicy::Never);
    assert_eq!(
        ExtractorCommand::Pause.policy(),
        ResendPolicy::AfterReadBack
    );
}

#[test]
fn low_first_and_float_values_decode() {
    let text = SIM.replace(
        r#"remaining = { address = 14, type = "u32", word_order = "high_first" }"#,
        r#"remaining = { address = 14, type = "f32", word_order = "low_first" }"#,
    );
    let p = Profile::from_toml_str(&text).unwrap();
    let bits = 1234.5f32.to_bits();
    let mut block = p.encode_status(&running(&p));
    block[3] = (bits & 0xffff) as u16;
    block[4] = (bits >> 16) as u16;
    assert_eq!(p.decode_status(&block).unwrap().remaining_s, 1234.5);
    block[3] = 0;
    block[4] = 0x7FC0; // NaN
    let s = p.decode_status(&block).unwrap();
    assert!(matches!(
        s.anomalies[..],
        [Anomaly::OutOfRange {
            field: "remaining",
            ..
        }]
    ));
}

#[test]
fn overlapping_registers_are_rejected_naming_the_field() {
    let text = SIM.replace("error_code = { address = 17", "error_code = { address = 16");
    let p = problems(&text);
    assert!(
        p.iter()
            .any(|m| m.contains("status.error_code") && m.contains("overlap status.temperature")),
        "{p:?}"
    );
    // A 32-bit value running into the next field.
    let text = SIM.replace("remaining = { address = 14", "remaining = { address = 15");
    let p = problems(&text);
    assert!(p.iter().any(|m| m.contains("overlap")), "{p:?}");
}

#[test]
fn addresses_beyond_the_limits_are_rejected_naming_the_field() {
    let text = SIM.replace("protocol = { address = 18", "protocol = { address = 65537");
    let p = problems(&text);
    assert!(
        p.iter().any(|m| m.starts_with("status.protocol.address")),
        "{p:?}"
    );
    // 0 in a 1-based file.
    let text = SIM.replace("register = 41", "register = 0");
    let p = problems(&text);
    assert!(
        p.iter().any(|m| m.starts_with("commands.register.address")),
        "{p:?}"
    );
    // The status block would need two reads.
    let text = SIM.replace("protocol = { address = 18", "protocol = { address = 300");
    let p = problems(&text);
    assert!(p.iter().any(|m| m.starts_with("status:")), "{p:?}");
}

#[test]
fn unknown_types_and_keys_are_rejected() {
    let text = SIM.replace(
        r#"step = { address = 12, type = "u16""#,
        r#"step = { address = 12, type = "u64""#,
    );
    let p = problems(&text);
    assert!(
        p.iter()
            .any(|m| m.starts_with("status.step.type") && m.contains("u64")),
        "{p:?}"
    );
    let text = SIM.replace(
        "poll_interval_ms = 500",
        "poll_interval_ms = 500\npoll_interval = 1",
    );
    let err = Profile::from_toml_str(&text).unwrap_err().to_string();
    assert!(err.contains("poll_interval"), "{err}");
    let text = SIM.replace("[errors]\n", "[errors]\nE7 = \"x\"\n");
    let p = problems(&text);
    assert!(p.iter().any(|m| m.starts_with("errors.E7")), "{p:?}");
    let text = SIM.replace("pause = 3, resume = 4", "pause = 3, resume = 3");
    let p = problems(&text);
    assert!(
        p.iter().any(|m| m.starts_with("commands.codes.resume")),
        "{p:?}"
    );
}

#[test]
fn took_effect_reads_the_state_back() {
    let p = sim();
    let mut s = running(&p);
    let start = ExtractorCommand::Start {
        barcode: "EXT-000123".into(),
    };
    assert!(start.took_effect(&s));
    s.barcode = "OTHER".into();
    assert!(!start.took_effect(&s));
    s.state = ExtractorState::Aborted;
    assert!(ExtractorCommand::Abort.took_effect(&s));
}

proptest! {
    #[test]
    fn decode_never_panics(block in proptest::collection::vec(any::<u16>(), 0..40)) {
        let p = sim();
        let _ = p.decode_status(&block);
        let _ = p.decode_identity(&block);
        let _ = unpack_text(&block);
    }

    #[test]
    fn decode_of_any_full_block_never_panics_and_completion_needs_clean_values(
        block in proptest::collection::vec(any::<u16>(), 16)
    ) {
        let p = sim();
        let s = p.decode_status(&block).unwrap();
        if s.completed() {
            prop_assert!(s.progress >= 0.0 && s.progress <= 100.0);
            prop_assert!(s.error.is_none());
        }
    }

    #[test]
    fn text_round_trips(text in "[ -~]{1,16}") {
        let packed = pack_text(&text, 8).unwrap();
        prop_assert_eq!(unpack_text(&packed).unwrap(), text.trim_end());
    }
}
