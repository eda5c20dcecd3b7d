//! Simulated panel pins: embedded-hal 1.0 pins over shared atomics, so the panel
//! task drives them exactly as it drives GPIO lines, while tests and the daemon's
//! API read the lamp and buzzer levels and press the button.
//!
//! Levels here are physical (what a voltmeter on the line would show): with
//! `active_low` a lit lamp reads low and a button at rest reads high.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use embedded_hal::digital::{ErrorType, InputPin, OutputPin, StatefulOutputPin};

use super::{LampWiring, PanelPins};

/// One simulated output line.
#[derive(Clone, Debug)]
pub struct SimOutput(Arc<AtomicBool>);

/// The simulated button line.
#[derive(Clone, Debug)]
pub struct SimInput(Arc<AtomicBool>);

impl ErrorType for SimOutput {
    type Error = Infallible;
}

impl OutputPin for SimOutput {
    fn set_low(&mut self) -> Result<(), Infallible> {
        self.0.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), Infallible> {
        self.0.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl StatefulOutputPin for SimOutput {
    fn is_set_high(&mut self) -> Result<bool, Infallible> {
        Ok(self.0.load(Ordering::Relaxed))
    }

    fn is_set_low(&mut self) -> Result<bool, Infallible> {
        Ok(!self.0.load(Ordering::Relaxed))
    }
}

impl ErrorType for SimInput {
    type Error = Infallible;
}

impl InputPin for SimInput {
    fn is_high(&mut self) -> Result<bool, Infallible> {
        Ok(self.0.load(Ordering::Relaxed))
    }

    fn is_low(&mut self) -> Result<bool, Infallible> {
        Ok(!self.0.load(Ordering::Relaxed))
    }
}

/// Physical levels of the simulated lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimLevels {
    pub red: bool,
    pub amber: bool,
    pub green: bool,
    pub buzzer: bool,
    pub button: bool,
}

/// A simulated panel board: the lines and a hand to press the button.
#[derive(Clone, Debug)]
pub struct SimBoard {
    red: Arc<AtomicBool>,
    amber: Arc<AtomicBool>,
    green: Arc<AtomicBool>,
    buzzer: Arc<AtomicBool>,
    button: Arc<AtomicBool>,
    active_low: bool,
    /// One press at a time, as one hand on one button.
    hand: Arc<tokio::sync::Mutex<()>>,
}

/// How long the simulated contact bounces at each edge: three flips of 1 ms,
/// within the 1–10 ms of a real push button.
const BOUNCES: u32 = 3;
const BOUNCE: Duration = Duration::from_millis(1);

impl SimBoard {
    /// A board with every output off and the button at rest.
    pub fn new(active_low: bool) -> SimBoard {
        let line = |level: bool| Arc::new(AtomicBool::new(level));
        SimBoard {
            red: line(active_low),
            amber: line(active_low),
            green: line(active_low),
            buzzer: line(active_low),
            button: line(active_low),
            active_low,
            hand: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The pins for the panel task.
    pub fn pins(&self, wiring: LampWiring) -> PanelPins<SimOutput, SimInput> {
        PanelPins {
            red: SimOutput(Arc::clone(&self.red)),
            amber: (wiring == LampWiring::Tower).then(|| SimOutput(Arc::clone(&self.amber))),
            green: SimOutput(Arc::clone(&self.green)),
            buzzer: SimOutput(Arc::clone(&self.buzzer)),
            button: SimInput(Arc::clone(&self.button)),
            wiring,
            active_low: self.active_low,
        }
    }

    /// The lines' physical levels now.
    pub fn levels(&self) -> SimLevels {
        let read = |l: &AtomicBool| l.load(Ordering::Relaxed);
        SimLevels {
            red: read(&self.red),
            amber: read(&self.amber),
            green: read(&self.green),
            buzzer: read(&self.buzzer),
            button: read(&self.button),
        }
    }

    /// Whether a line's physical level means "on" with this board's polarity.
    pub fn is_on(&self, level: bool) -> bool {
        level != self.active_low
    }

    pub fn active_low(&self) -> bool {
        self.active_low
    }

    /// Presses the button for `hold`, with contact bounce at both edges, then
    /// releases it. Returns once released.
    pub async fn press(&self, hold: Duration) {
        let _hand = self.hand.lock().await;
        let pressed = !self.active_low;
        for _ in 0..BOUNCES {
            self.button.store(pressed, Ordering::Relaxed);
            tokio::time::sleep(BOUNCE).await;
            self.button.store(!pressed, Ordering::Relaxed);
            tokio::time::sleep(BOUNCE).await;
        }
        self.button.store(pressed, Ordering::Relaxed);
        tokio::time::sleep(hold).await;
        for _ in 0..BOUNCES {
            self.button.store(!pressed, Ordering::Relaxed);
            tokio::time::sleep(BOUNCE).await;
            self.button.store(pressed, Ordering::Relaxed);
            tokio::time::sleep(BOUNCE).await;
        }
        self.button.store(!pressed, Ordering::Relaxed);
    }
}
