//! `pcrd outbox status|dead|retry`: the outbox's operator surface, as calls to the
//! daemon's API (`/api/v1/outbox...`), printed for people or, with `--json`, as the
//! JSON the API sent.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::{ApiArgs, exit};
use crate::api::dto::{DeadLetterView, OutboxRetryRequest, OutboxRetryResponse, OutboxStatusView};

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Per sink: pending, in flight, delivered, dead, lag, last error, next attempt.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Dead letters: what a sink refused for good, and why.
    Dead {
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Re-queue dead letters for the sink that refused them (reviewer or admin).
    Retry {
        /// Idempotency keys (RESULT-ID:VERSION) as `outbox dead` lists them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every dead letter (of --sink, or of every sink).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        sink: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub(super) fn run(command: OutboxCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pcrd: cannot start the runtime: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("pcrd: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

async fn dispatch(command: OutboxCommand) -> Result<(), Failure> {
    match command {
        OutboxCommand::Status { api } => {
            let json = call(&api, reqwest::Method::GET, "outbox", None).await?;
            if api.json {
                println!("{json}");
                return Ok(());
            }
            let status: OutboxStatusView = decode(json)?;
            if status.sinks.is_empty() {
                println!(
                    "no sinks configured; {} result version(s) released",
                    status.next_seq.saturating_sub(1)
                );
            }
            for s in &status.sinks {
                println!(
                    "{} ({}): {} pending, {} in flight, {} delivered, {} dead{}",
                    s.sink,
                    s.kind,
                    s.pending,
                    s.in_flight,
                    s.delivered,
                    s.dead,
                    s.oldest_pending_age_seconds
                        .map(|a| format!(", oldest waiting {a:.1} s"))
                        .unwrap_or_default()
                );
                if let Some(error) = &s.last_error {
                    println!("  last error (attempt {}): {error}", s.attempt);
                }
                if let Some(next) = &s.next_attempt {
                    println!("  next attempt at {next}");
                }
            }
            Ok(())
        }
        OutboxCommand::Dead { sink, api } => {
            let path = match &sink {
                Some(sink) => format!("outbox/dead?sink={}", urlencode(sink)),
                None => "outbox/dead".to_string(),
            };
            let json = call(&api, reqwest::Method::GET, &path, None).await?;
            if api.json {
                println!("{json}");
                return Ok(());
            }
            let letters: Vec<DeadLetterView> = decode(json)?;
            if letters.is_empty() {
                println!("no dead letters");
            }
            for d in &letters {
                println!(
                    "{}  {}  seq {}  {}  {}: {}",
                    d.at, d.sink, d.seq, d.idempotency_key, d.reason, d.detail
                );
            }
            Ok(())
        }
        OutboxCommand::Retry {
            ids,
            all,
            sink,
            reason,
            api,
        } => {
            let request = OutboxRetryRequest {
                sink,
                ids: (!all).then_some(ids),
                all,
                reason,
            };
            let body = serde_json::to_value(&request).map_err(|e| (exit::USAGE, e.to_string()))?;
            let json = call(&api, reqwest::Method::POST, "outbox/retry", Some(body)).await?;
            if api.json {
                println!("{json}");
                return Ok(());
            }
            let response: OutboxRetryResponse = decode(json)?;
            println!("{} dead letter(s) re-queued", response.requeued.len());
            for r in &response.requeued {
                println!("  {} -> {} (seq {})", r.idempotency_key, r.sink, r.seq);
            }
            Ok(())
        }
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn decode<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> Result<T, Failure> {
    serde_json::from_value(json).map_err(|e| {
        (
            exit::UNAVAILABLE,
            format!("unexpected answer from the daemon: {e}"),
        )
    })
}

/// One API call; a 4xx/5xx becomes the daemon's message and problems with the exit
/// code the other client commands use.
async fn call(
    api: &ApiArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, Failure> {
    let token = api.token.clone().filter(|t| !t.trim().is_empty()).ok_or((
        exit::USAGE,
        "no API token: pass --token or set PCRD_TOKEN".to_string(),
    ))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| (exit::UNAVAILABLE, format!("cannot set up HTTP: {e}")))?;
    let url = format!("{}/api/v1/{path}", api.api.trim_end_matches('/'));
    let mut request = http.request(method, &url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|e| {
        (
            exit::UNAVAILABLE,
            format!("cannot reach the daemon at {}: {e}", api.api),
        )
    })?;
    let status = response.status();
    let json: serde_json::Value = response.json().await.map_err(|e| {
        (
            exit::UNAVAILABLE,
            format!("unreadable answer ({status}): {e}"),
        )
    })?;
    if status.is_success() {
        return Ok(json);
    }
    let error = &json["error"];
    let mut message = error["message"]
        .as_str()
        .unwrap_or("request failed")
        .to_string();
    if let Some(problems) = error["problems"].as_array() {
        for p in problems.iter().filter_map(|p| p.as_str()) {
            message.push_str("\n  - ");
            message.push_str(p);
        }
    }
    let code = if status.is_server_error() {
        exit::UNAVAILABLE
    } else if status == reqwest::StatusCode::UNAUTHORIZED
        || status == reqwest::StatusCode::FORBIDDEN
    {
        exit::USAGE
    } else {
        exit::REJECTED
    };
    Err((code, message))
}
