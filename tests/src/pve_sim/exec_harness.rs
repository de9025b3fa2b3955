//! Drives the agent's Proxmox executors directly (no control plane): builds an
//! [`ExecContext`] whose reports land in a channel the test inspects.

use std::time::Instant;

use tendril::exec::{ExecContext, Report};
use tendril::proxmox::{ProxmoxExecutor, ProxmoxSettings};
use tokio::sync::mpsc;
use trellis_protocol::{
    CommandError, EventBody, LogStream, ProvisionParams, ProvisionResult, StageState,
};
use uuid::Uuid;

use super::process::SimProcess;
use super::state::{DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET};

/// Settings that reach `sim` with the default token.
pub fn settings_for(sim: &SimProcess) -> ProxmoxSettings {
    let mut s = ProxmoxSettings::new(sim.url.clone(), DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET);
    s.tls_fingerprint = sim.fingerprint.clone();
    s
}

/// A Proxmox executor for `sim` with the default token. Commands that must share VMID
/// allocation and per-command locks (as on one agent) use the same executor.
pub fn executor_for(sim: &SimProcess) -> ProxmoxExecutor {
    ProxmoxExecutor::new(settings_for(sim))
}

/// An executor context plus the receiving end of its reports, each stamped with the time
/// it arrived.
pub struct Recorded {
    pub ctx: ExecContext,
    executor: ProxmoxExecutor,
    rx: mpsc::Receiver<Report>,
    events: Vec<(Instant, EventBody)>,
}

impl Recorded {
    /// A fresh command on `executor` (`root` = its own id unless given).
    pub fn new(executor: &ProxmoxExecutor, root: Option<Uuid>) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(100_000);
        let id = Uuid::new_v4();
        let ctx = ExecContext::new(id, root.unwrap_or(id), 1, tx);
        Ok(Self {
            ctx,
            executor: executor.clone(),
            rx,
            events: Vec::new(),
        })
    }

    /// Runs the `provision` executor, recording reports as they arrive.
    pub async fn provision(&mut self, p: ProvisionParams) -> Result<ProvisionResult, CommandError> {
        let ctx = self.ctx.clone();
        let executor = self.executor.clone();
        let fut = executor.provision(&ctx, p);
        tokio::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => {
                    self.drain();
                    return r;
                }
                Some(rep) = self.rx.recv() => self.events.push((Instant::now(), rep.body)),
            }
        }
    }

    /// Moves every report received so far into `events`.
    pub fn drain(&mut self) -> &[(Instant, EventBody)] {
        while let Ok(r) = self.rx.try_recv() {
            self.events.push((Instant::now(), r.body));
        }
        &self.events
    }

    /// Waits for the next report (for tests that act mid-run).
    pub async fn next(&mut self) -> Option<EventBody> {
        let r = self.rx.recv().await?;
        self.events.push((Instant::now(), r.body.clone()));
        Some(r.body)
    }

    /// `(stage, state)` in the order reported.
    pub fn stages(&mut self) -> Vec<(String, StageState)> {
        self.drain()
            .iter()
            .filter_map(|(_, e)| match e {
                EventBody::Stage { stage, state, .. } => Some((stage.clone(), *state)),
                _ => None,
            })
            .collect()
    }

    /// Stage events with their message and arrival time.
    pub fn stage_events(&mut self) -> Vec<(Instant, String, StageState, Option<String>)> {
        self.drain()
            .iter()
            .filter_map(|(t, e)| match e {
                EventBody::Stage {
                    stage,
                    state,
                    message,
                    ..
                } => Some((*t, stage.clone(), *state, message.clone())),
                _ => None,
            })
            .collect()
    }

    /// All log text of one stream.
    pub fn log(&mut self, stream: LogStream) -> String {
        self.drain()
            .iter()
            .filter_map(|(_, e)| match e {
                EventBody::Log { stream: s, data } if *s == stream => Some(data.as_str()),
                _ => None,
            })
            .collect()
    }
}
