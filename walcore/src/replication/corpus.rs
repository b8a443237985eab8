//! Replays the committed seed corpus of the `replication_message` fuzz target as ordinary
//! tests, with the target's own property (`fuzz.rs`), plus what the real seeds must give.
//!
//! Seeds named `pg15-*` are real bytes a PostgreSQL 15 server sent (captured through a relay on
//! its Unix socket, for psql, pg_basebackup and pg_receivewal): each parses completely.
//! `pg15-base-backup-short` is a whole BASE_BACKUP reply with most CopyData messages left out
//! (every message is as the server sent it). Seeds named `invalid-*` must fail.

use super::basebackup::BackupEvent;
use super::fuzz::{base_backup_property, message_stream_property, replication_message_property};
use super::message::{BackendMessage, BytesMut, parse_backend};
use crate::pg::corpus::corpus_files;

#[test]
fn replication_message_corpus() {
    for (file, data) in corpus_files("replication_message") {
        replication_message_property(&data);
        let messages = message_stream_property(&data);
        let mut encoded = BytesMut::new();
        for m in &messages {
            m.encode(&mut encoded);
        }
        if file.starts_with("invalid-") {
            assert!(
                encoded.len() < data.len() && parse_backend(&data[encoded.len()..]).is_err(),
                "{file} must fail"
            );
        } else {
            assert_eq!(encoded.len(), data.len(), "{file} must parse completely");
        }
    }
}

#[test]
fn real_base_backup_reply_decodes() {
    let data = corpus_files("replication_message")
        .into_iter()
        .find(|(f, _)| f == "pg15-base-backup-short")
        .map(|(_, d)| d)
        .expect("seed pg15-base-backup-short");
    let events = base_backup_property(&message_stream_property(&data));
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            BackupEvent::Started { .. } => "started",
            BackupEvent::Archive { .. } => "archive",
            BackupEvent::Data(_) => "data",
            BackupEvent::Manifest => "manifest",
            BackupEvent::Progress(_) => "progress",
            BackupEvent::Finished { .. } => "finished",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "started", "archive", "data", "data", "progress", "manifest", "data", "finished"
        ]
    );
    let BackupEvent::Started {
        start_lsn,
        tablespaces,
        ..
    } = &events[0]
    else {
        panic!("{:?}", events[0])
    };
    assert!(start_lsn.is_valid());
    assert_eq!(tablespaces.len(), 1);
    assert_eq!(tablespaces[0].oid, None);
    assert!(
        tablespaces[0].size_kib.is_some(),
        "the capture used PROGRESS"
    );
    assert_eq!(
        events[1],
        BackupEvent::Archive {
            name: "base.tar".into(),
            location: None
        }
    );
    // The main archive starts with backup_label's tar header.
    let BackupEvent::Data(first) = &events[2] else {
        panic!()
    };
    assert!(first.starts_with(b"backup_label\0"));
    let BackupEvent::Data(manifest) = &events[6] else {
        panic!()
    };
    assert!(manifest.starts_with(b"{ \"PostgreSQL-Backup-Manifest-Version\": 1,"));
    let BackupEvent::Finished { end_lsn, .. } = &events[7] else {
        panic!()
    };
    assert!(*end_lsn > *start_lsn);
}

#[test]
fn real_start_replication_reply_has_copy_both() {
    let data = corpus_files("replication_message")
        .into_iter()
        .find(|(f, _)| f == "pg15-start-replication")
        .map(|(_, d)| d)
        .expect("seed pg15-start-replication");
    let messages = message_stream_property(&data);
    assert!(matches!(messages[0], BackendMessage::CopyBothResponse(_)));
    assert!(matches!(&messages[1], BackendMessage::CopyData(d) if d.first() == Some(&b'w')));
}
