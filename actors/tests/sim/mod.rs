//! Deterministic simulation for the actor tests: an actix system on a current-thread
//! tokio runtime whose clock starts paused.
//!
//! Starting paused (rather than calling `tokio::time::pause()` once running) puts the
//! clock exactly at the timer wheel's origin. Paused later, the clock stands at however
//! much real time passed since the runtime was built, and that offset (larger under
//! load) changes how the wheel's levels cascade, and so the order in which timers due
//! in the same millisecond fire: one seed could then replay differently.

use std::future::Future;

/// Runs `f` as the actix system's main future, on the paused clock (time advances only
/// when every actor is idle, straight to the next timer).
pub fn run<F: Future>(f: F) -> F::Output {
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime builds")
    })
    .block_on(f)
}
