//! The built-in aligners (DESIGN.md, steps 3 and 4): `dtw` and `offsets` align two
//! tokenizations of one document; `em`, `mined` and `ms` (FuseChat's) map one vocabulary onto another. They see token strings the
//! host has already normalised (or, in compat mode, prepared as the paper's code does).

mod deletion_index;
mod dtw;
mod edit_distance;
mod ms;
mod offsets;
mod vocab;

pub use dtw::{dtw, Dtw};
pub use edit_distance::{symbols, Pattern};
pub use ms::Ms;
pub use offsets::Offsets;
pub use vocab::{Em, Mined};

fusellm_sdk::export_plugins!(sequence_aligner: [Dtw, Offsets], vocab_mapper: [Em, Mined, Ms]);
