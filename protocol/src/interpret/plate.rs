//! A whole plate at once: run controls, then every specimen under them.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{InterpretError, KitRef, Observed, PlateValidity, WellCall};
use crate::domain::{PlateFormat, Well};
use crate::kit::KitDefinition;

/// A plate's controls and the call for every specimen well on it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlateJudgement {
    /// Kit id and version that decided it.
    pub kit: KitRef,
    /// The plate format.
    pub format: PlateFormat,
    /// Whether the run controls passed, and if not, every failure.
    pub validity: PlateValidity,
    /// Every specimen well given, in pipetting order. On an invalid plate
    /// every call is `invalid` with the plate's reason.
    pub samples: BTreeMap<Well, WellCall>,
}

impl KitDefinition {
    /// Judges a plate: the wells the kit's `format` layout reserves for
    /// controls are checked as controls ([`KitDefinition::check_controls`]),
    /// every other well given is a specimen
    /// ([`KitDefinition::interpret_sample`]), and if the controls failed
    /// every specimen's call becomes `invalid` with the plate's reason
    /// ([`PlateValidity::apply`]). Wells not in `wells` are empty and get no
    /// call; a missing control well makes the plate invalid.
    ///
    /// Errors when the kit has no layout for `format`, a well is off the
    /// plate, or a specimen's readings cannot be interpreted (the error
    /// names the well).
    pub fn judge_plate<R: Observed>(
        &self,
        format: PlateFormat,
        wells: &BTreeMap<Well, BTreeMap<String, R>>,
    ) -> Result<PlateJudgement, InterpretError> {
        let template = self
            .template(format)
            .ok_or_else(|| InterpretError::NoLayout {
                kit: self.key(),
                format,
            })?;
        if let Some(&well) = wells.keys().find(|&&w| !format.contains(w)) {
            return Err(InterpretError::WellOutsidePlate {
                kit: self.key(),
                well,
                format,
            });
        }
        let controls = wells.iter().filter_map(|(well, readings)| {
            template
                .controls
                .get(well)
                .map(|&control| (control, *well, readings))
        });
        let validity = self.check_control_readings(format, controls)?;
        let mut samples = BTreeMap::new();
        for (&well, readings) in wells {
            if template.controls.contains_key(&well) {
                continue;
            }
            let call = self
                .interpret_sample(readings)
                .map_err(|source| InterpretError::Well {
                    well,
                    source: Box::new(source),
                })?;
            samples.insert(well, validity.apply(call));
        }
        Ok(PlateJudgement {
            kit: self.kit_ref(),
            format,
            validity,
            samples,
        })
    }
}
