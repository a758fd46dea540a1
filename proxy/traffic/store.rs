//! `admin.state_file`: admin weights and shifts kept across restarts. Written atomically (temp
//! file, fsync, rename, fsync of the directory), so a crash leaves the old file or the new one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Shift, Source, Weights};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    pub version: u32,
    pub routes: BTreeMap<String, SavedRoute>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SavedRoute {
    pub weights: Weights,
    pub source: Source,
    /// The config file's weights when the admin action was taken: if the file says something
    /// else by the next start, the file was edited since and wins.
    pub config_weights: Weights,
    pub shift: Option<Shift>,
}

/// What reading the state file found.
pub enum Loaded {
    Missing,
    Found(Saved),
    /// Unusable content: the error. The file was copied aside to `kept` before anything
    /// may overwrite it.
    Corrupt {
        error: String,
        kept: Option<PathBuf>,
    },
    /// Could not be read at all (permissions, a directory...): never written over.
    Unreadable(String),
}

pub fn load(path: &Path) -> Loaded {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return Loaded::Unreadable(format!("cannot read {}: {e}", path.display())),
    };
    let parsed = serde_json::from_slice::<Saved>(&text)
        .map_err(|e| e.to_string())
        .and_then(|s| match s.version {
            VERSION => s.validate().map(|_| s),
            v => Err(format!("unknown version {v}")),
        });
    match parsed {
        Ok(s) => Loaded::Found(s),
        Err(e) => {
            let kept = path.with_extension(format!(
                "corrupt-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            ));
            let kept = std::fs::write(&kept, &text).ok().map(|_| kept);
            Loaded::Corrupt {
                error: format!("{}: {e}", path.display()),
                kept,
            }
        }
    }
}

impl Saved {
    fn validate(&self) -> Result<(), String> {
        for (name, r) in &self.routes {
            for w in [r.weights, r.config_weights] {
                if !w.valid() {
                    return Err(format!("route {name}: weights do not sum to 100"));
                }
            }
            if let Some(s) = &r.shift {
                if !s.from.valid() || s.step == 0 || s.step > 100 || s.every_ms == 0 {
                    return Err(format!("route {name}: invalid shift"));
                }
            }
        }
        Ok(())
    }
}

/// Replaces the file atomically with `saved`; creates its directory when missing.
pub fn save(path: &Path, saved: &Saved) -> Result<(), String> {
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", path.display());
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| fail("cannot create the directory of", e))?;
    let mut body = serde_json::to_vec_pretty(saved).map_err(|e| e.to_string())?;
    body.push(b'\n');
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // the rename itself must reach the disk too
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("cannot write", e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::{Color, ShiftState};

    fn sample() -> Saved {
        let mut routes = BTreeMap::new();
        routes.insert(
            "shop".to_string(),
            SavedRoute {
                weights: Weights::new(70, 30),
                source: Source::Admin,
                config_weights: Weights::new(100, 0),
                shift: Some(Shift {
                    to: Color::Green,
                    step: 10,
                    every_ms: 30_000,
                    from: Weights::new(100, 0),
                    from_source: Source::Config,
                    started_at_ms: 1,
                    next_at_ms: Some(2),
                    state: ShiftState::Running,
                    reason: None,
                }),
            },
        );
        Saved {
            version: VERSION,
            routes,
        }
    }

    #[test]
    fn round_trip_and_corrupt_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/runtime.json");
        assert!(matches!(load(&path), Loaded::Missing));
        save(&path, &sample()).expect("save");
        match load(&path) {
            Loaded::Found(s) => assert_eq!(s, sample()),
            _ => panic!("saved state not read back"),
        }
        std::fs::write(&path, b"{\"version\": 1, \"routes\": {\"shop\": ").expect("write");
        match load(&path) {
            Loaded::Corrupt { error, kept } => {
                assert!(error.contains("runtime.json"), "{error}");
                let kept = kept.expect("copied aside");
                assert!(std::fs::read(kept)
                    .expect("kept")
                    .starts_with(b"{\"version\""));
            }
            _ => panic!("corrupt file accepted"),
        }
        let mut bad = sample();
        if let Some(r) = bad.routes.get_mut("shop") {
            r.weights = Weights {
                blue: 70,
                green: 70,
            };
        }
        std::fs::write(&path, serde_json::to_vec(&bad).expect("json")).expect("write");
        assert!(matches!(load(&path), Loaded::Corrupt { .. }));
        assert!(matches!(load(dir.path()), Loaded::Unreadable(_)));
    }
}
