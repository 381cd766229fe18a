//! Unit tests of the pieces: sizes, positions, paths, suggestions, the
//! reader's keys against the writer's, backing-file plans. The behaviour
//! of whole files is tested in `tests/config.rs`.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::file::{
    CcdToml, DiskToml, MachineToml, SECTIONS, SizeValue, VndToml, line_col, parse_size,
    relative_to, suggest,
};
use super::resolve::normalize;
use super::*;

#[test]
fn sizes_parse() {
    let t = |s: &str| parse_size(&SizeValue::Text(s.to_owned()));
    assert_eq!(t("4096"), Ok(4096));
    assert_eq!(t("64K"), Ok(64 << 10));
    assert_eq!(t("64k"), Ok(64 << 10));
    assert_eq!(t("256M"), Ok(256 << 20));
    assert_eq!(t("2G"), Ok(2 << 30));
    assert_eq!(parse_size(&SizeValue::Bytes(0)), Ok(0));
    for bad in ["", "M", "12Q", "1.5G", "-1K", " 1K", "1 K", "1KB", "0x10"] {
        let e = t(bad).unwrap_err();
        assert!(e.contains("optional K, M or G suffix"), "{bad}: {e}");
    }
    assert!(t("99999999999999G").unwrap_err().contains("too large"));
    assert!(
        parse_size(&SizeValue::Bytes(-5))
            .unwrap_err()
            .contains("negative")
    );
}

#[test]
fn sizes_print_exactly() {
    for b in [
        0,
        1,
        512,
        1000,
        4096,
        64 << 10,
        1 << 20,
        3 << 20,
        1 << 30,
        (1 << 30) + 512,
        5 << 40,
    ] {
        assert_eq!(parse_size(&SizeValue::of(b)), Ok(b), "{b}");
    }
    assert_eq!(SizeValue::of(64 << 10), SizeValue::Text("64K".into()));
    assert_eq!(SizeValue::of(1 << 30), SizeValue::Text("1G".into()));
    assert_eq!(SizeValue::of(1000), SizeValue::Bytes(1000));
    assert_eq!(SizeValue::of(0), SizeValue::Bytes(0));
}

#[test]
fn lines_and_columns() {
    assert_eq!(line_col("abc", 0), (1, 1));
    assert_eq!(line_col("a\nbc", 3), (2, 2));
    assert_eq!(line_col("é\nxé y", 7), (2, 4));
    assert_eq!(line_col("a", 99), (1, 2));
}

#[test]
fn paths_normalize() {
    assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    assert_eq!(normalize(Path::new("/a/../../c")), PathBuf::from("/c"));
    assert_eq!(
        normalize(Path::new("/d/./x.img")),
        PathBuf::from("/d/x.img")
    );
    assert_eq!(normalize(Path::new("../x")), PathBuf::from("../x"));
    assert_eq!(relative_to(Path::new("/d/x.img"), Path::new("/d")), "x.img");
    assert_eq!(
        relative_to(Path::new("/e/x.img"), Path::new("/d")),
        "/e/x.img"
    );
}

#[test]
fn suggestions() {
    assert_eq!(suggest("dvmaa", DiskToml::KEYS), Some("dvma"));
    assert_eq!(suggest("queue_dept", DiskToml::KEYS), Some("queue_depth"));
    assert_eq!(suggest("disks", &SECTIONS), Some("disk"));
    assert_eq!(suggest("zzzzzzzz", DiskToml::KEYS), None);
}

/// The key lists the reader accepts are the keys the writer writes.
#[test]
fn keys_are_the_serialized_fields() {
    let spec = MachineSpec::from_toml(
        include_str!("../../examples/ccd-vnd.toml"),
        Path::new("ccd-vnd.toml"),
        Path::new("/base"),
        &Overrides::default(),
    )
    .unwrap();
    let table: Table = spec.to_toml().parse().unwrap();
    let keys = |v: &Value| -> Vec<String> { v.as_table().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&table["machine"]), MachineToml::KEYS);
    assert_eq!(keys(&table["disk"][0]), DiskToml::KEYS);
    assert_eq!(keys(&table["ccd"][0]), CcdToml::KEYS);
    assert_eq!(keys(&table["vnd"][0]), VndToml::KEYS);
    assert_eq!(table.keys().cloned().collect::<Vec<_>>(), SECTIONS);
}

fn backing(size: Option<u64>, read_only: bool) -> BackingFile {
    BackingFile {
        device: "sd0".into(),
        key: "disk[0]".into(),
        path: "/d/sd0.img".into(),
        size,
        sector_size: 512,
        read_only,
    }
}

#[test]
fn backing_plans() {
    let rw = |size| backing(size, false);
    assert_eq!(
        rw(Some(M)).plan(None).unwrap(),
        BackingPlan::Create { size: M }
    );
    assert_eq!(
        rw(None).plan(Some(M)).unwrap(),
        BackingPlan::Keep { size: M }
    );
    assert_eq!(
        rw(Some(M)).plan(Some(M)).unwrap(),
        BackingPlan::Keep { size: M }
    );
    assert_eq!(
        rw(Some(2 * M)).plan(Some(M)).unwrap(),
        BackingPlan::Grow { from: M, to: 2 * M }
    );
    let e = rw(Some(M)).plan(Some(2 * M)).unwrap_err();
    assert_eq!(e.key(), Some("disk[0].size"));
    assert!(e.to_string().contains("never truncates"), "{e}");
    assert_eq!(rw(None).plan(None).unwrap_err().key(), Some("disk[0].file"));
    assert_eq!(
        rw(None).plan(Some(1000)).unwrap_err().key(),
        Some("disk[0].file")
    );
    assert_eq!(
        rw(None).plan(Some(0)).unwrap_err().key(),
        Some("disk[0].file")
    );
    let ro = |size| backing(size, true);
    assert_eq!(
        ro(None).plan(Some(M)).unwrap(),
        BackingPlan::Keep { size: M }
    );
    assert!(ro(Some(M)).plan(None).is_err());
    assert!(ro(Some(2 * M)).plan(Some(M)).is_err());
    assert!(ro(Some(M)).plan(Some(2 * M)).is_err());
}

/// Why the reader is not serde derive (module docs): through the `toml`
/// crate, a `deny_unknown_fields` derive reports serde's text and a byte
/// span, but neither the key's path with its index nor a suggestion, both
/// of which the reader gives. If this fails, `toml` has changed and the
/// choice is worth revisiting.
#[test]
fn serde_derive_errors_lack_the_key_path() {
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, reason = "only the errors are looked at")]
    struct Disk {
        name: Option<String>,
        dvma: Option<String>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, reason = "only the errors are looked at")]
    struct File {
        #[serde(default)]
        disk: Vec<Disk>,
    }
    let text = "[[disk]]\nname = \"sd0\"\n\n[[disk]]\nname = \"sd1\"\ndvmaa = \"strict\"\n";
    let e = toml::from_str::<File>(text).unwrap_err();
    assert_eq!(
        e.message(),
        "unknown field `dvmaa`, expected `name` or `dvma`"
    );
    assert!(e.span().is_some());
    let shown = e.to_string();
    assert!(
        !shown.contains("disk[1]") && !shown.contains("did you mean"),
        "{shown}"
    );

    let ours = MachineSpec::from_toml(
        text,
        Path::new("m.toml"),
        Path::new("/base"),
        &Overrides::default(),
    )
    .unwrap_err();
    assert_eq!(ours.key(), Some("disk[1].dvmaa"));
    assert!(ours.to_string().contains("(did you mean dvma?)"), "{ours}");
}
