//! What the CLI prints: the API's JSON as one document (`--output json`), or aligned
//! tables and `key: value` lines for people.

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns and `key: value` lines.
    Table,
    /// The API's JSON response, one document, for scripts.
    Json,
}

/// One JSON document, pretty-printed, on stdout.
pub fn json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A field for a table cell: strings as they are, `null`/absent as `-`, anything else
/// as compact JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Columns padded to their widest cell (the last column is not padded).
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = width.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            s.push_str(c);
            if i < last {
                let pad = width[i] - c.chars().count() + 2;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// `key: value` lines, keys padded to the longest.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs
        .iter()
        .map(|(k, v)| format!("{:<w$} {v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `stage 40%`, `stage`, `40%` or `-`.
pub fn stage_percent(stage: &Value, percent: &Value) -> String {
    let pct = percent.as_f64().map(|p| format!("{}%", p.round() as i64));
    match (stage.as_str().filter(|s| !s.is_empty()), pct) {
        (Some(s), Some(p)) => format!("{s} {p}"),
        (Some(s), None) => s.to_string(),
        (None, Some(p)) => p,
        (None, None) => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "NAME", "STATUS"],
            &[
                vec!["1".into(), "a-long-name".into(), "running".into()],
                vec!["22".into(), "b".into(), "-".into()],
            ],
        );
        assert_eq!(
            t,
            "ID  NAME         STATUS\n1   a-long-name  running\n22  b            -"
        );
    }

    #[test]
    fn cells_and_stages() {
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!("x")), "x");
        assert_eq!(cell(&json!(5)), "5");
        assert_eq!(stage_percent(&json!("clone"), &json!(39.6)), "clone 40%");
        assert_eq!(stage_percent(&json!(null), &json!(null)), "-");
    }
}
