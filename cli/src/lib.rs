//! The `tidemark` binary's library: what the subcommands run (daemons, `load`,
//! `promote`, `export`, the demo, `wan-sim`) and the TOML config they read. Kept apart
//! from `tidemark-actors` so that library users do not inherit the binary's
//! dependencies (clap, toml, tracing-subscriber, mimalloc, ...); the process tests in
//! `cli/tests` use it to read status files, keys and workloads.

pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod export;
pub mod failover;
#[doc(hidden)]
pub mod fuzzing;
pub mod load;
pub mod metrics;
pub mod progress;
pub mod promote;
pub mod status;
pub mod switchover;
pub mod verify;
pub mod view;
pub mod wansim;
pub mod watch;
pub mod workload;
