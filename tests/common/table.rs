//! The runner of a table of hostile-client cases (`tests/serve_bad_input.rs`
//! holds the table): a [`Case`] is a name, where its connection starts
//! ([`Phase`]), the bytes sent and the answer the server must give
//! ([`Expect`]). [`run_table`] starts the [`config`] server, runs every row
//! on a connection of its own, and after each one checks a witness
//! connection (open since the start) and that the connection that got an
//! error reply still works; it fails with every failed row listed. The
//! server is stopped when the runner returns or panics (its `Drop`).

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use nbd::wire::*;
use nbd::{ErrorCode, Request};

use super::client::{ExportDesc, go_data, read_info_replies, read_opt_reply, wait_closed};
use super::fixture::{RO_SIZE, SIZE, config, ro_byte};
use super::raw::{COOKIE, fixed_flags, opt};
use super::{Client, Rng, Server, Witness, tcp, test_seed};

/// What every row may depend on, learnt from the server.
pub struct Env {
    /// `sd0`'s maximum payload.
    pub max: u32,
}

/// Where a row's connection starts.
#[derive(Clone, Copy, Debug)]
pub enum Phase {
    /// Just connected; nothing read.
    Connected,
    /// The greeting read.
    Greeted,
    /// Client flags `FIXED_NEWSTYLE | NO_ZEROES` sent: option haggling.
    Haggling,
    /// In transmission on the export, simple replies.
    Simple(&'static str),
    /// In transmission on the export, structured replies.
    Structured(&'static str),
    /// The row does everything itself.
    Custom,
}

/// The answer a row expects.
pub enum Expect {
    /// The server closes the connection without sending another byte.
    Disconnect,
    /// The client leaves right after sending; nothing to read.
    Gone,
    /// One option reply (option, reply type); then haggling goes on (GO and
    /// a read work on the same connection).
    OptReply(u32, u32),
    /// `NBD_REP_ACK` for the option, then the server closes.
    AckThenClose(u32),
    /// `NBD_REP_INFO`s and `NBD_REP_ACK` for `NBD_OPT_INFO`, checked; then
    /// haggling goes on.
    Info(fn(&ExportDesc, &Env) -> Result<(), String>),
    /// One reply to [`COOKIE`] carrying this error; then the connection
    /// still works.
    Error(ErrorCode),
    /// One successful reply to [`COOKIE`]; then the connection still works.
    Success,
    /// The row's own check.
    Custom(fn(&Ctx) -> Result<(), String>),
}

/// What a row's own check gets.
pub struct Ctx<'a> {
    pub server: &'a Server,
    pub env: &'a Env,
    /// A 64K area of `sd0` this row may write.
    pub scratch: u64,
}

/// One row.
pub struct Case {
    pub name: &'static str,
    pub phase: Phase,
    pub send: fn(&Env) -> Vec<u8>,
    /// Half-close (FIN) after sending: the client is gone mid-message.
    pub close: bool,
    pub expect: Expect,
}

/// A row.
pub fn row(name: &'static str, phase: Phase, send: fn(&Env) -> Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        phase,
        send,
        close: false,
        expect,
    }
}

/// The row, half-closing after sending.
pub fn closing(mut c: Case) -> Case {
    c.close = true;
    c
}

/// A row that does everything itself.
pub fn custom(name: &'static str, f: fn(&Ctx) -> Result<(), String>) -> Case {
    row(name, Phase::Custom, |_| Vec::new(), Expect::Custom(f))
}

/// Haggling goes on: `NBD_OPT_GO` on sd0 and a read work.
pub fn haggle_goes_on(mut s: TcpStream) -> Result<(), String> {
    s.write_all(&opt(NBD_OPT_GO, &go_data(b"sd0", &[NBD_INFO_BLOCK_SIZE])))
        .map_err(|e| format!("sending GO after the case: {e}"))?;
    let desc = match read_info_replies(&mut s, NBD_OPT_GO) {
        Ok(Ok(d)) => d,
        Ok(Err(r)) => return Err(format!("GO after the case refused: {r:?}")),
        Err(e) => return Err(format!("GO after the case: {e}")),
    };
    let mut c = Client::from_stream(s, desc, false);
    match c.read(0, 4096) {
        Ok(Ok(d)) if d.len() == 4096 => {}
        other => return Err(format!("read after the case: {other:?}")),
    }
    let _ = c.disconnect();
    Ok(())
}

/// The connection still works after an error reply: for sd0 a write and a
/// read-back in the row's scratch area, for the read-only export a read of
/// its known contents.
pub fn still_works(
    c: &mut Client,
    export: &str,
    scratch: u64,
    rng: &mut Rng,
) -> Result<(), String> {
    if export == "sd1" {
        let off = rng.below(RO_SIZE / 4096 - 1) * 4096;
        let want: Vec<u8> = (off..off + 8192).map(ro_byte).collect();
        return match c.read(off, 8192) {
            Ok(Ok(d)) if d == want => Ok(()),
            Ok(Ok(_)) => Err(format!("read-only export: other bytes at {off}")),
            other => Err(format!("read after the case: {other:?}")),
        };
    }
    let data = rng.bytes(8192);
    match c.write(scratch, &data) {
        Ok(Ok(())) => {}
        other => return Err(format!("write after the case: {other:?}")),
    }
    match c.read(scratch, 8192) {
        Ok(Ok(d)) if d == data => Ok(()),
        Ok(Ok(_)) => Err("read after the case returned other bytes".into()),
        other => Err(format!("read after the case: {other:?}")),
    }
}

/// Runs one row; `Err` says what went wrong.
pub fn run_case(ctx: &Ctx, case: &Case, rng: &mut Rng) -> Result<(), String> {
    let addr = ctx.server.addr;
    let bytes = (case.send)(ctx.env);
    if let Expect::Custom(f) = case.expect {
        return f(ctx);
    }
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    // Prepare the connection.
    let mut client = None;
    let mut sock = match case.phase {
        Phase::Connected => tcp(addr).map_err(|e| io("connect", e))?,
        Phase::Greeted | Phase::Haggling => {
            let mut s = tcp(addr).map_err(|e| io("connect", e))?;
            super::read_greeting(&mut s).map_err(|e| io("greeting", e))?;
            if matches!(case.phase, Phase::Haggling) {
                s.write_all(&fixed_flags()).map_err(|e| io("flags", e))?;
            }
            s
        }
        Phase::Simple(e) | Phase::Structured(e) => {
            let c = Client::open(addr, e, matches!(case.phase, Phase::Structured(_)))
                .map_err(|e| io("handshake", e))?;
            let s = c.sock.try_clone().map_err(|e| io("clone", e))?;
            client = Some(c);
            s
        }
        Phase::Custom => unreachable!(),
    };
    // Send.
    if let Err(e) = sock.write_all(&bytes) {
        // The server may close before reading everything of a hostile
        // message; that is fine only where a disconnect is expected.
        if !matches!(case.expect, Expect::Disconnect | Expect::Gone) {
            return Err(format!("sending the case: {e}"));
        }
    }
    if case.close {
        let _ = sock.shutdown(Shutdown::Write);
    }
    match &case.expect {
        Expect::Gone => {
            drop(client);
            drop(sock);
            Ok(())
        }
        Expect::Disconnect => {
            let got = wait_closed(&mut sock, Duration::from_secs(10))?;
            if got.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "expected a disconnect without a reply, got {} bytes first: {:02x?}",
                    got.len(),
                    &got[..got.len().min(48)]
                ))
            }
        }
        Expect::OptReply(option, reply) => {
            let r = read_opt_reply(&mut sock).map_err(|e| io("option reply", e))?;
            if r.option != *option || r.reply != *reply {
                return Err(format!(
                    "expected option {option} reply {reply:#x}, got option {} reply {:#x} ({:?})",
                    r.option,
                    r.reply,
                    String::from_utf8_lossy(&r.data)
                ));
            }
            haggle_goes_on(sock)
        }
        Expect::AckThenClose(option) => {
            let r = read_opt_reply(&mut sock).map_err(|e| io("option reply", e))?;
            if r.option != *option || r.reply != NBD_REP_ACK {
                return Err(format!("expected NBD_REP_ACK for {option}, got {r:?}"));
            }
            let got = wait_closed(&mut sock, Duration::from_secs(10))?;
            if !got.is_empty() {
                return Err(format!("{} bytes after the ACK", got.len()));
            }
            Ok(())
        }
        Expect::Info(check) => {
            let d = match read_info_replies(&mut sock, NBD_OPT_INFO) {
                Ok(Ok(d)) => d,
                Ok(Err(r)) => return Err(format!("NBD_OPT_INFO refused: {r:?}")),
                Err(e) => return Err(io("info replies", e)),
            };
            check(&d, ctx.env)?;
            haggle_goes_on(sock)
        }
        Expect::Error(_) | Expect::Success => {
            let mut c = client.expect("a transmission phase");
            let raw: [u8; 28] = bytes[..28].try_into().expect("a request");
            let r = Request::parse(&raw).map_err(|e| format!("row's request: {e}"))?;
            c.track(r.cookie, r.command.to_u16(), r.offset, r.length);
            let reply = c.recv().map_err(|e| io("reply", e))?;
            if reply.cookie != COOKIE {
                return Err(format!("reply cookie {:#x} != {COOKIE:#x}", reply.cookie));
            }
            match (&case.expect, reply.error) {
                (Expect::Error(code), e) if e == code.to_u32() => {}
                (Expect::Error(code), e) => {
                    return Err(format!(
                        "expected {code}, got error {e} ({})",
                        ErrorCode::from_u32(e).map_or("not an NBD error".into(), |c| c.to_string())
                    ));
                }
                (_, 0) => {}
                (_, e) => return Err(format!("expected success, got error {e}")),
            }
            let export = match case.phase {
                Phase::Simple(e) | Phase::Structured(e) => e,
                _ => "sd0",
            };
            still_works(&mut c, export, ctx.scratch, rng)?;
            let _ = c.disconnect();
            Ok(())
        }
        Expect::Custom(_) => unreachable!(),
    }
}

/// Runs `cases` (at least 30) against a fresh [`config`] server with
/// `--net NET`; panics listing every failed row.
pub fn run_table(test: &str, cases: Vec<Case>, net: &str) {
    assert!(cases.len() >= 30, "{test}: only {} rows", cases.len());
    let seed = test_seed(test);
    let mut rng = Rng::new(seed);
    let mut opts = config();
    opts.args.extend(["--net".to_string(), net.to_string()]);
    let server = Server::start_opts(opts);
    assert!(
        server.has_export("sd0") && server.has_export("sd1"),
        "exports {:?}",
        server.exports
    );
    let env = Env {
        max: server.client("sd0").max_payload(),
    };
    let mut witness = Witness::new(&server, "sd0", SIZE / 2, SIZE / 2, seed ^ 1);
    witness.check(&server, "before the first row");
    let mut failures = Vec::new();
    let t0 = Instant::now();
    for (i, case) in cases.iter().enumerate() {
        let ctx = Ctx {
            server: &server,
            env: &env,
            scratch: (i as u64 % 120) * 65536,
        };
        let t = Instant::now();
        if let Err(e) = run_case(&ctx, case, &mut rng) {
            failures.push(format!("  [{i}] {}: {e}", case.name));
        }
        witness.check(&server, &format!("after row [{i}] {:?}", case.name));
        if t.elapsed() > Duration::from_secs(5) {
            eprintln!("{test}: row {:?} took {:?}", case.name, t.elapsed());
        }
    }
    eprintln!(
        "{test}: {} rows in {:?}, {} failed",
        cases.len(),
        t0.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{test}: {} of {} rows failed (seed {seed:#x}):\n{}\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n"),
        server.diag()
    );
}
