//! Property tests of every decoder the agent WebSocket reaches: arbitrary bytes, arbitrary
//! JSON and mutated valid frames into [`AgentMessage::decode`] / [`ServerMessage::decode`]
//! (what the broker and the agent session call on each text frame), [`Event::validate`]
//! on whatever decodes, [`Command::parse`] (what the agent runs on a dispatch's
//! `command_type` and `params`) and the string validators it uses; and encode → decode
//! round trips of generated valid frames.
//!
//! Each property runs `PROPTEST_CASES` cases (default 512; `PROPTEST_CASES=1000000` for
//! the long run). A panic anywhere fails the property.

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Map, Number, Value};
use trellis_protocol::{
    AgentMessage, CancelReason, Command, CommandError, CommandType, Dispatch, Event, EventAck,
    EventBody, FinalStatus, Hello, Inventory, InventoryVm, LogStream, Outcome, ProtocolError,
    ProtocolErrorCode, ServerMessage, StageState,
};
use uuid::Uuid;

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        // Shrinking output is enough; no regression files in the source tree.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Field names the frames and command params use, so generated objects often hit them.
const KEYS: &[&str] = &[
    "type",
    "kind",
    "command_id",
    "seq",
    "ts",
    "events",
    "acks",
    "running",
    "code",
    "message",
    "protocol_version",
    "min_protocol_version",
    "agent_version",
    "hostname",
    "capabilities",
    "max_concurrency",
    "active_commands",
    "interrupted_commands",
    "facts",
    "vms",
    "vm_id",
    "node",
    "name",
    "status",
    "ip_addresses",
    "tag",
    "agent_id",
    "session_id",
    "heartbeat_interval_secs",
    "features",
    "inventory_interval_secs",
    "command_type",
    "params",
    "deadline_ms",
    "attempt",
    "root_command_id",
    "reason",
    "stage",
    "state",
    "percent",
    "stream",
    "data",
    "result",
    "error",
    "retryable",
    "details",
    "action",
    "ci_user",
    "clone_options",
    "cores",
    "description",
    "disk_size_gib",
    "expected_tag",
    "fail_with",
    "force_after_s",
    "full",
    "ip_config",
    "mode",
    "address",
    "gateway",
    "keep_on_failure",
    "log_line_bytes",
    "log_lines",
    "memory",
    "min_vm_id",
    "network_bridge",
    "network_timeout_secs",
    "onboot",
    "pool",
    "post_provision_commands",
    "pre_provision_commands",
    "progress_events",
    "repo",
    "path",
    "sensitive_vars",
    "skip_post_provision",
    "ssh_keys",
    "storage",
    "tags",
    "target_node",
    "template",
    "template_id",
    "template_node",
    "template_source",
    "terraform_vars",
    "timeout_s",
    "vlan_tag",
    "vmid",
    "workspace_key",
    "duration_ms",
    "outputs",
];

/// Strings the frames give meaning to (types, kinds, enum values, command types).
const WORDS: &[&str] = &[
    "hello",
    "accept",
    "events",
    "heartbeat",
    "error",
    "inventory",
    "welcome",
    "dispatch",
    "cancel",
    "acks",
    "heartbeat_ack",
    "stage",
    "progress",
    "log",
    "finished",
    "pending",
    "running",
    "completed",
    "failed",
    "skipped",
    "stdout",
    "stderr",
    "system",
    "succeeded",
    "cancelled",
    "timed_out",
    "agent_shutdown",
    "ping",
    "provision",
    "list_templates",
    "terraform_apply",
    "vm_power",
    "destroy",
    "unknown",
    "malformed_message",
    "invalid_event",
    "unknown_command",
    "start",
    "shutdown",
    "stop",
    "reboot",
    "dhcp",
    "static",
    "clone",
    "",
    "\u{0}",
    "a\u{0}b",
    "00000000-0000-0000-0000-000000000000",
    "9999999999999999999999",
    "-1",
    "1e400",
    "NaN",
    "trellis-command=00000000-0000-0000-0000-000000000001",
];

fn uuid() -> impl Strategy<Value = Uuid> {
    prop_oneof![
        3 => any::<u128>().prop_map(Uuid::from_u128),
        1 => Just(Uuid::nil()),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(KEYS).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..5).prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        (-1.0f64..200.0).prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        proptest::sample::select(WORDS).prop_map(Value::from),
        uuid().prop_map(|u| Value::from(u.to_string())),
        any::<String>().prop_map(Value::String),
    ]
}

/// Arbitrary JSON whose object keys are mostly the protocol's own field names.
fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..10)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An object with a frame `type` (and sometimes an event `kind`) and arbitrary fields.
fn frame_shaped() -> impl Strategy<Value = Value> {
    (
        proptest::sample::select(WORDS),
        proptest::collection::vec((key(), json()), 0..10),
    )
        .prop_map(|(ty, fields)| {
            let mut m: Map<String, Value> = fields.into_iter().collect();
            m.insert("type".into(), Value::from(ty));
            Value::Object(m)
        })
}

fn finite_percent() -> impl Strategy<Value = f64> {
    prop_oneof![0.0f64..=100.0, Just(0.0), Just(100.0)]
}

fn small_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(2, 16, 4, |inner| {
        proptest::collection::vec((key(), inner), 0..4)
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
    })
}

fn command_error() -> impl Strategy<Value = CommandError> {
    (
        any::<String>(),
        any::<String>(),
        any::<bool>(),
        proptest::option::of(any::<String>()),
        proptest::option::of(small_json()),
    )
        .prop_map(|(code, message, retryable, stage, details)| {
            let mut e = CommandError::new(code, message);
            if retryable {
                e = e.retryable();
            }
            if let Some(s) = stage {
                e = e.at_stage(s);
            }
            if let Some(d) = details.filter(|d| !d.is_null()) {
                e = e.with_details(d);
            }
            e
        })
}

fn event_body() -> impl Strategy<Value = EventBody> {
    let stage_state = proptest::sample::select(vec![
        StageState::Pending,
        StageState::Running,
        StageState::Completed,
        StageState::Failed,
        StageState::Skipped,
    ]);
    let stream = proptest::sample::select(vec![
        LogStream::Stdout,
        LogStream::Stderr,
        LogStream::System,
    ]);
    let status = proptest::sample::select(vec![
        FinalStatus::Succeeded,
        FinalStatus::Failed,
        FinalStatus::Cancelled,
        FinalStatus::TimedOut,
    ]);
    prop_oneof![
        (
            "[a-z_]{1,64}",
            stage_state,
            proptest::option::of(finite_percent()),
            proptest::option::of(any::<String>())
        )
            .prop_map(|(stage, state, percent, message)| EventBody::Stage {
                stage,
                state,
                percent,
                message,
            }),
        (finite_percent(), proptest::option::of(any::<String>()))
            .prop_map(|(percent, message)| EventBody::Progress { percent, message }),
        (stream, any::<String>()).prop_map(|(stream, data)| EventBody::Log { stream, data }),
        (
            status,
            proptest::option::of(small_json().prop_filter("not null", |v| !v.is_null())),
            proptest::option::of(command_error())
        )
            .prop_map(|(status, result, error)| EventBody::Finished(Outcome {
                status,
                result,
                error,
            })),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (uuid(), 1u64..u64::MAX, any::<i64>(), event_body()).prop_map(|(command_id, seq, ts, body)| {
        Event {
            command_id,
            seq,
            ts,
            body,
        }
    })
}

fn error_code() -> impl Strategy<Value = ProtocolErrorCode> {
    proptest::sample::select(vec![
        ProtocolErrorCode::MalformedMessage,
        ProtocolErrorCode::UnexpectedMessage,
        ProtocolErrorCode::UnsupportedProtocolVersion,
        ProtocolErrorCode::FrameTooLarge,
        ProtocolErrorCode::Unauthorized,
        ProtocolErrorCode::Superseded,
        ProtocolErrorCode::Revoked,
        ProtocolErrorCode::TokenRotated,
        ProtocolErrorCode::InvalidEvent,
        ProtocolErrorCode::UnknownCommand,
        ProtocolErrorCode::EventTooLarge,
        ProtocolErrorCode::LogLimit,
        ProtocolErrorCode::Internal,
    ])
}

fn protocol_error() -> impl Strategy<Value = ProtocolError> {
    (
        error_code(),
        any::<String>(),
        proptest::option::of(uuid()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(code, message, command_id, seq)| ProtocolError {
            code,
            message,
            command_id,
            seq,
        })
}

fn command_type() -> impl Strategy<Value = CommandType> {
    proptest::sample::select(CommandType::ALL.to_vec())
}

fn agent_message() -> impl Strategy<Value = AgentMessage> {
    let hello = (
        any::<u32>(),
        proptest::option::of(any::<u32>()),
        any::<String>(),
        any::<String>(),
        proptest::collection::vec(command_type(), 0..6),
        any::<u32>(),
        proptest::collection::vec(uuid(), 0..4),
        proptest::collection::vec(uuid(), 0..4),
        small_json(),
    )
        .prop_map(
            |(
                protocol_version,
                min_protocol_version,
                agent_version,
                hostname,
                capabilities,
                max_concurrency,
                active_commands,
                interrupted_commands,
                facts,
            )| {
                AgentMessage::Hello(Hello {
                    protocol_version,
                    min_protocol_version,
                    agent_version,
                    hostname,
                    capabilities,
                    max_concurrency,
                    active_commands,
                    interrupted_commands,
                    facts,
                })
            },
        );
    let vm = (
        any::<u32>(),
        any::<String>(),
        any::<String>(),
        any::<String>(),
        proptest::collection::vec(any::<String>(), 0..3),
        proptest::option::of(any::<String>()),
    )
        .prop_map(
            |(vm_id, node, name, status, ip_addresses, tag)| InventoryVm {
                vm_id,
                node,
                name,
                status,
                ip_addresses,
                tag,
            },
        );
    prop_oneof![
        hello,
        uuid().prop_map(|command_id| AgentMessage::Accept { command_id }),
        proptest::collection::vec(event(), 0..6).prop_map(|events| AgentMessage::Events { events }),
        any::<u32>().prop_map(|running| AgentMessage::Heartbeat { running }),
        protocol_error().prop_map(AgentMessage::Error),
        proptest::collection::vec(vm, 0..4)
            .prop_map(|vms| AgentMessage::Inventory(Inventory { vms })),
    ]
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    let welcome = (
        any::<u32>(),
        uuid(),
        uuid(),
        any::<u64>(),
        proptest::collection::vec(any::<String>(), 0..3),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(
                protocol_version,
                agent_id,
                session_id,
                heartbeat_interval_secs,
                features,
                inventory_interval_secs,
            )| ServerMessage::Welcome {
                protocol_version,
                agent_id,
                session_id,
                heartbeat_interval_secs,
                features,
                inventory_interval_secs,
                signing_key: None,
            },
        );
    let dispatch = (
        uuid(),
        prop_oneof![
            command_type().prop_map(|t| t.as_str().to_owned()),
            any::<String>()
        ],
        small_json(),
        proptest::option::of(any::<i64>()),
        any::<u32>(),
        proptest::option::of(uuid()),
    )
        .prop_map(
            |(command_id, command_type, params, deadline_ms, attempt, root_command_id)| {
                ServerMessage::Dispatch(Dispatch {
                    command_id,
                    command_type,
                    params,
                    deadline_ms,
                    attempt,
                    root_command_id,
                    signature: None,
                    terraform_state: None,
                })
            },
        );
    prop_oneof![
        welcome,
        dispatch,
        (
            uuid(),
            proptest::sample::select(vec![CancelReason::Cancelled, CancelReason::TimedOut])
        )
            .prop_map(|(command_id, reason)| ServerMessage::Cancel {
                command_id,
                reason,
                signature: None
            }),
        proptest::collection::vec(
            (uuid(), any::<u64>()).prop_map(|(command_id, seq)| EventAck { command_id, seq }),
            0..6
        )
        .prop_map(|acks| ServerMessage::Acks { acks }),
        Just(ServerMessage::HeartbeatAck),
        protocol_error().prop_map(ServerMessage::Error),
    ]
}

/// Replaces the `n`-th node (pre-order, modulo the node count) of `v` with `with`, or
/// removes it when it is an object member and `remove` is set.
fn mutate(v: &mut Value, n: usize, with: Value, remove: bool) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn walk(v: &mut Value, n: &mut usize, with: &mut Option<Value>, remove: bool) -> bool {
        if *n == 0 {
            if let Some(w) = with.take() {
                *v = w;
            }
            return true;
        }
        *n -= 1;
        match v {
            Value::Array(a) => a.iter_mut().any(|c| walk(c, n, with, remove)),
            Value::Object(o) => {
                let keys: Vec<String> = o.keys().cloned().collect();
                for k in keys {
                    if *n == 0 && remove {
                        o.remove(&k);
                        return true;
                    }
                    if walk(o.get_mut(&k).expect("key just listed"), n, with, remove) {
                        return true;
                    }
                }
                false
            }
            _ => false,
        }
    }
    let total = count(v);
    let mut n = n % total;
    walk(v, &mut n, &mut Some(with), remove);
}

/// Equal as JSON, floats within a relative 1e-15: serde_json (without its
/// `float_roundtrip` feature) may parse a float it printed one ULP off.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    same_json(
        &serde_json::to_value(a).expect("serializes"),
        &serde_json::to_value(b).expect("serializes"),
    )
}

/// What the receiving session does with a frame that decoded: validate each event; a
/// dispatch is parsed as a command. Nothing may panic, and a decoded frame encodes back
/// to itself.
fn exercise_agent(msg: &AgentMessage) {
    if let AgentMessage::Events { events } = msg {
        for e in events {
            let _ = e.validate();
        }
    }
    let again = AgentMessage::decode(&msg.encode()).expect("an encoded frame decodes");
    assert!(same(&again, msg), "{again:?} != {msg:?}");
}

fn exercise_server(msg: &ServerMessage) {
    if let ServerMessage::Dispatch(d) = msg {
        let _ = Command::parse(&d.command_type, &d.params);
    }
    let again = ServerMessage::decode(&msg.encode()).expect("an encoded frame decodes");
    assert!(same(&again, msg), "{again:?} != {msg:?}");
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(m) = AgentMessage::decode(&text) {
            exercise_agent(&m);
        }
        if let Ok(m) = ServerMessage::decode(&text) {
            exercise_server(&m);
        }
    }

    #[test]
    fn arbitrary_json_never_panics(v in prop_oneof![json(), frame_shaped()]) {
        let text = v.to_string();
        if let Ok(m) = AgentMessage::decode(&text) {
            exercise_agent(&m);
        }
        if let Ok(m) = ServerMessage::decode(&text) {
            exercise_server(&m);
        }
    }

    #[test]
    fn agent_frames_round_trip(msg in agent_message()) {
        let text = msg.encode();
        let back = AgentMessage::decode(&text).expect("a valid frame decodes");
        prop_assert!(same(&back, &msg), "{:?} != {:?}", back, msg);
        if let AgentMessage::Events { events } = &back {
            for e in events {
                let _ = e.validate();
            }
        }
    }

    #[test]
    fn server_frames_round_trip(msg in server_message()) {
        let text = msg.encode();
        let back = ServerMessage::decode(&text).expect("a valid frame decodes");
        prop_assert!(same(&back, &msg), "{:?} != {:?}", back, msg);
        exercise_server(&back);
    }

    #[test]
    fn mutated_agent_frames_never_panic(
        msg in agent_message(),
        n in any::<usize>(),
        with in json(),
        remove in any::<bool>(),
    ) {
        let mut v = serde_json::to_value(&msg).expect("serializes");
        mutate(&mut v, n, with, remove);
        if let Ok(m) = AgentMessage::decode(&v.to_string()) {
            exercise_agent(&m);
        }
    }

    #[test]
    fn mutated_server_frames_never_panic(
        msg in server_message(),
        n in any::<usize>(),
        with in json(),
        remove in any::<bool>(),
    ) {
        let mut v = serde_json::to_value(&msg).expect("serializes");
        mutate(&mut v, n, with, remove);
        if let Ok(m) = ServerMessage::decode(&v.to_string()) {
            exercise_server(&m);
        }
    }

    #[test]
    fn event_validate_never_panics_and_keeps_its_rules(e in event(), stage in any::<String>()) {
        let ok = e.validate().is_ok();
        if let EventBody::Log { data, .. } = &e.body {
            prop_assert_eq!(ok, data.len() <= trellis_protocol::MAX_LOG_CHUNK_BYTES);
        }
        let mut e2 = e.clone();
        e2.body = EventBody::Stage { stage: stage.clone(), state: StageState::Running, percent: None, message: None };
        let stage_ok = !stage.is_empty()
            && stage.len() <= trellis_protocol::MAX_STAGE_NAME_BYTES
            && !stage.chars().any(char::is_control);
        prop_assert_eq!(e2.validate().is_ok(), stage_ok);
        e2.seq = 0;
        prop_assert!(e2.validate().is_err(), "seq 0 is refused");
    }

    #[test]
    fn command_params_never_panic(
        ty in prop_oneof![
            4 => command_type().prop_map(|t| t.as_str().to_owned()),
            1 => any::<String>()
        ],
        params in prop_oneof![json(), proptest::collection::vec((key(), json()), 0..12)
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))],
    ) {
        match Command::parse(&ty, &params) {
            Ok(cmd) => prop_assert_eq!(cmd.command_type().as_str(), ty.as_str()),
            Err(e) => prop_assert!(!e.code.is_empty()),
        }
    }

    #[test]
    fn string_validators_never_panic(s in any::<String>()) {
        let _ = trellis_protocol::validate_vm_name(&s);
        let _ = trellis_protocol::validate_ssh_key(&s);
        let _ = trellis_protocol::valid_proxmox_tag(&s);
        let _ = trellis_protocol::tag_from_proxmox_tags(&s);
    }
}

#[test]
fn oversized_frames_are_refused_before_parsing() {
    let big = format!(
        "{{\"type\":\"heartbeat\",\"pad\":\"{}\"}}",
        "x".repeat(trellis_protocol::MAX_FRAME_BYTES)
    );
    assert!(matches!(
        AgentMessage::decode(&big),
        Err(trellis_protocol::DecodeError::TooLarge(_))
    ));
    assert!(matches!(
        ServerMessage::decode(&big),
        Err(trellis_protocol::DecodeError::TooLarge(_))
    ));
}
