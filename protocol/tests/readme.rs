//! Every example frame in `protocol/README.md` parses, round-trips through serde without
//! losing or renaming a field, and matches the checked-in JSON Schema; every message type,
//! event kind and command type has an example.
//!
//! Blocks are fenced as ```` ```json agent ````, ```` ```json server ````,
//! ```` ```json params:<type> ```` or ```` ```json result:<type> ````.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use trellis_protocol::*;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `(info string, body)` of every fenced block whose info string starts with `json `.
fn readme_blocks() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(manifest_dir().join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        match &mut current {
            None => {
                if let Some(info) = line.strip_prefix("```json ") {
                    current = Some((info.trim().to_string(), String::new()));
                }
            }
            Some((_, body)) => {
                if line.starts_with("```") {
                    blocks.push(current.take().unwrap());
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    assert!(current.is_none(), "unterminated code block in README.md");
    blocks
}

fn load_schema(file: &str) -> Value {
    let text = std::fs::read_to_string(manifest_dir().join("schema").join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

// ---------------------------------------------------------------------------------------
// A small JSON Schema checker for the subset schemars emits ($ref to #/$defs, type, const,
// enum, properties, required, additionalProperties, items, oneOf/anyOf/allOf, numeric
// ranges, string lengths). `pattern` and `format` are not checked.

fn check(root: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let obj = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => {
            errors.push(format!("{path}: no value allowed"));
            return;
        }
        Value::Object(o) => o,
        _ => panic!("not a schema at {path}: {schema}"),
    };
    if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/$defs/").expect("local $ref");
        let target = root["$defs"]
            .get(name)
            .unwrap_or_else(|| panic!("missing $defs/{name}"));
        check(root, target, value, path, errors);
    }
    if let Some(t) = obj.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => panic!("bad type"),
        };
        let ok = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "number" => value.is_number(),
            "integer" => {
                value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            other => panic!("unknown type {other}"),
        });
        if !ok {
            errors.push(format!("{path}: {value} is not of type {t}"));
            return;
        }
    }
    if let Some(c) = obj.get("const") {
        if !json_eq(c, value) {
            errors.push(format!("{path}: {value} is not {c}"));
        }
    }
    if let Some(Value::Array(e)) = obj.get("enum") {
        if !e.iter().any(|c| json_eq(c, value)) {
            errors.push(format!("{path}: {value} is not one of {e:?}"));
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = obj.get("minimum").and_then(Value::as_f64) {
            if n < min {
                errors.push(format!("{path}: {n} < minimum {min}"));
            }
        }
        if let Some(max) = obj.get("maximum").and_then(Value::as_f64) {
            if n > max {
                errors.push(format!("{path}: {n} > maximum {max}"));
            }
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if obj
            .get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len < m)
        {
            errors.push(format!("{path}: string shorter than minLength"));
        }
        if obj
            .get("maxLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len > m)
        {
            errors.push(format!("{path}: string longer than maxLength"));
        }
    }
    if let Value::Object(map) = value {
        let props = obj.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(req)) = obj.get("required") {
            for r in req.iter().filter_map(Value::as_str) {
                if !map.contains_key(r) {
                    errors.push(format!("{path}: missing required field {r:?}"));
                }
            }
        }
        for (k, v) in map {
            let sub = format!("{path}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(root, s, v, &sub, errors),
                None => {
                    if let Some(extra) = obj.get("additionalProperties") {
                        check(root, extra, v, &sub, errors);
                    }
                }
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, obj.get("items")) {
        for (i, v) in items.iter().enumerate() {
            check(root, item_schema, v, &format!("{path}[{i}]"), errors);
        }
    }
    if let Some(Value::Array(all)) = obj.get("allOf") {
        for s in all {
            check(root, s, value, path, errors);
        }
    }
    let passing = |list: &Vec<Value>| {
        list.iter()
            .filter(|s| {
                let mut e = Vec::new();
                check(root, s, value, path, &mut e);
                e.is_empty()
            })
            .count()
    };
    if let Some(Value::Array(any)) = obj.get("anyOf") {
        if passing(any) == 0 {
            errors.push(format!("{path}: {value} matches none of anyOf"));
        }
    }
    if let Some(Value::Array(one)) = obj.get("oneOf") {
        let n = passing(one);
        if n != 1 {
            errors.push(format!(
                "{path}: {value} matches {n} of oneOf (want exactly 1)"
            ));
        }
    }
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn validate(root: &Value, schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check(root, schema, value, "$", &mut errors);
    errors
}

/// Every field of `written` is in `encoded` with the same value: nothing the README shows
/// was dropped, renamed or changed by a parse and re-encode.
fn assert_subset(written: &Value, encoded: &Value, path: &str) {
    match (written, encoded) {
        (Value::Object(w), Value::Object(e)) => {
            for (k, v) in w {
                let Some(ev) = e.get(k) else {
                    panic!("{path}.{k} is lost when the example is parsed and re-encoded (unknown field?)")
                };
                assert_subset(v, ev, &format!("{path}.{k}"));
            }
        }
        (Value::Array(w), Value::Array(e)) => {
            assert_eq!(w.len(), e.len(), "{path}: array length changed");
            for (i, (w, e)) in w.iter().zip(e).enumerate() {
                assert_subset(w, e, &format!("{path}[{i}]"));
            }
        }
        (w, e) => assert!(json_eq(w, e), "{path}: {w} became {e}"),
    }
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    written: &Value,
    what: &str,
) -> T {
    let typed: T = serde_json::from_value(written.clone())
        .unwrap_or_else(|e| panic!("{what}: README example does not parse: {e}\n{written}"));
    let encoded = serde_json::to_value(&typed).unwrap();
    assert_subset(written, &encoded, what);
    let again: T = serde_json::from_value(encoded).unwrap();
    assert_eq!(again, typed, "{what}: not stable through encode/decode");
    typed
}

fn agent_type(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Hello(_) => "hello",
        AgentMessage::Accept { .. } => "accept",
        AgentMessage::Events { .. } => "events",
        AgentMessage::Heartbeat { .. } => "heartbeat",
        AgentMessage::Error(_) => "error",
        AgentMessage::Inventory(_) => "inventory",
    }
}

fn server_type(m: &ServerMessage) -> &'static str {
    match m {
        ServerMessage::Welcome { .. } => "welcome",
        ServerMessage::Dispatch(_) => "dispatch",
        ServerMessage::Cancel { .. } => "cancel",
        ServerMessage::Acks { .. } => "acks",
        ServerMessage::HeartbeatAck => "heartbeat_ack",
        ServerMessage::Error(_) => "error",
    }
}

fn check_result(ty: &str, v: &Value) {
    let what = format!("result:{ty}");
    match ty {
        "ping" => drop(round_trip::<PingResult>(v, &what)),
        "provision" => drop(round_trip::<ProvisionResult>(v, &what)),
        "list_templates" => drop(round_trip::<ListTemplatesResult>(v, &what)),
        "terraform_apply" => drop(round_trip::<TerraformApplyResult>(v, &what)),
        "terraform_plan" => drop(round_trip::<TerraformPlanResult>(v, &what)),
        "terraform_destroy" => drop(round_trip::<TerraformDestroyResult>(v, &what)),
        "vm_power" => drop(round_trip::<VmPowerResult>(v, &what)),
        "destroy" => drop(round_trip::<DestroyResult>(v, &what)),
        other => panic!("unknown command type {other:?} in a README block"),
    }
}

fn check_params(ty: &str, v: &Value) {
    let what = format!("params:{ty}");
    let cmd = Command::parse(ty, v).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(cmd.command_type().as_str(), ty);
    match ty {
        "ping" => drop(round_trip::<PingParams>(v, &what)),
        "provision" => drop(round_trip::<ProvisionParams>(v, &what)),
        "list_templates" => drop(round_trip::<ListTemplatesParams>(v, &what)),
        "terraform_apply" | "terraform_plan" | "terraform_destroy" => {
            drop(round_trip::<TerraformApplyParams>(v, &what))
        }
        "vm_power" => drop(round_trip::<VmPowerParams>(v, &what)),
        "destroy" => drop(round_trip::<DestroyParams>(v, &what)),
        other => panic!("unknown command type {other:?} in a README block"),
    }
}

#[test]
fn readme_examples_parse_round_trip_and_match_the_schemas() {
    let agent_schema = load_schema("agent-message.schema.json");
    let server_schema = load_schema("server-message.schema.json");
    let commands_schema = load_schema("commands.schema.json");
    let mut agent_types = BTreeSet::new();
    let mut server_types = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    let mut params_seen = BTreeSet::new();
    let mut results_seen = BTreeSet::new();
    let blocks = readme_blocks();
    assert!(!blocks.is_empty());
    for (info, body) in &blocks {
        let value: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("README block `{info}` is not JSON: {e}\n{body}"));
        let (schema_root, schema, what) = match info.as_str() {
            "agent" => {
                let msg = AgentMessage::decode(body)
                    .unwrap_or_else(|e| panic!("agent frame does not decode: {e}\n{body}"));
                agent_types.insert(agent_type(&msg));
                if let AgentMessage::Events { events } = &msg {
                    for ev in events {
                        ev.validate().unwrap();
                        kinds.insert(match ev.body {
                            EventBody::Stage { .. } => "stage",
                            EventBody::Progress { .. } => "progress",
                            EventBody::Log { .. } => "log",
                            EventBody::Finished(_) => "finished",
                        });
                    }
                }
                let typed: AgentMessage = round_trip(&value, info);
                assert_eq!(AgentMessage::decode(&typed.encode()).unwrap(), msg);
                (&agent_schema, &agent_schema, info.clone())
            }
            "server" => {
                let msg = ServerMessage::decode(body)
                    .unwrap_or_else(|e| panic!("server frame does not decode: {e}\n{body}"));
                server_types.insert(server_type(&msg));
                if let ServerMessage::Dispatch(d) = &msg {
                    Command::parse(&d.command_type, &d.params).unwrap();
                }
                let typed: ServerMessage = round_trip(&value, info);
                assert_eq!(ServerMessage::decode(&typed.encode()).unwrap(), msg);
                (&server_schema, &server_schema, info.clone())
            }
            other => {
                let (side, ty) = other
                    .split_once(':')
                    .unwrap_or_else(|| panic!("unknown README block kind `{other}`"));
                let name = CommandType::parse(ty)
                    .unwrap_or_else(|| panic!("unknown command type in `{other}`"));
                // The Terraform commands share terraform_apply's params type.
                let name = match (side, name) {
                    ("params", CommandType::TerraformPlan | CommandType::TerraformDestroy) => {
                        CommandType::TerraformApply
                    }
                    _ => name,
                };
                let def = format!(
                    "{}{}",
                    name.as_str()
                        .split('_')
                        .map(|w| w[..1].to_uppercase() + &w[1..])
                        .collect::<String>(),
                    if side == "params" { "Params" } else { "Result" }
                );
                match side {
                    "params" => {
                        check_params(ty, &value);
                        params_seen.insert(ty.to_string());
                    }
                    "result" => {
                        check_result(ty, &value);
                        results_seen.insert(ty.to_string());
                    }
                    _ => panic!("unknown README block kind `{other}`"),
                }
                let errors = validate(&commands_schema, &commands_schema["$defs"][&def], &value);
                assert!(
                    errors.is_empty(),
                    "{other} does not match $defs/{def}: {errors:?}"
                );
                // and through the root: {command_type, params|result}
                let mut wrapped = Map::new();
                wrapped.insert("command_type".into(), Value::String(ty.into()));
                wrapped.insert(side.into(), value.clone());
                let errors = validate(&commands_schema, &commands_schema, &Value::Object(wrapped));
                assert!(errors.is_empty(), "{other} via the root schema: {errors:?}");
                continue;
            }
        };
        let errors = validate(schema_root, schema, &value);
        assert!(
            errors.is_empty(),
            "{what} example does not match its schema: {errors:?}\n{body}"
        );
    }
    let all = |names: &[&'static str]| names.iter().copied().collect::<BTreeSet<_>>();
    assert_eq!(
        agent_types,
        all(&[
            "hello",
            "accept",
            "events",
            "heartbeat",
            "error",
            "inventory"
        ]),
        "every agent message needs an example"
    );
    assert_eq!(
        server_types,
        all(&[
            "welcome",
            "dispatch",
            "cancel",
            "acks",
            "heartbeat_ack",
            "error"
        ]),
        "every server message needs an example"
    );
    assert_eq!(kinds, all(&["stage", "progress", "log", "finished"]));
    let types: BTreeSet<String> = CommandType::ALL.iter().map(|t| t.as_str().into()).collect();
    assert_eq!(
        params_seen, types,
        "every command type needs a params example"
    );
    assert_eq!(
        results_seen, types,
        "every command type needs a result example"
    );
}

/// The checker is not vacuous: frames that break the schema are caught.
#[test]
fn schema_checker_rejects_bad_frames() {
    let agent = load_schema("agent-message.schema.json");
    let server = load_schema("server-message.schema.json");
    let id = "3f2b6c1d-8e4a-4f5b-9c7d-0a1b2c3d4e5f";
    for bad in [
        serde_json::json!({"type": "hello", "protocol_version": 2, "agent_version": "x"}),
        serde_json::json!({"type": "nope"}),
        serde_json::json!({"type": "accept"}),
        serde_json::json!({"type": "events", "events": [{"command_id": id, "seq": 1, "ts": 1,
            "kind": "progress", "percent": 150}]}),
        serde_json::json!({"type": "events", "events": [{"command_id": id, "seq": 0, "ts": 1,
            "kind": "log", "stream": "stdout", "data": ""}]}),
        serde_json::json!({"type": "events", "events": [{"command_id": id, "seq": 1, "ts": 1,
            "kind": "stage", "stage": "", "state": "running"}]}),
        serde_json::json!({"type": "events", "events": [{"command_id": id, "seq": 1, "ts": 1,
            "kind": "finished", "status": "exploded"}]}),
        serde_json::json!({"type": "heartbeat", "running": -1}),
    ] {
        assert!(!validate(&agent, &agent, &bad).is_empty(), "accepted {bad}");
    }
    for bad in [
        serde_json::json!({"type": "cancel", "command_id": id, "reason": "agent_shutdown"}),
        serde_json::json!({"type": "welcome", "protocol_version": 2}),
        serde_json::json!({"type": "error", "code": "unknown", "message": "x"}),
        serde_json::json!({"type": "dispatch", "command_id": id, "command_type": "ping"}),
    ] {
        assert!(
            !validate(&server, &server, &bad).is_empty(),
            "accepted {bad}"
        );
    }
    let ok = serde_json::json!({"type": "heartbeat_ack"});
    assert!(validate(&server, &server, &ok).is_empty());
}

/// Every variant, built in Rust, round-trips through its JSON text and matches the schema
/// (independent of the README).
#[test]
fn every_variant_round_trips_and_matches_the_schema() {
    let agent_schema = load_schema("agent-message.schema.json");
    let server_schema = load_schema("server-message.schema.json");
    let id = uuid::Uuid::from_u128(0x3f2b6c1d_8e4a_4f5b_9c7d_0a1b2c3d4e5f);
    let ev = |seq, body| Event {
        command_id: id,
        seq,
        ts: 1_795_599_672_726,
        body,
    };
    let agent = [
        AgentMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: Some(MIN_PROTOCOL_VERSION),
            agent_version: "0.1.0".into(),
            hostname: "pve1".into(),
            capabilities: CommandType::ALL.to_vec(),
            max_concurrency: 2,
            active_commands: vec![id],
            interrupted_commands: vec![],
            facts: serde_json::json!({"nodes": ["pve1"]}),
        }),
        AgentMessage::Accept { command_id: id },
        AgentMessage::Events {
            events: vec![
                ev(
                    1,
                    EventBody::Stage {
                        stage: "init".into(),
                        state: StageState::Running,
                        percent: Some(3.33),
                        message: None,
                    },
                ),
                ev(
                    2,
                    EventBody::Progress {
                        percent: 50.0,
                        message: Some("half".into()),
                    },
                ),
                ev(
                    3,
                    EventBody::Log {
                        stream: LogStream::System,
                        data: "x\n".into(),
                    },
                ),
                ev(
                    4,
                    EventBody::Finished(Outcome {
                        status: FinalStatus::Failed,
                        result: None,
                        error: Some(CommandError::new("boom", "it broke").retryable()),
                    }),
                ),
            ],
        },
        AgentMessage::Heartbeat { running: 1 },
        AgentMessage::Error(ProtocolError::new(
            ProtocolErrorCode::MalformedMessage,
            "what?",
        )),
        AgentMessage::Inventory(Inventory {
            vms: vec![InventoryVm {
                vm_id: 101,
                node: "pve1".into(),
                name: "web-1".into(),
                status: "running".into(),
                ip_addresses: vec!["10.0.0.2".into()],
                tag: Some(vm_tag(id)),
            }],
        }),
    ];
    for msg in agent {
        let text = msg.encode();
        assert_eq!(AgentMessage::decode(&text).unwrap(), msg, "{text}");
        let value: Value = serde_json::from_str(&text).unwrap();
        let errors = validate(&agent_schema, &agent_schema, &value);
        assert!(errors.is_empty(), "{text}: {errors:?}");
    }
    let server = [
        ServerMessage::Welcome {
            protocol_version: 2,
            agent_id: id,
            session_id: id,
            heartbeat_interval_secs: 15,
            features: vec![FEATURE_INVENTORY.into()],
            inventory_interval_secs: Some(30),
            signing_key: None,
        },
        ServerMessage::Dispatch(Dispatch {
            command_id: id,
            command_type: "ping".into(),
            params: serde_json::json!({}),
            deadline_ms: None,
            attempt: 1,
            root_command_id: Some(id),
            signature: None,
            terraform_state: None,
        }),
        ServerMessage::Cancel {
            command_id: id,
            reason: CancelReason::TimedOut,
            signature: None,
        },
        ServerMessage::Acks {
            acks: vec![EventAck {
                command_id: id,
                seq: 4,
            }],
        },
        ServerMessage::HeartbeatAck,
        ServerMessage::Error(ProtocolError {
            code: ProtocolErrorCode::InvalidEvent,
            message: "seq starts at 1".into(),
            command_id: Some(id),
            seq: Some(7),
        }),
    ];
    for msg in server {
        let text = msg.encode();
        assert_eq!(ServerMessage::decode(&text).unwrap(), msg, "{text}");
        let value: Value = serde_json::from_str(&text).unwrap();
        let errors = validate(&server_schema, &server_schema, &value);
        assert!(errors.is_empty(), "{text}: {errors:?}");
    }
}
