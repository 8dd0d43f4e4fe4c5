//! Relay policy: who may send mail to which recipients. A gateway is never an open relay.

use crate::command::domain_of;
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
}

impl Default for RelayPolicy {
    fn default() -> Self {
        RelayPolicy {
            relay_domains: Vec::new(),
            trusted_networks: ["127.0.0.0/8", "::1/128"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
        }
    }
}

impl RelayPolicy {
    /// May `client` send to `rcpt`? `postmaster` without a domain is always accepted (RFC 5321).
    pub fn allows(&self, client: IpAddr, rcpt: &str) -> bool {
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(client),
            v4 => v4,
        };
        if self.trusted_networks.iter().any(|n| n.contains(&client)) {
            return true;
        }
        let Some(domain) = domain_of(rcpt) else {
            return rcpt.eq_ignore_ascii_case("postmaster");
        };
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

    #[test]
    fn default_trusts_loopback_only() {
        let p = RelayPolicy::default();
        assert!(p.allows("127.0.0.1".parse().unwrap(), "x@anywhere.example"));
        assert!(p.allows("::1".parse().unwrap(), "x@anywhere.example"));
        assert!(p.allows("::ffff:127.0.0.1".parse().unwrap(), "x@anywhere.example"));
        assert!(!p.allows("192.0.2.1".parse().unwrap(), "x@anywhere.example"));
        assert!(p.allows("192.0.2.1".parse().unwrap(), "postmaster"));
    }

    #[test]
    fn relay_domains_match_exactly_or_by_subdomain_entry() {
        let p = RelayPolicy {
            relay_domains: vec!["Example.org".into(), ".corp.example".into()],
            trusted_networks: vec![],
        };
        let ip = "198.51.100.9".parse().unwrap();
        assert!(p.allows(ip, "a@example.ORG"));
        assert!(!p.allows(ip, "a@sub.example.org"));
        assert!(!p.allows(ip, "a@badexample.org"));
        assert!(p.allows(ip, "a@mail.corp.example"));
        assert!(p.allows(ip, "a@corp.example"));
        assert!(!p.allows(ip, "a@xcorp.example"));
    }
}
