//! The embedded store: one redb file under the data directory. redb commits are atomic and
//! durable (checksummed commit slots, fsync), so a crash leaves either the old or the new record,
//! never half of one. It must not be shared between processes: redb holds an exclusive lock.
//!
//! Writes are group-committed: a write that finds no commit running leads one, taking every
//! write queued so far into a single transaction (one fsync); writes that arrive meanwhile wait
//! for the next (telling tokio they block). Each caller still returns only once its own write is
//! durable, so the contract is unchanged, but 32 concurrent CreateVolume calls cost a few fsyncs instead of 32. A batch
//! that fails is retried one write per transaction, so one bad write fails only its caller.

use std::path::Path;
use std::sync::{Condvar, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Kind, Store};
use crate::error::{Error, Result};

fn table(kind: Kind) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(kind.name())
}

pub struct EmbeddedStore {
    db: Database,
    group: Mutex<Group>,
    /// Signalled when a batch is done.
    committed: Condvar,
    /// Transactions committed by writes (batches and their one-by-one retries).
    commits: std::sync::atomic::AtomicU64,
}

/// One queued write.
enum Write {
    Put(Kind, String, Vec<u8>),
    Delete(Kind, String),
}

/// The group commit's state: the writes of the batch being filled, and the outcome of the batches
/// done (by number, kept until their writers have read them).
#[derive(Default)]
struct Group {
    queued: Vec<(u64, Write)>,
    next_ticket: u64,
    /// A leader is committing a batch.
    committing: bool,
    /// Outcomes by ticket: Ok, or the message of the error.
    done: std::collections::HashMap<u64, std::result::Result<(), String>>,
}

impl EmbeddedStore {
    /// Queues `w` and returns once it is committed (or failed), leading a batch when no commit
    /// is running.
    fn write(&self, w: Write) -> Result<()> {
        let mut g = self.group.lock().expect("store group poisoned");
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        g.queued.push((ticket, w));
        loop {
            if let Some(outcome) = g.done.remove(&ticket) {
                return outcome.map_err(Error::Store);
            }
            if g.committing {
                g = wait_blocking(|| self.committed.wait(g).expect("store group poisoned"));
                continue;
            }
            // Lead: commit everything queued so far (our own write included) in one go.
            g.committing = true;
            let batch = std::mem::take(&mut g.queued);
            drop(g);
            let outcomes = self.commit_batch(batch);
            g = self.group.lock().expect("store group poisoned");
            g.committing = false;
            g.done.extend(outcomes);
            self.committed.notify_all();
        }
    }

    fn commit_batch(
        &self,
        batch: Vec<(u64, Write)>,
    ) -> Vec<(u64, std::result::Result<(), String>)> {
        let writes: Vec<&Write> = batch.iter().map(|(_, w)| w).collect();
        match self.apply(&writes) {
            Ok(()) => batch.iter().map(|(t, _)| (*t, Ok(()))).collect(),
            Err(_) if batch.len() > 1 => batch
                .iter()
                .map(|(t, w)| (*t, self.apply(&[w]).map_err(|e| store_message(&e))))
                .collect(),
            Err(e) => batch
                .iter()
                .map(|(t, _)| (*t, Err(store_message(&e))))
                .collect(),
        }
    }

    /// One transaction with `writes` in order.
    fn apply(&self, writes: &[&Write]) -> Result<()> {
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let txn = self.db.begin_write()?;
        for w in writes {
            match w {
                Write::Put(kind, key, value) => {
                    let mut t = txn.open_table(table(*kind))?;
                    t.insert(key.as_str(), value.as_slice())?;
                }
                Write::Delete(kind, key) => {
                    let mut t = txn.open_table(table(*kind))?;
                    t.remove(key.as_str())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// Runs `f`, which waits for another writer's commit. On a multi-threaded runtime tokio is told
/// (`block_in_place`), so the worker's other tasks go on elsewhere and concurrent writers pile up
/// into the next batch instead of holding every worker while they queue. A writer that leads
/// does not use it: it waits for its own fsync, as a single write always did, and a lone writer
/// (a download's progress) never makes the runtime start another thread.
fn wait_blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The message of a store error without the variant's own prefix (it is wrapped again).
fn store_message(e: &Error) -> String {
    match e {
        Error::Store(m) => m.clone(),
        other => other.to_string(),
    }
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
        Ok(EmbeddedStore {
            db,
            group: Mutex::default(),
            committed: Condvar::new(),
            commits: Default::default(),
        })
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
        self.write(Write::Put(kind, key.to_string(), value.to_vec()))
    }

    fn delete(&self, kind: Kind, key: &str) -> Result<()> {
        self.write(Write::Delete(kind, key.to_string()))
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

    /// Many writers at once: every write lands (puts and deletes in each writer's order), and
    /// they share transactions instead of paying one commit each.
    #[test]
    fn concurrent_writes_are_group_committed() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        const THREADS: usize = 32;
        const EACH: usize = 20;
        let start = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (s, start) = (s.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for i in 0..EACH {
                        let key = format!("v-{t}-{i}");
                        s.put_raw(Kind::Volume, &key, key.as_bytes()).unwrap();
                        if i % 2 == 1 {
                            s.put_raw(Kind::Volume, &key, b"second").unwrap();
                            s.delete(Kind::Volume, &format!("v-{t}-{}", i - 1)).unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let all = s.list_raw(Kind::Volume).unwrap();
        assert_eq!(all.len(), THREADS * EACH / 2);
        assert!(
            all.iter().all(|(_, v)| v == b"second"),
            "each writer's order holds"
        );
        let writes = (THREADS * EACH * 2) as u64;
        let commits = s.commits.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            commits < writes / 2,
            "{writes} concurrent writes took {commits} commits"
        );
        // Reopened, everything is there: each write returned only once durable.
        drop(s);
        let s = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        assert_eq!(s.list_raw(Kind::Volume).unwrap().len(), THREADS * EACH / 2);
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
