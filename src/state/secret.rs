//! Owner secrets: kept only as a keyed hash, compared in constant time.
//!
//! The hash is BLAKE3 in keyed mode with a per-instance random key, over the
//! (length-prefixed) effective key and the secret, so equal secrets on two
//! keys do not produce equal hashes and a leaked snapshot cannot be matched
//! against a precomputed table. This module never logs, stores or returns a
//! plain-text secret.

use constant_time_eq::constant_time_eq_32;

/// A stored owner-secret hash.
pub type SecretHash = [u8; 32];

/// The instance's hashing key. Snapshots persist it, so hashes stay valid
/// across restarts.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub fn random() -> std::io::Result<Self> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(SecretKey(k))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SecretKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The hash stored for `secret` on `key` (the key after `ip/` expansion).
    pub fn hash(&self, key: &[u8], secret: &[u8]) -> SecretHash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key);
        h.update(secret);
        *h.finalize().as_bytes()
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// Constant-time equality of two hashes.
pub fn matches(stored: &SecretHash, offered: &SecretHash) -> bool {
    constant_time_eq_32(stored, offered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_key_secret_and_instance() {
        let a = SecretKey::from_bytes([1; 32]);
        let b = SecretKey::from_bytes([2; 32]);
        let h = a.hash(b"k", b"s3cret");
        assert!(matches(&h, &a.hash(b"k", b"s3cret")));
        assert!(!matches(&h, &a.hash(b"k", b"s3cre")));
        assert!(!matches(&h, &a.hash(b"k2", b"s3cret")));
        assert!(!matches(&h, &b.hash(b"k", b"s3cret")));
        // Length prefix: ("ab","c") and ("a","bc") differ.
        assert!(!matches(&a.hash(b"ab", b"c"), &a.hash(b"a", b"bc")));
    }

    #[test]
    fn hash_does_not_contain_secret() {
        let k = SecretKey::from_bytes([7; 32]);
        let h = k.hash(b"key", b"AAAA");
        assert!(!h.windows(4).any(|w| w == b"AAAA"));
    }

    #[test]
    fn random_keys_differ() {
        let a = SecretKey::random().unwrap();
        let b = SecretKey::random().unwrap();
        assert_ne!(a.as_bytes(), b.as_bytes());
    }
}
