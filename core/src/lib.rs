//! fusellm-core: the plugin host (builtin, dylib and WASM tiers behind one registry), the
//! experiment configuration, the stores, the stages and the training loop of DESIGN.md,
//! over the block library (`fusellm-blocks`, re-exported as `model`).

pub mod align;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod eval;
pub mod files;
pub mod fuse;
pub mod merge;
pub mod pipeline;
pub mod plot;
pub mod plugins;
pub mod precompute;
pub mod split;
pub mod store;
pub mod table;
pub mod tokenizer;
pub mod train;

/// The block library, as the stages call it.
pub use fusellm_blocks as model;
