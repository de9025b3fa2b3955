//! The OpenAPI 3.1 document of the HTTP API, generated from the handlers' annotations and
//! the types in [`super::types`]. Served at `GET /api/openapi.json` and checked in as
//! `docs/openapi.json` (a test fails when the two differ); the UI's TypeScript types are
//! generated from the checked-in copy.

use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{agents, commands, nodes, templates};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Trellis",
        description = "The Trellis control plane's HTTP API. Every `/api/*` operation needs \
            `Authorization: Bearer <admin token>`. Errors are `{\"error\": {\"code\", \"message\"}}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        agents::list, agents::create, agents::get, agents::revoke, agents::rotate, agents::templates,
        commands::list, commands::create, commands::get, commands::logs, commands::events,
        commands::cancel, commands::retry,
        templates::list, templates::create, templates::get, templates::update, templates::delete,
        nodes::list, nodes::create, nodes::get, nodes::update, nodes::delete, nodes::provision,
        super::healthz, super::readyz, super::metrics,
    ),
    modifiers(&AdminToken),
    security(("admin_token" = [])),
    tags(
        (name = "agents", description = "Agents (hypervisors) and their tokens"),
        (name = "commands", description = "Commands, their logs and live events"),
        (name = "templates", description = "Trellis templates mapped to Proxmox templates"),
        (name = "nodes", description = "Nodes (VM records) and provisioning them"),
        (name = "health", description = "Liveness, readiness and metrics (no auth)"),
    )
)]
pub struct ApiDoc;

struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
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
