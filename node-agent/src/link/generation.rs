//! The agent's generation: a counter in its data directory that grows on every start, so the
//! broker can tell a restarted agent from a stale connection of the old one.

use std::io;
use std::path::Path;

const FILE: &str = "generation";

/// Reads the last generation from `data_dir`, stores and returns the next one. A missing file
/// starts at 1; the new value is written to a temporary file and renamed into place, so a
/// crash leaves the old value or the new one, never a torn file.
pub fn next(data_dir: &Path) -> io::Result<u64> {
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join(FILE);
    let current = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let next = current
        .checked_add(1)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "generation overflow"))?;
    crate::datadir::write_atomic(data_dir, FILE, format!("{next}\n").as_bytes())?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_start_is_a_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next(dir.path()).unwrap(), 1);
        assert_eq!(next(dir.path()).unwrap(), 2);
        std::fs::write(dir.path().join(FILE), "garbage").unwrap();
        assert!(
            next(dir.path()).is_err(),
            "a corrupt counter is an error, not a reset"
        );
    }
}
