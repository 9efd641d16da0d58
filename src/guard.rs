//! Per-object operation guards: a second operation on a volume (or image) that already has one in
//! flight is answered with Aborted instead of queueing or racing, as the CSI spec asks. The set of
//! busy keys lives in the service that owns it, never in a static, so tests can run many servers.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

#[derive(Clone, Default)]
pub struct Guards {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs; releases its key when dropped (also on panic or early return).
pub struct Guard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Guards {
    /// Takes the guard for `key`, or fails with Aborted naming `what` when it is taken.
    pub fn try_take(&self, key: &str, what: &str) -> Result<Guard> {
        let mut busy = self.busy.lock().expect("guard set poisoned");
        if !busy.insert(key.to_string()) {
            return Err(Error::Aborted(format!(
                "{what} {key:?} has another operation in progress; retry when it finishes"
            )));
        }
        Ok(Guard {
            busy: self.busy.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.busy.lock() {
            busy.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_is_aborted_until_the_first_ends() {
        let g = Guards::default();
        let first = g.try_take("v1", "volume").unwrap();
        let err = g.try_take("v1", "volume").err().unwrap();
        assert_eq!(err.code(), tonic::Code::Aborted);
        assert!(err.to_string().contains("\"v1\""));
        assert!(
            g.try_take("v2", "volume").is_ok(),
            "other keys are independent"
        );
        drop(first);
        assert!(g.try_take("v1", "volume").is_ok());
    }
}
