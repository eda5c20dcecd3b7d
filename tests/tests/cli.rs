//! The `pcrd` command line end to end: the real binary as a subprocess against a real
//! daemon, checking what a technician sees (text), what a script sees (`--json`), the
//! exit codes, and, through the API, that refused commands changed nothing.

use std::path::Path;
use std::process::Command;

use pcrd_tests::{Daemon, TECH_TOKEN, pcrd_bin};
use serde_json::Value;

const KIT: &str = "sarscov2-orf1ab-n-ic";

// ----- helpers -----

/// What one `pcrd` run did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "pcrd failed: {self:#?}");
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// Runs `pcrd ARGS` with only the environment given, so a PCRD_TOKEN or PCRD_API in
/// the developer's shell cannot change the outcome.
fn run_with(env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut command = Command::new(pcrd_bin());
    command
        .args(args)
        .env_remove("PCRD_API")
        .env_remove("PCRD_TOKEN")
        .env_remove("PCRD_CONFIG");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run pcrd");
    Run {
        code: output.status.code().expect("pcrd exited, not killed"),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// Runs `pcrd ARGS` as the technician against `daemon`.
fn pcrd(daemon: &Daemon, args: &[&str]) -> Run {
    run_with(
        &[("PCRD_API", &daemon.url), ("PCRD_TOKEN", TECH_TOKEN)],
        args,
    )
}

/// GET through the API itself, to check what the daemon holds independently of the CLI.
fn api_get(daemon: &Daemon, path: &str) -> Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let reply = runtime.block_on(async { daemon.client().get(path).await });
    assert_eq!(reply.status, 200, "GET {path}: {reply:?}");
    reply.body
}

fn total_waiting(daemon: &Daemon) -> u64 {
    api_get(daemon, "/api/v1/tubes?limit=1")["total_waiting"]
        .as_u64()
        .expect("total_waiting")
}

fn barcodes(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}-{i:06}")).collect()
}

fn strings(values: &Value) -> Vec<String> {
    values
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect()
}

fn write_csv(dir: &Path, name: &str, header: &str, rows: &[String]) -> String {
    let path = dir.join(name);
    let mut text = format!("{header}\n");
    for row in rows {
        text.push_str(row);
        text.push('\n');
    }
    std::fs::write(&path, text).expect("write CSV");
    path.to_str().expect("UTF-8 path").to_string()
}

/// The value on the `key  value` line of a summary.
fn summary_value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(key)
                .filter(|rest| rest.starts_with("  "))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{text}"))
}

/// The grid lines of a plate map, keyed by row letter: the cells after the letter.
fn grid_row(map: &str, letter: char) -> Vec<&str> {
    let line = map
        .lines()
        .find(|l| l.starts_with(letter) && l.as_bytes().get(1) == Some(&b' '))
        .unwrap_or_else(|| panic!("no row {letter} in:\n{map}"));
    line[1..].split_whitespace().collect()
}

/// The legend after "samples (well, tube):" as (well, barcode) pairs.
fn legend(map: &str) -> Vec<(String, String)> {
    let start = map.find("samples (well, tube):").expect("legend");
    let words: Vec<&str> = map[start..]
        .lines()
        .skip(1)
        .flat_map(str::split_whitespace)
        .collect();
    words
        .chunks(2)
        .map(|pair| (pair[0].to_string(), pair[1].to_string()))
        .collect()
}

// ----- tests -----

#[test]
fn receiving_tubes_reports_new_and_repeated_ones_as_text_and_json() {
    let daemon = Daemon::start();
    let run = pcrd(
        &daemon,
        &["tube", "receive", "RCV-000001", "RCV-000002", "RCV-000003"],
    )
    .ok();
    assert_eq!(run.stdout, "received 3 tubes\n");

    let run = pcrd(
        &daemon,
        &[
            "tube",
            "receive",
            "RCV-000003",
            "RCV-000004",
            "--priority",
            "routine",
        ],
    )
    .ok();
    assert_eq!(run.stdout, "received 1 tube (1 already received)\n");

    let run = pcrd(
        &daemon,
        &[
            "tube",
            "receive",
            "RCV-000004",
            "RCV-000005",
            "--priority",
            "urgent",
            "--due",
            "4h",
            "--json",
        ],
    );
    // RCV-000004 was received as routine: the whole request is refused.
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("RCV-000004"), "{run:#?}");
    assert!(
        run.stdout.is_empty(),
        "no JSON for a refused request: {run:#?}"
    );

    let run = pcrd(
        &daemon,
        &[
            "tube",
            "receive",
            "RCV-000005",
            "RCV-000001",
            "--pool",
            "1",
            "--json",
        ],
    )
    .ok();
    let body = run.json();
    assert_eq!(strings(&body["received"]), ["RCV-000005"]);
    assert_eq!(strings(&body["already_received"]), ["RCV-000001"]);
    assert_eq!(total_waiting(&daemon), 5);

    let shown = pcrd(&daemon, &["tube", "show", "RCV-000005", "--json"])
        .ok()
        .json();
    assert_eq!(shown["state"], "waiting");
    assert_eq!(shown["received_by"], "tina");
    let text = pcrd(&daemon, &["tube", "waiting"]).ok().stdout;
    assert!(text.starts_with("BARCODE"), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("RCV-")).count(), 5);
    assert!(text.ends_with("5 waiting\n"), "{text}");
}

#[test]
fn technician_story_receive_fill_seal_show_and_audit() {
    let daemon = Daemon::start();
    let tubes = barcodes("STORY", 94);
    let mut args = vec!["tube", "receive"];
    args.extend(tubes.iter().map(String::as_str));
    assert_eq!(pcrd(&daemon, &args).ok().stdout, "received 94 tubes\n");

    let created = pcrd(&daemon, &["plate", "create", "--kit", KIT, "--json"])
        .ok()
        .json();
    let plate = created["id"].as_str().expect("plate id").to_string();
    assert_eq!(created["free"], 94);

    let fill = pcrd(&daemon, &["plate", "fill", &plate]).ok().stdout;
    assert!(
        fill.starts_with(&format!("put 94 tubes on plate {plate}:")),
        "{fill}"
    );
    let sealed = pcrd(&daemon, &["plate", "seal", &plate]).ok().stdout;
    assert_eq!(
        sealed,
        format!("sealed plate {plate}: 94 samples, 2 controls, 0 free\n")
    );

    let map = pcrd(&daemon, &["plate", "show", &plate]).ok().stdout;
    assert!(
        map.contains(&format!("{plate} (extraction, sealed)")),
        "{map}"
    );
    assert!(map.contains(&format!("{KIT}@1.0")), "{map}");
    assert!(!map.contains('\x1b'), "no color on a pipe:\n{map}");
    let header: Vec<&str> = map
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .expect("column header")
        .split_whitespace()
        .collect();
    assert_eq!(header, (1..=12).map(|c| c.to_string()).collect::<Vec<_>>());
    let (g, h) = (grid_row(&map, 'G'), grid_row(&map, 'H'));
    assert_eq!((g.len(), h.len()), (12, 12), "{map}");
    assert_eq!(g[11], "NTC");
    assert_eq!(h[11], "PC");
    assert!(!map.contains(" ENC"), "this kit has no extraction control");

    let legend = legend(&map);
    assert_eq!(legend.len(), 94, "{map}");
    let on_plate: std::collections::BTreeSet<&str> =
        legend.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(on_plate.len(), 94);
    assert!(tubes.iter().all(|t| on_plate.contains(t.as_str())));
    // Each grid cell shows the end of the barcode the legend gives for that well.
    for (well, barcode) in &legend {
        let letter = well.chars().next().expect("row letter");
        let column: usize = well[1..].parse().expect("column");
        let cell = grid_row(&map, letter)[column - 1];
        assert!(barcode.ends_with(cell), "{well}: {cell} vs {barcode}");
        assert_eq!(cell.len(), 6);
    }
    assert_eq!(legend[0].0, "A1", "legend in column-major order");
    assert_eq!(legend[1].0, "B1");
    assert_eq!(legend[8].0, "A2");

    let audit = pcrd(&daemon, &["audit", "--plate", &plate]).ok().stdout;
    let actions: Vec<&str> = audit
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(2).expect("action column"))
        .collect();
    assert_eq!(
        actions,
        ["plate.created", "plate.filled", "plate.sealed"],
        "{audit}"
    );
    let filled = audit.lines().nth(2).expect("filled line");
    assert!(filled.contains("94 tubes") && !filled.contains("STORY-000001"));
    assert!(filled.contains(" tina "), "{filled}");

    let verify = pcrd(&daemon, &["audit", "--verify"]).ok().stdout;
    assert_eq!(verify, "audit trail intact: 4 entries\n");
    let list = pcrd(&daemon, &["plate", "list"]).ok().stdout;
    let row = list
        .lines()
        .find(|l| l.starts_with(&plate))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(row.contains("sealed") && row.contains(" 94 "), "{row}");
    assert_eq!(
        pcrd(&daemon, &["tube", "waiting"]).ok().stdout,
        "no tubes waiting\n"
    );
}

#[test]
fn importing_1000_tubes_then_importing_again_changes_nothing() {
    let daemon = Daemon::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let rows: Vec<String> = barcodes("IMP", 1000)
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let priority = if i % 10 == 0 { "URGENT" } else { "routine" };
            format!("{priority},{b},{}", 1 + i % 5)
        })
        .collect();
    // Columns out of order and in mixed case.
    let csv = write_csv(dir.path(), "tubes.csv", "Priority,barcode,POOL_SIZE", &rows);

    let run = pcrd(&daemon, &["tube", "import", &csv, "--batch", "300"]).ok();
    assert!(
        run.stdout.contains("1000 tubes in 4 batches"),
        "{}",
        run.stdout
    );
    assert_eq!(summary_value(&run.stdout, "received"), "1000");
    assert_eq!(summary_value(&run.stdout, "already received"), "0");
    assert!(summary_value(&run.stdout, "rate").ends_with("tubes/s"));
    assert!(
        run.stderr.is_empty(),
        "no progress bar off a terminal: {run:#?}"
    );
    assert_eq!(total_waiting(&daemon), 1000);
    let urgent = api_get(&daemon, "/api/v1/tubes/IMP-000001");
    assert_eq!(urgent["priority"], "urgent");
    assert_eq!(api_get(&daemon, "/api/v1/tubes/IMP-000003")["pool_size"], 3);

    let again = pcrd(&daemon, &["tube", "import", &csv, "--json"])
        .ok()
        .json();
    assert_eq!(strings(&again["received"]).len(), 0);
    assert_eq!(strings(&again["already_received"]).len(), 1000);
    assert_eq!(total_waiting(&daemon), 1000);
}

#[test]
fn a_csv_with_bad_rows_is_refused_whole_and_nothing_is_sent() {
    let daemon = Daemon::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rows: Vec<String> = barcodes("BAD", 10)
        .iter()
        .map(|b| format!("{b},1"))
        .collect();
    rows[2] = "B@D,1".into(); // line 4: not a barcode
    rows[7] = "BAD-000008,21".into(); // line 9: pool too large
    let csv = write_csv(dir.path(), "bad.csv", "barcode,pool_size", &rows);

    let run = pcrd(&daemon, &["tube", "import", &csv]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("line 4: "), "{}", run.stderr);
    assert!(run.stderr.contains("line 9: "), "{}", run.stderr);
    assert!(run.stderr.contains("nothing was sent"), "{}", run.stderr);
    assert!(!run.stderr.contains("line 2: "), "good rows are not blamed");
    assert!(run.stdout.is_empty());
    assert_eq!(total_waiting(&daemon), 0);
    let audit = api_get(&daemon, "/api/v1/audit");
    assert_eq!(audit.as_array().map(Vec::len), Some(0), "{audit}");

    let unknown = write_csv(
        dir.path(),
        "odd.csv",
        "barcode,ward",
        &["ODD-000001,3".into()],
    );
    let run = pcrd(&daemon, &["tube", "import", &unknown]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("\"ward\""), "{}", run.stderr);
    assert_eq!(total_waiting(&daemon), 0);
}

#[test]
fn an_import_refused_midway_says_what_was_received_and_that_rerunning_is_safe() {
    let daemon = Daemon::start();
    // Received earlier as a pool of 5; the file says 1, so the daemon refuses its batch.
    pcrd(&daemon, &["tube", "receive", "MID-000150", "--pool", "5"]).ok();
    let dir = tempfile::tempdir().expect("temp dir");
    let rows = barcodes("MID", 200);
    let csv = write_csv(dir.path(), "mid.csv", "barcode", &rows);

    let run = pcrd(&daemon, &["tube", "import", &csv, "--batch", "100"]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("MID-000150"), "{}", run.stderr);
    assert!(run.stderr.contains("100 tubes"), "{}", run.stderr);
    assert!(run.stderr.contains("safe"), "{}", run.stderr);
    // The first batch stays received; the refused one added nothing.
    assert_eq!(total_waiting(&daemon), 101);
}

#[test]
fn assigning_a_tube_to_a_control_well_fails_and_names_the_well() {
    let daemon = Daemon::start();
    pcrd(&daemon, &["tube", "receive", "CTL-000001", "CTL-000002"]).ok();
    let plate = pcrd(
        &daemon,
        &["plate", "create", "--kit", KIT, "--id", "PL-CTL"],
    )
    .ok()
    .stdout;
    assert!(plate.starts_with("created plate PL-CTL\n"), "{plate}");

    let run = pcrd(
        &daemon,
        &["plate", "assign", "PL-CTL", "CTL-000001", "CTL-000002@H12"],
    );
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.starts_with("pcrd: "), "{}", run.stderr);
    assert!(run.stderr.contains("H12"), "{}", run.stderr);
    assert_eq!(total_waiting(&daemon), 2, "nothing was assigned");

    let run = pcrd(
        &daemon,
        &["plate", "assign", "PL-CTL", "CTL-000001", "CTL-000002@C5"],
    )
    .ok();
    assert!(
        run.stdout.starts_with("put 2 tubes on plate PL-CTL:"),
        "{run:#?}"
    );
    assert!(run.stdout.contains("C5 CTL-000002"), "{}", run.stdout);
    assert_eq!(api_get(&daemon, "/api/v1/tubes/CTL-000002")["well"], "C5");
}

#[test]
fn four_plates_combine_into_a_384_well_map() {
    let daemon = Daemon::start();
    let tubes = barcodes("QUAD", 4);
    let mut plates = Vec::new();
    for (i, tube) in tubes.iter().enumerate() {
        let id = format!("PL-Q{}", i + 1);
        pcrd(&daemon, &["tube", "receive", tube]).ok();
        pcrd(&daemon, &["plate", "create", "--kit", KIT, "--id", &id]).ok();
        pcrd(&daemon, &["plate", "assign", &id, tube]).ok();
        pcrd(&daemon, &["plate", "seal", &id]).ok();
        plates.push(id);
    }
    let run = pcrd(
        &daemon,
        &["plate", "transfer", "PL-Q1", "PL-Q2", "--to", "PCR-1"],
    );
    assert_eq!(run.code, 2, "two plates is a usage error: {run:#?}");

    let mut args = vec!["plate", "transfer"];
    args.extend(plates.iter().map(String::as_str));
    args.extend(["--to", "PCR-384"]);
    let map = pcrd(&daemon, &args).ok().stdout;
    assert!(map.starts_with("created PCR plate PCR-384 from PL-Q1, PL-Q2, PL-Q3, PL-Q4"));
    assert!(map.contains("quadrants of Q1 PL-Q1, Q2 PL-Q2, Q3 PL-Q3, Q4 PL-Q4"));
    let rows: Vec<char> = ('A'..='P').collect();
    for letter in &rows {
        assert_eq!(grid_row(&map, *letter).len(), 24, "row {letter}:\n{map}");
    }
    assert!(map.lines().all(|l| l.chars().count() <= 160), "{map}");
    // Q1 A1 -> A1, Q2 A1 -> A2, Q3 A1 -> B1, Q4 A1 -> B2.
    assert_eq!(grid_row(&map, 'A')[..2], ["0001", "0002"]);
    assert_eq!(grid_row(&map, 'B')[..2], ["0003", "0004"]);
    let legend = legend(&map);
    assert!(legend.contains(&("B2".to_string(), "QUAD-000004".to_string())));
}

#[test]
fn a_missing_token_is_a_usage_error() {
    let run = run_with(&[("PCRD_API", "http://127.0.0.1:1")], &["tube", "waiting"]);
    assert_eq!(run.code, 2, "{run:#?}");
    assert!(run.stderr.contains("PCRD_TOKEN"), "{}", run.stderr);
    assert!(run.stderr.contains("--token"), "{}", run.stderr);
}

#[test]
fn a_wrong_token_is_refused() {
    let daemon = Daemon::start();
    let run = run_with(
        &[("PCRD_API", &daemon.url), ("PCRD_TOKEN", "not-a-token")],
        &["kits"],
    );
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("unknown token"), "{}", run.stderr);
}

#[test]
fn an_unreachable_daemon_exits_4_and_says_where_it_looked() {
    let run = run_with(
        &[
            ("PCRD_API", "http://127.0.0.1:1"),
            ("PCRD_TOKEN", TECH_TOKEN),
        ],
        &["plate", "list"],
    );
    assert_eq!(run.code, 4, "{run:#?}");
    assert!(run.stderr.contains("http://127.0.0.1:1"), "{}", run.stderr);
    assert!(
        run.stderr.contains("could not be reached"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("pcrd serve"), "{}", run.stderr);
}

#[test]
fn kits_are_listed() {
    let daemon = Daemon::start();
    let text = pcrd(&daemon, &["kits"]).ok().stdout;
    let row = text
        .lines()
        .find(|l| l.starts_with(KIT))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("96,384"), "{row}");
    assert!(
        row.contains("ORF1ab FAM <=40.00"),
        "targets and cut-offs: {row}"
    );
    let json = pcrd(&daemon, &["kits", "--json"]).ok().json();
    let kit = json
        .as_array()
        .expect("kits")
        .iter()
        .find(|k| k["id"] == KIT)
        .expect("the kit");
    let targets: Vec<&str> = kit["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    assert_eq!(targets, ["ORF1ab", "N", "IC"], "channel order");
    assert_eq!(kit["targets"][1]["loinc"], "94510-5");
    assert_eq!(kit["result_loinc"], "94500-6");
    // All three shipped kits are there.
    for id in [
        "cdc-n1-n2-rp",
        "sarscov2-orf1ab-n-ic",
        "sarscov2-orf1ab-n-s-ms2",
    ] {
        assert!(
            json.as_array().expect("kits").iter().any(|k| k["id"] == id),
            "{id}"
        );
    }
}

#[test]
fn bash_completions_mention_pcrd() {
    let run = run_with(&[], &["completions", "bash"]).ok();
    assert!(run.stdout.contains("_pcrd()"), "{}", run.stdout);
    assert!(run.stdout.contains("complete -F _pcrd"), "{}", run.stdout);
    assert!(run.stdout.contains("receive"), "subcommands are completed");
}
