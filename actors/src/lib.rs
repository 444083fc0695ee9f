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
pub use remote::{Applied, ApplyHook};

/// Asks any actor to stop.
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct Stop;

/// For a simulation on tokio's paused clock: puts the clock on tokio's 1 ms timer grid.
/// Call it once right after `tokio::time::pause()`, before building the engine.
///
/// `pause()` freezes the clock at however much real time passed since the runtime was
/// built, so its phase against the timer grid (timer deadlines round up to whole
/// milliseconds from the runtime's start) depends on real time; two runs of one seed
/// could then group timers differently and diverge (seen under load). Sleeping 1 ms
/// lets auto-advance move the clock exactly onto a grid point, the same for every run.
pub async fn align_paused_clock() {
    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
}

/// The actors' "now": tokio's clock, so that a simulation with paused time is
/// deterministic.
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
