//! The builtin tier: plugin crates linked into this binary, found through `inventory`.

use fusellm_sdk::builtin_sets;

use super::{Entry, Handle, PluginError, Tier};

pub(super) fn entries() -> Result<Vec<Entry>, PluginError> {
    let mut out = Vec::new();
    for set in builtin_sets() {
        for plugin in set.plugins {
            out.push(Entry::new(plugin.info(), Tier::Builtin, set.crate_name.to_string(), Handle::builtin(*plugin))?);
        }
    }
    out.sort_by(|a, b| a.info.name.cmp(&b.info.name));
    Ok(out)
}
