//! fusellm-core: the plugin host (builtin, dylib and WASM tiers behind one registry), the
//! experiment configuration, and (with the coming issues) the block library, stores,
//! stages and training loop of DESIGN.md.

pub mod align;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod eval;
pub mod files;
pub mod fuse;
pub mod merge;
pub mod model;
pub mod pipeline;
pub mod plot;
pub mod plugins;
pub mod precompute;
pub mod rng;
pub mod split;
pub mod store;
pub mod table;
pub mod tokenizer;
pub mod train;
