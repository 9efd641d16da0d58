//! The embedded store: one redb file under the data directory. redb commits are atomic and
//! durable (checksummed commit slots, fsync), so a crash leaves either the old or the new record,
//! never half of one. It must not be shared between processes: redb holds an exclusive lock.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Kind, Store};
use crate::error::{Error, Result};

fn table(kind: Kind) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(kind.name())
}

pub struct EmbeddedStore {
    db: Database,
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`, creating every table so reads never miss one.
    pub fn open(path: &Path) -> Result<EmbeddedStore> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Store(format!(
                    "cannot create data directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::FailedPrecondition(format!(
                "store {} is in use by another bicsi process; stop it or use another --data-dir",
                path.display()
            )),
            other => Error::Store(format!("cannot open {}: {other}", path.display())),
        })?;
        let txn = db.begin_write()?;
        for kind in Kind::ALL {
            txn.open_table(table(kind))?;
        }
        txn.commit()?;
        Ok(EmbeddedStore { db })
    }
}

impl Store for EmbeddedStore {
    fn get_raw(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table(kind))?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    fn list_raw(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table(kind))?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn put_raw(&self, kind: Kind, key: &str, value: &[u8]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(table(kind))?;
            t.insert(key, value)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn delete(&self, kind: Kind, key: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(table(kind))?;
            t.remove(key)?;
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_store_conformance() {
        let dirs = std::sync::Mutex::new(Vec::new());
        super::super::conformance::run_all(&|| {
            let dir = tempfile::tempdir().unwrap();
            let s = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
            dirs.lock().unwrap().push(dir);
            Box::new(s)
        });
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = EmbeddedStore::open(&path).unwrap();
            s.put_raw(Kind::Volume, "v1", b"{\"a\":1}").unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            s.get_raw(Kind::Volume, "v1").unwrap().as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
    }

    #[test]
    fn second_open_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _first = EmbeddedStore::open(&path).unwrap();
        let err = EmbeddedStore::open(&path)
            .err()
            .expect("second open must fail");
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
