//! Layer: admin (imports nothing of the crate).
//!
//! The web console's files: the pages, script and style served at `/ui/` (and the Setup UI's at
//! `/setup`), embedded in the binary at build time. No build step: plain HTML, CSS and ES
//! modules in `src/admin/console/`, rendered in the browser from the API's JSON. Scripts never
//! write HTML from data (only `textContent` and DOM nodes), and the Content-Security-Policy below
//! allows no inline script, so a value stored in the configuration cannot run in an operator's
//! browser.

/// The policy every answer of the admin API and the Setup UI carries: scripts, styles and
/// requests only from the node itself, no inline script or style, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's single page (routes are `#/...` fragments, so a reload keeps the page).
pub const INDEX_HTML: &str = include_str!("console/index.html");
/// The Setup UI's page.
pub const SETUP_HTML: &str = include_str!("console/setup.html");

/// An embedded file under `/ui/assets/`: its bytes and content type; None for any other name.
pub fn asset(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "app.js" => Some((
            include_str!("console/app.js"),
            "text/javascript; charset=utf-8",
        )),
        "setup.js" => Some((
            include_str!("console/setup.js"),
            "text/javascript; charset=utf-8",
        )),
        "common.js" => Some((
            include_str!("console/common.js"),
            "text/javascript; charset=utf-8",
        )),
        "style.css" => Some((include_str!("console/style.css"), "text/css; charset=utf-8")),
        _ => None,
    }
}

/// Adds the security headers of every answer: the [`CSP`], no MIME sniffing, no referrer, no
/// framing.
pub fn secure_headers(h: &mut axum::http::HeaderMap) {
    use axum::http::header::{self, HeaderValue};
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file the pages load is embedded, and no page carries inline script or style (the
    /// policy would block it).
    #[test]
    fn pages_load_only_embedded_files_and_have_no_inline_script() {
        for page in [INDEX_HTML, SETUP_HTML] {
            for src in page
                .split("src=\"")
                .skip(1)
                .chain(page.split("href=\"").skip(1))
            {
                let url = &src[..src.find('"').expect("quoted")];
                let name = url.strip_prefix("/ui/assets/").expect(url);
                assert!(asset(name).is_some(), "{url} is not embedded");
            }
            assert!(!page.contains("<script>"), "inline script");
            for handler in ["onclick=", "onload=", "onsubmit=", "onerror=", "oninput="] {
                assert!(!page.contains(handler), "inline handler {handler}");
            }
            assert!(!page.contains("style="), "inline style");
        }
        for js in ["app.js", "setup.js", "common.js"] {
            let text = asset(js).expect("embedded").0;
            assert!(!text.contains("innerHTML"), "{js} writes HTML from strings");
            assert!(!text.contains("eval("), "{js} evaluates strings");
        }
    }
}
