//! The download guard: which addresses a backing image download may connect to, so that a URL
//! given by a user cannot make bicsi fetch from the node itself, the cloud's metadata service or
//! another address the user could not reach on their own (server-side request forgery).
//!
//! The rule, checked against every address a download would connect to:
//! - an address in an **allowed** network (setting `backing-image-download-allowed-networks`) is
//!   allowed: that is how an operator opens a hole;
//! - else an address in a **denied** network is refused: the setting
//!   `backing-image-download-denied-networks`, or when it is empty the default of where bicsi
//!   runs: link-local everywhere; loopback, the unspecified address and this node's own addresses
//!   too when bicsi runs in a cluster (the split mode, `--store kubernetes`), not on the embedded
//!   `bicsi serve`, where serving a file on 127.0.0.1 to yourself is a normal thing to do;
//! - link-local (169.254.0.0/16 and fe80::/10, which hold the cloud metadata services, and the
//!   AWS IPv6 metadata address fd00:ec2::254) is denied whatever the denied setting says;
//! - everything else is allowed.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are checked as the IPv4 address they carry.
//!
//! Where it is checked, so that no address escapes it: a URL whose host is an IP literal before
//! any connection and again on every redirect (reqwest does not resolve literals), and a host
//! name by the resolver the HTTP client connects through ([`GuardedResolver`]): it resolves
//! once, drops the denied addresses and hands the client only the allowed ones, so the address
//! checked is the address connected to and a DNS answer cannot change in between. A name whose
//! every address is denied is refused with the first denied one named.
//!
//! It must not know about settings storage, backing images or disks: callers build a guard from
//! the settings' text and hand it to the download.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The setting naming the networks downloads may not connect to (empty: the default of where
/// bicsi runs).
pub const DENIED_SETTING: &str = "backing-image-download-denied-networks";
/// The setting naming networks downloads may connect to even when a denied network holds them.
pub const ALLOWED_SETTING: &str = "backing-image-download-allowed-networks";

static IN_CLUSTER: AtomicBool = AtomicBool::new(false);

/// Says that this process runs bicsi in a cluster (the split mode's controller and node agents,
/// or `--store kubernetes`): loopback and the node's own addresses are then denied by default.
/// Set once at start; the embedded `bicsi serve` leaves it off.
pub fn set_in_cluster(yes: bool) {
    IN_CLUSTER.store(yes, Ordering::Relaxed);
}

/// Whether [`set_in_cluster`] said so.
pub fn in_cluster() -> bool {
    IN_CLUSTER.load(Ordering::Relaxed)
}

/// One entry of a network list as a user wrote it: a named group or a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// 127.0.0.0/8, ::1, and the unspecified addresses 0.0.0.0 and :: (which reach the host).
    Loopback,
    /// 169.254.0.0/16, fe80::/10 and fd00:ec2::254 (the cloud metadata services live there).
    LinkLocal,
    /// This node's own interface addresses.
    Node,
    Net(IpNet),
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Loopback => f.write_str("loopback"),
            Entry::LinkLocal => f.write_str("link-local"),
            Entry::Node => f.write_str("node"),
            Entry::Net(n) => write!(f, "{n}"),
        }
    }
}

/// Parses a list of networks as the two settings take it: entries separated by commas or
/// spaces, each `loopback`, `link-local`, `node`, a CIDR (`10.0.0.0/8`, `fd00::/8`) or one
/// address. Errors name the entry and the accepted forms.
pub fn parse_networks(setting: &str, value: &str) -> Result<Vec<Entry>, String> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| match s.to_ascii_lowercase().as_str() {
            "loopback" => Ok(Entry::Loopback),
            "link-local" => Ok(Entry::LinkLocal),
            "node" => Ok(Entry::Node),
            _ => s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|n| Entry::Net(n.trunc()))
                .map_err(|_| {
                    format!(
                        "setting {setting:?}: {s:?} is not a network; use CIDRs such as 10.0.0.0/8 \
                         or fd00::/8, single addresses, or the names loopback, link-local and node, \
                         separated by commas"
                    )
                }),
        })
        .collect()
}

/// A refused address, with what refused it: the error a download ends with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{}, in the denied network {network} (setting {DENIED_SETTING}); downloads never connect \
     there. If that server is meant to be reachable, add it to setting {ALLOWED_SETTING} (e.g. \
     `bicsi set setting {ALLOWED_SETTING} {}`)",
    self.what(),
    IpNet::from(*addr)
)]
pub struct Refusal {
    pub host: String,
    pub addr: IpAddr,
    /// The denied network that holds it, as the setting or the default names it.
    pub network: String,
}

impl Refusal {
    fn what(&self) -> String {
        let literal = self.host.trim_start_matches('[').trim_end_matches(']');
        if literal.parse::<IpAddr>().is_ok() {
            format!("address {}", self.addr)
        } else {
            format!("{} resolves to {}", self.host, self.addr)
        }
    }
}

/// Which addresses a download may connect to: see the module doc.
#[derive(Clone, Debug, Default)]
pub struct NetworkGuard {
    denied: Vec<(IpNet, String)>,
    allowed: Vec<IpNet>,
}

const LINK_LOCAL: [&str; 3] = ["169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"];
const LOOPBACK: [&str; 4] = ["127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"];

impl NetworkGuard {
    /// A guard that allows every address (for tests of the transfer itself).
    pub fn open() -> NetworkGuard {
        NetworkGuard::default()
    }

    /// The guard of the two settings' values (as stored; empty denied means the default of
    /// where bicsi runs: see the module doc), with this node's addresses for `node`.
    pub fn from_settings(
        denied: &str,
        allowed: &str,
        in_cluster: bool,
        node_addresses: &[IpAddr],
    ) -> Result<NetworkGuard, String> {
        let mut denied_entries = parse_networks(DENIED_SETTING, denied)?;
        if denied_entries.is_empty() {
            denied_entries = if in_cluster {
                vec![Entry::LinkLocal, Entry::Loopback, Entry::Node]
            } else {
                vec![Entry::LinkLocal]
            };
        }
        if !denied_entries.contains(&Entry::LinkLocal) {
            denied_entries.insert(0, Entry::LinkLocal);
        }
        let allowed_entries = parse_networks(ALLOWED_SETTING, allowed)?;
        let mut guard = NetworkGuard::default();
        for e in &denied_entries {
            for n in expand(e, node_addresses) {
                guard.denied.push((n, label(e, &n)));
            }
        }
        for e in &allowed_entries {
            guard.allowed.extend(expand(e, node_addresses));
        }
        Ok(guard)
    }

    /// Whether a download may connect to `addr` (of `host`, for the message).
    pub fn check(&self, host: &str, addr: IpAddr) -> Result<(), Refusal> {
        let addr = canonical(addr);
        if self.allowed.iter().any(|n| n.contains(&addr)) {
            return Ok(());
        }
        match self.denied.iter().find(|(n, _)| n.contains(&addr)) {
            Some((_, network)) => Err(Refusal {
                host: host.to_string(),
                addr,
                network: network.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Checks a URL whose host is an IP literal (a host name is checked when it is resolved,
    /// by [`GuardedResolver`]).
    pub fn check_url(&self, url: &Url) -> Result<(), Refusal> {
        let host = url.host_str().unwrap_or_default();
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        match literal.parse::<IpAddr>() {
            Ok(a) => self.check(host, a),
            Err(_) => Ok(()),
        }
    }

    /// The resolver to build the HTTP client with.
    pub fn resolver(&self) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver {
            guard: self.clone(),
        })
    }
}

/// The addresses of this node's interfaces (for `node`); none when they cannot be read.
pub fn node_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|i| {
            let a = i.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

fn expand(e: &Entry, node: &[IpAddr]) -> Vec<IpNet> {
    let parse = |s: &[&str]| {
        s.iter()
            .map(|n| n.parse().expect("built-in network"))
            .collect()
    };
    match e {
        Entry::Loopback => parse(&LOOPBACK),
        Entry::LinkLocal => parse(&LINK_LOCAL),
        Entry::Node => node.iter().map(|a| IpNet::from(canonical(*a))).collect(),
        Entry::Net(n) => vec![*n],
    }
}

fn label(e: &Entry, n: &IpNet) -> String {
    match e {
        Entry::Net(_) => n.to_string(),
        named => format!("{n} ({named})"),
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries; others unchanged.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The HTTP client's resolver: resolves a host name once and keeps only the addresses the guard
/// allows, so the client connects to an address that was checked.
#[derive(Debug)]
pub struct GuardedResolver {
    guard: NetworkGuard,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_refusal = None;
            let mut ok = Vec::new();
            for a in found {
                match guard.check(&host, a.ip()) {
                    Ok(()) => ok.push(a),
                    Err(r) => {
                        first_refusal.get_or_insert(r);
                    }
                }
            }
            if ok.is_empty() {
                if let Some(r) = first_refusal {
                    return Err(Box::new(r) as Box<dyn std::error::Error + Send + Sync>);
                }
                return Err(format!("{host}: the name resolves to no address").into());
            }
            Ok(Box::new(ok.into_iter()) as Addrs)
        })
    }
}

/// The guard's refusal in an error's source chain, if that is why it failed.
pub fn refusal_in(e: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refusal>() {
            return Some(r.clone());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn refused(g: &NetworkGuard, a: &str) -> Option<String> {
        g.check("h", ip(a)).err().map(|r| r.network)
    }

    #[test]
    fn embedded_default_denies_link_local_only() {
        let g = NetworkGuard::from_settings("", "", false, &[ip("10.1.2.3")]).unwrap();
        for a in ["169.254.169.254", "169.254.0.1", "fe80::1", "fd00:ec2::254"] {
            assert!(refused(&g, a).is_some(), "{a}");
        }
        for a in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "8.8.8.8",
            "192.168.1.1",
            "0.0.0.0",
        ] {
            assert_eq!(refused(&g, a), None, "{a}");
        }
    }

    #[test]
    fn cluster_default_denies_loopback_and_the_node_too() {
        let g =
            NetworkGuard::from_settings("", "", true, &[ip("10.1.2.3"), ip("fd12::7")]).unwrap();
        for a in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "0.0.0.0",
            "::",
            "10.1.2.3",
            "fd12::7",
            "169.254.169.254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(refused(&g, a).is_some(), "{a}");
        }
        for a in ["10.1.2.4", "8.8.8.8", "fd12::8"] {
            assert_eq!(refused(&g, a), None, "{a}");
        }
        assert_eq!(refused(&g, "127.0.0.1").unwrap(), "127.0.0.0/8 (loopback)");
    }

    #[test]
    fn a_set_list_replaces_the_default_but_link_local_stays_denied() {
        let g = NetworkGuard::from_settings("10.0.0.0/8, 192.168.0.5", "", true, &[]).unwrap();
        assert_eq!(refused(&g, "10.200.0.1").unwrap(), "10.0.0.0/8");
        assert_eq!(refused(&g, "192.168.0.5").unwrap(), "192.168.0.5/32");
        assert_eq!(refused(&g, "192.168.0.6"), None);
        assert_eq!(refused(&g, "127.0.0.1"), None);
        assert!(refused(&g, "169.254.169.254").is_some());
    }

    #[test]
    fn an_allowed_network_opens_a_hole_even_in_link_local() {
        let g = NetworkGuard::from_settings("", "127.0.0.1 169.254.10.0/24", true, &[]).unwrap();
        assert_eq!(refused(&g, "127.0.0.1"), None);
        assert_eq!(refused(&g, "::ffff:127.0.0.1"), None);
        assert!(refused(&g, "127.0.0.2").is_some());
        assert_eq!(refused(&g, "169.254.10.9"), None);
        assert!(refused(&g, "169.254.169.254").is_some());
    }

    #[test]
    fn bad_entries_are_named() {
        let e = NetworkGuard::from_settings("10.0.0.0/8,bogus", "", false, &[]).unwrap_err();
        assert!(e.contains("\"bogus\"") && e.contains(DENIED_SETTING), "{e}");
        let e = NetworkGuard::from_settings("", "10.0.0.0/33", false, &[]).unwrap_err();
        assert!(e.contains(ALLOWED_SETTING), "{e}");
        assert_eq!(
            parse_networks(DENIED_SETTING, "Loopback,NODE , link-local").unwrap(),
            vec![Entry::Loopback, Entry::Node, Entry::LinkLocal]
        );
    }

    #[test]
    fn url_literals_are_checked_names_are_left_to_the_resolver() {
        let g = NetworkGuard::from_settings("", "", true, &[]).unwrap();
        let r = g
            .check_url(&Url::parse("http://169.254.169.254/latest/meta-data").unwrap())
            .unwrap_err();
        assert_eq!(r.addr, ip("169.254.169.254"));
        assert!(r.to_string().contains(ALLOWED_SETTING), "{r}");
        assert!(
            g.check_url(&Url::parse("http://[::1]:8080/x").unwrap())
                .is_err()
        );
        assert!(
            g.check_url(&Url::parse("http://localhost/x").unwrap())
                .is_ok()
        );
        assert!(g.check("x", ip("0.0.0.0")).is_err());
        assert!(g.check("x", ip("fd00:ec2::254")).is_err());
    }

    #[tokio::test]
    async fn the_resolver_drops_denied_addresses_and_refuses_a_name_with_none_left() {
        let g = NetworkGuard::from_settings("", "", true, &[]).unwrap();
        let e = g
            .resolver()
            .resolve("localhost".parse().unwrap())
            .await
            .err()
            .expect("localhost is loopback");
        let r = refusal_in(e.as_ref()).expect("a refusal");
        assert!(r.addr.is_loopback(), "{r}");
        assert_eq!(r.host, "localhost");
        let open = NetworkGuard::from_settings("", "", false, &[]).unwrap();
        let addrs: Vec<_> = open
            .resolver()
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
