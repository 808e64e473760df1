//! docs/API.md's endpoint table is the OpenAPI document's: every operation the broker's
//! document describes is in the table with the same method, path and statuses, and the table
//! names nothing the document lacks. So the guide cannot drift from the contract.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;

use utoipa::OpenApi;

use framecast_broker::api::ApiDoc;

/// (method, path) → statuses, sorted.
type Operations = BTreeMap<(String, String), Vec<String>>;

fn from_the_document() -> Operations {
    let doc: serde_json::Value =
        serde_json::from_str(&ApiDoc::openapi().to_json().unwrap()).unwrap();
    let mut ops = Operations::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let mut statuses: Vec<String> = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path} has no responses"))
                .keys()
                .cloned()
                .collect();
            statuses.sort();
            ops.insert((method.to_uppercase(), path.clone()), statuses);
        }
    }
    ops
}

/// The rows of the table under "## Endpoints": `| `METHOD` | `path` | purpose | statuses |`.
fn from_the_guide() -> Operations {
    let guide =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md")).unwrap();
    let section = guide
        .split("\n## Endpoints\n")
        .nth(1)
        .expect("docs/API.md has an Endpoints section");
    let section = section.split("\n## ").next().unwrap();
    let mut ops = Operations::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 4, "a row of four cells: {row}");
        let unquote = |c: &str| c.trim_matches('`').to_owned();
        let mut statuses: Vec<String> = cells[3].split(',').map(|s| s.trim().to_owned()).collect();
        statuses.sort();
        ops.insert((unquote(cells[0]), unquote(cells[1])), statuses);
    }
    ops
}

#[test]
fn the_guides_endpoint_table_is_the_openapi_documents() {
    let document = from_the_document();
    let guide = from_the_guide();
    assert!(document.len() >= 12, "{document:?}");
    for (op, statuses) in &document {
        let listed = guide
            .get(op)
            .unwrap_or_else(|| panic!("docs/API.md's endpoint table lacks {} {}", op.0, op.1));
        assert_eq!(
            listed, statuses,
            "statuses of {} {} in docs/API.md",
            op.0, op.1
        );
    }
    for op in guide.keys() {
        assert!(
            document.contains_key(op),
            "docs/API.md lists {} {}, which the OpenAPI document does not describe",
            op.0,
            op.1
        );
    }
}
