//! Files in the agent's data directory, written so that a crash leaves the old content or
//! the new, never a torn file.

use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `dir/name` through a temporary file that is synced and renamed into
/// place, then syncs the directory so the rename itself is durable.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "state", b"first, and longer").unwrap();
        write_atomic(dir.path(), "state", b"second").unwrap();
        assert_eq!(std::fs::read(dir.path().join("state")).unwrap(), b"second");
        assert!(!dir.path().join("state.tmp").exists());
    }
}
