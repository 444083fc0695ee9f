//! Write pacing (`pace_writes`) with real daemons behind a rate-limited link.
//!
//! Both runs happen in this one test, on the same machine at the same time of day: the
//! same workload (a writer with one write in flight, faster than the link) over the same
//! bottleneck (`tidemark wan-sim --rate`), once without pacing and once with it. The
//! bound asserted is derived from the rule (`tidemark::pace`), not from the machine's
//! speed: once the lag the primary sees reaches the target, every acknowledgement is
//! held `max_delay`, so the writer can send at most `write / max_delay` bytes a second,
//! which the test makes less than the link's rate; the lag then shrinks. The commit lag
//! the secondary measures is the primary's plus the path (the bottleneck's queue, at
//! most `queue_ms`) and the orderer's round, so the largest lag of any applied write
//! stays below `target + queue + slack`, and the test asserts below twice the target.
//! Without pacing the writer is held back only by the window's back-pressure (at least
//! 1 MiB unacknowledged, `tidemark::ship::ADMIT_MIN`), so the lag grows to about
//! `1 MiB / rate`, which the test makes more than twice the target.
//!
//! Waits poll status with deadlines; the seed is printed (`TIDEMARK_SEED` replays).

mod common;
use common::dependent::{Client, PATIENCE};
use common::*;
use std::time::SystemTime;
use tidemark::nbd::consts::*;

/// The RPO target.
const TARGET_MS: u64 = 500;
/// The link's rate (bytes per second) and its queue.
const RATE: u64 = 512 << 10;
const QUEUE_MS: u64 = 100;
/// Each write, and how many (4 MiB: about 8 s at the link's rate).
const WRITE: u64 = 16 << 10;
const WRITES: u64 = 256;
/// The warm-up: 256 KiB, half a second at the link's rate.
const WARM: u64 = 16;

struct Run {
    lag_max_ms: f64,
    lag_p99_ms: f64,
    paced_writes: u64,
    pacing_delay_total_ms: f64,
}

fn run_once(seed: u64, paced: bool) -> Run {
    let nbd = free_tcp_port();
    let mut spec = Site::two_sites(true);
    spec.system_mut("site-a").nbd_port = Some(nbd);
    spec.rpo_target_ms = Some(TARGET_MS);
    spec.extra.push("window = \"4MiB\"".into());
    if paced {
        spec.extra.push("pace_writes = true".into());
    }
    let site = Site::with_config(spec);
    let rate = RATE.to_string();
    let queue = QUEUE_MS.to_string();
    let seed_s = seed.to_string();
    let relays = site.relays(&["--rate", &rate, "--queue-ms", &queue, "--seed", &seed_s]);
    let b = site.secondary();
    let mut a = site.primary();
    wait_tcp(nbd, &mut a, PATIENCE);

    // A warm-up of `WARM` writes, drained: the primary has measured the path's rate
    // before the run (pacing cannot know it before the first acknowledgements; the
    // warm-up's own lag is at most `WARM × WRITE / RATE` plus the queue, below the
    // bound). Then the run: one write in flight, as fast as the primary answers.
    let mut c = Client::connect(nbd, "data");
    let mut x = seed;
    let mut write = |c: &mut Client, i: u64| {
        x = common::dependent::splitmix(x);
        let data: Vec<u8> = (0..WRITE)
            .map(|k| (common::dependent::splitmix(x ^ (k / 8)) >> (k % 8 * 8)) as u8)
            .collect();
        c.request(0, CMD_WRITE, i * WRITE, WRITE as u32, &data);
        c.reply(&format!("write {i}"));
    };
    for i in 0..WARM {
        write(&mut c, i);
    }
    wait_until(PATIENCE, || {
        let s = site.status("site-a").ok_or("no status")?;
        let p = &s["view"]["pairs"][1];
        if p["written_seq"].as_u64().unwrap_or(0) >= WARM && p["acked_seq"] == p["written_seq"] {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "seed {seed}: warm-up never drained: {e}{}",
            site.log_tails()
        )
    });
    for i in WARM..WARM + WRITES {
        write(&mut c, i);
        if i % 16 == 0 && std::env::var("PACE_DEBUG").is_ok() {
            let a = site.status("site-a");
            let b = site.status("site-b");
            if let (Some(a), Some(b)) = (a, b) {
                let pa = &a["view"]["pairs"][1];
                let pb = &b["view"]["pairs"][1];
                eprintln!(
                    "{i}: a written {} acked {} lag_b {} delay {} rtt {} retx {} | b lag {} max {}",
                    pa["written_seq"],
                    pa["acked_seq"],
                    pa["lag_bytes"],
                    pa["pacing_delay_ms"],
                    pa["rtt_ms"],
                    pa["retransmits"],
                    pb["lag_ms"],
                    pb["lag_max_ms"]
                );
            }
        }
    }
    c.request(0, CMD_FLUSH, 0, 0, &[]);
    c.reply("flush");
    c.disconnect();

    // Everything acknowledged and applied: the lag figures cover every write.
    let a_status = wait_until(PATIENCE, || {
        let s = site.status("site-a").ok_or("no status")?;
        let p = &s["view"]["pairs"][1];
        if p["written_seq"].as_u64().unwrap_or(0) >= WARM + WRITES
            && p["acked_seq"] == p["written_seq"]
            && p["waiting_writes"] == 0
        {
            Ok(s)
        } else {
            Err(p.to_string())
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "seed {seed}: primary never drained: {e}{}",
            site.log_tails()
        )
    });
    let written = a_status["view"]["pairs"][1]["written_seq"]
        .as_u64()
        .unwrap_or(0);
    let after = SystemTime::now();
    let b_status = wait_until(PATIENCE, || {
        let s = site.status("site-b").ok_or("no status")?;
        let p = &s["view"]["pairs"][1];
        if p["applied_seq"].as_u64().unwrap_or(0) >= written {
            Ok(s)
        } else {
            Err(p.to_string())
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "seed {seed}: secondary never applied: {e}{}",
            site.log_tails()
        )
    });
    drop(b_status);
    // A status sampled after the last application.
    let b_status = site.status_after("site-b", after, PATIENCE);
    let pb = &b_status["view"]["pairs"][1];
    let pa = &site.status_after("site-a", after, PATIENCE)["view"]["pairs"][1];
    let run = Run {
        lag_max_ms: pb["lag_max_ms"].as_f64().unwrap_or(f64::NAN),
        lag_p99_ms: pb["lag_p99_ms"].as_f64().unwrap_or(f64::NAN),
        paced_writes: pa["paced_writes"].as_u64().unwrap_or(0),
        pacing_delay_total_ms: pa["pacing_delay_total_ms"].as_f64().unwrap_or(0.0),
    };
    assert_eq!(
        pa["paced_writes"].is_null(),
        !paced,
        "paced_writes is shown exactly when pacing is on: {pa}"
    );
    assert!(stop(a).status.success());
    assert!(stop(b).status.success());
    for r in relays {
        let _ = stop(r);
    }
    run
}

#[test]
fn pacing_holds_the_lag_near_the_target_on_a_slow_link() {
    let seed = seed_or(20261203);
    eprintln!("pacing test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let max_delay = tidemark::pace::DEFAULT_MAX_DELAY;
    // The premise of the bound: at the most delay, one write in flight is slower than
    // the link.
    let paced_rate = WRITE as f64 / max_delay.as_secs_f64();
    assert!(paced_rate < RATE as f64, "test set-up: {paced_rate} B/s");
    // Without pacing the window lets at least 1 MiB wait: that far behind.
    let unpaced_lag_ms = (1u64 << 20) as f64 / RATE as f64 * 1000.0;
    assert!(unpaced_lag_ms > 2.0 * TARGET_MS as f64, "test set-up");
    let warm_lag_ms = (WARM * WRITE) as f64 / RATE as f64 * 1000.0 + QUEUE_MS as f64;
    assert!(warm_lag_ms < 2.0 * TARGET_MS as f64, "test set-up");

    let off = run_once(seed, false);
    let on = run_once(seed, true);
    eprintln!(
        "target {TARGET_MS} ms, link {RATE} B/s: without pacing lag max {:.0} ms p99 {:.0} ms; \
         with pacing lag max {:.0} ms p99 {:.0} ms, {} writes paced, {:.0} ms of delay in all",
        off.lag_max_ms,
        off.lag_p99_ms,
        on.lag_max_ms,
        on.lag_p99_ms,
        on.paced_writes,
        on.pacing_delay_total_ms
    );
    let bound = 2.0 * TARGET_MS as f64;
    assert!(
        off.lag_max_ms > bound,
        "seed {seed}: without pacing the lag stayed at {} ms (bound {bound})",
        off.lag_max_ms
    );
    assert!(
        on.lag_max_ms < bound,
        "seed {seed}: with pacing the lag reached {} ms (bound {bound})",
        on.lag_max_ms
    );
    assert!(on.paced_writes > 0, "pacing never delayed a write");
    assert_eq!(off.paced_writes, 0);
}

/// The config rules of pacing: `pace_writes` needs `rpo_target_ms` (a daemon given one
/// without the other exits 2 naming the key, having started nothing), and
/// `pace_max_delay_ms` needs `pace_writes` and lies in 1..=10000.
#[test]
fn pacing_config_rules() {
    use std::path::Path;
    use tidemark_cli::config::Config;
    /// Extra lines, `rpo_target_ms`, and the max delay (ms) expected, or the error.
    type Case = (
        &'static [&'static str],
        Option<u64>,
        Result<Option<u64>, &'static str>,
    );
    let cases: &[Case] = &[
        (&[], Some(500), Ok(None)),
        (&["pace_writes = false"], Some(500), Ok(None)),
        (&["pace_writes = true"], Some(500), Ok(Some(50))),
        (
            &["pace_writes = true", "pace_max_delay_ms = 200"],
            Some(500),
            Ok(Some(200)),
        ),
        (
            &["pace_writes = true"],
            None,
            Err("pace_writes: needs rpo_target_ms"),
        ),
        (
            &["pace_max_delay_ms = 20"],
            Some(500),
            Err("pace_max_delay_ms: set pace_writes"),
        ),
        (
            &["pace_writes = true", "pace_max_delay_ms = 0"],
            Some(500),
            Err("pace_max_delay_ms: 0 is outside"),
        ),
        (
            &["pace_writes = true", "pace_max_delay_ms = 10001"],
            Some(500),
            Err("pace_max_delay_ms: 10001 is outside"),
        ),
    ];
    for (extra, target, want) in cases {
        let mut spec = Site::two_sites(false);
        spec.rpo_target_ms = *target;
        spec.extra = extra.iter().map(|s| s.to_string()).collect();
        let got = Config::parse(&spec.render(), Path::new("/t"), Path::new("/t/x.toml"));
        match (got, want) {
            (Ok(c), Ok(ms)) => {
                assert_eq!(
                    c.pace.map(|r| r.max_delay.as_millis() as u64),
                    *ms,
                    "{extra:?}"
                );
                if let Some(r) = c.pace {
                    assert_eq!(Some(r.target.as_millis() as u64), *target);
                }
            }
            (Err(e), Err(m)) => assert!(e.to_string().contains(m), "{extra:?}: {e}"),
            (got, want) => panic!("{extra:?}: {got:?}, want {want:?}"),
        }
    }
    // The daemon: exit 2, with the key named.
    let mut spec = Site::two_sites(false);
    spec.extra.push("pace_writes = true".into());
    let site = Site::with_config(spec);
    let out = run(&["primary", "--config", site.cfg()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pace_writes: needs rpo_target_ms"), "{err}");
}
