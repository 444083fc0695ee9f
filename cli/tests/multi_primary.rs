//! Two primary *processes* in one consistency group (the hazard "several primary
//! processes" of docs/design.md): `site-a` serves export "log", `site-c` serves export "data", both
//! replicate to `site-b`. Their clocks are skewed on purpose
//! (`TIDEMARK_TEST_CLOCK_OFFSET_MS`); the time base measures the skew over the link and
//! commit-waits, so a write issued on one process after a write on the other completed
//! is stamped later.
//!
//! - Dependent writes alternate between the two processes while the secondary is
//!   SIGKILLed and restarted; `promote` on a copy after every kill must give a cut of the
//!   write sequence across both exports (I1), byte for byte; at the end remote == local.
//! - A skew beyond `max_clock_skew_ms` holds acknowledgements: the status says why and
//!   the client's write is not acknowledged.
//!
//! The seed is printed; `TIDEMARK_SEED=<n>` replays one.

mod common;
use common::dependent::*;
use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Instant, SystemTime};

fn seed() -> u64 {
    seed_or(20261129)
}

/// A group of two primary systems (one pair each) and one secondary.
struct Group {
    site: Site,
    nbd: [u16; 2],
}

impl Group {
    fn new(max_skew_ms: u64) -> Group {
        let nbd = [free_tcp_port(), free_tcp_port()];
        let spec = ConfigText::new()
            .max_clock_skew_ms(max_skew_ms)
            .system(SystemSpec::primary("site-a", free_port()).nbd(nbd[0]))
            .system(SystemSpec::primary("site-c", free_port()).nbd(nbd[1]))
            .system(SystemSpec::secondary("site-b", free_port()))
            .pair(PairSpec::new("log", 4 << 20, "site-a", "site-b"))
            .pair(PairSpec::new("data", 8 << 20, "site-c", "site-b"));
        Group {
            site: Site::with_config(spec),
            nbd,
        }
    }

    /// `tidemark primary --system NAME` with its wall clock shifted by `offset_ms`.
    fn primary(&self, name: &str, offset_ms: i64) -> Child {
        Command::new(bin())
            .args(["primary", "--config", self.site.cfg(), "--system", name])
            .env("TIDEMARK_TEST_CLOCK_OFFSET_MS", offset_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tidemark primary")
    }
}

/// The processes of a test; those still held are killed when it ends.
#[derive(Default)]
struct Procs(Vec<(String, Option<Child>)>);

impl Procs {
    fn add(&mut self, name: &str, c: Child) {
        self.0.push((name.into(), Some(c)));
    }

    fn take(&mut self, name: &str) -> Child {
        self.0
            .iter_mut()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c.take())
            .expect("the process runs")
    }

    fn put(&mut self, name: &str, c: Child) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, slot)) => *slot = Some(c),
            None => self.add(name, c),
        }
    }
}

impl Procs {
    /// SIGTERM to each, primaries first; each must exit 0.
    fn stop_all(&mut self) {
        for name in ["site-a", "site-c", "site-b"] {
            let out = stop(self.take(name));
            assert!(
                out.status.success(),
                "{name} did not stop cleanly: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in self.0.iter_mut() {
            if let Some(c) = c.take() {
                kill9(c);
            }
        }
    }
}

fn local_equals_remote(site: &Site, seed: u64) {
    for (name, local) in [("log", "site-a"), ("data", "site-c")] {
        let l = std::fs::read(site.path(&format!("run/{local}/{name}.img"))).expect("local");
        let r = std::fs::read(site.path(&format!("run/site-b/{name}.img"))).expect("remote");
        assert!(
            l == r,
            "seed {seed}: {name}: the remote unit differs from the local unit"
        );
    }
}

#[test]
fn dependent_writes_across_two_primary_processes_with_skewed_clocks_give_cuts() {
    let seed = seed();
    eprintln!("multi-primary test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    // site-c's clock runs 8 ms behind site-a's: without commit-wait a write on site-c
    // issued right after a write on site-a completed would be stamped earlier.
    const SKEW_MS: i64 = 8;
    let g = Group::new(50);
    let mut procs = Procs::default();
    procs.add("site-b", g.site.secondary());
    let mut a = g.primary("site-a", 0);
    let mut c = g.primary("site-c", -SKEW_MS);
    wait_tcp(g.nbd[0], &mut a, PATIENCE);
    wait_tcp(g.nbd[1], &mut c, PATIENCE);
    procs.add("site-a", a);
    procs.add("site-c", c);

    let remotes = [g.site.path("run/site-b/journal")];
    let run = writes_through_crashes(seed, g.nbd, (600, 20_000), 3, &remotes, |k| {
        kill9(procs.take("site-b"));
        let result = g.site.promote_copy(&format!("copy{k}"));
        procs.put("site-b", g.site.secondary());
        result
    });
    let want = counts(&run.plan[..run.done]);
    eprintln!("{want:?} writes per export, across two processes");

    // Each primary measured the other's clock at least as far away as it is.
    let now = SystemTime::now();
    let sa = g.site.status_after("site-a", now, PATIENCE);
    let sc = g.site.status_after("site-c", now, PATIENCE);
    for (st, peer) in [(&sa, "site-c"), (&sc, "site-a")] {
        let clock = &st["clock"];
        assert_eq!(clock["state"], "ok", "seed {seed}: {clock}");
        let bound = clock["peers"][peer]["bound_us"].as_u64().unwrap_or(0);
        assert!(
            bound >= SKEW_MS as u64 * 1000,
            "seed {seed}: the bound on {peer}'s skew ({bound} us) is below the true skew: {clock}"
        );
        let wait = clock["commit_wait_us"].as_u64().unwrap_or(0);
        assert!(
            wait >= bound,
            "seed {seed}: commit-wait below the bound: {clock}"
        );
    }
    assert_eq!(
        written_seq(&sa)[0],
        want[0],
        "seed {seed}: site-a's written_seq"
    );
    assert_eq!(
        written_seq(&sc)[1],
        want[1],
        "seed {seed}: site-c's written_seq"
    );
    g.site.wait_applied("site-b", &as_want(&want), PATIENCE);
    procs.stop_all();
    local_equals_remote(&g.site, seed);
}

#[test]
fn a_skew_beyond_the_bound_holds_acknowledgements() {
    let g = Group::new(20);
    let mut procs = Procs::default();
    procs.add("site-b", g.site.secondary());
    let mut a = g.primary("site-a", 0);
    // 200 ms behind: far beyond max_clock_skew_ms = 20.
    let mut c = g.primary("site-c", -200);
    wait_tcp(g.nbd[0], &mut a, PATIENCE);
    wait_tcp(g.nbd[1], &mut c, PATIENCE);
    procs.add("site-a", a);
    procs.add("site-c", c);

    // One write to site-a, then wait until site-a has measured site-c and says it holds.
    let mut w = Client::connect(g.nbd[0], "log");
    w.request(0, tidemark::nbd::consts::CMD_WRITE, 0, 4096, &[7u8; 4096]);
    let deadline = Instant::now() + PATIENCE;
    let clock = loop {
        let st = g.site.status_after("site-a", SystemTime::now(), PATIENCE);
        let clock = st["clock"].clone();
        if clock["peers"]["site-c"]["bound_us"].as_u64().is_some() {
            break clock;
        }
        assert!(Instant::now() < deadline, "site-a never measured site-c");
    };
    let state = clock["state"].as_str().unwrap_or("").to_string();
    assert!(
        state.starts_with("held: clock of site-c may be"),
        "site-a does not hold: {clock}"
    );
    assert!(
        clock["peers"]["site-c"]["bound_us"].as_u64().unwrap_or(0) >= 200_000,
        "{clock}"
    );
    // The write was never acknowledged: nothing to read on the connection.
    let sock = w.stream();
    sock.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    match sock.peek(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the held write got a reply (or the connection broke): {other:?}"),
    }
    // The processes still stop cleanly (the held write is journaled, not acknowledged).
    procs.stop_all();
}
