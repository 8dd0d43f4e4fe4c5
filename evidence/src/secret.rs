//! Files that hold secrets (the checkpoint signing key, the archive's keyring): read only when
//! no one else may read them, written 0600 and synced with their directory entry, replaced
//! atomically. Not here: what the secrets are.

use crate::EvidenceError;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

fn io(what: &str, path: &Path, doing: &str, e: std::io::Error) -> EvidenceError {
    EvidenceError::Io(format!("{what} {}: {doing}: {e}", path.display()))
}

/// The text of the secret file `path` (`what` names it in errors), or `None` when there is
/// none. A file that its group or others may read is refused: whoever reads it has the secret.
pub fn read(path: &Path, what: &str) -> Result<Option<String>, EvidenceError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(what, path, "read", e)),
    };
    let mode = std::fs::metadata(path)
        .map_err(|e| io(what, path, "stat", e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(EvidenceError::Refused(format!(
            "{what} {} is readable by others (mode {:o}): chmod 600 it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(Some(text))
}

/// Writes `text` as the secret file `path`: a new file (0600) beside it, synced, renamed over
/// `path` (`create_new`: only where there is none), then the directory synced. A crash leaves
/// the old file or the new one, never a part.
pub fn write(path: &Path, what: &str, text: &str, create_new: bool) -> Result<(), EvidenceError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(what, path, "create its directory", e))?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    let tmp = dir.join(name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io(what, path, "create", e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io(what, path, "write", e))?;
    if create_new {
        // A link fails where a file already is: never overwrite a secret made meanwhile.
        std::fs::hard_link(&tmp, path).map_err(|e| io(what, path, "create", e))?;
        std::fs::remove_file(&tmp).map_err(|e| io(what, path, "tidy", e))?;
    } else {
        std::fs::rename(&tmp, path).map_err(|e| io(what, path, "replace", e))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(what, path, "sync its directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_written_private_replaced_whole_and_refused_when_others_may_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/k");
        assert_eq!(read(&path, "key").unwrap(), None);
        write(&path, "key", "one\n", true).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read(&path, "key").unwrap().as_deref(), Some("one\n"));
        // A second creation does not overwrite it; a replacement does.
        assert!(write(&path, "key", "two\n", true).is_err());
        write(&path, "key", "three\n", false).unwrap();
        assert_eq!(read(&path, "key").unwrap().as_deref(), Some("three\n"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = read(&path, "key").unwrap_err().to_string();
        assert!(err.contains("readable by others (mode 640)"), "{err}");
    }
}
