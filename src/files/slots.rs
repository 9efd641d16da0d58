//! The sync slots of one node: how many file syncs (sending or receiving) run at once, against
//! `concurrent-backing-image-syncs-per-node`. A slot is a value: dropping it frees it. It must
//! not know what a sync does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Counts the file syncs running on a node against `concurrent-backing-image-syncs-per-node`.
#[derive(Default)]
pub struct SyncSlots(Arc<SlotsInner>);

#[derive(Default)]
struct SlotsInner {
    running: Mutex<usize>,
    freed: tokio::sync::Notify,
}

/// A running sync; dropping it frees its slot.
pub struct SyncSlot(Arc<SlotsInner>);

impl Drop for SyncSlot {
    fn drop(&mut self) {
        *self.0.running.lock().expect("sync slots poisoned") -= 1;
        self.0.freed.notify_waiters();
    }
}

impl SyncSlots {
    /// Takes a slot if fewer than `limit` are taken.
    pub fn try_take(&self, limit: usize) -> Option<SyncSlot> {
        let mut running = self.0.running.lock().expect("sync slots poisoned");
        (*running < limit).then(|| {
            *running += 1;
            SyncSlot(self.0.clone())
        })
    }

    pub fn running(&self) -> usize {
        *self.0.running.lock().expect("sync slots poisoned")
    }

    /// Waits for a free slot; the limit is read again each time one frees (or every second,
    /// so a changed setting applies).
    pub async fn take(&self, limit: impl Fn() -> usize) -> SyncSlot {
        loop {
            let freed = self.0.freed.notified();
            if let Some(slot) = self.try_take(limit()) {
                return slot;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sync_slots_hold_back_syncs_over_the_limit() {
        let slots = SyncSlots::default();
        let a = slots.try_take(2).unwrap();
        let _b = slots.try_take(2).unwrap();
        assert!(slots.try_take(2).is_none());
        assert_eq!(slots.running(), 2);
        // A waiter gets the slot freed by another sync.
        let waiter = tokio::spawn({
            let inner = SyncSlots(slots.0.clone());
            async move {
                let _s = inner.take(|| 2).await;
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        // A higher limit (the setting changed) lets more run at once.
        assert!(slots.try_take(3).is_some());
    }
}
