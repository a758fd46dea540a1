//! The alert rules and the Grafana dashboard, proven rather than just written: every alert has
//! promtool unit tests (a series that fires it and one that does not), every dashboard query
//! parses (promtool), and every metric they name is one a running sluice exports.
//! Needs `promtool` (Debian package `prometheus`, installed by `make test`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn promtool() -> Option<PathBuf> {
    ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn monitoring(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/components/monitoring")
        .join(file)
}

/// The PrometheusRule's groups as a plain Prometheus rule file.
fn rule_groups() -> serde_yaml::Value {
    let text = std::fs::read_to_string(monitoring("prometheusrule.yaml")).expect("rules");
    let rule: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
    let mut out = serde_yaml::Mapping::new();
    out.insert("groups".into(), rule["spec"]["groups"].clone());
    serde_yaml::Value::Mapping(out)
}

fn alert_names(groups: &serde_yaml::Value) -> Vec<String> {
    groups["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect()
}

fn run(tool: &Path, args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn every_alert_fires_on_its_series_and_not_on_the_other() {
    let Some(tool) = promtool() else {
        eprintln!(
            "SKIPPED: promtool is not installed (Debian package prometheus; make test installs it)"
        );
        return;
    };
    let dir = tempdir();
    let groups = rule_groups();
    std::fs::write(
        dir.path().join("rules.yml"),
        serde_yaml::to_string(&groups).expect("yaml"),
    )
    .expect("rules.yml");
    let tests = std::fs::read_to_string(monitoring("alerts.test.yml")).expect("tests");
    std::fs::write(dir.path().join("alerts.test.yml"), &tests).expect("copy");
    let (ok, out) = run(&tool, &["check", "rules", "rules.yml"], dir.path());
    assert!(ok, "promtool check rules: {out}");
    let (ok, out) = run(&tool, &["test", "rules", "alerts.test.yml"], dir.path());
    assert!(ok, "promtool test rules: {out}");
    // every alert is tested, each with a firing expectation
    let parsed: serde_yaml::Value = serde_yaml::from_str(&tests).expect("yaml");
    let tested: Vec<(String, bool)> = parsed["tests"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten())
        .map(|a| {
            (
                a["alertname"].as_str().unwrap_or("").to_string(),
                a["exp_alerts"].as_sequence().is_some_and(|e| !e.is_empty()),
            )
        })
        .collect();
    let names = alert_names(&groups);
    assert!(names.len() >= 9, "{names:?}");
    for n in &names {
        assert!(
            tested.iter().any(|(t, fires)| t == n && *fires),
            "alert {n} has no firing test"
        );
    }
}

#[test]
fn dashboard_queries_parse_and_name_exported_metrics() {
    let text = std::fs::read_to_string(monitoring("dashboard.json")).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard json");
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    assert!(exprs.len() >= 14, "{}", exprs.len());
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for want in [
        "Requests",
        "5xx",
        "Latency",
        "Weights",
        "health",
        "Rate limited",
        "reloads",
        "connections",
        "limits",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no panel about {want}: {titles:?}"
        );
    }
    // every query parses: promtool checks them as recording rules, Grafana's variables
    // replaced by what they stand for
    if let Some(tool) = promtool() {
        let rules: Vec<serde_yaml::Value> = exprs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let e = e
                    .replace("$__rate_interval", "1m")
                    .replace("$__interval", "1m")
                    .replace("$route", ".*");
                let mut m = serde_yaml::Mapping::new();
                m.insert("record".into(), format!("dashboard:panel_{i}").into());
                m.insert("expr".into(), e.into());
                serde_yaml::Value::Mapping(m)
            })
            .collect();
        let doc = serde_yaml::to_string(
            &serde_yaml::from_str::<serde_yaml::Value>(&format!(
                "groups: [{{name: dashboard, rules: {}}}]",
                serde_json::to_string(&rules).expect("json")
            ))
            .expect("yaml"),
        )
        .expect("yaml");
        let dir = tempdir();
        std::fs::write(dir.path().join("dashboard.rules.yml"), doc).expect("write");
        let (ok, out) = run(
            &tool,
            &["check", "rules", "dashboard.rules.yml"],
            dir.path(),
        );
        assert!(ok, "a dashboard query does not parse: {out}");
    } else {
        eprintln!("SKIPPED (parse check): promtool is not installed");
    }
    // and names only metrics sluice exports, as do the alerts
    let exported = running_metric_names();
    let groups = rule_groups();
    let alert_exprs: Vec<String> = groups["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
        .filter_map(|r| r["expr"].as_str().map(String::from))
        .collect();
    let mut used: Vec<String> = exprs
        .iter()
        .chain(&alert_exprs)
        .flat_map(|e| metrics_in(e))
        .collect();
    used.sort();
    used.dedup();
    for m in &used {
        assert!(
            exported.contains(m),
            "{m} is queried but a running sluice does not export it"
        );
    }
}
