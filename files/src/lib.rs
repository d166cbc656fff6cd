//! File helpers every fusellm crate shares: atomic writes (a reader never sees half a file,
//! and a failure leaves finished files alone), private cache files, content hashes, and
//! paths as runs record them. A crate of its own so that the plugin host and the stages use
//! one mechanism without depending on each other.

mod lock;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use lock::FolderLock;

/// A file operation that failed: what was being done to which file, and the I/O error.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct Error {
    what: String,
    #[source]
    source: std::io::Error,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Names the operation of an I/O result.
trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error { what: what(), source })
    }
}

/// Writes `bytes` to a temporary name beside `file` and renames it.
pub fn write_atomically(file: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, file));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.context(|| format!("writing {}", file.display()))
}

/// Writes a cache file atomically into a folder private to the user (a cache may hold
/// native code, as compiled WASM does, so others must not write there).
pub fn write_cache(file: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = file.parent().expect("cache files live in a folder");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .context(|| format!("creating {}", dir.display()))?;
    write_atomically(file, bytes)
}

/// Lowercase hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn file_sha256(path: &Path) -> Result<String> {
    Ok(sha256_hex(&std::fs::read(path).context(|| format!("reading {}", path.display()))?))
}

/// `path` with `.` and `dir/..` folded away, without touching the file system.
pub fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `path` made absolute (against the working folder) and folded: how fusellm records the
/// paths of models and corpora, valid from any working folder.
pub fn absolute(path: &Path) -> PathBuf {
    lexical(&std::path::absolute(path).unwrap_or_else(|_| path.to_owned()))
}
