//! How errors and URLs are shown in messages and logs: an error with its causes on one line, and
//! a URL without the parts that often hold secrets. It sits at the bottom floor beside the error
//! type and imports nothing of the crate; it must not decide what a message says, only how these
//! two kinds of value are written into one.

use std::fmt::Write as _;

use reqwest::Url;

/// "error: cause: cause" (reqwest's and hyper's own Display stop at the outermost error). A
/// cause whose text the line already holds is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            let _ = write!(s, ": {text}");
        }
        source = cause.source();
    }
    s
}

/// The URL as it may be logged or shown: no user, password, query or fragment (they often hold
/// tokens). A removed query shows as `?…`.
pub fn redact(url: &Url) -> String {
    let mut shown = url.clone();
    let had_query = url.query().is_some();
    // These only fail for URLs that cannot have credentials (no host), which have none to hide.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    let mut s = shown.to_string();
    if had_query {
        s.push_str("?…");
    }
    s
}

/// [`redact`] for a URL held as text; text that is no URL is not shown at all (it could be one
/// with a typo that still holds a password).
pub fn redact_text(url: &str) -> String {
    Url::parse(url)
        .map(|u| redact(&u))
        .unwrap_or_else(|_| "<invalid URL>".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn error_chain_joins_causes_once() {
        let e = Layer(
            "request failed",
            Some(Box::new(Layer(
                "connect refused",
                Some(Box::new(Layer("refused", None))),
            ))),
        );
        assert_eq!(error_chain(&e), "request failed: connect refused");
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }

    #[test]
    fn text_that_is_no_url_is_not_shown() {
        assert_eq!(redact_text("http://u:pw@h/x?t=1"), "http://h/x?…");
        assert_eq!(redact_text("not a url with pw"), "<invalid URL>");
    }
}
