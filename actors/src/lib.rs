//! tidemark's actor layer: `LocalUnit`, `Link`, `RemoteUnit`, `RemoteSite` and
//! `OrdererActor` wire the runtime-free core (crate `tidemark`) to threads, disks and the
//! network; [`EngineBuilder`] starts a consistency group.

pub mod config;
pub mod daemon;
pub mod demo;
pub mod disk;
pub mod engine;
pub mod error;
pub mod export;
pub mod impair;
pub mod journaling;
pub mod lag;
pub mod link;
pub mod local;
pub mod msg;
pub mod nbd_server;
pub mod orderer;
pub mod promote;
pub mod remote;
pub mod route;
pub mod site;
pub mod timebase;
pub mod udp;
pub mod wansim;
pub mod workload;

pub use engine::{Engine, EngineBuilder, PairSpec, Role, Stats, StoreSpec};
pub use error::EngineError;
pub use impair::Impairment;
pub use msg::{now, Stop, Wall};
pub use remote::{Applied, ApplyHook};
