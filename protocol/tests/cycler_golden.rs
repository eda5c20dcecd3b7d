//! Golden transcripts (`protocol/src/cycler/testdata/*.txt`) of the cycler codec in
//! pcrd's reference dialect: lines in, commands, replies and events out, errors included.
//!
//! A transcript is a script; the harness replays its input lines and writes every
//! output line itself, then the whole file must come out unchanged:
//! - `# …` and blank lines: comments, copied;
//! - `@ max_line_len N`: the line decoder's limit (before any input);
//! - `@ tracker WELLS CH,CH.. [resume N]`: from here on, events go through a fresh
//!   `RunTracker` (that already holds cycles 1..=N when `resume N` is given);
//! - `> bytes`: the instrument sends these bytes (notation of `astm::from_mnemonics`:
//!   `<CR>`, `<LF>`, `<xHH>`…; real line breaks are ignored);
//! - `< line`: a command line as the simulator receives it; it must parse, and encode
//!   back to the same line, or be refused;
//! - `= …`: what came out (output); a reply is also read as the answer to the last
//!   command line (`=   …` below it).
//!
//! Set `PCRD_BLESS=1` to rewrite the files with what the code produces (then review the
//! diff: a blessed transcript is only as good as the person who read it).

use std::fmt::Write as _;
use std::path::PathBuf;

use pcrd_protocol::astm::{from_mnemonics, to_mnemonics};
use pcrd_protocol::cycler::{
    Channel, Command, Dialect, Event, Incoming, LineDecoder, LineError, MAX_LINE_LEN, RunTracker,
    parse_incoming,
};

fn describe_event(event: &Event) -> String {
    match event {
        Event::Cycle(d) => format!("cycle {} {} readings={:?}", d.cycle, d.channel, d.values),
        other => format!("{other:?}"),
    }
}

fn describe_command(command: &Command) -> String {
    let p = command.policy();
    let head = match command {
        Command::LoadPlate(map) => format!(
            "LoadPlate id={} format={} wells={}",
            map.plate_id,
            map.format,
            map.wells
                .iter()
                .map(|(w, l)| format!("{w}:{l}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Command::LoadProtocol(p) => format!(
            "LoadProtocol {} channels={} stages={} data_cycles={}",
            p.name,
            p.channels
                .iter()
                .map(Channel::as_str)
                .collect::<Vec<_>>()
                .join(","),
            p.stages.len(),
            p.data_cycles()
        ),
        other => format!("{other:?}"),
    };
    format!(
        "{head} timeout={}s attempts={} resend_safe={}",
        p.timeout.as_secs(),
        p.attempts,
        p.resend_safe
    )
}

fn replay(script: &str) -> String {
    let dialect = Dialect::reference();
    let mut max = MAX_LINE_LEN;
    for line in script.lines() {
        if let Some(n) = line.strip_prefix("@ max_line_len ") {
            max = n.trim().parse().expect("a number");
        }
    }
    let mut decoder = LineDecoder::new(max);
    let mut buf = Vec::new();
    let mut tracker: Option<RunTracker> = None;
    let mut in_flight: Option<Command> = None;
    let mut out = String::new();
    for line in script.lines() {
        if line.starts_with("= ") {
            continue;
        }
        let _ = writeln!(out, "{line}");
        if let Some(spec) = line.strip_prefix("@ tracker ") {
            let words: Vec<&str> = spec.split(' ').collect();
            let channels = words[1]
                .split(',')
                .map(|c| Channel::new(c).expect("a channel"))
                .collect();
            let mut t = RunTracker::new(words[0].parse().expect("a well count"), channels);
            if let ["resume", n] = words[2..] {
                t = t.resume_after(n.parse().expect("a cycle"));
            }
            tracker = Some(t);
        } else if let Some(text) = line.strip_prefix("< ") {
            match Command::parse(text, &dialect) {
                Ok(command) => {
                    let again = command.encode(&dialect).expect("a parsed command encodes");
                    assert_eq!(again.as_str(), text, "re-encoding differs");
                    let _ = writeln!(out, "= command {}", describe_command(&command));
                    in_flight = Some(command);
                }
                Err(e) => {
                    let _ = writeln!(out, "= refused: {e}");
                }
            }
        } else if let Some(bytes) = line.strip_prefix("> ") {
            buf.extend_from_slice(&from_mnemonics(bytes));
            loop {
                let line = match decoder.decode(&mut buf) {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(e) => {
                        let kept = match &e {
                            LineError::BadByte { line, .. } => line.clone(),
                            LineError::TooLong { kept, .. } => kept.clone(),
                            other => panic!("unexpected {other:?}"),
                        };
                        let _ = writeln!(out, "= bad line: {e}: {}", to_mnemonics(&kept));
                        continue;
                    }
                };
                match parse_incoming(line.as_str(), &dialect) {
                    Ok(Incoming::Reply(text)) => {
                        let _ = writeln!(out, "= reply {text:?}");
                        // The reply answers the command in flight, if any.
                        if let Some(command) = in_flight.take() {
                            match command.parse_reply(&text, &dialect) {
                                Ok(response) => {
                                    let _ = writeln!(out, "=   {response:?}");
                                }
                                Err(e) => {
                                    let _ = writeln!(out, "=   unexpected: {e}");
                                }
                            }
                        }
                    }
                    Ok(Incoming::Error(e)) => {
                        in_flight = None;
                        let _ = writeln!(out, "= error code={} text={:?}", e.code, e.text);
                    }
                    Ok(Incoming::Event(event)) => {
                        let _ = writeln!(out, "= event {}", describe_event(&event));
                        if let Some(tracker) = &mut tracker {
                            match tracker.observe(&event) {
                                Ok(t) => {
                                    let _ = writeln!(out, "=   {t:?}");
                                }
                                Err(e) => {
                                    let _ = writeln!(out, "=   refused: {e}");
                                }
                            }
                        }
                    }
                    Err(rejected) => {
                        assert_eq!(rejected.line, line.as_str(), "the line is kept");
                        let _ = writeln!(out, "= rejected: {}", rejected.error);
                    }
                }
            }
            if !buf.is_empty() {
                let _ = writeln!(out, "= waiting: {}", to_mnemonics(&buf));
            }
        }
    }
    out
}

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/cycler/testdata")
}

fn check(name: &str) {
    let path = testdata().join(name);
    let script = std::fs::read_to_string(&path).expect("transcript readable");
    let produced = replay(&script);
    if std::env::var_os("PCRD_BLESS").is_some() {
        std::fs::write(&path, &produced).expect("transcript writable");
        return;
    }
    assert_eq!(
        produced, script,
        "{name}: the codec's output differs from the transcript"
    );
}

#[test]
fn a_whole_run_from_identification_to_the_last_cycle() {
    check("session.txt");
}

#[test]
fn error_replies_and_the_error_queue() {
    check("errors.txt");
}

#[test]
fn bad_bytes_long_lines_and_split_lines() {
    check("bad_lines.txt");
}

#[test]
fn per_cycle_data_that_cannot_be_trusted_is_refused() {
    check("bad_cycles.txt");
}

#[test]
fn faults_and_unknown_events() {
    check("faults.txt");
}

#[test]
fn missed_cycles_fetched_after_a_restart() {
    check("fetch.txt");
}

#[test]
fn command_lines_as_the_simulator_reads_them() {
    check("commands.txt");
}

/// Every transcript in testdata/ is exercised by a test above.
#[test]
fn every_transcript_has_a_test() {
    let source = include_str!("cycler_golden.rs");
    for entry in std::fs::read_dir(testdata()).expect("testdata listable") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".txt") {
            assert!(
                source.contains(&format!("check(\"{name}\")")),
                "{name} has no test"
            );
        }
    }
}
