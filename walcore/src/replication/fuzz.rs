//! The property the `replication_message` fuzz target in `fuzz/` checks, here so that the target
//! and the corpus replay tests (`corpus.rs`) run the very same code. Not part of the stable API.

use super::basebackup::{
    BackupEvent, BackupProtocolError, BaseBackupDecoder, Phase, ReplyFormat, parse_copy_message,
};
use super::message::{BackendMessage, BytesMut, HEADER_LEN, parse_backend, take_backend};

/// The property of `fuzz/fuzz_targets/replication_message.rs`: [`message_stream_property`],
/// then [`base_backup_property`] over the messages.
pub fn replication_message_property(data: &[u8]) {
    let messages = message_stream_property(data);
    base_backup_property(&messages);
    wal_stream_property(&messages);
}

/// The streaming half: every CopyData payload parses as a WAL stream message or fails
/// cleanly, and WAL data keeps every byte after its 25-byte header.
pub fn wal_stream_property(messages: &[BackendMessage]) {
    use super::stream::{ServerMessage, parse_server};
    for m in messages {
        if let BackendMessage::CopyData(payload) = m
            && let Ok(ServerMessage::XLogData { data, .. }) = parse_server(payload.clone())
        {
            assert_eq!(data.len() + 25, payload.len());
        }
    }
}

/// The message half of the property: parse messages one after
/// another; the slice parser and the splitting parser agree; every message re-encodes to
/// the bytes it came from (or, when an error text was not UTF-8, to bytes that parse back
/// to the same message); and parsing stops at an error or a partial message, never a panic.
pub fn message_stream_property(data: &[u8]) -> Vec<BackendMessage> {
    let mut messages = Vec::new();
    let mut pos = 0;
    let mut split = BytesMut::from(data);
    loop {
        let sliced = parse_backend(&data[pos..]);
        let before = split.clone();
        let taken = take_backend(&mut split);
        match (sliced, taken) {
            (Ok(Some((message, used))), Ok(Some(same))) => {
                assert_eq!(message, same);
                assert!(used >= HEADER_LEN && used <= data.len() - pos);
                let mut encoded = BytesMut::new();
                message.encode(&mut encoded);
                if encoded[..] != data[pos..pos + used] {
                    assert!(
                        matches!(
                            message,
                            BackendMessage::ErrorResponse(_) | BackendMessage::NoticeResponse(_)
                        ),
                        "{message:?} re-encodes differently"
                    );
                }
                let again = parse_backend(&encoded).expect("re-encoded message parses");
                assert_eq!(again, Some((message.clone(), encoded.len())));
                messages.push(message);
                pos += used;
            }
            (Ok(None), Ok(None)) => {
                assert_eq!(split, before, "need-more must not consume");
                break;
            }
            (Err(a), Err(b)) => {
                assert_eq!(a, b);
                assert_eq!(split, before, "an error must not consume");
                assert!(a.offset <= (data.len() - pos) as u64);
                break;
            }
            (a, b) => panic!("parsers disagree: {a:?} vs {b:?}"),
        }
    }
    messages
}

/// The base backup half of the property: every CopyData payload parses as a base backup message
/// or fails cleanly (and re-encodes exactly when it parses), and the whole sequence fed to the
/// BASE_BACKUP decoder of either reply format (PostgreSQL 15+, and 13/14) never panics and ends
/// it on the first error. Returns the 15+ decoder's events.
pub fn base_backup_property(messages: &[BackendMessage]) -> Vec<BackupEvent> {
    for m in messages {
        if let BackendMessage::CopyData(data) = m
            && let Ok(parsed) = parse_copy_message(data.clone())
        {
            assert_eq!(parsed.encode(), *data);
        }
    }
    base_backup_property_for(ReplyFormat::Pg13, messages);
    base_backup_property_for(ReplyFormat::Pg15, messages)
}

/// The messages fed to a decoder of `format`: events until the first error, which leaves the
/// decoder done (and refusing anything more); never a panic.
pub fn base_backup_property_for(
    format: ReplyFormat,
    messages: &[BackendMessage],
) -> Vec<BackupEvent> {
    let mut decoder = BaseBackupDecoder::with_format(format);
    let mut events = Vec::new();
    for m in messages {
        match decoder.feed(m.clone()) {
            Ok(Some(event)) => events.push(event),
            Ok(None) => {}
            Err(_) => {
                assert_eq!(decoder.phase(), Phase::Done);
                assert_eq!(decoder.feed(m.clone()), Err(BackupProtocolError::AfterEnd));
                break;
            }
        }
    }
    events
}
