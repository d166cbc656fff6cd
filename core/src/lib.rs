//! fusellm-core: the experiment configuration, the stores, the stages and the training
//! loop of DESIGN.md, over the plugin host (`fusellm-host`, re-exported as `plugins`), the
//! block library (`fusellm-blocks`, as `model`) and the file helpers (`fusellm-files`, as
//! `files`).

pub mod align;
pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod device;
pub mod error;
pub mod eval;
pub mod fuse;
pub mod hub;
pub mod merge;
pub mod pipeline;
pub mod plot;
pub mod precompute;
pub mod split;
pub mod stats;
pub mod store;
pub mod table;
pub mod tokenizer;
pub mod train;

/// The block library, as the stages call it.
pub use fusellm_blocks as model;
/// The file helpers every stage shares.
pub use fusellm_files as files;
/// The plugin host, as the stages call it.
pub use fusellm_host as plugins;
