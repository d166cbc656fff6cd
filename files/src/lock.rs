//! An advisory lock on a folder a run writes into: a second fusellm on the same folder is
//! refused with the holder's pid, start time and command, instead of computing every
//! stage again beside it and writing each step's metrics twice. The lock is the OS's file
//! lock on `.fusellm.lock` (released when the process ends, however it ends); the file's
//! text only says who holds it.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::{Context, Error, Result};

const LOCK_FILE: &str = ".fusellm.lock";

/// Held while the folder is in use; dropping it releases the lock.
#[derive(Debug)]
pub struct FolderLock {
    _file: std::fs::File,
    pub path: PathBuf,
}

impl FolderLock {
    /// Locks `dir` (created if missing), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another fusellm process".to_string() } else { holder.to_string() };
                return Err(Error {
                    what: format!(
                        "{} is in use by {holder}; wait for it to finish, or give this run another folder",
                        dir.display()
                    ),
                    source: std::io::ErrorKind::WouldBlock.into(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error { what: format!("locking {}", path.display()), source: e })
            }
        }
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let command: Vec<String> = std::env::args().collect();
        let text = format!("pid {}, started at {started} (Unix time), `{}`\n", std::process::id(), command.join(" "));
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(text.as_bytes()))
            .context(|| format!("writing {}", path.display()))?;
        Ok(Self { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_folder_is_refused_with_its_holder_and_free_again_once_released() {
        let dir = std::env::temp_dir().join(format!("fusellm-lock-{}", std::process::id()));
        let held = FolderLock::acquire(&dir).unwrap();
        let refused = FolderLock::acquire(&dir).unwrap_err().to_string();
        assert!(refused.contains(&format!("pid {}", std::process::id())) && refused.contains("in use"), "{refused}");
        drop(held);
        FolderLock::acquire(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
