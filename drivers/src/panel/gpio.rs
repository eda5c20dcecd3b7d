//! The panel on a board's Linux GPIO character device (`/dev/gpiochipN`), through
//! linux-embedded-hal's `CdevPin` (embedded-hal 1.0 over the kernel's GPIO
//! character-device interface). Lines are requested as plain outputs and an
//! input: the active-low inversion is done by [`PanelPins`] so that simulated and
//! real pins behave the same.

use linux_embedded_hal::CdevPin;
use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};

use super::{LampWiring, PanelPins};

/// The consumer label the kernel shows for pcrd's lines (`gpioinfo`).
const CONSUMER: &str = "pcrd-panel";

/// Which line offsets on the chip the panel uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpioLines {
    /// e.g. `/dev/gpiochip0`.
    pub chip: String,
    pub red: u32,
    /// `None` for an RGB lamp.
    pub amber: Option<u32>,
    pub green: u32,
    pub buzzer: u32,
    pub button: u32,
    pub active_low: bool,
}

/// Opening the chip or requesting a line failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpioError {
    /// The chip device is missing or not readable by pcrd's user.
    #[error("cannot open GPIO chip {chip}: {source}")]
    Chip {
        chip: String,
        source: linux_embedded_hal::gpio_cdev::Error,
    },
    /// The line does not exist on the chip or another program holds it.
    #[error("cannot request line {line} ({role}) on {chip}: {source}")]
    Line {
        chip: String,
        line: u32,
        role: &'static str,
        source: linux_embedded_hal::gpio_cdev::Error,
    },
}

/// Requests the panel's lines; every output starts off.
pub fn open(lines: &GpioLines) -> Result<PanelPins<CdevPin, CdevPin>, GpioError> {
    let mut chip = Chip::new(&lines.chip).map_err(|source| GpioError::Chip {
        chip: lines.chip.clone(),
        source,
    })?;
    let off = u8::from(lines.active_low);
    let mut request = |line: u32, role: &'static str, flags: LineRequestFlags, value: u8| {
        let fail = |source| GpioError::Line {
            chip: lines.chip.clone(),
            line,
            role,
            source,
        };
        let handle = chip
            .get_line(line)
            .and_then(|l| l.request(flags, value, CONSUMER))
            .map_err(fail)?;
        CdevPin::new(handle).map_err(fail)
    };
    let red = request(lines.red, "red", LineRequestFlags::OUTPUT, off)?;
    let amber = match lines.amber {
        Some(line) => Some(request(line, "amber", LineRequestFlags::OUTPUT, off)?),
        None => None,
    };
    let green = request(lines.green, "green", LineRequestFlags::OUTPUT, off)?;
    let buzzer = request(lines.buzzer, "buzzer", LineRequestFlags::OUTPUT, off)?;
    let button = request(lines.button, "button", LineRequestFlags::INPUT, 0)?;
    Ok(PanelPins {
        red,
        wiring: if amber.is_some() {
            LampWiring::Tower
        } else {
            LampWiring::Rgb
        },
        amber,
        green,
        buzzer,
        button,
        active_low: lines.active_low,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPIO chip (as on CI and this build machine: no gpio-sim), opening
    /// fails with the chip named, not a panic.
    #[test]
    fn a_missing_chip_is_an_error_naming_it() {
        let lines = GpioLines {
            chip: "/dev/gpiochip-pcrd-missing".into(),
            red: 1,
            amber: Some(2),
            green: 3,
            buzzer: 4,
            button: 5,
            active_low: true,
        };
        let err = open(&lines)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("cannot open GPIO chip /dev/gpiochip-pcrd-missing"),
            "{err}"
        );
    }
}
