//! A ConfigMap volume, updated exactly the way the kubelet's atomic writer does.
//!
//! Layout: `..<timestamp>/` holds the files, `..data` is a symlink to it, and
//! each visible `name.yaml` is a symlink to `..data/name.yaml`. An update writes
//! a new timestamped directory, points `..data_tmp` at it, renames `..data_tmp`
//! over `..data` (the atomic step), adds/removes visible symlinks for keys that
//! appeared/disappeared, and deletes the old directory.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct ConfigMap {
    pub root: tempfile::TempDir,
    current: PathBuf,
    keys: Vec<String>,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl ConfigMap {
    pub fn new(files: &[(&str, &str)]) -> ConfigMap {
        let root = tempfile::tempdir().expect("temp dir");
        let current = write_version(root.path(), files);
        symlink(current.file_name().unwrap(), root.path().join("..data")).unwrap();
        let keys: Vec<String> = files.iter().map(|(k, _)| k.to_string()).collect();
        for k in &keys {
            symlink(Path::new("..data").join(k), root.path().join(k)).unwrap();
        }
        ConfigMap {
            root,
            current,
            keys,
        }
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// Replaces the whole content with `files`, as one atomic swap.
    pub fn update(&mut self, files: &[(&str, &str)]) {
        let root = self.root.path();
        let next = write_version(root, files);
        let tmp = root.join("..data_tmp");
        symlink(next.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, root.join("..data")).unwrap();

        let new_keys: Vec<String> = files.iter().map(|(k, _)| k.to_string()).collect();
        for k in &new_keys {
            if !self.keys.contains(k) {
                symlink(Path::new("..data").join(k), root.join(k)).unwrap();
            }
        }
        for k in &self.keys {
            if !new_keys.contains(k) {
                std::fs::remove_file(root.join(k)).unwrap();
            }
        }
        std::fs::remove_dir_all(&self.current).unwrap();
        self.current = next;
        self.keys = new_keys;
    }
}

/// Writes one version into a fresh `..<timestamp>` directory.
fn write_version(root: &Path, files: &[(&str, &str)]) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let dir = root.join(format!("..2026_11_25_14_00_00.{n:09}"));
    std::fs::create_dir(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}
