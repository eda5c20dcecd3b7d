//! What is in each well of a plate: which wells a kit reserves for controls,
//! and where each tube went.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::{Barcode, PlateFormat, Well};
use crate::echo;

/// The controls a PCR plate carries. Every run's result is only valid if its
/// controls behave: the positive control amplifies, the negatives do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlKind {
    /// Known SARS-CoV-2 material: shows the reagents and cycler can detect
    /// the targets.
    PositiveControl,
    /// Water instead of sample at PCR set-up: shows the master mix is not
    /// contaminated.
    NoTemplateControl,
    /// A blank carried through extraction: shows extraction did not carry
    /// material between wells.
    ExtractionNegativeControl,
}

impl ControlKind {
    /// Every kind, in declaration order.
    pub const ALL: [ControlKind; 3] = [
        ControlKind::PositiveControl,
        ControlKind::NoTemplateControl,
        ControlKind::ExtractionNegativeControl,
    ];

    /// The abbreviation printed on plate maps: "PC", "NTC" or "ENC".
    pub fn short_label(self) -> &'static str {
        match self {
            ControlKind::PositiveControl => "PC",
            ControlKind::NoTemplateControl => "NTC",
            ControlKind::ExtractionNegativeControl => "ENC",
        }
    }

    /// The snake_case name used in kit files and JSON.
    fn name(self) -> &'static str {
        match self {
            ControlKind::PositiveControl => "positive_control",
            ControlKind::NoTemplateControl => "no_template_control",
            ControlKind::ExtractionNegativeControl => "extraction_negative_control",
        }
    }
}

impl fmt::Display for ControlKind {
    /// The snake_case name, e.g. "positive_control".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ControlKind {
    type Err = ControlKindError;

    /// The snake_case name or the short label, in any case ("ntc",
    /// "No_Template_Control").
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ControlKind::ALL
            .into_iter()
            .find(|k| s.eq_ignore_ascii_case(k.name()) || s.eq_ignore_ascii_case(k.short_label()))
            .ok_or_else(|| ControlKindError::Unknown { text: echo(s) })
    }
}

/// Why text is not a [`ControlKind`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlKindError {
    /// Not a control name or short label.
    #[error(
        "unknown control {text:?}; expected positive_control (PC), no_template_control (NTC) or extraction_negative_control (ENC)"
    )]
    Unknown {
        /// The text given (cut to 40 characters).
        text: String,
    },
}

/// What one occupied well holds.
///
/// In human-readable formats (JSON, TOML) this is `{"kind": "sample",
/// "barcode": ".."}` or `{"kind": "control", "control": ".."}`. Compact
/// binary formats such as postcard cannot read an internally tagged enum (it
/// needs `deserialize_any`), so there the variant index is written instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WellContent {
    /// A tube's sample.
    Sample {
        /// The tube.
        barcode: Barcode,
    },
    /// A control placed by the kit's template.
    Control {
        /// Which control.
        control: ControlKind,
    },
}

/// The human-readable shape of [`WellContent`]; generic so serializing can
/// borrow the barcode.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum TaggedContent<B> {
    Sample { barcode: B },
    Control { control: ControlKind },
}

/// The compact shape of [`WellContent`], for non-self-describing formats.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CompactContent<B> {
    Sample { barcode: B },
    Control { control: ControlKind },
}

impl Serialize for WellContent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match (self, serializer.is_human_readable()) {
            (WellContent::Sample { barcode }, true) => {
                TaggedContent::Sample { barcode }.serialize(serializer)
            }
            (WellContent::Control { control }, true) => {
                TaggedContent::<&Barcode>::Control { control: *control }.serialize(serializer)
            }
            (WellContent::Sample { barcode }, false) => {
                CompactContent::Sample { barcode }.serialize(serializer)
            }
            (WellContent::Control { control }, false) => {
                CompactContent::<&Barcode>::Control { control: *control }.serialize(serializer)
            }
        }
    }
}

impl<'de> Deserialize<'de> for WellContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            Ok(match TaggedContent::<Barcode>::deserialize(deserializer)? {
                TaggedContent::Sample { barcode } => WellContent::Sample { barcode },
                TaggedContent::Control { control } => WellContent::Control { control },
            })
        } else {
            Ok(
                match CompactContent::<Barcode>::deserialize(deserializer)? {
                    CompactContent::Sample { barcode } => WellContent::Sample { barcode },
                    CompactContent::Control { control } => WellContent::Control { control },
                },
            )
        }
    }
}

/// Which wells of a plate format hold which controls (from a kit).
///
/// Built with [`PlateTemplate::new`] or deserialized, a template only names
/// wells inside its format. The fields are public for reading; a template
/// assembled by hand from them is not checked, and [`Layout::from_template`]
/// ignores any of its wells that lie outside the format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTemplate")]
pub struct PlateTemplate {
    /// The plate format the wells refer to.
    pub format: PlateFormat,
    /// Control wells, in pipetting order.
    pub controls: BTreeMap<Well, ControlKind>,
}

impl PlateTemplate {
    /// Checks every well is on a `format` plate and none is listed twice
    /// (even for the same control: a repeated well is a typo in the kit).
    pub fn new(
        format: PlateFormat,
        controls: impl IntoIterator<Item = (Well, ControlKind)>,
    ) -> Result<Self, LayoutError> {
        let mut map = BTreeMap::new();
        for (well, control) in controls {
            if !format.contains(well) {
                return Err(LayoutError::OutsideFormat { well, format });
            }
            if map.insert(well, control).is_some() {
                return Err(LayoutError::DuplicateWell { well });
            }
        }
        Ok(PlateTemplate {
            format,
            controls: map,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    format: PlateFormat,
    #[serde(deserialize_with = "unique_wells")]
    controls: BTreeMap<Well, ControlKind>,
}

impl TryFrom<RawTemplate> for PlateTemplate {
    type Error = LayoutError;

    fn try_from(raw: RawTemplate) -> Result<Self, Self::Error> {
        PlateTemplate::new(raw.format, raw.controls)
    }
}

/// The contents of a plate's wells; empty wells are absent.
///
/// Invariants, kept by every method and checked when deserializing: every
/// well is on the plate's format, and no barcode is in two wells.
///
/// Serialized as `{"format": 96, "wells": {"A1": {..}, ..}}` with wells in
/// pipetting order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawLayout")]
pub struct Layout {
    format: PlateFormat,
    wells: BTreeMap<Well, WellContent>,
}

impl Layout {
    /// A plate with nothing in it.
    pub fn empty(format: PlateFormat) -> Self {
        Layout {
            format,
            wells: BTreeMap::new(),
        }
    }

    /// A plate with the template's controls placed and no samples.
    pub fn from_template(template: &PlateTemplate) -> Self {
        let format = template.format;
        let wells = template
            .controls
            .iter()
            // Only a template built by hand can have wells off the plate;
            // keeping them would break the invariant deserialization checks.
            .filter(|&(&well, _)| format.contains(well))
            .map(|(&well, &control)| (well, WellContent::Control { control }))
            .collect();
        Layout { format, wells }
    }

    /// The plate format.
    pub fn format(&self) -> PlateFormat {
        self.format
    }

    /// What is in `well`, if anything.
    pub fn get(&self, well: Well) -> Option<&WellContent> {
        self.wells.get(&well)
    }

    /// Occupied wells in pipetting (column-major) order.
    pub fn iter(&self) -> impl Iterator<Item = (Well, &WellContent)> {
        self.wells.iter().map(|(&well, content)| (well, content))
    }

    /// Sample wells in pipetting order.
    pub fn samples(&self) -> impl Iterator<Item = (Well, &Barcode)> {
        self.wells
            .iter()
            .filter_map(|(&well, content)| match content {
                WellContent::Sample { barcode } => Some((well, barcode)),
                WellContent::Control { .. } => None,
            })
    }

    /// Control wells in pipetting order.
    pub fn controls(&self) -> impl Iterator<Item = (Well, ControlKind)> + '_ {
        self.wells
            .iter()
            .filter_map(|(&well, content)| match content {
                WellContent::Control { control } => Some((well, *control)),
                WellContent::Sample { .. } => None,
            })
    }

    /// Where a tube is on this plate.
    pub fn well_of(&self, barcode: &Barcode) -> Option<Well> {
        self.samples()
            .find(|(_, b)| *b == barcode)
            .map(|(well, _)| well)
    }

    /// Empty wells in pipetting order (control wells are never free).
    pub fn free_wells(&self) -> impl Iterator<Item = Well> + '_ {
        self.format
            .wells_column_major()
            .filter(|well| !self.wells.contains_key(well))
    }

    /// Number of empty wells.
    pub fn free_count(&self) -> usize {
        self.format.well_count() - self.wells.len()
    }

    /// Places tubes in the next free wells in column-major order, in the order given (callers sort with plating_order first). All or nothing: on error the layout is unchanged. Errors: PlateFull { needed, free }, AlreadyOnPlate { barcode, well } (a tube already on this plate, or listed twice).
    ///
    /// For a tube listed twice, `well` is where its first listing would have
    /// gone. Returns the placements made, in pipetting order.
    pub fn fill(&mut self, tubes: &[Barcode]) -> Result<Vec<(Well, Barcode)>, LayoutError> {
        let wells: Vec<Well> = self.free_wells().take(tubes.len()).collect();
        if wells.len() < tubes.len() {
            return Err(LayoutError::PlateFull {
                needed: tubes.len(),
                free: wells.len(),
            });
        }
        let placements: Vec<(Well, Barcode)> =
            wells.into_iter().zip(tubes.iter().cloned()).collect();
        self.place_all(&placements)?;
        Ok(placements)
    }

    /// Puts one tube into a chosen well. Errors: OutsideFormat, ControlWell { well, control }, Occupied { well, barcode }, AlreadyOnPlate.
    pub fn place(&mut self, well: Well, barcode: Barcode) -> Result<(), LayoutError> {
        if !self.format.contains(well) {
            return Err(LayoutError::OutsideFormat {
                well,
                format: self.format,
            });
        }
        match self.wells.get(&well) {
            Some(WellContent::Control { control }) => {
                return Err(LayoutError::ControlWell {
                    well,
                    control: *control,
                });
            }
            Some(WellContent::Sample { barcode: there }) => {
                return Err(LayoutError::Occupied {
                    well,
                    barcode: there.clone(),
                });
            }
            None => {}
        }
        if let Some(at) = self.well_of(&barcode) {
            return Err(LayoutError::AlreadyOnPlate { barcode, well: at });
        }
        self.wells.insert(well, WellContent::Sample { barcode });
        Ok(())
    }

    /// All-or-nothing version of `place` for several explicit placements (checks duplicates among them too).
    ///
    /// A well named twice in `placements` is [`LayoutError::DuplicateWell`];
    /// a tube named twice is [`LayoutError::AlreadyOnPlate`] with the well of
    /// its first placement.
    pub fn place_all(&mut self, placements: &[(Well, Barcode)]) -> Result<(), LayoutError> {
        // Work on a copy and swap it in at the end, so a failure halfway
        // leaves the plate exactly as it was. A plate is at most 384 entries.
        let mut next = self.clone();
        let mut seen = BTreeSet::new();
        for (well, barcode) in placements {
            if !seen.insert(*well) {
                return Err(LayoutError::DuplicateWell { well: *well });
            }
            next.place(*well, barcode.clone())?;
        }
        *self = next;
        Ok(())
    }

    /// Removes the sample in a well and returns its barcode. Errors: Empty { well }, ControlWell.
    ///
    /// Also [`LayoutError::OutsideFormat`] for a well not on this plate.
    pub fn remove_sample(&mut self, well: Well) -> Result<Barcode, LayoutError> {
        if !self.format.contains(well) {
            return Err(LayoutError::OutsideFormat {
                well,
                format: self.format,
            });
        }
        match self.wells.get(&well) {
            None => Err(LayoutError::Empty { well }),
            Some(WellContent::Control { control }) => Err(LayoutError::ControlWell {
                well,
                control: *control,
            }),
            Some(WellContent::Sample { .. }) => match self.wells.remove(&well) {
                Some(WellContent::Sample { barcode }) => Ok(barcode),
                // Just matched as a sample; unreachable, but not worth a panic.
                _ => Err(LayoutError::Empty { well }),
            },
        }
    }

    /// Number of wells holding a sample.
    pub fn sample_count(&self) -> usize {
        self.samples().count()
    }

    /// Number of wells holding a control.
    pub fn control_count(&self) -> usize {
        self.wells.len() - self.sample_count()
    }

    /// Builds a layout from parts already known to satisfy the invariants
    /// (used by plate lineage, which derives them from valid layouts).
    pub(crate) fn from_parts(format: PlateFormat, wells: BTreeMap<Well, WellContent>) -> Self {
        Layout { format, wells }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayout {
    format: PlateFormat,
    #[serde(deserialize_with = "unique_wells")]
    wells: BTreeMap<Well, WellContent>,
}

impl TryFrom<RawLayout> for Layout {
    type Error = LayoutError;

    fn try_from(raw: RawLayout) -> Result<Self, Self::Error> {
        let mut seen: HashMap<&Barcode, Well> = HashMap::new();
        for (&well, content) in &raw.wells {
            if !raw.format.contains(well) {
                return Err(LayoutError::OutsideFormat {
                    well,
                    format: raw.format,
                });
            }
            if let WellContent::Sample { barcode } = content {
                if let Some(&first) = seen.get(barcode) {
                    return Err(LayoutError::AlreadyOnPlate {
                        barcode: barcode.clone(),
                        well: first,
                    });
                }
                seen.insert(barcode, well);
            }
        }
        Ok(Layout::from_parts(raw.format, raw.wells))
    }
}

/// Deserializes a map keyed by well, rejecting a well that appears twice.
/// A plain `BTreeMap` would silently keep the last entry, and "A1" and "a01"
/// name the same well: a sample could vanish without an error.
fn unique_wells<'de, D, V>(deserializer: D) -> Result<BTreeMap<Well, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct UniqueWells<V>(PhantomData<V>);

    impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueWells<V> {
        type Value = BTreeMap<Well, V>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map from well names to their contents")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((well, value)) = map.next_entry::<Well, V>()? {
                if out.insert(well, value).is_some() {
                    return Err(de::Error::custom(LayoutError::DuplicateWell { well }));
                }
            }
            Ok(out)
        }
    }

    deserializer.deserialize_map(UniqueWells(PhantomData))
}

/// Why a plate template or a change to a layout was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The well does not exist on this plate format.
    #[error("well {well} is outside a {format}-well plate (A1..{last})", last = format.last_well())]
    OutsideFormat {
        /// The well.
        well: Well,
        /// The plate's format.
        format: PlateFormat,
    },
    /// The same well was given twice: in a kit template, a batch of
    /// placements, or stored layout data.
    #[error("well {well} is listed more than once")]
    DuplicateWell {
        /// The well.
        well: Well,
    },
    /// The well is reserved for a control; samples never go there and the
    /// control is never removed.
    #[error("well {well} is reserved for the {control} ({label})", label = control.short_label())]
    ControlWell {
        /// The well.
        well: Well,
        /// The control it holds.
        control: ControlKind,
    },
    /// The well already holds another tube.
    #[error("well {well} already holds tube {barcode}")]
    Occupied {
        /// The well.
        well: Well,
        /// The tube already there.
        barcode: Barcode,
    },
    /// The tube is already on this plate, or was listed twice in one
    /// request: a tube is tested once per plate.
    #[error("tube {barcode} is already on this plate, in well {well}")]
    AlreadyOnPlate {
        /// The tube.
        barcode: Barcode,
        /// Where it is (or where its first listing goes).
        well: Well,
    },
    /// There is no sample in the well to remove.
    #[error("well {well} holds no sample")]
    Empty {
        /// The well.
        well: Well,
    },
    /// Not enough free wells for all the tubes; none were placed.
    #[error("{needed} tubes do not fit: the plate has {free} free wells")]
    PlateFull {
        /// How many tubes were to be placed.
        needed: usize,
        /// How many free wells the plate has.
        free: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(s: &str) -> Well {
        s.parse().unwrap()
    }

    fn b(s: &str) -> Barcode {
        Barcode::new(s).unwrap()
    }

    fn barcodes(n: usize) -> Vec<Barcode> {
        (0..n).map(|i| b(&format!("TUBE{i:04}"))).collect()
    }

    /// H12 positive, G12 no-template: the common 96-well kit layout.
    fn template96() -> PlateTemplate {
        PlateTemplate::new(
            PlateFormat::Wells96,
            [
                (w("H12"), ControlKind::PositiveControl),
                (w("G12"), ControlKind::NoTemplateControl),
            ],
        )
        .unwrap()
    }

    #[test]
    fn control_kind_text() {
        assert_eq!(ControlKind::PositiveControl.short_label(), "PC");
        assert_eq!(ControlKind::NoTemplateControl.short_label(), "NTC");
        assert_eq!(ControlKind::ExtractionNegativeControl.short_label(), "ENC");
        for kind in ControlKind::ALL {
            assert_eq!(kind.to_string().parse::<ControlKind>(), Ok(kind));
            assert_eq!(kind.short_label().parse::<ControlKind>(), Ok(kind));
            assert_eq!(
                kind.short_label().to_lowercase().parse::<ControlKind>(),
                Ok(kind)
            );
            assert_eq!(
                kind.to_string().to_uppercase().parse::<ControlKind>(),
                Ok(kind)
            );
            // Display and serde agree, so a kit file key reads as it prints.
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{kind}\""));
        }
        assert_eq!(
            ControlKind::ExtractionNegativeControl.to_string(),
            "extraction_negative_control"
        );
        assert_eq!(
            "blank".parse::<ControlKind>().unwrap_err().to_string(),
            "unknown control \"blank\"; expected positive_control (PC), no_template_control (NTC) or extraction_negative_control (ENC)"
        );
    }

    #[test]
    fn template_rejects_outside_and_repeated_wells() {
        assert_eq!(template96().controls.len(), 2);
        let err = PlateTemplate::new(
            PlateFormat::Wells96,
            [(w("P24"), ControlKind::PositiveControl)],
        )
        .unwrap_err();
        assert_eq!(
            err,
            LayoutError::OutsideFormat {
                well: w("P24"),
                format: PlateFormat::Wells96
            }
        );
        assert_eq!(
            err.to_string(),
            "well P24 is outside a 96-well plate (A1..H12)"
        );
        let err = PlateTemplate::new(
            PlateFormat::Wells96,
            [
                (w("H12"), ControlKind::PositiveControl),
                (w("H12"), ControlKind::NoTemplateControl),
            ],
        )
        .unwrap_err();
        assert_eq!(err, LayoutError::DuplicateWell { well: w("H12") });
        assert_eq!(err.to_string(), "well H12 is listed more than once");
    }

    #[test]
    fn from_template_places_controls_only() {
        let layout = Layout::from_template(&template96());
        assert_eq!(layout.format(), PlateFormat::Wells96);
        assert_eq!(layout.control_count(), 2);
        assert_eq!(layout.sample_count(), 0);
        assert_eq!(layout.free_count(), 94);
        assert_eq!(layout.free_wells().count(), 94);
        assert_eq!(
            layout.get(w("H12")),
            Some(&WellContent::Control {
                control: ControlKind::PositiveControl
            })
        );
        assert_eq!(layout.get(w("A1")), None);
        assert_eq!(
            layout.controls().collect::<Vec<_>>(),
            [
                (w("G12"), ControlKind::NoTemplateControl),
                (w("H12"), ControlKind::PositiveControl)
            ]
        );
    }

    #[test]
    fn from_template_drops_hand_built_wells_off_the_plate() {
        let mut template = template96();
        template
            .controls
            .insert(Well::new(20, 0), ControlKind::PositiveControl);
        let layout = Layout::from_template(&template);
        assert_eq!(layout.control_count(), 2);
        assert_eq!(layout.get(Well::new(20, 0)), None);
    }

    #[test]
    fn fill_goes_column_major_and_skips_controls() {
        let mut layout = Layout::from_template(&template96());
        // Put something in C1 first: fill must skip it.
        layout.place(w("C1"), b("MANUAL01")).unwrap();
        let tubes = barcodes(93);
        let placed = layout.fill(&tubes).unwrap();
        assert_eq!(placed.len(), 93);
        assert_eq!(placed[0], (w("A1"), tubes[0].clone()));
        assert_eq!(placed[1], (w("B1"), tubes[1].clone()));
        assert_eq!(placed[2], (w("D1"), tubes[2].clone()));
        assert_eq!(placed[7], (w("A2"), tubes[7].clone()));
        // The last column: A12..F12 are free, G12 and H12 are controls.
        assert_eq!(placed[92], (w("F12"), tubes[92].clone()));
        assert_eq!(layout.free_count(), 0);
        assert_eq!(layout.sample_count(), 94);
        assert_eq!(layout.control_count(), 2);
        assert_eq!(layout.well_of(&tubes[50]), Some(placed[50].0));
        assert!(matches!(
            layout.get(w("H12")),
            Some(WellContent::Control {
                control: ControlKind::PositiveControl
            })
        ));
        // Iteration is pipetting order.
        let order: Vec<Well> = layout.iter().map(|(well, _)| well).collect();
        let expected: Vec<Well> = PlateFormat::Wells96.wells_column_major().collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn fill_of_nothing_changes_nothing() {
        let mut layout = Layout::from_template(&template96());
        let before = layout.clone();
        assert_eq!(layout.fill(&[]).unwrap(), vec![]);
        assert_eq!(layout, before);
    }

    #[test]
    fn fill_too_many_is_plate_full_and_changes_nothing() {
        let mut layout = Layout::from_template(&template96());
        layout.fill(&barcodes(90)).unwrap();
        let before = layout.clone();
        let more: Vec<Barcode> = (0..5).map(|i| b(&format!("MORE{i}"))).collect();
        let err = layout.fill(&more).unwrap_err();
        assert_eq!(err, LayoutError::PlateFull { needed: 5, free: 4 });
        assert_eq!(
            err.to_string(),
            "5 tubes do not fit: the plate has 4 free wells"
        );
        assert_eq!(layout, before);
    }

    #[test]
    fn fill_rejects_a_tube_already_on_the_plate_and_changes_nothing() {
        let mut layout = Layout::from_template(&template96());
        layout.fill(&barcodes(3)).unwrap(); // TUBE0000..2 in A1..C1
        let before = layout.clone();
        let err = layout
            .fill(&[b("NEW00001"), b("TUBE0001"), b("NEW00002")])
            .unwrap_err();
        assert_eq!(
            err,
            LayoutError::AlreadyOnPlate {
                barcode: b("TUBE0001"),
                well: w("B1")
            }
        );
        assert_eq!(
            err.to_string(),
            "tube TUBE0001 is already on this plate, in well B1"
        );
        assert_eq!(layout, before);
    }

    #[test]
    fn fill_rejects_a_tube_listed_twice() {
        let mut layout = Layout::empty(PlateFormat::Wells96);
        let err = layout.fill(&[b("AAAA"), b("BBBB"), b("AAAA")]).unwrap_err();
        // The first listing of AAAA would have gone to A1.
        assert_eq!(
            err,
            LayoutError::AlreadyOnPlate {
                barcode: b("AAAA"),
                well: w("A1")
            }
        );
        assert_eq!(layout, Layout::empty(PlateFormat::Wells96));
    }

    #[test]
    fn place_errors() {
        let mut layout = Layout::from_template(&template96());
        layout.place(w("A1"), b("AAAA")).unwrap();
        assert_eq!(layout.well_of(&b("AAAA")), Some(w("A1")));

        let err = layout.place(w("H13"), b("BBBB")).unwrap_err();
        assert_eq!(
            err,
            LayoutError::OutsideFormat {
                well: w("H13"),
                format: PlateFormat::Wells96
            }
        );

        let err = layout.place(w("H12"), b("BBBB")).unwrap_err();
        assert_eq!(
            err,
            LayoutError::ControlWell {
                well: w("H12"),
                control: ControlKind::PositiveControl
            }
        );
        assert_eq!(
            err.to_string(),
            "well H12 is reserved for the positive_control (PC)"
        );

        let err = layout.place(w("A1"), b("BBBB")).unwrap_err();
        assert_eq!(
            err,
            LayoutError::Occupied {
                well: w("A1"),
                barcode: b("AAAA")
            }
        );
        assert_eq!(err.to_string(), "well A1 already holds tube AAAA");

        let err = layout.place(w("B1"), b("AAAA")).unwrap_err();
        assert_eq!(
            err,
            LayoutError::AlreadyOnPlate {
                barcode: b("AAAA"),
                well: w("A1")
            }
        );
        // None of the failures changed anything.
        assert_eq!(layout.sample_count(), 1);
        assert_eq!(layout.control_count(), 2);
    }

    #[test]
    fn place_all_is_all_or_nothing() {
        let mut layout = Layout::from_template(&template96());
        let before = layout.clone();

        let err = layout
            .place_all(&[
                (w("A1"), b("AAAA")),
                (w("B1"), b("BBBB")),
                (w("A1"), b("CCCC")),
            ])
            .unwrap_err();
        assert_eq!(err, LayoutError::DuplicateWell { well: w("A1") });
        assert_eq!(layout, before);

        let err = layout
            .place_all(&[(w("A1"), b("AAAA")), (w("B1"), b("AAAA"))])
            .unwrap_err();
        assert_eq!(
            err,
            LayoutError::AlreadyOnPlate {
                barcode: b("AAAA"),
                well: w("A1")
            }
        );
        assert_eq!(layout, before);

        let err = layout
            .place_all(&[(w("A1"), b("AAAA")), (w("G12"), b("BBBB"))])
            .unwrap_err();
        assert!(matches!(err, LayoutError::ControlWell { .. }));
        assert_eq!(layout, before);

        layout
            .place_all(&[(w("C3"), b("AAAA")), (w("A1"), b("BBBB"))])
            .unwrap();
        assert_eq!(
            layout.samples().collect::<Vec<_>>(),
            [(w("A1"), &b("BBBB")), (w("C3"), &b("AAAA"))]
        );
    }

    #[test]
    fn remove_sample_errors_and_success() {
        let mut layout = Layout::from_template(&template96());
        layout.place(w("A1"), b("AAAA")).unwrap();

        let err = layout.remove_sample(w("B1")).unwrap_err();
        assert_eq!(err, LayoutError::Empty { well: w("B1") });
        assert_eq!(err.to_string(), "well B1 holds no sample");

        let err = layout.remove_sample(w("G12")).unwrap_err();
        assert_eq!(
            err,
            LayoutError::ControlWell {
                well: w("G12"),
                control: ControlKind::NoTemplateControl
            }
        );
        assert_eq!(layout.control_count(), 2);

        assert!(matches!(
            layout.remove_sample(w("A13")),
            Err(LayoutError::OutsideFormat { .. })
        ));

        assert_eq!(layout.remove_sample(w("A1")), Ok(b("AAAA")));
        assert_eq!(layout.get(w("A1")), None);
        assert_eq!(layout.well_of(&b("AAAA")), None);
        // The well is free again and the tube can go elsewhere.
        layout.place(w("B1"), b("AAAA")).unwrap();
    }

    #[test]
    fn layout_json_shape_and_round_trip() {
        let mut layout = Layout::from_template(&template96());
        layout.fill(&[b("COV-0001"), b("COV-0002")]).unwrap();
        let json = serde_json::to_value(&layout).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "format": 96,
                "wells": {
                    "A1": {"kind": "sample", "barcode": "COV-0001"},
                    "B1": {"kind": "sample", "barcode": "COV-0002"},
                    "G12": {"kind": "control", "control": "no_template_control"},
                    "H12": {"kind": "control", "control": "positive_control"},
                }
            })
        );
        let text = serde_json::to_string(&layout).unwrap();
        // Wells are written in pipetting order, not string order (A1, B1,
        // G12, H12 here; string order would put A1 before A10 before A2).
        assert!(text.find("\"B1\"").unwrap() < text.find("\"G12\"").unwrap());
        let back: Layout = serde_json::from_str(&text).unwrap();
        assert_eq!(back, layout);
    }

    #[test]
    fn layout_json_round_trip_384() {
        let mut layout = Layout::empty(PlateFormat::Wells384);
        layout.place(w("P24"), b("LASTWELL")).unwrap();
        layout.fill(&barcodes(20)).unwrap();
        let back: Layout = serde_json::from_str(&serde_json::to_string(&layout).unwrap()).unwrap();
        assert_eq!(back, layout);
        assert_eq!(back.well_of(&b("TUBE0016")), Some(w("A2")));
    }

    fn parse_layout(json: &str) -> String {
        serde_json::from_str::<Layout>(json)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn invalid_layout_json_is_rejected() {
        let err = parse_layout(
            r#"{"format": 96, "wells": {"H13": {"kind": "sample", "barcode": "AAAA"}}}"#,
        );
        assert!(
            err.contains("well H13 is outside a 96-well plate (A1..H12)"),
            "{err}"
        );

        let err = parse_layout(
            r#"{"format": 96, "wells": {
                "A1": {"kind": "sample", "barcode": "AAAA"},
                "C2": {"kind": "sample", "barcode": "AAAA"}}}"#,
        );
        assert!(
            err.contains("tube AAAA is already on this plate, in well A1"),
            "{err}"
        );

        let err = parse_layout(
            r#"{"format": 96, "wells": {
                "A1": {"kind": "sample", "barcode": "AAAA"},
                "a01": {"kind": "sample", "barcode": "BBBB"}}}"#,
        );
        assert!(err.contains("well A1 is listed more than once"), "{err}");

        let err = parse_layout(r#"{"format": 48, "wells": {}}"#);
        assert!(
            err.contains("plate format \"48\" is not supported"),
            "{err}"
        );

        let err =
            parse_layout(r#"{"format": 96, "wells": {"A1": {"kind": "sample", "barcode": "A!"}}}"#);
        assert!(err.contains("barcode \"A!\""), "{err}");

        let err = parse_layout(r#"{"format": 96, "wells": {"A1": {"kind": "reagent"}}}"#);
        assert!(err.contains("reagent"), "{err}");

        let err = parse_layout(
            r#"{"format": 96, "wells": {"A1": {"kind": "control", "control": "pc"}}}"#,
        );
        assert!(err.contains("pc"), "{err}");

        let err = parse_layout(r#"{"format": 96, "wells": {}, "owner": "x"}"#);
        assert!(err.contains("owner"), "{err}");

        let err = parse_layout(r#"{"format": 96}"#);
        assert!(err.contains("wells"), "{err}");
    }

    #[test]
    fn template_json_round_trip_and_validation() {
        let template = template96();
        let json = serde_json::to_string(&template).unwrap();
        assert_eq!(
            json,
            r#"{"format":96,"controls":{"G12":"no_template_control","H12":"positive_control"}}"#
        );
        assert_eq!(
            serde_json::from_str::<PlateTemplate>(&json).unwrap(),
            template
        );
        let err = serde_json::from_str::<PlateTemplate>(
            r#"{"format":96,"controls":{"I1":"positive_control"}}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("well I1 is outside a 96-well plate"),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn fill_never_touches_controls_or_places_a_tube_twice(
            control_wells in proptest::collection::btree_set(0usize..96, 0..10),
            preplaced in proptest::collection::btree_set(0usize..96, 0..10),
            // Small alphabet so repeated barcodes are common.
            tubes in proptest::collection::vec("[A-E]{4}", 0..100),
        ) {
            let all: Vec<Well> = PlateFormat::Wells96.wells_column_major().collect();
            let template = PlateTemplate::new(
                PlateFormat::Wells96,
                control_wells.iter().map(|&i| (all[i], ControlKind::PositiveControl)),
            ).unwrap();
            let mut layout = Layout::from_template(&template);
            for (n, &i) in preplaced.iter().enumerate() {
                let _ = layout.place(all[i], b(&format!("PRE{n}")));
            }
            let before = layout.clone();
            let tubes: Vec<Barcode> = tubes.iter().map(|t| b(t)).collect();

            match layout.fill(&tubes) {
                Ok(placed) => {
                    prop_assert_eq!(placed.len(), tubes.len());
                    for (well, barcode) in &placed {
                        prop_assert!(before.get(*well).is_none(), "placed into occupied {}", well);
                        prop_assert_eq!(layout.well_of(barcode), Some(*well));
                    }
                    // Placements follow pipetting order.
                    prop_assert!(placed.windows(2).all(|p| p[0].0 < p[1].0));
                }
                Err(_) => prop_assert_eq!(&layout, &before),
            }
            // Whatever happened: controls intact, no barcode in two wells.
            for &i in &control_wells {
                prop_assert_eq!(
                    layout.get(all[i]),
                    Some(&WellContent::Control { control: ControlKind::PositiveControl })
                );
            }
            let mut seen = BTreeSet::new();
            for (_, barcode) in layout.samples() {
                prop_assert!(seen.insert(barcode.clone()), "{} twice", barcode);
            }
            prop_assert_eq!(layout.control_count(), control_wells.len());
            // And the result still passes the deserialization checks.
            let json = serde_json::to_string(&layout).unwrap();
            prop_assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), layout);
        }
    }
}
