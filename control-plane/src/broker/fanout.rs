//! Per-command fan-out of stored events and status changes to live subscribers (SSE,
//! long-poll). Only what is already committed is published. A subscriber that lags
//! re-reads from the database instead of slowing the writer down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub enum Published {
    /// A stored event: `seq`, SSE event name and its JSON data.
    Event {
        seq: i64,
        kind: &'static str,
        json: Arc<str>,
    },
    /// The command's status may have changed; subscribers re-read it.
    Status,
}

#[derive(Default)]
pub struct Fanout {
    channels: Mutex<HashMap<Uuid, broadcast::Sender<Published>>>,
}

impl Fanout {
    pub fn subscribe(&self, id: Uuid) -> broadcast::Receiver<Published> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(id)
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe()
    }

    pub fn has_subscribers(&self, id: &Uuid) -> bool {
        let map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id).is_some_and(|s| s.receiver_count() > 0)
    }

    pub fn publish(&self, id: &Uuid, msg: Published) {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(id) {
            if tx.send(msg).is_err() {
                map.remove(id);
            }
        }
    }

    /// Drops channels nobody listens to any more.
    pub fn sweep(&self) {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, tx| tx.receiver_count() > 0);
    }
}
