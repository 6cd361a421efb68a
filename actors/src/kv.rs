//! Modules' persistent key-value state, in a redb database of its own (`STATE/kv.redb`).
//!
//! Each module sees only its own keys (the module name is part of every key), and the
//! bytes it stores (key plus value of every entry) are counted against its
//! `state_bytes` quota in the same write transaction that changes them, so the count and
//! the data can never disagree after a crash.
//!
//! The state lives apart from the content store's `meta.redb` on purpose: module writes
//! are frequent and small, release records are rare and precious, and a module filling
//! its database must not slow down or endanger the record of what is installed.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// Keys are names, not data: a few hundred bytes is plenty.
pub const KV_KEY_BYTES_MAX: usize = 256;
/// One value is at most this large; bigger state belongs in several keys.
pub const KV_VALUE_BYTES_MAX: usize = 64 * 1024;

/// (module, key) -> value.
const ENTRIES: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("kv_entries");
/// module -> bytes stored (sum of key and value lengths of its entries).
const USED: TableDefinition<&str, u64> = TableDefinition::new("kv_used");

/// Errors from opening the state database.
#[derive(Debug, thiserror::Error)]
#[error("opening module state database {path}: {source}")]
pub struct KvOpenError {
    path: PathBuf,
    source: redb::Error,
}

/// Errors from reading or writing a module's state.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("writing module state: key of {len} bytes is empty or over {KV_KEY_BYTES_MAX} bytes")]
    Key { len: usize },
    #[error("writing module state: value of {len} bytes is over {KV_VALUE_BYTES_MAX} bytes")]
    Value { len: usize },
    #[error("writing module state: {needed} bytes would exceed the quota of {quota} bytes")]
    Quota { needed: u64, quota: u64 },
    #[error("module state database: {0}")]
    Database(#[from] redb::Error),
}

fn db_err<E: Into<redb::Error>>(e: E) -> KvError {
    KvError::Database(e.into())
}

/// The modules' state database. `Send + Sync`; the node shares it in an `Arc`.
pub struct KvStore {
    db: Database,
}

impl KvStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<KvStore, KvOpenError> {
        let err = |e: redb::Error| KvOpenError {
            path: path.to_path_buf(),
            source: e,
        };
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        // Creating the tables up front means readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.open_table(ENTRIES).map_err(|e| err(e.into()))?;
        txn.open_table(USED).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(KvStore { db })
    }

    /// The value of `key` in `module`'s state.
    pub fn get(&self, module: &str, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(ENTRIES).map_err(db_err)?;
        let value = table.get((module, key)).map_err(db_err)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Sets `key` to `value` in `module`'s state (an empty value deletes the key), if the
    /// module's state stays within `quota` bytes. Returns the bytes the module now uses.
    pub fn set(&self, module: &str, key: &[u8], value: &[u8], quota: u64) -> Result<u64, KvError> {
        if key.is_empty() || key.len() > KV_KEY_BYTES_MAX {
            return Err(KvError::Key { len: key.len() });
        }
        if value.len() > KV_VALUE_BYTES_MAX {
            return Err(KvError::Value { len: value.len() });
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        let now_used;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(db_err)?;
            let mut used = txn.open_table(USED).map_err(db_err)?;
            let before = used.get(module).map_err(db_err)?.map_or(0, |g| g.value());
            let old = entries
                .get((module, key))
                .map_err(db_err)?
                .map_or(0, |g| (key.len() + g.value().len()) as u64);
            let new = if value.is_empty() {
                0
            } else {
                (key.len() + value.len()) as u64
            };
            now_used = before.saturating_sub(old).saturating_add(new);
            // Shrinking is always allowed, even for a module already over a lowered quota.
            if new > old && now_used > quota {
                return Err(KvError::Quota {
                    needed: now_used,
                    quota,
                });
            }
            if value.is_empty() {
                entries.remove((module, key)).map_err(db_err)?;
            } else {
                entries.insert((module, key), value).map_err(db_err)?;
            }
            used.insert(module, now_used).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(now_used)
    }

    /// Bytes `module`'s state takes.
    pub fn used(&self, module: &str) -> Result<u64, KvError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(USED).map_err(db_err)?;
        let used = table.get(module).map_err(db_err)?.map_or(0, |g| g.value());
        Ok(used)
    }

    /// Every key of `module`, in order (for tests and tools; state is small).
    pub fn keys(&self, module: &str) -> Result<Vec<Vec<u8>>, KvError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(ENTRIES).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (k, _) = row.map_err(db_err)?;
            let (m, key) = k.value();
            if m == module {
                out.push(key.to_vec());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_see_only_their_own_keys_and_usage_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let kv = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        assert_eq!(kv.set("a", b"k", b"12345", 100).unwrap(), 6);
        assert_eq!(kv.set("b", b"k", b"x", 100).unwrap(), 2);
        assert_eq!(kv.get("a", b"k").unwrap().as_deref(), Some(&b"12345"[..]));
        assert_eq!(kv.get("b", b"k").unwrap().as_deref(), Some(&b"x"[..]));
        assert_eq!(kv.get("c", b"k").unwrap(), None);
        // Overwriting counts the difference; deleting gives the bytes back.
        assert_eq!(kv.set("a", b"k", b"1", 100).unwrap(), 2);
        assert_eq!(kv.set("a", b"k", b"", 100).unwrap(), 0);
        assert_eq!(kv.get("a", b"k").unwrap(), None);
        assert_eq!(kv.used("b").unwrap(), 2);
        drop(kv);
        let kv = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        assert_eq!(kv.used("b").unwrap(), 2);
        assert_eq!(kv.keys("b").unwrap(), vec![b"k".to_vec()]);
    }

    #[test]
    fn quota_and_sizes_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let kv = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        kv.set("a", b"k1", &[0; 8], 20).unwrap();
        let err = kv.set("a", b"k2", &[0; 9], 20).unwrap_err();
        assert!(
            matches!(
                err,
                KvError::Quota {
                    needed: 21,
                    quota: 20
                }
            ),
            "{err}"
        );
        assert_eq!(kv.get("a", b"k2").unwrap(), None);
        assert_eq!(kv.used("a").unwrap(), 10);
        kv.set("a", b"k2", &[0; 8], 20).unwrap();
        // Shrinking works even when a lowered quota is already exceeded.
        kv.set("a", b"k2", &[0; 1], 5).unwrap();
        assert!(matches!(
            kv.set("a", b"", b"x", 100),
            Err(KvError::Key { len: 0 })
        ));
        let long = vec![b'k'; KV_KEY_BYTES_MAX + 1];
        assert!(matches!(
            kv.set("a", &long, b"x", 1 << 30),
            Err(KvError::Key { .. })
        ));
        let big = vec![0; KV_VALUE_BYTES_MAX + 1];
        assert!(matches!(
            kv.set("a", b"k", &big, 1 << 30),
            Err(KvError::Value { .. })
        ));
    }
}
