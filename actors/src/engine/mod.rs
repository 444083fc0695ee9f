//! Library start-up: describe systems, pairs, the group's orderer, the network and the
//! clock with an [`EngineBuilder`]; [`EngineBuilder::start`] starts the actor system and
//! returns an [`Engine`] handle to write, flush, drain, watch and shut down.
//!
//! - `spec`: what a group is ([`EngineBuilder`], [`PairSpec`], [`UdpTransport`], ...);
//! - `start`: [`EngineBuilder::start`], which opens units and journals and wires actors;
//! - `handle`: the running [`Engine`]: write, flush, drain, health, shutdown;
//! - `stats`: [`Engine::stats`] and its figures.

mod boot;
mod handle;
mod spec;
mod start;
mod stats;

pub use crate::units::local::TrackConfig;
pub use handle::{Engine, PairControl, PairHandle};
pub use spec::{
    EngineBuilder, InitialSync, PairSpec, PrimaryJournal, Role, StoreSpec, UdpTransport,
};
pub use stats::{PairStats, StageLag, Stats};

use handle::LinkAddr;
