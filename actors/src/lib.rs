//! tidemark's actor layer: the actix actors (`LocalUnit`, `RemoteUnit`, `RemoteSite`,
//! `OrdererActor`, `TimeBaseActor`, the links) that wire the runtime-free core (crate
//! `tidemark`) to threads, disks and the network; [`EngineBuilder`] starts a
//! consistency group; `nbd` serves its units to NBD clients.
//!
//! - [`msg`]: the messages, [`Stop`], [`Wall`], [`now`]: what every actor shares;
//! - [`units`]: the actors of a system and the disk pools and journal they use;
//! - [`net`]: routing what arrives, the in-process link with impairment, the UDP link;
//!   it depends on [`msg`] alone;
//! - [`engine`]: [`EngineBuilder`] and the running [`Engine`];
//! - [`health`]: the first fatal failure of a part, which stops the process;
//! - [`nbd`]: the tokio NBD driver over the core's sans-IO protocol;
//! - [`check`]: whether a run's applications were consistent cuts (I1) and the remote
//!   units equal the local ones: one checker for the demo, the examples and the tests.
//!
//! The `tidemark` binary (config, daemons, promote, export, demo) is crate
//! `tidemark-cli`.

pub mod check;
pub mod engine;
pub mod error;
pub mod health;
pub mod msg;
pub mod nbd;
pub mod net;
pub mod units;

pub use check::{units_differ, CutChecker};
pub use engine::{
    Engine, EngineBuilder, InitialSync, PairSpec, PairStats, PrimaryJournal, Role, Stats,
    StoreSpec, TrackConfig,
};
pub use error::EngineError;
pub use health::{Failure, Health};
pub use msg::{now, Stop, Wall};
pub use net::impair::Impairment;
pub use units::remote::{Applied, ApplyHook};
