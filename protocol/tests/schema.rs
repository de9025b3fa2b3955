//! The checked-in JSON Schemas match the types; `TRELLIS_UPDATE_SCHEMA=1` rewrites them.

use std::path::PathBuf;

#[test]
fn checked_in_schemas_match_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema");
    let update = std::env::var_os("TRELLIS_UPDATE_SCHEMA").is_some_and(|v| v != "0");
    let mut stale = Vec::new();
    for (file, schema) in trellis_protocol::schema::all() {
        let path = dir.join(file);
        let want = trellis_protocol::schema::to_file_text(&schema);
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &want).unwrap();
                eprintln!("rewrote {}", path.display());
            } else {
                stale.push(file);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "protocol/schema/{{{}}} differ from what the types generate; run \
         `TRELLIS_UPDATE_SCHEMA=1 cargo test -p trellis-protocol --test schema` and commit the result",
        stale.join(",")
    );
}
