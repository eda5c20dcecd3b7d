//! The lab's nouns: tube barcodes, pool sizes and priorities, plate formats
//! and wells, plate layouts, and how one plate is derived from others.
//!
//! Everything here is plain data plus validation. Values that can be invalid
//! (a barcode, a well, a pool size) can only be built through a checking
//! constructor, and their serde implementations go through the same check, so
//! a value read back from the store or an API request is as trustworthy as
//! one built in code.

mod barcode;
mod layout;
mod lineage;
mod plate;
mod time;
mod tube;

pub use barcode::{Barcode, BarcodeError};
pub use layout::{ControlKind, ControlKindError, Layout, LayoutError, PlateTemplate, WellContent};
pub use lineage::{Lineage, LineageError, Quadrant, combine_quadrants, transfer_layout};
pub use plate::{FormatError, PlateFormat, Well, WellError};
pub use time::Timestamp;
pub use tube::{PoolSize, PoolSizeError, Priority, PriorityError, QueuedTube, plating_order};
