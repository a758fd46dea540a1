//! deploy/: both Kustomize overlays render offline (`kubectl kustomize`) and say what sluice
//! needs: probes on admin paths that exist, a grace period longer than preStop + drain +
//! grace, the ConfigMap mounted as a directory (so hot reload sees kubelet's symlink swap), a
//! config that `sluice check` accepts, hardening, and alert rules that only use metric names
//! a running sluice exports. Skipped, saying so, where kubectl is not installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_yaml::Value;

fn kubectl() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
}

/// `kubectl kustomize deploy/<dir>`: every document.
fn render(kubectl: &Path, dir: &str) -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(dir);
    let out = Command::new(kubectl)
        .args(["kustomize"])
        .arg(&root)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml document"))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn secs(v: &toml::Value) -> u64 {
    let s = v.as_str().expect("duration string");
    humantime::parse_duration(s).expect("duration").as_secs()
}

#[test]
fn overlays_render_what_sluice_needs() {
    let Some(kubectl) = kubectl() else {
        eprintln!("SKIPPED: kubectl is not installed (make test installs it with apt when it can)");
        return;
    };
    // the example application's headless Services, which the pools name
    let app = render(&kubectl, "example-app");
    for overlay in ["staging", "production"] {
        let docs = render(&kubectl, &format!("overlays/{overlay}"));
        let dep = find(&docs, "Deployment", "sluice");
        let pod = &dep["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert!(dep["spec"]["replicas"].as_u64() >= Some(2), "{overlay}");

        // the config sluice runs with, from the ConfigMap
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let config_path = Path::new(args[args.iter().position(|a| *a == "-c").expect("-c") + 1]);
        let cm = find(&docs, "ConfigMap", "sluice-config");
        let file = config_path
            .file_name()
            .and_then(|f| f.to_str())
            .expect("name");
        let text = cm["data"][file].as_str().expect("config in the ConfigMap");
        let config: toml::Value = toml::from_str(text).expect("toml");

        // every pool backend is a headless Service's name (one record per ready pod)
        for pool in config["pool"].as_array().expect("pools") {
            for b in pool["backends"].as_array().expect("backends") {
                let b = b.as_str().expect("backend");
                let (host, port) = b.rsplit_once(':').expect("name:port");
                let mut labels = host.trim_end_matches('.').split('.');
                let (name, ns) = (labels.next().expect("name"), labels.next().expect("ns"));
                assert!(
                    host.ends_with(".svc.cluster.local."),
                    "{overlay}: {b} is not a Service name"
                );
                let svc = find(&app, "Service", name);
                assert_eq!(svc["metadata"]["namespace"].as_str(), Some(ns), "{b}");
                assert_eq!(
                    svc["spec"]["clusterIP"].as_str(),
                    Some("None"),
                    "{b}: not headless"
                );
                assert!(svc["spec"]["ports"]
                    .as_sequence()
                    .is_some_and(|p| p.iter().any(|p| p["port"]
                        .as_u64()
                        .map(|x| x.to_string())
                        .as_deref()
                        == Some(port))));
            }
        }

        // fleet mode: every replica shares weights, shifts and limits through Redis
        let cluster = &config["cluster"];
        assert_eq!(
            config["rate_limit"]["scope"].as_str(),
            Some("cluster"),
            "{overlay}"
        );
        let env = c["env"].as_sequence().expect("env");
        if overlay == "production" {
            // the URL and the password come from the Secret sluice-redis
            let url = env
                .iter()
                .find(|e| e["name"] == "SLUICE_CLUSTER_REDIS")
                .expect("SLUICE_CLUSTER_REDIS");
            assert_eq!(url["valueFrom"]["secretKeyRef"]["name"], "sluice-redis");
            let pw = Path::new(cluster["password_file"].as_str().expect("password_file"));
            let vol = pod["volumes"]
                .as_sequence()
                .expect("volumes")
                .iter()
                .find(|v| v["secret"]["secretName"] == "sluice-redis")
                .expect("redis secret volume");
            let m = c["volumeMounts"]
                .as_sequence()
                .expect("mounts")
                .iter()
                .find(|m| m["name"] == vol["name"])
                .expect("redis secret mount");
            assert_eq!(m["mountPath"].as_str().map(Path::new), pw.parent());
            assert!(
                m.get("subPath").is_none(),
                "subPath hides a rotated password"
            );
        } else {
            // staging: the redis component, with a volume, behind the Service the URL names
            let url = cluster["redis"].as_str().expect("redis");
            let host = url
                .trim_start_matches("redis://")
                .split(':')
                .next()
                .expect("host");
            let svc = find(&docs, "Service", host);
            assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(6379));
            let sts = find(&docs, "StatefulSet", "redis");
            assert!(sts["spec"]["volumeClaimTemplates"]
                .as_sequence()
                .is_some_and(|v| !v.is_empty()));
        }

        // the ConfigMap is mounted as the config's directory, never with subPath
        let volume = pod["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["configMap"]["name"] == "sluice-config")
            .expect("config volume");
        let mount = c["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .find(|m| m["name"] == volume["name"])
            .expect("config mount");
        assert_eq!(
            mount["mountPath"].as_str().map(Path::new),
            config_path.parent(),
            "{overlay}"
        );
        assert!(
            mount.get("subPath").is_none(),
            "{overlay}: subPath hides updates"
        );

        // probes: admin paths that exist, on the admin port of the config
        let admin_port: u16 = config["admin"]["listen"]
            .as_str()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .expect("admin port");
        let port_of = |name: &str| -> u64 {
            c["ports"]
                .as_sequence()
                .expect("ports")
                .iter()
                .find(|p| p["name"] == name)
                .and_then(|p| p["containerPort"].as_u64())
                .expect("port")
        };
        assert_eq!(port_of("admin"), u64::from(admin_port));
        for (probe, path) in [
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ] {
            assert_eq!(c[probe]["httpGet"]["path"], path, "{overlay} {probe}");
            assert_eq!(c[probe]["httpGet"]["port"], "admin", "{overlay} {probe}");
        }

        // the pod is killed only after preStop, drain and grace
        let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .expect("preStop sleep");
        let drain = secs(&config["server"]["drain_delay"]);
        let grace = secs(&config["server"]["grace_period"]);
        let termination = pod["terminationGracePeriodSeconds"].as_u64().expect("tgps");
        assert!(
            termination > pre_stop + drain + grace,
            "{overlay}: terminationGracePeriodSeconds {termination} <= {pre_stop} + {drain} + {grace}"
        );

        // hardening
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert!(c["resources"]["requests"]["cpu"].as_str().is_some());
        assert!(c["resources"]["limits"]["memory"].as_str().is_some());
        assert_eq!(
            pod["topologySpreadConstraints"][0]["topologyKey"],
            "topology.kubernetes.io/zone"
        );

        // services, autoscaling, disruption budget, admin port behind a policy
        assert_eq!(
            find(&docs, "Service", "sluice")["spec"]["type"],
            "LoadBalancer"
        );
        let admin = find(&docs, "Service", "sluice-admin");
        assert_eq!(admin["spec"]["type"], "ClusterIP");
        assert_eq!(
            admin["spec"]["ports"][0]["port"].as_u64(),
            Some(u64::from(admin_port))
        );
        let hpa = find(&docs, "HorizontalPodAutoscaler", "sluice");
        let targets: Vec<(String, u64)> = hpa["spec"]["metrics"]
            .as_sequence()
            .expect("metrics")
            .iter()
            .map(|m| {
                (
                    m["resource"]["name"].as_str().unwrap_or("").to_string(),
                    m["resource"]["target"]["averageUtilization"]
                        .as_u64()
                        .unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(
            targets,
            [("cpu".to_string(), 70), ("memory".to_string(), 80)]
        );
        assert!(
            find(&docs, "PodDisruptionBudget", "sluice")["spec"]["minAvailable"]
                .as_u64()
                .is_some()
        );
        let np = find(&docs, "NetworkPolicy", "sluice");
        let admin_rule = np["spec"]["ingress"]
            .as_sequence()
            .expect("ingress")
            .iter()
            .find(|r| r["ports"][0]["port"].as_u64() == Some(u64::from(admin_port)))
            .expect("a rule for the admin port");
        assert!(admin_rule["from"]
            .as_sequence()
            .is_some_and(|f| !f.is_empty()));

        // the config itself passes `sluice check` (its secrets replaced by test files)
        check_config(text);
    }

    // production carries the monitoring component; its alerts use metrics sluice exports
    let docs = render(&kubectl, "overlays/production");
    assert!(docs.iter().any(|d| d["kind"] == "ServiceMonitor"));
    let rule = find(&docs, "PrometheusRule", "sluice");
    let exprs: Vec<String> = rule["spec"]["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter_map(|r| r["expr"].as_str().map(String::from))
        .collect();
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for want in [
        "SluiceBackendEjected",
        "SluiceConfigReloadFailing",
        "SluiceShiftRolledBack",
        "SluiceHigh5xxRatio",
        "SluiceRateLimitSurge",
    ] {
        assert!(alerts.contains(&want), "no alert {want}: {alerts:?}");
    }
    let exported = running_metric_names();
    let mut names: Vec<String> = exprs.iter().flat_map(|e| metrics_in(e)).collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 6, "{names:?}");
    for n in &names {
        assert!(
            exported.iter().any(|e| e == n),
            "alert uses {n}, which sluice does not export"
        );
    }
}

/// `sluice check` on a config, with its certificate and token files made up in a temp dir.
fn check_config(text: &str) {
    let dir = tempdir();
    let ca = Ca::new(dir.path(), "deploy");
    let (cert, key) = ca.issue(dir.path(), "tls", &["shop.example.com"]);
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "t0ken\n").expect("token");
    let state = dir.path().join("state");
    let redis_password = dir.path().join("redis.password");
    std::fs::write(&redis_password, "secret\n").expect("password");
    let text = text
        .replace(
            "/var/run/secrets/sluice/tls/tls.crt",
            &cert.display().to_string(),
        )
        .replace(
            "/var/run/secrets/sluice/tls/tls.key",
            &key.display().to_string(),
        )
        .replace(
            "/var/run/secrets/sluice/admin/admin.token",
            &token.display().to_string(),
        )
        .replace(
            "/var/run/secrets/sluice/redis/password",
            &redis_password.display().to_string(),
        )
        .replace("/var/lib/sluice", &state.display().to_string());
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, text).expect("config");
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("sluice check");
    assert!(
        out.status.success(),
        "the deploy config fails `sluice check`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn set_weights_reaches_every_ready_pod() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIPPED: curl is not installed (deploy/set-weights.sh uses it)");
        return;
    }
    let dir = tempdir();
    std::fs::write(dir.path().join("admin.token"), "pod-token\n").expect("token");
    let backend = Backend::start(dir.path(), "app");
    let pods: Vec<Sluice> = (0..3)
        .map(|i| {
            let d = dir.path().join(format!("pod-{i}"));
            std::fs::create_dir_all(&d).expect("dir");
            std::fs::copy(dir.path().join("admin.token"), d.join("admin.token")).expect("copy");
            Sluice::start(
                &d,
                &format!(
                    r#"[admin]
listen = "{{admin}}"
token_file = "admin.token"
[[listener]]
listen = "{}"
[[pool]]
name = "b"
backends = ["{}"]
[[pool]]
name = "g"
backends = ["{}"]
[[route]]
name = "shop"
hosts = ["*"]
blue = ["b"]
green = ["g"]
"#,
                    free_addr(),
                    backend.addr,
                    backend.addr
                ),
            )
        })
        .collect();
    let fake = dir.path().join("kubectl");
    std::fs::write(
        &fake,
        format!(
            r#"#!/usr/bin/env bash
case "$*" in
  *"get secret"*) printf %s "$(printf 'pod-token\n' | base64)" ;;
  *"get pods"*) printf 'sluice-a True\nsluice-b True\nsluice-c False\n' ;;
  *"port-forward pod/sluice-a"*) echo "Forwarding from 127.0.0.1:{} -> 9900"; exec sleep 30 ;;
  *"port-forward pod/sluice-b"*) echo "Forwarding from 127.0.0.1:{} -> 9900"; exec sleep 30 ;;
  *) echo "unexpected: kubectl $*" >&2; exit 1 ;;
esac
"#,
            pods[0].admin.port(),
            pods[1].admin.port()
        ),
    )
    .expect("fake kubectl");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/set-weights.sh");
    let run = |args: &[&str]| {
        Command::new(&script)
            .args(args)
            .env("KUBECTL", &fake)
            .env_remove("SLUICE_ADMIN_TOKEN")
            .output()
            .expect("set-weights.sh")
    };
    let out = run(&["-n", "apps", "shop", "70", "30"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sluice-a: 200") && stdout.contains("sluice-b: 200"),
        "{stdout}"
    );
    assert!(!stdout.contains("sluice-c"), "{stdout}");
    let green = |s: &Sluice| -> u64 {
        let (_, body) = s.admin_get("/routes/shop").expect("route");
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["weights"]["green"]
            .as_u64()
            .expect("green")
    };
    assert_eq!(
        (green(&pods[0]), green(&pods[1]), green(&pods[2])),
        (30, 30, 0)
    );
    // a refusal on the pods fails the run; bad weights never reach them
    let out = run(&["nope", "70", "30"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sluice-a: 404"));
    assert_eq!(run(&["shop", "70", "40"]).status.code(), Some(2));
    assert_eq!(green(&pods[0]), 30);
}
