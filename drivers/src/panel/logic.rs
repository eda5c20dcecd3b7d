//! The panel's behaviour as a state machine: the lab's state and the button's raw
//! level go in with the time, the lamp, the buzzer, presses and actions come out,
//! with the next instant anything changes by itself. No I/O, no clock reads, no
//! tokio: the driver task (`super::task`) owns the pins and the clock, so every
//! rule here is tested with plain values.
//!
//! # Behaviour
//!
//! | lab state                          | lamp                     | buzzer                         |
//! |------------------------------------|--------------------------|--------------------------------|
//! | nothing running, no fault          | green, steady            | silent                         |
//! | a run active, no fault             | amber, steady            | silent                         |
//! | abort armed (long press in a run)  | amber, fast blink        | silent                         |
//! | a fault nobody acknowledged        | red, blinking (1 Hz)     | beeps until acknowledged or `buzz_for` |
//! | faults, all acknowledged           | red, steady              | silent                         |
//!
//! Red wins over amber: a fault needs a person, and a lamp that shows "running" while
//! an instrument is in error would send nobody. A fault is "new" when a source that
//! was not faulted becomes faulted; a new fault re-arms the blinking and the buzzer
//! even if older ones were acknowledged.
//!
//! # The button
//!
//! The raw level is debounced: a change counts once the level has held for
//! `debounce`. A press held for less than `long_press` is short (counted on
//! release); held for `long_press` it is long (counted at that moment, while still
//! held, so the person gets feedback). A bouncing contact therefore yields at most
//! one press per physical press (property-tested below).
//!
//! What a press does, first rule that applies:
//! 1. a fault nobody acknowledged: any press acknowledges it (silences the buzzer,
//!    red goes steady) and does nothing else, so the first reflex at an alarming
//!    panel never starts or aborts anything;
//! 2. abort armed: a short press within `confirm_window` is [`Action::Abort`]; a long
//!    press disarms;
//! 3. a run active: a long press arms the abort for `confirm_window` (amber blinks
//!    fast); a short press does nothing. A bump is a short press, so a bump never
//!    aborts, and nor does one long press alone;
//! 4. no run, no fault (green): a short press is [`Action::Start`]; a long press
//!    does nothing.
//!
//! Actions are requests: the run orchestration decides whether there is a run to
//! start or abort, and logs what it did.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How the panel times things. Defaults suit a hand on a panel-mount push button.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// A level change counts once it has held this long. Push buttons bounce for
    /// 1–10 ms; 30 ms is well past that and still feels instant.
    pub debounce: Duration,
    /// Held this long, a press is long.
    pub long_press: Duration,
    /// After a long press in a run, how long a short press confirms the abort.
    pub confirm_window: Duration,
    /// The buzzer stops by itself after this long (the lamp keeps blinking).
    pub buzz_for: Duration,
    /// One beep, then `beep_period - beep_on` of silence.
    pub beep_on: Duration,
    pub beep_period: Duration,
    /// Half period of the blinking red (on, then off).
    pub blink_half: Duration,
    /// Half period of the fast amber blink while an abort is armed.
    pub armed_blink_half: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            debounce: Duration::from_millis(30),
            long_press: Duration::from_millis(1500),
            confirm_window: Duration::from_secs(5),
            buzz_for: Duration::from_secs(30),
            beep_on: Duration::from_millis(200),
            beep_period: Duration::from_secs(1),
            blink_half: Duration::from_millis(500),
            armed_blink_half: Duration::from_millis(150),
        }
    }
}

/// What the lab looks like to the panel: sources (an instrument, the store, a run)
/// that are faulted, with why, and sources that are active.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabState {
    /// Source -> why it is faulted.
    pub faults: BTreeMap<String, String>,
    /// Sources with a run in progress.
    pub active: BTreeSet<String>,
}

/// A lamp colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Colour {
    Green,
    Amber,
    Red,
}

impl Colour {
    pub fn as_str(self) -> &'static str {
        match self {
            Colour::Green => "green",
            Colour::Amber => "amber",
            Colour::Red => "red",
        }
    }
}

/// How the lamp shows its colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LampMode {
    Steady,
    /// Red, a fault nobody acknowledged.
    Blinking,
    /// Amber, an abort waiting for its confirmation.
    FastBlinking,
}

impl LampMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LampMode::Steady => "steady",
            LampMode::Blinking => "blinking",
            LampMode::FastBlinking => "fast_blinking",
        }
    }
}

/// A debounced press.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Press {
    Short,
    Long,
}

/// What the panel asks the run orchestration to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start the run waiting on the gateway (a short press on a green lamp).
    Start,
    /// Abort the run in progress (a long press, then a short one to confirm).
    Abort,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Abort => "abort",
        }
    }
}

/// What a press did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Asked for an action.
    Action(Action),
    /// Acknowledged the faults: buzzer silenced, red steady.
    Acknowledged,
    /// Armed the abort; a short press within the window confirms it.
    AbortArmed,
    /// A long press while armed: the abort is off.
    AbortDisarmed,
    /// Nothing (a short press during a run, a long one on green).
    Nothing,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Action(a) => a.as_str(),
            Effect::Acknowledged => "acknowledged",
            Effect::AbortArmed => "abort_armed",
            Effect::AbortDisarmed => "abort_disarmed",
            Effect::Nothing => "nothing",
        }
    }
}

/// Something the panel did, for the log, the API and the run orchestration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A debounced press and what it did.
    Pressed { press: Press, effect: Effect },
    /// The armed abort was not confirmed in time.
    AbortExpired,
    /// A fault appeared that nobody has acknowledged yet.
    NewFault,
}

/// The levels to drive (logical: `true` = lit / sounding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outputs {
    pub red: bool,
    pub amber: bool,
    pub green: bool,
    pub buzzer: bool,
}

/// The button's debouncer.
#[derive(Clone, Copy, Debug)]
struct Debounce {
    /// The level that counts.
    stable: bool,
    /// A different raw level seen since `since`, not yet held long enough.
    candidate: Option<Instant>,
    /// When the stable level became "pressed".
    pressed_at: Option<Instant>,
    /// The long press of this hold was already counted.
    long_counted: bool,
}

/// The panel's state.
#[derive(Clone, Debug)]
pub struct Panel {
    timing: Timing,
    lab: LabState,
    /// The faults someone acknowledged (by source); a source not in here is new.
    acknowledged: BTreeSet<String>,
    /// When the current unacknowledged fault started (the buzzer and blink phase).
    alarm_since: Option<Instant>,
    /// Until when an abort waits for its confirmation.
    armed_until: Option<Instant>,
    armed_since: Option<Instant>,
    button: Debounce,
}

impl Panel {
    pub fn new(timing: Timing) -> Panel {
        Panel {
            timing,
            lab: LabState::default(),
            acknowledged: BTreeSet::new(),
            alarm_since: None,
            armed_until: None,
            armed_since: None,
            button: Debounce {
                stable: false,
                candidate: None,
                pressed_at: None,
                long_counted: false,
            },
        }
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    pub fn lab(&self) -> &LabState {
        &self.lab
    }

    /// Takes the lab's new state.
    pub fn set_lab(&mut self, lab: LabState, now: Instant, events: &mut Vec<Event>) {
        // Acknowledgements of faults that cleared are forgotten, so the same source
        // failing again later is a new fault.
        self.acknowledged.retain(|s| lab.faults.contains_key(s));
        let new_fault = lab
            .faults
            .keys()
            .any(|s| !self.acknowledged.contains(s) && !self.lab.faults.contains_key(s));
        if new_fault {
            // A new fault restarts the alarm even if one was sounding.
            self.alarm_since = Some(now);
            events.push(Event::NewFault);
        }
        if lab.faults.keys().all(|s| self.acknowledged.contains(s)) {
            self.alarm_since = None;
        }
        if lab.active.is_empty() {
            self.armed_until = None;
            self.armed_since = None;
        }
        self.lab = lab;
    }

    /// Whether a fault waits for someone to acknowledge it.
    pub fn unacknowledged(&self) -> bool {
        self.lab
            .faults
            .keys()
            .any(|s| !self.acknowledged.contains(s))
    }

    /// Whether an abort waits for its confirmation.
    pub fn abort_armed(&self) -> bool {
        self.armed_until.is_some()
    }

    /// The colour and how it shows.
    pub fn lamp(&self) -> (Colour, LampMode) {
        if !self.lab.faults.is_empty() {
            let mode = if self.unacknowledged() {
                LampMode::Blinking
            } else {
                LampMode::Steady
            };
            (Colour::Red, mode)
        } else if !self.lab.active.is_empty() {
            let mode = if self.abort_armed() {
                LampMode::FastBlinking
            } else {
                LampMode::Steady
            };
            (Colour::Amber, mode)
        } else {
            (Colour::Green, LampMode::Steady)
        }
    }

    /// Whether the buzzer pattern runs (it beeps within it).
    pub fn buzzing(&self, now: Instant) -> bool {
        self.alarm_since
            .is_some_and(|since| now.saturating_duration_since(since) < self.timing.buzz_for)
    }

    /// Takes one sample of the button's raw level (`true` = pressed, after any
    /// active-low inversion) and moves time on.
    pub fn sample_button(&mut self, pressed: bool, now: Instant, events: &mut Vec<Event>) {
        let b = &mut self.button;
        if pressed == b.stable {
            b.candidate = None;
        } else {
            match b.candidate {
                None => b.candidate = Some(now),
                Some(since) if now.saturating_duration_since(since) >= self.timing.debounce => {
                    b.candidate = None;
                    b.stable = pressed;
                    if pressed {
                        // The press began when the level first changed.
                        b.pressed_at = Some(since);
                        b.long_counted = false;
                    } else {
                        let was_long = b.long_counted;
                        b.pressed_at = None;
                        b.long_counted = false;
                        if !was_long {
                            self.pressed(Press::Short, now, events);
                        }
                    }
                }
                Some(_) => {}
            }
        }
        self.tick(now, events);
    }

    /// Moves time on without a button sample: a long press held, an abort window
    /// running out.
    pub fn tick(&mut self, now: Instant, events: &mut Vec<Event>) {
        let b = &mut self.button;
        // A release still being debounced ended the hold when it began: a press
        // let go at 1.49 s is short even though the release is confirmed at 1.52 s.
        let held_until = b.candidate.unwrap_or(now);
        if b.stable
            && !b.long_counted
            && let Some(at) = b.pressed_at
            && held_until.saturating_duration_since(at) >= self.timing.long_press
        {
            b.long_counted = true;
            self.pressed(Press::Long, now, events);
        }
        if let Some(until) = self.armed_until
            && now >= until
        {
            self.armed_until = None;
            self.armed_since = None;
            events.push(Event::AbortExpired);
        }
    }

    /// A debounced press: applies the rules in the module doc.
    fn pressed(&mut self, press: Press, now: Instant, events: &mut Vec<Event>) {
        let effect = if self.unacknowledged() {
            self.acknowledged = self.lab.faults.keys().cloned().collect();
            self.alarm_since = None;
            Effect::Acknowledged
        } else if self.armed_until.is_some() {
            self.armed_until = None;
            self.armed_since = None;
            match press {
                Press::Short => Effect::Action(Action::Abort),
                Press::Long => Effect::AbortDisarmed,
            }
        } else if !self.lab.active.is_empty() {
            match press {
                Press::Long => {
                    self.armed_until = Some(now + self.timing.confirm_window);
                    self.armed_since = Some(now);
                    Effect::AbortArmed
                }
                Press::Short => Effect::Nothing,
            }
        } else if self.lab.faults.is_empty() {
            match press {
                Press::Short => Effect::Action(Action::Start),
                Press::Long => Effect::Nothing,
            }
        } else {
            // Red and acknowledged with nothing running: nothing to start on a
            // faulted lab from the panel.
            Effect::Nothing
        };
        events.push(Event::Pressed { press, effect });
    }

    /// The logical levels to drive at `now`.
    pub fn outputs(&self, now: Instant) -> Outputs {
        let (colour, mode) = self.lamp();
        let lit = match mode {
            LampMode::Steady => true,
            LampMode::Blinking => phase_on(self.alarm_since, now, self.timing.blink_half),
            LampMode::FastBlinking => phase_on(self.armed_since, now, self.timing.armed_blink_half),
        };
        let buzzer = self.buzzing(now)
            && self.alarm_since.is_some_and(|since| {
                let period = self.timing.beep_period.as_nanos().max(1);
                now.saturating_duration_since(since).as_nanos() % period
                    < self.timing.beep_on.as_nanos()
            });
        Outputs {
            red: lit && colour == Colour::Red,
            amber: lit && colour == Colour::Amber,
            green: lit && colour == Colour::Green,
            buzzer,
        }
    }

    /// The next instant the outputs or the state change by themselves (a blink
    /// edge, a beep edge, the end of the buzzing, a long press maturing, an abort
    /// window closing, a debounce completing). The driver samples the button more
    /// often than this; it tells a sleeping driver when to wake.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            if t > now {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        let edge = |since: Instant, step: Duration| {
            let step = step.as_nanos().max(1);
            let elapsed = now.saturating_duration_since(since).as_nanos();
            let into = elapsed % step;
            now + Duration::from_nanos(u64::try_from(step - into).unwrap_or(u64::MAX))
        };
        let (_, mode) = self.lamp();
        if mode == LampMode::Blinking
            && let Some(since) = self.alarm_since
        {
            consider(edge(since, self.timing.blink_half));
        }
        if mode == LampMode::FastBlinking
            && let Some(since) = self.armed_since
        {
            consider(edge(since, self.timing.armed_blink_half));
        }
        if self.buzzing(now)
            && let Some(since) = self.alarm_since
        {
            consider(since + self.timing.buzz_for);
            let on_edge = since
                + Duration::from_nanos(
                    u64::try_from(
                        (now.saturating_duration_since(since).as_nanos()
                            / self.timing.beep_period.as_nanos().max(1))
                            * self.timing.beep_period.as_nanos(),
                    )
                    .unwrap_or(u64::MAX),
                );
            consider(on_edge + self.timing.beep_on);
            consider(on_edge + self.timing.beep_period);
        }
        if let Some(until) = self.armed_until {
            consider(until);
        }
        if let Some(since) = self.button.candidate {
            consider(since + self.timing.debounce);
        }
        if self.button.stable
            && !self.button.long_counted
            && let Some(at) = self.button.pressed_at
        {
            consider(at + self.timing.long_press);
        }
        next
    }
}

/// On for the first half period, off for the second, from `since`.
fn phase_on(since: Option<Instant>, now: Instant, half: Duration) -> bool {
    let Some(since) = since else { return true };
    let half = half.as_nanos().max(1);
    (now.saturating_duration_since(since).as_nanos() / half).is_multiple_of(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn lab(faults: &[&str], active: &[&str]) -> LabState {
        LabState {
            faults: faults
                .iter()
                .map(|s| (s.to_string(), "broken".to_string()))
                .collect(),
            active: active.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Holds the button `pressed` from `t` for `hold`, sampling every 5 ms.
    fn hold(panel: &mut Panel, t: &mut Instant, pressed: bool, hold: Duration) -> Vec<Event> {
        let mut events = Vec::new();
        let end = *t + hold;
        while *t < end {
            panel.sample_button(pressed, *t, &mut events);
            *t += ms(5);
        }
        events
    }

    fn press(panel: &mut Panel, t: &mut Instant, length: Duration) -> Vec<Event> {
        let mut events = hold(panel, t, true, length);
        events.extend(hold(panel, t, false, ms(100)));
        events
    }

    fn effects(events: &[Event]) -> Vec<(Press, Effect)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Pressed { press, effect } => Some((*press, *effect)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn lamp_colour_follows_the_lab_with_red_over_amber_over_green() {
        let t = Instant::now();
        let mut p = Panel::new(Timing::default());
        let mut ev = Vec::new();
        assert_eq!(p.lamp(), (Colour::Green, LampMode::Steady));
        p.set_lab(lab(&[], &["ext-1"]), t, &mut ev);
        assert_eq!(p.lamp(), (Colour::Amber, LampMode::Steady));
        assert_eq!(
            p.outputs(t),
            Outputs {
                amber: true,
                ..Outputs::default()
            }
        );
        p.set_lab(lab(&["store"], &["ext-1"]), t, &mut ev);
        assert_eq!(p.lamp(), (Colour::Red, LampMode::Blinking));
        assert_eq!(ev, vec![Event::NewFault]);
        p.set_lab(lab(&[], &[]), t, &mut ev);
        assert_eq!(p.lamp(), (Colour::Green, LampMode::Steady));
        assert!(!p.buzzing(t));
    }

    #[test]
    fn a_new_fault_blinks_and_beeps_until_a_press_acknowledges_it() {
        let mut t = Instant::now();
        let timing = Timing::default();
        let mut p = Panel::new(timing);
        let mut ev = Vec::new();
        p.set_lab(lab(&["ext-1"], &[]), t, &mut ev);
        let start = t;
        // Beep on for 200 ms of each second; red on for 500 ms, off for 500 ms.
        assert!(p.outputs(start).buzzer && p.outputs(start).red);
        assert!(!p.outputs(start + ms(300)).buzzer && p.outputs(start + ms(300)).red);
        assert!(!p.outputs(start + ms(600)).red);
        assert!(p.outputs(start + ms(1050)).buzzer && p.outputs(start + ms(1050)).red);
        assert!(!p.outputs(start + ms(600)).green && !p.outputs(start + ms(600)).amber);
        assert_eq!(p.next_deadline(start), Some(start + ms(200)));
        // A short press acknowledges and does nothing else.
        let got = press(&mut p, &mut t, ms(200));
        assert_eq!(effects(&got), vec![(Press::Short, Effect::Acknowledged)]);
        assert_eq!(p.lamp(), (Colour::Red, LampMode::Steady));
        assert!(!p.outputs(t).buzzer);
        // A second source failing is new: the alarm starts again.
        p.set_lab(lab(&["ext-1", "ext-2"], &[]), t, &mut ev);
        assert!(p.unacknowledged() && p.buzzing(t));
        // The same source still faulted is not new.
        let before = ev.len();
        p.set_lab(lab(&["ext-1", "ext-2"], &[]), t, &mut ev);
        assert_eq!(ev.len(), before);
    }

    #[test]
    fn the_buzzer_stops_by_itself_but_the_lamp_keeps_blinking() {
        let t = Instant::now();
        let timing = Timing::default();
        let mut p = Panel::new(timing);
        p.set_lab(lab(&["store"], &[]), t, &mut Vec::new());
        let later = t + timing.buzz_for + ms(1);
        assert!(!p.buzzing(later));
        assert!(!p.outputs(later).buzzer);
        assert_eq!(p.lamp(), (Colour::Red, LampMode::Blinking));
    }

    #[test]
    fn a_fault_that_clears_and_returns_alarms_again() {
        let mut t = Instant::now();
        let mut p = Panel::new(Timing::default());
        let mut ev = Vec::new();
        p.set_lab(lab(&["ext-1"], &[]), t, &mut ev);
        press(&mut p, &mut t, ms(100));
        assert!(!p.unacknowledged());
        p.set_lab(lab(&[], &[]), t, &mut ev);
        p.set_lab(lab(&["ext-1"], &[]), t, &mut ev);
        assert!(p.unacknowledged() && p.buzzing(t));
    }

    #[test]
    fn a_short_press_on_green_starts_and_a_long_one_does_nothing() {
        let mut t = Instant::now();
        let mut p = Panel::new(Timing::default());
        let got = press(&mut p, &mut t, ms(300));
        assert_eq!(
            effects(&got),
            vec![(Press::Short, Effect::Action(Action::Start))]
        );
        let got = press(&mut p, &mut t, ms(2000));
        assert_eq!(effects(&got), vec![(Press::Long, Effect::Nothing)]);
    }

    #[test]
    fn abort_needs_a_long_press_then_a_short_one_within_the_window() {
        let mut t = Instant::now();
        let timing = Timing::default();
        let mut p = Panel::new(timing);
        p.set_lab(lab(&[], &["cycler-1"]), t, &mut Vec::new());
        // A bump does nothing.
        let got = press(&mut p, &mut t, ms(80));
        assert_eq!(effects(&got), vec![(Press::Short, Effect::Nothing)]);
        // A long press arms, counted while still held.
        let got = hold(&mut p, &mut t, true, timing.long_press + ms(50));
        assert_eq!(effects(&got), vec![(Press::Long, Effect::AbortArmed)]);
        let got = hold(&mut p, &mut t, false, ms(100));
        assert!(effects(&got).is_empty(), "{got:?}");
        assert_eq!(p.lamp(), (Colour::Amber, LampMode::FastBlinking));
        let got = press(&mut p, &mut t, ms(200));
        assert_eq!(
            effects(&got),
            vec![(Press::Short, Effect::Action(Action::Abort))]
        );
        assert!(!p.abort_armed());
        // Armed and left alone: it expires, and a later short press does nothing.
        press(&mut p, &mut t, timing.long_press + ms(50));
        assert!(p.abort_armed());
        let got = hold(&mut p, &mut t, false, timing.confirm_window + ms(10));
        assert!(got.contains(&Event::AbortExpired), "{got:?}");
        let got = press(&mut p, &mut t, ms(200));
        assert_eq!(effects(&got), vec![(Press::Short, Effect::Nothing)]);
        // Armed, then a long press disarms.
        press(&mut p, &mut t, timing.long_press + ms(50));
        let got = press(&mut p, &mut t, timing.long_press + ms(50));
        assert_eq!(effects(&got), vec![(Press::Long, Effect::AbortDisarmed)]);
    }

    #[test]
    fn the_run_ending_disarms_an_abort() {
        let mut t = Instant::now();
        let timing = Timing::default();
        let mut p = Panel::new(timing);
        p.set_lab(lab(&[], &["cycler-1"]), t, &mut Vec::new());
        press(&mut p, &mut t, timing.long_press + ms(50));
        assert!(p.abort_armed());
        p.set_lab(lab(&[], &[]), t, &mut Vec::new());
        assert!(!p.abort_armed());
        // The confirming press now lands on green: it is a start, not an abort.
        let got = press(&mut p, &mut t, ms(100));
        assert_eq!(
            effects(&got),
            vec![(Press::Short, Effect::Action(Action::Start))]
        );
    }

    #[test]
    fn a_blip_shorter_than_the_debounce_is_no_press() {
        let mut t = Instant::now();
        let mut p = Panel::new(Timing::default());
        let got = press(&mut p, &mut t, ms(20));
        assert!(effects(&got).is_empty(), "{got:?}");
    }

    /// The button, as bursts: (level, how long it holds in ms).
    fn bouncy_sequence() -> impl Strategy<Value = Vec<(bool, u64)>> {
        prop::collection::vec((any::<bool>(), 0u64..3000), 0..60)
    }

    proptest! {
        /// Whatever the contact does, each stable press (a pressed level held at
        /// least `debounce`) yields at most one press, and nothing panics.
        #[test]
        fn bouncy_inputs_yield_at_most_one_press_per_physical_press(
            segments in bouncy_sequence(),
            faults in prop::collection::vec(any::<bool>(), 0..4),
            step_ms in 1u64..8,
        ) {
            let timing = Timing::default();
            let mut p = Panel::new(timing);
            let mut t = Instant::now();
            let mut events = Vec::new();
            let mut samples: Vec<(Instant, bool)> = Vec::new();
            for (i, (level, hold_ms)) in segments.iter().enumerate() {
                if let Some(f) = faults.get(i % faults.len().max(1)) {
                    let state = if *f { lab(&["x"], &["r"]) } else { lab(&[], &["r"]) };
                    p.set_lab(state, t, &mut events);
                }
                let end = t + ms(*hold_ms);
                while t < end {
                    p.sample_button(*level, t, &mut events);
                    samples.push((t, *level));
                    let _ = p.outputs(t);
                    let _ = p.next_deadline(t);
                    t += ms(step_ms);
                }
            }
            // Physical presses, counted from the samples: a run of pressed samples
            // counts unless the release before it (first to last released sample)
            // was shorter than the debounce time, which makes it bounce of the
            // press before.
            let mut physical = 0u32;
            let mut seen_press = false;
            let mut release: Option<(Instant, Instant)> = None;
            for (at, level) in &samples {
                if *level {
                    let long_release = release.is_some_and(|(a, b)| b - a >= timing.debounce);
                    if release.is_some() || !seen_press {
                        if !seen_press || long_release {
                            physical += 1;
                        }
                        seen_press = true;
                    }
                    release = None;
                } else if seen_press {
                    release = Some(release.map_or((*at, *at), |(a, _)| (a, *at)));
                }
            }
            // Release and let everything settle.
            for _ in 0..100 {
                p.sample_button(false, t, &mut events);
                t += ms(step_ms);
            }
            let presses = events.iter().filter(|e| matches!(e, Event::Pressed { .. })).count() as u32;
            prop_assert!(presses <= physical, "{presses} presses from {physical} physical presses: {segments:?}");
        }

        /// A press bracketed by contact bounce (a few ms each way) is exactly one
        /// press of the right kind.
        #[test]
        fn a_bouncing_press_is_exactly_one_press(
            bounces in prop::collection::vec((1u64..4, 1u64..4), 0..6),
            held_ms in 60u64..4000,
        ) {
            let timing = Timing::default();
            let mut p = Panel::new(timing);
            let mut t = Instant::now();
            let mut events = Vec::new();
            let sample = |p: &mut Panel, level: bool, for_ms: u64, t: &mut Instant, events: &mut Vec<Event>| {
                let end = *t + ms(for_ms);
                while *t < end {
                    p.sample_button(level, *t, events);
                    *t += ms(1);
                }
            };
            for (on, off) in &bounces {
                sample(&mut p, true, *on, &mut t, &mut events);
                sample(&mut p, false, *off, &mut t, &mut events);
            }
            sample(&mut p, true, held_ms, &mut t, &mut events);
            for (off, on) in &bounces {
                sample(&mut p, false, *off, &mut t, &mut events);
                sample(&mut p, true, *on, &mut t, &mut events);
            }
            sample(&mut p, false, 200, &mut t, &mut events);
            let got = effects(&events);
            prop_assert_eq!(got.len(), 1, "{:?}", events);
            let expect_long = Duration::from_millis(held_ms) >= timing.long_press + ms(20);
            // The trailing bounce keeps the contact closed up to 3 ms per bounce.
            let expect_short = Duration::from_millis(held_ms) + ms(20) < timing.long_press;
            if expect_long { prop_assert_eq!(got[0].0, Press::Long); }
            if expect_short { prop_assert_eq!(got[0].0, Press::Short); }
        }
    }
}
