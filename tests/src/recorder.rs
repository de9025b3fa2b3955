//! Drives an agent executor directly (no control plane, no session): an
//! [`ExecContext`] whose reports land in a channel, recorded with their arrival time.

use std::future::Future;
use std::time::Instant;

use tendril::exec::{ExecContext, Report};
use tokio::sync::mpsc;
use trellis_protocol::{EventBody, LogStream, StageState};
use uuid::Uuid;

/// One report, stamped with the time it arrived.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub body: EventBody,
}

/// An executor context for one command plus the receiving end of its reports.
pub struct Recorder {
    pub ctx: ExecContext,
    rx: mpsc::Receiver<Report>,
    events: Vec<Seen>,
}

impl Recorder {
    /// A fresh command, attempt 1 (`root` = its own id unless given).
    pub fn new(root: Option<Uuid>) -> Self {
        let (tx, rx) = mpsc::channel(100_000);
        let id = Uuid::new_v4();
        Self {
            ctx: ExecContext::new(id, root.unwrap_or(id), 1, tx),
            rx,
            events: Vec::new(),
        }
    }

    /// Runs `exec` (given a clone of the context), recording reports as they arrive.
    pub async fn run<T, F, Fut>(&mut self, exec: F) -> T
    where
        F: FnOnce(ExecContext) -> Fut,
        Fut: Future<Output = T>,
    {
        self.run_with(exec, |_, _| {}).await
    }

    /// Like [`Recorder::run`]; `on_event` sees each report as it arrives (and may, say,
    /// cancel through the context).
    pub async fn run_with<T, F, Fut>(
        &mut self,
        exec: F,
        mut on_event: impl FnMut(&Seen, &ExecContext),
    ) -> T
    where
        F: FnOnce(ExecContext) -> Fut,
        Fut: Future<Output = T>,
    {
        let fut = exec(self.ctx.clone());
        tokio::pin!(fut);
        let result = loop {
            tokio::select! {
                biased;
                Some(r) = self.rx.recv() => {
                    let seen = Seen { at: Instant::now(), body: r.body };
                    on_event(&seen, &self.ctx);
                    self.events.push(seen);
                }
                r = &mut fut => break r,
            }
        };
        self.drain();
        result
    }

    /// Moves every report received so far into the record; returns the record.
    pub fn drain(&mut self) -> &[Seen] {
        while let Ok(r) = self.rx.try_recv() {
            self.events.push(Seen {
                at: Instant::now(),
                body: r.body,
            });
        }
        &self.events
    }

    /// Waits for the next report (for tests that act mid-run).
    pub async fn next(&mut self) -> Option<EventBody> {
        let r = self.rx.recv().await?;
        self.events.push(Seen {
            at: Instant::now(),
            body: r.body.clone(),
        });
        Some(r.body)
    }

    /// The reports recorded so far (see [`Recorder::drain`]).
    pub fn events(&self) -> &[Seen] {
        &self.events
    }

    pub fn into_events(mut self) -> Vec<Seen> {
        self.drain();
        self.events
    }

    /// `(stage, state)` in the order reported.
    pub fn stages(&mut self) -> Vec<(String, StageState)> {
        stages(self.drain())
    }

    /// Stage events with their message and arrival time.
    pub fn stage_events(&mut self) -> Vec<(Instant, String, StageState, Option<String>)> {
        self.drain()
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Stage {
                    stage,
                    state,
                    message,
                    ..
                } => Some((e.at, stage.clone(), *state, message.clone())),
                _ => None,
            })
            .collect()
    }

    /// All log text of one stream.
    pub fn log(&mut self, stream: LogStream) -> String {
        logs(self.drain(), Some(stream))
    }
}

/// `(stage, state)` in the order reported.
pub fn stages(events: &[Seen]) -> Vec<(String, StageState)> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Stage { stage, state, .. } => Some((stage.clone(), *state)),
            _ => None,
        })
        .collect()
}

/// All log text of one stream, or of all streams.
pub fn logs(events: &[Seen], stream: Option<LogStream>) -> String {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Log { stream: s, data } if stream.is_none_or(|x| x == *s) => {
                Some(data.as_str())
            }
            _ => None,
        })
        .collect()
}

/// When `stage` reached `state` (panics when it never did).
pub fn stage_time(events: &[Seen], stage: &str, state: StageState) -> Instant {
    events
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Stage {
                stage: s,
                state: st,
                ..
            } if s == stage && *st == state => Some(e.at),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {stage} {state:?} event"))
}
