//! The machine description (`src/config/`, included here directly so it
//! builds without the binary): the default, the example file, overrides,
//! the round trip through `to_toml`, and a table of bad inputs whose errors
//! must name the key and the allowed values.

#[path = "../src/config/mod.rs"]
mod config;
#[path = "common/tempdir.rs"]
mod tempdir;

use std::path::{Path, PathBuf};

use clap::Parser;
use config::{BackingPlan, BootArgs, CcdBufs, ConfigError, MachineSpec, Overrides};
use kern::Completion;
use kern::bus_dma::DvmaMode;
use machine::SplImpl;
use tempdir::TempDir;

const EXAMPLE: &str = include_str!("../examples/ccd-vnd.toml");
const M: u64 = 1 << 20;

fn parse_with(text: &str, ov: &Overrides) -> Result<MachineSpec, ConfigError> {
    MachineSpec::from_toml(text, Path::new("bad.toml"), Path::new("/base"), ov)
}

fn parse(text: &str) -> Result<MachineSpec, ConfigError> {
    parse_with(text, &Overrides::default())
}

fn host_cpus() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(64)
}

#[test]
fn default_spec() {
    let s = MachineSpec::default_spec();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(s.machine.cpus, host_cpus());
    assert_eq!(s.machine.memory, 256 * M);
    assert_eq!(s.machine.spl, SplImpl::Lazy);
    assert!(s.machine.intr_stack);
    assert_eq!(s.machine.data_dir, cwd.join("dvma-data"));
    assert_eq!(s.disks.len(), 1);
    assert!(s.ccds.is_empty() && s.vnds.is_empty());
    let d = &s.disks[0];
    assert_eq!(d.name, "sd0");
    assert_eq!(d.file, cwd.join("dvma-data/sd0.img"));
    assert_eq!(d.size, Some(256 * M));
    assert_eq!(d.sector_size, 512);
    assert_eq!(d.dvma, DvmaMode::Permanent);
    assert_eq!(d.completion, Completion::Softint);
    assert!(!d.read_only && !d.o_direct);
    assert_eq!(
        (d.cpu, d.queue_depth, d.max_transfer, d.workers),
        (0, 64, 1 << 20, 2)
    );
    assert_eq!(
        (d.coalesce_count, d.coalesce_us, d.slots, d.pool),
        (1, 0, 64, 64 * M)
    );
    s.validate().unwrap();
    // `load` without a file is the default.
    assert_eq!(MachineSpec::load(None, &Overrides::default()).unwrap(), s);
    assert_eq!(BootArgs::default().load().unwrap(), s);
}

#[test]
fn example_resolves() {
    let s = parse(EXAMPLE).unwrap();
    assert_eq!(s.machine.cpus, 2);
    assert_eq!(s.machine.memory, 256 * M);
    assert_eq!(s.machine.spl, SplImpl::Lazy);
    assert!(s.machine.intr_stack);
    assert_eq!(s.machine.data_dir, PathBuf::from("/base/dvma-data"));

    let names: Vec<&str> = s.disks.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["sd0", "sd1"]);
    let sd0 = &s.disks[0];
    assert_eq!(sd0.file, PathBuf::from("/base/dvma-data/sd0.img"));
    assert_eq!(sd0.size, Some(256 * M));
    assert_eq!(sd0.dvma, DvmaMode::Permanent);
    assert_eq!(sd0.completion, Completion::Softint);
    assert_eq!(
        (sd0.cpu, sd0.queue_depth, sd0.max_transfer, sd0.workers),
        (0, 64, 1 << 20, 2)
    );
    assert_eq!(
        (sd0.coalesce_count, sd0.coalesce_us, sd0.slots, sd0.pool),
        (8, 20, 64, 64 * M)
    );
    let sd1 = &s.disks[1];
    assert_eq!(sd1.file, PathBuf::from("/base/dvma-data/sd1.img"));
    assert_eq!(
        (sd1.size, sd1.dvma, sd1.coalesce_count),
        (Some(256 * M), DvmaMode::Permanent, 1)
    );

    let ccd = &s.ccds[0];
    assert_eq!(ccd.name, "ccd0");
    assert_eq!(ccd.components, ["sd0", "sd1"]);
    assert_eq!(ccd.interleave, 64 << 10);
    assert_eq!(ccd.completion, Completion::Softint);
    assert_eq!(ccd.cbufs, CcdBufs::Pool);
    assert_eq!(
        CcdBufs::ALL.map(|b| CcdBufs::from_name(b.name())),
        [Some(CcdBufs::Pool), Some(CcdBufs::Kmem)]
    );
    assert_eq!(
        (CcdBufs::from_name("malloc"), CcdBufs::Kmem.to_string()),
        (None, "kmem".to_owned())
    );
    assert!(!ccd.read_only);

    let vnd = &s.vnds[0];
    assert_eq!(vnd.name, "vnd0");
    assert_eq!(vnd.file, PathBuf::from("/base/dvma-data/vnd0.img"));
    assert_eq!(vnd.size, Some(128 * M));
    assert_eq!(vnd.completion, Completion::Thread);

    let files: Vec<(String, PathBuf, Option<u64>)> = s
        .backing_files()
        .into_iter()
        .map(|b| (b.key, b.path, b.size))
        .collect();
    assert_eq!(
        files,
        [
            (
                "disk[0]".into(),
                "/base/dvma-data/sd0.img".into(),
                Some(256 * M)
            ),
            (
                "disk[1]".into(),
                "/base/dvma-data/sd1.img".into(),
                Some(256 * M)
            ),
            (
                "vnd[0]".into(),
                "/base/dvma-data/vnd0.img".into(),
                Some(128 * M)
            ),
        ]
    );

    // The bridges to the machine and bus_dma.
    let mc = s.machine.machine_config();
    assert_eq!(
        (mc.kernel.ncpu, mc.kernel.spl, mc.intr_stack, mc.ram_bytes),
        (2, SplImpl::Lazy, true, 256 * M)
    );
    let tag = sd0.tag_config();
    assert_eq!(
        (tag.mode, tag.maxsize, tag.slots, tag.pool_bytes),
        (DvmaMode::Permanent, 1 << 20, 64, 64 << 20)
    );
}

#[test]
fn example_file_loads_through_boot_args() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ccd-vnd.toml");
    let args = BootArgs {
        config: Some(path.clone()),
        ..BootArgs::default()
    };
    let s = args.load().unwrap();
    assert_eq!(
        s.machine.data_dir,
        std::env::current_dir().unwrap().join("dvma-data")
    );
    assert_eq!((s.disks.len(), s.ccds.len(), s.vnds.len()), (2, 1, 1));
}

#[test]
fn overrides_apply_to_every_driver() {
    let ov = Overrides {
        dvma: Some(DvmaMode::Slots),
        completion: Some(Completion::Ast),
        spl: Some(SplImpl::Mask),
        intr_stack: Some(false),
        cpus: Some(1),
        data_dir: Some("elsewhere".into()),
    };
    let s = parse_with(EXAMPLE, &ov).unwrap();
    assert_eq!(s.machine.cpus, 1);
    assert_eq!(s.machine.spl, SplImpl::Mask);
    assert!(!s.machine.intr_stack);
    assert_eq!(s.machine.data_dir, PathBuf::from("/base/elsewhere"));
    assert!(s.disks.iter().all(|d| d.dvma == DvmaMode::Slots));
    assert!(s.disks.iter().all(|d| d.completion == Completion::Ast));
    assert!(s.ccds.iter().all(|c| c.completion == Completion::Ast));
    assert!(s.vnds.iter().all(|v| v.completion == Completion::Ast));
    assert_eq!(s.disks[1].file, PathBuf::from("/base/elsewhere/sd1.img"));
    assert_eq!(s.vnds[0].file, PathBuf::from("/base/elsewhere/vnd0.img"));

    // Every mode is valid for the example.
    for mode in DvmaMode::ALL {
        let ov = Overrides {
            dvma: Some(mode),
            ..Overrides::default()
        };
        let s = parse_with(EXAMPLE, &ov).unwrap();
        assert!(s.disks.iter().all(|d| d.dvma == mode), "{mode}");
    }

    // An absolute file stays where it is when --data-dir moves the others.
    let text = "[[disk]]\nname = \"sd0\"\nfile = \"/abs/sd0.img\"\n[[disk]]\nname = \"sd1\"\nfile = \"sd1.img\"\n";
    let s = parse_with(
        text,
        &Overrides {
            data_dir: Some("/data".into()),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(s.disks[0].file, PathBuf::from("/abs/sd0.img"));
    assert_eq!(s.disks[1].file, PathBuf::from("/data/sd1.img"));
}

#[test]
fn overrides_are_validated() {
    let e = parse_with(
        EXAMPLE,
        &Overrides {
            cpus: Some(0),
            ..Overrides::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.key(), Some("--cpus"));
    assert!(e.to_string().contains("0 is not between 1 and 64"), "{e}");

    // Four disks in strict mode fit; --dvma permanent needs four 64M pools.
    let mut text = String::from("[machine]\nmemory = \"256M\"\n");
    for i in 0..4 {
        text += &format!("[[disk]]\nname = \"sd{i}\"\nfile = \"sd{i}.img\"\ndvma = \"strict\"\n");
    }
    parse(&text).unwrap();
    let e = parse_with(
        &text,
        &Overrides {
            dvma: Some(DvmaMode::Permanent),
            ..Overrides::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.key(), Some("machine.memory"));
    let msg = e.to_string();
    assert!(
        msg.contains("(set by --dvma)") && msg.contains("needs at least 288M"),
        "{msg}"
    );

    // A disk's interrupt CPU must exist after --cpus.
    let text = "[machine]\ncpus = 4\n[[disk]]\nname = \"sd0\"\nfile = \"a\"\ncpu = 3\n";
    parse(text).unwrap();
    let e = parse_with(
        text,
        &Overrides {
            cpus: Some(2),
            ..Overrides::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.key(), Some("disk[0].cpu"));
    assert!(e.to_string().contains("(set by --cpus)"), "{e}");
}

#[test]
fn to_toml_round_trips() {
    let odd = r#"
        [machine]
        cpus = 3
        memory = 1073745920 # 1G + 4K
        spl = "mask"
        intr_stack = "off"
        data_dir = "/srv/./dvma/../data"

        [[disk]]
        name = "sd7"
        file = "/elsewhere/disk.img"
        sector_size = 4096
        dvma = "shadow"
        completion = "ast"
        read_only = true
        cpu = 2
        queue_depth = 1024
        max_transfer = "32M"
        workers = 64
        o_direct = true
        coalesce_count = 1024
        coalesce_us = 1000000
        slots = 4096
        pool = 34611200 # 33M + 8K

        [[disk]]
        name = "sd8"
        file = "sub/dir/sd8.img"
        size = 1536

        [[ccd]]
        name = "ccd3"
        components = ["sd8"]
        cbufs = "kmem"

        [[ccd]]
        name = "ccd4"
        components = ["sd7"]
        interleave = 8192
        read_only = true
    "#;
    let with_overrides = parse_with(
        EXAMPLE,
        &Overrides {
            dvma: Some(DvmaMode::Lazy),
            completion: Some(Completion::Intr),
            spl: Some(SplImpl::Mask),
            intr_stack: Some(false),
            cpus: Some(1),
            data_dir: Some("/x".into()),
        },
    )
    .unwrap();
    let specs = [
        MachineSpec::default_spec(),
        parse(EXAMPLE).unwrap(),
        parse(odd).unwrap(),
        with_overrides,
        parse("[machine]\ncpus = 1\n").unwrap(),
    ];
    for spec in specs {
        let text = spec.to_toml();
        // Parsed anywhere: data_dir is absolute in the output.
        let back = MachineSpec::from_toml(
            &text,
            Path::new("out.toml"),
            Path::new("/other"),
            &Overrides::default(),
        )
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, spec, "{text}");
        assert_eq!(back.to_toml(), text);
    }
    let s = parse(odd).unwrap();
    assert_eq!(s.machine.data_dir, PathBuf::from("/srv/data"));
    assert_eq!(s.machine.memory, (1 << 30) + 4096);
    assert_eq!(s.disks[1].file, PathBuf::from("/srv/data/sub/dir/sd8.img"));
    let text = s.to_toml();
    assert!(text.contains("file = \"/elsewhere/disk.img\""), "{text}");
    assert!(text.contains("file = \"sub/dir/sd8.img\""), "{text}");
    assert!(text.contains("pool = \"33800K\""), "{text}");
    assert!(text.contains("interleave = 0"), "{text}");
}

const BASE: &str =
    "[machine]\ncpus = 2\n\n[[disk]]\nname = \"sd0\"\nfile = \"sd0.img\"\nsize = \"1M\"\n";
const TWO: &str = "[machine]\ncpus = 2\n\n[[disk]]\nname = \"sd0\"\nfile = \"sd0.img\"\n\n[[disk]]\nname = \"sd1\"\nfile = \"sd1.img\"\n";

/// (what, file, key, substrings of the message)
fn bad_inputs() -> Vec<(&'static str, String, &'static str, Vec<&'static str>)> {
    let base = |extra: &str| format!("{BASE}{extra}\n");
    let two = |extra: &str| format!("{TWO}{extra}\n");
    let with_ccd = |comps: &str| format!("{TWO}\n[[ccd]]\nname = \"ccd0\"\ncomponents = {comps}\n");
    vec![
        (
            "unknown top-level section",
            format!("{BASE}[network]\nmtu = 1500\n"),
            "network",
            vec!["unknown section", "expected one of machine, disk, ccd, vnd"],
        ),
        (
            "machine key outside [machine]",
            format!("memory = \"1G\"\n{BASE}"),
            "memory",
            vec!["unknown section", "belongs under [machine]"],
        ),
        (
            "section misspelt",
            format!("{BASE}[[disks]]\nname = \"sd1\"\n"),
            "disks",
            vec!["did you mean disk?"],
        ),
        (
            "[disk] instead of [[disk]]",
            "[disk]\nname = \"sd0\"\nfile = \"a\"\n".into(),
            "disk",
            vec!["write [[disk]], not [disk]"],
        ),
        (
            "unknown disk key (typo)",
            base("dvmaa = \"strict\""),
            "disk[0].dvmaa",
            vec![
                "unknown key",
                "did you mean dvma?",
                "name, file, size, sector_size, dvma, completion",
            ],
        ),
        (
            "unknown machine key (typo)",
            "[machine]\nmemroy = \"1G\"\n".into(),
            "machine.memroy",
            vec![
                "did you mean memory?",
                "cpus, memory, spl, intr_stack, data_dir",
            ],
        ),
        (
            "unknown vnd key",
            "[[vnd]]\nname = \"vnd0\"\nfile = \"v\"\ndvma = \"strict\"\n".into(),
            "vnd[0].dvma",
            vec!["unknown key", "name, file, size, completion, read_only"],
        ),
        (
            "bad dvma",
            base("dvma = \"fast\""),
            "disk[0].dvma",
            vec!["\"fast\" is not one of strict, lazy, slots, permanent, shadow"],
        ),
        (
            "bad disk completion",
            base("completion = \"poll\""),
            "disk[0].completion",
            vec!["\"poll\" is not one of intr, softint, thread, ast"],
        ),
        (
            "bad ccd completion",
            format!(
                "{TWO}[[ccd]]\nname = \"ccd0\"\ncomponents = [\"sd0\"]\ncompletion = \"signal\"\n"
            ),
            "ccd[0].completion",
            vec!["\"signal\" is not one of intr, softint, thread, ast"],
        ),
        (
            "bad vnd completion",
            "[[vnd]]\nname = \"vnd0\"\nfile = \"v\"\ncompletion = \"Thread\"\n".into(),
            "vnd[0].completion",
            vec!["\"Thread\" is not one of intr, softint, thread, ast"],
        ),
        (
            "bad spl",
            "[machine]\nspl = \"fast\"\n".into(),
            "machine.spl",
            vec!["\"fast\" is not one of lazy, mask"],
        ),
        (
            "bad intr_stack",
            "[machine]\nintr_stack = \"yes\"\n".into(),
            "machine.intr_stack",
            vec!["\"yes\" is not one of on, off"],
        ),
        (
            "bad cbufs",
            format!("{TWO}[[ccd]]\nname = \"ccd0\"\ncomponents = [\"sd0\"]\ncbufs = \"malloc\"\n"),
            "ccd[0].cbufs",
            vec!["\"malloc\" is not one of pool, kmem"],
        ),
        (
            "bad size suffix",
            "[[disk]]\nname = \"sd0\"\nfile = \"a\"\nsize = \"12Q\"\n".into(),
            "disk[0].size",
            vec!["\"12Q\": expected a number of bytes with an optional K, M or G suffix"],
        ),
        (
            "size of the wrong type",
            "[machine]\nmemory = 2.5\n".into(),
            "machine.memory",
            vec!["expected a number of bytes", "found the float 2.5"],
        ),
        (
            "negative size",
            "[machine]\nmemory = -4096\n".into(),
            "machine.memory",
            vec!["-4096: a size cannot be negative"],
        ),
        (
            "negative cpus",
            "[machine]\ncpus = -1\n".into(),
            "machine.cpus",
            vec!["-1 is not between 1 and 64"],
        ),
        (
            "0 cpus",
            "[machine]\ncpus = 0\n".into(),
            "machine.cpus",
            vec!["0 is not between 1 and 64"],
        ),
        (
            "65 cpus",
            "[machine]\ncpus = 65\n".into(),
            "machine.cpus",
            vec!["65 is not between 1 and 64"],
        ),
        (
            "cpus not an integer",
            "[machine]\ncpus = \"two\"\n".into(),
            "machine.cpus",
            vec!["expected an integer, found the string \"two\""],
        ),
        (
            "bool of the wrong type",
            base("read_only = \"no\""),
            "disk[0].read_only",
            vec!["expected true or false"],
        ),
        (
            "duplicate disk names",
            format!("{BASE}[[disk]]\nname = \"sd0\"\nfile = \"other.img\"\n"),
            "disk[1].name",
            vec!["\"sd0\" is already the name of disk[0]"],
        ),
        (
            "disk name pattern",
            "[[disk]]\nname = \"disk0\"\nfile = \"a\"\n".into(),
            "disk[0].name",
            vec!["\"disk0\" does not match sd[0-9]+"],
        ),
        (
            "disk name without a unit",
            "[[disk]]\nname = \"sd\"\nfile = \"a\"\n".into(),
            "disk[0].name",
            vec!["does not match sd[0-9]+"],
        ),
        (
            "vnd name pattern",
            "[[vnd]]\nname = \"sd5\"\nfile = \"a\"\n".into(),
            "vnd[0].name",
            vec!["\"sd5\" does not match vnd[0-9]+"],
        ),
        (
            "ccd name pattern",
            format!("{TWO}[[ccd]]\nname = \"ccdx\"\ncomponents = [\"sd0\"]\n"),
            "ccd[0].name",
            vec!["does not match ccd[0-9]+"],
        ),
        (
            "ccd component missing",
            with_ccd("[\"sd0\", \"sd9\"]"),
            "ccd[0].components[1]",
            vec!["\"sd9\" is not a disk; the disks are sd0, sd1"],
        ),
        (
            "ccd component used twice",
            with_ccd("[\"sd0\", \"sd0\"]"),
            "ccd[0].components[1]",
            vec!["\"sd0\" is already used as ccd[0].components[0]"],
        ),
        (
            "disk in two ccds",
            format!(
                "{}[[ccd]]\nname = \"ccd1\"\ncomponents = [\"sd1\", \"sd0\"]\n",
                with_ccd("[\"sd0\"]")
            ),
            "ccd[1].components[1]",
            vec!["\"sd0\" is already used as ccd[0].components[0]"],
        ),
        (
            "ccd component is a vnd",
            format!(
                "{}[[vnd]]\nname = \"vnd0\"\nfile = \"v.img\"\n",
                with_ccd("[\"sd0\", \"vnd0\"]")
            ),
            "ccd[0].components[1]",
            vec!["\"vnd0\" is a vnd (vnd[0]), not a disk"],
        ),
        (
            "ccd with no component",
            with_ccd("[]"),
            "ccd[0].components",
            vec!["at least 1 component"],
        ),
        (
            "ccd component not a string",
            with_ccd("[\"sd0\", 1]"),
            "ccd[0].components[1]",
            vec!["expected a string, found the integer 1"],
        ),
        (
            "interleave 1000",
            format!("{}interleave = 1000\n", with_ccd("[\"sd0\", \"sd1\"]")),
            "ccd[0].interleave",
            vec!["1000 is not a multiple of 512"],
        ),
        (
            "interleave below the components' sectors",
            "[[disk]]\nname = \"sd0\"\nfile = \"a\"\nsector_size = 4096\n[[ccd]]\nname = \"ccd0\"\ncomponents = [\"sd0\"]\ninterleave = \"2K\"\n".into(),
            "ccd[0].interleave",
            vec!["2048 is not a multiple of 4096"],
        ),
        (
            "components with different sector sizes",
            format!(
                "{}[[ccd]]\nname = \"ccd0\"\ncomponents = [\"sd0\", \"sd1\"]\n",
                two("sector_size = 4096")
            ),
            "ccd[0].components[1]",
            vec![
                "\"sd1\" has 4096-byte sectors but sd0 has 512",
                "one sector size",
            ],
        ),
        (
            "components with different DVMA modes",
            format!(
                "{}[[ccd]]\nname = \"ccd0\"\ncomponents = [\"sd0\", \"sd1\"]\n",
                two("dvma = \"strict\"")
            ),
            "ccd[0].components[1]",
            vec![
                "\"sd1\" uses dvma strict but sd0 uses permanent",
                "one DVMA mode",
            ],
        ),
        (
            "writable ccd over a read-only disk",
            format!(
                "{}[[ccd]]\nname = \"ccd0\"\ncomponents = [\"sd1\"]\n",
                two("read_only = true")
            ),
            "ccd[0].components[0]",
            vec![
                "\"sd1\" is read_only but ccd0 is not",
                "ccd[0].read_only = true",
            ],
        ),
        (
            "memory too small for the pools",
            format!(
                "[machine]\nmemory = \"128M\"\n{}",
                &TWO["[machine]\ncpus = 2\n".len()..]
            ),
            "machine.memory",
            vec![
                "128M cannot hold the DVMA pools",
                "sd0 64M (permanent) + sd1 64M (permanent) = 128M",
                "needs at least 160M",
            ],
        ),
        (
            "memory not whole pages",
            "[machine]\nmemory = 100000000\n".into(),
            "machine.memory",
            vec!["not a multiple of 4K between 16M and 64G"],
        ),
        (
            "queue_depth 0",
            base("queue_depth = 0"),
            "disk[0].queue_depth",
            vec!["0 is not between 1 and 1024"],
        ),
        (
            "queue_depth 2000",
            base("queue_depth = 2000"),
            "disk[0].queue_depth",
            vec!["2000 is not between 1 and 1024"],
        ),
        (
            "coalesce_count above queue_depth",
            base("queue_depth = 16\ncoalesce_count = 32"),
            "disk[0].coalesce_count",
            vec!["32 is not between 1 and 16"],
        ),
        (
            "max_transfer 3000",
            base("max_transfer = 3000"),
            "disk[0].max_transfer",
            vec!["3000 is not a power of two between 4K and 32M"],
        ),
        (
            "max_transfer 64M",
            base("max_transfer = \"64M\""),
            "disk[0].max_transfer",
            vec!["64M is not a power of two between 4K and 32M"],
        ),
        (
            "pool smaller than a transfer",
            base("max_transfer = \"4M\"\npool = \"1M\""),
            "disk[0].pool",
            vec!["1M is smaller than max_transfer (4M)"],
        ),
        (
            "disk size not a multiple of 512",
            "[[disk]]\nname = \"sd0\"\nfile = \"a\"\nsize = 1000\n".into(),
            "disk[0].size",
            vec!["1000 is not a positive multiple of the 512-byte sector"],
        ),
        (
            "vnd size not a multiple of 512",
            "[[vnd]]\nname = \"vnd0\"\nfile = \"a\"\nsize = \"1000\"\n".into(),
            "vnd[0].size",
            vec!["1000 is not a positive multiple of the 512-byte sector"],
        ),
        (
            "bad sector size",
            base("sector_size = 520"),
            "disk[0].sector_size",
            vec!["520 is not one of 512, 1024, 2048, 4096"],
        ),
        (
            "interrupt CPU that does not exist",
            base("cpu = 2"),
            "disk[0].cpu",
            vec!["2 is not a CPU of this machine: cpus = 2, so 0 to 1"],
        ),
        (
            "file paths that collide",
            format!("{BASE}[[vnd]]\nname = \"vnd0\"\nfile = \"x/../sd0.img\"\n"),
            "vnd[0].file",
            vec!["/base/dvma-data/sd0.img is already the file of disk[0]"],
        ),
        (
            "file that is the data directory",
            "[[disk]]\nname = \"sd0\"\nfile = \".\"\n".into(),
            "disk[0].file",
            vec!["names a directory"],
        ),
        (
            "missing name",
            "[[disk]]\nfile = \"sd0.img\"\n".into(),
            "disk[0].name",
            vec!["missing required key"],
        ),
        (
            "missing file",
            format!("{BASE}[[vnd]]\nname = \"vnd0\"\n"),
            "vnd[0].file",
            vec!["missing required key"],
        ),
        (
            "missing components",
            format!("{TWO}[[ccd]]\nname = \"ccd0\"\n"),
            "ccd[0].components",
            vec!["missing required key"],
        ),
    ]
}

#[test]
fn bad_inputs_name_the_key_and_the_allowed_values() {
    let cases = bad_inputs();
    assert!(cases.len() >= 20);
    for (what, text, key, wanted) in cases {
        let e = match parse(&text) {
            Ok(_) => panic!("{what}: accepted:\n{text}"),
            Err(e) => e,
        };
        let shown = e.to_string();
        assert!(matches!(e, ConfigError::Invalid { .. }), "{what}: {shown}");
        assert_eq!(e.key(), Some(key), "{what}: {shown}");
        assert!(
            shown.starts_with(&format!("config bad.toml: {key}: ")),
            "{what}: {shown}"
        );
        for w in wanted {
            assert!(shown.contains(w), "{what}: {shown:?} lacks {w:?}");
        }
    }
}

#[test]
fn error_display() {
    let e = parse(&format!("{BASE}dvma = \"fast\"\n")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "config bad.toml: disk[0].dvma: \"fast\" is not one of strict, lazy, slots, permanent, shadow"
    );
    let e = parse("[[disk]]\nname = \"sd0\"\nfile = \"a\"\nsize = \"12Q\"\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "config bad.toml: disk[0].size: \"12Q\": expected a number of bytes with an optional K, M or G suffix"
    );
}

#[test]
fn syntax_errors_give_line_and_column() {
    let cases = [
        ("[machine]\ncpus = 2\nmemory = \"256M\n", 3),
        ("[machine]\n\n[[disk]\nname = \"sd0\"\n", 3),
        ("[[disk]]\nname = \"sd0\"\nname = \"sd1\"\n", 3),
        ("[machine]\ncpus = = 2\n", 2),
    ];
    for (text, line) in cases {
        match parse(text) {
            Err(e @ ConfigError::Syntax { .. }) => {
                let ConfigError::Syntax {
                    line: l, column, ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(*l, line, "{e}");
                assert!(*column >= 1);
                assert!(
                    e.to_string()
                        .starts_with(&format!("config bad.toml: line {line}, column {column}: ")),
                    "{e}"
                );
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

#[test]
fn missing_file_is_an_io_error() {
    let e = MachineSpec::load(
        Some(Path::new("/nonexistent/dvma.toml")),
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::Io { .. }), "{e}");
    assert!(
        e.to_string().starts_with("config /nonexistent/dvma.toml: "),
        "{e}"
    );
    assert_eq!(e.key(), None);
}

#[test]
fn validate_checks_specs_changed_in_code() {
    let mut s = parse(EXAMPLE).unwrap();
    s.validate().unwrap();
    s.ccds[0].components.push("sd0".into());
    let e = s.validate().unwrap_err();
    assert_eq!(e.key(), Some("ccd[0].components[2]"));
}

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    boot: BootArgs,
}

#[test]
fn boot_args_parse() {
    let cli = Cli::try_parse_from([
        "dvma",
        "--config",
        "m.toml",
        "--dvma",
        "shadow",
        "--completion",
        "thread",
        "--spl",
        "mask",
        "--intr-stack",
        "off",
        "--cpus",
        "3",
        "--data-dir",
        "/d",
    ])
    .unwrap();
    assert_eq!(cli.boot.config, Some(PathBuf::from("m.toml")));
    assert_eq!(
        cli.boot.overrides(),
        Overrides {
            dvma: Some(DvmaMode::Shadow),
            completion: Some(Completion::Thread),
            spl: Some(SplImpl::Mask),
            intr_stack: Some(false),
            cpus: Some(3),
            data_dir: Some("/d".into()),
        }
    );
    let none = Cli::try_parse_from(["dvma"]).unwrap();
    assert_eq!(none.boot, BootArgs::default());
    assert_eq!(none.boot.overrides(), Overrides::default());

    let e = Cli::try_parse_from(["dvma", "--dvma", "fast"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("strict, lazy, slots, permanent, shadow"), "{e}");
    let e = Cli::try_parse_from(["dvma", "--completion", "poll"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("intr, softint, thread, ast"), "{e}");
    let e = Cli::try_parse_from(["dvma", "--intr-stack", "yes"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("on, off"), "{e}");
    for bad in ["0", "65", "-1", "x"] {
        let e = Cli::try_parse_from(["dvma".to_owned(), format!("--cpus={bad}")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("from 1 to 64"), "{bad}: {e}");
    }
}

#[test]
fn backing_files_are_created_grown_and_never_truncated() {
    let dir = TempDir::new("backing");
    let text = "[[disk]]\nname = \"sd0\"\nfile = \"sub/sd0.img\"\nsize = \"1M\"\n[[vnd]]\nname = \"vnd0\"\nfile = \"vnd0.img\"\n";
    let ov = Overrides {
        data_dir: Some(dir.path().to_path_buf()),
        ..Overrides::default()
    };
    let s = MachineSpec::from_toml(text, Path::new("t.toml"), Path::new("/"), &ov).unwrap();
    let files = s.backing_files();
    let (sd0, vnd0) = (&files[0], &files[1]);

    // Missing: created sparse with size (and its directory); without a size: refused.
    assert_eq!(sd0.plan(None).unwrap(), BackingPlan::Create { size: M });
    assert_eq!(sd0.prepare().unwrap(), M);
    assert_eq!(std::fs::metadata(&sd0.path).unwrap().len(), M);
    let e = vnd0.prepare().unwrap_err();
    assert_eq!(e.key(), Some("vnd[0].file"));
    assert!(e.to_string().contains("no size is given"), "{e}");

    // Existing, no size: kept.
    std::fs::write(&vnd0.path, vec![7u8; 4096]).unwrap();
    assert_eq!(vnd0.prepare().unwrap(), 4096);
    assert_eq!(std::fs::read(&vnd0.path).unwrap(), vec![7u8; 4096]);

    // Existing, larger size: grown, the data kept.
    let mut grow = vnd0.clone();
    grow.size = Some(8192);
    assert_eq!(
        grow.plan(Some(4096)).unwrap(),
        BackingPlan::Grow {
            from: 4096,
            to: 8192
        }
    );
    assert_eq!(grow.prepare().unwrap(), 8192);
    let data = std::fs::read(&vnd0.path).unwrap();
    assert_eq!(
        (data.len(), &data[..4096], &data[4096..]),
        (8192, &[7u8; 4096][..], &[0u8; 4096][..])
    );

    // Existing, smaller size: refused, the file untouched.
    let mut shrink = vnd0.clone();
    shrink.size = Some(4096);
    let e = shrink.prepare().unwrap_err();
    assert!(matches!(e, ConfigError::Backing { .. }));
    assert_eq!(e.key(), Some("vnd[0].size"));
    assert!(e.to_string().contains("never truncates"), "{e}");
    assert_eq!(std::fs::metadata(&vnd0.path).unwrap().len(), 8192);

    // Not a multiple of the sector: refused.
    std::fs::write(&vnd0.path, [0u8; 1000]).unwrap();
    assert!(
        vnd0.prepare()
            .unwrap_err()
            .to_string()
            .contains("multiple of the 512-byte sector")
    );
}
