//! The `tidemark` binary as a user runs it.

use std::process::Command;

fn tidemark(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(args)
        .output()
        .expect("the binary runs")
}

#[test]
fn demo_json_reports_a_consistent_identical_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let out = tidemark(&[
        "demo",
        "--pairs",
        "3",
        "--idle",
        "2",
        "--writes",
        "400",
        "--unit-mib",
        "2",
        "--loss",
        "0.2",
        "--reorder",
        "0.5",
        "--dup",
        "0.1",
        "--seed",
        "5",
        "--dir",
        d,
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}: {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["consistent"], true);
    assert_eq!(v["identical"], true);
    assert_eq!(v["pairs"], 3);
    assert_eq!(v["writes"], 400);
    for key in ["bytes", "retransmits", "commits", "elapsed_ms"] {
        assert!(v[key].is_u64(), "{key} missing: {v}");
    }
    assert!(v["commits"].as_u64() > Some(0));
    // --dir keeps the units: 5 pairs, a local and a remote file each.
    let files = std::fs::read_dir(dir.path()).expect("dir").count();
    assert_eq!(files, 10);
}

/// `demo --prefill`: every unit (the idle one too) starts with data and holes, so each
/// pair is copied by an initial sync while the workload writes; the copy's packets pass
/// the cut check, and the units end identical. Two shapes: the syncs done before the
/// last write, and one still running after it (large unit, few writes, a WAN delay), so
/// that the sync's packets come after the last recorded write.
#[test]
fn demo_prefill_syncs_while_writing() {
    let runs: [&[&str]; 2] = [
        &[
            "--pairs",
            "3",
            "--idle",
            "1",
            "--writes",
            "300",
            "--unit-mib",
            "4",
            "--loss",
            "0.1",
            "--reorder",
            "0.3",
            "--seed",
            "6",
        ],
        &[
            "--pairs",
            "1",
            "--writes",
            "8",
            "--unit-mib",
            "64",
            "--delay-ms",
            "20",
            "--seed",
            "7",
        ],
    ];
    for (i, extra) in runs.iter().enumerate() {
        let mut args = vec!["demo", "--prefill", "--json"];
        args.extend_from_slice(extra);
        let out = tidemark(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {i}: exit {:?}: {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
        assert_eq!(v["consistent"], true, "run {i}: {v}");
        assert_eq!(v["identical"], true, "run {i}: {v}");
        let prefilled = v["prefilled_bytes"].as_u64().expect("prefilled_bytes");
        let synced = v["synced_bytes"].as_u64().expect("synced_bytes");
        assert!(prefilled > 0, "run {i}: {v}");
        // The file system reports whole blocks; writes into holes add to the copy.
        assert!(synced >= prefilled, "run {i}: {v}");
        if i == 1 {
            assert_eq!(
                v["synced_before_last_write"], false,
                "run {i}: the sync was meant to outlast the writes: {v}"
            );
        }
    }
}

#[test]
fn demo_rejects_bad_settings_with_exit_2() {
    for (args, needle) in [
        (vec!["demo", "--loss", "1"], "loss"),
        (vec!["demo", "--pairs", "0"], "--pairs"),
        (vec!["demo", "--dup", "-0.5"], "dup"),
        (vec!["demo", "--reorder", "1.5"], "reorder"),
        (vec!["demo", "--writes", "many"], "writes"),
        (vec!["demo", "--no-such-flag"], "no-such-flag"),
    ] {
        let out = tidemark(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} should mention {needle}"
        );
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    }
}
