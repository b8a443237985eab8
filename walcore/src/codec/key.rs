//! The master key, its fingerprint and the per-object keys derived from it (FORMAT.md §4).

use std::fmt;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

/// Length of a master key in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// Length of a key fingerprint in bytes.
pub const FINGERPRINT_LEN: usize = 16;

const FINGERPRINT_INFO: &[u8] = b"walcore/v1/key-fingerprint";
const OBJECT_KEY_INFO: &[u8] = b"walcore/v1/object-key";

/// Identifies a master key without revealing it; printed as 32 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; FINGERPRINT_LEN]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Why a key could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("an encryption key must be 64 hexadecimal characters (32 bytes); got {0} characters")]
    Length(usize),
    #[error(
        "an encryption key must be 64 hexadecimal characters; found a character that is not hexadecimal"
    )]
    NotHex,
}

/// A key derived for one object: wiped from memory when dropped.
pub(crate) type ObjectKey = Zeroizing<[u8; KEY_LEN]>;

/// The user's AES-256 master key. Never logged (its `Debug` shows the fingerprint only) and
/// wiped from memory (`zeroize`) when dropped.
pub struct MasterKey {
    bytes: [u8; KEY_LEN],
    fingerprint: Fingerprint,
}

impl MasterKey {
    /// A key from its 32 raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> MasterKey {
        let mut fp = [0u8; FINGERPRINT_LEN];
        Hkdf::<Sha256>::new(None, &bytes)
            .expand(FINGERPRINT_INFO, &mut fp)
            .expect("16 bytes is a valid HKDF-SHA256 output length");
        MasterKey {
            bytes,
            fingerprint: Fingerprint(fp),
        }
    }

    /// A key from 64 hexadecimal characters; surrounding white space (a trailing newline from a
    /// key file or a KMS command) is ignored. The caller wipes `text`; the decoded bytes are
    /// wiped here.
    pub fn from_hex(text: &str) -> Result<MasterKey, KeyError> {
        let text = text.trim();
        if text.len() != KEY_LEN * 2 {
            return Err(KeyError::Length(text.chars().count()));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(text, &mut *bytes).map_err(|_| KeyError::NotHex)?;
        Ok(MasterKey::from_bytes(*bytes))
    }

    /// The key's fingerprint (FORMAT.md §4.1).
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The key of one object, from the salt in its header (FORMAT.md §4.2).
    pub(crate) fn object_key(&self, salt: &[u8; 32]) -> ObjectKey {
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        Hkdf::<Sha256>::new(Some(salt), &self.bytes)
            .expand(OBJECT_KEY_INFO, &mut *out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        // `zeroize` writes with volatile stores the optimiser cannot remove. Copies made on the
        // way in (the environment, the hash state of the key derivation) are beyond our reach:
        // this is hygiene, not a guarantee.
        self.bytes.zeroize();
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(fingerprint {})", self.fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_rejects_bad_keys() {
        let k = MasterKey::from_hex(&"ab".repeat(32)).expect("valid key");
        assert_eq!(
            k.fingerprint(),
            MasterKey::from_bytes([0xab; 32]).fingerprint()
        );
        assert_eq!(
            MasterKey::from_hex(&"ab".repeat(31)).unwrap_err(),
            KeyError::Length(62)
        );
        assert_eq!(
            MasterKey::from_hex(&"zz".repeat(32)).unwrap_err(),
            KeyError::NotHex
        );
        assert!(MasterKey::from_hex(&format!("{}\n", "00".repeat(32))).is_ok());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = MasterKey::from_bytes([0x5a; 32]);
        let shown = format!("{k:?}");
        assert!(!shown.contains("5a5a5a5a"), "{shown}");
        assert!(shown.contains(&k.fingerprint().to_string()));
    }

    #[test]
    fn different_keys_have_different_fingerprints_and_object_keys() {
        let a = MasterKey::from_bytes([1; 32]);
        let b = MasterKey::from_bytes([2; 32]);
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(*a.object_key(&[0; 32]), *b.object_key(&[0; 32]));
        assert_ne!(*a.object_key(&[0; 32]), *a.object_key(&[1; 32]));
    }
}
