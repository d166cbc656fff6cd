//! Alignment on the host side (DESIGN.md steps 3 and 4): token normalisation, vocabulary
//! maps with their cache, and the projection of a source's top-k onto the target's
//! positions. The algorithms themselves (dtw, em, mined) are aligner plugins.

pub mod normalize;
pub mod project;
pub mod vocab;
