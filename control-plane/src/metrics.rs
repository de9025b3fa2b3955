//! Prometheus metrics, hand-rolled on atomics: a few gauges, counters and one histogram
//! do not justify a metrics framework.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.buckets[i].load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    agents_online: AtomicU64,
    pub dispatch_latency: Histogram,
    pub batch_latency: Histogram,
    events_stored: AtomicU64,
    commands_finished: AtomicU64,
    protocol_errors: AtomicU64,
}

impl Metrics {
    pub fn set_online(&self, n: usize) {
        self.agents_online.store(n as u64, Relaxed);
    }

    pub fn observe_batch(&self, events: usize, took: Duration) {
        self.events_stored.fetch_add(events as u64, Relaxed);
        self.batch_latency.observe(took);
    }

    pub fn command_finished(&self) {
        self.commands_finished.fetch_add(1, Relaxed);
    }

    pub fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Relaxed);
    }

    pub fn render(&self, by_status: &[(String, i64)]) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP trellis_agents_online Agents connected to this replica.\n# TYPE trellis_agents_online gauge\ntrellis_agents_online {}",
            self.agents_online.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP trellis_commands Commands by status.\n# TYPE trellis_commands gauge"
        );
        for status in [
            "queued",
            "dispatched",
            "running",
            "succeeded",
            "failed",
            "cancelled",
            "timed_out",
        ] {
            let n = by_status
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "trellis_commands{{status=\"{status}\"}} {n}");
        }
        self.dispatch_latency.render(
            "trellis_dispatch_latency_seconds",
            "Time from sending a dispatch to the agent accepting it.",
            &mut out,
        );
        self.batch_latency.render(
            "trellis_event_batch_seconds",
            "Time to store one batch of agent events.",
            &mut out,
        );
        for (name, help, v) in [
            (
                "trellis_events_stored_total",
                "Agent events written.",
                &self.events_stored,
            ),
            (
                "trellis_commands_finished_total",
                "Commands finished by agents.",
                &self.commands_finished,
            ),
            (
                "trellis_protocol_errors_total",
                "Rejected agent frames.",
                &self.protocol_errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        out
    }
}
