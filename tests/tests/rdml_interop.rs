#![allow(clippy::unwrap_used)]
//! pcrd's RDML reader and writer against an independent implementation: rdmlpython
//! 1.7.2, the RDML consortium's own library (installed in `$PCRD_PEERS/python` by
//! `scripts/test.sh`).
//!
//! rdmlpython 1.7.2 refuses the RDML 1.4 Vermeulen file ("Unknown or unsupported RDML
//! file version"), so the path is: pcrd reads the 1.4 file, writes RDML 1.3, and
//! rdmlpython must (1) validate that file against RDML_v1_3_REC.xsd, (2) read the same
//! reactions, samples and fluorescence values, bit for bit, and (3) run LinRegPCR on
//! it; pcrd must then read the file rdmlpython wrote, with its Cq values in the right
//! reactions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use pcrd_protocol::rdml::{self, Document};
use pcrd_protocol::run_analysis::{RunSettings, analyze_run};
use pcrd_tests::peers_dir;
use serde_json::Value;

const EXPERIMENT: &str = "biomarker_set";
/// Runs (genes) for LinRegPCR: each takes rdmlpython about 1.5 s.
const LINREG_RUNS: [&str; 3] = ["AHCY_20080229", "BIRC5_20080229", "PRAME_20080310"];

/// Loads an RDML file with rdmlpython, validates it against its schema, and prints
/// JSON: the version, the validation notes, and per reaction and target the sample,
/// cycles and fluorescence values (as Python floats, which JSON carries exactly).
const DUMP: &str = r#"
import json, sys
import rdmlpython.rdml as rdml
d = rdml.Rdml(sys.argv[1])
out = {"version": d.version(), "validation": d.validate(), "reactions": []}
for exp in d.experiments():
    for run in exp.runs():
        for react in run.getreactjson()["reacts"]:
            for data in react.get("datas", []):
                adps = data.get("adps", [])
                out["reactions"].append({
                    "experiment": exp["id"], "run": run["id"], "react": int(react["id"]),
                    "sample": react.get("sample"), "target": data.get("tar"),
                    "cq": float(data["cq"]) if data.get("cq") not in (None, "") else None,
                    "cycles": [float(a[0]) for a in adps],
                    "fluor": [float(a[1]) for a in adps],
                })
print(json.dumps(out))
"#;

fn python_path() -> PathBuf {
    let python = peers_dir().join("python");
    assert!(
        python.join("rdmlpython/rdml.py").exists(),
        "rdmlpython is not installed at {}: run scripts/test.sh (it installs the test peers)",
        python.display()
    );
    python
}

/// Runs `python3` with the peers on PYTHONPATH; fails with its output unless it exits 0.
fn python(args: &[&str]) -> String {
    let output = Command::new("python3")
        .env("PYTHONPATH", python_path())
        .args(args)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python3 {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

fn vermeulen_15() -> Document {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/vermeulen/data_vermeulen_std_150000_15.rdml");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "the Vermeulen RDML data is missing: {} ({e})",
            path.display()
        )
    });
    rdml::read(&bytes).unwrap()
}

/// rdmlpython's view of a file (see [`DUMP`]).
fn rdmlpython_dump(path: &Path) -> Value {
    let stdout = python(&["-c", DUMP, path.to_str().unwrap()]);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

type Key = (String, u32, String);

/// (run, reaction id, target) -> rdmlpython's record.
fn by_reaction(dump: &Value) -> BTreeMap<Key, Value> {
    dump["reactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let key = (
                r["run"].as_str().unwrap().to_owned(),
                u32::try_from(r["react"].as_u64().unwrap()).unwrap(),
                r["target"].as_str().unwrap().to_owned(),
            );
            (key, r.clone())
        })
        .collect()
}

fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn rdmlpython_validates_and_reads_what_pcrd_writes() {
    let doc = vermeulen_15();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vermeulen_1_3.rdml");
    std::fs::write(&path, rdml::write(&doc)).unwrap();

    let dump = rdmlpython_dump(&path);
    assert_eq!(dump["version"], "1.3");
    let notes = dump["validation"].as_str().unwrap();
    assert!(
        notes.contains("Schema validation result:\tTrue") && !notes.contains("error"),
        "rdmlpython's schema validation:\n{notes}"
    );

    let theirs = by_reaction(&dump);
    assert_eq!(theirs.len(), 960, "rdmlpython sees every reaction");
    let mut compared = 0;
    for (experiment, run, reaction) in doc.reactions() {
        for data in &reaction.data {
            let key = (run.id.clone(), reaction.id, data.target_id.clone());
            let record = theirs
                .get(&key)
                .unwrap_or_else(|| panic!("rdmlpython lacks {key:?}"));
            assert_eq!(record["experiment"], experiment.id.as_str());
            assert_eq!(record["sample"], reaction.sample_id.as_str(), "{key:?}");
            assert_eq!(record["cq"], Value::Null, "{key:?}");
            let cycles = floats(&record["cycles"]);
            let expected: Vec<f64> = (1..=data.fluorescence.len()).map(|c| c as f64).collect();
            assert_eq!(cycles, expected, "{key:?}");
            let fluor = floats(&record["fluor"]);
            assert_eq!(fluor.len(), data.fluorescence.len(), "{key:?}");
            for (cycle, (ours, theirs)) in data.fluorescence.iter().zip(&fluor).enumerate() {
                assert_eq!(
                    ours.to_bits(),
                    theirs.to_bits(),
                    "{key:?} cycle {}: pcrd {ours}, rdmlpython {theirs}",
                    cycle + 1
                );
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 960);
}

/// Every element the writer can produce (Cq, exclusion, baseline, threshold, instrument,
/// Cq method, the free format written as rows -1, escaped text), from the hand-written
/// fixtures of the protocol crate, RDML 1.3 and 1.0.
#[test]
fn every_element_pcrd_writes_is_valid_rdml_1_3() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/src/rdml/testdata");
    let dir = tempfile::tempdir().unwrap();
    for name in ["small_1_3.xml", "small_1_0.xml"] {
        let doc = rdml::read(&std::fs::read(fixtures.join(name)).unwrap()).unwrap();
        let path = dir.path().join(name.replace(".xml", ".rdml"));
        std::fs::write(&path, rdml::write(&doc)).unwrap();
        let dump = rdmlpython_dump(&path);
        let notes = dump["validation"].as_str().unwrap();
        assert!(
            notes.contains("Schema validation result:\tTrue") && !notes.contains("error"),
            "{name}: rdmlpython's schema validation:\n{notes}"
        );
        let theirs = by_reaction(&dump);
        let mut compared = 0;
        for (_, run, reaction) in doc.reactions() {
            for data in &reaction.data {
                let key = (run.id.clone(), reaction.id, data.target_id.clone());
                let record = &theirs[&key];
                assert_eq!(record["sample"], reaction.sample_id.as_str(), "{key:?}");
                assert_eq!(record["cq"].as_f64(), data.cq, "{name} {key:?}");
                assert_eq!(
                    floats(&record["fluor"]),
                    data.fluorescence,
                    "{name} {key:?}"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, theirs.len(), "{name}");
        assert!(compared >= 2, "{name}");
    }
}

#[test]
fn pcrd_reads_what_rdmlpython_linregpcr_writes() {
    let doc = vermeulen_15();
    let dir = tempfile::tempdir().unwrap();
    let mut input = dir.path().join("in.rdml");
    std::fs::write(&input, rdml::write(&doc)).unwrap();

    // LinRegPCR, one run at a time, each writing the file the next one reads.
    let mut results = BTreeMap::new();
    for (i, run) in LINREG_RUNS.iter().enumerate() {
        let output = dir.path().join(format!("out{i}.rdml"));
        let csv = dir.path().join(format!("results{i}.csv"));
        let stdout = python(&[
            "-m",
            "rdmlpython.rdml",
            "-lrp",
            input.to_str().unwrap(),
            "-e",
            EXPERIMENT,
            "-r",
            run,
            "-o",
            output.to_str().unwrap(),
            "--saveResults",
            csv.to_str().unwrap(),
        ]);
        assert!(!stdout.contains("Error"), "LinRegPCR on {run}:\n{stdout}");
        results.insert(*run, std::fs::read_to_string(&csv).unwrap());
        input = output;
    }

    let bytes = std::fs::read(&input).unwrap();
    let analysed =
        rdml::read(&bytes).unwrap_or_else(|e| panic!("pcrd reads rdmlpython's file: {e}"));
    assert_eq!(analysed.version, "1.3");
    let experiment = analysed.experiment(EXPERIMENT).unwrap();
    assert_eq!(experiment.runs.len(), 64);

    // rdmlpython's own reading of its file: the Cq per reaction must be the one pcrd read.
    let theirs = by_reaction(&rdmlpython_dump(&input));
    for run in &experiment.runs {
        let original = doc.experiments[0].run(&run.id).unwrap();
        for (reaction, before) in run.reactions.iter().zip(&original.reactions) {
            assert_eq!(reaction.id, before.id);
            assert_eq!(
                reaction.data[0].fluorescence, before.data[0].fluorescence,
                "LinRegPCR keeps the raw curve"
            );
            let key = (
                run.id.clone(),
                reaction.id,
                reaction.data[0].target_id.clone(),
            );
            let their_cq = theirs[&key]["cq"].as_f64().filter(|&cq| cq != -1.0);
            assert_eq!(reaction.data[0].cq, their_cq, "{key:?}");
        }
        if !LINREG_RUNS.contains(&run.id.as_str()) {
            assert!(
                run.reactions.iter().all(|r| r.data[0].cq.is_none()),
                "run {} was not analysed",
                run.id
            );
        }
    }

    for run_id in LINREG_RUNS {
        let run = experiment.run(run_id).unwrap();
        let cqs: Vec<(u32, &str, f64)> = run
            .reactions
            .iter()
            .filter_map(|r| r.data[0].cq.map(|cq| (r.id, r.sample_id.as_str(), cq)))
            .collect();
        assert!(
            cqs.len() >= 12,
            "run {run_id}: LinRegPCR gave {} of 15 reactions a Cq: {cqs:?}",
            cqs.len()
        );
        assert!(
            cqs.iter().all(|&(_, _, cq)| cq > 5.0 && cq < 50.0),
            "{cqs:?}"
        );
        // 10,000-fold more template comes up about 13 cycles earlier.
        let mean = |sample: &str| {
            let v: Vec<f64> = cqs.iter().filter(|c| c.1 == sample).map(|c| c.2).collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        let spread = mean("STD_15") - mean("STD_150000");
        assert!(
            (10.0..16.0).contains(&spread),
            "run {run_id}: STD_15 - STD_150000 = {spread} cycles"
        );
        // LinRegPCR's results table: one row per reaction, with rdmlpython's well label
        // and its Cq to 4 decimals (the RDML file carries it to 3).
        let table = &results[run_id];
        let mut rows = table
            .lines()
            .map(|line| line.split('\t').collect::<Vec<_>>());
        let header = rows.next().unwrap();
        let column = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .unwrap_or_else(|| panic!("no column {name:?} in {header:?}"))
        };
        let (id_col, well_col, sample_col, cq_col) = (
            column("id"),
            column("well"),
            column("sample"),
            column("Cq (mean eff)"),
        );
        let mut checked = 0;
        for row in rows.filter(|r| r.len() == header.len()) {
            let id: u32 = row[id_col].parse().unwrap();
            let reaction = run.reaction(id).unwrap();
            assert_eq!(
                run.format.well_label(id).as_deref(),
                Some(row[well_col]),
                "reaction {id}"
            );
            assert_eq!(reaction.sample_id, row[sample_col]);
            let table_cq: f64 = row[cq_col].parse().unwrap();
            let cq = reaction.data[0].cq.unwrap();
            assert!(
                (cq - table_cq).abs() <= 0.00051,
                "run {run_id} reaction {id}: RDML Cq {cq}, table {table_cq}"
            );
            checked += 1;
        }
        assert_eq!(checked, cqs.len(), "run {run_id}:\n{table}");
    }

    // pcrd's Ct against rdmlpython's LinRegPCR Cq, reaction by reaction. The two read
    // the curves at different thresholds (pcrd: one per target from the curves' noise
    // and second-derivative maxima; LinRegPCR: inside its window of linearity), which
    // shifts every Cq of a run by about the same amount; what must agree is everything
    // else: the difference may not scatter by more than 0.05 cycle (SD) within a run
    // (measured: 0.010 to 0.018), nor be more than a quarter cycle on average (0.07).
    for run_id in LINREG_RUNS {
        let run = experiment.run(run_id).unwrap();
        let records = analyze_run(&analysed, run, &RunSettings::default());
        let differences: Vec<f64> = records
            .iter()
            .filter_map(|r| {
                let ours = r.ct?;
                let theirs = run.reaction(r.reaction)?.data[0].cq?;
                Some(ours - theirs)
            })
            .collect();
        assert!(differences.len() >= 12, "run {run_id}: {differences:?}");
        let n = differences.len() as f64;
        let mean = differences.iter().sum::<f64>() / n;
        let sd = (differences.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        println!(
            "run {run_id}: pcrd Ct - LinRegPCR Cq over {} reactions: mean {mean:+.3}, SD {sd:.3}",
            differences.len()
        );
        assert!(
            sd <= 0.1,
            "run {run_id}: differences scatter by {sd:.3} cycles: {differences:?}"
        );
        assert!(
            mean.abs() <= 1.0,
            "run {run_id}: pcrd is {mean:+.3} cycles off LinRegPCR"
        );
    }

    // And what rdmlpython wrote survives pcrd's own round trip.
    assert_eq!(rdml::read(&rdml::write(&analysed)).unwrap(), analysed);
}

#[test]
fn rdmlpython_reads_pcrds_results_written_by_pcrd_analyze() {
    let input = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/vermeulen/data_vermeulen_std_150000_150000.rdml");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("with-pcrd-cq.rdml");
    let run = Command::new(pcrd_tests::pcrd_bin())
        .args(["analyze", input.to_str().unwrap(), "--rdml-out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ours: Vec<Value> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ours.len(), 192);

    let dump = rdmlpython_dump(&out);
    assert_eq!(dump["version"], "1.3");
    let theirs = by_reaction(&dump);
    assert_eq!(theirs.len(), ours.len());
    for record in &ours {
        let key = (
            record["run"].as_str().unwrap().to_owned(),
            u32::try_from(record["reaction"].as_u64().unwrap()).unwrap(),
            record["target"].as_str().unwrap().to_owned(),
        );
        // pcrd prints two decimals; the file carries the Ct in full.
        let (ct, cq) = (record["ct"].as_f64(), theirs[&key]["cq"].as_f64());
        match (ct, cq) {
            (Some(ct), Some(cq)) => assert!((ct - cq).abs() <= 0.005, "{key:?}: {ct} vs {cq}"),
            (None, None) => {}
            // rdmlpython reads an absent cq as -1 ("not available").
            (None, Some(cq)) => assert_eq!(cq, -1.0, "{key:?}"),
            (Some(ct), None) => panic!("{key:?}: pcrd {ct}, file none"),
        }
    }
    // And pcrd reads back the threshold and baseline it wrote.
    let back = rdml::read(&std::fs::read(&out).unwrap()).unwrap();
    let run = &back.experiments[0].runs[0];
    assert_eq!(
        run.cq_detection_method.as_deref(),
        Some("automated threshold and baseline settings")
    );
    let data = &run.reactions[0].data[0];
    assert!(data.threshold.is_some_and(|t| t > 0.0));
    assert!(data.background.is_some() && data.background_slope.is_some());
}
