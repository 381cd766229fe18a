//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the
//! same functions the cargo-fuzz targets call, so that stable CI exercises
//! every input the fuzzers found interesting without needing nightly.

use std::fs;
use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

fn replay(target: &str, run: fn(&[u8])) {
    let inputs = corpus(target);
    for (path, data) in &inputs {
        let result = std::panic::catch_unwind(|| run(data));
        assert!(result.is_ok(), "{target}: {} panicked", path.display());
    }
    println!("{target}: {} inputs replayed", inputs.len());
}

#[test]
fn request_corpus() {
    replay("request", nbd::fuzzing::request_input);
}

#[test]
fn option_corpus() {
    replay("option", nbd::fuzzing::option_input);
}
