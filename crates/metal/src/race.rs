//! `race`: the 1995 malloc race of `kern::race` on metal, every completion
//! mode under every protection, the same rows as `dvma race` on Linux.
//!
//! The injection is kern's own (`RaceKit`): inside the allocator, between
//! reading and writing back a free-list head, the pseudo-device completes a
//! request and posts its interrupt on this CPU. On Linux a signal to the
//! vCPU's own thread lands right there; here the post is a self-IPI, which
//! `MetalMd::kick` waits for until the APIC has delivered it, so it is
//! taken right there too, on the IST stack, and the `ast` completion's
//! frame is pushed onto the interrupted allocation's own stack through the
//! `iretq` frame.
//!
//! There is no storm device on metal (`dvma race --storm`): each row is
//! the deterministic injections only, so `storm_injections` is 0.
//!
//! Output: a table on the console, or with `--json` one line
//! `json: [...]` with the fields of `dvma race --json`. Exit status 0 only
//! if every row behaved as the mechanism predicts.
//!
//! # Contexts
//! [`run`] is thread context (the program's kernel thread on CPU 0).

use alloc::string::String;
use core::fmt::Write;

use kern::ThreadCtx;
use kern::completion::Completion;
use kern::race::{Protection, RaceKit, RaceRow};

/// JSON string literal of `s`.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn row_json(out: &mut String, r: &RaceRow) {
    let _ = write!(
        out,
        "{{\"completion\":\"{}\",\"protection\":\"{}\",\"injections\":{},\"corruptions\":{},\
         \"expected_corrupt\":{},\"storm_injections\":{},\"completions\":{},\"ok\":{},\
         \"first_corruption\":",
        r.completion.name(),
        r.protection.name(),
        r.injections,
        r.corruptions,
        r.expected_corrupt,
        r.storm_injections,
        r.completions,
        r.ok()
    );
    match &r.first_corruption {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
    out.push('}');
}

/// Run every row with `iterations` injected allocations each; returns the
/// guest status.
pub fn run(ctx: &ThreadCtx, json: bool, iterations: u32) -> u8 {
    let kit = match RaceKit::attach(0) {
        Ok(k) => k,
        Err(e) => {
            kprintln!("race: {e}");
            return crate::EXIT_FAIL;
        }
    };
    let mut rows = alloc::vec::Vec::new();
    if !json {
        kprintln!(
            "{:<10} {:<10} {:>10} {:>11} {:>11}  {:<9} result",
            "completion",
            "protection",
            "injections",
            "corruptions",
            "completions",
            "expected"
        );
    }
    for p in Protection::ALL {
        for c in Completion::ALL {
            let r = kit.run_row(ctx, c, p, iterations, 0);
            if !json {
                kprintln!(
                    "{:<10} {:<10} {:>10} {:>11} {:>11}  {:<9} {}",
                    r.completion.name(),
                    r.protection.name(),
                    r.injections,
                    r.corruptions,
                    r.completions,
                    if r.expected_corrupt {
                        "corrupt"
                    } else {
                        "clean"
                    },
                    if r.ok() { "ok" } else { "MISMATCH" }
                );
            }
            rows.push(r);
        }
    }
    kit.detach(ctx);
    let all_ok = rows.iter().all(RaceRow::ok);
    if json {
        let mut out = String::from("json: [");
        for (i, r) in rows.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            row_json(&mut out, r);
        }
        out.push(']');
        kprintln!("{out}");
    } else if all_ok {
        kprintln!("every row behaved as the mechanism predicts.");
    } else {
        kprintln!("SOME ROWS DID NOT BEHAVE AS PREDICTED (marked MISMATCH).");
    }
    if all_ok { 0 } else { crate::EXIT_FAIL }
}
