//! The NBD front end with real clients: nbdinfo, qemu-img, qemu-io, nbdcopy and fio talk
//! to an in-process engine (one primary, one secondary) through the NBD server; after a
//! drain the remote units must equal the local units. Each test skips (with a message)
//! only if a client program is missing.

#[path = "nbd_support/mod.rs"]
mod support;

use support::{have, image_bytes, run, write_file, Harness, Unit};

const MIB: u64 = 1 << 20;

fn two_units() -> Harness {
    Harness::start(&[
        Unit {
            name: "disk0",
            size: 4 * MIB,
            file: false,
        },
        Unit {
            name: "disk1",
            size: 3 * MIB + 4096,
            file: true,
        },
    ])
}

#[test]
fn nbdinfo_lists_every_export_with_its_size() {
    if !have(&["nbdinfo"]) {
        return;
    }
    let h = two_units();
    for uri in [format!("nbd://{}", h.addr), h.unix_uri("")] {
        let out = run("nbdinfo", &["--list", "--json", &uri]);
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("nbdinfo prints JSON");
        let exports = v["exports"].as_array().expect("an exports array");
        let mut found: Vec<(String, u64)> = exports
            .iter()
            .map(|e| {
                (
                    e["export-name"].as_str().expect("a name").to_string(),
                    e["export-size"].as_u64().expect("a size"),
                )
            })
            .collect();
        found.sort();
        assert_eq!(found, h.units, "{uri}");
    }
    // One export in detail: what it can do.
    let out = run("nbdinfo", &["--json", &h.uri("disk1")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(3 * MIB + 4096));
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag].as_bool(), Some(true), "{flag}: {e}");
    }
    assert_eq!(e["is_read_only"].as_bool(), Some(false));
    h.finish();
}

#[test]
fn qemu_img_convert_then_compare_and_nbdcopy_back() {
    if !have(&["qemu-img", "nbdcopy"]) {
        return;
    }
    let h = two_units();
    for (i, (name, size)) in h.units.clone().into_iter().enumerate() {
        let image = image_bytes(size as usize, 7 + i as u64);
        let src = write_file(&h.dir.path().join(format!("{name}.src")), &image);
        let src = src.to_str().expect("utf-8 path");
        let uri = h.uri(&name);
        run(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
        );
        // qemu-img compare exits 0 only if the contents are identical.
        run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", src, &uri],
        );
        // Read it back with another client (several connections: multi-conn).
        let back = h.dir.path().join(format!("{name}.back"));
        std::fs::File::create(&back).expect("create");
        run("nbdcopy", &[&uri, back.to_str().expect("utf-8 path")]);
        assert!(
            std::fs::read(&back).expect("read back") == image,
            "{name}: nbdcopy read back"
        );
        assert!(
            h.local(i) == image,
            "{name}: the local unit holds the image"
        );
        h.assert_replicated(i);
    }
    h.finish();
}

/// Offsets and lengths chosen to be odd; `model` follows what the unit must hold.
#[test]
fn qemu_io_odd_writes_zeroes_and_discards_read_back() {
    if !have(&["qemu-io"]) {
        return;
    }
    let h = two_units();
    let mut model = vec![0u8; (4 * MIB) as usize];
    let mut cmds: Vec<String> = Vec::new();
    let mut write = |cmd: &str, pattern: Option<u8>, off: usize, len: usize| {
        cmds.push(match pattern {
            Some(p) => format!("{cmd} -P {p:#x} {off} {len}"),
            None => format!("{cmd} {off} {len}"),
        });
        model[off..off + len].fill(pattern.unwrap_or(0));
    };
    write("write", Some(0xab), 1, 4097);
    write("write", Some(0xcd), 70_001, 333_333);
    write("write -f", Some(0x11), 4_000_001, 12_345); // FUA
    write("write -z", None, 100_000, 55_555);
    write("write -z -f", None, 300_001, 7);
    write("discard", None, 200_003, 77_777);
    write("write", Some(0x5a), 4 * MIB as usize - 3, 3); // the last bytes
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for c in &cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push("-c".into());
    args.push("flush".into());
    // Read back every region, pattern-checked by qemu-io.
    for (off, len, p) in [
        (1usize, 4097usize, 0xabu8),
        (70_001, 29_999, 0xcd),
        (100_000, 55_555, 0),
        (155_555, 44_448, 0xcd),
        (200_003, 77_777, 0),
        (277_780, 22_221, 0xcd),
        (300_001, 7, 0),
        (300_008, 103_326, 0xcd),
        (4_000_001, 12_345, 0x11),
        (4 * MIB as usize - 3, 3, 0x5a),
        (0, 1, 0),
    ] {
        assert!(
            model[off..off + len].iter().all(|&b| b == p),
            "model check at {off}"
        );
        args.push("-c".into());
        args.push(format!("read -P {p:#x} {off} {len}"));
    }
    args.push(h.uri("disk0"));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &argv);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("failed"), "{stdout}");
    assert!(h.local(0) == model, "the local unit holds what was written");
    h.assert_replicated(0);
    // Past the end: qemu-io refuses or the server answers an error; nothing changes.
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x77 4194300 100",
            &h.uri("disk0"),
        ])
        .output()
        .expect("run qemu-io");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("wrote 100/100"),
        "a write past the end must fail"
    );
    assert!(h.local(0) == model);
    h.finish();
}

#[test]
fn fio_random_writes_verify_at_queue_depth_16_and_replicate() {
    if !have(&["fio"]) {
        return;
    }
    let h = two_units();
    for (i, name) in ["disk0", "disk1"].into_iter().enumerate() {
        let uri = format!("--uri={}", h.uri(name));
        let out = run(
            "fio",
            &[
                "--name=randwrite",
                "--ioengine=nbd",
                &uri,
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=2M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--randseed=42",
                "--output-format=json",
            ],
        );
        // fio may print notes before its JSON.
        let text = String::from_utf8_lossy(&out.stdout);
        let json = text.find('{').map(|i| &text[i..]).unwrap_or(&text);
        let v: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}: {text}"));
        let job = &v["jobs"][0];
        assert_eq!(job["error"].as_i64(), Some(0), "{job}");
        assert_eq!(job["write"]["io_bytes"].as_u64(), Some(2 * MIB), "{job}");
        h.assert_replicated(i);
    }
    h.finish();
}

#[test]
fn several_clients_at_once_on_tcp_and_unix_sockets() {
    if !have(&["fio", "qemu-img"]) {
        return;
    }
    let h = two_units();
    let image = image_bytes((3 * MIB + 4096) as usize, 99);
    let src = write_file(&h.dir.path().join("src.img"), &image);
    let fio_uri = format!("--uri={}", h.unix_uri("disk0"));
    let mut fio = std::process::Command::new("fio")
        .args([
            "--name=seq",
            "--ioengine=nbd",
            &fio_uri,
            "--rw=write",
            "--bs=64k",
            "--iodepth=16",
            "--size=4M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start fio");
    let convert = std::process::Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(h.uri("disk1"))
        .status()
        .expect("run qemu-img");
    let fio_status = fio.wait().expect("fio ends");
    assert!(convert.success() && fio_status.success());
    assert!(h.local(1) == image);
    h.assert_replicated(0);
    h.assert_replicated(1);
    h.finish();
}
