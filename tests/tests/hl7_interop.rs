#![allow(clippy::unwrap_used)]
//! pcrd's HL7 sink against real receivers on 127.0.0.1 (issue 6, sink 4, "Interop").
//!
//! 1. An independent implementation: the `hl7` 0.4.5 package (PyPI) runs an MLLP
//!    server (`hl7.mllp.start_hl7_server`) that answers AA echoing MSH-10. For each
//!    message it also reports, as a JSON line, what it read: segment structure, MSH,
//!    PID-3, the OBX types, LOINC codes, SNOMED answers, values and statuses, SPM, and
//!    whether `hl7apy` 1.3.5 validates the message at its STRICT level. Both are
//!    installed into `$PCRD_PEERS/python` by `scripts/test.sh`; the test fails, never
//!    skips, when they are missing.
//! 2. A receiver written here with pcrd's own MLLP codec that answers from a script
//!    (AE, AR, silence, a wrong control id, a closed connection, noise), proving each
//!    outcome and that a retry after a timeout sends the same MSH-10 and bytes.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcrd::sinks::hl7::{Hl7Config, Hl7Sink};
use pcrd::sinks::{DeadReason, ItemOutcome, OutboxItem};
use pcrd_protocol::hl7::mllp::{self, MllpDecoder, MllpEvent};
use pcrd_protocol::hl7::{MessageHeader, control_id};
use pcrd_protocol::upstream::{
    Interpretation, KitRef, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus, TargetCall,
    TargetResult,
};
use pcrd_tests::peers_dir;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PATIENCE: Duration = Duration::from_secs(30);

/// The `hl7` MLLP server. Prints `port N` once listening; then per message a JSON
/// line with what it parsed and hl7apy's verdict, and answers AA (create_ack echoes
/// MSH-10 in MSA-2).
const PY_SERVER: &str = r#"
import asyncio, hashlib, json, sys
import hl7
from hl7.mllp import start_hl7_server
from hl7apy.parser import parse_message
from hl7apy.consts import VALIDATION_LEVEL

def report(msg):
    u = msg.unescape
    msh = msg.segment("MSH")
    out = {
        "segments": [str(s[0]) for s in msg],
        "type": str(msh[9]), "control_id": str(msh[10]), "processing": str(msh[11]),
        "version": str(msh[12]), "sender": [str(msh[3]), u(str(msh[4]))],
        "receiver": [u(str(msh[5])), u(str(msh[6]))], "ack_types": [str(msh[15]), str(msh[16])],
        "pid3": [u(str(c)) for c in msg.segment("PID")[3][0]],
        "pid5": str(msg.segment("PID")[5]),
        "obr4": str(msg.segment("OBR")[4][0][0]), "obr25": str(msg.segment("OBR")[25]),
        "nte": [u(str(s[3])) for s in msg.segments("NTE")] if "NTE" in [str(s[0]) for s in msg] else [],
        "obx": [], "sha256": hashlib.sha256(str(msg).encode()).hexdigest(),
    }
    def comps(field):
        return [u(c) for c in str(field).split("^")] + [""] * 9
    for o in msg.segments("OBX"):
        kind, code, value, units = str(o[2]), comps(o[3]), comps(o[5]), comps(o[6])
        out["obx"].append({
            "type": kind, "loinc": code[0], "code_system": code[2],
            "value": value[0], "value_system": value[2] if kind == "CWE" else "",
            "units": units[0], "flag": str(o[8]), "status": str(o[11]),
        })
    spm = msg.segment("SPM")
    out["spm2"] = [u(str(s)) for s in spm[2][0][0]]
    out["spm13"] = str(spm[13])
    try:
        er7 = str(msg)
        parsed = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        out["hl7apy"] = "valid" if parsed.validate() else "invalid"
        out["hl7apy_groups"] = [c.name for c in parsed.children]
    except Exception as e:
        out["hl7apy"] = "error: %s" % e
    return out

async def serve(reader, writer):
    try:
        while not writer.is_closing():
            msg = await reader.readmessage()
            print(json.dumps(report(msg)), flush=True)
            writer.writemessage(msg.create_ack("AA"))
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()

async def main():
    server = await start_hl7_server(serve, "127.0.0.1", 0, encoding="utf-8")
    print("port", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"#;

fn python_path() -> PathBuf {
    let python = peers_dir().join("python");
    for package in ["hl7", "hl7apy"] {
        assert!(
            python.join(package).join("__init__.py").exists(),
            "{package} is not installed at {}: run scripts/test.sh (it installs the test peers hl7==0.4.5 and hl7apy==1.3.5)",
            python.display()
        );
    }
    python
}

/// The Python server, killed (by its PID) when dropped.
struct PyServer {
    child: Child,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PyServer {
    fn start() -> PyServer {
        let mut child = Command::new("python3")
            .env("PYTHONPATH", python_path())
            .args(["-c", PY_SERVER])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run python3");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = lines
            .recv_timeout(PATIENCE)
            .expect("the hl7 MLLP server did not report its port");
        let port = first
            .strip_prefix("port ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the hl7 server: {first:?}"));
        PyServer { child, port, lines }
    }

    fn report(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(PATIENCE)
            .expect("the hl7 server reported no message");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

fn record(tube: &str, version: u32, interpretation: Interpretation) -> ResultRecord {
    ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        result_id: format!("LAB1-R0001-{tube}"),
        version,
        tube: tube.into(),
        pool_size: 1,
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
                loinc: Some("94311-8".into()),
                ct: Some(24.31),
                call: TargetCall::Detected,
            },
            TargetResult {
                name: "N2".into(),
                dye: "HEX".into(),
                loinc: Some("94312-6".into()),
                ct: Some(26.0),
                call: TargetCall::Detected,
            },
            TargetResult {
                name: "RP".into(),
                dye: "CY5".into(),
                loinc: None,
                ct: Some(27.5),
                call: TargetCall::Detected,
            },
        ],
        interpretation,
        status: ResultStatus::Final,
        correction_reason: None,
        tested_at: "2026-11-27T06:00:00.000Z".into(),
        released_at: "2026-11-27T06:10:00.000Z".into(),
        released_by: "auto".into(),
        lab_id: "LAB1".into(),
    }
}

fn items(records: &[ResultRecord]) -> Vec<OutboxItem> {
    records
        .iter()
        .enumerate()
        .map(|(i, record)| OutboxItem {
            seq: i as u64 + 1,
            record: record.clone(),
            attempt: 0,
        })
        .collect()
}

fn sink(port: u16, ack_timeout: Duration) -> Hl7Sink {
    Hl7Sink::new(&Hl7Config {
        address: format!("127.0.0.1:{port}"),
        header: MessageHeader {
            receiving_application: "LIS".into(),
            receiving_facility: "CENTRAL|HQ".into(),
        },
        ack_timeout,
        connect_timeout: Duration::from_secs(2),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_hl7_server_accepts_every_message_and_reads_the_profile() {
    let server = PyServer::start();
    let mut negative = record("T0002", 1, Interpretation::Negative);
    negative.status = ResultStatus::Preliminary;
    negative.targets[0].ct = None;
    negative.targets[1].ct = None;
    let mut corrected = record("T0003", 2, Interpretation::Inconclusive);
    corrected.status = ResultStatus::Corrected;
    corrected.correction_reason = Some("wells A1|A2 swapped ^ re-read & checked \\ ~".into());
    let mut pooled = record("T&0005^x|y", 1, Interpretation::Positive);
    pooled.pool_size = 10;
    let records = vec![
        record("T0001", 1, Interpretation::Positive),
        negative,
        corrected,
        record("T0004", 1, Interpretation::Invalid),
        pooled,
    ];
    let mut sink = sink(server.port, Duration::from_secs(10));
    let outcomes = sink.deliver(&items(&records)).await;
    assert_eq!(outcomes, vec![ItemOutcome::Delivered; records.len()]);

    let reports: Vec<Value> = records.iter().map(|_| server.report()).collect();
    for (record, report) in records.iter().zip(&reports) {
        let at = &record.tube;
        assert_eq!(report["hl7apy"], "valid", "{at}: {report:#}");
        assert_eq!(report["control_id"], control_id(record), "{at}");
        assert_eq!(report["type"], "ORU^R01^ORU_R01", "{at}");
        assert_eq!(
            (&report["processing"], &report["version"]),
            (&"P".into(), &"2.5.1".into())
        );
        assert_eq!(report["sender"], serde_json::json!(["PCRD", "LAB1"]));
        assert_eq!(report["receiver"], serde_json::json!(["LIS", "CENTRAL|HQ"]));
        assert_eq!(report["ack_types"], serde_json::json!(["NE", "AL"]));
        assert_eq!(
            report["pid3"],
            serde_json::json!([record.tube, "", "", "LAB1", "ACSN"])
        );
        assert_eq!(report["pid5"], "^^^^^^S", "{at}: no name is sent");
        assert_eq!(report["obr4"], "94500-6");
        assert_eq!(
            report["spm2"],
            serde_json::json!([record.tube, "LAB1"]),
            "{at}"
        );
        assert_eq!(report["spm13"], record.pool_size.to_string(), "{at}");
        let obx = report["obx"].as_array().unwrap();
        // The overall result, then one Ct per target with a LOINC code (not RP).
        assert_eq!(obx.len(), 3, "{at}: {report:#}");
        assert_eq!(
            (&obx[0]["type"], &obx[0]["loinc"]),
            (&"CWE".into(), &"94500-6".into())
        );
        assert_eq!(obx[0]["code_system"], "LN");
        for (ct_obx, target) in obx[1..].iter().zip(&record.targets) {
            assert_eq!(ct_obx["type"], "NM");
            assert_eq!(ct_obx["loinc"], target.loinc.clone().unwrap());
            assert_eq!(ct_obx["units"], "{Ct_value}");
            match target.ct {
                Some(ct) => assert_eq!(ct_obx["value"], format!("{ct:.2}")),
                None => assert_eq!(
                    (&ct_obx["value"], &ct_obx["status"]),
                    (&"".into(), &"X".into())
                ),
            }
        }
    }
    let overall = |i: usize| -> (String, String, String, String) {
        let o = &reports[i]["obx"][0];
        let s = |k: &str| o[k].as_str().unwrap().to_owned();
        (s("value"), s("value_system"), s("flag"), s("status"))
    };
    let t = |a: &str, b: &str, c: &str, d: &str| (a.into(), b.into(), c.into(), d.into());
    assert_eq!(overall(0), t("260373001", "SCT", "A", "F"));
    assert_eq!(overall(1), t("260415000", "SCT", "N", "P"));
    assert_eq!(overall(2), t("419984006", "SCT", "", "C"));
    assert_eq!(
        overall(3),
        t("", "", "", "X"),
        "invalid: no answer, status X"
    );
    assert_eq!(reports[2]["obr25"], "C");
    assert_eq!(
        reports[2]["nte"],
        serde_json::json!(["wells A1|A2 swapped ^ re-read & checked \\ ~"])
    );
    assert_eq!(reports[1]["obx"][1]["status"], "X", "undetermined Ct");

    // A resend of one result version (after a lost ACK, or a restart) is the same
    // message: same MSH-10, same bytes.
    let again = sink.deliver(&items(&records[..1])).await;
    assert_eq!(again, vec![ItemOutcome::Delivered]);
    let resent = server.report();
    assert_eq!(resent["control_id"], reports[0]["control_id"]);
    assert_eq!(resent["sha256"], reports[0]["sha256"]);
}

// --- a scripted receiver built on pcrd's own MLLP codec ------------------------------

#[derive(Clone, Debug)]
enum Reply {
    /// MSA-1 code, with MSA-3 and an ERR segment carrying `text` when not empty.
    Ack(&'static str, &'static str),
    /// No answer until `late`, then an AA for the message (on the same connection).
    Late(Duration),
    /// An AA for another control id.
    WrongId,
    /// Close the connection without answering.
    Close,
    /// AA, then close the connection (the receiver's idle timeout).
    AckThenClose,
    /// Bytes outside any frame, then AA.
    NoiseThenAck,
}

#[derive(Clone, Debug)]
struct Seen {
    connection: usize,
    control_id: String,
    message: Vec<u8>,
}

struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

impl Receiver {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn then(&self, replies: &[Reply]) {
        self.script.lock().unwrap().extend(replies.iter().cloned());
    }
}

fn ack(code: &str, control_id: &str, text: &str) -> Vec<u8> {
    let mut message = format!(
        "MSH|^~\\&|LIS|CENTRAL|PCRD|LAB1|20261127061001||ACK^R01^ACK|ACK-{control_id}|P|2.5.1\rMSA|{code}|{control_id}"
    );
    if !text.is_empty() {
        message.push_str(&format!(
            "|{text}\rERR||OBX^1^5|207^Application internal error^HL70357|E||||{text}"
        ));
    }
    message.push('\r');
    mllp::frame(message.as_bytes())
}

async fn start_receiver(script: &[Reply]) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(script.iter().cloned().collect::<VecDeque<_>>()));
    let (seen_in, script_in) = (seen.clone(), script.clone());
    tokio::spawn(async move {
        for connection in 0.. {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let (seen, script) = (seen_in.clone(), script_in.clone());
            tokio::spawn(async move {
                let mut decoder = MllpDecoder::default();
                let mut events = Vec::new();
                let mut buffer = vec![0; 4096];
                loop {
                    let n = match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    decoder.feed(&buffer[..n], &mut events);
                    for event in std::mem::take(&mut events) {
                        let MllpEvent::Frame(message) = event else {
                            panic!("the sink sent bytes outside a frame: {event:?}");
                        };
                        let text = String::from_utf8(message.clone()).unwrap();
                        let id = text
                            .split('\r')
                            .next()
                            .unwrap()
                            .split('|')
                            .nth(9)
                            .unwrap()
                            .to_owned();
                        seen.lock().unwrap().push(Seen {
                            connection,
                            control_id: id.clone(),
                            message,
                        });
                        let reply = script
                            .lock()
                            .unwrap()
                            .pop_front()
                            .unwrap_or(Reply::Ack("AA", ""));
                        let bytes = match reply {
                            Reply::Ack(code, text) => ack(code, &id, text),
                            Reply::Late(after) => {
                                tokio::time::sleep(after).await;
                                ack("AA", &id, "")
                            }
                            Reply::WrongId => ack("AA", "SOMEONE-ELSE", ""),
                            Reply::Close => return,
                            Reply::AckThenClose => {
                                let _ = stream.write_all(&ack("AA", &id, "")).await;
                                return;
                            }
                            Reply::NoiseThenAck => {
                                let mut bytes = b"\x00noise\r\n".to_vec();
                                bytes.extend(ack("AA", &id, ""));
                                bytes
                            }
                        };
                        if stream.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Receiver { port, seen, script }
}

fn batch(n: usize) -> Vec<OutboxItem> {
    let records: Vec<ResultRecord> = (1..=n)
        .map(|i| record(&format!("T{i:04}"), 1, Interpretation::Negative))
        .collect();
    items(&records)
}

fn retry_reason(outcome: &ItemOutcome) -> &str {
    match outcome {
        ItemOutcome::Retry { reason, .. } => reason,
        other => panic!("expected a retry, got {other:?}"),
    }
}

#[tokio::test]
async fn aa_is_delivered_and_ae_is_retried_stopping_the_batch_in_order() {
    let receiver =
        start_receiver(&[Reply::Ack("AA", ""), Reply::Ack("AE", "OBX-5 unreadable")]).await;
    let mut sink = sink(receiver.port, Duration::from_secs(5));
    let items = batch(4);
    let outcomes = sink.deliver(&items).await;
    assert_eq!(outcomes[0], ItemOutcome::Delivered);
    assert!(retry_reason(&outcomes[1]).contains("AE"), "{outcomes:?}");
    assert!(
        retry_reason(&outcomes[1]).contains("OBX-5 unreadable"),
        "{outcomes:?}"
    );
    assert!(
        retry_reason(&outcomes[2]).contains("not sent"),
        "{outcomes:?}"
    );
    assert!(
        retry_reason(&outcomes[3]).contains("not sent"),
        "{outcomes:?}"
    );
    assert_eq!(receiver.seen().len(), 2, "nothing after the AE was sent");

    // The outbox retries from the item that failed; AE keeps the connection.
    let outcomes = sink.deliver(&items[1..]).await;
    assert_eq!(outcomes, vec![ItemOutcome::Delivered; 3]);
    let seen = receiver.seen();
    assert_eq!(seen[2].control_id, seen[1].control_id);
    assert_eq!(seen[2].message, seen[1].message);
    assert!(seen.iter().all(|s| s.connection == 0), "{seen:?}");
}

#[tokio::test]
async fn ar_is_dead_lettered_with_the_receivers_text_and_the_batch_goes_on() {
    let receiver = start_receiver(&[Reply::Ack("AR", "unknown facility \\F\\ LAB1")]).await;
    let mut sink = sink(receiver.port, Duration::from_secs(5));
    let outcomes = sink.deliver(&batch(2)).await;
    match &outcomes[0] {
        ItemOutcome::Dead {
            reason: DeadReason::Rejected,
            detail,
        } => assert!(
            detail.contains("AR") && detail.contains("unknown facility | LAB1"),
            "{detail}"
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(outcomes[1], ItemOutcome::Delivered);
}

#[tokio::test]
async fn a_timeout_is_retried_with_the_same_control_id_and_a_late_ack_is_never_read() {
    // The first ACK comes 600 ms late, after the sink's 300 ms timeout.
    let receiver = start_receiver(&[Reply::Late(Duration::from_millis(600))]).await;
    let mut sink = sink(receiver.port, Duration::from_millis(300));
    let items = batch(2);
    let outcomes = sink.deliver(&items).await;
    assert!(
        retry_reason(&outcomes[0]).contains("no ACK"),
        "{outcomes:?}"
    );
    assert!(
        retry_reason(&outcomes[1]).contains("not sent"),
        "{outcomes:?}"
    );
    // Let the late AA arrive on the old connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Script the next answer as an AE: had the sink read the late AA on a kept
    // connection it would report the resend delivered.
    receiver.then(&[Reply::Ack("AE", "busy")]);
    let outcomes = sink.deliver(&items).await;
    assert!(retry_reason(&outcomes[0]).contains("busy"), "{outcomes:?}");
    let outcomes = sink.deliver(&items).await;
    assert_eq!(outcomes, vec![ItemOutcome::Delivered; 2]);
    let seen = receiver.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[0].control_id, control_id(&items[0].record));
    for resend in &seen[1..3] {
        assert_eq!(resend.control_id, seen[0].control_id, "same MSH-10");
        assert_eq!(resend.message, seen[0].message, "same bytes");
    }
    assert_eq!(seen[0].connection, 0);
    assert_eq!(
        seen[1].connection, 1,
        "the connection was dropped after the timeout"
    );
}

#[tokio::test]
async fn an_ack_for_another_control_id_drops_the_connection_and_retries() {
    let receiver = start_receiver(&[Reply::WrongId]).await;
    let mut sink = sink(receiver.port, Duration::from_secs(5));
    let items = batch(1);
    let outcomes = sink.deliver(&items).await;
    assert!(
        retry_reason(&outcomes[0]).contains("SOMEONE-ELSE"),
        "{outcomes:?}"
    );
    assert_eq!(sink.deliver(&items).await, vec![ItemOutcome::Delivered]);
    let seen = receiver.seen();
    assert_eq!((seen[0].connection, seen[1].connection), (0, 1));
    assert_eq!(seen[1].control_id, seen[0].control_id);
}

#[tokio::test]
async fn a_closed_connection_is_retried_and_an_idle_close_is_reconnected_at_once() {
    let receiver = start_receiver(&[Reply::Close]).await;
    let mut sink = sink(receiver.port, Duration::from_secs(5));
    let items = batch(3);
    let outcomes = sink.deliver(&items[..1]).await;
    assert!(
        retry_reason(&outcomes[0]).contains("closed"),
        "{outcomes:?}"
    );
    // The receiver closes after acknowledging the next message (an idle timeout); the
    // one after that must be delivered on a new connection without a retry.
    receiver.then(&[Reply::AckThenClose]);
    assert_eq!(
        sink.deliver(&items[..1]).await,
        vec![ItemOutcome::Delivered]
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        sink.deliver(&items[1..]).await,
        vec![ItemOutcome::Delivered; 2]
    );
    let seen = receiver.seen();
    let connections: Vec<usize> = seen.iter().map(|s| s.connection).collect();
    assert_eq!(connections, [0, 1, 2, 2], "{seen:?}");
}

#[tokio::test]
async fn noise_outside_frames_is_skipped() {
    let receiver = start_receiver(&[Reply::NoiseThenAck, Reply::NoiseThenAck]).await;
    let mut sink = sink(receiver.port, Duration::from_secs(5));
    assert_eq!(
        sink.deliver(&batch(2)).await,
        vec![ItemOutcome::Delivered; 2]
    );
}

#[tokio::test]
async fn an_unencodable_record_is_dead_lettered_and_the_batch_goes_on() {
    let receiver = start_receiver(&[]).await;
    let mut sink = sink(receiver.port, Duration::from_secs(5));
    let mut items = batch(2);
    items[0].record.targets[0].ct = Some(f64::NAN);
    let outcomes = sink.deliver(&items).await;
    assert!(
        matches!(&outcomes[0], ItemOutcome::Dead { reason: DeadReason::Unencodable, detail } if detail.contains("Ct")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], ItemOutcome::Delivered);
    assert_eq!(receiver.seen().len(), 1);
}

#[tokio::test]
async fn a_receiver_that_is_down_is_a_retry_for_the_whole_batch() {
    let closed: SocketAddr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut sink = sink(closed.port(), Duration::from_secs(1));
    let outcomes = sink.deliver(&batch(3)).await;
    assert!(
        retry_reason(&outcomes[0]).contains("cannot connect"),
        "{outcomes:?}"
    );
    assert_eq!(outcomes.len(), 3);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, ItemOutcome::Retry { .. }))
    );
}
