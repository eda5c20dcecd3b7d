//! The gateway's panel in the daemon: `[panel]` in the config, what the lamp is fed,
//! and where the button's actions go. The behaviour itself (colours, blinking, the
//! buzzer, debouncing, the abort confirmation) is `pcrd_drivers::panel::logic`; see
//! docs/panel.md for the table.
//!
//! # What feeds the lamp
//! Every [`FEED_EVERY`] the daemon builds a [`LabState`] from:
//! - each extractor supervisor (`crate::instruments`): offline, in the device's
//!   error state, or a run stalled is a fault (source `instrument:NAME`); a run in
//!   progress is active;
//! - each cycler (`crate::cyclers`): offline or in its error state is a fault
//!   (source `cycler:NAME`); a run pcrd follows on it is active;
//! - the store: a failed durability barrier or damage found is a fault (source
//!   `store`); the daemon stops right after, so the lamp shows it only briefly;
//! - whatever holds a [`PanelInput`] (analysers, later work; the button's own
//!   refusals): `input.active("run:R1")`, `input.fault("x:1", "lid opened")`,
//!   `input.clear("run:R1")`.
//!
//! # Where presses go
//! [`Panel::actions`] is a broadcast stream of [`PanelAction`] (`Start`, `Abort`),
//! each logged and kept in [`Panel::recent_actions`]. The daemon's own consumer
//! (`act`) carries them out on `[panel] instrument` (or the only instrument): a
//! Start starts the one sealed plate ready for it, an Abort aborts its run in
//! progress ("aborted from the panel"). A request it cannot carry out (no plate or
//! several ready, nothing running, the instrument refusing) is logged with why and
//! shown for a few seconds as a fault (red, buzzer) under `panel:button`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pcrd_drivers::panel::logic::{Action, Effect, Event, LabState, Timing};
use pcrd_drivers::panel::sim::SimBoard;
use pcrd_drivers::panel::{LampWiring, PanelHandle, PanelView};
use pcrd_protocol::extractor::ExtractorState;
use serde::Deserialize;
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::instruments::{Connection, Instruments};
use crate::lab::Lab;

/// How often the lab's state is gathered for the lamp. A fault shows within this
/// (plus the instrument's poll interval); [`PanelInput`] reports wake it at once.
pub const FEED_EVERY: Duration = Duration::from_millis(250);

/// Longer than the debouncer needs to confirm a release (30 ms at 5 ms samples).
const RELEASE_SETTLES: Duration = Duration::from_millis(100);

/// How many recent actions the API shows.
const RECENT_ACTIONS: usize = 20;

/// `[panel]` as written in the config.
#[derive(Debug, Deserialize)]
pub struct RawPanel {
    kind: String,
    chip: Option<String>,
    lamp: Option<String>,
    red: Option<u32>,
    amber: Option<u32>,
    green: Option<u32>,
    buzzer: Option<u32>,
    button: Option<u32>,
    active_low: Option<bool>,
    long_press_ms: Option<u64>,
    confirm_ms: Option<u64>,
    buzz_for_s: Option<u64>,
    /// The extractor or cycler the button starts and aborts runs on.
    instrument: Option<String>,
}

/// Where the pins are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PanelKind {
    /// Simulated pins (no hardware); the API can press the button.
    Sim,
    /// A GPIO character device: the chip and the line offsets on it.
    Gpio {
        chip: String,
        red: u32,
        amber: Option<u32>,
        green: u32,
        buzzer: u32,
        button: u32,
    },
}

/// A validated `[panel]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PanelConfig {
    pub kind: PanelKind,
    pub wiring: LampWiring,
    pub active_low: bool,
    pub timing: Timing,
    /// The instrument the button starts and aborts runs on; `None`: the only
    /// configured instrument, if there is exactly one.
    pub instrument: Option<String>,
}

/// Validates `[panel]`, adding each problem to `problems`.
pub fn parse_panel(raw: Option<RawPanel>, problems: &mut Vec<String>) -> Option<PanelConfig> {
    let raw = raw?;
    let before = problems.len();
    let wiring = match raw.lamp.as_deref().unwrap_or("tower") {
        "tower" => LampWiring::Tower,
        "rgb" => LampWiring::Rgb,
        other => {
            problems.push(format!(
                "panel.lamp {other:?} is not \"tower\" (red, amber, green lamps) or \"rgb\" (amber = red + green)"
            ));
            LampWiring::Tower
        }
    };
    let kind = match raw.kind.as_str() {
        "sim" => {
            for (key, set) in [
                ("chip", raw.chip.is_some()),
                ("red", raw.red.is_some()),
                ("amber", raw.amber.is_some()),
                ("green", raw.green.is_some()),
                ("buzzer", raw.buzzer.is_some()),
                ("button", raw.button.is_some()),
            ] {
                if set {
                    problems.push(format!(
                        "panel.{key} is for kind = \"gpio\"; a simulated panel has no lines"
                    ));
                }
            }
            PanelKind::Sim
        }
        "gpio" => {
            if !cfg!(feature = "gpio") {
                problems.push(
                    "panel.kind = \"gpio\" but this pcrd was built without GPIO support: build with `--features gpio`"
                        .into(),
                );
            }
            let mut line = |key: &str, value: Option<u32>| {
                value.unwrap_or_else(|| {
                    problems.push(format!(
                        "panel.{key} (a line offset on the chip) is missing"
                    ));
                    0
                })
            };
            let red = line("red", raw.red);
            let green = line("green", raw.green);
            let buzzer = line("buzzer", raw.buzzer);
            let button = line("button", raw.button);
            let amber = match (wiring, raw.amber) {
                (LampWiring::Tower, None) => Some(line("amber", None)),
                (LampWiring::Tower, Some(a)) => Some(a),
                (LampWiring::Rgb, None) => None,
                (LampWiring::Rgb, Some(_)) => {
                    problems.push(
                        "panel.amber: an rgb lamp has no amber line (amber is red + green)".into(),
                    );
                    None
                }
            };
            let chip = raw.chip.unwrap_or_default();
            if chip.trim().is_empty() {
                problems.push("panel.chip (e.g. \"/dev/gpiochip0\") is missing".into());
            }
            let mut lines: Vec<u32> = [red, green, buzzer, button].into();
            lines.extend(amber);
            lines.sort_unstable();
            if lines.windows(2).any(|w| w[0] == w[1]) {
                problems.push("panel: two roles share one line offset".into());
            }
            PanelKind::Gpio {
                chip,
                red,
                amber,
                green,
                buzzer,
                button,
            }
        }
        other => {
            problems.push(format!("panel.kind {other:?} is not \"sim\" or \"gpio\""));
            PanelKind::Sim
        }
    };
    let mut timing = Timing::default();
    let mut bounded = |key: &str,
                       value: Option<u64>,
                       range: std::ops::RangeInclusive<u64>,
                       unit: Duration,
                       slot: &mut Duration| {
        if let Some(v) = value {
            if range.contains(&v) {
                *slot = unit * u32::try_from(v).unwrap_or(u32::MAX);
            } else {
                problems.push(format!(
                    "panel.{key} {v} is outside {}..={}",
                    range.start(),
                    range.end()
                ));
            }
        }
    };
    let ms = Duration::from_millis(1);
    bounded(
        "long_press_ms",
        raw.long_press_ms,
        500..=10_000,
        ms,
        &mut timing.long_press,
    );
    bounded(
        "confirm_ms",
        raw.confirm_ms,
        1_000..=60_000,
        ms,
        &mut timing.confirm_window,
    );
    bounded(
        "buzz_for_s",
        raw.buzz_for_s,
        1..=3_600,
        Duration::from_secs(1),
        &mut timing.buzz_for,
    );
    if raw
        .instrument
        .as_deref()
        .is_some_and(|name| name.trim().is_empty())
    {
        problems
            .push("panel.instrument is empty: name an [[extractors]] or [[cyclers]] entry".into());
    }
    (problems.len() == before).then_some(PanelConfig {
        kind,
        wiring,
        active_low: raw.active_low.unwrap_or(false),
        timing,
        instrument: raw.instrument,
    })
}

/// What the panel asks the run orchestration to do, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PanelAction {
    pub action: Action,
    pub at: SystemTime,
}

/// A handle for parts of the daemon that know of runs and faults the extractor
/// supervisors do not (cyclers, the run orchestration). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct PanelInput {
    reports: Arc<Mutex<BTreeMap<String, Report>>>,
    changed: Arc<Notify>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Report {
    Active,
    Fault(String),
}

impl PanelInput {
    fn set(&self, source: &str, report: Option<Report>) {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        match report {
            Some(r) => reports.insert(source.to_owned(), r),
            None => reports.remove(source),
        };
        drop(reports);
        self.changed.notify_one();
    }

    /// `source` (e.g. `run:R-0042`) has a run in progress: amber.
    pub fn active(&self, source: &str) {
        self.set(source, Some(Report::Active));
    }

    /// `source` is faulted, with why: red, and the buzzer if it is new.
    pub fn fault(&self, source: &str, reason: &str) {
        self.set(source, Some(Report::Fault(reason.to_owned())));
    }

    /// `source` is neither active nor faulted any more.
    pub fn clear(&self, source: &str) {
        self.set(source, None);
    }

    fn merge_into(&self, lab: &mut LabState) {
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        for (source, report) in reports.iter() {
            match report {
                Report::Active => {
                    lab.active.insert(source.clone());
                }
                Report::Fault(why) => {
                    lab.faults.insert(source.clone(), why.clone());
                }
            }
        }
    }
}

/// Opening the panel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PanelError {
    /// The GPIO chip or a line could not be opened (missing device, permissions,
    /// a line another program holds).
    #[error("panel: {0}")]
    Gpio(String),
    /// `[panel] instrument` names no configured extractor or cycler.
    #[error("panel.instrument {0:?} is not an [[extractors]] or [[cyclers]] entry")]
    UnknownInstrument(String),
}

/// The daemon's panel: absent when `[panel]` is not configured.
#[derive(Debug, Default)]
pub struct Panel {
    running: Option<Running>,
    input: PanelInput,
}

#[derive(Debug)]
struct Running {
    kind: &'static str,
    handle: PanelHandle,
    /// For a simulated panel: its lines, readable and pressable.
    sim: Option<SimBoard>,
    timing: Timing,
    actions: broadcast::Sender<PanelAction>,
    recent: Arc<Mutex<VecDeque<PanelAction>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Panel {
    /// Starts the panel task and what feeds it. With no `[panel]`, starts nothing.
    /// Must run inside the tokio runtime.
    pub fn start(
        config: Option<&PanelConfig>,
        lab: Arc<Lab>,
        instruments: Arc<Instruments>,
    ) -> Result<Panel, PanelError> {
        let input = PanelInput::default();
        let Some(config) = config else {
            return Ok(Panel {
                running: None,
                input,
            });
        };
        let (lab_tx, lab_rx) = watch::channel(LabState::default());
        let (handle, sim, kind) = match &config.kind {
            PanelKind::Sim => {
                let board = SimBoard::new(config.active_low);
                let handle =
                    pcrd_drivers::panel::spawn(board.pins(config.wiring), config.timing, lab_rx);
                (handle, Some(board), "sim")
            }
            PanelKind::Gpio { .. } => (open_gpio(config, lab_rx)?, None, "gpio"),
        };
        if let Some(name) = &config.instrument {
            let known = instruments.get(name).is_some()
                || instruments.cyclers().is_some_and(|c| c.get(name).is_some());
            if !known {
                return Err(PanelError::UnknownInstrument(name.clone()));
            }
        }
        let (actions, _) = broadcast::channel(16);
        let recent = Arc::new(Mutex::new(VecDeque::new()));
        let actor = tokio::spawn(act(
            Arc::clone(&lab),
            Arc::clone(&instruments),
            input.clone(),
            config.instrument.clone(),
            actions.subscribe(),
        ));
        let feeder = tokio::spawn(feed(lab, instruments, input.clone(), lab_tx));
        let relay = tokio::spawn(relay(
            handle.subscribe(),
            actions.clone(),
            Arc::clone(&recent),
        ));
        info!(kind, active_low = config.active_low, "Panel started.");
        Ok(Panel {
            running: Some(Running {
                kind,
                handle,
                sim,
                timing: config.timing,
                actions,
                recent,
                tasks: vec![feeder, relay, actor],
            }),
            input,
        })
    }

    /// Whether `[panel]` is configured.
    pub fn configured(&self) -> bool {
        self.running.is_some()
    }

    /// `sim` or `gpio`; `None` without a panel.
    pub fn kind(&self) -> Option<&'static str> {
        self.running.as_ref().map(|r| r.kind)
    }

    /// Where cyclers and runs report what the lamp should show.
    pub fn input(&self) -> PanelInput {
        self.input.clone()
    }

    /// The button's actions from now on; `None` without a panel.
    pub fn actions(&self) -> Option<broadcast::Receiver<PanelAction>> {
        self.running.as_ref().map(|r| r.actions.subscribe())
    }

    /// The last actions, oldest first.
    pub fn recent_actions(&self) -> Vec<PanelAction> {
        self.running.as_ref().map_or_else(Vec::new, |r| {
            r.recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied()
                .collect()
        })
    }

    pub fn view(&self) -> Option<PanelView> {
        self.running.as_ref().map(|r| r.handle.view())
    }

    /// The simulated board, for a simulated panel.
    pub fn sim(&self) -> Option<&SimBoard> {
        self.running.as_ref().and_then(|r| r.sim.as_ref())
    }

    /// Presses the simulated button (short, or held past the long-press time) and
    /// returns what the panel made of it. `None` if the panel did not register a
    /// press (it would be a bug) or the panel is not simulated.
    pub async fn press_sim(&self, long: bool) -> Option<(bool, Effect)> {
        let running = self.running.as_ref()?;
        let board = running.sim.as_ref()?;
        let mut events = running.handle.subscribe();
        let hold = if long {
            running.timing.long_press + Duration::from_millis(200)
        } else {
            Duration::from_millis(120)
        };
        board.press(hold).await;
        // The release is confirmed one debounce time later, sampled every 5 ms.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Ok((Event::Pressed { press, effect }, _))) => {
                    let long = press == pcrd_drivers::panel::logic::Press::Long;
                    if long {
                        // A long press is reported while the button is still
                        // held; its release is confirmed one debounce time
                        // (30 ms, sampled every 5 ms) after the contact opens.
                        // Until then a next press would merge into this one.
                        tokio::time::sleep(RELEASE_SETTLES).await;
                    }
                    return Some((long, effect));
                }
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return None,
            }
        }
    }

    /// Appends the panel's gauges in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let Some(view) = self.view() else { return };
        let _ = writeln!(
            out,
            "# HELP pcrd_panel_lamp The panel lamp's colour: 1 for the colour shown, 0 for the others.\n# TYPE pcrd_panel_lamp gauge"
        );
        for colour in ["green", "amber", "red"] {
            let _ = writeln!(
                out,
                "pcrd_panel_lamp{{colour=\"{colour}\"}} {}",
                u8::from(view.colour.as_str() == colour)
            );
        }
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            out,
            "pcrd_panel_fault_unacknowledged",
            "1 while a fault waits for someone to press the panel's button.",
            u64::from(view.unacknowledged),
        );
        gauge(
            out,
            "pcrd_panel_buzzer_sounding",
            "1 while the panel's buzzer pattern runs.",
            u64::from(view.buzzing),
        );
        let _ = writeln!(
            out,
            "# HELP pcrd_panel_pin_errors_total Panel pin reads and writes that failed.\n# TYPE pcrd_panel_pin_errors_total counter\npcrd_panel_pin_errors_total {}",
            view.pin_errors
        );
    }
}

#[cfg(feature = "gpio")]
fn open_gpio(
    config: &PanelConfig,
    lab: watch::Receiver<LabState>,
) -> Result<PanelHandle, PanelError> {
    let PanelKind::Gpio {
        chip,
        red,
        amber,
        green,
        buzzer,
        button,
    } = &config.kind
    else {
        return Err(PanelError::Gpio("not a GPIO panel".into()));
    };
    let pins = pcrd_drivers::panel::gpio::open(&pcrd_drivers::panel::gpio::GpioLines {
        chip: chip.clone(),
        red: *red,
        amber: *amber,
        green: *green,
        buzzer: *buzzer,
        button: *button,
        active_low: config.active_low,
    })
    .map_err(|e| PanelError::Gpio(e.to_string()))?;
    Ok(pcrd_drivers::panel::spawn(pins, config.timing, lab))
}

#[cfg(not(feature = "gpio"))]
fn open_gpio(
    _config: &PanelConfig,
    _lab: watch::Receiver<LabState>,
) -> Result<PanelHandle, PanelError> {
    // The config check refuses kind = "gpio" in such a build; kept as an error,
    // not a panic, in case a config is built in code.
    Err(PanelError::Gpio(
        "this pcrd was built without GPIO support: build with `--features gpio`".into(),
    ))
}

/// The lab's state as the lamp sees it, now.
fn gather(lab: &Lab, instruments: &Instruments, input: &PanelInput) -> LabState {
    let mut state = LabState::default();
    for instrument in instruments.all() {
        let s = instrument.snapshot();
        let source = format!("instrument:{}", s.name);
        let device_error = s
            .status
            .as_ref()
            .filter(|st| st.state == ExtractorState::Error);
        let fault = if s.tracked.connection == Connection::Offline {
            Some(format!(
                "offline: {}",
                s.tracked.reason.as_deref().unwrap_or("no answer")
            ))
        } else if let Some(status) = device_error {
            Some(match &status.error {
                Some(e) => format!(
                    "device error {}{}",
                    e.code,
                    e.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
                None => "device error".to_owned(),
            })
        } else if s.tracked.run.as_ref().is_some_and(|r| r.stalled) {
            Some("run stalled: progress stands still".to_owned())
        } else {
            None
        };
        if let Some(why) = fault {
            state.faults.insert(source.clone(), why);
        }
        if s.tracked.run.is_some() {
            state.active.insert(source);
        }
    }
    if let Some(cyclers) = instruments.cyclers() {
        for cycler in cyclers.all() {
            let link = cycler.link_state();
            let source = format!("cycler:{}", cycler.name);
            let device_error = link
                .status
                .as_ref()
                .is_some_and(|st| st.state == pcrd_protocol::cycler::RunState::Error);
            if link.link == crate::cyclers::Link::Offline {
                state.faults.insert(
                    source.clone(),
                    format!("offline: {}", link.reason.as_deref().unwrap_or("no answer")),
                );
            } else if device_error {
                state.faults.insert(
                    source.clone(),
                    link.last_fault
                        .unwrap_or_else(|| "the cycler is in its error state".into()),
                );
            }
            if cycler.active_run().is_some() {
                state.active.insert(source);
            }
        }
    }
    if let Some(why) = lab.store().failure() {
        state.faults.insert("store".into(), why);
    }
    input.merge_into(&mut state);
    state
}

/// Gathers the lab's state every [`FEED_EVERY`] (or at once on a [`PanelInput`]
/// report) and hands it to the panel task when it changed.
async fn feed(
    lab: Arc<Lab>,
    instruments: Arc<Instruments>,
    input: PanelInput,
    tx: watch::Sender<LabState>,
) {
    let mut last_faults = BTreeMap::new();
    loop {
        let state = gather(&lab, &instruments, &input);
        for (source, why) in &state.faults {
            if last_faults.get(source) != Some(why) {
                warn!(%source, reason = %why, "Panel shows a fault.");
            }
        }
        last_faults.clone_from(&state.faults);
        tx.send_if_modified(|current| {
            if *current == state {
                false
            } else {
                *current = state;
                true
            }
        });
        tokio::select! {
            () = tokio::time::sleep(FEED_EVERY) => {}
            () = input.changed.notified() => {}
        }
    }
}

/// How long a refused Start or Abort shows on the panel (red, buzzer) before
/// it clears by itself: the operator hears that nothing happened, and the
/// log says why.
const REFUSAL_SHOWN: Duration = Duration::from_secs(3);

/// The fault source a refused button action is shown under.
const REFUSAL_SOURCE: &str = "panel:button";

/// The user runs started and aborted from the panel are recorded under.
const PANEL_USER: &str = "panel";

/// What a Start or an Abort from the button did.
#[derive(Debug)]
enum Outcome {
    Started { run: u64, plate: String },
    Aborted { run: u64 },
}

/// The instrument the button works on: the configured one, else the only one.
fn button_instrument(
    instruments: &Instruments,
    configured: Option<&str>,
) -> Result<String, String> {
    if let Some(name) = configured {
        return Ok(name.to_owned());
    }
    let mut names: Vec<String> = instruments.all().map(|i| i.name.clone()).collect();
    if let Some(cyclers) = instruments.cyclers() {
        names.extend(cyclers.all().map(|c| c.name.clone()));
    }
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err("no instrument is configured".into()),
        _ => Err(format!(
            "{} instruments are configured ({}): set [panel] instrument to the one the button runs",
            names.len(),
            names.join(", ")
        )),
    }
}

/// Starts the run of the one sealed plate ready for the button's instrument:
/// a sealed PCR plate with no finished or unfinished run for a cycler, a
/// sealed extraction plate not yet extracted for an extractor. Refused (with
/// why) when there is none or more than one: the button cannot choose.
async fn start_from_button(
    lab: &Lab,
    instruments: &Instruments,
    instrument: &str,
) -> Result<Outcome, String> {
    let cycler = instruments
        .cyclers()
        .filter(|c| c.get(instrument).is_some());
    let runs = match cycler {
        Some(c) => c.runs().all(),
        None => match instruments.cyclers() {
            Some(c) => c.runs().all(),
            None => Ok(Vec::new()),
        },
    }
    .map_err(|e| format!("the runs cannot be read: {e}"))?;
    let want = if cycler.is_some() {
        crate::model::PlateKind::Pcr
    } else {
        crate::model::PlateKind::Extraction
    };
    let plates = lab
        .plates()
        .map_err(|e| format!("the plates cannot be read: {e}"))?;
    let ready: Vec<String> = plates
        .into_iter()
        .filter(|p| p.kind == want && p.state == crate::model::PlateState::Sealed)
        .map(|p| p.id.to_string())
        .filter(|id| {
            !runs.iter().any(|r| {
                r.plate == *id
                    && r.is_extraction() == (want == crate::model::PlateKind::Extraction)
                    && (r.state == crate::cyclers::RunState::Finished || !r.state.is_terminal())
            })
        })
        .collect();
    let plate = match ready.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(format!(
                "no sealed plate is ready for {instrument}: start it with `pcrd run start`"
            ));
        }
        many => {
            return Err(format!(
                "{} sealed plates are ready for {instrument} ({}): the button cannot choose; start one with `pcrd run start`",
                many.len(),
                many.join(", ")
            ));
        }
    };
    let started = match cycler {
        Some(c) => c.start_run(&plate, instrument, None, PANEL_USER).await,
        None => {
            instruments
                .start_extraction(&plate, instrument, None, PANEL_USER)
                .await
        }
    };
    started
        .map(|run| Outcome::Started {
            run: run.id,
            plate: run.plate,
        })
        .map_err(|e| format!("plate {plate} could not be started on {instrument}: {e}"))
}

/// Aborts the run in progress on the button's instrument.
async fn abort_from_button(instruments: &Instruments, instrument: &str) -> Result<Outcome, String> {
    const WHY: &str = "aborted from the panel";
    if let Some(cyclers) = instruments.cyclers()
        && let Some(cycler) = cyclers.get(instrument)
    {
        let run = cycler
            .active_run()
            .ok_or_else(|| format!("no run is in progress on {instrument}"))?;
        return cyclers
            .abort_run(run.id, PANEL_USER, Some(WHY))
            .await
            .map(|r| Outcome::Aborted { run: r.id })
            .map_err(|e| format!("run {} on {instrument} could not be aborted: {e}", run.id));
    }
    let runs = instruments
        .cyclers()
        .map(|c| c.runs().all())
        .transpose()
        .map_err(|e| format!("the runs cannot be read: {e}"))?
        .unwrap_or_default();
    let run = runs
        .into_iter()
        .filter(|r| r.is_extraction() && r.instrument == instrument && !r.state.is_terminal())
        .max_by_key(|r| r.id)
        .ok_or_else(|| format!("no run pcrd started is in progress on {instrument}"))?;
    instruments
        .abort_extraction(run.id, PANEL_USER, Some(WHY))
        .await
        .map(|r| Outcome::Aborted { run: r.id })
        .map_err(|e| format!("run {} on {instrument} could not be aborted: {e}", run.id))
}

/// Carries out the button's Start and Abort requests on the button's
/// instrument. A request that cannot be carried out is logged with why and
/// shown on the panel for [`REFUSAL_SHOWN`] as a fault (red, buzzer), then
/// cleared.
async fn act(
    lab: Arc<Lab>,
    instruments: Arc<Instruments>,
    input: PanelInput,
    configured: Option<String>,
    mut actions: broadcast::Receiver<PanelAction>,
) {
    loop {
        let request = match actions.recv().await {
            Ok(r) => r,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "Panel actions were missed; press the button again."
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let done = match button_instrument(&instruments, configured.as_deref()) {
            Err(why) => Err(why),
            Ok(instrument) => match request.action {
                Action::Start => start_from_button(&lab, &instruments, &instrument).await,
                Action::Abort => abort_from_button(&instruments, &instrument).await,
            },
        };
        match done {
            Ok(Outcome::Started { run, plate }) => {
                info!(run, %plate, "Run started from the panel's button.");
            }
            Ok(Outcome::Aborted { run }) => {
                warn!(run, "Run aborted from the panel's button.");
            }
            Err(why) => {
                warn!(action = request.action.as_str(), reason = %why, "The panel's button request was not carried out.");
                input.fault(
                    REFUSAL_SOURCE,
                    &format!("{}: {why}", request.action.as_str()),
                );
                let input = input.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(REFUSAL_SHOWN).await;
                    input.clear(REFUSAL_SOURCE);
                });
            }
        }
    }
}

/// Logs the panel's events and turns requested actions into [`PanelAction`]s.
async fn relay(
    mut events: broadcast::Receiver<(Event, SystemTime)>,
    actions: broadcast::Sender<PanelAction>,
    recent: Arc<Mutex<VecDeque<PanelAction>>>,
) {
    loop {
        let (event, at) = match events.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(missed = n, "Panel events were missed.");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        match event {
            Event::Pressed { press, effect } => {
                info!(press = ?press, effect = effect.as_str(), "Panel button pressed.");
                if let Effect::Action(action) = effect {
                    let record = PanelAction { action, at };
                    {
                        let mut recent = recent.lock().unwrap_or_else(|p| p.into_inner());
                        if recent.len() == RECENT_ACTIONS {
                            recent.pop_front();
                        }
                        recent.push_back(record);
                    }
                    info!(action = action.as_str(), "Panel action requested.");
                    // `act` subscribes before this task starts; a send error
                    // means the daemon is stopping.
                    let _ = actions.send(record);
                }
            }
            Event::AbortExpired => info!("Panel abort was not confirmed in time."),
            Event::NewFault => {
                warn!("Panel alarm: a new fault, buzzer on until the button is pressed.")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Option<PanelConfig>, Vec<String>) {
        let raw: RawPanel = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        let config = parse_panel(Some(raw), &mut problems);
        (config, problems)
    }

    #[test]
    fn a_sim_panel_needs_no_lines() {
        let (config, problems) = parse("kind = \"sim\"\nactive_low = true\nlong_press_ms = 2000");
        assert!(problems.is_empty(), "{problems:?}");
        let config = config.unwrap();
        assert_eq!(config.kind, PanelKind::Sim);
        assert!(config.active_low);
        assert_eq!(config.timing.long_press, Duration::from_secs(2));
        assert_eq!(config.wiring, LampWiring::Tower);
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let (config, problems) = parse(
            "kind = \"gpio\"\nlamp = \"rgb\"\nred = 1\namber = 2\ngreen = 1\nlong_press_ms = 5",
        );
        assert!(config.is_none());
        let all = problems.join("\n");
        for expect in [
            "panel.buzzer",
            "panel.button",
            "rgb lamp has no amber",
            "panel.chip",
            "share one line",
            "long_press_ms 5",
        ] {
            assert!(all.contains(expect), "{expect:?} missing from:\n{all}");
        }
        let (_, problems) = parse("kind = \"led\"");
        assert!(problems[0].contains("\"led\""), "{problems:?}");
        let (_, problems) = parse("kind = \"sim\"\nchip = \"/dev/gpiochip0\"");
        assert!(problems[0].contains("panel.chip"), "{problems:?}");
        let (_, problems) = parse("kind = \"sim\"\ninstrument = \" \"");
        assert!(problems[0].contains("panel.instrument"), "{problems:?}");
        let (config, _) = parse("kind = \"sim\"\ninstrument = \"qpcr-1\"");
        assert_eq!(config.unwrap().instrument.as_deref(), Some("qpcr-1"));
    }

    #[test]
    fn reports_through_the_input_handle_reach_the_lab_state() {
        let input = PanelInput::default();
        input.active("run:R1");
        input.fault("cycler:c1", "lid opened");
        let mut state = LabState::default();
        input.merge_into(&mut state);
        assert!(state.active.contains("run:R1"));
        assert_eq!(state.faults["cycler:c1"], "lid opened");
        input.clear("run:R1");
        input.clear("cycler:c1");
        let mut state = LabState::default();
        input.merge_into(&mut state);
        assert_eq!(state, LabState::default());
    }
}
