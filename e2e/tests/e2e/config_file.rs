//! The configuration file carries the store's settings and secrets. A cluster archives into
//! S3 (the emulator) with nothing in its environment but `WALCORE_CONFIG`; `walcore restore`
//! writes a `restore_command` that names the file, so the restored server recovers to its
//! target with an empty environment; a file that holds a secret and that others may read is
//! refused; `walcore config` says where each setting came from and never shows a secret.

use std::time::Duration;

use walcore_e2e::repo::KEY_1;
use walcore_e2e::workload::{create_table, fingerprint, insert_batch};
use walcore_e2e::{Cluster, Moto, Repo, moto, sys};

use crate::backup::{Tool, restore_into_new};
use crate::scenario::{self, ARCHIVE_WAIT, assert_promoted};

/// The S3 secret the file holds; nothing may print it.
const SECRET: &str = "S3CR3T-e2e-77ZqK";

#[test]
fn an_s3_restore_recovers_with_nothing_but_the_configuration_file() {
    if !moto::s3_enabled(
        "config_file::an_s3_restore_recovers_with_nothing_but_the_configuration_file",
    ) {
        return;
    }
    let moto = Moto::shared();
    let repo = Repo::s3(moto);
    let dir = sys::server_tempdir("walcore-config");
    let path = dir.path().join("walcore.toml");
    std::fs::write(
        &path,
        format!(
            "repo = \"{}\"\nencryption_key = \"{KEY_1}\"\nretry_time = \"10s\"\n\n\
             [s3]\naccess_key_id = \"test\"\nsecret_access_key = \"{SECRET}\"\n\
             region = \"us-east-1\"\nendpoint = \"{}\"\nallow_http = true\n",
            repo.url(),
            moto.endpoint()
        ),
    )
    .expect("write the configuration file");
    sys::give_to_server_user(&path, 0o600);
    let config = path.display().to_string();
    // PostgreSQL's environment: the file's name, nothing else (the harness clears the rest).
    let env = vec![("WALCORE_CONFIG".to_string(), config.clone())];
    let src = Cluster::archiving_into(&env);
    create_table(&src);
    insert_batch(&src, "A", 2_000);
    let tool = Tool::walcore(&src, env.clone());
    tool.take(&src, &[]);
    insert_batch(&src, "B", 2_000);
    std::thread::sleep(Duration::from_millis(1100));
    let target = src.psql("select now()");
    let want = fingerprint(&src);
    std::thread::sleep(Duration::from_millis(1100));
    insert_batch(&src, "C", 2_000);
    src.archive_all(ARCHIVE_WAIT);

    // The restore's restore_command names the file, and the server starts with nothing else.
    let mut dst = restore_into_new(&tool, &["--target-time", &target]);
    let written = std::fs::read_to_string(dst.data.join("postgresql.auto.conf")).expect("conf");
    assert!(
        written.contains(&format!("WALCORE_CONFIG={config}")) && !written.contains(SECRET),
        "{written}"
    );
    dst.set("unix_socket_directories", &dst.sock.to_string_lossy());
    dst.set("archive_mode", "off");
    dst.set_env(&[]);
    let outcome = scenario::run_recovery(&dst);
    assert_promoted(&dst, outcome, "a restore from S3 with an empty environment");
    assert_eq!(fingerprint(&dst), want, "rows at the target");

    // walcore config: where each setting came from, no secret.
    let shown = tool.ok(&["config"]);
    assert!(
        shown.contains("s3.secret_access_key")
            && shown.contains("<redacted>")
            && shown.contains(&format!("endpoint in [s3] of {config}")),
        "{shown}"
    );
    assert!(
        !shown.contains(SECRET) && !shown.contains(KEY_1),
        "walcore config printed a secret:\n{shown}"
    );
    let json = tool.ok(&["config", "--json"]);
    assert!(!json.contains(SECRET) && !json.contains(KEY_1), "{json}");

    // Readable by others: refused, naming the file and its mode; nothing of it is printed.
    sys::give_to_server_user(&path, 0o644);
    let out = tool.run(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains(&config) && out.stderr.contains("0644"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains(SECRET) && !out.stdout.contains(SECRET));
}
