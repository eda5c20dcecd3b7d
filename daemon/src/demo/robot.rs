//! The demo's technician and reviewer: everything a lab's staff would do, done
//! through the daemon's HTTP API as they would do it (receive tubes, build and seal
//! plates, start runs, put the plate in the cycler, review), never around it.
//!
//! The daemon may be killed at any moment (the reliability test does it twenty
//! times), so every step is "look, then act": a request whose answer was lost is
//! followed by a look at what the daemon holds before anything is sent again. A run
//! is only started when the daemon shows no live or finished run of that plate, so
//! an instrument never gets a second start for one plate.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcrd_protocol::domain::PlateFormat;
use pcrd_protocol::upstream::{ResultRecord, ResultStatus};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::scenario::{SAMPLES_PER_PLATE, Scenario, TubeSpec, WellFill, plate_curves, well_index};
use super::world::Instruments;

/// What went wrong in the demo, for the operator.
#[derive(Debug, thiserror::Error)]
pub enum RobotError {
    #[error("the daemon has not answered for {0:?}")]
    Unreachable(Duration),
    #[error("{what}: HTTP {status}: {body}")]
    Refused {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{0}")]
    Stuck(String),
}

/// An answer from the daemon.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

/// The daemon's API as the demo's staff use it; transport failures (a daemon being
/// restarted) are waited out, up to `patience`.
#[derive(Clone, Debug)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    technician: String,
    reviewer: String,
    patience: Duration,
}

#[derive(Clone, Copy, Debug)]
enum Who {
    Technician,
    Reviewer,
}

impl Api {
    pub fn new(base: &str, technician: &str, reviewer: &str) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
            base: base.trim_end_matches('/').to_string(),
            technician: technician.into(),
            reviewer: reviewer.into(),
            patience: Duration::from_secs(120),
        }
    }

    /// One request. `Ok(None)` when it may or may not have reached the daemon (the
    /// connection failed or dropped): the caller looks before acting again.
    async fn once(
        &self,
        who: Who,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Option<Reply> {
        let token = match who {
            Who::Technician => &self.technician,
            Who::Reviewer => &self.reviewer,
        };
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.ok()?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.ok()?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Some(Reply { status, body })
    }

    /// GET, retried until the daemon answers.
    pub async fn get(&self, path: &str) -> Result<Reply, RobotError> {
        let started = Instant::now();
        loop {
            if let Some(reply) = self
                .once(Who::Technician, reqwest::Method::GET, path, None)
                .await
            {
                return Ok(reply);
            }
            self.wait(started).await?;
        }
    }

    /// GET expecting 200.
    pub async fn get_ok(&self, path: &str) -> Result<Value, RobotError> {
        let reply = self.get(path).await?;
        if reply.status == 200 {
            Ok(reply.body)
        } else {
            Err(refused(path, &reply))
        }
    }

    async fn post(&self, who: Who, path: &str, body: &Value) -> Option<Reply> {
        self.once(who, reqwest::Method::POST, path, Some(body))
            .await
    }

    async fn wait(&self, started: Instant) -> Result<(), RobotError> {
        if started.elapsed() > self.patience {
            return Err(RobotError::Unreachable(self.patience));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(())
    }
}

fn refused(what: &str, reply: &Reply) -> RobotError {
    RobotError::Refused {
        what: what.into(),
        status: reply.status,
        body: reply.body.to_string(),
    }
}

/// The kit as the robot needs it: targets in channel order and which are viral.
#[derive(Clone, Debug)]
pub struct KitInfo {
    pub id: String,
    /// `(target, viral)` in channel order.
    pub targets: Vec<(String, bool)>,
    /// The distinct channels (dyes) in the kit's order: what a run reads.
    pub channels: Vec<String>,
}

impl KitInfo {
    pub async fn fetch(api: &Api, id: &str) -> Result<KitInfo, RobotError> {
        let kits = api.get_ok("/api/v1/kits").await?;
        let kit = kits
            .as_array()
            .into_iter()
            .flatten()
            .find(|k| k["id"] == id)
            .ok_or_else(|| RobotError::Stuck(format!("the daemon has no kit {id}")))?;
        let mut targets = Vec::new();
        let mut channels: Vec<String> = Vec::new();
        for t in kit["targets"].as_array().into_iter().flatten() {
            targets.push((
                t["name"].as_str().unwrap_or_default().to_string(),
                t["kind"] == "viral",
            ));
            let channel = t["channel"].as_str().unwrap_or_default().to_string();
            if !channels.contains(&channel) {
                channels.push(channel);
            }
        }
        Ok(KitInfo {
            id: id.into(),
            targets,
            channels,
        })
    }

    pub fn viral(&self) -> Vec<String> {
        self.targets
            .iter()
            .filter(|(_, v)| *v)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// When each step of a plate happened, from the robot's side.
#[derive(Clone, Debug, Default)]
pub struct PlateLog {
    pub extraction_plate: String,
    pub pcr_plate: String,
    pub samples: usize,
    pub extractor: String,
    pub cycler: String,
    pub extraction_run: u64,
    pub pcr_run: u64,
    pub valid: Option<bool>,
    pub invalid_reason: Option<String>,
    /// Seconds: plating (create to sealed), extraction, transfer and load, PCR,
    /// analysis (run end to stored analysis).
    pub plating: f64,
    pub extraction: f64,
    pub transfer: f64,
    pub pcr: f64,
    pub analysis: f64,
    pub started: Option<Instant>,
    pub analysed: Option<Instant>,
    /// Runs that failed and were started again (none in a healthy demo).
    pub restarted_runs: u32,
}

/// One target's Ct (`None`: undetermined).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TargetCt {
    pub target: String,
    pub ct: Option<f64>,
}

/// What the sink watcher has read from the batch files.
#[derive(Debug, Default)]
pub struct Delivered {
    /// Every record read, by idempotency key (a re-delivered batch repeats keys).
    pub by_key: HashMap<String, ResultRecord>,
    /// Records read, counting repeats.
    pub records_read: usize,
    /// Tubes with a final result (the summary counts their versions from
    /// `by_key`).
    pub tubes_with_final: HashSet<String>,
    /// When each plate's last final arrived.
    pub plate_delivered: HashMap<String, Instant>,
    files_read: HashSet<PathBuf>,
}

impl Delivered {
    /// Reads new NDJSON batch files (complete ones: their manifest exists).
    pub fn scan(&mut self, dir: &std::path::Path) -> std::io::Result<usize> {
        let mut new = 0;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(0);
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("pcrd-") && n.ends_with(".manifest.json"))
            })
            .collect();
        names.sort();
        for manifest in names {
            if self.files_read.contains(&manifest) {
                continue;
            }
            let name = manifest
                .to_string_lossy()
                .replace(".manifest.json", ".ndjson");
            let text = std::fs::read_to_string(&name)?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let record: ResultRecord = serde_json::from_str(line).map_err(|e| {
                    std::io::Error::other(format!("{name}: not a result record: {e}"))
                })?;
                self.records_read += 1;
                if record.status == ResultStatus::Final {
                    self.tubes_with_final.insert(record.tube.clone());
                    self.plate_delivered
                        .insert(record.plate.clone(), Instant::now());
                }
                self.by_key.insert(record.idempotency_key(), record);
                new += 1;
            }
            self.files_read.insert(manifest);
        }
        Ok(new)
    }
}

/// Counters the progress line and the summary read.
#[derive(Debug, Default)]
pub struct Progress {
    pub plates_started: AtomicUsize,
    /// Plates being created, filled and sealed.
    pub building: AtomicUsize,
    pub plates_analysed: AtomicUsize,
    pub reviewed: AtomicUsize,
    pub reruns_requested: AtomicUsize,
}

/// Plates built at the same time.
const BENCHES: usize = 4;

/// The staff.
#[derive(Debug)]
pub struct Robot {
    pub api: Api,
    pub instruments: Arc<Instruments>,
    pub scenario: Arc<Scenario>,
    pub kit: KitInfo,
    pub out_dir: PathBuf,
    pub progress: Arc<Progress>,
    pub delivered: Arc<Mutex<Delivered>>,
    pub plates: Arc<Mutex<Vec<PlateLog>>>,
    /// How often a tube has been on a PCR plate: its truth on a rerun differs.
    attempts: Mutex<HashMap<String, u32>>,
    /// Tubes that have been on a plate at least once.
    plated: Mutex<HashSet<String>>,
    truth: HashMap<String, usize>,
    poll: Duration,
}

impl Robot {
    pub fn new(
        api: Api,
        instruments: Arc<Instruments>,
        scenario: Arc<Scenario>,
        kit: KitInfo,
        out_dir: PathBuf,
        poll: Duration,
    ) -> Robot {
        let truth = scenario
            .tubes
            .iter()
            .enumerate()
            .map(|(i, t)| (t.barcode.clone(), i))
            .collect();
        Robot {
            api,
            instruments,
            scenario,
            kit,
            out_dir,
            progress: Arc::default(),
            delivered: Arc::default(),
            plates: Arc::default(),
            attempts: Mutex::default(),
            plated: Mutex::default(),
            truth,
            poll,
        }
    }

    pub fn tube(&self, barcode: &str) -> Option<&TubeSpec> {
        self.truth.get(barcode).map(|i| &self.scenario.tubes[*i])
    }

    /// Every tube of the scenario has a final result at the sink.
    pub fn all_final(&self) -> bool {
        // Finals only come for received tubes, which are the scenario's: the count
        // says it (the summary checks tube by tube).
        lock(&self.delivered).tubes_with_final.len() >= self.scenario.tubes.len()
    }

    /// Receives every tube (10,000 per request; a repeat is answered as
    /// `already_received`).
    pub async fn receive_tubes(&self) -> Result<(), RobotError> {
        for chunk in self.scenario.tubes.chunks(10_000) {
            let tubes: Vec<Value> = chunk
                .iter()
                .map(|t| {
                    json!({
                        "barcode": t.barcode,
                        "pool_size": t.pool_size,
                        "priority": t.priority,
                        "due_in": t.due_in,
                    })
                })
                .collect();
            let body =
                json!({ "tubes": tubes, "reason": "demo: tubes from the collection points" });
            let started = Instant::now();
            loop {
                match self.api.post(Who::Technician, "/api/v1/tubes", &body).await {
                    Some(r) if r.status == 200 => break,
                    Some(r) => return Err(refused("receiving tubes", &r)),
                    None => self.api.wait(started).await?,
                }
            }
        }
        Ok(())
    }

    /// Runs the lab until every tube has a final result at the sink, or `deadline`.
    pub async fn run(self: Arc<Self>, deadline: Duration) -> Result<(), RobotError> {
        let started = Instant::now();
        let done = Arc::new(AtomicBool::new(false));
        let reviewer = tokio::spawn(Arc::clone(&self).review_loop(Arc::clone(&done)));
        let watcher = tokio::spawn(Arc::clone(&self).watch_sink(Arc::clone(&done)));
        let (free_ext_tx, mut free_ext) = mpsc::unbounded_channel::<String>();
        let (free_cyc_tx, free_cyc) = mpsc::unbounded_channel::<String>();
        let free_cyc = Arc::new(tokio::sync::Mutex::new(free_cyc));
        for e in &self.instruments.extractors {
            let _ = free_ext_tx.send(e.name.clone());
        }
        for c in &self.instruments.cyclers {
            let _ = free_cyc_tx.send(c.name.clone());
        }
        let mut tasks = tokio::task::JoinSet::new();
        let mut next_plate = 1usize;
        let outcome = loop {
            if self.all_final() {
                break Ok(());
            }
            if started.elapsed() > deadline {
                break Err(RobotError::Stuck(format!(
                    "not every tube has a final result after {deadline:?}"
                )));
            }
            // A plate task that failed stops the demo.
            while let Some(joined) = tasks.try_join_next() {
                match joined {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return self.finish(done, reviewer, watcher, Err(e)).await,
                    Err(e) => {
                        return self
                            .finish(
                                done,
                                reviewer,
                                watcher,
                                Err(RobotError::Stuck(e.to_string())),
                            )
                            .await;
                    }
                }
            }
            // Plates being built may not have taken their tubes yet: each may take a
            // plate's worth. Read before the waiting count, so a fill in between is
            // counted twice (too few tubes seen free), never not at all.
            let building = self.progress.building.load(Ordering::SeqCst);
            if building >= BENCHES {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let waiting = self.api.get_ok("/api/v1/tubes?limit=1").await?["total_waiting"]
                .as_u64()
                .unwrap_or(0);
            // A plate is made when a full one can be, or for the last new tubes; tubes
            // back for a rerun wait for the plates still in the instruments (whose
            // reruns join them) rather than going out a few at a time.
            let unclaimed = waiting.saturating_sub((building * SAMPLES_PER_PLATE) as u64);
            let in_flight = self.progress.plates_started.load(Ordering::SeqCst)
                - self.progress.plates_analysed.load(Ordering::SeqCst);
            let new_left = self.scenario.tubes.len() > lock(&self.plated).len();
            let worth_a_plate = unclaimed >= SAMPLES_PER_PLATE as u64 || new_left || in_flight == 0;
            if unclaimed == 0 || !worth_a_plate {
                tokio::time::sleep(self.poll).await;
                continue;
            }
            let Ok(extractor) =
                tokio::time::timeout(Duration::from_millis(200), free_ext.recv()).await
            else {
                continue;
            };
            let Some(extractor) = extractor else {
                break Err(RobotError::Stuck("no extractor left".into()));
            };
            // Up to BENCHES plates are built at once, as at a lab's benches; each
            // fill takes the waiting tubes in plating order (reruns, urgent, then
            // due time).
            let id = next_plate;
            next_plate += 1;
            self.progress.plates_started.fetch_add(1, Ordering::SeqCst);
            self.progress.building.fetch_add(1, Ordering::SeqCst);
            let this = Arc::clone(&self);
            let (ext_tx, cyc_tx, cyc) = (
                free_ext_tx.clone(),
                free_cyc_tx.clone(),
                Arc::clone(&free_cyc),
            );
            tasks.spawn(async move {
                let t = Instant::now();
                let built = this.build_plate(&format!("EXT-{id:05}")).await;
                this.progress.building.fetch_sub(1, Ordering::SeqCst);
                built?;
                let plating = t.elapsed().as_secs_f64();
                this.plate(id, plating, extractor, ext_tx, cyc, cyc_tx)
                    .await
            });
        };
        // Let plates still in the instruments finish before stopping.
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Err(e)) = joined {
                return self.finish(done, reviewer, watcher, Err(e)).await;
            }
        }
        self.finish(done, reviewer, watcher, outcome).await
    }

    async fn finish(
        &self,
        done: Arc<AtomicBool>,
        reviewer: tokio::task::JoinHandle<Result<(), RobotError>>,
        watcher: tokio::task::JoinHandle<()>,
        outcome: Result<(), RobotError>,
    ) -> Result<(), RobotError> {
        done.store(true, Ordering::SeqCst);
        let _ = watcher.await;
        match reviewer.await {
            Ok(Err(e)) if outcome.is_ok() => Err(e),
            _ => outcome,
        }
    }

    /// One plate from tubes to analysed results.
    async fn plate(
        self: Arc<Self>,
        n: usize,
        plating: f64,
        extractor: String,
        free_ext: mpsc::UnboundedSender<String>,
        free_cyc: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
        give_back_cyc: mpsc::UnboundedSender<String>,
    ) -> Result<(), RobotError> {
        let ext_id = format!("EXT-{n:05}");
        let pcr_id = format!("PCR-{n:05}");
        let mut log = PlateLog {
            extraction_plate: ext_id.clone(),
            pcr_plate: pcr_id.clone(),
            extractor: extractor.clone(),
            started: Some(Instant::now()),
            plating,
            ..PlateLog::default()
        };

        let t = Instant::now();
        let (run, restarts) = self.run_to_end(&ext_id, &extractor, None).await?;
        log.extraction_run = run;
        log.restarted_runs += restarts;
        log.extraction = t.elapsed().as_secs_f64();
        let _ = free_ext.send(extractor);

        let t = Instant::now();
        self.transfer(&ext_id, &pcr_id).await?;
        let cycler = {
            let mut free = free_cyc.lock().await;
            free.recv()
                .await
                .ok_or_else(|| RobotError::Stuck("no cycler left".into()))?
        };
        let plate = self.api.get_ok(&format!("/api/v1/plates/{pcr_id}")).await?;
        log.samples = plate["samples"].as_u64().unwrap_or(0) as usize;
        let curves = self.curves_for(&plate, n as u64)?;
        if !self.instruments.load_cycler(&cycler, curves) {
            return Err(RobotError::Stuck(format!("no simulated cycler {cycler}")));
        }
        log.cycler = cycler.clone();
        log.transfer = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let (run, restarts) = self.run_to_end(&pcr_id, &cycler, Some(&plate)).await?;
        log.pcr_run = run;
        log.restarted_runs += restarts;
        log.pcr = t.elapsed().as_secs_f64();
        let _ = give_back_cyc.send(cycler);

        let t = Instant::now();
        let analysis = self
            .wait_ok(&format!("/api/v1/runs/{run}/analysis"))
            .await?;
        log.analysis = t.elapsed().as_secs_f64();
        log.analysed = Some(Instant::now());
        log.valid = analysis["plate"]["valid"].as_bool();
        log.invalid_reason = analysis["plate"]["reason"].as_str().map(str::to_string);
        self.progress
            .plates_analysed
            .fetch_add(1, Ordering::Relaxed);
        lock(&self.plates).push(log);
        Ok(())
    }

    /// Creates, fills and seals an extraction plate, looking before each step.
    async fn build_plate(&self, id: &str) -> Result<(), RobotError> {
        let path = format!("/api/v1/plates/{id}");
        let started = Instant::now();
        // What the daemon holds, as last seen: `None` until looked at or after an
        // answer that leaves it unknown; a 2xx answer to a step says what it holds
        // next without another look.
        let mut known: Option<(u16, Value)> = None;
        loop {
            let (status, plate) = match known.take() {
                Some(seen) => seen,
                None => {
                    let reply = self.api.get(&path).await?;
                    (reply.status, reply.body)
                }
            };
            let (step, body, done) = match status {
                404 => (
                    "/api/v1/plates".to_string(),
                    json!({ "kit": self.kit.id, "id": id, "reason": "demo" }),
                    201,
                ),
                200 if plate["state"] == "sealed" => {
                    let mut plated = lock(&self.plated);
                    for well in plate["wells"].as_array().into_iter().flatten() {
                        if let Some(barcode) = well["barcode"].as_str() {
                            plated.insert(barcode.to_string());
                        }
                    }
                    return Ok(());
                }
                200 if plate["samples"].as_u64() == Some(0) => {
                    if started.elapsed() > Duration::from_secs(30) {
                        return Err(RobotError::Stuck(format!("{id}: no tube to fill it with")));
                    }
                    (format!("{path}/fill"), json!({}), 200)
                }
                200 => (format!("{path}/seal"), json!({}), 200),
                _ => {
                    return Err(refused(
                        &path,
                        &Reply {
                            status,
                            body: plate,
                        },
                    ));
                }
            };
            match self.api.post(Who::Technician, &step, &body).await {
                // Created (empty) or sealed: the answer is the plate.
                Some(r) if r.status == done && !step.ends_with("/fill") => {
                    known = Some((200, r.body));
                }
                // Filled: the answer lists the wells placed.
                Some(r) if r.status == done => {
                    let placed = r.body["wells"].as_array().map_or(0, Vec::len);
                    if placed > 0 {
                        known = Some((200, json!({ "state": "open", "samples": placed })));
                    } else {
                        self.api.wait(started).await?;
                    }
                }
                // Done already (an answer lost to a restart), or in the way: look again.
                Some(r) if r.status == 409 || r.status >= 500 => self.api.wait(started).await?,
                Some(r) => return Err(refused(&format!("{step} for {id}"), &r)),
                None => self.api.wait(started).await?,
            }
        }
    }

    async fn transfer(&self, from: &str, to: &str) -> Result<(), RobotError> {
        let started = Instant::now();
        loop {
            let reply = self.api.get(&format!("/api/v1/plates/{to}")).await?;
            if reply.status == 200 {
                return Ok(());
            }
            let body = json!({ "id": to, "reason": "demo: extracted RNA to the PCR plate" });
            let path = format!("/api/v1/plates/{from}/transfer");
            match self.api.post(Who::Technician, &path, &body).await {
                Some(r) if r.status == 201 => {}
                Some(r) if r.status == 409 || r.status >= 500 => self.api.wait(started).await?,
                Some(r) => return Err(refused(&format!("transferring {from}"), &r)),
                None => self.api.wait(started).await?,
            }
        }
    }

    /// The cycler's curves for this PCR plate: each sample's truth on its attempt.
    fn curves_for(
        &self,
        plate: &Value,
        seed: u64,
    ) -> Result<pcrd_drivers::sim::cycler::PlateScenario, RobotError> {
        let format = match plate["format"].as_u64() {
            Some(384) => PlateFormat::Wells384,
            _ => PlateFormat::Wells96,
        };
        let mut fills = vec![WellFill::Empty; format.well_count()];
        let mut attempts = lock(&self.attempts);
        for well in plate["wells"].as_array().into_iter().flatten() {
            let name = well["well"].as_str().unwrap_or_default();
            let Some(index) = well_index(format, name) else {
                return Err(RobotError::Stuck(format!(
                    "plate well {name:?} is not a well"
                )));
            };
            fills[index] = match (well["kind"].as_str(), well["control"].as_str()) {
                (Some("control"), Some("positive_control")) => WellFill::PositiveControl,
                (Some("control"), _) => WellFill::NegativeControl,
                _ => {
                    let barcode = well["barcode"].as_str().unwrap_or_default();
                    let tube = self.tube(barcode).ok_or_else(|| {
                        RobotError::Stuck(format!("tube {barcode} is not in the scenario"))
                    })?;
                    let attempt = attempts.entry(barcode.to_string()).or_insert(0);
                    let fill = WellFill::Sample {
                        tube,
                        attempt: *attempt,
                    };
                    *attempt += 1;
                    fill
                }
            };
        }
        Ok(plate_curves(&fills, &self.kit.targets, 0xC0FFEE ^ seed))
    }

    /// Starts a run of `plate` on `instrument` unless the daemon already has a live
    /// or finished one, and follows it to its end. A failed run (the instrument
    /// lost it) is started again, once the daemon shows it failed; returns the run
    /// id and how many runs were started again.
    async fn run_to_end(
        &self,
        plate: &str,
        instrument: &str,
        pcr_plate: Option<&Value>,
    ) -> Result<(u64, u32), RobotError> {
        let mut restarts = 0;
        let started = Instant::now();
        // The run being followed, once known: read by id, which is cheap; the list
        // by plate is only asked when an answer was lost.
        let mut following: Option<u64> = None;
        loop {
            let latest = match following {
                Some(id) => Some(self.api.get_ok(&format!("/api/v1/runs/{id}")).await?),
                None => self
                    .api
                    .get_ok(&format!("/api/v1/runs?plate={plate}"))
                    .await?
                    .as_array()
                    .and_then(|r| r.last())
                    .cloned(),
            };
            let state = latest
                .as_ref()
                .and_then(|r| r["state"].as_str())
                .unwrap_or("none")
                .to_string();
            match state.as_str() {
                "finished" => {
                    let run = latest.as_ref().and_then(|r| r["id"].as_u64()).unwrap_or(0);
                    if let (Some(plate), Some(r)) = (pcr_plate, &latest) {
                        self.check_channels(plate, r)?;
                    }
                    return Ok((run, restarts));
                }
                "starting" | "running" | "instrument_offline" => {
                    following = latest.as_ref().and_then(|r| r["id"].as_u64());
                    tokio::time::sleep(self.poll).await;
                    continue;
                }
                "failed" | "aborted" => {
                    following = None;
                    restarts += 1;
                    if restarts > 3 {
                        return Err(RobotError::Stuck(format!(
                            "plate {plate}: run failed {restarts} times, last: {}",
                            latest.map(|r| r["reason"].to_string()).unwrap_or_default()
                        )));
                    }
                    tracing::warn!(plate, instrument, "The run failed; starting it again.");
                }
                _ => {}
            }
            let body = json!({ "plate": plate, "instrument": instrument });
            match self.api.post(Who::Technician, "/api/v1/runs", &body).await {
                Some(r) if r.status == 201 => following = r.body["id"].as_u64(),
                Some(r) if r.status == 409 || r.status == 502 => {}
                Some(r) if r.status == 503 => {}
                Some(r) => return Err(refused(&format!("starting a run of {plate}"), &r)),
                None => {}
            }
            // The instrument may still be coming online after a restart.
            if started.elapsed() > Duration::from_secs(600) {
                return Err(RobotError::Stuck(format!(
                    "plate {plate}: no run started on {instrument} in 10 minutes"
                )));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// The run reads the kit's targets in the order the curves were built in.
    fn check_channels(&self, plate: &Value, run: &Value) -> Result<(), RobotError> {
        let channels: Vec<&str> = run["channels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        // The curves were built one per target in the kit's order; with one target
        // per channel that is the run's order too.
        if channels != self.kit.channels || self.kit.channels.len() != self.kit.targets.len() {
            return Err(RobotError::Stuck(format!(
                "plate {}: the run read {channels:?}, the curves were built for {:?}",
                plate["id"], self.kit.channels
            )));
        }
        Ok(())
    }

    async fn wait_ok(&self, path: &str) -> Result<Value, RobotError> {
        let started = Instant::now();
        loop {
            let reply = self.api.get(path).await?;
            if reply.status == 200 {
                return Ok(reply.body);
            }
            if started.elapsed() > Duration::from_secs(300) {
                return Err(refused(path, &reply));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// The reviewer: positives (and negatives held for a curve flag) are released
    /// after a look; retests and inconclusives are sent for a rerun (the kit says
    /// so; the tube is already back in the queue); invalids likewise.
    async fn review_loop(self: Arc<Self>, done: Arc<AtomicBool>) -> Result<(), RobotError> {
        while !done.load(Ordering::SeqCst) {
            let listed = self
                .api
                .get("/api/v1/results?state=awaiting_review&limit=10000")
                .await?;
            let results = listed.body.as_array().cloned().unwrap_or_default();
            if results.is_empty() {
                tokio::time::sleep(self.poll.max(Duration::from_millis(250))).await;
                continue;
            }
            // Decisions go out sixteen at a time: each is its own durable transaction,
            // and the store makes concurrent ones durable with one barrier.
            let mut decisions = tokio::task::JoinSet::new();
            for result in results {
                while decisions.len() >= 16 {
                    if let Some(Ok(Err(e))) = decisions.join_next().await {
                        return Err(e);
                    }
                }
                let this = Arc::clone(&self);
                decisions.spawn(async move { this.decide(&result).await });
            }
            while let Some(joined) = decisions.join_next().await {
                if let Ok(Err(e)) = joined {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// One reviewer decision; a lost answer or a 409 (decided already) leaves the
    /// result to the next look at the list.
    async fn decide(&self, result: &Value) -> Result<(), RobotError> {
        let id = result["result_id"].as_str().unwrap_or_default();
        let interpretation = result["interpretation"].as_str().unwrap_or_default();
        let release =
            matches!(interpretation, "positive" | "negative") && result["plate_valid"] == true;
        let (action, body) = if release {
            (
                "release",
                json!({ "reason": "demo reviewer: curves and Ct checked" }),
            )
        } else {
            (
                "rerun",
                json!({ "reason": format!("demo reviewer: {interpretation}, the kit says retest") }),
            )
        };
        let path = format!("/api/v1/results/{id}/{action}");
        match self.api.post(Who::Reviewer, &path, &body).await {
            Some(r) if r.status == 200 => {
                self.progress.reviewed.fetch_add(1, Ordering::Relaxed);
                if !release {
                    self.progress
                        .reruns_requested
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Some(r) if r.status == 409 || r.status >= 500 => Ok(()),
            Some(r) => Err(refused(&path, &r)),
            None => Ok(()),
        }
    }

    async fn watch_sink(self: Arc<Self>, done: Arc<AtomicBool>) {
        loop {
            let finished = done.load(Ordering::SeqCst);
            if let Err(e) = lock(&self.delivered).scan(&self.out_dir) {
                tracing::error!(error = %e, "Reading the batch files failed.");
            }
            if finished {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each target's Ct in a delivered record, in the kit's order.
    pub fn cts(record: &ResultRecord) -> Vec<TargetCt> {
        record
            .targets
            .iter()
            .map(|t| TargetCt {
                target: t.name.clone(),
                ct: t.ct,
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
