//! The OpenAPI 3.1 document of the HTTP API, generated from the handlers' annotations and
//! the types in [`super::types`]. Served at `GET /api/openapi.json` and checked in as
//! `docs/openapi.json` (a test fails when the two differ); the UI's TypeScript types are
//! generated from the checked-in copy.

use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{
    admins, agents, audit, auth, commands, node_batches, nodes, templates, terraform_state,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Trellis",
        description = "The Trellis control plane's HTTP API. Every `/api/*` operation needs \
            `Authorization: Bearer <admin token>` (or the session cookie of `POST /api/session`). Errors are `{\"error\": {\"code\", \"message\"}}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        agents::list, agents::create, agents::install_info, agents::get, agents::update, agents::revoke, agents::rotate,
        agents::templates,
        agents::vms, super::install::agent_self, super::cluster::replicas,
        commands::list, commands::create, commands::get, commands::logs, commands::events,
        commands::cancel, commands::retry, commands::pin, commands::unpin,
        templates::list, templates::create, templates::get, templates::update, templates::delete,
        nodes::list, nodes::create, nodes::get, nodes::update, nodes::delete, nodes::provision,
        nodes::power, nodes::destroy, nodes::forget, nodes::import,
        node_batches::create_batch, node_batches::bulk_action,
        admins::list, admins::create, admins::revoke, audit::list,
        auth::sign_in, auth::who, auth::sign_out,
        terraform_state::workspaces, terraform_state::versions,
        terraform_state::get_state_doc, terraform_state::post_state_doc,
        super::healthz, super::readyz, super::metrics,
    ),
    modifiers(&Contract),
    security(("admin_token" = []), ("session_cookie" = [])),
    tags(
        (name = "agents", description = "Agents (hypervisors) and their tokens"),
        (name = "commands", description = "Commands, their logs and live events"),
        (name = "templates", description = "Trellis templates mapped to Proxmox templates"),
        (name = "nodes", description = "Nodes (VM records) and provisioning them"),
        (name = "admins", description = "Named admins and their tokens"),
        (name = "audit", description = "Who did what, when, with what outcome"),
        (name = "session", description = "Browser sign-in: an admin token exchanged for an HttpOnly session cookie"),
        (name = "terraform", description = "Terraform state kept for terraform_apply (Terraform's http backend; LOCK and UNLOCK are in docs/api.md)"),
        (name = "cluster", description = "The replicas of the control plane on one PostgreSQL"),
        (name = "health", description = "Liveness, readiness and metrics (no auth)"),
    )
)]
pub struct ApiDoc;

/// What every operation shares: the admin bearer token scheme, a `default` response with
/// the error body, so that any error status (401, 400 for a malformed query, …) is part of
/// the contract and has the `{error: {code, message}}` shape, and a unique operation id
/// (`<tag>_<handler>`).
struct Contract;

impl Modify for Contract {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "session_cookie",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Cookie(
                utoipa::openapi::security::ApiKeyValue::with_description(
                    "trellis_session",
                    "Set by POST /api/session. Requests that change something must also send `X-Trellis-Request: 1`.",
                ),
            )),
        );
        components.add_security_scheme(
            "terraform_state",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "A terraform_apply's command id and its state credential (dispatch.terraform_state).",
                    ))
                    .build(),
            ),
        );
        let error = ResponseBuilder::new()
            .description("An error: `{\"error\": {\"code\", \"message\"}}`")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                        "ErrorBody",
                    ))))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                op.responses
                    .responses
                    .entry("default".into())
                    .or_insert_with(|| RefOr::T(error.clone()));
                // Handler names (`list`, `get`…) repeat across tags; ids must be unique.
                if let (Some(tag), Some(id)) = (
                    op.tags.as_ref().and_then(|t| t.first()),
                    op.operation_id.as_mut(),
                ) {
                    *id = format!("{tag}_{id}");
                }
            }
        }
    }
}

/// The document as pretty JSON with a trailing newline (the form checked in).
pub fn document() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

pub async fn serve() -> Response {
    ([("content-type", "application/json")], document()).into_response()
}
