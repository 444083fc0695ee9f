//! Two real processes over UDP on loopback: replication, a lossy WAN through wan-sim,
//! forged datagrams, bad configs.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn two_processes_replicate_byte_for_byte() {
    let site = Site::new(false);
    let sec = site.secondary();
    let out = run(&[
        "load",
        "--config",
        site.cfg(),
        "--system",
        "site-a",
        "--writes",
        "800",
        "--seed",
        "3",
    ]);
    assert!(
        out.status.success(),
        "load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("load prints JSON");
    assert_eq!(report["writes"], 800);
    let want = site.counts(3, 800, 65536);
    site.wait_applied("site-b", &want, Duration::from_secs(60));
    let out = stop(sec);
    assert!(out.status.success(), "secondary exit: {out:?}");
    for name in ["log", "data"] {
        assert!(
            same_file(
                &site.path(&format!("run/site-a/{name}.img")),
                &site.path(&format!("run/site-b/{name}.img"))
            ),
            "{name} differs"
        );
    }
}

#[test]
fn through_a_lossy_wan_sim() {
    let site = Site::new(true);
    let sims = site.wan_sims(1);
    let sec = site.secondary();
    let out = run(&[
        "load",
        "--config",
        site.cfg(),
        "--system",
        "site-a",
        "--writes",
        "500",
        "--seed",
        "4",
    ]);
    assert!(
        out.status.success(),
        "load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = site.counts(4, 500, 65536);
    let status = site.wait_applied("site-b", &want, Duration::from_secs(60));
    let link = &status["link"]["counters"];
    assert!(
        link["dropped_unauthenticated"].as_u64() > Some(0),
        "corruption was seen and dropped: {link}"
    );
    stop(sec);
    for s in sims {
        kill9(s);
    }
    for name in ["log", "data"] {
        assert!(
            same_file(
                &site.path(&format!("run/site-a/{name}.img")),
                &site.path(&format!("run/site-b/{name}.img"))
            ),
            "{name} differs"
        );
    }
}

#[test]
fn bad_configs_exit_2_naming_the_problem() {
    let site = Site::new(false);
    type Edit = fn(&mut ConfigText);
    let cases: &[(Edit, &str)] = &[
        (|c| c.key_file = None, "key_file"),
        (|c| c.orderer = Some("site-x".into()), "site-x"),
        (|c| c.pair_mut("data").name = "log".into(), "used twice"),
        (
            |c| c.pair_mut("data").remote_path = "run/site-b/log.img".into(),
            "also used by pair",
        ),
        (|c| c.pair_mut("data").remote = "site-c".into(), "site-c"),
    ];
    for (i, (edit, needle)) in cases.iter().enumerate() {
        let mut spec = site.spec.clone();
        edit(&mut spec);
        let bad = spec.write_to(site.dir.path(), &format!("bad{i}.toml"));
        let out = run(&["secondary", "--config", bad.to_str().expect("utf-8")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {err}");
        assert!(err.contains(needle), "case {i}: {err:?} lacks {needle:?}");
    }
    // A unit file of the wrong size is refused and left alone.
    std::fs::create_dir_all(site.path("run/site-b")).expect("mkdir");
    std::fs::write(site.path("run/site-b/log.img"), vec![1u8; 4096]).expect("write");
    let out = run(&["secondary", "--config", site.cfg()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("size is 4096"));
    assert_eq!(
        std::fs::read(site.path("run/site-b/log.img"))
            .expect("read")
            .len(),
        4096
    );
    // An unknown --system, and a missing config file.
    let out = run(&["secondary", "--config", site.cfg(), "--system", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["primary", "--config", "/nonexistent/tidemark.toml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn forged_datagrams_change_nothing_and_are_counted() {
    use tidemark::link::{LinkConfig, LinkCore};
    use tidemark::seal::Session;
    use tidemark::{HeadReport, Message, PairId, Stamp, SystemId, Timestamp};

    let site = Site::new(false);
    let sec = site.secondary();
    let key = tidemark_cli::config::read_key(&site.path("cluster.key")).expect("key");
    let to = format!("127.0.0.1:{}", site.b_port);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let (a, b) = (SystemId(0), SystemId(1));
    let seal = |key: &[u8; 32], epoch: u64, msg: Message| -> Vec<u8> {
        let mut l = LinkCore::new(
            a,
            &[a, b],
            key,
            Session {
                epoch,
                nonce: [3; 16],
            },
            LinkConfig::default(),
        );
        l.send(b, msg);
        l.poll_transmit(std::time::Instant::now())
            .map(|(_, d)| d)
            .expect("a datagram")
    };
    // A forged release of everything: sealed under another key.
    let forged = seal(
        &[0x55; 32],
        1,
        Message::Release {
            limit: Timestamp(u64::MAX),
            epoch: None,
        },
    );
    // An authentic, harmless datagram (a head report of zero), to truncate, flip, replay.
    let genuine = seal(
        &key,
        1,
        Message::Heads(vec![HeadReport {
            pair: PairId(0),
            head: Stamp::ZERO,
            resync: None,
        }]),
    );
    let mut flipped = genuine.clone();
    let n = flipped.len();
    flipped[n - 20] ^= 0x08;
    let sends: Vec<Vec<u8>> = vec![
        forged,
        genuine[..genuine.len() - 5].to_vec(),
        flipped,
        vec![0xff; 9000],
        vec![1, 2, 3],
        genuine.clone(),
        genuine.clone(),
    ];
    // Wait for the secondary to be up (it writes its status once running).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while site.status("site-b").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "secondary never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for d in &sends {
        sock.send_to(d, &to).expect("send");
    }
    // The counters show up in the next status (bounded wait for a condition).
    let want = |c: &serde_json::Value| {
        c["dropped_unauthenticated"].as_u64() >= Some(3)
            && c["dropped_oversize"].as_u64() >= Some(1)
            && c["dropped_malformed"].as_u64() >= Some(1)
            && c["dropped_replay"].as_u64() >= Some(1)
    };
    let status = loop {
        let s = site.status("site-b").expect("status");
        if want(&s["link"]["counters"]) {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counters never showed the drops: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status["stats"]["commit_limit"], 0,
        "a forged release must not move the limit"
    );
    for p in 0..2 {
        assert_eq!(status["stats"]["pairs"][p]["applied_seq"], 0);
    }
    stop(sec);
    for name in ["log", "data"] {
        let bytes = std::fs::read(site.path(&format!("run/site-b/{name}.img"))).expect("unit");
        assert!(bytes.iter().all(|&b| b == 0), "{name} was written");
    }
}
