//! docs/result-record.schema.json and `ResultRecord` v1 cannot drift apart: serialised
//! records are validated by an independent validator (jsonschema-rs for Python, which
//! `scripts/test.sh` installs into `.peers/python` with schemathesis), records the
//! schema must refuse are refused, and the schema's property and required lists match
//! the keys serde writes.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use pcrd_protocol::upstream::{ResultRecord, ResultStatus};
use pcrd_tests::peers_dir;
use pcrd_tests::results::{TEST_LAB, correction, records, records_for};

fn schema() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/result-record.schema.json");
    serde_json::from_slice(&std::fs::read(&path).expect("read the schema")).expect("schema is JSON")
}

fn keys(value: &serde_json::Value) -> BTreeSet<String> {
    value.as_object().expect("object").keys().cloned().collect()
}

fn names(value: &serde_json::Value) -> BTreeSet<String> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_str().expect("name").to_string())
        .collect()
}

/// Runs the Python validator over NDJSON lines; returns one verdict per line
/// ("ok" or the first error).
fn validate(lines: &[serde_json::Value]) -> Vec<String> {
    let python = peers_dir().join("python");
    assert!(
        python.join("jsonschema_rs").exists(),
        "jsonschema-rs is missing from {}: run scripts/test.sh to install the Python peers",
        python.display()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("records.ndjson");
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&input, text.join("\n")).expect("write records");
    let schema_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/result-record.schema.json");
    let script = r#"
import json, sys
import jsonschema_rs
schema = json.load(open(sys.argv[1]))
validator = jsonschema_rs.validator_for(schema, validate_formats=True)
for line in open(sys.argv[2]):
    errors = [e.message for e in validator.iter_errors(json.loads(line))]
    print("ok" if not errors else errors[0])
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&schema_path)
        .arg(&input)
        .env("PYTHONPATH", &python)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "validator failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn varied() -> Vec<ResultRecord> {
    let mut all = records(500);
    all.extend(records_for("LAB-2", 9_000, 50));
    let mut preliminary = records(3);
    for r in &mut preliminary {
        r.status = ResultStatus::Preliminary;
    }
    all.extend(preliminary);
    all.extend(
        records(20)
            .iter()
            .map(|r| correction(r, "well swap found at review")),
    );
    all
}

#[test]
fn every_serialised_record_is_valid_and_broken_ones_are_not() {
    let mut lines: Vec<serde_json::Value> = varied()
        .iter()
        .map(|r| serde_json::to_value(r).expect("serialise"))
        .collect();
    let good = lines.len();
    // Each of these must be refused by the schema.
    let base = lines[0].clone();
    let mut broken = Vec::new();
    let mut extra = base.clone();
    extra["patient_name"] = "x".into();
    broken.push(extra);
    let mut missing = base.clone();
    missing.as_object_mut().expect("object").remove("lab_id");
    broken.push(missing);
    let mut target_extra = base.clone();
    target_extra["targets"][0]["comment"] = "x".into();
    broken.push(target_extra);
    let mut bad_call = base.clone();
    bad_call["targets"][0]["call"] = "positive".into();
    broken.push(bad_call);
    let mut corrected_no_reason = base.clone();
    corrected_no_reason["status"] = "corrected".into();
    corrected_no_reason["version"] = 2.into();
    broken.push(corrected_no_reason);
    let mut reason_on_final = base.clone();
    reason_on_final["correction_reason"] = "why".into();
    broken.push(reason_on_final);
    let mut future = base.clone();
    future["schema_version"] = 2.into();
    broken.push(future);
    let mut bad_time = base;
    bad_time["tested_at"] = "yesterday".into();
    broken.push(bad_time);
    let bad = broken.len();
    lines.extend(broken);

    let verdicts = validate(&lines);
    assert_eq!(verdicts.len(), good + bad);
    for (i, verdict) in verdicts[..good].iter().enumerate() {
        assert_eq!(verdict, "ok", "record {i}: {}", lines[i]);
    }
    for (i, verdict) in verdicts[good..].iter().enumerate() {
        assert_ne!(
            verdict,
            "ok",
            "broken record {i} passed: {}",
            lines[good + i]
        );
    }
}

#[test]
fn the_schema_lists_exactly_the_fields_serde_writes() {
    let schema = schema();
    let corrected = serde_json::to_value(correction(&records(1)[0], "r")).expect("serialise");
    let final_ = serde_json::to_value(&records(1)[0]).expect("serialise");
    let levels = [
        (&schema, &corrected, &final_),
        (
            &schema["properties"]["kit"],
            &corrected["kit"],
            &final_["kit"],
        ),
        (
            &schema["properties"]["targets"]["items"],
            &corrected["targets"][0],
            &final_["targets"][0],
        ),
    ];
    for (level, all_fields, always_written) in levels {
        assert_eq!(level["additionalProperties"], false, "{level}");
        assert_eq!(
            keys(&level["properties"]),
            keys(all_fields),
            "properties vs struct fields"
        );
        assert_eq!(
            names(&level["required"]),
            keys(always_written),
            "required vs fields always written"
        );
    }
    assert_eq!(
        schema["properties"]["schema_version"]["const"],
        pcrd_protocol::upstream::RESULT_SCHEMA_VERSION
    );
    assert_eq!(records(1)[0].lab_id, TEST_LAB);
}
