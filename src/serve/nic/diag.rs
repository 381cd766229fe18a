//! What the NIC channel does beside the data path: the watchdog that
//! applies the deadlines, and the state dump that SIGUSR1 prints.

#[allow(clippy::wildcard_imports)]
use super::*;

impl NicChannel {
    /// The channel's state, one line per CPU and per connection (for
    /// SIGUSR1: what a stuck connection waits for).
    pub(in crate::serve) fn dump(&self) -> String {
        let mut s = String::new();
        for (i, pc) in self.cpus.iter().enumerate() {
            s += &format!(
                "nic{i}: {} parsed, {} stalled, retry {}\n",
                pc.nreqs.load(SeqCst),
                lock(&pc.stalled).len(),
                pc.retry.load(SeqCst)
            );
        }
        let conns: Vec<Arc<NConn>> = self
            .conns
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for c in conns {
            // Never `c.rx` itself: its holder must look again for any
            // receive that found it taken, and this dump would not (a
            // SIGUSR1 during traffic lost a request's arrival that way).
            let stage = c.rx_view.describe();
            let tx = lock(&c.tx);
            s += &format!(
                "  conn{} on nic{}: rx {stage}, {} in flight, {} credits held, {} replies queued ({} sent of the first), listed stalled {}, done {}\n",
                c.id,
                c.nic,
                c.inflight.load(SeqCst),
                c.held.load(SeqCst),
                tx.q.len(),
                tx.sent,
                c.stalled.load(SeqCst),
                c.rx_done.load(SeqCst),
            );
        }
        s
    }

    /// Once a second: deadlines (`--io-timeout` for a begun request and for
    /// owed replies, `--idle-timeout`), and a nudge for every NIC so that
    /// nothing waits on a lost event.
    pub(super) fn watchdog(&self) {
        let sh = self.sh();
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let now = self.now_ms();
            let io = sh.io_timeout.as_millis() as u64;
            let idle = sh.idle_timeout.map(|d| d.as_millis() as u64);
            let conns: Vec<Arc<NConn>> = self
                .conns
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .cloned()
                .collect();
            for c in conns {
                let l = c.linger.load(SeqCst);
                if l != 0 {
                    if now.saturating_sub(l) > LINGER_MS {
                        self.drop_conn(&c);
                    }
                    continue;
                }
                let late = |t: &AtomicU64| {
                    let t = t.load(Relaxed);
                    t != 0 && now.saturating_sub(t) > io
                };
                if late(&c.rx_since) || late(&c.tx_since) {
                    let _ = c.sock.shutdown(Shutdown::Both);
                    continue;
                }
                if let Some(idle) = idle
                    && !c.rx_done.load(SeqCst)
                    && c.inflight.load(SeqCst) == 0
                    && c.held.load(Relaxed) == 0
                    && now.saturating_sub(c.active.load(Relaxed)) > idle
                {
                    eprintln!(
                        "dvma: closing a connection idle for {:?} (--idle-timeout)",
                        sh.idle_timeout.unwrap_or_default()
                    );
                    c.active.store(now, Relaxed);
                    let _ = c.sock.shutdown(Shutdown::Both);
                }
            }
        }
    }
}
