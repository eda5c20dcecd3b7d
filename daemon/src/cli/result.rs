//! `pcrd result list|show|release|rerun|reject|correct`, `pcrd rerun list` and the
//! text of `pcrd tube due`: review and release (issue 7) as calls to the daemon's
//! API, printed for people or, with `--json`, as the JSON the API sent.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::Value;

use super::{ApiArgs, exit};

#[derive(Debug, Subcommand)]
pub enum ResultCommand {
    /// Results: past due and at-risk tubes first.
    List {
        /// awaiting_review, released, rerun_requested or rejected.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One result: targets and Ct, calls, QC holds, versions, turnaround.
    Show {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Release a result awaiting review (reviewer or admin).
    Release {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Send a result back for a rerun (reviewer or admin).
    Rerun {
        id: String,
        #[arg(long, required = true)]
        reason: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Reject a result (reviewer or admin).
    Reject {
        id: String,
        #[arg(long, required = true)]
        reason: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Correct a released result: a new version with status corrected.
    Correct {
        id: String,
        #[arg(long, required = true)]
        reason: String,
        /// positive, negative, inconclusive or invalid.
        #[arg(long)]
        interpretation: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum RerunCommand {
    /// Tubes to test again and positive pools to follow up, past due first.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
}

type Failure = (u8, String);

pub(super) fn run_result(command: ResultCommand) -> ExitCode {
    block_on(result(command))
}

pub(super) fn run_rerun(command: RerunCommand) -> ExitCode {
    block_on(rerun(command))
}

fn block_on(work: impl std::future::Future<Output = Result<(), Failure>>) -> ExitCode {
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
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("pcrd: {message}");
            ExitCode::from(code)
        }
    }
}

async fn result(command: ResultCommand) -> Result<(), Failure> {
    let (api, json) = match command {
        ResultCommand::List { state, limit, api } => {
            let mut path = format!("results?limit={limit}");
            if let Some(state) = state {
                path.push_str(&format!("&state={}", urlencode(&state)));
            }
            let json = call(&api, reqwest::Method::GET, &path, None).await?;
            if !api.json {
                print!("{}", list_text(&json));
                return Ok(());
            }
            (api, json)
        }
        ResultCommand::Show { id, api } => {
            let path = format!("results/{}", urlencode(&id));
            let json = call(&api, reqwest::Method::GET, &path, None).await?;
            (api, json)
        }
        ResultCommand::Release { id, reason, api } => {
            let body = serde_json::json!({ "reason": reason });
            decide(api, &id, "release", body).await?
        }
        ResultCommand::Rerun { id, reason, api } => {
            decide(api, &id, "rerun", serde_json::json!({ "reason": reason })).await?
        }
        ResultCommand::Reject { id, reason, api } => {
            decide(api, &id, "reject", serde_json::json!({ "reason": reason })).await?
        }
        ResultCommand::Correct {
            id,
            reason,
            interpretation,
            api,
        } => {
            let body = serde_json::json!({ "reason": reason, "interpretation": interpretation });
            decide(api, &id, "correct", body).await?
        }
    };
    if api.json {
        println!("{json}");
    } else {
        print!("{}", detail_text(&json));
    }
    Ok(())
}

async fn decide(
    api: ApiArgs,
    id: &str,
    action: &str,
    body: Value,
) -> Result<(ApiArgs, Value), Failure> {
    let path = format!("results/{}/{action}", urlencode(id));
    let json = call(&api, reqwest::Method::POST, &path, Some(body)).await?;
    Ok((api, json))
}

async fn rerun(command: RerunCommand) -> Result<(), Failure> {
    let RerunCommand::List { limit, api } = command;
    let json = call(
        &api,
        reqwest::Method::GET,
        &format!("reruns?limit={limit}"),
        None,
    )
    .await?;
    if api.json {
        println!("{json}");
    } else {
        print!("{}", reruns_text(&json));
    }
    Ok(())
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

fn due_mark(v: &Value) -> &'static str {
    match v["due_status"].as_str() {
        Some("past_due") => "PAST DUE ",
        Some("at_risk") => "AT RISK  ",
        _ => "",
    }
}

/// `pcrd result list`.
pub(super) fn list_text(json: &Value) -> String {
    let rows = json.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return "no results\n".into();
    }
    let mut out = String::new();
    for r in &rows {
        out.push_str(&format!(
            "{}{}  {}  {} {}  {}  {}{}\n",
            due_mark(r),
            s(r, "result_id"),
            s(r, "state"),
            s(r, "plate"),
            s(r, "well"),
            s(r, "tube"),
            s(r, "interpretation"),
            r["due_at"]
                .as_str()
                .map(|d| format!("  due {d}"))
                .unwrap_or_default()
        ));
    }
    out
}

/// `pcrd result show` and the decisions.
pub(super) fn detail_text(r: &Value) -> String {
    let mut out = format!(
        "result {} ({})\n  tube {} (pool of {}), plate {} well {}, run {} on {}\n  kit {}@{}; plate {}\n  call {} -> {}: {}\n",
        s(r, "result_id"),
        s(r, "state"),
        s(r, "tube"),
        r["pool_size"],
        s(r, "plate"),
        s(r, "well"),
        s(r, "run"),
        s(r, "instrument"),
        s(r, "kit_id"),
        s(r, "kit_version"),
        if r["plate_valid"] == Value::Bool(true) {
            "valid".to_string()
        } else {
            format!("INVALID ({})", s(r, "plate_invalid_reason"))
        },
        s(r, "call"),
        s(r, "interpretation"),
        s(r, "reason"),
    );
    for t in r["targets"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<10} {:<5} Ct {:<8} {}{}\n",
            s(t, "name"),
            s(t, "dye"),
            t["ct"]
                .as_f64()
                .map_or("-".to_string(), |ct| format!("{ct:.2}")),
            s(t, "call"),
            t["loinc"]
                .as_str()
                .map(|l| format!(" (LOINC {l})"))
                .unwrap_or_default()
        ));
    }
    for hold in r["qc_holds"].as_array().into_iter().flatten() {
        out.push_str(&format!("  QC hold: {}\n", hold.as_str().unwrap_or("-")));
    }
    for v in r["versions"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  version {} {} by {} ({}){}\n",
            v["version"],
            s(v, "status"),
            s(v, "released_by"),
            s(v, "idempotency_key"),
            v["correction_reason"]
                .as_str()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        ));
    }
    if let Some(reason) = r["decision_reason"].as_str() {
        out.push_str(&format!("  decided by {}: {reason}\n", s(r, "decided_by")));
    }
    if let Some(stages) = r["tat"]["stages"].as_array() {
        out.push_str(&format!(
            "  due {} ({})\n",
            s(&r["tat"], "due_at"),
            s(&r["tat"], "due_status")
        ));
        for st in stages {
            out.push_str(&format!(
                "  {:<14} {}{}\n",
                s(st, "stage"),
                s(st, "at"),
                st["seconds_since_previous"]
                    .as_f64()
                    .map(|d| format!("  (+{d:.0} s)"))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

/// `pcrd rerun list`.
pub(super) fn reruns_text(json: &Value) -> String {
    let rows = json.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return "nothing to rerun\n".into();
    }
    let mut out = String::new();
    for r in &rows {
        out.push_str(&format!(
            "{}{}  {}  pool of {}  from {} {}  {}: {}\n",
            due_mark(r),
            s(r, "kind"),
            s(r, "tube"),
            r["pool_size"],
            s(r, "plate"),
            s(r, "well"),
            s(r, "call"),
            s(r, "reason"),
        ));
    }
    out
}

/// `pcrd tube due`.
pub(super) fn due_text(rows: &[Value]) -> String {
    if rows.is_empty() {
        return "no tube is waiting for a result\n".into();
    }
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!(
            "{}{}  {}  {}  {}{}\n",
            due_mark(r),
            s(r, "barcode"),
            s(r, "priority"),
            s(r, "stage"),
            r["due_at"]
                .as_str()
                .map_or("no due time".to_string(), |d| format!("due {d}")),
            r["minutes_left"]
                .as_i64()
                .map(|m| format!(" ({m} min)"))
                .unwrap_or_default()
        ));
    }
    out
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

/// One API call; a 4xx/5xx becomes the daemon's message and problems, with the exit
/// codes the other client commands use.
async fn call(
    api: &ApiArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Failure> {
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
    let json: Value = response.json().await.map_err(|e| {
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
    for p in error["problems"].as_array().into_iter().flatten() {
        if let Some(p) = p.as_str() {
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
