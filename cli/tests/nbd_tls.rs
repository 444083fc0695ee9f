//! NBD over TLS with the real daemons and real TLS clients on loopback: libnbd's
//! `nbds://` URIs (nbdinfo, nbdcopy) and qemu-io with a `tls-creds-x509` object, against
//! `tidemark primary` (and `tidemark export`) configured with `nbd_tls_cert` and
//! `nbd_tls_key` (and `nbd_tls_client_ca`). Certificates come from rcgen
//! (`common::certs`): a CA that signs the server's and a client's certificate, and a
//! foreign CA.
//!
//! - Data written over TLS reads back, replicates (remote unit == local unit == what was
//!   written) and is served over TLS by `export` after a promote.
//! - Refused, and writing nothing: plain-text clients (a raw client gets
//!   `NBD_REP_ERR_TLS_REQD` for every option and is dropped on `EXPORT_NAME` or a
//!   request; nbdinfo and nbdcopy without TLS fail), a client that trusts another CA,
//!   and, with client certificates required, a client without one or with one the
//!   configured CA did not sign.
//! - A config that exposes plain NBD to the network is refused with exit code 2, as is
//!   a private key others may read.
//!
//! A test that needs a client program skips (printing SKIPPED) if it is not installed,
//! and fails instead under `TIDEMARK_REQUIRE_PROGRAMS` (CI).

mod common;
use common::certs::TestPki;
use common::config_text::NbdTls;
use common::dependent::{as_want, first_difference, written_seq, PATIENCE};
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::SystemTime;
use tidemark::nbd::consts::*;

const LOG_SIZE: usize = 4 << 20;
const DATA_SIZE: usize = 8 << 20;

/// A site whose primary serves NBD on a free port of 127.0.0.1 with TLS required (both
/// systems get the TLS keys: site-b's serve `export`); with `client_ca`, clients must
/// present a certificate signed by the test CA.
fn tls_site(client_ca: bool) -> (Site, u16, TestPki) {
    let (mut site, port) = Site::with_nbd();
    let pki = TestPki::write(&site.path("pki"));
    let tls = NbdTls {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: client_ca.then(|| pki.ca.clone()),
    };
    site.edit_config(|c| {
        for name in ["site-a", "site-b"] {
            c.system_mut(name).nbd_tls = Some(tls.clone());
        }
    });
    (site, port, pki)
}

/// Starts the secondary, then the primary, and waits (bounded) for its NBD port.
fn start_daemons(site: &Site, port: u16) -> Daemons {
    let secondary = Some(site.secondary());
    let mut primary = site.primary();
    wait_tcp(port, &mut primary, PATIENCE);
    Daemons {
        primary: Some(primary),
        secondary,
    }
}

/// libnbd's URI for `export` over TLS with the client credentials in `dir`.
fn nbds(port: u16, export: &str, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
        dir.display()
    )
}

/// The same export in plain text.
fn nbd(port: u16, export: &str) -> String {
    format!("nbd://127.0.0.1:{port}/{export}")
}

fn run_program(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a program and fails the test with its output unless it exits 0.
fn must(program: &str, args: &[&str]) -> Output {
    let out = run_program(program, args);
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        text(&out)
    );
    out
}

/// Runs a program that must fail; returns its output (stdout and stderr).
fn must_fail(program: &str, args: &[&str], why: &str) -> String {
    let out = run_program(program, args);
    assert!(
        !out.status.success(),
        "{why}: {program} {} succeeded:\n{}",
        args.join(" "),
        text(&out)
    );
    text(&out)
}

/// Seeded random bytes.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(at) = first_difference(got, want) {
        panic!(
            "{what}: differs at byte {at} (lengths {} and {})",
            got.len(),
            want.len()
        );
    }
}

/// Writes `data` to `export` over TLS with nbdcopy and reads it back the same way.
fn copy_in_and_back(dir: &Path, port: u16, export: &str, creds: &Path, data: &[u8]) {
    let input = dir.join(format!("{export}.in"));
    let output = dir.join(format!("{export}.out"));
    std::fs::write(&input, data).expect("write the input");
    let uri = nbds(port, export, creds);
    must("nbdcopy", &[input.to_str().expect("utf-8"), &uri]);
    must("nbdcopy", &[&uri, output.to_str().expect("utf-8")]);
    assert_same(
        &format!("{export} read back over TLS"),
        &read(&output),
        data,
    );
}

#[test]
fn data_written_over_tls_reads_back_replicates_and_is_exported_over_tls() {
    if !have(&["nbdinfo", "nbdcopy", "qemu-io"]) {
        return;
    }
    let (site, port, pki) = tls_site(false);
    let daemons = start_daemons(&site, port);
    let work = site.path("work");
    std::fs::create_dir_all(&work).expect("work dir");

    // nbdinfo over TLS sees the export.
    let out = must("nbdinfo", &["--json", &nbds(port, "log", &pki.client)]);
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("nbdinfo JSON: {e}"));
    assert_eq!(info["TLS"], serde_json::json!(true), "{info}");
    assert_eq!(
        info["exports"][0]["export-size"].as_u64(),
        Some(LOG_SIZE as u64),
        "{info}"
    );

    // nbdcopy writes the whole "log" export and reads it back.
    let log = random_bytes(LOG_SIZE, 1);
    copy_in_and_back(&work, port, "log", &pki.client, &log);

    // qemu-io (GnuTLS through qemu's tls-creds object) writes 1 MiB of a pattern to
    // "data" and verifies it.
    let out = must(
        "qemu-io",
        &[
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                pki.client.display()
            ),
            "--image-opts",
            &format!("driver=nbd,host=127.0.0.1,port={port},export=data,tls-creds=tls0"),
            "-c",
            "write -P 0x5a 1M 1M",
            "-c",
            "read -P 0x5a 1M 1M",
        ],
    );
    let said = text(&out);
    assert!(
        said.contains("wrote 1048576/1048576") && said.contains("read 1048576/1048576"),
        "{said}"
    );
    assert!(!said.contains("Pattern verification failed"), "{said}");

    // It replicates as plain NBD does: everything the primary stamped is applied.
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    let written = written_seq(&status);
    assert!(
        written.iter().all(|&n| n > 0),
        "writes per pair {written:?}"
    );
    site.wait_applied("site-b", &as_want(&written), PATIENCE);
    daemons.stop_both(&site);
    let mut data = vec![0u8; DATA_SIZE];
    data[1 << 20..2 << 20].fill(0x5a);
    for (name, want) in [("log", &log), ("data", &data)] {
        let local = read(&site.path(&format!("run/site-a/{name}.img")));
        let remote = read(&site.path(&format!("run/site-b/{name}.img")));
        assert_same(&format!("{name}: local unit"), &local, want);
        assert_same(&format!("{name}: remote unit"), &remote, want);
    }

    // The promoted secondary is served by `export` over TLS only.
    let out = site.spawn(&["promote", "--config", site.cfg(), "--system", "site-b"]);
    let out = out.wait_with_output().expect("promote");
    assert!(out.status.success(), "promote: {}", text(&out));
    let export_port = free_tcp_port();
    let listen = format!("127.0.0.1:{export_port}");
    let mut export = site.spawn(&[
        "export",
        "--config",
        site.cfg(),
        "--system",
        "site-b",
        "--listen",
        &listen,
    ]);
    let mut line = String::new();
    let stdout = export.stdout.take().expect("stdout");
    // The line it prints once it listens is the synchronisation.
    BufReader::new(stdout).read_line(&mut line).expect("read");
    assert!(line.contains("\"listen\""), "export said {line:?}");
    let back = work.join("log.exported");
    must(
        "nbdcopy",
        &[
            &nbds(export_port, "log", &pki.client),
            back.to_str().expect("utf-8"),
        ],
    );
    assert_same("log exported over TLS", &read(&back), &log);
    let said = must_fail(
        "nbdcopy",
        &[&nbd(export_port, "log"), back.to_str().expect("utf-8")],
        "a plain client of the export",
    );
    assert!(said.contains("server requires TLS"), "{said}");
    let out = stop(export);
    assert!(out.status.success(), "export: {}", text(&out));
}

/// A raw plain-text client: reads the greeting and sends the client flags.
fn plain_client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // A safety net against a hung test, not a synchronisation.
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(g[..8], NBDMAGIC.to_be_bytes());
    assert_eq!(g[8..16], IHAVEOPT.to_be_bytes());
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .expect("flags");
    s
}

fn option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend(option.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    s.write_all(&v).expect("send an option");
}

/// The next option reply: (option, reply type).
fn option_reply(s: &mut TcpStream) -> (u32, u32) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("an option reply");
    assert_eq!(h[..8], OPTION_REPLY_MAGIC.to_be_bytes());
    let option = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).expect("the reply's data");
    (option, kind)
}

/// Everything the server still sends until it closes the connection, by FIN or by
/// reset (a server that closes with unread input resets); the read timeout fails the
/// test if it never does.
fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return rest,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return rest,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d.extend(0u16.to_be_bytes());
    d
}

fn write_request(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend(0u16.to_be_bytes());
    v.extend(CMD_WRITE.to_be_bytes());
    v.extend(1u64.to_be_bytes());
    v.extend(offset.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    v
}

#[test]
fn plain_text_and_wrong_ca_clients_are_refused_and_write_nothing() {
    if !have(&["nbdinfo", "nbdcopy"]) {
        return;
    }
    let (site, port, pki) = tls_site(false);
    let daemons = start_daemons(&site, port);
    let work = site.path("work");
    std::fs::create_dir_all(&work).expect("work dir");

    // A raw plain-text client: every option is refused with TLS_REQD (no export is
    // listed or described), and a request sent as if GO had worked ends the connection
    // unanswered.
    let mut s = plain_client(port);
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_INFO, go_data("log")),
        (OPT_GO, go_data("log")),
    ] {
        option(&mut s, opt, &data);
        assert_eq!(
            option_reply(&mut s),
            (opt, REP_ERR_TLS_REQD),
            "option {opt}"
        );
    }
    s.write_all(&write_request(0, &[0xee; 4096]))
        .expect("send a write");
    assert_eq!(
        until_closed(&mut s),
        Vec::<u8>::new(),
        "no reply to the write"
    );
    // EXPORT_NAME cannot be refused with an error: the server hangs up, sending nothing.
    let mut s = plain_client(port);
    option(&mut s, OPT_EXPORT_NAME, b"log");
    s.write_all(&write_request(0, &[0xee; 4096]))
        .expect("send a write");
    assert_eq!(
        until_closed(&mut s),
        Vec::<u8>::new(),
        "nothing after EXPORT_NAME"
    );
    // STARTTLS followed at once by plain bytes (not a TLS handshake): the ACK, then the
    // server hangs up rather than take them as protected.
    let mut s = plain_client(port);
    option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(option_reply(&mut s), (OPT_STARTTLS, REP_ACK));
    option(&mut s, OPT_GO, &go_data("log"));
    s.write_all(&write_request(0, &[0xee; 4096]))
        .expect("send a write");
    let rest = until_closed(&mut s);
    assert!(
        !rest
            .windows(4)
            .any(|w| w == SIMPLE_REPLY_MAGIC.to_be_bytes()),
        "no NBD reply after a botched handshake: {rest:02x?}"
    );

    // libnbd without TLS: refused (libnbd reports NBD_REP_ERR_TLS_REQD as "server
    // requires TLS"; nbdinfo only says its GO was refused).
    let said = must_fail("nbdinfo", &[&nbd(port, "log")], "nbdinfo without TLS");
    assert!(said.contains("error to opt_go"), "{said}");
    let junk = work.join("junk");
    std::fs::write(&junk, vec![0xeeu8; 1 << 20]).expect("junk");
    let junk = junk.to_str().expect("utf-8");
    let said = must_fail("nbdcopy", &[junk, &nbd(port, "log")], "nbdcopy without TLS");
    assert!(said.contains("server requires TLS"), "{said}");
    // A client that trusts another CA: the handshake fails on its side.
    let wrong = [
        vec![nbds(port, "log", &pki.client_wrong_ca)],
        vec![junk.to_string(), nbds(port, "data", &pki.client_wrong_ca)],
    ];
    for args in wrong {
        let program = if args.len() == 1 {
            "nbdinfo"
        } else {
            "nbdcopy"
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let said = must_fail(program, &args, "trusting another CA");
        assert!(said.contains("certificate verification"), "{said}");
    }

    // Nothing reached the units: the primary stamped no write, both exports read back
    // as zeroes over TLS, and the server still serves a good client.
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    assert_eq!(written_seq(&status), vec![0, 0], "writes per pair");
    for (name, size) in [("log", LOG_SIZE), ("data", DATA_SIZE)] {
        let back = work.join(format!("{name}.back"));
        must(
            "nbdcopy",
            &[
                &nbds(port, name, &pki.client),
                back.to_str().expect("utf-8"),
            ],
        );
        assert_same(
            &format!("{name} after the refusals"),
            &read(&back),
            &vec![0u8; size],
        );
    }
    daemons.stop_both(&site);
    let logs = site.log_tails();
    assert!(!logs.contains("panicked"), "{logs}");
}

#[test]
fn with_a_client_ca_only_clients_with_a_certificate_it_signed_get_in() {
    if !have(&["nbdinfo", "nbdcopy"]) {
        return;
    }
    let (site, port, pki) = tls_site(true);
    let daemons = start_daemons(&site, port);
    let work = site.path("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let refused: [(&str, &Path); 3] = [
        ("no client certificate", &pki.client_no_cert),
        (
            "a client certificate of another CA",
            &pki.client_foreign_cert,
        ),
        ("trusting another CA", &pki.client_wrong_ca),
    ];
    let junk = work.join("junk");
    std::fs::write(&junk, vec![0xeeu8; 1 << 20]).expect("junk");
    let junk = junk.to_str().expect("utf-8");
    for (why, creds) in refused {
        // The server's verifier refuses the client (a fatal alert), or the client
        // refuses the server's certificate.
        let tries = [
            vec![nbds(port, "log", creds)],
            vec![junk.to_string(), nbds(port, "log", creds)],
        ];
        for args in tries {
            let program = if args.len() == 1 {
                "nbdinfo"
            } else {
                "nbdcopy"
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let said = must_fail(program, &args, why);
            assert!(
                said.contains("TLS fatal alert") || said.contains("certificate verification"),
                "{why}: {said}"
            );
        }
    }
    let said = must_fail("nbdcopy", &[junk, &nbd(port, "log")], "plain text");
    assert!(said.contains("server requires TLS"), "{said}");
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    assert_eq!(
        written_seq(&status),
        vec![0, 0],
        "refused clients wrote nothing"
    );
    // The client with the right certificate writes and reads.
    let log = random_bytes(LOG_SIZE, 2);
    copy_in_and_back(&work, port, "log", &pki.client, &log);
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    let written = written_seq(&status);
    assert!(written[0] > 0, "{written:?}");
    site.wait_applied("site-b", &as_want(&written), PATIENCE);
    daemons.stop_both(&site);
    let logs = std::fs::read_dir(site.path("logs"))
        .expect("logs")
        .filter_map(|e| e.ok())
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        logs.contains("TLS handshake failed"),
        "the server logs the refused handshakes:{}",
        site.log_tails()
    );
    assert_same(
        "log: remote unit",
        &read(&site.path("run/site-b/log.img")),
        &log,
    );
}

/// The config's TLS files, for the refusal test below.
fn config_with_nbd_listen(site: &Site, port: u16, host: &str) {
    let text = site.spec.render().replace(
        &format!("nbd_listen = \"127.0.0.1:{port}\""),
        &format!("nbd_listen = \"{host}:{port}\""),
    );
    assert!(text.contains(&format!("{host}:{port}")), "{text}");
    std::fs::write(&site.config, text).expect("config");
}

fn exit_code_2_naming(out: &Output, needles: &[&str]) {
    let said = text(out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    for n in needles {
        assert!(said.contains(n), "{said:?} lacks {n:?}");
    }
}

#[test]
fn exposing_plain_nbd_or_a_readable_key_is_a_config_error() {
    let (site, port) = Site::with_nbd();
    // Plain NBD on every interface: refused before anything starts.
    config_with_nbd_listen(&site, port, "0.0.0.0");
    let out = run(&["primary", "--config", site.cfg()]);
    exit_code_2_naming(
        &out,
        &[
            "system[0] (site-a).nbd_listen: 0.0.0.0:",
            "not a loopback address",
            "nbd_tls_cert",
            "nbd_insecure = true",
        ],
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens"
    );
    // Every command loads the config: status says the same.
    let out = run(&["status", "--config", site.cfg()]);
    exit_code_2_naming(&out, &["nbd_listen", "nbd_insecure"]);
    // `export --listen` follows the same rule (checked before anything is opened).
    let (site, _) = Site::with_nbd();
    let out = run(&[
        "export",
        "--config",
        site.cfg(),
        "--system",
        "site-b",
        "--listen",
        "0.0.0.0:0",
    ]);
    exit_code_2_naming(&out, &["--listen: 0.0.0.0:0 is not a loopback address"]);

    // A private key that others may read: the primary refuses to start.
    let (mut site, port) = Site::with_nbd();
    let pki = TestPki::write(&site.path("pki"));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pki.server_key, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }
    site.edit_config(|c| {
        c.system_mut("site-a").nbd_tls = Some(NbdTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: None,
        })
    });
    let out = run(&["primary", "--config", site.cfg()]);
    exit_code_2_naming(&out, &["system[0] (site-a).nbd_tls_key", "chmod 600"]);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens"
    );
}
