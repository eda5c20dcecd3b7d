//! The PostgreSQL table-exchange sink against a real PostgreSQL server started by the
//! harness (tests/src/postgres.rs): each test has its own server and database.

use std::path::Path;
use std::process::Command;

use pcrd::sinks::postgres::{PostgresConfig, PostgresSink, RawPostgresConfig};
use pcrd::sinks::{DeadReason, ItemOutcome, OutboxItem};
use pcrd_protocol::upstream::{
    Interpretation, KitRef, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus, TargetCall,
    TargetResult,
};
use pcrd_tests::postgres::PgServer;

fn record(n: u32, version: u32) -> ResultRecord {
    ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        result_id: format!("LAB1-R0001-{n:06}"),
        version,
        tube: format!("T{n:07}"),
        pool_size: 5,
        plate: "P0001".into(),
        well: "A1".into(),
        run: "R0001".into(),
        instrument: "cycler-1".into(),
        kit: KitRef {
            id: "cdc-n1-n2-rp".into(),
            version: "1".into(),
        },
        targets: vec![
            TargetResult {
                name: "N1".into(),
                dye: "FAM".into(),
                loinc: Some("94759-8".into()),
                ct: Some(24.31),
                call: TargetCall::Detected,
            },
            TargetResult {
                name: "RP".into(),
                dye: "HEX".into(),
                loinc: None,
                ct: None,
                call: TargetCall::NotDetected,
            },
        ],
        interpretation: Interpretation::Positive,
        status: if version == 1 {
            ResultStatus::Final
        } else {
            ResultStatus::Corrected
        },
        correction_reason: (version > 1).then(|| "well swap\tfound on review\\".to_owned()),
        tested_at: "2026-11-27T06:00:00.000Z".into(),
        released_at: "2026-11-27T06:10:00.000Z".into(),
        released_by: "auto".into(),
        lab_id: "LAB1".into(),
    }
}

fn items(range: std::ops::Range<u32>, version: u32) -> Vec<OutboxItem> {
    range
        .map(|n| OutboxItem {
            seq: u64::from(n),
            record: record(n, version),
            attempt: 0,
        })
        .collect()
}

fn sink(server: &PgServer, dbname: &str, table: Option<&str>, create: bool) -> PostgresSink {
    let raw = RawPostgresConfig {
        host: Some(server.host().to_owned()),
        port: Some(server.port()),
        user: Some(server.user().to_owned()),
        dbname: Some(dbname.to_owned()),
        table: table.map(str::to_owned),
        connect_timeout: Some("3s".into()),
        statement_timeout: Some("5s".into()),
        create_table: create,
        ..Default::default()
    };
    let config = PostgresConfig::from_raw(raw, Path::new("."), &|_| None).expect("valid config");
    PostgresSink::new(&config).expect("sink")
}

fn count(server: &PgServer, dbname: &str, sql: &str) -> u64 {
    server
        .psql(dbname, sql)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn all_delivered(outcomes: &[ItemOutcome], n: usize) {
    assert_eq!(outcomes.len(), n);
    assert!(
        outcomes.iter().all(|o| *o == ItemOutcome::Delivered),
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn batches_land_once_and_a_resent_batch_adds_nothing() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    let mut sink = sink(&server, &db, None, true);
    for start in [0, 100, 200] {
        all_delivered(&sink.deliver(&items(start..start + 100, 1)).await, 100);
    }
    assert_eq!(
        count(&server, &db, "SELECT count(*) FROM pcrd_results"),
        300
    );
    // A crash after the commit and before the outbox cursor moved: the same batch again.
    all_delivered(&sink.deliver(&items(100..200, 1)).await, 100);
    // And a new sink (a restarted daemon) sending it once more.
    let mut again = self::sink(&server, &db, None, true);
    all_delivered(&again.deliver(&items(0..50, 1)).await, 50);
    assert_eq!(
        count(&server, &db, "SELECT count(*) FROM pcrd_results"),
        300
    );

    // The row holds the record's fields, its targets, the whole record and the key.
    let row = server.psql(
        &db,
        "SELECT idempotency_key, tube, pool_size, kit_id, interpretation, status, \
         tested_at = '2026-11-27T06:00:00Z'::timestamptz, json_array_length(targets), \
         targets -> 1 ->> 'ct' IS NULL, record ->> 'released_by', \
         correction_reason IS NULL \
         FROM pcrd_results WHERE result_id = 'LAB1-R0001-000042'",
    );
    assert_eq!(
        row.trim(),
        "LAB1-R0001-000042:1|T0000042|5|cdc-n1-n2-rp|positive|final|t|2|t|auto|t"
    );
    let record_json = server.psql(
        &db,
        "SELECT record FROM pcrd_results WHERE result_id = 'LAB1-R0001-000007'",
    );
    let stored: ResultRecord = serde_json::from_str(record_json.trim()).expect("record JSON");
    assert_eq!(stored, record(7, 1));
    // The per-target view.
    assert_eq!(
        server
            .psql(
                &db,
                "SELECT name || ',' || coalesce(ct::text, 'null') || ',' || call \
                 FROM pcrd_results_targets WHERE result_id = 'LAB1-R0001-000007' \
                 ORDER BY target_index"
            )
            .trim(),
        "N1,24.31,detected\nRP,null,not_detected"
    );
}

#[tokio::test]
async fn a_correction_lands_as_a_new_row_beside_the_first_version() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    let mut sink = sink(&server, &db, None, true);
    all_delivered(&sink.deliver(&items(0..10, 1)).await, 10);
    all_delivered(&sink.deliver(&items(3..4, 2)).await, 1);
    assert_eq!(count(&server, &db, "SELECT count(*) FROM pcrd_results"), 11);
    assert_eq!(
        server
            .psql(
                &db,
                "SELECT version || '|' || status || '|' || coalesce(correction_reason, '-') \
                 FROM pcrd_results WHERE result_id = 'LAB1-R0001-000003' ORDER BY version"
            )
            .trim(),
        // The tab and backslash arrive as written (binary COPY has no escapes).
        "1|final|-\n2|corrected|well swap\tfound on review\\"
    );
}

#[tokio::test]
async fn a_value_the_table_refuses_dead_letters_only_that_item() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    let mut sink = sink(&server, &db, None, true);
    all_delivered(&sink.deliver(&items(100..101, 1)).await, 1);
    // The central system's own rule, which pcrd knows nothing of: the server refuses
    // the row inside the batch's transaction.
    server.psql(
        &db,
        "ALTER TABLE pcrd_results ADD CONSTRAINT no_quarantined_plate \
         CHECK (plate <> 'P-QUARANTINE')",
    );
    let mut batch = items(0..7, 1);
    batch[2].record.tested_at = "yesterday-ish".into();
    batch[4].record.plate = "P\u{0}1".into();
    batch[5].record.plate = "P-QUARANTINE".into();
    let outcomes = sink.deliver(&batch).await;
    assert_eq!(outcomes.len(), 7);
    for (i, outcome) in outcomes.iter().enumerate() {
        match (i, outcome) {
            // pcrd cannot encode a timestamp it cannot read (the table would refuse it).
            (
                2,
                ItemOutcome::Dead {
                    reason: DeadReason::Unencodable,
                    detail,
                },
            ) => assert!(detail.contains("yesterday-ish"), "{detail}"),
            (
                4,
                ItemOutcome::Dead {
                    reason: DeadReason::Unencodable,
                    detail,
                },
            ) => assert!(detail.contains("NUL"), "{detail}"),
            (
                5,
                ItemOutcome::Dead {
                    reason: DeadReason::Rejected,
                    detail,
                },
            ) => assert!(detail.contains("no_quarantined_plate"), "{detail}"),
            (2 | 4 | 5, other) => panic!("item {i}: {other:?}"),
            (_, other) => assert_eq!(*other, ItemOutcome::Delivered, "item {i}"),
        }
    }
    assert_eq!(count(&server, &db, "SELECT count(*) FROM pcrd_results"), 5);
    // The connection is still good for the next batch.
    all_delivered(&sink.deliver(&items(10..20, 1)).await, 10);
    assert_eq!(count(&server, &db, "SELECT count(*) FROM pcrd_results"), 15);
}

#[tokio::test]
async fn a_server_stopped_mid_way_means_retry_and_after_restart_delivery() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    let mut sink = sink(&server, &db, None, true);
    all_delivered(&sink.deliver(&items(0..100, 1)).await, 100);
    server.stop();
    let outcomes = sink.deliver(&items(100..200, 1)).await;
    assert_eq!(outcomes.len(), 100);
    for outcome in &outcomes {
        assert!(matches!(outcome, ItemOutcome::Retry { .. }), "{outcome:?}");
    }
    // Still down on the next attempt: retried again, with the connection error.
    let outcomes = sink.deliver(&items(100..200, 1)).await;
    match &outcomes[0] {
        ItemOutcome::Retry { reason, .. } => {
            assert!(reason.contains("cannot connect"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    server.start_again();
    all_delivered(&sink.deliver(&items(100..200, 1)).await, 100);
    assert_eq!(
        count(&server, &db, "SELECT count(*) FROM pcrd_results"),
        200
    );
}

#[tokio::test]
async fn a_missing_table_is_retried_with_the_fix_and_the_cli_ddl_creates_a_working_table() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    server.psql(&db, "CREATE SCHEMA central");
    let mut sink = sink(&server, &db, Some("central.lab_results"), false);
    let outcomes = sink.deliver(&items(0..5, 1)).await;
    match &outcomes[4] {
        ItemOutcome::Retry { reason, .. } => assert!(
            reason.contains("does not exist")
                && reason.contains("pcrd sink schema postgres --table central.lab_results"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }

    let output = Command::new(pcrd_tests::pcrd_bin())
        .args([
            "sink",
            "schema",
            "postgres",
            "--table",
            "central.lab_results",
        ])
        .output()
        .expect("run pcrd sink schema");
    assert!(output.status.success(), "{output:?}");
    let ddl = String::from_utf8(output.stdout).expect("UTF-8 DDL");
    assert!(ddl.contains("PRIMARY KEY (result_id, version)"), "{ddl}");
    server.psql(&db, &ddl);
    // Idempotent: applying it twice is harmless.
    server.psql(&db, &ddl);

    all_delivered(&sink.deliver(&items(0..5, 1)).await, 5);
    assert_eq!(
        count(&server, &db, "SELECT count(*) FROM central.lab_results"),
        5
    );
    assert_eq!(
        count(
            &server,
            &db,
            "SELECT count(*) FROM central.lab_results_targets"
        ),
        10
    );

    // A bad table name is refused by the CLI with a message.
    let output = Command::new(pcrd_tests::pcrd_bin())
        .args(["sink", "schema", "postgres", "--table", "x; DROP TABLE y"])
        .output()
        .expect("run pcrd sink schema");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a table name"));
}

#[tokio::test]
async fn a_table_lacking_columns_is_named_in_the_retry() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    server.psql(
        &db,
        "CREATE TABLE pcrd_results (result_id text, version integer, tube text)",
    );
    let mut sink = sink(&server, &db, None, false);
    match &sink.deliver(&items(0..1, 1)).await[0] {
        ItemOutcome::Retry { reason, .. } => {
            assert!(
                reason.contains("lacks the columns idempotency_key"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_large_batch_is_written_by_two_sessions_and_a_refusal_in_either_stays_alone() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    let mut sink = sink(&server, &db, None, true);
    all_delivered(&sink.deliver(&items(0..1000, 1)).await, 1000);
    let sessions = count(
        &server,
        &db,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pcrd'",
    );
    assert_eq!(sessions, 2, "the default is two sessions");

    server.psql(
        &db,
        "ALTER TABLE pcrd_results ADD CONSTRAINT no_quarantined_plate \
         CHECK (plate <> 'P-QUARANTINE')",
    );
    let mut batch = items(1000..2000, 1);
    batch[100].record.plate = "P-QUARANTINE".into();
    batch[900].record.plate = "P-QUARANTINE".into();
    let outcomes = sink.deliver(&batch).await;
    for (i, outcome) in outcomes.iter().enumerate() {
        match (i, outcome) {
            (100 | 900, ItemOutcome::Dead { reason, .. }) => {
                assert_eq!(*reason, DeadReason::Rejected)
            }
            (_, other) => assert_eq!(*other, ItemOutcome::Delivered, "item {i}"),
        }
    }
    assert_eq!(
        count(&server, &db, "SELECT count(*) FROM pcrd_results"),
        1998
    );
}

#[tokio::test]
async fn typed_columns_match_what_the_server_reads_from_the_record_itself() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    let mut sink = sink(&server, &db, None, true);
    let mut batch = items(0..4, 1);
    // Offsets, fractions beyond milliseconds, a leap day, before 2000.
    batch[0].record.tested_at = "2026-11-27T07:10:00.123+01:00".into();
    batch[1].record.tested_at = "2024-02-29T23:59:59.999999Z".into();
    batch[2].record.tested_at = "1999-12-31T23:59:59.5-05:30".into();
    batch[3].record.released_at = "2026-01-01T00:00:00.000001z".into();
    all_delivered(&sink.deliver(&batch).await, 4);
    // Every typed column equals the server's own reading of the stored record: the
    // client-side extraction (binary COPY) agrees with PostgreSQL's parser.
    let mismatches = count(
        &server,
        &db,
        "SELECT count(*) FROM pcrd_results WHERE NOT ( \
            result_id = record ->> 'result_id' \
            AND version = (record ->> 'version')::integer \
            AND idempotency_key = (record ->> 'result_id') || ':' || (record ->> 'version') \
            AND schema_version = (record ->> 'schema_version')::integer \
            AND tube = record ->> 'tube' AND pool_size = (record ->> 'pool_size')::smallint \
            AND plate = record ->> 'plate' AND well = record ->> 'well' \
            AND run = record ->> 'run' AND instrument = record ->> 'instrument' \
            AND kit_id = record -> 'kit' ->> 'id' \
            AND kit_version = record -> 'kit' ->> 'version' \
            AND interpretation = record ->> 'interpretation' \
            AND status = record ->> 'status' \
            AND correction_reason IS NOT DISTINCT FROM record ->> 'correction_reason' \
            AND tested_at = (record ->> 'tested_at')::timestamptz \
            AND released_at = (record ->> 'released_at')::timestamptz \
            AND released_by = record ->> 'released_by' AND lab_id = record ->> 'lab_id' \
            AND targets::text = (record -> 'targets')::text)",
    );
    assert_eq!(mismatches, 0);
    assert_eq!(count(&server, &db, "SELECT count(*) FROM pcrd_results"), 4);
}

#[tokio::test]
async fn a_table_with_jsonb_columns_from_an_earlier_ddl_still_takes_results() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    // The DDL as pcrd printed it before targets and record became json, with a GIN
    // index an operator might add: pcrd casts to the table's own types.
    server.psql(
        &db,
        &pcrd::sinks::postgres::schema_sql(
            &pcrd::sinks::postgres::TableName::parse("pcrd_results").expect("name"),
        ),
    );
    server.psql(
        &db,
        "DROP VIEW pcrd_results_targets; \
         ALTER TABLE pcrd_results ALTER targets TYPE jsonb, ALTER record TYPE jsonb; \
         CREATE INDEX pcrd_results_record ON pcrd_results USING gin (record)",
    );
    let mut sink = sink(&server, &db, None, false);
    all_delivered(&sink.deliver(&items(0..300, 1)).await, 300);
    all_delivered(&sink.deliver(&items(0..300, 1)).await, 300);
    assert_eq!(
        count(
            &server,
            &db,
            "SELECT count(*) FROM pcrd_results WHERE record @> '{\"tube\": \"T0000042\"}'"
        ),
        1
    );
    assert_eq!(
        count(&server, &db, "SELECT count(*) FROM pcrd_results"),
        300
    );
    // With create_table = true the current DDL runs against this table at connect:
    // the view comes back, reading the jsonb targets through a cast.
    let mut creating = self::sink(&server, &db, None, true);
    all_delivered(&creating.deliver(&items(300..310, 1)).await, 10);
    assert_eq!(
        count(&server, &db, "SELECT count(*) FROM pcrd_results_targets"),
        620
    );
    // A column type pcrd cannot write JSON into is named in the retry.
    server.psql(
        &db,
        "DROP VIEW pcrd_results_targets; \
         ALTER TABLE pcrd_results ALTER targets TYPE xml USING '<t/>'::xml",
    );
    let mut sink = self::sink(&server, &db, None, false);
    match &sink.deliver(&items(310..311, 1)).await[0] {
        ItemOutcome::Retry { reason, .. } => {
            assert!(
                reason.contains("the column targets of pcrd_results is xml"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
}

/// Every stored row, as (key, record), in key order.
fn stored_records(server: &PgServer, dbname: &str, table: &str) -> Vec<(String, ResultRecord)> {
    server
        .psql(
            dbname,
            &format!("SELECT idempotency_key, record FROM {table} ORDER BY idempotency_key"),
        )
        .lines()
        .map(|line| {
            let (key, json) = line.split_once('|').expect("key|record");
            let record: ResultRecord = serde_json::from_str(json).expect("record JSON");
            (key.to_owned(), record)
        })
        .collect()
}

/// What the server log gained since `before` (its length then).
fn log_since(server: &PgServer, before: usize) -> String {
    server.log().get(before..).unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_batch_committed_before_and_sent_again_whole_or_half_adds_only_what_is_missing() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    server.log_statements();
    let mut first = sink(&server, &db, None, true);
    // Two sessions of 300, each copying straight into the table.
    let before = server.log().len();
    all_delivered(&first.deliver(&items(0..600, 1)).await, 600);
    let log = log_since(&server, before);
    assert_eq!(
        log.matches("COPY \"pcrd_results\"").count(),
        2,
        "the fast path, once per session:\n{log}"
    );
    assert!(
        !log.contains("COPY pg_temp.pcrd_staging"),
        "no staging:\n{log}"
    );

    // A restart after those commits and before the cursor moved: the whole batch
    // again, from a new sink. The COPY meets the primary key, rolls back, and the
    // batch goes through staging and ON CONFLICT DO NOTHING.
    let mut restarted = sink(&server, &db, None, false);
    let before = server.log().len();
    all_delivered(&restarted.deliver(&items(0..600, 1)).await, 600);
    let log = log_since(&server, before);
    assert!(
        log.contains("duplicate key value violates unique constraint"),
        "the fast path was tried and refused:\n{log}"
    );
    assert_eq!(
        log.matches("INSERT INTO \"pcrd_results\"").count(),
        2,
        "each session fell back to staging:\n{log}"
    );
    assert_eq!(
        count(&server, &db, "SELECT count(*) FROM pcrd_results"),
        600
    );

    // Half a batch committed (600..750 by one daemon), then the whole batch
    // (600..900, one session) sent by the restarted one: only the missing half lands.
    all_delivered(&first.deliver(&items(600..750, 1)).await, 150);
    let mut again = sink(&server, &db, None, false);
    all_delivered(&again.deliver(&items(600..900, 1)).await, 300);
    // After a batch that met old rows the next one goes through staging too; it
    // inserts all of its rows, so the one after it takes the fast path again.
    all_delivered(&again.deliver(&items(900..1000, 1)).await, 100);
    let before = server.log().len();
    all_delivered(&again.deliver(&items(1000..1100, 1)).await, 100);
    let log = log_since(&server, before);
    assert!(
        log.contains("COPY \"pcrd_results\"") && !log.contains("COPY pg_temp.pcrd_staging"),
        "back on the fast path:\n{log}"
    );

    // Exactly one row per key, each the record released, nothing dead-lettered
    // (all_delivered above), no key twice.
    let expected: Vec<(String, ResultRecord)> = {
        let mut all: Vec<_> = items(0..1100, 1)
            .into_iter()
            .map(|i| (i.record.idempotency_key(), i.record))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    };
    let stored = stored_records(&server, &db, "pcrd_results");
    assert_eq!(stored.len(), 1100);
    assert!(
        stored == expected,
        "the stored rows differ from the records"
    );
    assert_eq!(
        count(
            &server,
            &db,
            "SELECT count(DISTINCT (result_id, version)) FROM pcrd_results"
        ),
        1100
    );
}

#[tokio::test]
async fn a_table_the_fast_path_cannot_guard_takes_every_batch_through_staging() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    server.log_statements();
    let ddl = |table: &str| {
        pcrd::sinks::postgres::schema_sql(
            &pcrd::sinks::postgres::TableName::parse(table).expect("name"),
        )
    };

    // A view over the table (COPY cannot write into a view; INSERT can).
    server.psql(&db, &ddl("base_results"));
    server.psql(
        &db,
        "CREATE VIEW viewed_results AS SELECT * FROM base_results",
    );
    // Columns of wider types than pcrd's (binary COPY would not convert them).
    server.psql(&db, &ddl("wide_results"));
    server.psql(
        &db,
        "DROP VIEW wide_results_targets; \
         ALTER TABLE wide_results ALTER version TYPE bigint, ALTER tube TYPE varchar(32)",
    );
    for (table, rows) in [
        ("viewed_results", "base_results"),
        ("wide_results", "wide_results"),
    ] {
        let before = server.log().len();
        let mut sink = sink(&server, &db, Some(table), false);
        all_delivered(&sink.deliver(&items(0..100, 1)).await, 100);
        all_delivered(&sink.deliver(&items(50..150, 1)).await, 100);
        let log = log_since(&server, before);
        assert!(
            !log.contains(&format!("COPY \"{table}\""))
                && log.contains("COPY pg_temp.pcrd_staging"),
            "{table}: staging only:\n{log}"
        );
        let expected: Vec<(String, ResultRecord)> = {
            let mut all: Vec<_> = items(0..150, 1)
                .into_iter()
                .map(|i| (i.record.idempotency_key(), i.record))
                .collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            all
        };
        assert!(
            stored_records(&server, &db, rows) == expected,
            "{table}: the stored rows differ from the records"
        );
    }
    assert_eq!(
        count(&server, &db, "SELECT max(version) FROM wide_results"),
        1
    );

    // Tables INSERT ... ON CONFLICT refuses, which COPY would fill: without a unique
    // key on (result_id, version) a batch sent again would land twice; with a rule
    // (COPY ignores rules) the central system's rule would silently not run. Both stay
    // what they were before the fast path: every result retried, the message naming
    // the problem, nothing written.
    server.psql(&db, &ddl("unkeyed_results"));
    server.psql(
        &db,
        "ALTER TABLE unkeyed_results DROP CONSTRAINT unkeyed_results_pkey",
    );
    server.psql(&db, &ddl("ruled_results"));
    server.psql(
        &db,
        "CREATE TABLE ruled_audit (key text NOT NULL); \
         CREATE RULE audit AS ON INSERT TO ruled_results \
         DO ALSO INSERT INTO ruled_audit VALUES (NEW.idempotency_key)",
    );
    for (table, problem) in [
        (
            "unkeyed_results",
            "no unique or exclusion constraint matching the ON CONFLICT",
        ),
        (
            "ruled_results",
            "cannot be used with table that has INSERT or UPDATE rules",
        ),
    ] {
        let mut sink = sink(&server, &db, Some(table), false);
        for outcome in sink.deliver(&items(0..10, 1)).await {
            match outcome {
                ItemOutcome::Retry { reason, .. } => {
                    assert!(reason.contains(problem), "{table}: {reason}")
                }
                other => panic!("{table}: {other:?}"),
            }
        }
        assert_eq!(
            count(&server, &db, &format!("SELECT count(*) FROM {table}")),
            0
        );
    }
}

#[tokio::test]
async fn a_table_without_the_record_column_takes_every_field_in_its_own_column() {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    server.psql(
        &db,
        &pcrd::sinks::postgres::schema_sql(
            &pcrd::sinks::postgres::TableName::parse("pcrd_results").expect("name"),
        ),
    );
    // The operator dropped the whole-record column: every field has its own column.
    server.psql(&db, "ALTER TABLE pcrd_results DROP COLUMN record");
    let mut sink = sink(&server, &db, None, false);
    let mut batch = items(0..300, 1);
    batch[7] = OutboxItem {
        seq: 7,
        record: record(7, 2),
        attempt: 0,
    };
    batch[9].record.targets[1].name = "R\u{0}P".into();
    let outcomes = sink.deliver(&batch).await;
    for (i, outcome) in outcomes.iter().enumerate() {
        match (i, outcome) {
            (9, ItemOutcome::Dead { reason, detail }) => {
                assert_eq!(*reason, DeadReason::Unencodable);
                assert!(detail.contains("targets holds a NUL"), "{detail}");
            }
            (_, other) => assert_eq!(*other, ItemOutcome::Delivered, "item {i}"),
        }
    }
    // Sent again (with version 1 of result 7, new): only that row is added; then half
    // committed and sent again: nothing twice.
    all_delivered(&sink.deliver(&items(0..9, 1)).await, 9);
    let mut restarted = self::sink(&server, &db, None, false);
    all_delivered(&restarted.deliver(&items(300..450, 1)).await, 150);
    let mut again = self::sink(&server, &db, None, false);
    all_delivered(&again.deliver(&items(300..600, 1)).await, 300);
    assert_eq!(
        count(&server, &db, "SELECT count(*) FROM pcrd_results"),
        600
    );
    // The record rebuilt from the columns is the record released.
    let rebuilt = server.psql(
        &db,
        "SELECT json_build_object('schema_version', schema_version, 'result_id', result_id, \
         'version', version, 'tube', tube, 'pool_size', pool_size, 'plate', plate, \
         'well', well, 'run', run, 'instrument', instrument, \
         'kit', json_build_object('id', kit_id, 'version', kit_version), \
         'targets', targets, 'interpretation', interpretation, 'status', status, \
         'correction_reason', correction_reason, \
         'tested_at', to_char(tested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
         'released_at', to_char(released_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
         'released_by', released_by, 'lab_id', lab_id) \
         FROM pcrd_results WHERE result_id IN ('LAB1-R0001-000007', 'LAB1-R0001-000042') \
         ORDER BY result_id, version",
    );
    let rebuilt: Vec<ResultRecord> = rebuilt
        .lines()
        .map(|line| serde_json::from_str(line).expect("rebuilt record"))
        .collect();
    assert_eq!(rebuilt, vec![record(7, 1), record(7, 2), record(42, 1)]);
}
