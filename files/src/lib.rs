//! File helpers every fusellm crate shares: atomic writes (a reader never sees half a file,
//! and a failure leaves finished files alone), private cache files, content hashes, and
//! paths as runs record them. A crate of its own so that the plugin host and the stages use
//! one mechanism without depending on each other.

mod lock;
pub mod manifest;

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
/// native code, as compiled WASM does, so others must not write there), its content's
/// sha256 on the first line, so that [`read_cache`] notices a file changed since.
pub fn write_cache(file: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = file.parent().expect("cache files live in a folder");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .context(|| format!("creating {}", dir.display()))?;
    let content = [format!("{}\n", sha256_hex(bytes)).as_bytes(), bytes].concat();
    write_atomically(file, &content)
}

/// The content of a cache file [`write_cache`] wrote, if it is there and unchanged (a
/// damaged entry is one to compute again, not an error).
pub fn read_cache(file: &Path) -> Option<Vec<u8>> {
    let content = std::fs::read(file).ok()?;
    let (hash, bytes) = (content.get(..64)?, content.get(65..)?);
    let sound = content.get(64) == Some(&b'\n') && hash == sha256_hex(bytes).as_bytes();
    if !sound {
        eprintln!("warning: the cache entry {} is damaged; computing it again", file.display());
    }
    sound.then(|| bytes.to_vec())
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

/// fusellm's cache folder: `$FUSELLM_CACHE`, else `$XDG_CACHE_HOME/fusellm`, else
/// `~/.cache/fusellm`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("FUSELLM_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("fusellm")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/fusellm")))
}

/// The sha256 of a large file (a checkpoint's weights), hashed once: the hash is kept in
/// fusellm's cache under the file's path, size, inode and modification and change times.
/// The change time moves on every write and rename and no tool sets it back, so content
/// replaced in place with size and mtime kept (`cp -p`, `rsync -a`, `tar`) is hashed again.
pub fn cached_file_sha256(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).context(|| format!("reading {}", path.display()))?;
    let stamp = format!(
        "{}\n{} {} {}.{} {}.{}",
        absolute(path).display(),
        meta.len(),
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let entry = default_cache_dir().map(|d| d.join("sha256").join(&sha256_hex(stamp.as_bytes())[..32]));
    if let Some(hash) = entry.as_ref().and_then(|e| read_cache(e)).and_then(|h| String::from_utf8(h).ok()) {
        return Ok(hash);
    }
    let hash = {
        use std::io::Read;
        let mut file = std::fs::File::open(path).context(|| format!("reading {}", path.display()))?;
        let (mut hasher, mut buffer) = (Sha256::new(), vec![0u8; 1 << 20]);
        loop {
            let n = file.read(&mut buffer).context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break hex(&hasher.finalize());
            }
            hasher.update(&buffer[..n]);
        }
    };
    // A cache that cannot be written costs a hash next time, nothing else.
    if let Some(entry) = entry {
        let _ = write_cache(&entry, hash.as_bytes());
    }
    Ok(hash)
}

/// `path` as the file system resolves it (symbolic links followed), for a path that may not
/// exist yet: its deepest existing ancestor resolved, the rest appended.
fn resolved(path: &Path) -> PathBuf {
    let path = absolute(path);
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return path,
        }
    }
    let mut out = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_owned());
    out.extend(rest.iter().rev());
    out
}

/// Refuses an output that is one of a command's inputs or holds one: writing there would
/// destroy what the command reads.
pub fn check_output(out: &Path, inputs: &[&Path]) -> std::result::Result<(), String> {
    let target = resolved(out);
    match inputs.iter().find(|input| resolved(input).starts_with(&target)) {
        Some(input) => Err(format!(
            "the output {} {} the input {}: writing there would destroy it; choose another output",
            out.display(),
            if resolved(input) == target { "is" } else { "holds" },
            input.display()
        )),
        None => Ok(()),
    }
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
