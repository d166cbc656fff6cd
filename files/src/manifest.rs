//! The manifest of a finished output folder: every file's size and sha256, written last.
//! A folder is whole when its manifest verifies, and a damaged file is named (and made
//! again) rather than trusted. Hashes come from
//! [`crate::cached_file_sha256`], so checking a folder again in a later run costs a `stat`
//! per file unless a file changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{cached_file_sha256, write_atomically, Context, Result};

/// The manifest's name inside the folder it describes.
pub const MANIFEST: &str = ".fusellm-manifest.json";

#[derive(Serialize, Deserialize)]
struct Listing {
    files: BTreeMap<String, Entry>,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct Entry {
    bytes: u64,
    sha256: String,
}

/// What a folder's manifest says of it now.
#[derive(Debug, PartialEq)]
pub enum Check {
    /// Every file listed is there with its size and hash.
    Sound,
    /// No manifest (the output never finished, or predates manifests).
    Unlisted,
    /// These files (relative paths) are missing or changed.
    Damaged(Vec<PathBuf>),
}

/// The files a manifest covers: all below `dir` but the manifest, locks and partial or
/// temporary files of writers.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).context(|| format!("reading {}", folder.display()))? {
            let path = entry.context(|| format!("reading {}", folder.display()))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name == MANIFEST || name == ".fusellm.lock" || name.contains(".partial") || name.contains(".tmp") {
                continue;
            }
            match path.is_dir() {
                true => pending.push(path),
                false => out.push(path.strip_prefix(dir).expect("below dir").to_path_buf()),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes the manifest of `dir` as it is now.
pub fn write_manifest(dir: &Path) -> Result<()> {
    let mut listing = Listing { files: BTreeMap::new() };
    for file in files(dir)? {
        let path = dir.join(&file);
        let bytes = std::fs::metadata(&path).context(|| format!("reading {}", path.display()))?.len();
        listing.files.insert(file.display().to_string(), Entry { bytes, sha256: cached_file_sha256(&path)? });
    }
    write_atomically(&dir.join(MANIFEST), &serde_json::to_vec_pretty(&listing).expect("JSON"))
}

/// Checks `dir` against its manifest.
pub fn check_manifest(dir: &Path) -> Result<Check> {
    let Ok(text) = std::fs::read(dir.join(MANIFEST)) else { return Ok(Check::Unlisted) };
    let Ok(listing) = serde_json::from_slice::<Listing>(&text) else {
        // A manifest that does not parse vouches for nothing.
        return Ok(Check::Damaged(vec![PathBuf::from(MANIFEST)]));
    };
    let mut damaged = Vec::new();
    for (file, entry) in &listing.files {
        let path = dir.join(file);
        let sound = std::fs::metadata(&path).is_ok_and(|m| m.len() == entry.bytes)
            && cached_file_sha256(&path).is_ok_and(|h| h == entry.sha256);
        if !sound {
            damaged.push(PathBuf::from(file));
        }
    }
    Ok(if damaged.is_empty() { Check::Sound } else { Check::Damaged(damaged) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_or_missing_file_is_named_and_a_whole_folder_is_sound() {
        let dir = std::env::temp_dir().join(format!("fusellm-manifest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.bin"), b"alpha").unwrap();
        std::fs::write(dir.join("sub/b.bin"), b"beta").unwrap();
        assert_eq!(check_manifest(&dir).unwrap(), Check::Unlisted);
        write_manifest(&dir).unwrap();
        assert_eq!(check_manifest(&dir).unwrap(), Check::Sound);
        // The same length, one byte changed; and a file gone.
        std::fs::write(dir.join("a.bin"), b"alphA").unwrap();
        std::fs::remove_file(dir.join("sub/b.bin")).unwrap();
        let damaged = vec![PathBuf::from("a.bin"), PathBuf::from("sub/b.bin")];
        assert_eq!(check_manifest(&dir).unwrap(), Check::Damaged(damaged));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
