//! The client subcommands: each is one or a few calls to the daemon's HTTP API, its
//! answer printed for people or, with `--json`, as the JSON the API sent.
//!
//! Every call goes through [`Client::send`], which turns any outcome into a typed reply
//! or a [`ClientError`] that knows its exit code, so commands only say what to ask and
//! how to show the answer.

use std::fs::File;
use std::io::{BufReader, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{RequestBuilder, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::render::{self, count};
use super::{ApiArgs, AuditArgs, Command, PlateCommand, TubeCommand, exit, import};
use crate::api::dto::{
    AssignRequest, AuditEntryView, AuditVerifyView, CombineRequest, CreatePlateRequest, ErrorBody,
    FillRequest, KitView, PlacementIn, PlateSummary, PlateView, ReasonRequest, ReceiveRequest,
    ReceiveResponse, TransferRequest, TubeIn, TubeView, UnassignRequest, WaitingList, WellsChanged,
};

#[path = "run.rs"]
pub(super) mod run;

/// Long enough for a 5000-tube batch on a busy daemon with a slow disk; a daemon that
/// has not answered by then is stuck, and saying so beats hanging.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// A daemon on this machine or the lab network accepts a connection at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn run(command: Command) -> ExitCode {
    let Some(api) = api_args(&command) else {
        return ClientError::usage("not a client command").report();
    };
    let outcome = Client::new(api).and_then(|client| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::unavailable(format!("cannot start the runtime: {e}")))?;
        runtime.block_on(dispatch(&client, command))
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

fn api_args(command: &Command) -> Option<&ApiArgs> {
    match command {
        Command::Tube(
            TubeCommand::Receive { api, .. }
            | TubeCommand::Import { api, .. }
            | TubeCommand::Show { api, .. }
            | TubeCommand::Waiting { api, .. }
            | TubeCommand::Due { api, .. },
        ) => Some(api),
        Command::Plate(
            PlateCommand::Create { api, .. }
            | PlateCommand::Assign { api, .. }
            | PlateCommand::Fill { api, .. }
            | PlateCommand::Unassign { api, .. }
            | PlateCommand::Show { api, .. }
            | PlateCommand::List { api }
            | PlateCommand::Seal { api, .. }
            | PlateCommand::Transfer { api, .. },
        ) => Some(api),
        Command::Audit(args) => Some(&args.api),
        Command::Kits(args) => Some(&args.api),
        Command::Run(command) => Some(command.api()),
        Command::Instrument(super::instrument::InstrumentCommand::List { api }) => Some(api),
        #[cfg(feature = "demo")]
        Command::Demo(_) => None,
        Command::Serve(_)
        | Command::Completions { .. }
        | Command::Store(_)
        | Command::Instrument(_)
        | Command::Outbox(_)
        | Command::Analyze(_)
        | Command::Sink(_)
        | Command::Result(_)
        | Command::Rerun(_) => None,
    }
}

async fn dispatch(client: &Client, command: Command) -> Result<(), ClientError> {
    match command {
        Command::Tube(command) => tube(client, command).await,
        Command::Plate(command) => plate(client, command).await,
        Command::Audit(args) => audit(client, args).await,
        Command::Kits(_) => {
            let reply = client.send::<Vec<KitView>>(client.get(&["kits"])).await?;
            client.print(&reply, |kits| kits_text(kits));
            Ok(())
        }
        Command::Run(command) => run::run(client, command).await,
        Command::Instrument(super::instrument::InstrumentCommand::List { .. }) => {
            run::instrument_list(client).await
        }
        #[cfg(feature = "demo")]
        Command::Demo(_) => Err(ClientError::usage("not a client command")),
        Command::Serve(_)
        | Command::Completions { .. }
        | Command::Store(_)
        | Command::Instrument(_)
        | Command::Outbox(_)
        | Command::Analyze(_)
        | Command::Sink(_)
        | Command::Result(_)
        | Command::Rerun(_) => Err(ClientError::usage("not a client command")),
    }
}

// ----- the HTTP client -----

/// The daemon's address, who we are, and how to print.
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    base: Url,
    token: String,
    json: bool,
}

/// A decoded answer with the JSON it came as, so `--json` prints what the daemon sent,
/// including any fields this client does not know.
#[derive(Debug)]
struct Reply<T> {
    value: T,
    json: serde_json::Value,
}

impl Client {
    fn new(api: &ApiArgs) -> Result<Client, ClientError> {
        let token = api
            .token
            .clone()
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| {
                ClientError::usage("no API token: pass --token or set PCRD_TOKEN")
                    .with_note("tokens are listed under [[users]] in the daemon's configuration")
            })?;
        let base = parse_base(&api.api)?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ClientError::unavailable(format!("cannot set up HTTP: {e}")))?;
        Ok(Client {
            http,
            base,
            token,
            json: api.json,
        })
    }

    /// `{base}/api/v1/{segments}`, each segment escaped, so a barcode or plate id can
    /// never change which endpoint is called.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["api", "v1"]).extend(segments);
        }
        url
    }

    fn get(&self, segments: &[&str]) -> RequestBuilder {
        self.http.get(self.url(segments)).bearer_auth(&self.token)
    }

    fn post(&self, segments: &[&str], body: &impl Serialize) -> RequestBuilder {
        self.http
            .post(self.url(segments))
            .bearer_auth(&self.token)
            .json(body)
    }

    /// Sends a request and decodes a 2xx answer as `T`; anything else becomes the
    /// error that decides the exit code.
    async fn send<T: DeserializeOwned>(
        &self,
        request: RequestBuilder,
    ) -> Result<Reply<T>, ClientError> {
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e))?;
        if !status.is_success() {
            return Err(self.api_error(status, &body));
        }
        let unexpected = |e: serde_json::Error| {
            ClientError::unavailable(format!(
                "unexpected answer from the daemon at {}: {e}",
                self.daemon()
            ))
            .with_note("is --api pointing at a pcrd daemon of the same version?")
        };
        let json: serde_json::Value = serde_json::from_slice(&body).map_err(unexpected)?;
        let value = T::deserialize(&json).map_err(unexpected)?;
        Ok(Reply { value, json })
    }

    fn daemon(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    fn transport_error(&self, e: &reqwest::Error) -> ClientError {
        let cause = root_cause(e);
        if e.is_connect() || e.is_builder() {
            ClientError::unavailable(format!(
                "the daemon at {} could not be reached: {cause}",
                self.daemon()
            ))
            .with_note("is it running? Start it with `pcrd serve`, or point --api (PCRD_API) at it")
        } else if e.is_timeout() {
            ClientError::unavailable(format!(
                "the daemon at {} did not answer within {}s",
                self.daemon(),
                REQUEST_TIMEOUT.as_secs()
            ))
            .with_note("a change may or may not have been made; look before retrying (receiving the same tubes again is always safe)")
        } else {
            ClientError::unavailable(format!(
                "the connection to the daemon at {} failed: {cause}",
                self.daemon()
            ))
        }
    }

    fn api_error(&self, status: StatusCode, body: &[u8]) -> ClientError {
        let (message, problems) = match serde_json::from_slice::<ErrorBody>(body) {
            Ok(ErrorBody { error }) => (error.message, error.problems),
            // Not a pcrd error body: something else answered (a proxy, another server).
            Err(_) => (format!("HTTP {status}"), Vec::new()),
        };
        if status.is_client_error() {
            let error = ClientError::rejected(message).with_problems(problems);
            match status {
                StatusCode::UNAUTHORIZED => error.with_note("check --token (PCRD_TOKEN)"),
                StatusCode::PAYLOAD_TOO_LARGE => {
                    error.with_note("the request is larger than the daemon accepts; for an import, use a smaller --batch")
                }
                _ => error,
            }
        } else {
            ClientError::unavailable(format!(
                "the daemon at {} failed ({status}): {message}",
                self.daemon()
            ))
            .with_problems(problems)
        }
    }

    /// Prints the daemon's JSON with `--json`, otherwise the text made from the reply.
    fn print<T>(&self, reply: &Reply<T>, text: impl FnOnce(&T) -> String) {
        if self.json {
            print_json(&reply.json);
        } else {
            out(&text(&reply.value));
        }
    }

    /// Whether a plate map on stdout should be colored.
    fn color(&self) -> bool {
        !self.json
            && std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    }
}

fn parse_base(text: &str) -> Result<Url, ClientError> {
    let bad = || {
        ClientError::usage(format!(
            "--api {text:?} is not a daemon address like http://127.0.0.1:8440"
        ))
    };
    let url = Url::parse(text).map_err(|_| bad())?;
    // The client is built without TLS: the daemon serves plain HTTP on the instrument PC
    // or the lab network.
    if url.scheme() != "http" || url.cannot_be_a_base() || url.host().is_none() {
        return Err(bad());
    }
    Ok(url)
}

/// The innermost cause ("Connection refused (os error 111)"), which says more than
/// reqwest's "error sending request for url".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

fn print_json(value: &impl Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => out(&format!("{text}\n")),
        Err(e) => eprintln!("pcrd: cannot print JSON: {e}"),
    }
}

/// Writes to stdout, ignoring errors: a reader that went away (`pcrd plate show | head`)
/// is not a failure of the command, which has already happened.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

// ----- errors -----

/// How a command failed, which decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The daemon refused the request (4xx), or local input was invalid.
    Rejected,
    /// The command line cannot work as given.
    Usage,
    /// The daemon could not be reached, did not answer, or failed (5xx).
    Unavailable,
}

/// A failed command: what to tell the user and which exit code to return.
#[derive(Debug)]
struct ClientError {
    failure: Failure,
    message: String,
    /// One line per problem (bad tube, bad row...).
    problems: Vec<String>,
    /// What to do about it.
    notes: Vec<String>,
}

impl ClientError {
    fn new(failure: Failure, message: impl Into<String>) -> ClientError {
        ClientError {
            failure,
            message: message.into(),
            problems: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn rejected(message: impl Into<String>) -> ClientError {
        ClientError::new(Failure::Rejected, message)
    }

    fn usage(message: impl Into<String>) -> ClientError {
        ClientError::new(Failure::Usage, message)
    }

    fn unavailable(message: impl Into<String>) -> ClientError {
        ClientError::new(Failure::Unavailable, message)
    }

    fn with_problems(mut self, problems: Vec<String>) -> ClientError {
        self.problems.extend(problems);
        self
    }

    fn with_note(mut self, note: impl Into<String>) -> ClientError {
        self.notes.push(note.into());
        self
    }

    /// Prints the error to stderr and returns its exit code.
    fn report(&self) -> ExitCode {
        let mut text = format!("pcrd: {}\n", self.message);
        for problem in &self.problems {
            text.push_str(&format!("  - {problem}\n"));
        }
        for note in &self.notes {
            text.push_str(&format!("  {note}\n"));
        }
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
        ExitCode::from(match self.failure {
            Failure::Rejected => exit::REJECTED,
            Failure::Usage => exit::USAGE,
            Failure::Unavailable => exit::UNAVAILABLE,
        })
    }
}

// ----- tubes -----

async fn tube(client: &Client, command: TubeCommand) -> Result<(), ClientError> {
    match command {
        TubeCommand::Receive {
            barcodes,
            pool,
            priority,
            due,
            reason,
            ..
        } => {
            let tubes = barcodes
                .into_iter()
                .map(|barcode| TubeIn {
                    barcode,
                    pool_size: Some(pool),
                    priority: Some(priority.clone()),
                    due_at: None,
                    due_in: due.clone(),
                })
                .collect();
            let request = ReceiveRequest { tubes, reason };
            let reply = client
                .send::<ReceiveResponse>(client.post(&["tubes"], &request))
                .await?;
            client.print(&reply, |r| {
                receive_text(r.received.len(), r.already_received.len())
            });
        }
        TubeCommand::Import {
            file,
            batch,
            reason,
            ..
        } => import_file(client, &file, usize::from(batch), reason).await?,
        TubeCommand::Show { barcode, .. } => {
            let reply = client
                .send::<TubeView>(client.get(&["tubes", &barcode]))
                .await?;
            client.print(&reply, |t| tube_text(t, SystemTime::now()));
        }
        TubeCommand::Waiting { limit, .. } => {
            let request = client.get(&["tubes"]).query(&[("limit", limit)]);
            let reply = client.send::<WaitingList>(request).await?;
            client.print(&reply, |w| waiting_text(w, SystemTime::now()));
        }
        TubeCommand::Due { limit, .. } => {
            let request = client.get(&["tubes", "due"]).query(&[("limit", limit)]);
            let reply = client.send::<Vec<serde_json::Value>>(request).await?;
            client.print(&reply, |rows| super::result::due_text(rows));
        }
    }
    Ok(())
}

fn receive_text(received: usize, already: usize) -> String {
    if already == 0 {
        format!("received {}\n", count(received, "tube"))
    } else {
        format!(
            "received {} ({already} already received)\n",
            count(received, "tube")
        )
    }
}

fn tube_text(tube: &TubeView, now: SystemTime) -> String {
    let state = match (&tube.plate, &tube.well) {
        (Some(plate), Some(well)) => format!("on plate {plate}, well {well}"),
        _ => format!("{} for a plate", tube.state),
    };
    render::key_values(&[
        ("tube", tube.barcode.clone()),
        ("state", state),
        ("pool", count(usize::from(tube.pool_size), "swab")),
        ("priority", tube.priority.clone()),
        ("due", due_text(tube.due_at.as_deref(), now, true)),
        (
            "received",
            format!(
                "{} by {}",
                render::short_time(&tube.received_at),
                tube.received_by
            ),
        ),
    ])
}

/// "in 3h12m" (with the time itself when `absolute`), or "-" when no due time was set.
fn due_text(due_at: Option<&str>, now: SystemTime, absolute: bool) -> String {
    let Some(text) = due_at else {
        return "-".into();
    };
    match humantime::parse_rfc3339_weak(text) {
        Ok(due) if absolute => format!(
            "{} ({})",
            render::short_time(text),
            render::due_in(due, now)
        ),
        Ok(due) => render::due_in(due, now),
        Err(_) => text.to_string(),
    }
}

fn waiting_text(list: &WaitingList, now: SystemTime) -> String {
    if list.tubes.is_empty() {
        return "no tubes waiting\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .tubes
        .iter()
        .map(|t| {
            let received = humantime::parse_rfc3339_weak(&t.received_at)
                .map_or_else(|_| t.received_at.clone(), |at| render::ago(at, now));
            vec![
                t.barcode.clone(),
                t.pool_size.to_string(),
                t.priority.clone(),
                due_text(t.due_at.as_deref(), now, false),
                received,
            ]
        })
        .collect();
    let mut text = render::table(&["BARCODE", "POOL", "PRIORITY", "DUE", "RECEIVED"], &rows);
    if list.total_waiting > list.tubes.len() as u64 {
        text.push_str(&format!(
            "{} of {} waiting (--limit for more)\n",
            list.tubes.len(),
            list.total_waiting
        ));
    } else {
        text.push_str(&format!("{} waiting\n", list.total_waiting));
    }
    text
}

/// Checks the whole file, then sends it in batches. Each batch is all or nothing on the
/// daemon, and receiving a tube again identically changes nothing, so after a failure
/// the same import can simply be run again.
async fn import_file(
    client: &Client,
    file: &Path,
    batch: usize,
    reason: Option<String>,
) -> Result<(), ClientError> {
    if batch == 0 {
        return Err(ClientError::usage("--batch must be at least 1"));
    }
    let input = File::open(file)
        .map_err(|e| ClientError::rejected(format!("cannot read {}: {e}", file.display())))?;
    let tubes = import::read_tubes(BufReader::new(input)).map_err(|problems| {
        ClientError::rejected(format!(
            "{}: {}; nothing was sent",
            file.display(),
            count(problems.len(), "problem")
        ))
        .with_problems(problems)
    })?;
    let total = tubes.len();
    let progress = progress_bar(total, client.json);
    let started = Instant::now();
    let mut done = ReceiveResponse {
        received: Vec::new(),
        already_received: Vec::new(),
    };
    let mut rest = tubes.into_iter();
    loop {
        let tubes: Vec<TubeIn> = rest.by_ref().take(batch).collect();
        let sent = tubes.len() as u64;
        if sent == 0 {
            break;
        }
        let request = ReceiveRequest {
            tubes,
            reason: reason.clone(),
        };
        match client
            .send::<ReceiveResponse>(client.post(&["tubes"], &request))
            .await
        {
            Ok(reply) => {
                done.received.extend(reply.value.received);
                done.already_received.extend(reply.value.already_received);
                progress.inc(sent);
            }
            Err(e) => {
                progress.abandon();
                return Err(with_progress_note(e, &done));
            }
        }
    }
    progress.finish_and_clear();
    if client.json {
        print_json(&done);
    } else {
        out(&import_text(
            file,
            &done,
            total.div_ceil(batch),
            started.elapsed(),
        ));
    }
    Ok(())
}

fn with_progress_note(error: ClientError, done: &ReceiveResponse) -> ClientError {
    let before = done.received.len() + done.already_received.len();
    if before == 0 {
        return error;
    }
    error.with_note(format!(
        "before this failure the daemon took {} ({} newly received, {} already received); running the same import again is safe: tubes already received identically are skipped",
        count(before, "tube"),
        done.received.len(),
        done.already_received.len()
    ))
}

fn import_text(file: &Path, done: &ReceiveResponse, batches: usize, elapsed: Duration) -> String {
    let tubes = done.received.len() + done.already_received.len();
    let rate = tubes as f64 / elapsed.as_secs_f64().max(1e-3);
    let mut text = format!(
        "imported {}: {} in {}\n",
        file.display(),
        count(tubes, "tube"),
        count(batches, "batch")
    );
    text.push_str(&render::key_values(&[
        ("received", done.received.len().to_string()),
        ("already received", done.already_received.len().to_string()),
        ("elapsed", format!("{:.2}s", elapsed.as_secs_f64())),
        ("rate", format!("{rate:.0} tubes/s")),
    ]));
    text
}

/// A bar on stderr for people watching; hidden for scripts (stderr not a terminal, or
/// `--json`) so logs do not fill with redraws.
fn progress_bar(total: usize, json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {human_pos}/{human_len} tubes  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

// ----- plates -----

async fn plate(client: &Client, command: PlateCommand) -> Result<(), ClientError> {
    match command {
        PlateCommand::Create {
            kit,
            format,
            id,
            reason,
            ..
        } => {
            let request = CreatePlateRequest {
                kit,
                format: Some(format),
                id,
                reason,
            };
            let reply = client
                .send::<PlateView>(client.post(&["plates"], &request))
                .await?;
            let color = client.color();
            client.print(&reply, |p| {
                format!(
                    "created plate {}\n\n{}",
                    p.id,
                    render::render_plate(p, color)
                )
            });
        }
        PlateCommand::Assign {
            plate,
            tubes,
            reason,
            ..
        } => {
            let request = assign_request(tubes, reason)?;
            let reply = client
                .send::<WellsChanged>(client.post(&["plates", &plate, "assign"], &request))
                .await?;
            client.print(&reply, |c| wells_text("put", "on", c));
        }
        PlateCommand::Fill {
            plate, max, reason, ..
        } => {
            let request = FillRequest { max, reason };
            let reply = client
                .send::<WellsChanged>(client.post(&["plates", &plate, "fill"], &request))
                .await?;
            client.print(&reply, |c| wells_text("put", "on", c));
        }
        PlateCommand::Unassign {
            plate,
            wells,
            reason,
            ..
        } => {
            let request = UnassignRequest { wells, reason };
            let reply = client
                .send::<WellsChanged>(client.post(&["plates", &plate, "unassign"], &request))
                .await?;
            client.print(&reply, |c| wells_text("took", "off", c));
        }
        PlateCommand::Show { plate, .. } => {
            let reply = client
                .send::<PlateView>(client.get(&["plates", &plate]))
                .await?;
            let color = client.color();
            client.print(&reply, |p| render::render_plate(p, color));
        }
        PlateCommand::List { .. } => {
            let reply = client
                .send::<Vec<PlateSummary>>(client.get(&["plates"]))
                .await?;
            client.print(&reply, |plates| plates_text(plates));
        }
        PlateCommand::Seal { plate, reason, .. } => {
            let request = ReasonRequest { reason };
            let reply = client
                .send::<PlateView>(client.post(&["plates", &plate, "seal"], &request))
                .await?;
            client.print(&reply, |p| {
                format!(
                    "sealed plate {}: {}, {}, {} free\n",
                    p.id,
                    count(p.samples, "sample"),
                    count(p.controls, "control"),
                    p.free
                )
            });
        }
        PlateCommand::Transfer {
            plates, to, reason, ..
        } => transfer(client, plates, to, reason).await?,
    }
    Ok(())
}

/// `BARCODE` goes to the next free well, `BARCODE@WELL` to the well named.
fn assign_request(
    tubes: Vec<String>,
    reason: Option<String>,
) -> Result<AssignRequest, ClientError> {
    let mut request = AssignRequest {
        tubes: Vec::new(),
        placements: Vec::new(),
        reason,
    };
    for tube in tubes {
        match tube.split_once('@') {
            None => request.tubes.push(tube),
            Some((barcode, well)) if !barcode.is_empty() && !well.is_empty() => {
                request.placements.push(PlacementIn {
                    well: well.to_string(),
                    barcode: barcode.to_string(),
                });
            }
            Some(_) => {
                return Err(ClientError::usage(format!(
                    "{tube:?} is neither BARCODE nor BARCODE@WELL (such as SWAB-0001@A1)"
                )));
            }
        }
    }
    Ok(request)
}

/// "put 3 tubes on plate PL-000001:" and the wells.
fn wells_text(verb: &str, preposition: &str, changed: &WellsChanged) -> String {
    let pairs: Vec<(String, String)> = changed
        .wells
        .iter()
        .map(|p| (p.well.clone(), p.barcode.clone()))
        .collect();
    format!(
        "{verb} {} {preposition} plate {}:\n{}",
        count(pairs.len(), "tube"),
        changed.plate,
        render::well_list(&pairs, 80)
    )
}

fn plates_text(plates: &[PlateSummary]) -> String {
    if plates.is_empty() {
        return "no plates\n".into();
    }
    let rows: Vec<Vec<String>> = plates
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.kind.clone(),
                p.kit.clone(),
                p.format.to_string(),
                p.state.clone(),
                p.samples.to_string(),
                render::short_time(&p.created_at),
            ]
        })
        .collect();
    render::table(
        &[
            "PLATE", "KIND", "KIT", "WELLS", "STATE", "SAMPLES", "CREATED",
        ],
        &rows,
    )
}

/// One plate transfers 1:1; four combine by quadrant into a 384-well plate.
async fn transfer(
    client: &Client,
    plates: Vec<String>,
    to: Option<String>,
    reason: Option<String>,
) -> Result<(), ClientError> {
    let request = match plates.as_slice() {
        [one] => client.post(
            &["plates", one, "transfer"],
            &TransferRequest { id: to, reason },
        ),
        [_, _, _, _] => client.post(
            &["plates", "combine"],
            &CombineRequest {
                sources: plates.clone(),
                id: to,
                reason,
            },
        ),
        _ => {
            return Err(ClientError::usage(format!(
                "give one plate (a 1:1 transfer) or four (quadrants Q1..Q4 of a 384-well plate), not {}",
                plates.len()
            )));
        }
    };
    let reply = client.send::<PlateView>(request).await?;
    let color = client.color();
    client.print(&reply, |p| {
        format!(
            "created PCR plate {} from {}\n\n{}",
            p.id,
            plates.join(", "),
            render::render_plate(p, color)
        )
    });
    Ok(())
}

// ----- audit and kits -----

/// Entries naming more tubes than this show a count instead of the list.
const AUDIT_TUBES_LISTED: usize = 5;

async fn audit(client: &Client, args: AuditArgs) -> Result<(), ClientError> {
    if args.verify {
        let reply = client
            .send::<AuditVerifyView>(client.get(&["audit", "verify"]))
            .await?;
        let v = &reply.value;
        if !v.intact {
            if client.json {
                print_json(&reply.json);
            }
            let at = v.first_broken.map_or("?".into(), |s| s.to_string());
            return Err(ClientError::rejected(format!(
                "audit trail BROKEN at entry {at} (of {} entries)",
                v.entries
            ))
            .with_note("entries from there on do not match their recorded hashes; the store has been changed outside pcrd"));
        }
        client.print(&reply, |v| {
            format!("audit trail intact: {} entries\n", v.entries)
        });
        return Ok(());
    }
    let mut query = vec![("limit", args.limit.to_string())];
    query.extend(args.plate.map(|p| ("plate", p)));
    query.extend(args.tube.map(|t| ("tube", t)));
    let reply = client
        .send::<Vec<AuditEntryView>>(client.get(&["audit"]).query(&query))
        .await?;
    client.print(&reply, |entries| audit_text(entries));
    Ok(())
}

fn audit_text(entries: &[AuditEntryView]) -> String {
    if entries.is_empty() {
        return "no audit entries\n".into();
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let tubes = if e.tubes.len() > AUDIT_TUBES_LISTED {
                count(e.tubes.len(), "tube")
            } else {
                e.tubes.join(",")
            };
            let detail = match &e.reason {
                Some(reason) => format!("{} (reason: {reason})", e.detail),
                None => e.detail.clone(),
            };
            vec![
                render::short_time(&e.at),
                e.user.clone(),
                e.action.clone(),
                e.plate.clone().unwrap_or_else(|| "-".into()),
                if tubes.is_empty() { "-".into() } else { tubes },
                detail,
            ]
        })
        .collect();
    render::table(
        &["TIME", "USER", "ACTION", "PLATE", "TUBES", "DETAIL"],
        &rows,
    )
}

fn kits_text(kits: &[KitView]) -> String {
    let rows: Vec<Vec<String>> = kits
        .iter()
        .map(|k| {
            let formats: Vec<String> = k.formats.iter().map(u16::to_string).collect();
            let targets: Vec<String> = k
                .targets
                .iter()
                .map(|t| format!("{} {} {}", t.name, t.channel, t.cutoff.replace(' ', "")))
                .collect();
            vec![
                k.id.clone(),
                k.version.clone(),
                formats.join(","),
                targets.join(", "),
                k.name.clone(),
            ]
        })
        .collect();
    render::table(&["KIT", "VERSION", "WELLS", "TARGETS", "NAME"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assign_splits_auto_and_explicit_tubes() {
        let request = assign_request(
            vec!["SWAB-0001".into(), "SWAB-0002@B3".into()],
            Some("rerun".into()),
        )
        .expect("valid");
        assert_eq!(request.tubes, ["SWAB-0001"]);
        assert_eq!(request.placements.len(), 1);
        assert_eq!(request.placements[0].barcode, "SWAB-0002");
        assert_eq!(request.placements[0].well, "B3");
        assert!(assign_request(vec!["SWAB-0001@".into()], None).is_err());
        assert!(assign_request(vec!["@A1".into()], None).is_err());
    }

    #[test]
    fn the_api_address_must_be_plain_http() {
        assert!(parse_base("http://127.0.0.1:8440").is_ok());
        assert!(parse_base("http://pcrd.lab.local:8440/").is_ok());
        for bad in ["127.0.0.1:8440", "https://pcrd", "localhost:8440", ""] {
            let e = parse_base(bad).expect_err(bad);
            assert_eq!(e.failure, Failure::Usage);
        }
    }

    #[test]
    fn urls_escape_ids_and_keep_a_base_path() {
        let client = Client::new(&ApiArgs {
            api: "http://127.0.0.1:8440/pcrd/".into(),
            token: Some("t".into()),
            json: false,
        })
        .expect("client");
        assert_eq!(
            client.url(&["tubes", "A/B?c"]).as_str(),
            "http://127.0.0.1:8440/pcrd/api/v1/tubes/A%2FB%3Fc"
        );
    }

    #[test]
    fn a_missing_or_blank_token_is_a_usage_error() {
        for token in [None, Some("  ".to_string())] {
            let e = Client::new(&ApiArgs {
                api: "http://127.0.0.1:8440".into(),
                token,
                json: false,
            })
            .expect_err("no token");
            assert_eq!(e.failure, Failure::Usage);
            assert!(e.message.contains("PCRD_TOKEN"));
        }
    }

    #[test]
    fn receive_summary_mentions_retries_only_when_there_were_some() {
        assert_eq!(receive_text(3, 0), "received 3 tubes\n");
        assert_eq!(
            receive_text(2, 1),
            "received 2 tubes (1 already received)\n"
        );
        assert_eq!(receive_text(1, 0), "received 1 tube\n");
    }

    #[test]
    fn audit_lists_few_tubes_and_counts_many() {
        let entry = |tubes: usize, reason: Option<&str>| AuditEntryView {
            seq: 1,
            at: "2026-11-27T14:03:12.345Z".into(),
            user: "tina".into(),
            action: "plate.filled".into(),
            plate: Some("PL-000001".into()),
            tubes: (0..tubes).map(|i| format!("SWAB-{i:04}")).collect(),
            detail: "put tubes on plate PL-000001".into(),
            reason: reason.map(str::to_string),
            hash: String::new(),
        };
        let text = audit_text(&[entry(2, Some("recount")), entry(94, None)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].contains("SWAB-0000,SWAB-0001"));
        assert!(lines[1].contains("(reason: recount)"));
        assert!(lines[1].starts_with("2026-11-27T14:03:12Z  tina"));
        assert!(lines[2].contains("94 tubes") && !lines[2].contains("SWAB-0000"));
    }
}
