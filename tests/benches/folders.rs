//! Watched export folders (issue 8): how long the real `pcrd serve` (release build)
//! takes to import a file once it has settled, beside the naive path for the same work.
//!
//! - **plate map**: a decapper map of one 96-well plate (94 tubes, the kit's two
//!   control wells left out) renamed into the watched folder; the import latency is
//!   the daemon's own `pcrd_folder_import_seconds` (file found settled -> lab
//!   transaction, import record and both durability barriers done; the move follows),
//!   and the wall time from the rename to the file in `done/` (adds up to one poll
//!   interval of 50 ms and the synced move). Side by side, the naive path a technician's
//!   client takes for the same plate: `POST /api/v1/plates` + `POST .../assign` with the
//!   94 placements, over HTTP on 127.0.0.1.
//! - **results**: a QuantStudio results CSV of the same plate (96 wells x 3 targets);
//!   import latency and rename-to-done as above. Side by side, the pure part of that
//!   work in this process: `read_results` + the kit's `judge_plate` (no store, no
//!   barrier, no move), so the difference is what the daemon adds.
//!
//! Run with `cargo bench -p pcrd-tests --bench folders`; `PCRD_BENCH_RUNS` sets the
//! runs per figure (default 15). Without `--bench` (as `cargo test --all-targets`
//! runs it) it only says it was skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use pcrd_protocol::domain::{PlateFormat, Well};
use pcrd_protocol::export::results::read_results;
use pcrd_protocol::interpret::Reading;
use pcrd_protocol::run_analysis::kit_target;
use pcrd_tests::bench::{bench, goal, median};
use pcrd_tests::{Api, Daemon, TEST_CONFIG, metric_value};
use serde_json::json;

const KIT: &str = "sarscov2-orf1ab-n-ic";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "folders: skipped: this is a benchmark, not a test; run \
             `cargo bench -p pcrd-tests --bench folders`"
        );
        return Ok(());
    }
    let runs: usize = std::env::var("PCRD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(runs))
}

/// The 94 sample wells of the kit's 96-well layout, column-major (G12, H12 are controls).
fn sample_wells() -> Vec<String> {
    let mut wells = Vec::new();
    for column in 1..=12 {
        for row in "ABCDEFGH".chars() {
            let well = format!("{row}{column}");
            if well != "G12" && well != "H12" {
                wells.push(well);
            }
        }
    }
    wells
}

fn tubes(prefix: &str, run: usize) -> Vec<String> {
    (1..=94)
        .map(|i| format!("{prefix}{run:03}-{i:03}"))
        .collect()
}

async fn wait_for(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        ensure!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

fn drop_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<Instant> {
    let tmp = dir.join(format!("{name}.part"));
    std::fs::write(&tmp, bytes)?;
    let at = Instant::now();
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(at)
}

async fn receive(api: &Api, barcodes: &[String]) -> Result<()> {
    let tubes: Vec<_> = barcodes.iter().map(|b| json!({"barcode": b})).collect();
    let reply = api.post("/api/v1/tubes", json!({"tubes": tubes})).await;
    ensure!(reply.status == 200, "receive: {}", reply.body);
    Ok(())
}

/// (sum, count) of the import latency histogram.
async fn import_seconds(api: &Api) -> (f64, f64) {
    let text = api.get_text("/metrics").await.text;
    (
        metric_value(&text, "pcrd_folder_import_seconds_sum").unwrap_or(0.0),
        metric_value(&text, "pcrd_folder_import_seconds_count").unwrap_or(0.0),
    )
}

/// A QuantStudio results CSV for `plate`: every sample well negative with IC, the
/// controls as they should be.
fn results_csv(plate: &str, tubes: &[String]) -> String {
    let mut out = format!(
        "* Block Type = 96-Well Block (0.2mL)\n* Experiment Barcode = {plate}\n\n[Results]\n\
         Well,Well Position,Sample Name,Target Name,Reporter,CT\n"
    );
    let mut sample_of: BTreeMap<String, String> = sample_wells()
        .into_iter()
        .zip(tubes.iter().cloned())
        .collect();
    sample_of.insert("G12".into(), "NTC".into());
    sample_of.insert("H12".into(), "PC".into());
    for (well, sample) in &sample_of {
        let parsed: Well = well.parse().unwrap_or(Well::new(0, 0));
        let number = usize::from(parsed.row()) * 12 + usize::from(parsed.column()) + 1;
        let (orf, n, ic) = match well.as_str() {
            "H12" => ("28.0", "28.5", "27.0"),
            "G12" => ("Undetermined", "Undetermined", "Undetermined"),
            _ => ("Undetermined", "Undetermined", "27.3"),
        };
        for (target, dye, ct) in [("ORF1ab", "FAM", orf), ("N", "VIC", n), ("IC", "CY5", ic)] {
            out.push_str(&format!("{number},{well},{sample},{target},{dye},{ct}\n"));
        }
    }
    out
}

async fn run(runs: usize) -> Result<()> {
    let config = format!(
        r#"{TEST_CONFIG}
[[folders]]
name = "decapper"
path = "exports/decapper"
kind = "plate_map"
kit = "{KIT}"
poll_ms = 50
settle_ms = 0

[[folders]]
name = "qs5"
path = "exports/qs5"
kind = "results"
kit = "{KIT}"
poll_ms = 50
settle_ms = 0
"#
    );
    let daemon = Daemon::start_with_config(&config);
    let api = daemon.client();
    let base: PathBuf = daemon
        .config_path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let decapper = base.join("exports/decapper");
    let qs5 = base.join("exports/qs5");
    std::fs::create_dir_all(&decapper)?;
    std::fs::create_dir_all(&qs5)?;
    let wells = sample_wells();
    let kits = pcrd::kits::KitRegistry::load(None).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    let kit = kits.find(KIT).map_err(anyhow::Error::msg)?.clone();

    let (mut map_import, mut map_wall, mut map_api) = (Vec::new(), Vec::new(), Vec::new());
    let (mut res_import, mut res_wall, mut res_pure) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs + 1 {
        // Plate map through the folder.
        let plate = format!("BM-MAP-{run:03}");
        let mapped = tubes("BMT", run);
        receive(&api, &mapped).await?;
        let mut map = String::from("Plate Barcode,Well,Tube Barcode\n");
        for (well, tube) in wells.iter().zip(&mapped) {
            map.push_str(&format!("{plate},{well},{tube}\n"));
        }
        let before = import_seconds(&api).await;
        let name = format!("{plate}.csv");
        let at = drop_file(&decapper, &name, map.as_bytes())?;
        wait_for(&decapper.join("done").join(&name)).await?;
        let wall = at.elapsed().as_secs_f64() * 1e3;
        let after = import_seconds(&api).await;
        ensure!(after.1 == before.1 + 1.0, "one import per run");
        let imported = (after.0 - before.0) * 1e3;
        let placed = api.get_ok(&format!("/api/v1/plates/{plate}")).await;
        ensure!(placed["samples"] == 94, "94 tubes placed: {placed}");

        // The same plate the naive way: create + assign over HTTP.
        let by_api = format!("BM-API-{run:03}");
        let assigned = tubes("BMA", run);
        receive(&api, &assigned).await?;
        let placements: Vec<_> = wells
            .iter()
            .zip(&assigned)
            .map(|(w, t)| json!({"well": w, "barcode": t}))
            .collect();
        let started = Instant::now();
        let reply = api
            .post("/api/v1/plates", json!({"kit": KIT, "id": by_api}))
            .await;
        ensure!(reply.status == 201, "{}", reply.body);
        let reply = api
            .post(
                &format!("/api/v1/plates/{by_api}/assign"),
                json!({"placements": placements}),
            )
            .await;
        ensure!(reply.status == 200, "{}", reply.body);
        let api_ms = started.elapsed().as_secs_f64() * 1e3;

        // Results for the mapped plate through the folder.
        let csv = results_csv(&plate, &mapped);
        let before = import_seconds(&api).await;
        let name = format!("{plate}-results.csv");
        let at = drop_file(&qs5, &name, csv.as_bytes())?;
        wait_for(&qs5.join("done").join(&name)).await?;
        let res_wall_ms = at.elapsed().as_secs_f64() * 1e3;
        let after = import_seconds(&api).await;
        ensure!(after.1 == before.1 + 1.0, "one import per run");
        let res_import_ms = (after.0 - before.0) * 1e3;
        let first = api
            .get_ok(&format!("/api/v1/tubes/{}/imported-results", mapped[0]))
            .await;
        ensure!(first[0]["call"] == "not_detected", "{first}");

        // The pure part: parse and judge in this process.
        let started = Instant::now();
        let file = read_results(csv.as_bytes())?;
        let mut readings: BTreeMap<Well, BTreeMap<String, Reading>> = BTreeMap::new();
        for row in &file.rows {
            let target = kit_target(&kit, &row.target, &row.reporter)
                .ok_or_else(|| anyhow::anyhow!("target {}", row.target))?;
            readings
                .entry(row.well)
                .or_default()
                .insert(target.name.clone(), Reading::from(row.ct));
        }
        let judged = kit.judge_plate(PlateFormat::Wells96, &readings)?;
        let pure_ms = started.elapsed().as_secs_f64() * 1e3;
        ensure!(judged.samples.len() == 94);

        if run == 0 {
            continue; // warm-up
        }
        map_import.push(imported);
        map_wall.push(wall);
        map_api.push(api_ms);
        res_import.push(res_import_ms);
        res_wall.push(res_wall_ms);
        res_pure.push(pure_ms);
    }
    let lines = [
        bench(
            "folders.plate_map.import",
            median(&map_import),
            "ms",
            &map_import,
        ),
        bench(
            "folders.plate_map.rename_to_done",
            median(&map_wall),
            "ms",
            &map_wall,
        ),
        bench(
            "folders.plate_map.naive_api_create_assign",
            median(&map_api),
            "ms",
            &map_api,
        ),
        bench(
            "folders.results.import",
            median(&res_import),
            "ms",
            &res_import,
        ),
        bench(
            "folders.results.rename_to_done",
            median(&res_wall),
            "ms",
            &res_wall,
        ),
        bench(
            "folders.results.pure_parse_judge",
            median(&res_pure),
            "ms",
            &res_pure,
        ),
        goal(
            "folders.results.rename_to_done_ms",
            median(&res_wall),
            "<",
            1000.0,
        ),
    ];
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
