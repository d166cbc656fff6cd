//! The integration tests, in one binary: each module is one capability's specification,
//! and one link of the whole workspace serves them all.

// Built-in plugin crates register through `inventory`; referencing them keeps them linked.
use fusellm_align as _;
use fusellm_ce_fusion as _;
use fusellm_gemma as _;
use fusellm_gpt_neox as _;
use fusellm_llama as _;
use fusellm_mpt as _;
use fusellm_phi3 as _;

mod adapters;
mod align_stage;
mod alignment;
mod bad_plugins;
mod cli_plugins;
mod common;
mod config_plugins;
mod corpus_formats;
mod data_parallel;
mod demo;
mod device;
mod evaluation;
mod examples;
mod families;
mod fused_ops;
mod gradients;
mod hub_cache;
mod integrity;
mod lora;
mod memory;
mod merge_methods;
mod model_bad_inputs;
mod model_parity;
mod plugin_tiers;
mod precompute;
mod run_pipeline;
mod split;
mod store;
mod store_import;
mod train_step;
mod training;

#[global_allocator]
static ALLOCATOR: common::alloc::Counting = common::alloc::Counting;
