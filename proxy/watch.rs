//! Picks up changes on disk by itself: the config file and every file it names are watched
//! through their directories, and so is every symlink hop on the way to the real file (so
//! editors' write-to-temp-and-rename, Kubernetes ConfigMap symlink swaps, and later edits of the
//! file behind the links are all seen; the hops are followed again after every change), events are debounced, and a reload runs only when those files
//! actually changed since the last load. SIGHUP reloads unconditionally.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher as _};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::state::Shared;

/// Quiet time after the last event before files are read.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

pub struct Watcher {
    pub shared: Arc<Shared>,
}

/// A digest of what `files` are now, from their metadata (through symlinks): device, inode,
/// size, modification and change times. A rename or a symlink swap brings another inode, a
/// write in place another size or times; nothing is read, so a large GeoIP database costs no
/// more to check than a small config. A missing file counts as its own state.
pub fn fingerprint(files: &[PathBuf]) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut h = Sha256::new();
    for f in files {
        h.update(f.as_os_str().as_encoded_bytes());
        match std::fs::metadata(f) {
            Ok(m) => {
                h.update(b"\x01");
                for v in [m.dev(), m.ino(), m.size()] {
                    h.update(v.to_le_bytes());
                }
                for v in [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
                    h.update(v.to_le_bytes());
                }
            }
            Err(_) => h.update(b"\x00"),
        }
    }
    crate::config::hex(&h.finalize())
}

/// Every path a watched file is reached through: the path itself, each symlink hop after it,
/// and the real file at the end (which also covers symlinked directories on the way, such as a
/// ConfigMap's `..data`). A change at any of them can change what the path reads.
pub fn hops(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let mut cur = path.to_path_buf();
    // the kernel's own limit on symlink chains
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(&cur) else {
            break;
        };
        cur = if target.is_absolute() {
            target
        } else {
            dir_of(&cur).join(target)
        };
        if out.contains(&cur) {
            break;
        }
        out.push(cur.clone());
    }
    if let Ok(real) = std::fs::canonicalize(path) {
        if !out.contains(&real) {
            out.push(real);
        }
    }
    out
}

fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Longest a stream of events can postpone a reload.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// Whether an event can change our files: a change (opening or reading is not; closing a file
/// opened for writing is) to one of their names, or to a `..name` entry (how Kubernetes swaps a
/// ConfigMap's `..data` symlink). Other files in the same directories (logs, say) do not count.
fn relevant(event: &notify::Event, names: &HashSet<std::ffi::OsString>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    let change = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    change
        && event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| names.contains(n) || n.as_encoded_bytes().starts_with(b".."))
        })
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let _ = tx.send(res);
        });
        let mut watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                log::error!("cannot watch files; reload with SIGHUP or POST /reload: {e}");
                None
            }
        };
        let mut dirs: HashSet<PathBuf> = HashSet::new();
        let mut names: HashSet<std::ffi::OsString> = HashSet::new();
        let mut first = true;
        loop {
            // (re)watch the directories of whatever the config names now, through every
            // symlink hop as the links point now
            let files: Vec<PathBuf> = self
                .shared
                .watched_files()
                .iter()
                .flat_map(|f| hops(f))
                .collect();
            let mut added = false;
            if let Some(w) = watcher.as_mut() {
                names = files
                    .iter()
                    .filter_map(|f| f.file_name().map(Into::into))
                    .collect();
                let want: HashSet<PathBuf> = files.iter().map(|f| dir_of(f)).collect();
                for d in dirs.difference(&want) {
                    let _ = w.unwatch(d);
                }
                for d in want.difference(&dirs) {
                    added = true;
                    if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                        log::error!("cannot watch {}: {e}", d.display());
                    }
                }
                dirs = want;
            }
            if first {
                self.shared.lifecycle.set_watching();
            }
            // whatever changed between the last load and a new directory's watch being in
            // place (at start, or after a ConfigMap swap to a new ..data target) was not seen
            if (first || added) && self.shared.files_changed() {
                first = false;
                let _ = self
                    .shared
                    .reload("changed while the watch was being set up");
                continue;
            }
            first = false;
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            // events about other files of the same directories (an access log written next
            // to the config, say) are skipped here, without following the hops again
            let event = async {
                match watcher.is_some() {
                    true => loop {
                        match rx.recv().await {
                            Some(Ok(e)) if !relevant(&e, &names) => continue,
                            other => break other,
                        }
                    },
                    false => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = hup_recv => {
                    let _ = self.shared.reload("SIGHUP");
                    continue;
                }
                ev = event => match ev {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => { log::warn!("file watch error: {e}"); continue; }
                    None => { watcher = None; continue; }
                },
            }
            // debounce: wait until our files are quiet, so a file being written is read once
            // it is complete (but never longer than MAX_DEBOUNCE)
            let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
            let mut quiet_until = tokio::time::Instant::now() + DEBOUNCE;
            loop {
                match tokio::time::timeout_at(quiet_until.min(deadline), rx.recv()).await {
                    Ok(Some(Ok(e))) if relevant(&e, &names) => {
                        quiet_until = tokio::time::Instant::now() + DEBOUNCE;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            if self.shared.files_changed() {
                let _ = self.shared.reload("file change");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_follow_every_link() {
        let d = tempfile::tempdir().expect("tempdir");
        let cm = d.path();
        std::fs::create_dir_all(cm.join("..v1")).expect("mkdir");
        std::fs::write(cm.join("..v1/sluice.toml"), "x").expect("write");
        std::os::unix::fs::symlink("..v1", cm.join("..data")).expect("link");
        std::os::unix::fs::symlink("..data/sluice.toml", cm.join("sluice.toml")).expect("link");
        let h = hops(&cm.join("sluice.toml"));
        let real = std::fs::canonicalize(cm.join("..v1/sluice.toml")).expect("real");
        assert_eq!(h.first(), Some(&cm.join("sluice.toml")));
        assert!(h.contains(&cm.join("..data/sluice.toml")), "{h:?}");
        assert_eq!(h.last(), Some(&real));
        // a loop ends
        std::os::unix::fs::symlink("b", cm.join("a")).expect("link");
        std::os::unix::fs::symlink("a", cm.join("b")).expect("link");
        assert!(hops(&cm.join("a")).len() <= 3);
    }
}
