//! VMID allocation. Proxmox's `nextid` reserves nothing, so two clones started at once
//! would both be told the same id: the executor picks ids one at a time under its own
//! lock, and keeps ids it handed out off-limits for a while even when Proxmox does not
//! show them yet (a clone that has not registered its VM).
//!
//! The state lives in the [`ProxmoxExecutor`](crate::proxmox::ProxmoxExecutor), not in a
//! process-wide static: one executor is one agent's view of one cluster.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, MutexGuard};
use trellis_protocol::CommandError;

use super::Run;

/// How long an id handed out by this executor stays off-limits even if Proxmox does not
/// show it yet.
const RECENT_ID_TTL: Duration = Duration::from_secs(120);

/// The allocation lock and the ids handed out recently.
#[derive(Debug, Default)]
pub struct VmidAllocator {
    recent: Mutex<Vec<(u32, Instant)>>,
}

impl VmidAllocator {
    /// Waits for the allocation lock. Hold the [`Allocation`] from picking an id until
    /// the clone request that uses it has been answered.
    pub async fn begin(&self) -> Allocation<'_> {
        Allocation {
            recent: self.recent.lock().await,
        }
    }
}

/// The allocation lock, held.
pub struct Allocation<'a> {
    recent: MutexGuard<'a, Vec<(u32, Instant)>>,
}

impl Allocation<'_> {
    /// Ids handed out within the last two minutes (`RECENT_ID_TTL`).
    pub fn recent(&mut self) -> HashSet<u32> {
        self.recent.retain(|(_, t)| t.elapsed() < RECENT_ID_TTL);
        self.recent.iter().map(|(id, _)| *id).collect()
    }

    /// Keeps `id` off-limits for the next allocations.
    pub fn remember(&mut self, id: u32) {
        self.recent.push((id, Instant::now()));
    }
}

impl Run<'_> {
    /// Picks a VMID that is free now and not recently handed out by this executor.
    /// Called with the allocation lock held.
    pub(super) async fn pick_vmid(&self, alloc: &mut Allocation<'_>) -> Result<u32, CommandError> {
        let c = self.client();
        let mut used: HashSet<u32> = c
            .cluster_vms()
            .await
            .map_err(|e| self.api(e))?
            .iter()
            .filter_map(|r| r.vmid())
            .collect();
        used.extend(alloc.recent());
        let mut candidate = match self.p.min_vm_id {
            Some(min) => min.max(100),
            None => c.next_id().await.map_err(|e| self.api(e))?,
        };
        for _ in 0..10_000 {
            if !used.contains(&candidate) {
                if c.is_vmid_free(candidate).await.map_err(|e| self.api(e))? {
                    return Ok(candidate);
                }
                used.insert(candidate);
            }
            candidate = candidate.checked_add(1).ok_or_else(|| {
                CommandError::new("vmid_allocation_failed", "VMID range exhausted")
            })?;
        }
        Err(CommandError::new(
            "vmid_allocation_failed",
            format!(
                "no free VMID found from {}",
                self.p.min_vm_id.unwrap_or(100)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxmox::{ProxmoxExecutor, ProxmoxSettings};

    /// What `pick_vmid` does when Proxmox shows no VM and says every id is free.
    async fn allocate(exec: &ProxmoxExecutor) -> u32 {
        let mut a = exec.provisions().vmids().begin().await;
        let recent = a.recent();
        let id = (100..).find(|id| !recent.contains(id)).unwrap();
        a.remember(id);
        id
    }

    fn executor() -> ProxmoxExecutor {
        ProxmoxExecutor::new(ProxmoxSettings::new(
            "https://127.0.0.1:1",
            "root@pam!t",
            "secret",
        ))
    }

    #[tokio::test]
    async fn allocations_from_one_executor_do_not_collide() {
        let exec = executor();
        // A clone of the executor (as each command's task holds) shares the allocator.
        let same = exec.clone();
        let (a, b) = tokio::join!(allocate(&exec), allocate(&same));
        assert_ne!(a, b);
        let c = allocate(&exec).await;
        assert!(c != a && c != b, "{a} {b} {c}");
    }

    #[tokio::test]
    async fn the_allocation_lock_is_exclusive_and_per_executor() {
        let exec = executor();
        let held = exec.provisions().vmids().begin().await;
        let waiting =
            tokio::time::timeout(Duration::from_millis(50), exec.provisions().vmids().begin())
                .await;
        assert!(
            waiting.is_err(),
            "a second allocation ran while the first held the lock"
        );
        // Another executor (another agent in the same process) is not held up and does
        // not see this one's ids.
        let other = executor();
        assert_eq!(allocate(&other).await, 100);
        drop(held);
        assert_eq!(allocate(&exec).await, 100);
    }
}
