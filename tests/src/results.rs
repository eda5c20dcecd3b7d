//! Realistic released results for the sinks' tests and benches, and a helper that
//! seeds a store with them through the library (Store + Lab + release), as the review
//! flow would, without a running daemon.
//!
//! Records are deterministic in `n`: plates of 94 tubes (two wells of 96 are the
//! controls), a three-target multiplex kit (N1 FAM, N2 HEX, RP Cy5), about 3 %
//! positive, 0.5 % inconclusive, 0.5 % invalid, pools of 1, 5 or 10 swabs.

use std::path::Path;

use pcrd::kits::KitRegistry;
use pcrd::lab::{Actor, Lab};
use pcrd::store::{Store, StoreOptions};
use pcrd_protocol::upstream::{
    Interpretation, KitRef, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus, TargetCall,
    TargetResult,
};

/// The lab id of [`crate::TEST_CONFIG`].
pub const TEST_LAB: &str = "LAB-TEST";
/// Tubes per plate (96 wells less the positive and negative control).
pub const TUBES_PER_PLATE: usize = 94;

/// `n` results of [`TEST_LAB`], version 1, final.
pub fn records(n: usize) -> Vec<ResultRecord> {
    records_for(TEST_LAB, 0, n)
}

/// `count` results of lab `lab_id`, numbered from `first`.
pub fn records_for(lab_id: &str, first: usize, count: usize) -> Vec<ResultRecord> {
    (first..first + count).map(|i| record(lab_id, i)).collect()
}

/// A small deterministic mixer, so record `i` is the same in every run.
fn mix(i: usize, salt: u64) -> u64 {
    let mut x = (i as u64).wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Result number `i` of lab `lab_id`.
pub fn record(lab_id: &str, i: usize) -> ResultRecord {
    let plate_no = i / TUBES_PER_PLATE;
    let slot = i % TUBES_PER_PLATE;
    let well = format!("{}{}", (b'A' + (slot % 8) as u8) as char, slot / 8 + 1);
    let plate = format!("P{plate_no:06}");
    let run = format!("R{plate_no:06}");
    let tube = format!("T{i:08}");
    let roll = mix(i, 1) % 1000;
    let ct = |salt: u64, low: f64, span: f64| {
        let r = (mix(i, salt) % 10_000) as f64 / 10_000.0;
        ((low + r * span) * 100.0).round() / 100.0
    };
    let rp = Some(ct(4, 24.0, 6.0));
    let (interpretation, n1, n2, calls) = match roll {
        0..=29 => (
            Interpretation::Positive,
            Some(ct(2, 16.0, 18.0)),
            Some(ct(3, 16.5, 18.0)),
            [TargetCall::Detected, TargetCall::Detected],
        ),
        30..=34 => (
            Interpretation::Inconclusive,
            Some(ct(2, 38.0, 1.9)),
            None,
            [TargetCall::Inconclusive, TargetCall::NotDetected],
        ),
        35..=39 => (
            Interpretation::Invalid,
            None,
            None,
            [TargetCall::Invalid, TargetCall::Invalid],
        ),
        _ => (
            Interpretation::Negative,
            None,
            None,
            [TargetCall::NotDetected, TargetCall::NotDetected],
        ),
    };
    let rp_call = if interpretation == Interpretation::Invalid {
        TargetCall::Invalid
    } else {
        TargetCall::Detected
    };
    let minutes = plate_no as u64 * 30;
    let tested = format!(
        "2026-11-{:02}T{:02}:{:02}:00.000Z",
        1 + (minutes / 1440) % 28,
        (minutes / 60) % 24,
        minutes % 60
    );
    let released = tested.replace(":00.000Z", ":30.000Z");
    ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        result_id: format!("{lab_id}-{run}-{well}-{tube}"),
        version: 1,
        tube,
        pool_size: [1, 1, 1, 5, 10][(mix(i, 5) % 5) as usize],
        plate,
        well,
        run,
        instrument: format!("cycler-{}", 1 + plate_no % 3),
        kit: KitRef {
            id: "sars-cov-2-n1-n2-rp".into(),
            version: "2".into(),
        },
        targets: vec![
            TargetResult {
                name: "N1".into(),
                dye: "FAM".into(),
                loinc: Some("94311-8".into()),
                ct: n1,
                call: calls[0],
            },
            TargetResult {
                name: "N2".into(),
                dye: "HEX".into(),
                loinc: Some("94312-6".into()),
                ct: n2,
                call: calls[1],
            },
            TargetResult {
                name: "RP".into(),
                dye: "Cy5".into(),
                loinc: None,
                ct: if rp_call == TargetCall::Invalid {
                    None
                } else {
                    rp
                },
                call: rp_call,
            },
        ],
        interpretation,
        status: ResultStatus::Final,
        correction_reason: None,
        tested_at: tested,
        released_at: released,
        released_by: "auto".into(),
        lab_id: lab_id.into(),
    }
}

/// A correction of `original` (version + 1, status corrected, with a reason).
pub fn correction(original: &ResultRecord, reason: &str) -> ResultRecord {
    let mut next = original.clone();
    next.version += 1;
    next.status = ResultStatus::Corrected;
    next.correction_reason = Some(reason.into());
    next
}

/// Opens the store at `store_dir` (creating it), releases `records` in batches of
/// `batch` as user `rob`, and closes the store cleanly. Runs on its own thread with its
/// own runtime, so async tests can call it too.
pub fn seed_store(
    store_dir: &Path,
    lab_id: &str,
    records: Vec<ResultRecord>,
    batch: usize,
) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| seed_on_this_thread(store_dir, lab_id, records, batch))
            .join()
            .map_err(|_| anyhow::anyhow!("the seeding thread panicked"))?
    })
}

fn seed_on_this_thread(
    store_dir: &Path,
    lab_id: &str,
    records: Vec<ResultRecord>,
    batch: usize,
) -> anyhow::Result<()> {
    let store = Store::open(&StoreOptions {
        path: store_dir.to_path_buf(),
        cache_bytes: 4 * 1024 * 1024,
    })?;
    let kits = KitRegistry::load(None).map_err(|p| anyhow::anyhow!("kits: {p:?}"))?;
    let lab = Lab::open(store.clone(), kits, lab_id.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut records = records;
    while !records.is_empty() {
        let rest = records.split_off(records.len().min(batch));
        let chunk = std::mem::replace(&mut records, rest);
        runtime.block_on(lab.release_results(
            Actor {
                user: "rob".into(),
                reason: None,
            },
            chunk,
        ))?;
    }
    drop(runtime);
    drop(lab);
    store.close()?;
    Ok(())
}
