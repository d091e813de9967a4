//! The client's address, for the rate limits: the TCP peer, unless the peer is one of
//! `PAYRETRY_TRUSTED_PROXIES`; then the right-most address in `X-Forwarded-For` that is not
//! itself a trusted proxy. Entries left of that one were written by the client and are
//! ignored, so a forged header can neither pick another client's budget nor fall back to the
//! proxy's shared one. A header that cannot be read up to that entry (not text, an entry
//! that is not an address) counts for nothing: the peer is the client.

use super::AppState;
use super::error::ApiError;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// The address a request is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ConnectInfo(peer) = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .ok_or_else(|| ApiError::Unavailable("no peer address on the request".to_owned()))?;
        Ok(Self(
            state.trusted_proxies.client(peer.ip(), &parts.headers),
        ))
    }
}

/// `PAYRETRY_TRUSTED_PROXIES`: the peers whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self(networks)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client address of a request from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        self.forwarded_client(headers).unwrap_or(peer)
    }

    /// Walks `X-Forwarded-For` (all its lines, in order) from the right past trusted
    /// proxies. `None`: no header, or an entry on the way that is not an address.
    fn forwarded_client(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let mut entries = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            entries.extend(value.to_str().ok()?.split(','));
        }
        let mut last = None;
        for entry in entries.into_iter().rev() {
            let ip = parse_entry(entry)?;
            if !self.trusts(ip) {
                return Some(ip);
            }
            last = Some(ip);
        }
        // Every hop is a trusted proxy: the first of them is where the request began.
        last
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`[v6]:port`, `v4:port`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn proxies(list: &str) -> TrustedProxies {
        TrustedProxies::new(list.split(',').map(|s| s.trim().parse().unwrap()).collect())
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let none = TrustedProxies::default();
        let headers = xff(&["203.0.113.9"]);
        assert_eq!(none.client(ip("127.0.0.1"), &headers), ip("127.0.0.1"));
        let other = proxies("10.0.0.0/8");
        assert_eq!(other.client(ip("127.0.0.1"), &headers), ip("127.0.0.1"));
    }

    #[test]
    fn the_right_most_untrusted_entry_is_the_client() {
        let trusted = proxies("10.0.0.0/8, ::1/128");
        let peer = ip("10.0.0.1");
        let cases = [
            (vec!["203.0.113.9"], "203.0.113.9"),
            (vec!["198.51.100.1, 203.0.113.9"], "203.0.113.9"),
            (vec!["198.51.100.1, 203.0.113.9, 10.1.2.3"], "203.0.113.9"),
            (vec!["198.51.100.1", "203.0.113.9, 10.1.2.3"], "203.0.113.9"),
            (vec!["forged-garbage, 203.0.113.9"], "203.0.113.9"),
            (vec!["2001:db8::7, ::1"], "2001:db8::7"),
            (vec!["[2001:db8::7]:4711"], "2001:db8::7"),
            (vec!["203.0.113.9:4711"], "203.0.113.9"),
            (vec!["::ffff:203.0.113.9"], "203.0.113.9"),
            (vec!["10.9.9.9, 10.1.2.3"], "10.9.9.9"),
        ];
        for (values, want) in cases {
            assert_eq!(trusted.client(peer, &xff(&values)), ip(want), "{values:?}");
        }
        assert_eq!(
            trusted.client(ip("::1"), &xff(&["203.0.113.9"])),
            ip("203.0.113.9")
        );
        let mapped_peer = ip("::ffff:10.0.0.1");
        assert_eq!(
            trusted.client(mapped_peer, &xff(&["203.0.113.9"])),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn a_malformed_header_falls_back_to_the_peer() {
        let trusted = proxies("10.0.0.0/8");
        let peer = ip("10.0.0.1");
        for values in [
            vec![],
            vec![""],
            vec!["not-an-address"],
            vec!["203.0.113.9, unknown"],
            vec!["203.0.113.9,,10.1.2.3"],
            vec!["203.0.113.9/24"],
        ] {
            assert_eq!(trusted.client(peer, &xff(&values)), peer, "{values:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"203.0.113.9\xff").unwrap(),
        );
        assert_eq!(trusted.client(peer, &headers), peer);
    }
}
