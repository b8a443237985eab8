//! What `deploy/` ships: the systemd units pass `systemd-analyze verify`, the Kubernetes
//! manifests parse, and every walcore command line in them is one the built `walcore` accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

use walcore_e2e::bins::{self, WALCORE};
use walcore_e2e::{moto, sys};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The arguments of a command line as systemd splits it (words; double quotes group).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// Asserts that the built walcore parses `args` (the parse ends at the `--help` put last).
fn walcore_accepts(args: &[String], whence: &str) {
    let out = Command::new(bins::bin(WALCORE))
        .args(args)
        .arg("--help")
        .output()
        .expect("walcore");
    assert!(
        out.status.success(),
        "{whence}: walcore {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_systemd_units_verify_and_their_commands_parse() {
    let dir = tempfile::tempdir().expect("temp dir");
    let walcore = bins::bin(WALCORE);
    let mut units = Vec::new();
    for entry in std::fs::read_dir(deploy().join("systemd")).expect("deploy/systemd") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("unit");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("ExecStart=/usr/bin/walcore ") {
                walcore_accepts(&words(rest), &name);
            }
        }
        // systemd-analyze checks that the programs exist: the built one stands in for the
        // installed one.
        let text = text.replace("/usr/bin/walcore", &walcore.display().to_string());
        std::fs::write(dir.path().join(&name), text).expect("copy");
        units.push(name);
    }
    assert!(units.len() >= 10, "{units:?}");
    let out = sys::run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(&units)
            .current_dir(dir.path()),
        std::time::Duration::from_secs(60),
    );
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

#[test]
fn the_kubernetes_manifests_parse_and_their_commands_parse() {
    // The S3 emulator's virtualenv has PyYAML (moto needs it).
    let python = moto::find_moto()
        .and_then(|m| Some(m.parent()?.join("python3")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"));
    let script = r#"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
out = []
for d in docs:
    assert d.get("apiVersion") and d.get("kind") and d["metadata"]["name"], d
    if d["kind"] == "CronJob":
        spec = d["spec"]
        fields = spec["schedule"].split()
        assert len(fields) == 5, spec["schedule"]
        for c in spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
            out.append({"job": d["metadata"]["name"], "schedule": spec["schedule"],
                        "zone": spec.get("timeZone"), "args": c["args"]})
print(json.dumps(out))
"#;
    let manifest = deploy().join("kubernetes/cronjobs.yaml");
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(&manifest)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}: {}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let jobs = jobs.as_array().expect("jobs");
    assert!(jobs.len() >= 2, "{jobs:?}");
    let take = jobs
        .iter()
        .find(|j| j["job"] == "walcore-take")
        .expect("a take CronJob");
    assert_eq!(take["schedule"], "0 3 * * *", "daily at 03:00");
    assert_eq!(take["zone"], "Etc/UTC");
    for job in jobs {
        let args: Vec<String> = job["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("a string").to_owned())
            .collect();
        walcore_accepts(&args, job["job"].as_str().unwrap_or("?"));
    }
}

/// The metric names a text holds (`walcore_…`).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("walcore_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

#[test]
fn the_grafana_dashboard_parses_and_shows_only_metrics_walcore_exports() {
    let path = deploy().join("grafana/walcore-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("json");
    let exported = metric_names(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../walcore/src/lifecycle/metrics.rs"),
        )
        .expect("metrics.rs"),
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "{} panels", panels.len());
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{panel}");
        for t in targets {
            let expr = t["expr"].as_str().expect("an expression");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                assert!(
                    exported.contains(&name),
                    "{name} in {expr} is not a walcore metric"
                );
            }
        }
    }
}
