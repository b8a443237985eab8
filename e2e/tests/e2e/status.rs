//! `walcore status` on real repositories written by real PostgreSQL: the newest archived
//! segment and backup, the restorable window, the WAL per timeline and the last verify, each
//! checked against what the server and the other commands say; then a lost segment inside the
//! window shows as a gap with its consequence, and the verify that finds it as damage.

use walcore_e2e::repo::{Codec, KEY_1, wal_key};
use walcore_e2e::workload::{create_table, insert_batch};
use walcore_e2e::{Cluster, Moto, Repo, moto};

use crate::backup::Tool;
use crate::scenario::ARCHIVE_WAIT;

#[test]
fn status_tells_the_window_and_a_lost_segment_on_file() {
    status_cycle(&Repo::file());
}

#[test]
fn status_tells_the_window_and_a_lost_segment_on_s3() {
    if !moto::s3_enabled("status::status_tells_the_window_and_a_lost_segment_on_s3") {
        return;
    }
    status_cycle(&Repo::s3(Moto::shared()));
}

fn status(tool: &Tool) -> serde_json::Value {
    serde_json::from_str(&tool.ok(&["status", "--json"])).expect("status --json")
}

fn status_cycle(repo: &Repo) {
    let codec = Codec::encrypted(KEY_1);
    let env = repo.env(&codec);
    let src = Cluster::archiving_into(&env);
    create_table(&src);
    insert_batch(&src, "pre", 500);
    let mut tool = Tool::new(&src, env.clone());
    tool.program = src.install(walcore_e2e::bins::WALCORE);
    let first = src.switch_wal();
    src.wait_archived(&first, ARCHIVE_WAIT);

    // Archived WAL, no backup yet: nothing is restorable, and status says so.
    let s = status(&tool);
    assert!(s["last_backup"].is_null(), "{s:#}");
    assert!(s["window"].is_null(), "{s:#}");
    assert!(s["last_verify"].is_null(), "{s:#}");
    let system_id = src
        .psql("SELECT system_identifier FROM pg_control_system()")
        .trim()
        .to_owned();
    assert_eq!(s["repository"]["system_identifier"], system_id.as_str());
    assert_eq!(s["repository"]["encrypted"], true);
    assert!(s["repository"]["key_fingerprint"].is_string(), "{s:#}");
    assert!(
        s["last_archived"]["segment"].as_str() >= Some(first.as_str()),
        "{s:#}"
    );

    // A backup, then six segments after it.
    let b1 = tool.take(&src, &[]);
    let after: Vec<String> = (0..6)
        .map(|i| {
            insert_batch(&src, &format!("a{i}"), 200);
            src.switch_wal()
        })
        .collect();
    let newest = after.last().expect("segments").clone();
    src.wait_archived(&newest, ARCHIVE_WAIT);
    let show: serde_json::Value =
        serde_json::from_str(&tool.ok(&["show", &b1, "--json"])).expect("show --json");
    let s = status(&tool);
    assert_eq!(s["backups"], 1, "{s:#}");
    assert_eq!(s["last_backup"]["id"], b1.as_str(), "{s:#}");
    assert_eq!(s["last_backup"]["stop_time"], show["stop_time"], "{s:#}");
    assert!(
        s["last_backup"]["age_seconds"].as_u64() < Some(600),
        "{s:#}"
    );
    assert!(s["bytes"]["backups"].as_u64() > Some(0), "{s:#}");
    assert!(s["bytes"]["wal"].as_u64() > Some(0), "{s:#}");
    let last = s["last_archived"]["segment"]
        .as_str()
        .expect("last archived");
    assert!(last >= newest.as_str(), "{last} before {newest}");
    let w = &s["window"];
    assert_eq!(w["from_backup"], b1.as_str(), "{s:#}");
    assert_eq!(w["earliest"], show["stop_time"], "{s:#}");
    assert_eq!(w["last_segment"], last, "{s:#}");
    assert_eq!(w["latest"], s["last_archived"]["stored_at"], "{s:#}");
    assert_eq!(w["gaps"].as_array().map(Vec::len), Some(0), "{s:#}");
    assert_eq!(s["timelines"][0]["holes_total"], 0, "{s:#}");

    // A clean verify shows as such.
    tool.ok(&["verify", "--json"]);
    let s = status(&tool);
    assert_eq!(s["last_verify"]["problems"], 0, "{s:#}");
    assert_eq!(s["last_verify"]["damage"], 0, "{s:#}");
    assert!(s["last_verify"]["time"].is_string(), "{s:#}");

    // A segment lost inside the window: a gap, with what it costs, and a hole in timeline 1.
    let lost = &after[2];
    repo.remove(&wal_key(lost));
    let s = status(&tool);
    let gaps = s["window"]["gaps"].as_array().expect("gaps");
    assert_eq!(gaps.len(), 1, "{s:#}");
    assert_eq!(gaps[0]["first"], lost.as_str(), "{s:#}");
    assert_eq!(gaps[0]["segments"], 1, "{s:#}");
    assert!(
        gaps[0]["consequence"]
            .as_str()
            .is_some_and(|c| c.contains("no point-in-time recovery after")),
        "{s:#}"
    );
    assert_eq!(s["timelines"][0]["holes_total"], 1, "{s:#}");
    assert_eq!(s["timelines"][0]["holes"][0]["first"], lost.as_str());
    let text = tool.ok(&["status"]);
    assert!(
        text.contains("1 GAP(S)") && text.contains(lost.as_str()),
        "{text}"
    );

    // The verify that finds it is remembered as damage.
    let out = tool.run(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(5), "{}", out.stdout);
    let s = status(&tool);
    assert!(s["last_verify"]["damage"].as_u64() >= Some(1), "{s:#}");
}
