//! Moving messages between systems: [`route::Routes`] (who takes what arrives), the
//! seeded impairment, the in-process link ([`sim::Link`]) and the UDP link
//! ([`udp::UdpLink`]). Depends on `crate::msg` only, never on the units or the engine.

pub mod impair;
pub mod route;
pub mod sim;
pub mod udp;
