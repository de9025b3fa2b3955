//! Grouped reads on PostgreSQL: the API's hot single-row reads (a command with its node,
//! a command's stages, an agent) asked for at the same moment are answered by one
//! statement per group (`… WHERE id IN (…)`), the way the inserter groups commits.
//!
//! Why: on PostgreSQL every statement is a network round trip that wakes a server
//! process, and sqlx pings a connection each time it goes back to the pool; with 64
//! clients each waiting on its own command, those single-row reads were most of the
//! server's work per command (4–5 of its ~6 statements). On SQLite a read is an
//! in-process call and nothing is grouped.
//!
//! A group runs as soon as one of [`CONCURRENCY`] slots is free, so a lone read waits for
//! nothing; reads that arrive while every slot is busy join the next group. Each reader
//! is one task that stops when the last [`super::Db`] clone holding it is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::sql::{storage_trouble, StorageTrouble};
use super::{DbError, DbResult};

/// Groups of one reader in flight at once.
const CONCURRENCY: usize = 4;
/// Most keys in one group (one bind each).
const MAX_GROUP: usize = 256;

type Group<K, V> = Pin<Box<dyn Future<Output = DbResult<HashMap<K, V>>> + Send>>;
type Fetch<K, V> = Arc<dyn Fn(Vec<K>) -> Group<K, V> + Send + Sync>;
type Waiter<V> = oneshot::Sender<DbResult<Option<V>>>;

/// One kind of grouped read: keys in, rows (if any) out.
pub(super) struct Reader<K, V> {
    tx: mpsc::UnboundedSender<(K, Waiter<V>)>,
}

impl<K, V> Reader<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    /// Starts the reader's task; `fetch` reads a group (keys are distinct) and returns
    /// the rows it found.
    pub(super) fn spawn<F, Fut>(fetch: F) -> Self
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = DbResult<HashMap<K, V>>> + Send + 'static,
    {
        let fetch: Fetch<K, V> = Arc::new(move |keys| -> Group<K, V> { Box::pin(fetch(keys)) });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, fetch));
        Self { tx }
    }

    /// The row of `key`, if there is one.
    pub(super) async fn get(&self, key: K) -> DbResult<Option<V>> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((key, tx))
            .map_err(|_| DbError::Unavailable("the database reader stopped".into()))?;
        rx.await
            .map_err(|_| DbError::Unavailable("the database reader stopped".into()))?
    }
}

async fn run<K, V>(mut rx: mpsc::UnboundedReceiver<(K, Waiter<V>)>, fetch: Fetch<K, V>)
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    while let Some(first) = rx.recv().await {
        // Wait for a free slot first: what arrives meanwhile joins this group.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut group: HashMap<K, Vec<Waiter<V>>> = HashMap::new();
        group.entry(first.0).or_default().push(first.1);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok((k, w)) => group.entry(k).or_default().push(w),
                Err(_) => break,
            }
        }
        let fetch = fetch.clone();
        tokio::spawn(async move {
            let keys: Vec<K> = group.keys().cloned().collect();
            let result = fetch(keys).await;
            drop(slot);
            match result {
                Ok(mut rows) => {
                    for (k, waiters) in group {
                        let row = rows.remove(&k);
                        for w in waiters {
                            let _ = w.send(Ok(row.clone()));
                        }
                    }
                }
                // Storage trouble is everyone's: each read of the group gets it, classified
                // as the API answers it (503/507).
                Err(e) if storage_trouble(&e).is_some() => {
                    let msg = e.to_string();
                    let full = storage_trouble(&e) == Some(StorageTrouble::Full);
                    for w in group.into_values().flatten() {
                        let _ = w.send(Err(if full {
                            DbError::Full(msg.clone())
                        } else {
                            DbError::Unavailable(msg.clone())
                        }));
                    }
                }
                // Anything else may be about one row (one that does not decode): each key
                // is read again alone, so only its own readers get its error.
                Err(_) => {
                    for (k, waiters) in group {
                        match fetch(vec![k.clone()]).await {
                            Ok(mut rows) => {
                                let row = rows.remove(&k);
                                for w in waiters {
                                    let _ = w.send(Ok(row.clone()));
                                }
                            }
                            Err(e) => {
                                let mut waiters = waiters.into_iter();
                                let first = waiters.next();
                                for w in waiters {
                                    let _ = w.send(Err(DbError::Corrupt(e.to_string())));
                                }
                                if let Some(w) = first {
                                    let _ = w.send(Err(e));
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Reads that arrive while every slot is busy are answered by one group each, and
    /// every caller gets its own row (or none).
    #[tokio::test]
    async fn concurrent_reads_are_grouped_and_each_gets_its_row() {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let (c, g) = (calls.clone(), gate.clone());
        let reader: Arc<Reader<u32, String>> = Arc::new(Reader::spawn(move |keys: Vec<u32>| {
            let (c, g) = (c.clone(), g.clone());
            async move {
                // The first groups hold their slots until the test opens the gate.
                if c.fetch_add(1, Ordering::SeqCst) < CONCURRENCY {
                    let _ = g.acquire().await;
                }
                Ok(keys
                    .into_iter()
                    .filter(|k| k % 2 == 0)
                    .map(|k| (k, format!("row {k}")))
                    .collect())
            }
        }));
        let mut tasks = Vec::new();
        // One read at a time until every slot holds one (a lone read is a group).
        for k in 0..CONCURRENCY as u32 {
            let r = reader.clone();
            tasks.push(tokio::spawn(async move { (k, r.get(k).await) }));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while calls.load(Ordering::SeqCst) <= k as usize {
                assert!(
                    std::time::Instant::now() < deadline,
                    "read {k} never started"
                );
                tokio::task::yield_now().await;
            }
        }
        // Every slot is busy: these 100 reads (with repeats) wait together.
        for k in 100..200u32 {
            let r = reader.clone();
            tasks.push(tokio::spawn(async move {
                (k % 50 + 100, r.get(k % 50 + 100).await)
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        gate.add_permits(CONCURRENCY);
        for t in tasks {
            let (k, got) = t.await.unwrap();
            let want = (k % 2 == 0).then(|| format!("row {k}"));
            assert_eq!(got.unwrap(), want, "key {k}");
        }
        // The first groups, then one for all 100 (50 distinct keys).
        assert_eq!(calls.load(Ordering::SeqCst), CONCURRENCY + 1);
    }

    /// A group refused for something other than storage trouble is read key by key: only
    /// the key that fails alone gets the error.
    #[tokio::test]
    async fn a_bad_row_fails_only_its_own_read() {
        let gate = Arc::new(Semaphore::new(0));
        let g = gate.clone();
        let reader: Arc<Reader<u32, String>> = Arc::new(Reader::spawn(move |keys: Vec<u32>| {
            let g = g.clone();
            async move {
                // The first group (key 1) holds every slot's turn until the others queue.
                if keys == [1] {
                    let _ = g.acquire().await;
                }
                if keys.contains(&13) {
                    return Err(DbError::Corrupt("row 13 does not decode".into()));
                }
                Ok(keys.into_iter().map(|k| (k, format!("row {k}"))).collect())
            }
        }));
        let mut busy = Vec::new();
        for _ in 0..CONCURRENCY {
            let r = reader.clone();
            busy.push(tokio::spawn(async move { r.get(1).await }));
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let (r1, r2) = (reader.clone(), reader.clone());
        let bad = tokio::spawn(async move { r1.get(13).await });
        let good = tokio::spawn(async move { r2.get(14).await });
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        gate.add_permits(CONCURRENCY);
        assert_eq!(good.await.unwrap().unwrap(), Some("row 14".to_string()));
        let err = bad.await.unwrap().unwrap_err();
        assert!(matches!(err, DbError::Corrupt(_)), "{err:?}");
        for b in busy {
            assert_eq!(b.await.unwrap().unwrap(), Some("row 1".to_string()));
        }
    }

    #[tokio::test]
    async fn a_failed_group_fails_each_of_its_reads() {
        let reader: Reader<u32, String> = Reader::spawn(|_keys: Vec<u32>| async {
            Err(DbError::Sqlx(sqlx::Error::PoolTimedOut))
        });
        let err = reader.get(1).await.unwrap_err();
        assert!(matches!(err, DbError::Unavailable(_)), "{err:?}");
    }
}
