//! tidemark's actor layer: `LocalUnit`, `Link`, `RemoteUnit`, `RemoteSite` and
//! `OrdererActor` wire the runtime-free core (crate `tidemark`) to threads, disks and the
//! network; [`EngineBuilder`] starts a consistency group.

pub mod config;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod error;
pub mod export;
pub mod msg;
pub mod nbd;
pub mod net;
pub mod promote;
pub mod units;
pub mod wansim;
pub mod workload;

pub use engine::{Engine, EngineBuilder, PairSpec, Role, Stats, StoreSpec};
pub use error::EngineError;
pub use msg::{now, Stop, Wall};
pub use net::impair::Impairment;
pub use units::remote::{Applied, ApplyHook};
