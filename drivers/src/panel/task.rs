//! The task that owns the panel's pins: it samples the button, feeds the logic
//! the lab's state and the time, and drives the lamp and the buzzer.
//!
//! The button is sampled every [`SAMPLE_EVERY`]: the embedded-hal 1.0
//! `InputPin` trait reads a level and has no edge events, and sampling well
//! inside the debounce time is what makes the debouncer see bounce as bounce.
//! Outputs are written when they change (and re-asserted every second, so a
//! line someone else toggled comes back).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use embedded_hal::digital::{InputPin, OutputPin};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::PanelPins;
use super::logic::{self, Colour, Effect, Event, LabState, LampMode, Outputs, Press, Timing};

/// How often the button is read: six samples inside the 30 ms debounce.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// Outputs are written again at least this often even when unchanged.
const REASSERT_EVERY: Duration = Duration::from_secs(1);

/// A press as the panel saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PressRecord {
    pub press: Press,
    pub effect: Effect,
    pub at: SystemTime,
}

/// What the panel shows now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PanelView {
    pub colour: Colour,
    pub mode: LampMode,
    /// The logical outputs at the last update (a blinking lamp alternates).
    pub outputs: Outputs,
    /// The buzzer's beep pattern is running (it beeps within it).
    pub buzzing: bool,
    /// A fault nobody acknowledged.
    pub unacknowledged: bool,
    pub abort_armed: bool,
    pub lab: LabState,
    pub last_press: Option<PressRecord>,
    /// Pin reads and writes that failed since start, and the last failure.
    pub pin_errors: u64,
    pub last_pin_error: Option<String>,
}

/// A cloneable handle on the panel task. The task stops when the last handle is
/// dropped.
#[derive(Clone, Debug)]
pub struct PanelHandle {
    view: watch::Receiver<PanelView>,
    events: broadcast::Sender<(Event, SystemTime)>,
    _task: Arc<AbortOnDrop>,
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PanelHandle {
    /// What the panel shows now.
    pub fn view(&self) -> PanelView {
        self.view.borrow().clone()
    }

    /// Follows the view as it changes.
    pub fn watch(&self) -> watch::Receiver<PanelView> {
        self.view.clone()
    }

    /// Every press (with what it did), expired abort and new fault, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<(Event, SystemTime)> {
        self.events.subscribe()
    }
}

/// Starts the task that drives `pins` from `lab`. Must run inside the tokio
/// runtime.
pub fn spawn<O, I>(
    pins: PanelPins<O, I>,
    timing: Timing,
    lab: watch::Receiver<LabState>,
) -> PanelHandle
where
    O: OutputPin + Send + 'static,
    I: InputPin + Send + 'static,
{
    let panel = logic::Panel::new(timing);
    let initial = view_of(&panel, Outputs::default(), Instant::now(), None, 0, None);
    let (view_tx, view_rx) = watch::channel(initial);
    let (events, _) = broadcast::channel(64);
    let task = tokio::spawn(run(pins, panel, lab, view_tx, events.clone()));
    PanelHandle {
        view: view_rx,
        events,
        _task: Arc::new(AbortOnDrop(task)),
    }
}

fn view_of(
    panel: &logic::Panel,
    outputs: Outputs,
    now: Instant,
    last_press: Option<PressRecord>,
    pin_errors: u64,
    last_pin_error: Option<String>,
) -> PanelView {
    let (colour, mode) = panel.lamp();
    PanelView {
        colour,
        mode,
        outputs,
        buzzing: panel.buzzing(now),
        unacknowledged: panel.unacknowledged(),
        abort_armed: panel.abort_armed(),
        lab: panel.lab().clone(),
        last_press,
        pin_errors,
        last_pin_error,
    }
}

async fn run<O: OutputPin, I: InputPin>(
    mut pins: PanelPins<O, I>,
    mut panel: logic::Panel,
    mut lab: watch::Receiver<LabState>,
    view: watch::Sender<PanelView>,
    events_tx: broadcast::Sender<(Event, SystemTime)>,
) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut driven: Option<Outputs> = None;
    let mut driven_at = Instant::now();
    let mut last_press = None;
    let mut pin_errors = 0u64;
    let mut last_pin_error: Option<String> = None;
    let mut events = Vec::new();
    loop {
        tick.tick().await;
        let now = Instant::now();
        // A closed channel keeps the last state: the lamp goes on showing it.
        if lab.has_changed().unwrap_or(false) {
            let state = lab.borrow_and_update().clone();
            panel.set_lab(state, now, &mut events);
        }
        let failed = |e: super::PinError, errors: &mut u64, last: &mut Option<String>| {
            // A failing line is logged when it starts failing or fails differently,
            // not 200 times a second.
            let text = e.to_string();
            if last.as_deref() != Some(text.as_str()) {
                warn!(error = %text, "A panel pin failed; the panel may not show the lab's state.");
            }
            *errors += 1;
            *last = Some(text);
        };
        match pins.button_pressed() {
            Ok(pressed) => panel.sample_button(pressed, now, &mut events),
            Err(e) => {
                failed(e, &mut pin_errors, &mut last_pin_error);
                panel.tick(now, &mut events);
            }
        }
        let outputs = panel.outputs(now);
        if driven != Some(outputs) || now.duration_since(driven_at) >= REASSERT_EVERY {
            match pins.drive(outputs) {
                Ok(()) => {
                    driven = Some(outputs);
                    driven_at = now;
                }
                Err(e) => {
                    driven = None;
                    failed(e, &mut pin_errors, &mut last_pin_error);
                }
            }
        }
        let wall = SystemTime::now();
        for event in events.drain(..) {
            debug!(?event, "Panel event.");
            if let Event::Pressed { press, effect } = event {
                last_press = Some(PressRecord {
                    press,
                    effect,
                    at: wall,
                });
            }
            // No subscriber is not an error: nobody consumes actions yet.
            let _ = events_tx.send((event, wall));
        }
        let next = view_of(
            &panel,
            outputs,
            now,
            last_press,
            pin_errors,
            last_pin_error.clone(),
        );
        view.send_if_modified(|current| {
            if *current == next {
                false
            } else {
                *current = next;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::panel::LampWiring;
    use crate::panel::logic::Action;
    use crate::panel::sim::SimBoard;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// Waits until the view satisfies `ok` (the task updates it every 5 ms).
    async fn until(handle: &PanelHandle, what: &str, ok: impl Fn(&PanelView) -> bool) {
        let mut watch = handle.watch();
        let found = tokio::time::timeout(DEADLINE, watch.wait_for(|v| ok(v))).await;
        assert!(
            matches!(found, Ok(Ok(_))),
            "not {what}: {:?}",
            handle.view()
        );
    }

    #[tokio::test]
    async fn the_task_drives_active_low_sim_pins_and_reads_a_bouncing_button() {
        let board = SimBoard::new(true);
        let (lab_tx, lab_rx) = watch::channel(LabState::default());
        let handle = spawn(board.pins(LampWiring::Tower), Timing::default(), lab_rx);
        // Green, lit: active low, so the green line is low and the others high.
        until(&handle, "green", |v| v.outputs.green).await;
        let levels = board.levels();
        assert!(
            !levels.green && levels.red && levels.amber && levels.buzzer,
            "{levels:?}"
        );

        let mut events = handle.subscribe();
        board.press(Duration::from_millis(100)).await;
        let got = tokio::time::timeout(DEADLINE, events.recv()).await;
        assert!(
            matches!(
                got,
                Ok(Ok((
                    Event::Pressed {
                        press: Press::Short,
                        effect: Effect::Action(Action::Start)
                    },
                    _
                )))
            ),
            "{got:?}"
        );

        let mut faulted = LabState::default();
        faulted
            .faults
            .insert("store".into(), "barrier failed".into());
        lab_tx.send(faulted).ok();
        until(&handle, "red and buzzing", |v| {
            v.colour == Colour::Red && v.buzzing && v.unacknowledged
        })
        .await;
        // Within the first 200 ms of the alarm the buzzer line is driven (low).
        until(&handle, "buzzer line on", |v| v.outputs.buzzer).await;
        // Exactly one press event for the bouncing press above: what follows it is
        // the new fault only.
        let mut rest = Vec::new();
        while let Ok((event, _)) = events.try_recv() {
            rest.push(event);
        }
        assert_eq!(rest, vec![Event::NewFault]);
    }
}
