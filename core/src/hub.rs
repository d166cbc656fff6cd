//! Models by Hugging Face id (`model = "Qwen/Qwen2.5-7B"`, an optional `revision`), found
//! offline in the local Hugging Face cache, in the layout `huggingface_hub` writes
//! (`models--Qwen--Qwen2.5-7B/refs/main` naming a commit, `snapshots/<commit>/` its files).
//! Nothing is downloaded: a model not in the cache is an error that says how to fetch it.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

/// The cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`,
/// as `huggingface_hub` chooses it.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => dir.into(),
        None => Cache::from_env().path().clone(),
    }
}

/// Whether `value` reads as a Hub id, `owner/name`, rather than a path.
pub fn looks_like_id(value: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(value.split_once('/'), Some((owner, name)) if ok(owner) && ok(name))
}

/// The snapshot folder of model `id` at `revision` (a branch, a tag or a commit; `main`
/// when none) in the cache.
pub fn snapshot(id: &str, revision: Option<&str>) -> Result<PathBuf, String> {
    let dir = cache_dir();
    let rev = revision.unwrap_or("main");
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string());
    let folder = dir.join(repo.folder_name());
    let by_ref = Cache::new(dir.clone()).repo(repo).get("config.json").and_then(|c| c.parent().map(Path::to_owned));
    // A commit given as the revision has no ref: its snapshot is named by it.
    let by_commit = || Some(folder.join("snapshots").join(rev)).filter(|s| s.join("config.json").is_file());
    by_ref.or_else(by_commit).ok_or_else(|| {
        let revision = revision.map(|r| format!(" --revision {r}")).unwrap_or_default();
        format!(
            "the Hugging Face model `{id}` (revision {rev}) is not in the local cache {} (no snapshot with a config.json; \
             HF_HUB_CACHE or HF_HOME choose another cache); fetch it with `huggingface-cli download {id}{revision}`, \
             or give the checkpoint folder's path",
            dir.display()
        )
    })
}

/// `path` itself when it is a folder; else, when it reads as a Hub id, its snapshot in the
/// cache (an error if absent); else `path` (whose absence its reader reports).
pub fn locate(path: &Path) -> Result<PathBuf, String> {
    match path.to_str() {
        Some(id) if !path.is_dir() && looks_like_id(id) => {
            snapshot(id, None).map_err(|e| format!("there is no folder {id}, and {e}"))
        }
        _ => Ok(path.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_owner_and_name_and_paths_are_not() {
        for id in ["Qwen/Qwen2.5-7B", "meta-llama/Llama-3.1-8B", "openlm-research/open_llama_7b"] {
            assert!(looks_like_id(id), "{id}");
        }
        for path in ["models/ft-a/", "./models/x", "../shared/x", "/abs/x", "a/b/c", "tiny-llama2", "a/.b"] {
            assert!(!looks_like_id(path), "{path}");
        }
    }
}
