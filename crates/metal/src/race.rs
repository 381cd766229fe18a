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
//! With `--storm-ms N` each row then allocates for N ms under a storm, a
//! device completing requests and interrupting CPU 0 as fast as it can
//! (`RaceKit::device_tick`), wherever the thread was, as the storm's host
//! thread does on Linux (`dvma race --storm`). With two CPUs or more the
//! device is a kernel thread on CPU 1 and its interrupts are IPIs from
//! there, as on Linux; on one CPU it is the LAPIC timer, interrupting
//! every [`STORM_PERIOD_NS`] and ticking the device in its trap (hardclock
//! stays at its 10 ms).
//!
//! Output: a table on the console, or with `--json` one line
//! `json: [...]` with the fields of `dvma race --json`. Exit status 0 only
//! if every row behaved as the mechanism predicts.
//!
//! # Contexts
//! [`run`] is thread context (the program's kernel thread on CPU 0).

use alloc::string::String;
use alloc::sync::Arc;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering::Relaxed};

use kern::ThreadCtx;
use kern::completion::Completion;
use kern::race::{Protection, RaceKit, RaceRow};
use kern::sched::{kthread_create, yield_now};

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

/// The LAPIC timer's period during a storm.
pub const STORM_PERIOD_NS: u64 = 50_000;

/// Run every row with `iterations` injected allocations each, then
/// `storm_ms` of storm; returns the guest status.
pub fn run(ctx: &ThreadCtx, json: bool, iterations: u32, storm_ms: u64) -> u8 {
    let kit = match RaceKit::attach(0) {
        Ok(k) => Arc::new(k),
        Err(e) => {
            kprintln!("race: {e}");
            return crate::EXIT_FAIL;
        }
    };
    let ncpu = kern::kernel().ncpu();
    let stop = Arc::new(AtomicBool::new(false));
    let mut storm_thread = None;
    if storm_ms > 0 && ncpu >= 2 {
        let (k2, s2) = (kit.clone(), stop.clone());
        match kthread_create(Some(1), "race storm", move |ctx| {
            while !s2.load(Relaxed) {
                if !k2.device_tick() {
                    yield_now(ctx);
                }
            }
        }) {
            Ok(t) => storm_thread = Some(t),
            Err(e) => {
                kprintln!("race: the storm thread: {e}");
                return crate::EXIT_FAIL;
            }
        }
    } else if storm_ms > 0 {
        // SAFETY: detached below, before `kit` is.
        unsafe { crate::intr::set_storm(Some(&kit)) };
        crate::intr::timer_period(STORM_PERIOD_NS);
    }
    let mut rows = alloc::vec::Vec::new();
    if !json {
        kprintln!(
            "{:<10} {:<10} {:>10} {:>8} {:>11} {:>11}  {:<9} result",
            "completion",
            "protection",
            "injections",
            "(storm)",
            "corruptions",
            "completions",
            "expected"
        );
    }
    for p in Protection::ALL {
        for c in Completion::ALL {
            let r = kit.run_row(ctx, c, p, iterations, storm_ms * 1_000_000);
            if !json {
                kprintln!(
                    "{:<10} {:<10} {:>10} {:>8} {:>11} {:>11}  {:<9} {}",
                    r.completion.name(),
                    r.protection.name(),
                    r.injections,
                    r.storm_injections,
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
    stop.store(true, Relaxed);
    if let Some(t) = storm_thread {
        let _ = t.join(ctx);
    } else if storm_ms > 0 {
        crate::intr::timer_period(crate::intr::TICK_NS);
        // SAFETY: detaching; the kit is still alive.
        unsafe { crate::intr::set_storm(None) };
    }
    match Arc::try_unwrap(kit) {
        Ok(k) => k.detach(ctx),
        Err(_) => kprintln!("race: the kit is still shared; not detached"),
    }
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
