//! The rules both web servers (the controller's lab dashboard and `jmp web`'s board page) apply
//! to a browser's request headers, in one place: whether a request comes from a page of the
//! server's own origin, and whether a navigation may redeem a sign-in link.

/// Whether a request comes from a page of the server's own origin: its `Origin` (scheme and
/// authority) names the `Host` (and port) the browser sent the request to, over http or https.
/// Behind an IDE's port forwarding both are the forwarder's, so it holds there too. A request
/// without either header is not same-origin (browsers send `Origin` on every POST, PUT and
/// WebSocket), and `null` (a sandboxed frame, a file) never is.
pub fn same_origin(origin: Option<&str>, host: Option<&str>) -> bool {
    let (Some(origin), Some(host)) = (origin, host) else {
        return false;
    };
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https") && !host.is_empty() && rest.eq_ignore_ascii_case(host)
}

/// Whether a navigation with this `Sec-Fetch-Site` may redeem a sign-in link. A person opens
/// one by pasting it or from a terminal (`none`); the dashboard never links to one itself, but
/// a same-origin navigation is as trusted as the dashboard. Another site's page, and also a
/// same-site one (another port of the same host is the same site, and on 127.0.0.1 that is
/// any other local user's server), must not sign the browser in to a session of its choosing
/// (login CSRF), so those are refused. A request without the header is not a current browser's
/// navigation (curl, a script): no page made it, so it is let through.
pub fn sign_in_navigation_allowed(sec_fetch_site: Option<&str>) -> bool {
    match sec_fetch_site.map(str::trim) {
        None => true,
        Some(s) => s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("same-origin"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_page_of_the_servers_own_origin_is_same_origin() {
        assert!(same_origin(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080")
        ));
        // Behind an IDE's forwarding the browser's host is the forwarder's, on both headers.
        assert!(same_origin(
            Some("https://ws-1-8080.ide.example"),
            Some("WS-1-8080.ide.example")
        ));
        for (origin, host) in [
            (Some("http://evil.example"), Some("127.0.0.1:8080")),
            (Some("http://127.0.0.1:8081"), Some("127.0.0.1:8080")),
            (Some("null"), Some("127.0.0.1:8080")),
            (Some("file://127.0.0.1:8080"), Some("127.0.0.1:8080")),
            (Some("http://"), Some("")),
            (None, Some("127.0.0.1:8080")),
            (Some("http://127.0.0.1:8080"), None),
        ] {
            assert!(!same_origin(origin, host), "{origin:?} {host:?}");
        }
    }

    #[test]
    fn a_sign_in_link_is_redeemed_only_by_a_navigation_no_other_site_made() {
        for ok in [None, Some("none"), Some("same-origin"), Some("None")] {
            assert!(sign_in_navigation_allowed(ok), "{ok:?}");
        }
        for bad in [Some("cross-site"), Some("same-site"), Some(""), Some("x")] {
            assert!(!sign_in_navigation_allowed(bad), "{bad:?}");
        }
    }
}
