//! Prometheus metrics through `prometheus-client`: agents online, dispatch and event-batch
//! latency, command durations per type and outcome (the provisioning latency operators
//! ask for), stage durations, commands by status and queue depth per agent. The counts
//! that need the database are refreshed at most every [`COUNTS_MAX_AGE`] whatever the
//! scrape rate, so a scrape never costs a full-table scan.

use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::db::Db;
use crate::model::CommandStatus;

/// How stale the database-derived counts may be.
pub const COUNTS_MAX_AGE: Duration = Duration::from_secs(15);

const FAST_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Commands and stages run from milliseconds (ping) to hours (a Terraform apply).
const SLOW_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

fn fast() -> Histogram {
    Histogram::new(FAST_BUCKETS)
}

fn slow() -> Histogram {
    Histogram::new(SLOW_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    r#type: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

pub struct Metrics {
    registry: Registry,
    agents_online: Gauge,
    leader: Gauge,
    dispatch_latency: Histogram,
    batch_latency: Histogram,
    events_stored: Counter,
    commands_finished: Counter,
    protocol_errors: Counter,
    command_duration: Family<CommandLabels, Histogram, fn() -> Histogram>,
    stage_duration: Family<StageLabels, Histogram, fn() -> Histogram>,
    commands: Family<StatusLabels, Gauge>,
    queue_depth: Family<AgentLabels, Gauge>,
    /// When the database-derived counts were last refreshed (held while refreshing, so
    /// concurrent scrapes wait for one refresh instead of each running it).
    counts_at: tokio::sync::Mutex<Option<Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let agents_online = Gauge::default();
        registry.register(
            "agents_online",
            "Agents connected to this replica",
            agents_online.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "housekeeping_leader",
            "1 while this replica runs the cluster-wide housekeeping",
            leader.clone(),
        );
        let dispatch_latency = fast();
        registry.register(
            "dispatch_latency_seconds",
            "Time from sending a dispatch to the agent accepting it",
            dispatch_latency.clone(),
        );
        let batch_latency = fast();
        registry.register(
            "event_batch_seconds",
            "Time to store one batch of agent events",
            batch_latency.clone(),
        );
        let events_stored = Counter::default();
        registry.register(
            "events_stored",
            "Agent events written",
            events_stored.clone(),
        );
        let commands_finished = Counter::default();
        registry.register(
            "commands_finished",
            "Commands finished by agents",
            commands_finished.clone(),
        );
        let protocol_errors = Counter::default();
        registry.register(
            "protocol_errors",
            "Rejected agent frames",
            protocol_errors.clone(),
        );
        let command_duration =
            Family::<CommandLabels, Histogram, fn() -> Histogram>::new_with_constructor(slow);
        registry.register(
            "command_duration_seconds",
            "Commands finished by agents: time from creation to the end, by type and outcome",
            command_duration.clone(),
        );
        let stage_duration =
            Family::<StageLabels, Histogram, fn() -> Histogram>::new_with_constructor(slow);
        registry.register(
            "stage_duration_seconds",
            "Stages that finished: how long each ran, by stage and outcome",
            stage_duration.clone(),
        );
        let commands = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "commands",
            "Stored commands by status (refreshed at most every 15 s)",
            commands.clone(),
        );
        let queue_depth = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "agent_queue_depth",
            "Queued commands per agent (refreshed at most every 15 s)",
            queue_depth.clone(),
        );
        Self {
            registry,
            agents_online,
            leader,
            dispatch_latency,
            batch_latency,
            events_stored,
            commands_finished,
            protocol_errors,
            command_duration,
            stage_duration,
            commands,
            queue_depth,
            counts_at: tokio::sync::Mutex::new(None),
        }
    }
}

fn secs(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

impl Metrics {
    pub fn set_online(&self, n: usize) {
        self.agents_online.set(n as i64);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn observe_dispatch(&self, took: Duration) {
        self.dispatch_latency.observe(took.as_secs_f64());
    }

    pub fn observe_batch(&self, events: usize, took: Duration) {
        self.events_stored.inc_by(events as u64);
        self.batch_latency.observe(took.as_secs_f64());
    }

    pub fn command_finished(&self, command_type: &str, outcome: CommandStatus, millis: i64) {
        self.commands_finished.inc();
        self.command_duration
            .get_or_create(&CommandLabels {
                r#type: command_type.to_string(),
                outcome: outcome.as_str().to_string(),
            })
            .observe(secs(millis));
    }

    pub fn stage_finished(&self, stage: &str, outcome: &str, millis: i64) {
        self.stage_duration
            .get_or_create(&StageLabels {
                stage: stage.to_string(),
                outcome: outcome.to_string(),
            })
            .observe(secs(millis));
    }

    pub fn protocol_error(&self) {
        self.protocol_errors.inc();
    }

    /// Refreshes the database-derived gauges if they are older than [`COUNTS_MAX_AGE`].
    async fn refresh_counts(&self, db: &Db) {
        let mut at = self.counts_at.lock().await;
        if at.is_some_and(|t| t.elapsed() < COUNTS_MAX_AGE) {
            return;
        }
        match db.count_by_status().await {
            Ok(by_status) => {
                for s in CommandStatus::ALL {
                    let n = by_status
                        .iter()
                        .find(|(st, _)| st == s)
                        .map_or(0, |(_, n)| *n);
                    self.commands
                        .get_or_create(&StatusLabels {
                            status: s.as_str().to_string(),
                        })
                        .set(n);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot count commands for metrics"),
        }
        match db.queue_depths().await {
            Ok(depths) => {
                self.queue_depth.clear();
                for (agent, n) in depths {
                    self.queue_depth
                        .get_or_create(&AgentLabels {
                            agent: agent.to_string(),
                        })
                        .set(n);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read queue depths for metrics"),
        }
        *at = Some(Instant::now());
    }

    /// The text exposition of every metric.
    pub async fn render(&self, db: &Db) -> String {
        self.refresh_counts(db).await;
        let mut out = String::with_capacity(8192);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renders_labelled_durations_and_cached_counts() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        let m = Metrics::default();
        m.command_finished("provision", CommandStatus::Succeeded, 42_000);
        m.stage_finished("clone", "completed", 3_000);
        m.set_online(3);
        let text = m.render(&db).await;
        assert!(text.contains("trellis_agents_online 3"), "{text}");
        assert!(
            text.contains(
                "trellis_command_duration_seconds_count{type=\"provision\",outcome=\"succeeded\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "trellis_command_duration_seconds_bucket{le=\"60.0\",type=\"provision\",outcome=\"succeeded\"} 1"
            ) || text.contains("le=\"60.0\""),
            "{text}"
        );
        assert!(
            text.contains(
                "trellis_stage_duration_seconds_count{stage=\"clone\",outcome=\"completed\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("trellis_commands{status=\"queued\"} 0"),
            "{text}"
        );
    }
}
