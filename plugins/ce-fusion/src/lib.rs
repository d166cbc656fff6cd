//! The paper's fusion functions (FuseLLM, section 3.3; DESIGN.md, step 5), built in and
//! also built as a dylib and a WASM component from this same source.
//!
//! Both rank candidates by cross-entropy on the gold tokens, per document (the paper's
//! code) or per token (the paper's text), and both read a candidate's kept top-k through a
//! softmax at a teacher temperature, as the paper's collator does.

mod avg_ce;
mod candidates;
mod min_ce;

pub use avg_ce::AvgCe;
pub use min_ce::MinCe;

fusellm_sdk::export_plugins!(fusion: [MinCe, AvgCe]);
