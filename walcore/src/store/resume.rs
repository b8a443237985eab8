//! Resuming a download whose body was cut: the bookkeeping, without I/O.
//!
//! A download hands on bytes in order. When its body is cut (a reset connection, a read that
//! waited longer than the request limit, a transient error), the rest is asked for again from
//! the first byte not yet handed on, pinned to the object the first answer described (its
//! ETag, sent as `If-Match`; its version when the store gives no ETag): a replaced object is
//! an error, never a splice of two objects. Attempts are bounded by the retry window counted
//! from the last byte that arrived, not from the start of the download, so a long download may
//! be cut and resumed any number of times while it moves.
//!
//! [`Resume`] decides; the remote store's download stream (`remote.rs`) asks and waits.

use std::time::{Duration, Instant};

use object_store::{GetOptions, GetRange, ObjectMeta};

use super::StoreError;

/// First pause before asking again after a cut; doubled after each failed attempt.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest pause between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// The state of one download: where it stands, what pins the object, how long it may wait.
#[derive(Debug, Clone)]
pub(crate) struct Resume {
    key: String,
    /// Bytes handed on so far (the next byte wanted).
    offset: u64,
    /// The object's size, from the first answer.
    size: u64,
    /// The object's ETag from the first answer, sent as `If-Match` when resuming.
    e_tag: Option<String>,
    /// The object's version from the first answer, asked for when there is no ETag.
    version: Option<String>,
    /// When the last byte arrived (or the download started).
    last_progress: Instant,
    /// How long attempts to resume may go on after the last progress.
    window: Duration,
    /// The pause before the next attempt.
    delay: Duration,
    /// Attempts to resume since the last progress.
    attempts: u32,
    /// Times the download was resumed in all.
    resumed: u32,
}

impl Resume {
    /// A download of `key` whose first answer described `meta`, starting at `now`.
    pub(crate) fn new(key: &str, meta: &ObjectMeta, window: Duration, now: Instant) -> Resume {
        Resume {
            key: key.to_string(),
            offset: 0,
            size: meta.size,
            e_tag: meta.e_tag.clone(),
            version: meta.version.clone(),
            last_progress: now,
            window,
            delay: FIRST_DELAY,
            attempts: 0,
            resumed: 0,
        }
    }

    /// `n` more bytes arrived at `now`. More bytes than the object holds is an error.
    pub(crate) fn progressed(&mut self, n: usize, now: Instant) -> Result<(), StoreError> {
        self.offset = self.offset.saturating_add(n as u64);
        if self.offset > self.size {
            return Err(StoreError::Permanent(format!(
                "the download of {} gave {} bytes, but the object holds {}",
                self.key, self.offset, self.size
            )));
        }
        if n > 0 {
            self.last_progress = now;
            self.delay = FIRST_DELAY;
            self.attempts = 0;
        }
        Ok(())
    }

    /// Every byte of the object was handed on.
    pub(crate) fn complete(&self) -> bool {
        self.offset == self.size
    }

    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Times the download was resumed so far.
    pub(crate) fn resumed(&self) -> u32 {
        self.resumed
    }

    /// The body was cut (or an attempt to resume failed) at `now`, because of `cause`: how long
    /// to wait before asking for the rest, or the error to give up with, when the object cannot
    /// be pinned or the retry window since the last progress would be over before the next
    /// attempt.
    pub(crate) fn after_cut(&mut self, now: Instant, cause: &str) -> Result<Duration, StoreError> {
        if self.e_tag.is_none() && self.version.is_none() {
            return Err(StoreError::Unavailable(format!(
                "the download of {} was cut at byte {} of {} ({cause}), and the store gave \
                 neither an ETag nor a version to resume it from the same object",
                self.key, self.offset, self.size
            )));
        }
        let idle = now.saturating_duration_since(self.last_progress);
        if idle + self.delay >= self.window {
            return Err(StoreError::Unavailable(format!(
                "the download of {} stopped at byte {} of {} and could not be resumed: no byte \
                 arrived for {:.1}s after {} attempt(s) (WALCORE_RETRY_TIME is {:.1}s); last \
                 cause: {cause}",
                self.key,
                self.offset,
                self.size,
                idle.as_secs_f64(),
                self.attempts,
                self.window.as_secs_f64()
            )));
        }
        let wait = self.delay;
        self.delay = (self.delay * 2).min(MAX_DELAY);
        self.attempts += 1;
        Ok(wait)
    }

    /// Time left in the retry window at `now`: the longest one attempt to resume may take.
    pub(crate) fn time_left(&self, now: Instant) -> Duration {
        self.window
            .saturating_sub(now.saturating_duration_since(self.last_progress))
    }

    /// The request for the rest of the object: from the next byte, of the same object.
    pub(crate) fn options(&self) -> GetOptions {
        GetOptions {
            range: Some(GetRange::Offset(self.offset)),
            if_match: self.e_tag.clone(),
            // Asking for a version needs one more permission on S3 (s3:GetObjectVersion): only
            // when there is no ETag to pin the object with.
            version: if self.e_tag.is_none() {
                self.version.clone()
            } else {
                None
            },
            ..GetOptions::default()
        }
    }

    /// Checks the answer to [`Resume::options`]: the same object, from the right byte.
    pub(crate) fn check(&mut self, meta: &ObjectMeta, range_start: u64) -> Result<(), StoreError> {
        if self.e_tag.is_some() && meta.e_tag != self.e_tag
            || self.e_tag.is_none() && meta.version != self.version
            || meta.size != self.size
        {
            return Err(self.replaced(&format!(
                "ETag {:?} and {} bytes, now ETag {:?} and {} bytes",
                self.e_tag, self.size, meta.e_tag, meta.size
            )));
        }
        if range_start != self.offset {
            return Err(StoreError::Permanent(format!(
                "resuming the download of {} at byte {}, the store answered from byte \
                 {range_start}",
                self.key, self.offset
            )));
        }
        self.resumed += 1;
        Ok(())
    }

    /// The error for an object that changed while it was being read.
    pub(crate) fn replaced(&self, detail: &str) -> StoreError {
        StoreError::Permanent(format!(
            "{} was replaced or removed while it was being read (cut at byte {} of {}; {detail}): \
             the download was not resumed, so as not to join two different objects",
            self.key, self.offset, self.size
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64, e_tag: Option<&str>, version: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            location: object_store::path::Path::from("k"),
            last_modified: chrono::DateTime::default(),
            size,
            e_tag: e_tag.map(str::to_string),
            version: version.map(str::to_string),
        }
    }

    const WINDOW: Duration = Duration::from_secs(3);

    #[test]
    fn resumes_from_the_next_byte_of_the_same_object() {
        let t0 = Instant::now();
        let mut r = Resume::new("k", &meta(100, Some("\"e1\""), Some("v1")), WINDOW, t0);
        r.progressed(40, t0).expect("40 of 100");
        assert!(!r.complete());
        let wait = r.after_cut(t0, "reset").expect("resumable");
        assert_eq!(wait, FIRST_DELAY);
        let o = r.options();
        assert!(matches!(o.range, Some(GetRange::Offset(40))), "{o:?}");
        assert_eq!(o.if_match.as_deref(), Some("\"e1\""));
        assert_eq!(
            o.version, None,
            "no version request when an ETag pins the object"
        );
        r.check(&meta(100, Some("\"e1\""), Some("v1")), 40)
            .expect("same object");
        r.progressed(60, t0).expect("the rest");
        assert!(r.complete());
        assert_eq!(r.resumed(), 1);
    }

    #[test]
    fn a_replaced_object_is_never_spliced() {
        let t0 = Instant::now();
        let mut r = Resume::new("k", &meta(100, Some("\"e1\""), None), WINDOW, t0);
        r.progressed(40, t0).expect("40");
        r.after_cut(t0, "reset").expect("resumable");
        let e = r
            .check(&meta(100, Some("\"e2\""), None), 40)
            .expect_err("another ETag");
        assert!(
            matches!(e, StoreError::Permanent(ref m) if m.contains("replaced")),
            "{e}"
        );
        let e = r
            .check(&meta(120, Some("\"e1\""), None), 40)
            .expect_err("another size");
        assert!(e.to_string().contains("replaced"), "{e}");
        let e = r
            .check(&meta(100, Some("\"e1\""), None), 0)
            .expect_err("from the wrong byte");
        assert!(e.to_string().contains("from byte 0"), "{e}");
    }

    #[test]
    fn without_an_etag_the_version_pins_the_object() {
        let t0 = Instant::now();
        let mut r = Resume::new("k", &meta(10, None, Some("v7")), WINDOW, t0);
        r.progressed(3, t0).expect("3");
        r.after_cut(t0, "reset").expect("resumable by version");
        let o = r.options();
        assert_eq!(o.version.as_deref(), Some("v7"));
        assert_eq!(o.if_match, None);
        assert!(r.check(&meta(10, None, Some("v8")), 3).is_err());
        r.check(&meta(10, None, Some("v7")), 3)
            .expect("same version");
    }

    #[test]
    fn an_object_that_cannot_be_pinned_is_not_resumed() {
        let t0 = Instant::now();
        let mut r = Resume::new("k", &meta(10, None, None), WINDOW, t0);
        r.progressed(3, t0).expect("3");
        let e = r.after_cut(t0, "reset").expect_err("nothing to pin");
        assert!(
            matches!(e, StoreError::Unavailable(ref m) if m.contains("ETag")),
            "{e}"
        );
    }

    #[test]
    fn the_window_counts_from_the_last_progress_not_from_the_start() {
        let t0 = Instant::now();
        let mut r = Resume::new("k", &meta(1000, Some("e"), None), WINDOW, t0);
        // Ten times the window later, bytes are still arriving: each cut may be resumed.
        for i in 1..=10u32 {
            let now = t0 + WINDOW * i;
            r.progressed(50, now).expect("progress");
            let wait = r.after_cut(now, "reset").expect("resumable while moving");
            assert_eq!(wait, FIRST_DELAY, "the backoff starts over after progress");
            r.check(&meta(1000, Some("e"), None), r.offset())
                .expect("same object");
        }
        assert_eq!(r.resumed(), 10);
    }

    #[test]
    fn gives_up_once_nothing_arrived_for_the_window() {
        let t0 = Instant::now();
        let mut r = Resume::new("k", &meta(1000, Some("e"), None), WINDOW, t0);
        r.progressed(10, t0).expect("progress");
        let mut now = t0;
        let mut waits = Vec::new();
        let err = loop {
            match r.after_cut(now, "connection refused") {
                Ok(wait) => {
                    waits.push(wait);
                    now += wait;
                }
                Err(e) => break e,
            }
        };
        // Backoff doubles up to its cap, and the attempts stay within the window.
        assert_eq!(waits[..3], [FIRST_DELAY, FIRST_DELAY * 2, FIRST_DELAY * 4]);
        assert!(waits.iter().all(|w| *w <= MAX_DELAY));
        assert!(now - t0 < WINDOW, "waited {:?}", now - t0);
        let text = err.to_string();
        assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
        assert!(
            text.contains("byte 10 of 1000") && text.contains("connection refused"),
            "{text}"
        );
        assert!(r.time_left(t0 + WINDOW * 2).is_zero());
    }

    #[test]
    fn more_bytes_than_the_object_holds_is_an_error() {
        let t0 = Instant::now();
        let mut r = Resume::new("k", &meta(10, Some("e"), None), WINDOW, t0);
        r.progressed(10, t0).expect("all of it");
        assert!(r.complete());
        assert!(r.progressed(1, t0).is_err());
    }
}
