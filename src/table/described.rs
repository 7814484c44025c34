//! Reading back what [`super::RoutingTable::describe`] writes, the JSON of
//! `/config`: `legate diff` compares two descriptions, the status page shows
//! one. Absent fields read as empty, never as an error.

use serde_json::Value;

/// A field as text: a string as it is, null as "", anything else as JSON.
pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The elements of an array field (none when it is absent).
pub fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// The clusters a listener or route sends to, with their weights (100 for
/// a single cluster).
pub fn targets(v: &Value) -> Vec<(String, u64)> {
    if let Some(c) = v["cluster"].as_str() {
        return vec![(c.to_string(), 100)];
    }
    items(&v["split"])
        .map(|s| (text(&s["cluster"]), s["weight"].as_u64().unwrap_or(0)))
        .collect()
}
