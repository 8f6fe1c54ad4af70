//! A stored key-value pair, laid out to cost one small heap block.
//!
//! The shard stores these, the log records them, snapshots archive them:
//! this module owns the layout and nothing else (no store semantics, no
//! I/O).

use crate::state::secret::SecretHash;

// An entry is 32 bytes plus its heap block; keep it that way.
const _: () = assert!(std::mem::size_of::<Entry>() == 32);

/// Length of a stored owner-secret hash.
const SECRET_LEN: usize = 32;

/// Largest key an entry can hold (the key length is packed in 16 bits; the
/// API allows at most 4096 bytes plus an `ip/` prefix).
pub const MAX_KEY_LEN: usize = u16::MAX as usize;
const SECRET_FLAG: u64 = 1 << 16;
const VERSION_SHIFT: u32 = 17;
/// Versions use the 47 bits above the key length and secret flag.
pub const MAX_VERSION: u64 = (1 << (64 - VERSION_SHIFT)) - 1;

/// A key longer than `MAX_KEY_LEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyTooLong;

/// A stored key-value pair: 32 bytes plus one exact-size allocation holding
/// `[creator][secret hash (if any)][key][value]`, so an entry costs one heap
/// block whether or not it has an owner. Key length, secret flag and version
/// are packed into one word. The creator is the client that last stored
/// the key (`net::client`; 0 for entries written before creators were
/// kept, never counted): the key counts against that client's quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    data: Box<[u8]>,
    /// bits 0..16 key length, bit 16 has-secret, bits 17.. version.
    meta: u64,
    /// Unix milliseconds after which the entry no longer exists.
    pub expires_ms: u64,
}

/// Bytes of the creator field at the start of an entry's block.
const CREATOR_LEN: usize = 8;

impl Entry {
    /// A new entry (version 0 until a shard stores it, creator 0). The key
    /// length is packed in 16 bits: a longer key is refused, never truncated.
    pub fn new(key: &[u8], value: &[u8], secret: Option<&SecretHash>, expires_ms: u64) -> Result<Self, KeyTooLong> {
        if key.len() > MAX_KEY_LEN {
            return Err(KeyTooLong);
        }
        let secret_len = if secret.is_some() { SECRET_LEN } else { 0 };
        let mut data = Vec::with_capacity(CREATOR_LEN + secret_len + key.len() + value.len());
        data.extend_from_slice(&[0; CREATOR_LEN]);
        if let Some(s) = secret {
            data.extend_from_slice(s);
        }
        data.extend_from_slice(key);
        data.extend_from_slice(value);
        let flag = if secret.is_some() { SECRET_FLAG } else { 0 };
        Ok(Entry { data: data.into_boxed_slice(), meta: (key.len() as u64 & 0xffff) | flag, expires_ms })
    }

    fn key_len(&self) -> usize {
        (self.meta & 0xffff) as usize
    }

    fn has_secret(&self) -> bool {
        self.meta & SECRET_FLAG != 0
    }

    /// Changes on every write of the key (the ETag).
    pub fn version(&self) -> u64 {
        self.meta >> VERSION_SHIFT
    }

    pub fn set_version(&mut self, version: u64) {
        self.meta = (self.meta & (SECRET_FLAG | 0xffff)) | ((version & MAX_VERSION) << VERSION_SHIFT);
    }

    /// The client that last stored the key (`net::client`; 0: unknown).
    pub fn creator(&self) -> u64 {
        let mut b = [0u8; CREATOR_LEN];
        if let Some(c) = self.data.get(..CREATOR_LEN) {
            b.copy_from_slice(c);
        }
        u64::from_le_bytes(b)
    }

    pub fn set_creator(&mut self, creator: u64) {
        if let Some(c) = self.data.get_mut(..CREATOR_LEN) {
            c.copy_from_slice(&creator.to_le_bytes());
        }
    }

    fn key_start(&self) -> usize {
        if self.has_secret() {
            CREATOR_LEN + SECRET_LEN
        } else {
            CREATOR_LEN
        }
    }

    pub fn key(&self) -> &[u8] {
        let start = self.key_start();
        &self.data[start..start + self.key_len()]
    }

    pub fn value(&self) -> &[u8] {
        &self.data[self.key_start() + self.key_len()..]
    }

    pub fn secret(&self) -> Option<&SecretHash> {
        if !self.has_secret() {
            return None;
        }
        self.data.get(CREATOR_LEN..CREATOR_LEN + SECRET_LEN).and_then(|s| s.try_into().ok())
    }

    /// Key plus value bytes (what `rendezvous_stored_bytes` counts).
    pub fn payload_len(&self) -> usize {
        self.data.len() - self.key_start()
    }

    /// Key bytes followed by value bytes (the snapshot's `data` field).
    pub fn key_and_value(&self) -> &[u8] {
        &self.data[self.key_start()..]
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_ms
    }
}
