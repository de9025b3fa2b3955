//! Credentials in URLs (`https://user:token@host/repo.git`) never leave the API: every
//! response shows `user:***@` (or `***@` for a bare token). At rest the credential is
//! sealed in place (see `crate::secrets`), which this shows as `***` the same way.

use std::borrow::Cow;

use serde_json::Value;

/// `s` with the userinfo of every `scheme://userinfo@host` in it replaced.
pub fn url_credentials(s: &str) -> Cow<'_, str> {
    if !s.contains("://") || !s.contains('@') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, query, fragment or any whitespace/quote.
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) if !user.is_empty() => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    _ => out.push_str("***"),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Every string in `v` (keys included) through [`url_credentials`].
pub fn json(v: &mut Value) {
    match v {
        Value::String(s) => {
            if let Cow::Owned(r) = url_credentials(s) {
                *s = r;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(json),
        Value::Object(map) => {
            if map
                .keys()
                .any(|k| matches!(url_credentials(k), Cow::Owned(_)))
            {
                let old = std::mem::take(map);
                for (k, mut val) in old {
                    json(&mut val);
                    map.insert(url_credentials(&k).into_owned(), val);
                }
            } else {
                map.values_mut().for_each(json);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_redacted() {
        let cases = [
            (
                "https://user:tok3n@git.example.com/infra/app.git",
                "https://user:***@git.example.com/infra/app.git",
            ),
            (
                "https://ghp_SECRET@github.com/o/r.git",
                "https://***@github.com/o/r.git",
            ),
            ("https://:pw@host", "https://***@host"),
            ("http://a:b@h:8080?x=1", "http://a:***@h:8080?x=1"),
            (
                "clone http://u:p@h/r failed; see https://docs/x@y",
                "clone http://u:***@h/r failed; see https://docs/x@y",
            ),
            ("https://u:p@a@host/r", "https://u:***@host/r"),
            ("https://host/path@v1", "https://host/path@v1"),
            ("git@github.com:o/r.git", "git@github.com:o/r.git"),
            ("file:///srv/repo", "file:///srv/repo"),
            ("no url here", "no url here"),
            ("ends with ://", "ends with ://"),
            ("é://ü:ß@h/ü", "é://ü:***@h/ü"),
        ];
        for (input, want) in cases {
            assert_eq!(url_credentials(input), want, "{input}");
        }
    }

    #[test]
    fn json_strings_and_keys() {
        let mut v = serde_json::json!({
            "template_source": {"repo": "https://u:secret@h/r.git", "version": "main"},
            "list": ["x", "ssh://git:pw@h/r"],
            "https://k:secret@h": 1
        });
        json(&mut v);
        let s = v.to_string();
        assert!(!s.contains("secret") && !s.contains(":pw@"), "{s}");
        assert_eq!(v["template_source"]["repo"], "https://u:***@h/r.git");
    }
}
