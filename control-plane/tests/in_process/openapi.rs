//! The checked-in `docs/openapi.json` must be the document the server generates: the UI's
//! types are generated from that file, so a stale copy means a UI out of step with the API.
//! `TRELLIS_UPDATE_OPENAPI=1 cargo test -p trellis --test in_process openapi` rewrites it.

use std::path::PathBuf;

#[test]
fn docs_openapi_json_is_current() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let generated = trellis::api::openapi::document();
    if std::env::var_os("TRELLIS_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write docs/openapi.json");
        return;
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == generated,
        "docs/openapi.json is stale: run `TRELLIS_UPDATE_OPENAPI=1 cargo test -p trellis --test in_process openapi` \
         and then `npm run gen:api` in ui/"
    );
}

#[test]
fn every_operation_documents_its_errors_and_needs_the_admin_token() {
    let doc: serde_json::Value = serde_json::from_str(&trellis::api::openapi::document()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 15, "{}", paths.len());
    let mut ids = std::collections::HashSet::new();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or_default().to_string();
            assert!(ids.insert(id.clone()), "operation id {id:?} is used twice");
            // Signing in and out needs no credentials (reading who is signed in does);
            // `/api/agents/self` takes the agent's token, not an admin's.
            let public = !path.starts_with("/api/")
                || (path == "/api/session" && method != "get")
                || path == "/api/agents/self";
            let security = &op["security"];
            // Terraform's state endpoint takes a command's state credential (Basic), and an
            // admin's bearer token only to read.
            if path == "/api/terraform/state/{workspace}" {
                let schemes = security.to_string();
                assert!(
                    schemes.contains("terraform_state"),
                    "{method} {path}: {schemes}"
                );
                assert!(
                    !schemes.contains("session_cookie"),
                    "{method} {path}: {schemes}"
                );
            } else if public {
                assert_eq!(
                    security,
                    &serde_json::json!([{}]),
                    "{method} {path} is public"
                );
            } else {
                assert!(
                    security.is_null(),
                    "{method} {path} inherits the global admin-token requirement"
                );
            }
            if op["parameters"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["in"] == "path"))
            {
                assert!(
                    op["responses"]["404"].is_object(),
                    "{method} {path} documents its 404"
                );
            }
        }
    }
}
