//! `proxy/patches/apply.sh`, run on a copy of the repository's patch set: the published crates
//! come out patched and stamped, a second run does nothing, and a patch that no longer applies
//! or a crate whose checksum is wrong stops it with a message naming the cause.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch root holding `proxy/patches/` as in the repository.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = repo().join("proxy/patches");
    let dst = dir.path().join("proxy/patches");
    copy_dir(&src, &dst);
    dir
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for entry in std::fs::read_dir(src).expect("read_dir") {
        let entry = entry.expect("entry");
        let to = dst.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).expect("copy");
        }
    }
}

fn apply(root: &Path) -> Output {
    Command::new("bash")
        .arg(root.join("proxy/patches/apply.sh"))
        .output()
        .expect("run apply.sh")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// (crate name, version) of every line of crates.tsv.
fn crates() -> Vec<(String, String)> {
    let tsv = std::fs::read_to_string(repo().join("proxy/patches/crates.tsv")).expect("tsv");
    tsv.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_string(), f[1].to_string())
        })
        .collect()
}

#[test]
fn the_patch_set_applies_once_and_then_does_nothing() {
    let dir = scratch();
    let first = apply(dir.path());
    assert!(
        first.status.success(),
        "apply.sh failed: {}",
        stderr(&first)
    );
    for (name, version) in crates() {
        let out = dir.path().join(format!("target/patched/{name}-{version}"));
        assert!(
            out.join(".sluice-patches").is_file(),
            "{name} not stamped: {}",
            stderr(&first)
        );
        assert!(
            stderr(&first).contains(&format!("patched {name} {version}")),
            "{}",
            stderr(&first)
        );
        // what the build compiles is what the repository's patches make: the same tree as the
        // one cargo builds here (Cargo.toml's [patch.crates-io] points at it, so it is there)
        let built = repo().join(format!("target/patched/{name}-{version}"));
        let diff = Command::new("diff")
            .args(["-r", "-q"])
            .arg(&built)
            .arg(&out)
            .output()
            .expect("diff");
        assert!(
            diff.status.success(),
            "{}{}",
            String::from_utf8_lossy(&diff.stdout),
            String::from_utf8_lossy(&diff.stderr)
        );
    }
    let second = apply(dir.path());
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(stderr(&second), "", "a second run should do nothing");
}

#[test]
fn a_patch_that_no_longer_applies_stops_the_build_and_is_named() {
    let dir = scratch();
    let patches = dir.path().join("proxy/patches/pingora-proxy");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&patches)
        .expect("patches")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    all.sort();
    let patch = all.first().expect("a pingora-proxy patch").clone();
    // the first context line of its first hunk becomes one the published source does not
    // have, as after an upgrade
    let text = std::fs::read_to_string(&patch).expect("read");
    let mut in_hunk = false;
    let mut broken = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            in_hunk |= l.starts_with("@@");
            if in_hunk && !broken && l.starts_with(' ') && l.trim().len() > 1 {
                broken = true;
                " // a line pingora does not have".to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(broken, "no context line in {}", patch.display());
    std::fs::write(&patch, lines.join("\n") + "\n").expect("write");

    let out = apply(dir.path());
    assert!(!out.status.success(), "apply.sh accepted a broken patch");
    let err = stderr(&out);
    let name = patch
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        err.contains(&format!("error: {name} no longer applies to pingora-proxy")),
        "{err}"
    );
    assert!(err.contains("update the patch"), "{err}");
    // nothing half-patched is left where cargo looks
    let dest = dir.path().join("target/patched");
    let left: Vec<String> = std::fs::read_dir(&dest)
        .expect("target/patched")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pingora-proxy") || n.starts_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_crate_with_the_wrong_checksum_is_refused() {
    let dir = scratch();
    let tsv = dir.path().join("proxy/patches/crates.tsv");
    let text = std::fs::read_to_string(&tsv).expect("read");
    let (name, _) = crates().into_iter().next().expect("a crate");
    let bad: String = text
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{name}\t")) {
                let mut f: Vec<String> = l.split('\t').map(str::to_string).collect();
                f[2] = "0".repeat(64);
                f.join("\t")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    std::fs::write(&tsv, bad).expect("write");
    let out = apply(dir.path());
    assert!(!out.status.success(), "apply.sh accepted a wrong checksum");
    let err = stderr(&out);
    assert!(
        err.contains("has sha256") && err.contains(&"0".repeat(64)),
        "{err}"
    );
}
