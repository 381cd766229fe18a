//! Crash consistency and clean shutdown of `dvma serve`.
//!
//! `crash_consistency`: forty lives of one server on one data directory.
//! Each life: restart (with a random completion mode, DVMA mode, spl and
//! interrupt stack), verify every sector of the export used last against
//! the model, run a random workload of writes and write-zeroes over two
//! connections (some FUA, flushes on either connection:
//! `NBD_FLAG_CAN_MULTI_CONN`), then send a last burst of writes and
//! `kill -9` the server while they are in flight.
//!
//! The model, per sector: the newest content known to be durable (written
//! by a FUA write that was acknowledged, or acknowledged before a flush that
//! was acknowledged) and the contents written after it (acknowledged or
//! not). After the crash a sector must hold one of those, whole: every
//! sector written carries its export, its number and the write's id, so a
//! torn, misdirected or stale sector is caught, not just a missing one.
//!
//! The DMA disks (`sd0`, and `ccd0`'s components `sd1`, `sd2`) run with
//! their volatile write cache on (`write_cache = true`): a write without FUA
//! is acknowledged from the controller's memory and reaches the backing
//! file only at a flush, a FUA write, a destage of a full cache (the
//! components' 256K caches fill up) or a clean shutdown, so `kill -9`
//! really loses acknowledged, unflushed writes, as a power cut loses a
//! disk's cache. The test asserts that some were lost on `sd0`/`ccd0`
//! (otherwise it could not tell a missing flush from a present one).
//! `vnd0` runs on the file device, which has no cache: its unflushed
//! writes sit in the host page cache and survive the process.
//!
//! What it catches (each deletion tried in `DiskMedium`, 2026-12-03, one
//! run per line unless noted; the seed differs per run):
//! * FLUSH not writing the cache back (only `fdatasync`): fails at the
//!   first verification, e.g. "558 of 32768 sectors of sd0 wrong ... holds
//!   write 0, allowed [6]";
//! * FUA writes cached instead of written through (still with an
//!   `fdatasync`): fails at the first verification, "129 of 32768 sectors
//!   of sd0 wrong";
//! * a FUA write-through that leaves the older cached copy of its sectors
//!   (written back over it at the next flush or destage): failed in 3 of 3
//!   runs (lives 16, 6 and 5, on ccd0 and sd0).
//!
//! What it cannot catch: deleting the host `fdatasync` itself (FLUSH and FUA
//! writing to the file but never syncing it) passes (2 of 2 runs). `kill -9`
//! ends the process, not the host, and the host page cache keeps what was
//! written to the file. Only a host or VM power cut (or dropping the page
//! cache without writing it back, which Linux does not offer) would show
//! it. That call is checked only by the device tests' `syncs` counter.
//!
//! Clean shutdown: SIGTERM (and SIGINT) exit 0 with statistics printed and
//! `--stats-json` written; data written without any flush is there after
//! the restart (shutdown flushes every disk; with the write caches on, this
//! checks that `stop` writes them back); in-flight requests are
//! answered; SIGUSR1 writes the statistics and the server goes on.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Client, Rng, Server, ServerOpts, TempDir, machine_toml, test_seed};
use nbd::wire::{
    NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
};

const SECTOR: u64 = 512;
/// Every export is 16 MiB.
const EXPORT_SIZE: u64 = 16 << 20;
const SECTORS: usize = (EXPORT_SIZE / SECTOR) as usize;
/// The exports under test: a DMA disk, a ccd striped over two, a vnd.
const EXPORTS: [&str; 3] = ["sd0", "ccd0", "vnd0"];
const COMPLETIONS: [&str; 4] = ["intr", "softint", "thread", "ast"];
const DVMA_MODES: [&str; 5] = ["strict", "lazy", "slots", "permanent", "shadow"];
/// Lives of the server in `crash_consistency` (each ends in `kill -9`).
const LIVES: usize = 40;

/// The machine of every test here. Every DMA disk (`sd0`, and `sd1`/`sd2`
/// under `ccd0`) has its volatile write cache on, so that `kill -9` loses
/// what was acknowledged but not flushed (see the module documentation):
/// `sd0`'s cache (16M, the default) holds everything a life writes, the
/// components' (256K) fill up and destage.
fn config() -> String {
    let mut t = machine_toml(2, "128M");
    for (name, size, cache) in [
        ("sd0", "16M", "16M"),
        ("sd1", "8M", "256K"),
        ("sd2", "8M", "256K"),
    ] {
        t += &format!(
            "[[disk]]\nname = \"{name}\"\nfile = \"{name}.img\"\nsize = \"{size}\"\npool = \"16M\"\nqueue_depth = 32\n\
             write_cache = true\nwrite_cache_size = \"{cache}\"\n\n"
        );
    }
    t += "[[ccd]]\nname = \"ccd0\"\ncomponents = [\"sd1\", \"sd2\"]\ninterleave = \"64K\"\n\n";
    t += "[[vnd]]\nname = \"vnd0\"\nfile = \"vnd0.img\"\nsize = \"16M\"\n";
    t
}

/// The 512 bytes of `sector` of export `e` written by write `id` (0: zeroes).
fn sector_bytes(seed: u64, e: usize, sector: u64, id: u64, out: &mut [u8]) {
    if id == 0 {
        out.fill(0);
        return;
    }
    out[0..4].copy_from_slice(b"DVMA");
    out[4..8].copy_from_slice(&(e as u32).to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    out[16..24].copy_from_slice(&id.to_le_bytes());
    let mut r = Rng::new(seed ^ ((e as u64) << 60) ^ sector.wrapping_mul(0x9e37_79b9) ^ (id << 24));
    r.fill(&mut out[24..]);
}

/// What a sector holds, decoded: `Ok(id)` (0 for zeroes) or a description
/// of garbage.
fn decode(seed: u64, e: usize, sector: u64, got: &[u8]) -> Result<u64, String> {
    if got.iter().all(|b| *b == 0) {
        return Ok(0);
    }
    if &got[0..4] != b"DVMA" {
        return Err(format!("not a sector this test wrote: {:02x?}", &got[..24]));
    }
    let ge = u32::from_le_bytes(got[4..8].try_into().expect("4")) as usize;
    let gs = u64::from_le_bytes(got[8..16].try_into().expect("8"));
    let id = u64::from_le_bytes(got[16..24].try_into().expect("8"));
    if ge != e || gs != sector {
        return Err(format!(
            "misdirected: holds sector {gs} of {} (write {id})",
            EXPORTS.get(ge).unwrap_or(&"?")
        ));
    }
    let mut want = [0u8; 512];
    sector_bytes(seed, e, sector, id, &mut want);
    if got != want {
        return Err(format!("torn or corrupt sector of write {id}"));
    }
    Ok(id)
}

/// Per sector: the durable content and the contents written after it.
#[derive(Clone, Default)]
struct SectorState {
    durable: u64,
    later: Vec<u64>,
}

impl SectorState {
    fn allowed(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.durable).chain(self.later.iter().copied())
    }

    /// Write `id` became durable.
    fn make_durable(&mut self, id: u64) {
        if let Some(i) = self.later.iter().position(|x| *x == id) {
            self.durable = id;
            self.later.drain(..=i);
        }
    }
}

/// One write of the workload.
#[derive(Clone, Debug)]
struct W {
    /// Unique id; also the content tag unless `zeroes`.
    id: u64,
    first: u64,
    count: u64,
    zeroes: bool,
    fua: bool,
}

struct Model {
    seed: u64,
    sectors: Vec<Vec<SectorState>>,
    /// Ids of content 0 (zeroes) are recorded as their write id in `later`
    /// and mapped to 0 here.
    zero_ids: std::collections::HashSet<u64>,
    /// Writes acknowledged without FUA (durable only after a flush).
    acked: std::collections::HashSet<u64>,
    next_id: u64,
}

impl Model {
    fn new(seed: u64) -> Model {
        Model {
            seed,
            sectors: vec![vec![SectorState::default(); SECTORS]; EXPORTS.len()],
            zero_ids: Default::default(),
            acked: Default::default(),
            next_id: 1,
        }
    }

    fn issue(&mut self, e: usize, w: &W) {
        if w.zeroes {
            self.zero_ids.insert(w.id);
        }
        for s in w.first..w.first + w.count {
            self.sectors[e][s as usize].later.push(w.id);
        }
    }

    fn durable(&mut self, e: usize, w: &W) {
        for s in w.first..w.first + w.count {
            self.sectors[e][s as usize].make_durable(w.id);
        }
    }

    /// Reads every sector of export `e` and checks it against the model;
    /// then the contents read become the durable state.
    fn verify(&mut self, server: &Server, e: usize, context: &str) -> VerifyStats {
        let mut c = server.client(EXPORTS[e]);
        assert_eq!(c.size(), EXPORT_SIZE, "{context}: size of {}", EXPORTS[e]);
        let chunk = c.max_payload().min(1 << 20) as u64;
        let mut stats = VerifyStats::default();
        let mut errors = Vec::new();
        let mut off = 0;
        while off < EXPORT_SIZE {
            let len = chunk.min(EXPORT_SIZE - off);
            let data = match c.read(off, len as u32) {
                Ok(Ok(d)) => d,
                other => panic!(
                    "{context}: reading {} at {off}: {other:?}\n{}",
                    EXPORTS[e],
                    server.diag()
                ),
            };
            for (i, got) in data.chunks(SECTOR as usize).enumerate() {
                let s = off / SECTOR + i as u64;
                let st = &mut self.sectors[e][s as usize];
                let found = match decode(self.seed, e, s, got) {
                    Ok(id) => id,
                    Err(msg) => {
                        errors.push(format!("sector {s}: {msg}"));
                        continue;
                    }
                };
                // Which allowed write does it match? (Zeroes match any write
                // whose content is zeroes.)
                let matched = st.allowed().find(|id| {
                    let content = if self.zero_ids.contains(id) { 0 } else { *id };
                    content == found
                });
                // An acknowledged write newer than the newest content the
                // sector may be holding was lost (to the write cache).
                let allowed: Vec<u64> = st.allowed().collect();
                let last = allowed.iter().rposition(|id| {
                    let content = if self.zero_ids.contains(id) { 0 } else { *id };
                    content == found
                });
                if let Some(i) = last
                    && allowed[i + 1..].iter().any(|id| self.acked.contains(id))
                {
                    stats.lost += 1;
                }
                match matched {
                    Some(id) => {
                        if id == st.durable {
                            stats.durable += 1;
                        } else {
                            stats.newer += 1;
                        }
                        if !st.later.is_empty() && id == *st.later.last().expect("later") {
                            stats.newest += 1;
                        }
                        st.durable = id;
                        st.later.clear();
                    }
                    None => {
                        let allowed: Vec<u64> = st.allowed().collect();
                        errors.push(format!(
                            "sector {s}: holds write {found}, allowed {allowed:?} (durable first)"
                        ));
                    }
                }
            }
            off += len;
        }
        let _ = c.disconnect();
        assert!(
            errors.is_empty(),
            "{context}: {} of {} sectors of {} wrong (seed {:#x}):\n{}\n{}",
            errors.len(),
            SECTORS,
            EXPORTS[e],
            self.seed,
            errors
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            server.diag()
        );
        stats
    }
}

#[derive(Default, Debug)]
struct VerifyStats {
    /// Sectors that lost an acknowledged (not yet durable) write.
    lost: u64,
    /// Sectors holding their durable content.
    durable: u64,
    /// Sectors holding a newer (not durable) content.
    newer: u64,
    /// Of those written since the last verification, sectors holding the
    /// newest content.
    newest: u64,
}

/// Random non-overlapping extents: `n` writes in export `e`.
fn extents(r: &mut Rng, n: usize) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    let mut tries = 0;
    while v.len() < n && tries < n * 20 {
        tries += 1;
        let count = if r.chance(1, 4) {
            r.range(65, 256)
        } else {
            r.range(1, 64)
        };
        let first = r.below(SECTORS as u64 - count);
        if v.iter().all(|&(f, c)| first + count <= f || f + c <= first) {
            v.push((first, count));
        }
    }
    v
}

fn payload(seed: u64, e: usize, w: &W) -> Vec<u8> {
    let mut b = vec![0u8; (w.count * SECTOR) as usize];
    for (i, s) in b.chunks_mut(SECTOR as usize).enumerate() {
        sector_bytes(seed, e, w.first + i as u64, w.id, s);
    }
    b
}

fn send_write(c: &mut Client, seed: u64, e: usize, w: &W) -> std::io::Result<u64> {
    let flags = if w.fua { NBD_CMD_FLAG_FUA } else { 0 };
    let len = (w.count * SECTOR) as u32;
    if w.zeroes {
        let flags = flags
            | if w.id.is_multiple_of(2) {
                NBD_CMD_FLAG_NO_HOLE
            } else {
                0
            };
        c.send(flags, NBD_CMD_WRITE_ZEROES, w.first * SECTOR, len, &[])
    } else {
        c.send(
            flags,
            NBD_CMD_WRITE,
            w.first * SECTOR,
            len,
            &payload(seed, e, w),
        )
    }
}

/// One life's workload on export `e` over two connections; ends with a
/// burst of writes left in flight. Returns (writes acknowledged, made
/// durable, left in flight).
fn workload(
    server: &Server,
    model: &mut Model,
    r: &mut Rng,
    e: usize,
    context: &str,
) -> (u64, u64, u64) {
    let name = EXPORTS[e];
    let mut conns = [server.client(name), server.client(name)];
    let fail = |what: String| -> ! { panic!("{context}: {what}\n{}", server.diag()) };
    let mut acked_not_durable: Vec<W> = Vec::new();
    let (mut acked, mut durable) = (0u64, 0u64);
    let rounds = r.range(3, 8);
    for _ in 0..rounds {
        let n = r.range(1, 12) as usize;
        let batch: Vec<(usize, W)> = extents(r, n)
            .into_iter()
            .map(|(first, count)| {
                let id = model.next_id;
                model.next_id += 1;
                let w = W {
                    id,
                    first,
                    count,
                    zeroes: r.chance(1, 8),
                    fua: r.chance(1, 4),
                };
                (r.below(2) as usize, w)
            })
            .collect();
        let mut cookies = std::collections::HashMap::new();
        for (ci, w) in &batch {
            model.issue(e, w);
            let cookie = send_write(&mut conns[*ci], model.seed, e, w)
                .unwrap_or_else(|err| fail(format!("sending write {}: {err}", w.id)));
            cookies.insert((*ci, cookie), w.clone());
        }
        for (ci, c) in conns.iter_mut().enumerate() {
            while c.in_flight() > 0 {
                let rep = c
                    .recv()
                    .unwrap_or_else(|err| fail(format!("reply on connection {ci}: {err}")));
                let w = cookies
                    .remove(&(ci, rep.cookie))
                    .unwrap_or_else(|| fail(format!("reply for unknown cookie {:#x}", rep.cookie)));
                if rep.error != 0 {
                    fail(format!("write {w:?} failed with error {}", rep.error));
                }
                acked += 1;
                if w.fua {
                    model.durable(e, &w);
                    durable += 1;
                } else {
                    model.acked.insert(w.id);
                    acked_not_durable.push(w);
                }
            }
        }
        if r.chance(1, 2) {
            // A flush on either connection covers what both had acknowledged.
            let ci = r.below(2) as usize;
            match conns[ci].request(0, NBD_CMD_FLUSH, 0, 0, &[]) {
                Ok(Ok(_)) => {}
                other => fail(format!("flush: {other:?}")),
            }
            for w in acked_not_durable.drain(..) {
                model.durable(e, &w);
                durable += 1;
            }
        }
    }
    // The last burst: sent, never waited for; maybe a flush among them.
    let n = r.range(1, 16) as usize;
    let burst = extents(r, n);
    let mut in_flight = 0;
    for (first, count) in burst {
        let id = model.next_id;
        model.next_id += 1;
        let w = W {
            id,
            first,
            count,
            zeroes: r.chance(1, 8),
            fua: r.chance(1, 4),
        };
        model.issue(e, &w);
        let ci = r.below(2) as usize;
        if send_write(&mut conns[ci], model.seed, e, &w).is_err() {
            break;
        }
        in_flight += 1;
        if r.chance(1, 6) {
            let _ = conns[ci].send(0, NBD_CMD_FLUSH, 0, 0, &[]);
        }
    }
    (acked, durable, in_flight)
}

fn start(root: &Path, r: &mut Rng) -> (Server, String) {
    let completion = COMPLETIONS[r.below(4) as usize];
    let dvma = DVMA_MODES[r.below(5) as usize];
    let spl = ["lazy", "mask"][r.below(2) as usize];
    let stack = ["on", "off"][r.below(2) as usize];
    let mut opts = ServerOpts::config(&config());
    opts.args = [
        "--completion",
        completion,
        "--dvma",
        dvma,
        "--spl",
        spl,
        "--intr-stack",
        stack,
    ]
    .map(String::from)
    .to_vec();
    let s = Server::start_in(root, &opts);
    for e in EXPORTS {
        assert!(s.has_export(e), "no export {e}: {:?}", s.exports);
    }
    (
        s,
        format!("completion {completion}, dvma {dvma}, spl {spl}, interrupt stack {stack}"),
    )
}

#[test]
fn crash_consistency() {
    let seed = test_seed("crash_consistency");
    let mut r = Rng::new(seed);
    let dir = TempDir::new("crash");
    let mut model = Model::new(seed);
    let t0 = Instant::now();
    let mut last: Option<usize> = None;
    let (mut acked, mut durable, mut in_flight) = (0, 0, 0);
    let mut newer_survived = 0;
    // Per export: sectors that lost an acknowledged, unflushed write.
    let mut lost = [0u64; EXPORTS.len()];
    for life in 0..LIVES {
        let (server, modes) = start(dir.path(), &mut r);
        let context = format!("life {life} ({modes}), seed {seed:#x}");
        if let Some(e) = last {
            let st = model.verify(
                &server,
                e,
                &format!("{context}: after the crash of life {}", life - 1),
            );
            newer_survived += st.newer;
            lost[e] += st.lost;
        }
        let e = if life < EXPORTS.len() {
            life
        } else {
            r.below(EXPORTS.len() as u64) as usize
        };
        let (a, d, f) = workload(
            &server,
            &mut model,
            &mut r,
            e,
            &format!("{context}, {}", EXPORTS[e]),
        );
        acked += a;
        durable += d;
        in_flight += f;
        last = Some(e);
        let exit = server.kill9();
        assert!(
            !exit.status.success(),
            "{context}: a SIGKILLed server exited with success"
        );
    }
    // The last life: everything, every export.
    let (server, modes) = start(dir.path(), &mut r);
    for e in 0..EXPORTS.len() {
        let st = model.verify(
            &server,
            e,
            &format!("final check ({modes}), seed {seed:#x}"),
        );
        newer_survived += st.newer;
    }
    server.stop().assert_clean("final stop");
    eprintln!(
        "crash_consistency: {LIVES} crashes in {:?}: {acked} writes acknowledged, {durable} made durable, \
         {in_flight} in flight at a kill; {newer_survived} sectors held content newer than the durable one; \
         sectors that lost an acknowledged write: {lost:?} ({EXPORTS:?})",
        t0.elapsed()
    );
    // The DMA disks' write caches make kill -9 lose what was not flushed:
    // if nothing was ever lost, the test could not tell a missing flush.
    assert!(
        lost[0] + lost[1] > 0,
        "no acknowledged, unflushed write on sd0 or ccd0 was lost at any kill -9 \
         (is write_cache on?), seed {seed:#x}"
    );
}

// ---------------------------------------------------------------------------
// Clean shutdown.
// ---------------------------------------------------------------------------

const STATS_KEYS: [&str; 13] = [
    "seq",
    "cpus",
    "interrupts",
    "signals",
    "softints",
    "ctx_switches",
    "asts",
    "iommu_faults",
    "dvma_pages_held",
    "dvma_pages_peak",
    "nbd_requests",
    "nbd_bytes_read",
    "nbd_bytes_written",
];

fn read_stats(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}):\n{text}", path.display()));
    let m = v
        .as_object()
        .unwrap_or_else(|| panic!("{} is not an object:\n{text}", path.display()))
        .clone();
    for k in STATS_KEYS {
        assert!(
            m.get(k).is_some_and(serde_json::Value::is_u64),
            "stats JSON: {k} missing or not a count:\n{text}"
        );
    }
    m
}

fn stat(m: &serde_json::Map<String, serde_json::Value>, k: &str) -> u64 {
    m[k].as_u64().expect("a count")
}

/// Writes `n` blocks of random data (no FUA, no flush) to each export;
/// returns what was written where.
fn write_unflushed(server: &Server, r: &mut Rng, n: usize) -> Vec<(String, u64, Vec<u8>)> {
    let mut out = Vec::new();
    for name in EXPORTS {
        let mut c = server.client(name);
        for _ in 0..n {
            let len = 4096 * r.range(1, 32);
            let off = r.below((EXPORT_SIZE - len) / 4096) * 4096;
            let data = r.bytes(len as usize);
            match c.write(off, &data) {
                Ok(Ok(())) => {}
                other => panic!("write to {name}: {other:?}\n{}", server.diag()),
            }
            out.push((name.to_string(), off, data));
        }
        c.disconnect().expect("disconnect");
    }
    out
}

/// Every block of `written` (later writes win) reads back.
fn check_written(server: &Server, written: &[(String, u64, Vec<u8>)], context: &str) {
    let mut image: std::collections::HashMap<&str, Vec<u8>> = Default::default();
    let mut touched: std::collections::HashMap<&str, Vec<bool>> = Default::default();
    for (name, off, data) in written {
        let img = image
            .entry(name.as_str())
            .or_insert_with(|| vec![0; EXPORT_SIZE as usize]);
        img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        let t = touched
            .entry(name.as_str())
            .or_insert_with(|| vec![false; (EXPORT_SIZE / 4096) as usize]);
        for b in *off / 4096..(*off + data.len() as u64) / 4096 {
            t[b as usize] = true;
        }
    }
    for (name, img) in &image {
        let mut c = server.client(name);
        let t = &touched[name];
        for (b, _) in t.iter().enumerate().filter(|(_, x)| **x) {
            let off = b as u64 * 4096;
            match c.read(off, 4096) {
                Ok(Ok(d)) if d[..] == img[off as usize..off as usize + 4096] => {}
                Ok(Ok(_)) => panic!(
                    "{context}: {name} block at {off} lost its data\n{}",
                    server.diag()
                ),
                other => panic!("{context}: reading {name} at {off}: {other:?}"),
            }
        }
    }
}

#[test]
fn sigterm_flushes_and_exits_zero() {
    let seed = test_seed("sigterm_flushes_and_exits_zero");
    let mut r = Rng::new(seed);
    let dir = TempDir::new("sigterm");
    let stats = dir.path().join("stats.json");
    let mut opts = ServerOpts::config(&config());
    opts.args = vec!["--stats-json".into(), stats.display().to_string()];
    let server = Server::start_in(dir.path(), &opts);
    let written = write_unflushed(&server, &mut r, 24);
    let mut c = server.client("sd0");
    let bytes_read = c.read(0, 65536).expect("read").expect("read ok").len() as u64;
    c.disconnect().expect("disconnect");
    let t = Instant::now();
    let exit = server.stop().assert_clean("SIGTERM");
    eprintln!("SIGTERM to exit: {:?}", t.elapsed());
    let after_ready = exit
        .stdout
        .split_once("dvma: ready")
        .map_or("", |x| x.1)
        .to_string()
        + &exit.stderr;
    assert!(
        after_ready.contains("interrupt"),
        "no statistics printed at shutdown:\n{}\n{}",
        exit.stdout,
        exit.stderr
    );
    let m = read_stats(&stats);
    let bytes_written: u64 = written.iter().map(|w| w.2.len() as u64).sum();
    assert!(
        stat(&m, "nbd_bytes_written") >= bytes_written,
        "nbd_bytes_written {} < {bytes_written}",
        stat(&m, "nbd_bytes_written")
    );
    assert!(
        stat(&m, "nbd_bytes_read") >= bytes_read,
        "nbd_bytes_read {}",
        stat(&m, "nbd_bytes_read")
    );
    assert!(
        stat(&m, "nbd_requests") > written.len() as u64,
        "nbd_requests {} <= {}",
        stat(&m, "nbd_requests"),
        written.len()
    );
    assert_eq!(stat(&m, "iommu_faults"), 0, "IOMMU faults in a clean run");
    assert_eq!(stat(&m, "cpus"), 2, "cpus");
    assert!(stat(&m, "interrupts") > 0, "no interrupts for all that I/O");
    // Clean shutdown flushed: the data is there after a restart.
    let server = Server::start_in(dir.path(), &opts);
    check_written(&server, &written, "after SIGTERM and restart");
    server.stop_with("INT").assert_clean("SIGINT");
}

#[test]
fn sigterm_with_clients_connected_and_requests_in_flight() {
    let seed = test_seed("sigterm_with_clients_connected_and_requests_in_flight");
    let mut r = Rng::new(seed);
    let dir = TempDir::new("sigterm-busy");
    let opts = ServerOpts::config(&config());
    let server = Server::start_in(dir.path(), &opts);
    // An idle client, connected all along.
    let mut idle = server.client("vnd0");
    let idle_data = r.bytes(8192);
    assert_eq!(idle.write(8192, &idle_data).expect("write"), Ok(()));
    // A busy client streams writes from another thread (more than the
    // server's I/O memory budget); the signal comes while they flow.
    let mut busy = server.client("ccd0");
    let mut sent = Vec::new();
    let mut stream = Vec::new();
    // Every write to its own 64 KiB slot (7 is prime to the 255 slots): two
    // overlapping writes in flight together may land in either order (on
    // ccd0, even part one way and part the other, one component each), so
    // the reply order would not say which data is on the disk.
    const SLOTS: u64 = EXPORT_SIZE / 65536 - 1;
    for i in 0..SLOTS {
        let data = r.bytes(65536);
        let off = i * 7 % SLOTS * 65536;
        let cookie = busy.cookie();
        busy.track(cookie, NBD_CMD_WRITE, off, 65536);
        let header = nbd::Request {
            flags: nbd::CommandFlags(0),
            command: nbd::Command::Write,
            cookie,
            offset: off,
            length: 65536,
        };
        stream.extend_from_slice(&header.encode());
        stream.extend_from_slice(&data);
        sent.push((cookie, off, data));
    }
    let mut wsock = busy.sock.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        // Fails once the server stops reading and closes: fine.
        let _ = std::io::Write::write_all(&mut wsock, &stream);
    });
    let mut answered = Vec::new();
    let mut t = Instant::now();
    let mut signalled = false;
    loop {
        match busy.recv() {
            Ok(rep) => {
                assert_eq!(rep.error, 0, "write failed around shutdown: {rep:?}");
                let w = sent
                    .iter()
                    .find(|s| s.0 == rep.cookie)
                    .unwrap_or_else(|| panic!("reply for unknown cookie {:#x}", rep.cookie));
                answered.push(w.clone());
                if !signalled && answered.len() == 8 {
                    // Requests in flight, more on the wire: stop now.
                    t = Instant::now();
                    server.signal("TERM");
                    signalled = true;
                }
            }
            Err(e) => {
                assert!(
                    signalled
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::UnexpectedEof
                                | std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::ConnectionAborted
                        ),
                    "busy client (signalled {signalled}, {} answered): {e}\n{}",
                    answered.len(),
                    server.diag()
                );
                break;
            }
        }
        if answered.len() == sent.len() {
            break;
        }
    }
    let _ = writer.join();
    let got = common::client::wait_closed(&mut idle.sock, Duration::from_secs(30));
    assert!(got.is_ok(), "the idle client was not disconnected: {got:?}");
    let status = server
        .wait_exit(common::STOP_TIMEOUT)
        .unwrap_or_else(|| panic!("no exit {:?} after SIGTERM\n{}", t.elapsed(), server.diag()));
    assert!(status.success(), "exit {status}\n{}", server.diag());
    eprintln!(
        "SIGTERM with {} of {} writes answered; exit after {:?}",
        answered.len(),
        sent.len(),
        t.elapsed()
    );
    drop(server);
    let server = Server::start_in(dir.path(), &opts);
    let mut written: Vec<(String, u64, Vec<u8>)> = answered
        .into_iter()
        .map(|(_, off, data)| ("ccd0".to_string(), off, data))
        .collect();
    written.push(("vnd0".into(), 8192, idle_data));
    check_written(&server, &written, "after SIGTERM with requests in flight");
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn sigusr1_writes_stats_and_serving_goes_on() {
    let seed = test_seed("sigusr1_writes_stats_and_serving_goes_on");
    let mut r = Rng::new(seed);
    let dir = TempDir::new("sigusr1");
    let stats = dir.path().join("stats.json");
    let mut opts = ServerOpts::config(&config());
    opts.args = vec!["--stats-json".into(), stats.display().to_string()];
    let server = Server::start_in(dir.path(), &opts);
    let written = write_unflushed(&server, &mut r, 4);
    let wait_file = |prev: Option<u64>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&stats)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(seq) = v.get("seq").and_then(serde_json::Value::as_u64)
                && prev.is_none_or(|p| seq > p)
            {
                return read_stats(&stats);
            }
            assert!(
                Instant::now() < deadline,
                "no (new) --stats-json 10 s after SIGUSR1\n{}",
                server.diag()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    server.signal("USR1");
    let first = wait_file(None);
    assert!(stat(&first, "nbd_requests") >= written.len() as u64);
    server.assert_healthy("after SIGUSR1");
    let more = write_unflushed(&server, &mut r, 2);
    server.signal("USR1");
    let second = wait_file(Some(stat(&first, "seq")));
    assert!(
        stat(&second, "nbd_bytes_written") > stat(&first, "nbd_bytes_written"),
        "nbd_bytes_written did not grow"
    );
    let all: Vec<_> = written.into_iter().chain(more).collect();
    check_written(&server, &all, "after two SIGUSR1");
    server.assert_healthy("after SIGUSR1 twice");
    server.stop().assert_clean("SIGTERM");
    let last = read_stats(&stats);
    assert!(
        stat(&last, "seq") > stat(&second, "seq"),
        "stats at exit not newer"
    );
}
