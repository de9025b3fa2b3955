//! JSON Schemas (draft 2020-12) of every frame and of every command's params and result,
//! generated from the types in this crate. The checked-in copies live in
//! `protocol/schema/`; `tests/schema.rs` fails when they drift from the types
//! (`TRELLIS_UPDATE_SCHEMA=1 cargo test -p trellis-protocol --test schema` rewrites them).

use schemars::{generate::SchemaSettings, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::{
    AgentMessage, CommandType, DestroyParams, DestroyResult, ListTemplatesParams,
    ListTemplatesResult, PingParams, PingResult, ProvisionParams, ProvisionResult, ServerMessage,
    TerraformApplyParams, TerraformApplyResult, TerraformDestroyResult, TerraformPlanResult,
    VmPowerParams, VmPowerResult, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

fn generator() -> SchemaGenerator {
    SchemaSettings::draft2020_12().into_generator()
}

fn with_id(mut schema: Schema, file: &str, title: &str, description: &str) -> Schema {
    let obj = schema.ensure_object();
    // `$schema` first, then `$id`, title, description; schemars adds the rest.
    let mut head = Map::new();
    head.insert(
        "$schema".into(),
        obj.remove("$schema")
            .unwrap_or_else(|| json!("https://json-schema.org/draft/2020-12/schema")),
    );
    head.insert("$id".into(), json!(format!("trellis-protocol/{file}")));
    head.insert("title".into(), json!(title));
    head.insert("description".into(), json!(description));
    obj.remove("title");
    obj.remove("description");
    head.append(obj);
    *obj = head;
    schema
}

/// Every frame an agent sends (`agent-message.schema.json`).
pub fn agent_message() -> Schema {
    with_id(
        generator().into_root_schema_for::<AgentMessage>(),
        "agent-message.schema.json",
        "AgentMessage",
        &format!(
            "One JSON text frame sent by an agent to the Trellis control plane, protocol versions \
             {MIN_PROTOCOL_VERSION}–{PROTOCOL_VERSION}. Receivers ignore unknown fields. Length \
             limits stated in bytes are checked by the receiver; the schema's maxLength (characters) \
             is the looser bound. See protocol/README.md."
        ),
    )
}

/// Every frame the control plane sends (`server-message.schema.json`).
pub fn server_message() -> Schema {
    with_id(
        generator().into_root_schema_for::<ServerMessage>(),
        "server-message.schema.json",
        "ServerMessage",
        &format!(
            "One JSON text frame sent by the Trellis control plane to an agent, protocol versions \
             {MIN_PROTOCOL_VERSION}–{PROTOCOL_VERSION}. Receivers ignore unknown fields. See \
             protocol/README.md."
        ),
    )
}

/// The params and result of every command type (`commands.schema.json`): the root
/// validates `{"command_type": …, "params": …, "result": …}` (both optional) and `$defs`
/// holds `<Type>Params` / `<Type>Result` for each type, to be referenced on their own.
pub fn commands() -> Schema {
    let mut gen = generator();
    let mut one_of = Vec::new();
    let mut add = |ty: CommandType, params: Schema, result: Schema| {
        one_of.push(json!({
            "type": "object",
            "properties": {
                "command_type": { "const": ty.as_str() },
                "params": params,
                "result": result,
            },
            "required": ["command_type"],
        }));
    };
    add(
        CommandType::Ping,
        gen.subschema_for::<PingParams>(),
        gen.subschema_for::<PingResult>(),
    );
    add(
        CommandType::Provision,
        gen.subschema_for::<ProvisionParams>(),
        gen.subschema_for::<ProvisionResult>(),
    );
    add(
        CommandType::ListTemplates,
        gen.subschema_for::<ListTemplatesParams>(),
        gen.subschema_for::<ListTemplatesResult>(),
    );
    add(
        CommandType::TerraformApply,
        gen.subschema_for::<TerraformApplyParams>(),
        gen.subschema_for::<TerraformApplyResult>(),
    );
    add(
        CommandType::TerraformPlan,
        gen.subschema_for::<TerraformApplyParams>(),
        gen.subschema_for::<TerraformPlanResult>(),
    );
    add(
        CommandType::TerraformDestroy,
        gen.subschema_for::<TerraformApplyParams>(),
        gen.subschema_for::<TerraformDestroyResult>(),
    );
    add(
        CommandType::VmPower,
        gen.subschema_for::<VmPowerParams>(),
        gen.subschema_for::<VmPowerResult>(),
    );
    add(
        CommandType::Destroy,
        gen.subschema_for::<DestroyParams>(),
        gen.subschema_for::<DestroyResult>(),
    );
    let defs: Map<String, Value> = gen.take_definitions(true);
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "oneOf": one_of,
        "$defs": defs,
    });
    with_id(
        Schema::try_from(root).expect("an object is a schema"),
        "commands.schema.json",
        "Trellis commands",
        "The params (in `dispatch.params`) and result (in the `finished` event's `result`) of \
         every command type. The root validates {\"command_type\", \"params\"?, \"result\"?}; \
         `$defs` has <Type>Params and <Type>Result for each type. Params pass this schema and \
         further checks (ranges, names) stated in each field's description. See protocol/README.md.",
    )
}

/// `(file name, schema)` of every checked-in schema.
pub fn all() -> Vec<(&'static str, Schema)> {
    vec![
        ("agent-message.schema.json", agent_message()),
        ("server-message.schema.json", server_message()),
        ("commands.schema.json", commands()),
    ]
}

/// The text written to a schema file: pretty JSON and a final newline.
pub fn to_file_text(schema: &Schema) -> String {
    let mut text = serde_json::to_string_pretty(schema).expect("schemas serialize");
    text.push('\n');
    text
}
