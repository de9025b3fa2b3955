//! Per-command fan-out of stored events and status changes to live subscribers (SSE,
//! long-poll). Only what is already committed is published. A subscriber that lags
//! re-reads from the database instead of slowing the writer down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use trellis_protocol::{Event, EventBody};

use crate::model::CommandId;

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

impl Published {
    /// The published form of a stored event: its SSE name and JSON data (the event body
    /// with its `seq` and `ts`).
    pub fn event(e: &Event) -> Self {
        let kind = match &e.body {
            EventBody::Log { .. } => "log",
            EventBody::Stage { .. } => "stage",
            EventBody::Progress { .. } => "progress",
            EventBody::Finished(_) => "finished",
        };
        let mut v = serde_json::to_value(&e.body).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("seq".into(), e.seq.into());
            o.insert("ts".into(), e.ts.into());
        }
        Published::Event {
            seq: e.seq as i64,
            kind,
            json: v.to_string().into(),
        }
    }
}

/// Events a subscriber may fall behind by before it is told it lagged (and re-reads).
const CAPACITY: usize = 256;

#[derive(Default)]
pub struct Fanout {
    channels: Mutex<HashMap<CommandId, broadcast::Sender<Published>>>,
}

/// A live subscription to one command. Dropping the last one for a command frees its
/// channel at once, so memory follows the number of watchers, not the command rate.
pub struct Subscription<'a> {
    /// Always `Some` until dropped (taken in `drop`, under the map's lock).
    rx: Option<broadcast::Receiver<Published>>,
    tx: broadcast::Sender<Published>,
    fanout: &'a Fanout,
    id: CommandId,
}

impl Subscription<'_> {
    pub async fn recv(&mut self) -> Result<Published, broadcast::error::RecvError> {
        match self.rx.as_mut() {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut map = self
            .fanout
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Under the lock nobody can subscribe meanwhile, and our receiver goes first, so
        // of two last subscriptions dropped at once the second sees zero. Only our own
        // channel is freed (a resubscription may already have replaced it).
        drop(self.rx.take());
        if map
            .get(&self.id)
            .is_some_and(|tx| tx.same_channel(&self.tx) && tx.receiver_count() == 0)
        {
            map.remove(&self.id);
        }
    }
}

impl Fanout {
    pub fn subscribe(&self, id: CommandId) -> Subscription<'_> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let tx = map
            .entry(id)
            .or_insert_with(|| broadcast::channel(CAPACITY).0)
            .clone();
        Subscription {
            rx: Some(tx.subscribe()),
            tx,
            fanout: self,
            id,
        }
    }

    /// Channels open now (for tests and metrics).
    pub fn open_channels(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn has_subscribers(&self, id: &CommandId) -> bool {
        let map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id).is_some_and(|s| s.receiver_count() > 0)
    }

    pub fn publish(&self, id: &CommandId, msg: Published) {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(id) {
            if tx.send(msg).is_err() {
                map.remove(id);
            }
        }
    }

    /// Publishes to every open channel (after notes from other replicas may have been
    /// lost: every subscriber re-reads).
    pub fn publish_all(&self, msg: Published) {
        let map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        for tx in map.values() {
            let _ = tx.send(msg.clone());
        }
    }

    /// Drops channels nobody listens to any more.
    pub fn sweep(&self) {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, tx| tx.receiver_count() > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn channels_live_exactly_as_long_as_their_subscribers() {
        let f = Fanout::default();
        let id = CommandId::new();
        let mut a = f.subscribe(id);
        let b = f.subscribe(id);
        assert_eq!(f.open_channels(), 1);
        f.publish(&id, Published::Status);
        assert!(matches!(a.recv().await, Ok(Published::Status)));
        drop(b);
        assert_eq!(f.open_channels(), 1, "a still listens");
        drop(a);
        assert_eq!(
            f.open_channels(),
            0,
            "the last subscriber frees the channel"
        );
        // an old subscription dropped after a new one was made leaves the new one alone
        let old = f.subscribe(id);
        f.channels.lock().unwrap().remove(&id);
        let mut new = f.subscribe(id);
        drop(old);
        assert_eq!(f.open_channels(), 1);
        f.publish(&id, Published::Status);
        assert!(matches!(new.recv().await, Ok(Published::Status)));
        drop(new);
        f.publish(&id, Published::Status);
        assert_eq!(f.open_channels(), 0, "publishing to nobody creates nothing");
    }
}
