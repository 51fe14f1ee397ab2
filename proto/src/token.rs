//! The bearer token's one rule, shared by the coordinator, the worker and the CLI: a token
//! must be a secret. Empty values (`LORACTL_TOKEN=`) and the placeholder shipped in `deploy/`
//! are refused instead of silently becoming the cluster's password.

/// Values that stand for "put your token here" (the shipped `deploy/` files say `change-me`).
pub const PLACEHOLDERS: &[&str] = &["change-me", "changeme", "change_me", "<token>", "token"];

/// Why `token` cannot be a bearer token, or `None` when it can.
pub fn problem(token: &str) -> Option<String> {
    let trimmed = token.trim();
    if trimmed.is_empty() {
        return Some(
            "the token is empty: set a secret one (e.g. `openssl rand -hex 32`), or unset it \
             to run without a token on loopback"
                .to_owned(),
        );
    }
    if PLACEHOLDERS.iter().any(|p| trimmed.eq_ignore_ascii_case(p)) {
        return Some(format!(
            "the token is the placeholder `{trimmed}` of the example configuration: replace it \
             with a secret one (e.g. `openssl rand -hex 32`)"
        ));
    }
    if trimmed != token {
        return Some(
            "the token starts or ends with whitespace: remove it (a token file's line is \
             trimmed, an environment variable is not)"
                .to_owned(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_placeholder_tokens_are_refused() {
        for bad in ["", "   ", "change-me", "CHANGE-ME", "changeme", " s3cret"] {
            assert!(problem(bad).is_some(), "{bad:?}");
        }
        assert!(problem("change-me").unwrap().contains("placeholder"));
        assert!(problem("").unwrap().contains("empty"));
        assert_eq!(problem("9f86d081884c7d659a2feaa0c55ad015"), None);
        assert_eq!(problem("test-token"), None);
    }
}
