//! `dvma serve` off loopback: no silent exposure, and TLS.
//!
//! * `--listen 0.0.0.0:0` without TLS is refused at startup, saying why;
//!   with `--insecure-listen` it serves (with a warning), and with TLS it
//!   serves without the flag.
//! * TLS (`NBD_OPT_STARTTLS`, `--tls only`) with real clients: `nbdinfo`
//!   and `nbdcopy` (libnbd, `nbds://...?tls-certificates=DIR`),
//!   `qemu-img`/`qemu-io` (`--object tls-creds-x509`); a plaintext client
//!   gets `NBD_REP_ERR_TLS_REQD` (and is closed after
//!   `NBD_OPT_EXPORT_NAME`); with `--tls-ca` a client without a certificate
//!   is refused and one with a certificate signed by the CA is served.
//!   Certificates are made here, with rcgen, in the test's directory.
//!
//! Only 127.0.0.1 and 0.0.0.0 are bound, and every client connects through
//! loopback.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::client::{go_data, option_bytes, read_opt_reply, wait_closed};
use common::{Server, ServerOpts, TempDir, disk_toml, machine_toml, require_tool, run_tool, tcp};
use nbd::wire::*;

fn config_text() -> String {
    let mut text = machine_toml(1, "64M");
    text += &disk_toml("sd0", "16M", "");
    text
}

/// Runs `dvma serve ARGS` with a small configuration and expects it to exit
/// (a refusal) within 20 s: its status and stderr. A server that starts
/// serving instead is killed and the test fails.
fn serve_refused(args: &[&str]) -> (ExitStatus, String) {
    let dir = common::TempDir::new("tls-refused");
    std::fs::write(dir.path().join("c.toml"), config_text()).expect("config");
    let mut child = Command::new(common::dvma_bin())
        .arg("serve")
        .args(args)
        .arg("--config")
        .arg(dir.path().join("c.toml"))
        .arg("--data-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "dvma serve {args:?} was not refused: it runs\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    (status, err)
}

#[test]
fn non_loopback_without_tls_is_refused() {
    let (status, err) = serve_refused(&["--listen", "0.0.0.0:0"]);
    assert!(!status.success(), "--listen 0.0.0.0:0: exit {status}");
    assert!(
        err.contains("0.0.0.0") && err.contains("loopback") && err.contains("--insecure-listen"),
        "--listen 0.0.0.0:0 refused without saying why: {err}"
    );
}

#[test]
fn non_loopback_with_insecure_listen_serves() {
    let opts = ServerOpts {
        listen: Some("0.0.0.0:0".into()),
        args: vec!["--insecure-listen".into()],
        ..ServerOpts::config(&config_text())
    };
    let server = Server::start_opts(opts);
    assert!(
        server.stderr().contains("WARNING") && server.stderr().contains("--insecure-listen"),
        "no warning for --insecure-listen:\n{}",
        server.diag()
    );
    let mut c = server.client("sd0");
    assert_eq!(c.write(0, &[0x5a; 4096]).expect("write"), Ok(()));
    assert_eq!(c.read(0, 4096).expect("read"), Ok(vec![0x5a; 4096]));
    drop(c);
    server.stop().assert_clean("SIGTERM");
}

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client
/// certificate, all made now; the directories are laid out as libnbd and
/// qemu expect (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
struct Pki {
    _dir: TempDir,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// The CA's certificate, for `--tls-ca`.
    ca: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    client_dir: PathBuf,
    /// `ca-cert.pem` only: a client without a certificate.
    anon_dir: PathBuf,
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let dir = TempDir::new("tls-pki");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name
        .push(DnType::CommonName, "dvma test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca, &ca_key);
    let leaf = |names: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key_pem) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_pem, client_key_pem) = leaf(
        vec![],
        "dvma test client",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let write = |p: &Path, text: &str| {
        std::fs::write(p, text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    };
    let root = dir.path().to_path_buf();
    let (client_dir, anon_dir) = (root.join("client"), root.join("anon"));
    for d in [&client_dir, &anon_dir] {
        std::fs::create_dir_all(d).expect("mkdir");
        write(&d.join("ca-cert.pem"), &ca_cert.pem());
    }
    write(&client_dir.join("client-cert.pem"), &client_pem);
    write(&client_dir.join("client-key.pem"), &client_key_pem);
    write(&root.join("ca.pem"), &ca_cert.pem());
    write(&root.join("server-cert.pem"), &server_pem);
    write(&root.join("server-key.pem"), &server_key_pem);
    Pki {
        server_cert: root.join("server-cert.pem"),
        server_key: root.join("server-key.pem"),
        ca: root.join("ca.pem"),
        client_dir,
        anon_dir,
        _dir: dir,
    }
}

/// A TLS server: `--tls only` with the test's certificates (and `--tls-ca`
/// when `verify_clients`), listening on `listen`.
fn tls_server(pki: &Pki, listen: &str, verify_clients: bool) -> Server {
    let mut args: Vec<String> = vec!["--tls".into(), "only".into(), "--tls-cert".into()];
    args.push(pki.server_cert.display().to_string());
    args.push("--tls-key".into());
    args.push(pki.server_key.display().to_string());
    if verify_clients {
        args.push("--tls-ca".into());
        args.push(pki.ca.display().to_string());
    }
    Server::start_opts(ServerOpts {
        listen: Some(listen.into()),
        args,
        ..ServerOpts::config(&config_text())
    })
}

fn nbds_uri(server: &Server, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/sd0?tls-certificates={}",
        server.addr.port(),
        dir.display()
    )
}

const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn plaintext_client_gets_tls_reqd() {
    let pki = pki();
    let server = tls_server(&pki, "127.0.0.1:0", false);
    let mut s = tcp(server.addr).expect("connect");
    common::read_greeting(&mut s).expect("greeting");
    s.write_all(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .expect("flags");
    for (option, data) in [
        (NBD_OPT_LIST, Vec::new()),
        (NBD_OPT_STRUCTURED_REPLY, Vec::new()),
        (NBD_OPT_INFO, go_data(b"sd0", &[])),
        (NBD_OPT_GO, go_data(b"sd0", &[])),
    ] {
        s.write_all(&option_bytes(option, &data)).expect("option");
        let r = read_opt_reply(&mut s).expect("reply");
        assert_eq!(
            (r.option, r.reply),
            (option, NBD_REP_ERR_TLS_REQD),
            "option {option} before TLS on a TLS-only server: {r:?}"
        );
    }
    // NBD_OPT_EXPORT_NAME cannot be refused with an error: closed.
    s.write_all(&option_bytes(NBD_OPT_EXPORT_NAME, b"sd0"))
        .expect("option");
    let got = wait_closed(&mut s, Duration::from_secs(10)).expect("closed");
    assert!(
        got.is_empty(),
        "NBD_OPT_EXPORT_NAME before TLS answered {got:02x?}"
    );
    // libnbd without TLS is refused too.
    if require_tool("nbdinfo", "libnbd-bin").is_some() {
        let (st, out, err) = run_tool(Command::new("nbdinfo").arg(server.url("sd0")), TOOL_TIMEOUT);
        assert!(!st.success(), "nbdinfo in plaintext was served: {out}{err}");
    }
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls() {
    if require_tool("nbdinfo", "libnbd-bin").is_none()
        || require_tool("nbdcopy", "libnbd-bin").is_none()
    {
        return;
    }
    let pki = pki();
    // TLS on a non-loopback listener needs no --insecure-listen.
    let server = tls_server(&pki, "0.0.0.0:0", false);
    assert!(
        !server.stderr().contains("WARNING"),
        "a TLS listener was warned about:\n{}",
        server.diag()
    );
    let uri = nbds_uri(&server, &pki.anon_dir);
    let (st, out, err) = run_tool(Command::new("nbdinfo").arg(&uri), TOOL_TIMEOUT);
    assert!(
        st.success() && out.contains("16777216"),
        "nbdinfo {uri}: {st}\n{out}\n{err}\n{}",
        server.diag()
    );
    // nbdcopy writes 4 MiB through TLS and reads them back.
    let dir = TempDir::new("tls-copy");
    let (src, back) = (dir.path().join("src"), dir.path().join("back"));
    let mut rng = common::Rng::new(common::test_seed("nbdcopy_over_tls"));
    let data = rng.bytes(4 << 20);
    std::fs::write(&src, &data).expect("src");
    let (st, out, err) = run_tool(Command::new("nbdcopy").arg(&src).arg(&uri), TOOL_TIMEOUT);
    assert!(
        st.success(),
        "nbdcopy to {uri}: {st}\n{out}\n{err}\n{}",
        server.diag()
    );
    let (st, out, err) = run_tool(Command::new("nbdcopy").arg(&uri).arg(&back), TOOL_TIMEOUT);
    assert!(
        st.success(),
        "nbdcopy from {uri}: {st}\n{out}\n{err}\n{}",
        server.diag()
    );
    let got = std::fs::read(&back).expect("back");
    assert_eq!(got.len(), 16 << 20, "the whole export copied back");
    assert!(
        got[..data.len()] == data[..],
        "nbdcopy read back other bytes"
    );
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn qemu_io_over_tls() {
    if require_tool("qemu-io", "qemu-utils").is_none()
        || require_tool("qemu-img", "qemu-utils").is_none()
    {
        return;
    }
    let pki = pki();
    let server = tls_server(&pki, "127.0.0.1:0", false);
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.client_dir.display()
    );
    let image = format!(
        "driver=nbd,host=127.0.0.1,port={},export=sd0,tls-creds=tls0",
        server.addr.port()
    );
    let (st, out, err) = run_tool(
        Command::new("qemu-img").args(["info", "--object", &object, "--image-opts", &image]),
        TOOL_TIMEOUT,
    );
    assert!(
        st.success() && out.contains("16 MiB"),
        "qemu-img info over TLS: {st}\n{out}\n{err}\n{}",
        server.diag()
    );
    let (st, out, err) = run_tool(
        Command::new("qemu-io").args([
            "--object",
            &object,
            "--image-opts",
            &image,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0 1M 1M",
        ]),
        TOOL_TIMEOUT,
    );
    assert!(
        st.success() && !out.contains("Pattern verification failed") && !err.contains("fail"),
        "qemu-io over TLS: {st}\n{out}\n{err}\n{}",
        server.diag()
    );
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn tls_ca_requires_a_client_certificate() {
    if require_tool("nbdinfo", "libnbd-bin").is_none() {
        return;
    }
    let pki = pki();
    let server = tls_server(&pki, "127.0.0.1:0", true);
    let uri = nbds_uri(&server, &pki.anon_dir);
    let (st, out, err) = run_tool(Command::new("nbdinfo").arg(&uri), TOOL_TIMEOUT);
    assert!(
        !st.success(),
        "a client without a certificate was served: {out}{err}"
    );
    let uri = nbds_uri(&server, &pki.client_dir);
    let (st, out, err) = run_tool(Command::new("nbdinfo").arg(&uri), TOOL_TIMEOUT);
    assert!(
        st.success() && out.contains("16777216"),
        "nbdinfo with a client certificate {uri}: {st}\n{out}\n{err}\n{}",
        server.diag()
    );
    server.assert_healthy("after a refused TLS client");
    server.stop().assert_clean("SIGTERM");
}
