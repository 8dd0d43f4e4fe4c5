//! Relay policy: who may send mail to which recipients. A gateway is never an open relay, not
//! even by proxy: sender-specified routing through a relay domain (`user%other@relay`,
//! `other!user@relay`, `"user@other"@relay`, `<@relay:user@other>`) is refused for untrusted
//! clients, as Postfix's `allow_untrusted_routing = no` does, because a next hop that honours the
//! `%` hack or bang paths would relay it onwards.

use crate::command::{domain_of, local_part};
use ipnet::IpNet;
use std::net::IpAddr;

/// Recipients are accepted for `relay_domains` from anyone, and for any domain from clients in
/// `trusted_networks`. The default trusts loopback only and relays no domains.
#[derive(Clone, Debug)]
pub struct RelayPolicy {
    /// Domains we accept mail for; an entry starting with `.` also matches every subdomain.
    pub relay_domains: Vec<String>,
    /// Client networks allowed to relay anywhere.
    pub trusted_networks: Vec<IpNet>,
    /// Accept sender-specified routing (`@`, `%`, `!` in the local part, source routes) from
    /// untrusted clients to relay domains. Off by default.
    pub allow_untrusted_routing: bool,
    /// Journal addresses (lower case): mail to them is archived, not delivered, and only
    /// trusted clients may send it, whatever the domain.
    pub journal_recipients: Vec<String>,
}

/// The policy's answer for one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayVerdict {
    /// Accept the recipient.
    Accept,
    /// Not a relay domain and not a trusted client: `554 5.7.1 Relay access denied`.
    RelayDenied,
    /// A relay domain, but the address asks the next hop to route elsewhere: `554 5.7.1`.
    RoutingDenied,
}

impl Default for RelayPolicy {
    fn default() -> Self {
        RelayPolicy {
            relay_domains: Vec::new(),
            trusted_networks: ["127.0.0.0/8", "::1/128"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            allow_untrusted_routing: false,
            journal_recipients: Vec::new(),
        }
    }
}

impl RelayPolicy {
    /// Is `rcpt` a journal address?
    pub fn is_journal(&self, rcpt: &str) -> bool {
        self.journal_recipients
            .iter()
            .any(|j| j.eq_ignore_ascii_case(rcpt))
    }

    /// Is `client` in `trusted_networks` (IPv4-mapped IPv6 addresses compared as IPv4)?
    pub fn trusts(&self, client: IpAddr) -> bool {
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(client),
            v4 => v4,
        };
        self.trusted_networks.iter().any(|n| n.contains(&client))
    }

    /// May `client` send to `rcpt` (a parsed, valid address whose source route, if any, was
    /// dropped; `source_route` says whether there was one)? `postmaster` without a domain is
    /// always accepted (RFC 5321).
    pub fn check(&self, client: IpAddr, rcpt: &str, source_route: bool) -> RelayVerdict {
        if self.trusts(client) {
            return RelayVerdict::Accept;
        }
        if self.is_journal(rcpt) {
            // A journal address is a way into the archive: trusted clients only.
            return RelayVerdict::RelayDenied;
        }
        let Some(domain) = domain_of(rcpt) else {
            return if rcpt.eq_ignore_ascii_case("postmaster") {
                RelayVerdict::Accept
            } else {
                RelayVerdict::RelayDenied
            };
        };
        if !self.is_relay_domain(&domain) {
            return RelayVerdict::RelayDenied;
        }
        let routed =
            source_route || local_part(rcpt).is_some_and(|local| local.contains(['@', '%', '!']));
        if routed && !self.allow_untrusted_routing {
            return RelayVerdict::RoutingDenied;
        }
        RelayVerdict::Accept
    }

    fn is_relay_domain(&self, domain: &str) -> bool {
        self.relay_domains.iter().any(|d| {
            let d = d.to_ascii_lowercase();
            match d.strip_prefix('.') {
                Some(parent) => domain.ends_with(&d) || domain == parent,
                None => domain == d,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RelayVerdict::*;

    #[test]
    fn default_trusts_loopback_only() {
        let p = RelayPolicy::default();
        let check = |ip: &str, rcpt| p.check(ip.parse().unwrap(), rcpt, false);
        assert_eq!(check("127.0.0.1", "x@anywhere.example"), Accept);
        assert_eq!(check("::1", "x@anywhere.example"), Accept);
        assert_eq!(check("::ffff:127.0.0.1", "x@anywhere.example"), Accept);
        assert_eq!(check("192.0.2.1", "x@anywhere.example"), RelayDenied);
        assert_eq!(check("192.0.2.1", "postmaster"), Accept);
    }

    #[test]
    fn relay_domains_match_exactly_or_by_subdomain_entry() {
        let p = RelayPolicy {
            relay_domains: vec!["Example.org".into(), ".corp.example".into()],
            trusted_networks: vec![],
            allow_untrusted_routing: false,
            journal_recipients: vec![],
        };
        let ip = "198.51.100.9".parse().unwrap();
        assert_eq!(p.check(ip, "a@example.ORG", false), Accept);
        assert_eq!(p.check(ip, "a@sub.example.org", false), RelayDenied);
        assert_eq!(p.check(ip, "a@badexample.org", false), RelayDenied);
        assert_eq!(p.check(ip, "a@mail.corp.example", false), Accept);
        assert_eq!(p.check(ip, "a@corp.example", false), Accept);
        assert_eq!(p.check(ip, "a@xcorp.example", false), RelayDenied);
    }

    #[test]
    fn a_journal_address_is_for_trusted_clients_only_even_in_a_relay_domain() {
        let p = RelayPolicy {
            relay_domains: vec!["archive.test".into()],
            journal_recipients: vec!["journal@archive.test".into()],
            ..RelayPolicy::default()
        };
        let stranger = "192.0.2.77".parse().unwrap();
        let local = "127.0.0.1".parse().unwrap();
        assert_eq!(p.check(local, "Journal@Archive.test", false), Accept);
        assert_eq!(
            p.check(stranger, "Journal@Archive.test", false),
            RelayDenied
        );
        assert_eq!(p.check(stranger, "someone@archive.test", false), Accept);
    }

    #[test]
    fn sender_specified_routing_is_refused_for_untrusted_clients_only() {
        let mut p = RelayPolicy {
            relay_domains: vec!["relay.test".into()],
            ..RelayPolicy::default()
        };
        let stranger = "192.0.2.77".parse().unwrap();
        let local = "127.0.0.1".parse().unwrap();
        for routed in [
            "user%other.example@relay.test",
            "USER%OTHER.EXAMPLE@RELAY.TEST",
            "other.example!user@relay.test",
            "\"user@other.example\"@relay.test",
            "\"user%other.example\"@relay.test",
            "\"us\\%er\"@relay.test",
        ] {
            assert_eq!(p.check(stranger, routed, false), RoutingDenied, "{routed}");
            assert_eq!(p.check(local, routed, false), Accept, "{routed} trusted");
        }
        assert_eq!(p.check(stranger, "user@relay.test", true), RoutingDenied);
        assert_eq!(p.check(local, "user@relay.test", true), Accept);
        for plain in [
            "user@relay.test",
            "\"john doe\"@relay.test",
            "a+b@Relay.Test",
        ] {
            assert_eq!(p.check(stranger, plain, false), Accept, "{plain}");
        }
        assert_eq!(
            p.check(stranger, "user%relay.test@other.example", false),
            RelayDenied
        );
        assert_eq!(p.check(stranger, "user@[192.0.2.1]", false), RelayDenied);
        p.allow_untrusted_routing = true;
        assert_eq!(
            p.check(stranger, "user%other.example@relay.test", false),
            Accept
        );
        assert_eq!(p.check(stranger, "user@relay.test", true), Accept);
    }
}
