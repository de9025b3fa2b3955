//! Redaction of sensitive variable values.
//!
//! Values of sensitive variables (see [`TerraformApplyParams::is_sensitive`]) must never
//! leave the agent in a log chunk, an error message or a result. Terraform and the
//! programs it runs print whatever they like, so every piece of text is scanned for the
//! values' string forms. Output arrives in arbitrary pieces; [`Redactor::safe_prefix_len`]
//! tells a streaming caller how much of a piece it may ship now without risking a value
//! split across two pieces.

use std::borrow::Cow;

use serde_json::Value;
use trellis_protocol::TerraformApplyParams;

/// What a redacted value is replaced with.
pub const MASK: &str = "***";

/// Shorter values are not redacted: masking every `abc` in the output would hide more
/// than it protects.
pub const MIN_SECRET_CHARS: usize = 4;

#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so a value that contains another is masked whole.
    secrets: Vec<String>,
}

impl Redactor {
    /// A redactor for the sensitive variables of `p`.
    pub fn for_params(p: &TerraformApplyParams) -> Self {
        let mut r = Self::default();
        for (name, value) in &p.terraform_vars {
            if p.is_sensitive(name) {
                r.add_value(value);
            }
        }
        r
    }

    /// Adds every string form of a JSON value: strings (raw and JSON-escaped), numbers,
    /// the leaves of arrays and objects and their compact JSON. Booleans and null are
    /// skipped: masking every `true` in the output protects nothing.
    pub fn add_value(&mut self, value: &Value) {
        match value {
            Value::Null | Value::Bool(_) => {}
            Value::Number(n) => self.add(&n.to_string()),
            Value::String(s) => {
                self.add(s);
                if let Ok(quoted) = serde_json::to_string(s) {
                    let escaped = &quoted[1..quoted.len() - 1];
                    if escaped != s {
                        self.add(escaped);
                    }
                }
            }
            Value::Array(items) => {
                items.iter().for_each(|v| self.add_value(v));
                self.add(&value.to_string());
            }
            Value::Object(map) => {
                map.values().for_each(|v| self.add_value(v));
                self.add(&value.to_string());
            }
        }
    }

    /// Adds one literal secret (ignored when shorter than [`MIN_SECRET_CHARS`]).
    pub fn add(&mut self, secret: &str) {
        if secret.chars().count() < MIN_SECRET_CHARS || self.secrets.iter().any(|s| s == secret) {
            return;
        }
        self.secrets.push(secret.to_string());
        self.secrets
            .sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `text` with every secret replaced by [`MASK`].
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut out = Cow::Borrowed(text);
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = Cow::Owned(out.replace(s.as_str(), MASK));
            }
        }
        out
    }

    /// Redacts every string (and object key) inside a JSON value in place.
    pub fn redact_json(&self, value: &mut Value) {
        if self.is_empty() {
            return;
        }
        match value {
            Value::String(s) => {
                if let Cow::Owned(r) = self.redact(s) {
                    *s = r;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            Value::Object(map) => {
                let old = std::mem::take(map);
                for (k, mut v) in old {
                    self.redact_json(&mut v);
                    map.insert(self.redact(&k).into_owned(), v);
                }
            }
            Value::Number(n) => {
                let s = n.to_string();
                if self.redact(&s) != s {
                    *value = Value::String(MASK.into());
                }
            }
            Value::Null | Value::Bool(_) => {}
        }
    }

    /// For already redacted `text` that more output may follow: the length of the prefix
    /// that is safe to ship now. The rest (shorter than the longest secret) could be the
    /// start of a secret whose end has not arrived yet; prepend it to the next piece.
    pub fn safe_prefix_len(&self, text: &str) -> usize {
        let Some(longest) = self.secrets.first().map(String::len) else {
            return text.len();
        };
        let window_start = text.len().saturating_sub(longest.saturating_sub(1));
        (window_start..text.len())
            .filter(|&i| text.is_char_boundary(i))
            .find(|&i| {
                let suffix = &text[i..];
                self.secrets
                    .iter()
                    .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .unwrap_or(text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn redactor(values: &[Value]) -> Redactor {
        let mut r = Redactor::default();
        values.iter().for_each(|v| r.add_value(v));
        r
    }

    #[test]
    fn masks_strings_numbers_and_nested_values() {
        let r = redactor(&[
            json!("hunter22"),
            json!(987654),
            json!({"k": "deep-secret", "short": "abc"}),
            json!(true),
        ]);
        assert_eq!(r.redact("pw=hunter22 pin 987654"), "pw=*** pin ***");
        assert_eq!(r.redact("x deep-secret y abc true"), "x *** y abc true");
        assert_eq!(r.redact("nothing here"), Cow::Borrowed("nothing here"));
    }

    #[test]
    fn masks_json_escaped_forms_and_longest_first() {
        let r = redactor(&[json!("a\"quoted\"pw"), json!("abcd"), json!("abcdefgh")]);
        assert_eq!(r.redact(r#"v = "a\"quoted\"pw""#), r#"v = "***""#);
        assert_eq!(r.redact("abcdefgh abcd"), "*** ***");
    }

    #[test]
    fn holds_back_a_possible_secret_start() {
        let r = redactor(&[json!("hunter22")]);
        let t = "line one\nhun";
        assert_eq!(r.safe_prefix_len(t), t.len() - 3);
        assert_eq!(r.safe_prefix_len("line one\n"), 9);
        assert_eq!(Redactor::default().safe_prefix_len("hun"), 3);
        // Multi-byte text near the end is split on a char boundary only.
        let r = redactor(&[json!("ééé-secret")]);
        let t = "xx é";
        assert_eq!(r.safe_prefix_len(t), 3);
    }

    #[test]
    fn redacts_json_results() {
        let r = redactor(&[json!("hunter22"), json!(4242)]);
        let mut v =
            json!({"a": "pw is hunter22", "n": 4242, "list": ["hunter22", 1], "hunter22": 1});
        r.redact_json(&mut v);
        assert_eq!(
            v,
            json!({"a": "pw is ***", "n": "***", "list": ["***", 1], "***": 1})
        );
    }
}
