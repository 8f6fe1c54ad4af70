//! Who is the client: the TCP peer, or (behind a trusted proxy) the address
//! found by walking `X-Forwarded-For` from the right.
//!
//! Walking from the right matters: a standard nginx `proxy_add_x_forwarded_for`
//! appends the real peer to whatever the client sent, so the leftmost entry is
//! attacker-chosen. This module also defines the rate-limit bucket identity
//! (IPv4 address, or IPv6 /64; tunnelled IPv6 as in `state::net`). It is
//! pure: no I/O, no logging.

use ipnet::IpNet;
use std::net::IpAddr;

/// The CIDR ranges whose `X-Forwarded-For` we believe.
#[derive(Debug, Clone)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl std::fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.nets.is_empty() {
            return f.write_str("none");
        }
        for (i, n) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

impl TrustedProxies {
    /// Parses a comma-separated CIDR list; a bare address means a single host.
    /// An empty string trusts nobody.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let net = match item.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => match item.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => return Err(format!("{item:?} is not an IP address or CIDR range")),
                },
            };
            nets.push(net.trunc());
        }
        Ok(TrustedProxies { nets })
    }

    /// Trusts nobody.
    pub fn none() -> Self {
        TrustedProxies { nets: Vec::new() }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`, what a dual-stack listener reports for
/// IPv4 peers) becomes plain IPv4, so one client has one identity.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Writes `ip` as text (as `Display` does), quickly for IPv4: behind a
/// proxy every request may come from another client, and `X-Client-Ip`
/// carries the text on every answer.
pub fn write_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut num = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(num.format(octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Parses one `X-Forwarded-For` entry: a bare address, `1.2.3.4:port`,
/// `[v6]` or `[v6]:port`. Addresses that can never be a client's source
/// (unspecified, multicast) count as unparsable.
fn parse_entry(raw: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    let ip = if let Ok(ip) = s.parse::<IpAddr>() {
        ip
    } else if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        sa.ip()
    } else {
        s.strip_prefix('[')?.strip_suffix(']')?.parse::<IpAddr>().ok()?
    };
    let ip = canonical(ip);
    if ip.is_unspecified() || ip.is_multicast() {
        return None;
    }
    Some(ip)
}

/// The client address for a request from `peer` carrying the given
/// `X-Forwarded-For` value (all headers joined with `,`, in order).
///
/// If the peer is not trusted, XFF is ignored. Otherwise entries are walked
/// from the right (empty ones skipped); the first that is not a trusted
/// proxy is the client. If every entry is trusted, the leftmost one is (a
/// client inside the proxy's own network). An entry that is not an address
/// (`unknown`, an obfuscated name, a zone) ends the walk at the trusted
/// hop that wrote it, the peer or the nearest trusted entry: who sent it
/// to that hop is unknown, and everything further left is the client's
/// own say. Walking past it let a client behind such a proxy pick its
/// address.
pub fn client_ip(peer: IpAddr, xff: Option<&[u8]>, trusted: &TrustedProxies) -> IpAddr {
    let peer = canonical(peer);
    let Some(xff) = xff else { return peer };
    if !trusted.contains(peer) {
        return peer;
    }
    let mut leftmost_trusted = None;
    for entry in xff.rsplit(|&b| b == b',') {
        if entry.trim_ascii().is_empty() {
            continue;
        }
        let Some(ip) = parse_entry(entry) else {
            return leftmost_trusted.unwrap_or(peer);
        };
        if !trusted.contains(ip) {
            return ip;
        }
        leftmost_trusted = Some(ip);
    }
    leftmost_trusted.unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Loopback and private ranges, as the `-trustedProxies` default.
    fn default_trusted() -> TrustedProxies {
        TrustedProxies::parse("127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7").unwrap()
    }

    #[test]
    fn untrusted_peer_ignores_xff() {
        let t = default_trusted();
        assert_eq!(client_ip(ip("8.8.8.8"), Some(b"1.2.3.4"), &t), ip("8.8.8.8"));
    }

    #[test]
    fn walks_from_the_right() {
        let t = default_trusted();
        // Client spoofed 6.6.6.6; nginx appended the real 20.18.12.10.
        assert_eq!(client_ip(ip("127.0.0.1"), Some(b"6.6.6.6, 20.18.12.10"), &t), ip("20.18.12.10"));
        // A chain of trusted proxies is skipped.
        assert_eq!(
            client_ip(ip("10.0.0.1"), Some(b"6.6.6.6, 20.18.12.10, 10.0.0.7, 192.168.1.1"), &t),
            ip("20.18.12.10")
        );
    }

    #[test]
    fn an_entry_that_is_not_an_address_ends_the_walk_at_the_hop_that_wrote_it() {
        let t = default_trusted();
        // Empty entries (joined headers, stray commas) are nothing.
        assert_eq!(client_ip(ip("127.0.0.1"), Some(b"1.2.3.4, ,,"), &t), ip("1.2.3.4"));
        // The proxy wrote "unknown" (or a name, a zone, a bad port): the
        // address to its left is the client's own say, not taken.
        for xff in [
            &b"6.6.6.6, unknown"[..],
            b"6.6.6.6, _hidden",
            b"6.6.6.6, [fe80::1%eth0]",
            b"6.6.6.6, 203.0.113.9:abc",
            b"6.6.6.6, 0.0.0.0",
            b"\xff\xfe",
        ] {
            assert_eq!(client_ip(ip("127.0.0.1"), Some(xff), &t), ip("127.0.0.1"), "{xff:?}");
        }
        // Written by a trusted hop further in: that hop is the client.
        assert_eq!(client_ip(ip("10.0.0.1"), Some(b"6.6.6.6, unknown, 10.0.0.7"), &t), ip("10.0.0.7"));
        // An address the proxy appended to the right of a client's garbage wins.
        assert_eq!(client_ip(ip("127.0.0.1"), Some(b"garbage, 20.18.12.10"), &t), ip("20.18.12.10"));
    }

    #[test]
    fn ports_and_brackets() {
        let t = default_trusted();
        assert_eq!(client_ip(ip("::1"), Some(b"1.2.3.4:5678"), &t), ip("1.2.3.4"));
        assert_eq!(client_ip(ip("::1"), Some(b"[2001:db8::1]:80"), &t), ip("2001:db8::1"));
        assert_eq!(client_ip(ip("::1"), Some(b"[2001:db8::1]"), &t), ip("2001:db8::1"));
    }

    #[test]
    fn all_trusted_gives_leftmost() {
        let t = default_trusted();
        assert_eq!(client_ip(ip("127.0.0.1"), Some(b"10.1.1.1, 10.2.2.2"), &t), ip("10.1.1.1"));
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let t = TrustedProxies::parse("").unwrap();
        assert_eq!(client_ip(ip("::ffff:1.2.3.4"), None, &t), ip("1.2.3.4"));
        assert!(default_trusted().contains(ip("::ffff:127.0.0.1")));
    }

    #[test]
    fn ip_text_matches_display() {
        for s in ["0.0.0.0", "1.2.3.4", "255.255.255.255", "10.0.100.7", "2001:db8::1", "::1", "::ffff:1.2.3.4"] {
            let mut out = String::new();
            write_ip(&mut out, ip(s));
            assert_eq!(out, ip(s).to_string());
        }
    }

    #[test]
    fn parse_list() {
        assert!(TrustedProxies::parse("10.0.0.0/8, 1.2.3.4 ,::1").is_ok());
        assert!(!TrustedProxies::parse("").unwrap().contains(ip("127.0.0.1")));
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("nope").is_err());
    }
}
