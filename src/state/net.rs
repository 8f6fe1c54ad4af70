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
//! An IPv6 address that carries the IPv4 address it comes from counts as
//! that IPv4 address: IPv4-mapped (`::ffff:a.b.c.d`), 6to4
//! (`2002:aabb:ccdd::/48`, the /48 of one IPv4 host) and Teredo
//! (`2001:0::/32`, the client's public address inverted in the last 32
//! bits). Otherwise one IPv4 host would be a whole /48 of /64 clients,
//! and one /24 256 networks, each with its own budgets; and every Teredo
//! client behind one relay server would share a single /64. Replies to
//! such an address are routed to that IPv4 host, so a TCP client cannot
//! claim one it does not hold.

use std::net::IpAddr;

/// The tag in the top 32 bits of an IPv4 client key.
const IPV4_TAG: u64 = 0xffff_ffff_0000_0000;

/// The client key of an address: the IPv4 address itself, or the IPv6 /64.
/// An IPv6 address carrying its IPv4 source (mapped, 6to4, Teredo) is that
/// IPv4 address.
pub fn client(ip: IpAddr) -> u64 {
    let ip = match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => IPV4_TAG | u64::from(u32::from(v4)),
        IpAddr::V6(v6) => ((u128::from(v6) >> 64) as u64).max(1),
    }
}

/// The IPv4 address an IPv6 address was sent from, where the address
/// says: IPv4-mapped, 6to4 (`2002::/16`, RFC 3056) or Teredo
/// (`2001:0::/32`, RFC 4380).
fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let bits = u128::from(v6);
    match v6.segments() {
        [0x2002, ..] => Some(std::net::Ipv4Addr::from((bits >> 80) as u32)),
        [0x2001, 0, ..] => Some(std::net::Ipv4Addr::from(!(bits as u32))),
        _ => None,
    }
}

/// Bits of a client key that name the client inside its network.
fn host_mask(client: u64) -> u64 {
    if client & IPV4_TAG == IPV4_TAG {
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
    if client & IPV4_TAG == IPV4_TAG {
        std::net::Ipv4Addr::from(client as u32).to_string()
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
    fn addresses_carrying_their_ipv4_source_count_as_it() {
        // 6to4: 2002:c000:0201::/48 is 192.0.2.1's, every /64 of it.
        assert_eq!(c("2002:c000:201::1"), c("192.0.2.1"));
        assert_eq!(c("2002:c000:201:ffff::9"), c("192.0.2.1"));
        assert_eq!(network(c("2002:c000:2fe::1")), network(c("192.0.2.77")));
        assert_ne!(c("2002:c000:202::1"), c("192.0.2.1"));
        // Teredo: the client's address, inverted, in the last 32 bits
        // (RFC 4380's example: 192.0.2.45 behind server 65.54.227.120).
        assert_eq!(c("2001:0:4136:e378:8000:63bf:3fff:fdd2"), c("192.0.2.45"));
        assert_ne!(c("2001:0:4136:e378:8000:63bf:3fff:fdd3"), c("192.0.2.45"));
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
