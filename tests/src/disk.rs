//! A folder on a small disk of its own (a tmpfs), for tests that fill it
//! up: a full disk as the coordinator's store and the workers' logs meet
//! it, without touching the machine's disks.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A tmpfs of a few MiB mounted on a folder; unmounted when dropped.
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB (mode 0700) on `at`, creating it; `None`
    /// where mounting is not permitted (not root, or no `mount`).
    pub fn mount(at: &Path, mib: u32) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(at.to_path_buf()))
    }

    /// Fills the disk with a ballast file until a write fails; its path
    /// (removing it frees the disk again).
    pub fn fill(&self) -> PathBuf {
        let ballast = self.0.join("ballast");
        let mut f = std::fs::File::create(&ballast).expect("a ballast file on the small disk");
        let block = vec![0xA5u8; 1 << 20];
        while f.write_all(&block).is_ok() {}
        // The last partial block, byte by byte, down to nothing free.
        while f.write_all(&block[..4096]).is_ok() {}
        while f.write_all(&block[..1]).is_ok() {}
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a process that still has a file open there (a worker
        // being reaped) must not keep the mount.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
