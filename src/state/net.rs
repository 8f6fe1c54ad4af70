//! Who a client is, as the state layer counts it: a client key (an IPv4
//! address, or an IPv6 /64) and the network that contains it (an IPv4 /24,
//! or an IPv6 /48).
//!
//! Rate limits, key quotas and the creator stored with every entry all use
//! these two identities, so they are defined once, here, as plain `u64`s:
//! cheap to hash, to store in an entry and to write in a log record. An
//! IPv6 /64 is its top 64 bits. An IPv4 address is tagged into
//! `ffff:ffff::/32`, a multicast range no client ever comes from, so the
//! two families never collide. A client's network clears the low bits
//! that tell the clients of one network apart (8 for IPv4, 16 for IPv6);
//! those bits are the client's `host` within the network. 0 is no client:
//! it marks entries stored before creators were kept (never counted), so
//! `::/64` (loopback `::1`, reserved) is keyed as `0:0:0:1::/64` (reserved
//! too, never a client).
//!
//! IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is its IPv4 address. An IPv6
//! address tunnelled from a public IPv4 host (6to4, `2002:aabb:ccdd::/48`;
//! Teredo, `2001:0::/32`, the client's NAT address inverted in the last
//! 32 bits) counts as that host, under a tag of its own
//! (`ffff:fffe::/32`, multicast too): otherwise 6to4 gives one IPv4 host a
//! whole /48 of /64 clients and one /24 256 networks' budgets, and every
//! Teredo client of one Teredo server shared a single /64. Its own tag,
//! not the native IPv4 key: replies to those prefixes go through
//! whichever relay is nearest the server, often a third party's, so
//! whoever runs or hijacks one can complete handshakes as any tunnelled
//! address, and must not reach a native client's budgets that way. An
//! embedded address that is not public (private, loopback, link-local,
//! shared, multicast, reserved) is not folded: it names no host outside
//! the relay's own network.

use std::net::IpAddr;

/// The tag in the top 32 bits of an IPv4 client key.
const IPV4_TAG: u64 = 0xffff_ffff_0000_0000;
/// The tag of an IPv4 host reached through a 6to4 or Teredo relay.
const TUNNEL_TAG: u64 = 0xffff_fffe_0000_0000;
/// The top 32 bits of a key, where the tags sit.
const TAG_MASK: u64 = 0xffff_ffff_0000_0000;

/// The client key of an address: the IPv4 address itself, or the IPv6 /64
/// (a tunnelled public IPv4 host: its IPv4 address, tagged apart).
pub fn client(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => IPV4_TAG | u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IPV4_TAG | u64::from(u32::from(v4));
            }
            if let Some(v4) = tunnelled_from(v6) {
                return TUNNEL_TAG | u64::from(u32::from(v4));
            }
            ((u128::from(v6) >> 64) as u64).max(1)
        }
    }
}

/// The public IPv4 host a 6to4 (`2002::/16`, RFC 3056) or Teredo
/// (`2001:0::/32`, RFC 4380) address was sent from.
fn tunnelled_from(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let bits = u128::from(v6);
    let v4 = match v6.segments() {
        [0x2002, ..] => std::net::Ipv4Addr::from((bits >> 80) as u32),
        [0x2001, 0, ..] => std::net::Ipv4Addr::from(!(bits as u32)),
        _ => return None,
    };
    let [a, b, ..] = v4.octets();
    let special = v4.is_private()
        || v4.is_loopback()
        || v4.is_link_local()
        || v4.is_multicast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b));
    (!special).then_some(v4)
}

/// Whether a client key holds an IPv4 address (native or tunnelled).
fn is_ipv4(client: u64) -> bool {
    matches!(client & TAG_MASK, IPV4_TAG | TUNNEL_TAG)
}

/// Bits of a client key that name the client inside its network.
fn host_mask(client: u64) -> u64 {
    if is_ipv4(client) {
        0xff
    } else {
        0xffff
    }
}

/// The network (IPv4 /24, IPv6 /48) a client key belongs to.
pub fn network(client: u64) -> u64 {
    client & !host_mask(client)
}

/// Which client of its network this is (the low 8 or 16 bits).
pub fn host(client: u64) -> u16 {
    (client & host_mask(client)) as u16
}

/// A client key as text: `192.0.2.1`, or `2001:db8:1:2::/64`.
pub fn describe(client: u64) -> String {
    if client & TAG_MASK == IPV4_TAG {
        std::net::Ipv4Addr::from(client as u32).to_string()
    } else if client & TAG_MASK == TUNNEL_TAG {
        format!("{} (through 6to4 or Teredo)", std::net::Ipv4Addr::from(client as u32))
    } else {
        format!("{}/64", std::net::Ipv6Addr::from(u128::from(client) << 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> u64 {
        client(s.parse().unwrap())
    }

    #[test]
    fn ipv6_clients_are_slash_64_and_networks_slash_48() {
        assert_eq!(c("2001:db8:1:2:aaaa::1"), c("2001:db8:1:2:ffff::9"));
        assert_ne!(c("2001:db8:1:2::1"), c("2001:db8:1:3::1"));
        assert_eq!(network(c("2001:db8:1:2::1")), network(c("2001:db8:1:ffff::1")));
        assert_ne!(network(c("2001:db8:1:2::1")), network(c("2001:db8:2:2::1")));
        assert_eq!(host(c("2001:db8:1:beef::1")), 0xbeef);
    }

    #[test]
    fn ipv4_clients_are_addresses_and_networks_slash_24() {
        assert_ne!(c("192.0.2.1"), c("192.0.2.2"));
        assert_eq!(network(c("192.0.2.1")), network(c("192.0.2.254")));
        assert_ne!(network(c("192.0.2.1")), network(c("192.0.3.1")));
        assert_eq!(host(c("192.0.2.77")), 77);
        assert_eq!(c("::ffff:192.0.2.1"), c("192.0.2.1"));
        assert_eq!(describe(c("192.0.2.77")), "192.0.2.77");
        assert_eq!(describe(c("2001:db8:1:2:3::4")), "2001:db8:1:2::/64");
    }

    #[test]
    fn tunnelled_public_ipv4_hosts_count_as_their_ipv4_address_tagged_apart() {
        // 6to4: 2002:0808:0808::/48 is 8.8.8.8's, every /64 of it.
        let six_to_four = c("2002:808:808::1");
        assert_eq!(c("2002:808:808:ffff::9"), six_to_four);
        assert_eq!(network(c("2002:808:8fe::1")), network(six_to_four), "one /24");
        assert_ne!(network(c("2002:808:908::1")), network(six_to_four));
        assert_eq!(host(six_to_four), 8);
        // Teredo: the client's address, inverted, in the last 32 bits
        // (RFC 4380's example: 192.0.2.45 behind server 65.54.227.120).
        assert_eq!(c("2001:0:4136:e378:8000:63bf:3fff:fdd2"), c("2002:c000:22d::1"));
        assert_ne!(c("2001:0:4136:e378:8000:63bf:3fff:fdd3"), c("2002:c000:22d::1"));
        // Never the native address's budgets: a relay can claim any of these.
        assert_ne!(six_to_four, c("8.8.8.8"));
        assert_ne!(network(six_to_four), network(c("8.8.8.8")));
        assert_eq!(describe(six_to_four), "8.8.8.8 (through 6to4 or Teredo)");
        // Private, loopback, shared, reserved: not a host's, not folded.
        for other in ["2002:a00:5::1", "2002:7f00:1::1", "2002:6440:1::1", "2002:f000:1::1", "2002::1"] {
            assert_eq!(
                describe(c(other)),
                format!("{}/64", other.trim_end_matches("::1").to_string() + "::"),
                "{other}"
            );
        }
        assert_eq!(describe(c("2001:0:4136:e378:8000:63bf:ffff:ffff")), "2001:0:4136:e378::/64", "Teredo 0.0.0.0");
        // Neighbours of those prefixes are ordinary IPv6 clients.
        assert_eq!(describe(c("2001:1::1")), "2001:1::/64");
        assert_eq!(describe(c("2003::1")), "2003::/64");
        assert_eq!(describe(c("2001:db8::1")), "2001:db8::/64");
    }

    #[test]
    fn no_client_is_zero() {
        assert_ne!(c("::1"), 0);
        assert_ne!(c("::"), 0);
        assert_ne!(c("0.0.0.0"), 0);
    }

    #[test]
    fn families_never_share_a_network() {
        // The IPv6 /48 whose top bits look like the IPv4 tag is multicast
        // (ff..), never a client; still, the host bits differ in width.
        assert_ne!(network(c("0.0.0.1")), network(c("::1")));
        assert_ne!(network(c("192.0.2.1")), network(c("c000:200::1")));
    }
}
