//! The fusion extension point (DESIGN.md, step 5).

use crate::data::{FusedTarget, FusionInput};
use crate::params::Params;
use crate::plugin::PluginInfo;

/// A fusion function: from each candidate's aligned sparse top-k per position, its CE per
/// document and per token, and the gold next tokens, the fused sparse target per position.
///
/// Implementations must be deterministic; hosts check the output with
/// [`crate::data::check_fused`] and turn a panic into an error.
pub trait FusionFn: Send + Sync {
    fn info(&self) -> PluginInfo;

    /// `params` has been resolved against `info().params`: every declared name is present.
    fn fuse(&self, params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, String>;
}

/// A built-in is a `&'static` plugin; hosts hold every plugin alike behind one pointer type.
impl<T: FusionFn + ?Sized> FusionFn for &T {
    fn info(&self) -> PluginInfo {
        (**self).info()
    }
    fn fuse(&self, params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, String> {
        (**self).fuse(params, input)
    }
}
