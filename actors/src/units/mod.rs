//! The actors of a system and what they run on: local and remote units, the remote
//! site, the group's orderer, the time base, plus the disk pools, the shared journal
//! and commit-lag samples they use. They talk to the network only through messages
//! (`crate::msg`): a unit holds its link as a `Recipient<Outbound>`.

pub mod disk;
pub mod journaling;
pub mod lag;
pub mod local;
pub mod orderer;
pub mod remote;
pub mod site;
pub mod sync;
pub mod timebase;
pub mod undo;
