//! Who is on the other end of a connection, as far as limits are concerned:
//! the [`ClientAddr`] that per-address connection caps and the failed-login
//! throttle count by, and the extractor that gives it to handlers.
//!
//! It is the TCP peer's address, never a header: behind a reverse proxy or
//! a load balancer that does not keep client addresses, every client shares
//! the proxy's address. An IPv6 client counts by its /64 network (one host
//! usually has a whole /64 to pick addresses from). This module never trusts
//! anything a client sends about itself.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

use super::error::ApiError;

/// A client's address as limits count it: an IPv4 address, or the /64
/// network of an IPv6 address (an IPv4 address mapped into IPv6 is the
/// IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(IpAddr);

impl ClientAddr {
    pub fn of(ip: IpAddr) -> ClientAddr {
        match ip {
            IpAddr::V4(v4) => ClientAddr(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientAddr(IpAddr::V4(v4)),
                None => {
                    let network = u128::from(v6) & !((1u128 << 64) - 1);
                    ClientAddr(IpAddr::V6(Ipv6Addr::from(network)))
                }
            },
        }
    }
}

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// The calling client's address, from the connection the request came on
/// (`super::serve` records it on every request).
impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| ClientAddr::of(peer.ip()))
            .ok_or_else(|| {
                ApiError::internal(
                    "finding the client's address",
                    "the request carries no connection info; is the router served by gateway::serve?",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_counts_by_address_and_ipv6_by_its_64_network() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(ClientAddr::of(a), ClientAddr::of(b));
        assert_ne!(ClientAddr::of(a), ClientAddr::of(other));
        assert_eq!(ClientAddr::of(a).to_string(), "2001:db8:1:2::/64");
        let v4: IpAddr = "192.0.2.7".parse().expect("ip");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(ClientAddr::of(mapped), ClientAddr::of(v4));
        assert_eq!(ClientAddr::of(v4).to_string(), "192.0.2.7");
    }
}
