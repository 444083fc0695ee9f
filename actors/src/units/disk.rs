//! Blocking disk work off the actor threads.
//!
//! A [`Disk`] is a pool of threads fed by a crossbeam channel; each job's result comes
//! back as a future the actor awaits. With zero threads jobs run inline on the caller
//! (simulation and in-memory benchmarks: deterministic, no thread hand-off). A pool of
//! one thread (a "lane") runs its jobs in the order they were handed to it; in a larger
//! pool ordering is the caller's job (at most one job of a unit in flight).

use crossbeam_channel::{unbounded, Sender};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// A shareable handle to the disk pool.
#[derive(Clone)]
pub struct Disk {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Disk {
    /// A pool of `threads` disk threads; 0 runs every job inline.
    pub fn new(threads: usize) -> Disk {
        let (tx, handles) = if threads == 0 {
            (None, Vec::new())
        } else {
            let (tx, rx) = unbounded::<Job>();
            let handles = (0..threads)
                .map(|i| {
                    let rx = rx.clone();
                    std::thread::Builder::new()
                        .name(format!("tidemark-disk-{i}"))
                        .spawn(move || {
                            while let Ok(job) = rx.recv() {
                                job();
                            }
                        })
                })
                .filter_map(Result::ok)
                .collect::<Vec<_>>();
            (Some(tx), handles)
        };
        Disk {
            inner: Arc::new(Inner {
                tx: Mutex::new(tx),
                threads: Mutex::new(handles),
            }),
        }
    }

    /// Runs `f` on a disk thread (or inline); the future yields its result, or `None`
    /// if the pool was shut down before the job ran.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> impl Future<Output = Option<R>> + 'static {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let sender = self
            .inner
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match sender {
            Some(s) => {
                // A closed pool drops the job, and with it `tx`: the future yields None.
                let _ = s.send(job);
            }
            None => job(),
        }
        async move { rx.await.ok() }
    }

    /// Stops accepting jobs, lets queued ones finish, joins the threads.
    pub fn shutdown(&self) {
        self.inner
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let handles: Vec<_> = self
            .inner
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for h in handles {
            let _ = h.join();
        }
    }
}
