//! `dvma metal PROGRAM`: the kern core booted as an x86-64 kernel under
//! QEMU (`crates/metal`).
//!
//! Builds the kernel (`cargo build --manifest-path crates/metal/Cargo.toml
//! --release`, into `<target dir>/metal-kernel`), finds a
//! `qemu-system-x86_64` (`$DVMA_QEMU`, else one on `PATH`, else the private
//! one that `crates/metal/qemu-install.sh` unpacks, installing it on first
//! use), boots the kernel with KVM when `/dev/kvm` is usable and TCG
//! otherwise, streams the serial console and exits with the guest's
//! status (the guest leaves through QEMU's `isa-debug-exit`, so QEMU exits
//! with `status * 2 + 1`; any other QEMU exit is a failure). A guest that
//! runs longer than `--timeout` is killed.
//!
//! KVM here is nested (this machine is itself a virtual machine), and it
//! cannot run SSE instructions in its guests: the first one ends in "KVM
//! internal error ... emulation failure" and QEMU stops the guest. The
//! kernel executes one SSE instruction first thing, so the runner sees
//! that message at once; it then says so and boots the guest again under
//! TCG (unless `--kvm` was given, which fails instead).
//!
//! With `--json` the guest's result lines (those it prints as `json: ...`)
//! go to stdout without the prefix and the rest of the console to stderr.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Arguments of `dvma metal`.
#[derive(clap::Args, Debug)]
pub struct MetalArgs {
    /// What the kernel runs: `hello` (boot and exit), `fault` (a page
    /// fault, which must be reported and fail), `selftest` (kern on metal:
    /// spl, interrupts, softints, threads, callouts), `race` (the 1995
    /// race, every completion mode x protection), `bench micro` (the
    /// mechanisms timed; under TCG the figures are the emulator's),
    /// `bench dvma` (bus_dma load+sync+unload per DVMA mode, with the
    /// IOMMU's invalidations counted and timed), `overflow` (a kernel
    /// stack overflow, which must be caught), `disk` (kern's sd over each
    /// virtio-blk disk, and with `--ccd` a ccd striped over them:
    /// patterned writes read back and verified, in each DVMA x completion
    /// mode asked for), `bench kernel` (kern's load generator over sd on
    /// virtio-blk in each DVMA x completion mode: IOPS, CPU ns, interrupts
    /// and IOMMU invalidations per I/O; under TCG the times are the
    /// emulator's).
    program: String,
    /// Arguments passed to the program (on the kernel command line).
    args: Vec<String>,
    /// The spl implementation of the guest's kern: `lazy` (an IPL word,
    /// deferred interrupts replayed) or `mask` (CR8, the hardware IPL).
    #[arg(long, value_parser = ["lazy", "mask"])]
    spl: Option<String>,
    /// Take interrupts on the CPU's interrupt stack (`on`, the default) or
    /// on the interrupted stack (`off`).
    #[arg(long, value_parser = ["on", "off"])]
    intr_stack: Option<String>,
    /// Print the program's JSON result on stdout, the console on stderr.
    #[arg(long)]
    json: bool,
    /// CPUs of the virtual machine (`-smp`); the kernel starts them all
    /// (at most 8).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    cpus: u32,
    /// Require KVM.
    #[arg(long, conflicts_with = "tcg")]
    kvm: bool,
    /// Use TCG (QEMU's emulator) even if KVM is available.
    #[arg(long)]
    tcg: bool,
    /// `race`: injected allocations per row (default 200); `bench micro`:
    /// repetitions per figure (default 5); `disk`: writes per run (default
    /// 32).
    #[arg(long)]
    iterations: Option<u32>,
    /// `race`: also run each row under an interrupt storm for this many
    /// seconds (the LAPIC timer as the storm device).
    #[arg(long, value_name = "SECONDS")]
    storm: Option<f64>,
    /// `disk`, `bench kernel`: the DVMA modes to run (`all`, or a comma
    /// list of strict, lazy, slots, permanent, shadow).
    #[arg(long)]
    dvma: Option<String>,
    /// `disk`, `bench kernel`: the completion modes to run (`all`, or a
    /// comma list of intr, softint, thread, ast).
    #[arg(long)]
    completion: Option<String>,
    /// `disk`, `bench kernel`: virtio-blk disks to give the guest (each a
    /// fully allocated 64 MiB raw image, temporary unless named with
    /// `--disk-image`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    disks: u32,
    /// `disk`, `bench kernel`: a raw disk image to give the guest
    /// (created, or truncated and zeroed, 64 MiB); kept afterwards. Once
    /// per disk, in order; disks beyond those named get temporary images.
    #[arg(long, value_name = "FILE")]
    disk_image: Vec<PathBuf>,
    /// `disk`: also stripe a ccd over the disks (needs `--disks 2` or more).
    #[arg(long)]
    ccd: bool,
    /// `bench kernel`: the measured window per workload, ms (default 500).
    #[arg(long)]
    ms: Option<u64>,
    /// `disk`, `bench kernel`, `bench dvma`: the IOMMU in front of the
    /// disks: `none` (the default: the device sees physical addresses) or
    /// `vtd` (QEMU's intel-iommu; the device gets IOVAs and negotiates
    /// VIRTIO_F_ACCESS_PLATFORM; `bench dvma` gets a disk behind it).
    #[arg(long, value_parser = ["none", "vtd"])]
    iommu: Option<String>,
    /// Kill the guest after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Boot this kernel ELF instead of building crates/metal.
    #[arg(long, value_name = "ELF")]
    kernel: Option<PathBuf>,
}

/// Bytes of each disk image: the `disk` program's sd runs (1 MiB each)
/// below 32 MiB, its ccd runs above.
pub const DISK_BYTES: u64 = 64 << 20;

/// Create (or truncate) a raw image of [`DISK_BYTES`] at `path`, fully
/// allocated: zeros written, not a sparse file.
pub fn make_disk_image(path: &Path) -> Result<(), String> {
    let mut f =
        std::fs::File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..DISK_BYTES / zeros.len() as u64 {
        f.write_all(&zeros)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    f.sync_data()
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A temporary disk image, removed when dropped.
struct TempImage(PathBuf);

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    let base = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                std::env::current_dir().unwrap_or_default().join(d)
            }
        }
        None => root().join("target"),
    };
    base.join("metal-kernel")
}

/// Build the kernel; returns the ELF's path.
pub fn build_kernel() -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let td = target_dir();
    let st = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(root().join("crates/metal/Cargo.toml"))
        .arg("--target-dir")
        .arg(&td)
        // The kernel is built for the baseline x86-64 (its traps save
        // state with FXSAVE): no flags meant for the host programs.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| format!("running cargo to build the metal kernel: {e}"))?;
    if !st.success() {
        return Err(format!("building crates/metal failed ({st})"));
    }
    Ok(td.join("release/dvma-metal"))
}

/// A QEMU to run: the binary and what it needs in its environment.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `qemu-system-x86_64`.
    pub bin: PathBuf,
    /// A private prefix (`usr/lib/...`, `usr/share/qemu`), if not the system's.
    pub prefix: Option<PathBuf>,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn default_prefix() -> PathBuf {
    if let Some(p) = std::env::var_os("DVMA_QEMU_PREFIX") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/dvma-metal/qemu")
}

/// Find QEMU, installing the private one if there is none (see the module
/// docs).
pub fn find_qemu() -> Result<Qemu, String> {
    if let Some(b) = std::env::var_os("DVMA_QEMU") {
        return Ok(Qemu {
            bin: b.into(),
            prefix: None,
        });
    }
    if let Some(b) = on_path("qemu-system-x86_64") {
        return Ok(Qemu {
            bin: b,
            prefix: None,
        });
    }
    let prefix = default_prefix();
    let bin = prefix.join("usr/bin/qemu-system-x86_64");
    if !bin.is_file() {
        let script = root().join("crates/metal/qemu-install.sh");
        eprintln!("dvma metal: no qemu-system-x86_64; installing a private one ({script:?})");
        let st = Command::new("bash")
            .arg(&script)
            .arg(&prefix)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("running {script:?}: {e}"))?;
        if !st.success() || !bin.is_file() {
            return Err(format!(
                "no qemu-system-x86_64: {script:?} could not install one into {prefix:?} ({st})"
            ));
        }
    }
    Ok(Qemu {
        bin,
        prefix: Some(prefix),
    })
}

/// Is KVM usable by this process?
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The QEMU command line that boots `kernel` with `cmdline`.
pub fn qemu_command(q: &Qemu, kernel: &Path, cmdline: &str, kvm: bool, cpus: u32) -> Command {
    let mut c = Command::new(&q.bin);
    if let Some(p) = &q.prefix {
        let lib = p.join("usr/lib/x86_64-linux-gnu");
        c.env("LD_LIBRARY_PATH", &lib);
        c.env("QEMU_MODULE_DIR", lib.join("qemu"));
        c.arg("-L").arg(p.join("usr/share/qemu"));
        c.arg("-L").arg(p.join("usr/share/seabios"));
    }
    if kvm {
        c.args(["-machine", "q35,accel=kvm", "-cpu", "host"]);
    } else {
        c.args(["-machine", "q35,accel=tcg", "-cpu", "max"]);
    }
    c.args([
        "-m",
        "256M",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
    ]);
    c.arg(kernel).arg("-append").arg(cmdline);
    c.arg("-smp").arg(cpus.to_string());
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// How one QEMU run ended.
enum Run {
    /// QEMU exited with this status.
    Exited(std::process::ExitStatus),
    /// KVM could not run the guest (an emulation failure): QEMU was killed.
    KvmFailed(String),
    /// Killed at the deadline.
    TimedOut,
}

enum Line {
    Out(String),
    Err(String),
}

struct Guest<'a> {
    kernel: &'a Path,
    cmdline: &'a str,
    cpus: u32,
    json: bool,
    disks: &'a [PathBuf],
    vtd: bool,
}

fn run_once(q: &Qemu, g: &Guest<'_>, kvm: bool, deadline: Instant) -> Result<Run, String> {
    let json = g.json;
    let mut cmd = qemu_command(q, g.kernel, g.cmdline, kvm, g.cpus);
    if g.vtd && !g.disks.is_empty() {
        // The IOMMU must come before the devices it translates for.
        cmd.args(["-device", "intel-iommu,intremap=off,caching-mode=on"]);
    }
    for (i, d) in g.disks.iter().enumerate() {
        // QEMU's option syntax: a comma in a value is written twice.
        let file = d
            .to_str()
            .ok_or_else(|| format!("{}: not a UTF-8 path", d.display()))?
            .replace(',', ",,");
        let drive = format!("file={file},if=none,id=d{i},format=raw,cache=unsafe");
        cmd.arg("-drive").arg(drive).arg("-device").arg(format!(
            "virtio-blk-pci,drive=d{i},disable-legacy=on{}",
            if g.vtd { ",iommu_platform=on" } else { "" }
        ));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", q.bin.display()))?;
    let out = child.stdout.take().ok_or("no QEMU stdout")?;
    let err = child.stderr.take().ok_or("no QEMU stderr")?;
    let (tx, rx) = mpsc::channel::<Line>();
    let tx2 = tx.clone();
    let readers = [
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(l) = line else { break };
                if tx.send(Line::Out(l)).is_err() {
                    break;
                }
            }
        }),
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(l) = line else { break };
                if tx2.send(Line::Err(l)).is_err() {
                    break;
                }
            }
        }),
    ];
    let emit = |l: Line| -> Option<String> {
        match l {
            Line::Out(l) => {
                let l = l.trim_end_matches('\r');
                if json {
                    if let Some(j) = l.strip_prefix("json: ") {
                        println!("{j}");
                    } else {
                        eprintln!("{l}");
                    }
                } else {
                    println!("{l}");
                }
                let _ = std::io::stdout().flush();
                None
            }
            Line::Err(l) => {
                if kvm && l.contains("KVM internal error") {
                    return Some(l);
                }
                eprintln!("{l}");
                None
            }
        }
    };
    let mut end = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(l) => {
                if let Some(m) = emit(l) {
                    let _ = child.kill();
                    end = Some(Run::KvmFailed(m));
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    end = Some(Run::TimedOut);
                    break;
                }
            }
        }
    }
    let st = child.wait().map_err(|e| format!("waiting for QEMU: {e}"))?;
    for r in readers {
        let _ = r.join();
    }
    if end.is_none() {
        while let Ok(l) = rx.try_recv() {
            let _ = emit(l);
        }
    }
    Ok(end.unwrap_or(Run::Exited(st)))
}

/// `dvma metal`.
pub fn main(a: MetalArgs) -> Result<ExitCode, String> {
    let kernel = match &a.kernel {
        Some(k) => k.clone(),
        None => build_kernel()?,
    };
    let q = find_qemu()?;
    let kvm = if a.tcg {
        false
    } else if a.kvm {
        if !kvm_usable() {
            return Err("--kvm: /dev/kvm is not usable here".into());
        }
        true
    } else {
        kvm_usable()
    };
    let mut cmdline = a.program.clone();
    for w in &a.args {
        cmdline.push(' ');
        cmdline.push_str(w);
    }
    if let Some(spl) = &a.spl {
        cmdline.push_str(" --spl ");
        cmdline.push_str(spl);
    }
    if let Some(n) = a.iterations {
        cmdline.push_str(&format!(" --iterations {n}"));
    }
    if let Some(st) = a.storm {
        if !(st >= 0.0 && st.is_finite()) {
            return Err(format!("--storm {st}: not a number of seconds"));
        }
        cmdline.push_str(&format!(" --storm-ms {}", (st * 1000.0).round() as u64));
    }
    if let Some(s) = &a.intr_stack {
        cmdline.push_str(" --intr-stack ");
        cmdline.push_str(s);
    }
    if let Some(d) = &a.dvma {
        cmdline.push_str(" --dvma ");
        cmdline.push_str(d);
    }
    if let Some(c) = &a.completion {
        cmdline.push_str(" --completion ");
        cmdline.push_str(c);
    }
    if let Some(i) = &a.iommu {
        cmdline.push_str(" --iommu ");
        cmdline.push_str(i);
    }
    if a.ccd {
        cmdline.push_str(" --ccd");
    }
    if let Some(ms) = a.ms {
        cmdline.push_str(&format!(" --ms {ms}"));
    }
    if a.json {
        cmdline.push_str(" --json");
    }
    let mut _temp = Vec::new();
    let mut disks: Vec<PathBuf> = Vec::new();
    let bench =
        |what: &str| a.program == "bench" && a.args.first().map(String::as_str) == Some(what);
    let wants_disks = a.program == "disk"
        || bench("kernel")
        || (bench("dvma") && a.iommu.as_deref() == Some("vtd"));
    if wants_disks {
        let n = (a.disks as usize).max(a.disk_image.len());
        for i in 0..n {
            let p = match a.disk_image.get(i) {
                Some(p) => p.clone(),
                None => {
                    let p = std::env::temp_dir()
                        .join(format!("dvma-metal-disk-{}-{i}.img", std::process::id()));
                    _temp.push(TempImage(p.clone()));
                    p
                }
            };
            make_disk_image(&p)?;
            disks.push(p);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut kvm = kvm;
    let st = loop {
        eprintln!(
            "dvma metal: {} {} ({}, {} CPU(s)), kernel {}",
            q.bin.display(),
            cmdline,
            if kvm { "KVM" } else { "TCG" },
            a.cpus,
            kernel.display()
        );
        let g = Guest {
            kernel: &kernel,
            cmdline: &cmdline,
            cpus: a.cpus,
            json: a.json,
            disks: &disks,
            vtd: a.iommu.as_deref() == Some("vtd"),
        };
        match run_once(&q, &g, kvm, deadline)? {
            Run::Exited(st) => break st,
            Run::TimedOut => {
                return Err(format!(
                    "the guest ran over --timeout {} s: killed",
                    a.timeout
                ));
            }
            Run::KvmFailed(m) if !a.kvm => {
                eprintln!("dvma metal: KVM cannot run the guest here ({m}); falling back to TCG");
                kvm = false;
            }
            Run::KvmFailed(m) => {
                return Err(format!("--kvm: KVM cannot run the guest here: {m}"));
            }
        }
    };
    match st.code() {
        Some(c) if c & 1 == 1 => {
            let guest = (c >> 1) as u8;
            if guest != 0 {
                eprintln!("dvma metal: guest exited with status {guest}");
            }
            Ok(ExitCode::from(guest))
        }
        _ => Err(format!(
            "QEMU exited without a guest status ({st}): the guest reset or QEMU failed"
        )),
    }
}
