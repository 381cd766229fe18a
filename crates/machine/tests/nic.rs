//! The NIC: a socket's readiness ends an idle CPU's `hlt` and becomes the
//! NIC's interrupt on that CPU, with no host thread posting anything.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use kern::ipl::Ipl;
use machine::dev::NicEvent;

use common::{boot_with, wait_until};

struct Seen {
    intrs: AtomicU32,
    cpu: AtomicUsize,
}

#[test]
fn socket_data_wakes_the_sleeping_cpu_with_the_nic_interrupt() {
    // Idle CPUs poll for 1 us and then sleep in their hlt.
    let m = boot_with(2, |c| c.kernel.idle_poll_ns = 1_000);
    let seen = Arc::new(Seen {
        intrs: AtomicU32::new(0),
        cpu: AtomicUsize::new(usize::MAX),
    });
    let s2 = Arc::clone(&seen);
    let v = kern::intr::intr_establish(Ipl::Net, "nic-test", move |_| {
        s2.cpu.store(kern::cpu::curcpu().index(), SeqCst);
        s2.intrs.fetch_add(1, SeqCst);
    })
    .unwrap();
    let nic = m.nic(1).unwrap();
    nic.set_interrupt(v).unwrap();
    let (mut client, server) = UnixStream::pair().unwrap();
    server.set_nonblocking(true).unwrap();
    nic.attach(server.as_raw_fd(), 7).unwrap();
    // Attaching a writable socket reports it once.
    wait_until("the attach's event", || seen.intrs.load(SeqCst) >= 1);
    let mut evs = [NicEvent::default(); 8];
    let n = nic.poll(&mut evs);
    assert_eq!(n, 1, "{:?}", &evs[..n]);
    assert!(evs[0].token == 7 && evs[0].writable && !evs[0].readable);
    // Let CPU 1 go to sleep (nothing else wakes it: the clock ticks on
    // CPU 0), then write from the host.
    wait_until("cpu1 asleep", || m.stats().cpus[1].idle_sleeps > 0);
    std::thread::sleep(Duration::from_millis(20));
    let s0 = m.stats();
    let intrs = seen.intrs.load(SeqCst);
    client.write_all(b"request").unwrap();
    wait_until("the NIC interrupt", || seen.intrs.load(SeqCst) > intrs);
    assert_eq!(
        seen.cpu.load(SeqCst),
        1,
        "the interrupt ran on the NIC's CPU"
    );
    // The idle loop ran it (no signal), and nobody kicked CPU 1 awake:
    // the socket ended its hlt.
    let s1 = m.stats();
    assert!(s1.cpus[1].idle_dispatch > s0.cpus[1].idle_dispatch);
    assert_eq!(s1.cpus[1].kicks_wake, s0.cpus[1].kicks_wake);
    assert_eq!(s1.cpus[1].kicks_intr, s0.cpus[1].kicks_intr);
    let n = nic.poll(&mut evs);
    assert_eq!(n, 1, "{:?}", &evs[..n]);
    assert!(evs[0].token == 7 && evs[0].readable && !evs[0].peer_closed);
    // Edge-triggered: nothing more until something new happens.
    assert_eq!(nic.poll(&mut evs), 0);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    wait_until("the peer's close", || {
        let mut evs = [NicEvent::default(); 8];
        let n = nic.poll(&mut evs);
        n == 1 && evs[0].peer_closed && evs[0].readable
    });
    // Stopped: the socket no longer reaches the CPU.
    nic.stop();
    let intrs = seen.intrs.load(SeqCst);
    drop(client);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(seen.intrs.load(SeqCst), intrs, "a stopped NIC interrupted");
    drop(nic);
    m.shutdown().unwrap();
}

#[test]
fn every_cpu_has_its_own_nic_slots() {
    let m = boot_with(1, |_| {});
    let v = kern::intr::intr_establish(Ipl::Net, "nic-slots", |_| {}).unwrap();
    let nics: Vec<_> = (0..machine::MAX_CPU_DEVICES)
        .map(|_| {
            let n = m.nic(0).unwrap();
            n.set_interrupt(v).unwrap();
            n
        })
        .collect();
    let extra = m.nic(0).unwrap();
    let e = extra.set_interrupt(v).unwrap_err();
    assert!(e.to_string().contains("device slots"), "{e}");
    assert!(m.nic(1).is_err(), "a NIC on a CPU that does not exist");
    drop(nics);
    // Slots come back when NICs stop.
    extra.set_interrupt(v).unwrap();
    drop(extra);
    m.shutdown().unwrap();
}
