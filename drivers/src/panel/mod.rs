//! The gateway's panel: a status lamp (green idle, amber running, red fault), a
//! buzzer for faults and one start/abort push button, driven through the
//! embedded-hal 1.0 digital traits (`OutputPin`, `InputPin`).
//!
//! - [`logic`]: the behaviour (lamp, buzzer pattern, debouncing, short and long
//!   presses, the abort confirmation) as a pure state machine: time in, levels,
//!   events and deadlines out.
//! - [`PanelPins`]: the five pins, generic over any embedded-hal 1.0 pin type,
//!   with the active-low inversion and the lamp wiring (three lamps or an RGB
//!   lamp where amber is red + green).
//! - [`spawn`]: the one task that owns the pins, samples the button and drives
//!   the outputs; the rest of the program holds a cloneable [`PanelHandle`].
//! - [`sim`]: simulated pins whose levels tests and the API can read and whose
//!   button they can press (with contact bounce). Always built: a gateway without
//!   a panel still shows what its panel would do.
//! - `gpio` (feature "gpio"): Linux GPIO character devices (`/dev/gpiochipN`)
//!   through linux-embedded-hal.
//!
//! What this does not do: decide what a press starts or aborts. The daemon turns
//! [`logic::Action`]s into run commands.

pub mod logic;
pub mod sim;
mod task;

#[cfg(feature = "gpio")]
pub mod gpio;

pub use task::{PanelHandle, PanelView, PressRecord, SAMPLE_EVERY, spawn};

use embedded_hal::digital::{InputPin, OutputPin};

/// How the lamp is wired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LampWiring {
    /// Three lamps (a signal tower): red, amber and green each on their own pin.
    Tower,
    /// One RGB lamp: amber is shown as red and green together; no amber pin.
    Rgb,
}

/// The panel's pins. `active_low` inverts every pin (outputs that sink current,
/// a button to ground with a pull-up).
#[derive(Debug)]
pub struct PanelPins<O, I> {
    pub red: O,
    /// `None` with [`LampWiring::Rgb`].
    pub amber: Option<O>,
    pub green: O,
    pub buzzer: O,
    pub button: I,
    pub wiring: LampWiring,
    pub active_low: bool,
}

/// A pin that failed, with the driver's error text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// Setting an output failed (a released line, a GPIO chip gone).
    #[error("setting the {pin} pin failed: {detail}")]
    Output { pin: &'static str, detail: String },
    /// Reading the button failed.
    #[error("reading the button pin failed: {detail}")]
    Input { detail: String },
}

impl<O: OutputPin, I: InputPin> PanelPins<O, I> {
    /// Drives the outputs to `out` (logical levels).
    pub fn drive(&mut self, out: logic::Outputs) -> Result<(), PinError> {
        let (red, amber, green) = match self.wiring {
            LampWiring::Tower => (out.red, out.amber, out.green),
            // Amber on an RGB lamp is red and green mixed.
            LampWiring::Rgb => (out.red || out.amber, false, out.green || out.amber),
        };
        let active_low = self.active_low;
        set(&mut self.red, red, active_low, "red")?;
        if let Some(pin) = &mut self.amber {
            set(pin, amber, active_low, "amber")?;
        }
        set(&mut self.green, green, active_low, "green")?;
        set(&mut self.buzzer, out.buzzer, active_low, "buzzer")
    }

    /// Whether the button is pressed (logical).
    pub fn button_pressed(&mut self) -> Result<bool, PinError> {
        let high = self.button.is_high().map_err(|e| PinError::Input {
            detail: format!("{e:?}"),
        })?;
        Ok(high != self.active_low)
    }
}

fn set<O: OutputPin>(
    pin: &mut O,
    on: bool,
    active_low: bool,
    name: &'static str,
) -> Result<(), PinError> {
    let result = if on != active_low {
        pin.set_high()
    } else {
        pin.set_low()
    };
    result.map_err(|e| PinError::Output {
        pin: name,
        detail: format!("{e:?}"),
    })
}
