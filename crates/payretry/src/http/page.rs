//! What the server-rendered pages share (the buyer's `/pay/{sessionId}` page and the
//! sandbox checkout): their style sheet, their security headers with a per-response CSP
//! nonce, and HTML escaping.

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderName, HeaderValue};

/// The look shared by the buyer's page and the sandbox checkout: readable at 360 px,
/// WCAG AA contrast for text (and 3:1 for the focus ring), 44 px touch targets.
pub(crate) const STYLE: &str = r#"
*,*::before,*::after{box-sizing:border-box}
[hidden]{display:none!important}
html{-webkit-text-size-adjust:100%}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f3f4f6;color:#1a1a1a;line-height:1.5;font-size:1rem}
main{max-width:30rem;margin:0 auto;padding:1.25rem 1rem 2rem}
h1{font-size:1.5rem;line-height:1.25;margin:.25rem 0 .25rem}
h2{font-size:1.2rem;margin:0 0 .5rem}
p{margin:.5rem 0;overflow-wrap:anywhere}
.amount{font-size:1.05rem;color:#3d3d3d;margin:0 0 1rem}
.amount strong{color:#1a1a1a;font-size:1.25rem}
.card{background:#fff;border:1px solid #c4c7cc;border-radius:.75rem;padding:1.25rem;box-shadow:0 1px 2px rgba(0,0,0,.06)}
.status{font-weight:600;font-size:1.1rem;margin-top:0}
.notice{border-left:4px solid #a4161a;background:#fdf1f1;color:#7a1216;padding:.6rem .8rem;border-radius:.25rem}
.notice:empty{display:none}
.muted{color:#4a4a4a;font-size:.95rem}
.muted:empty{display:none}
.timer{font-variant-numeric:tabular-nums;font-weight:600;color:#0b3d91}
.banner{background:#fff4cc;border:1px solid #8a6d00;color:#4d3c00;border-radius:.5rem;padding:.5rem .75rem;font-size:.95rem;margin:0 0 1rem}
.button,button{display:block;width:100%;min-height:2.75rem;margin:.75rem 0;padding:.7rem 1rem;border-radius:.5rem;border:2px solid transparent;font:inherit;font-weight:600;text-align:center;text-decoration:none;cursor:pointer}
.primary{background:#1746a2;color:#fff}
.primary:not([aria-disabled="true"]):hover{background:#123a86}
.danger{background:#fff;color:#8b1a1a;border-color:#8b1a1a}
.danger:hover{background:#fdf1f1}
button[aria-disabled="true"],button:disabled{background:#e5e7eb;color:#404040;border:2px dashed #6b6b6b;cursor:not-allowed}
.sr-only{position:absolute!important;width:1px;height:1px;margin:-1px;padding:0;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap;border:0}
a:focus-visible,button:focus-visible,select:focus-visible{outline:3px solid #0b3d91;outline-offset:3px}
a{color:#1746a2}
label{display:block;font-weight:600;margin:.75rem 0 .3rem}
select{display:block;width:100%;min-height:2.75rem;font:inherit;padding:.5rem;border:1px solid #6b6b6b;border-radius:.4rem;background:#fff;color:#1a1a1a}
fieldset{border:1px solid #c4c7cc;border-radius:.5rem;margin:1rem 0 0;padding:.25rem .9rem .5rem}
legend{font-weight:600;padding:0 .3rem}
.paid{text-align:center}
.paid svg{width:3.5rem;height:3.5rem;margin:.25rem auto .5rem;display:block}
.paid h2{color:#0a5c27;font-size:1.4rem}
"#;

/// `Content-Security-Policy`, `Referrer-Policy` and friends for a server-rendered page whose
/// inline `<style>`/`<script>` carry `nonce`. `scripts`: whether the page runs its script.
pub(crate) fn page_headers(nonce: &str, scripts: bool) -> [(HeaderName, HeaderValue); 5] {
    let script_src = if scripts {
        format!("script-src 'nonce-{nonce}'; connect-src 'self'; form-action 'none'; ")
    } else {
        String::new()
    };
    let csp = format!(
        "default-src 'none'; {script_src}style-src 'nonce-{nonce}'; img-src 'self' data:; \
         base-uri 'none'; frame-ancestors 'none'"
    );
    [
        (
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_str(&csp)
                .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'")),
        ),
        (REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    ]
}

/// A fresh CSP nonce (128 random bits, hex).
pub(crate) fn nonce() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// `text` safe inside HTML text and quoted attributes.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csp_pins_the_nonce_and_blocks_everything_else() {
        let headers = page_headers("n0nce", true);
        let csp = headers[0].1.to_str().unwrap();
        assert!(csp.starts_with("default-src 'none'"));
        assert!(csp.contains("script-src 'nonce-n0nce'"));
        assert!(csp.contains("style-src 'nonce-n0nce'"));
        assert!(csp.contains("connect-src 'self'"));
        assert_eq!(headers[1].1, "no-referrer");
        let without = page_headers("n0nce", false);
        assert!(!without[0].1.to_str().unwrap().contains("script-src"));
    }

    #[test]
    fn escape_neutralises_markup() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
