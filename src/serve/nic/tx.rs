//! Transmission on the run-to-completion path: replies leave from kernel
//! context with a non-blocking `writev`, gathered.
//!
//! # Transmit coalescing
//! A reply is queued on its connection. If its CPU has more requests of
//! the burst to serve (its request queue is not empty), the reply is held
//! back ([`NicChannel::defer`]) and leaves with the next ones in one
//! `writev`: one send, and one wake-up of the client, for many replies (as
//! TCP autocorking and NAPI's batched transmit do). Held-back replies leave
//! when the burst ends, whichever comes first:
//! - the CPU's request queue is empty when a reply is queued, or when a
//!   blksrv thread looks for work (`take`);
//! - the next request may sleep (a flush, a transfer of
//!   [`TX_DEFER_BYTES`] or more): they leave before it is served;
//! - the CPU runs out of runnable threads: its `nictx` kernel thread, woken
//!   (queued behind the others: the kernel is not preemptive) when the
//!   first reply is held back, sends them;
//! - [`TX_DEFER`] replies are held on the CPU.
//!
//! Only a CPU's own connections are held back, by that CPU's threads; no
//! interrupt handler touches the held-back list.
//!
//! # Contexts
//! Kernel threads (blksrv, `nictx`), inside `no_ast` regions (module docs
//! of [`super`]).

use std::io::{self, IoSlice, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering::*;

use kern::blksrv::ReqOp;
use kern::vm::IoBuf;

use super::{NConn, NicChannel, Out, TX_BATCH, TX_DEFER, TX_DEFER_BYTES, lock};
use crate::serve::ServeError;

impl NicChannel {
    /// Start one `nictx` kernel thread per CPU: it sends the replies its
    /// CPU held back once the CPU has nothing else to run. Thread or host
    /// context, after boot.
    pub(in crate::serve) fn attach_tx(&'static self) -> Result<(), ServeError> {
        for cpu in 0..self.cpus.len() {
            kern::sched::kthread_create(Some(cpu), "nictx", move |ctx| self.tx_thread(ctx, cpu))
                .map_err(|source| ServeError::NicTx { cpu, source })?;
        }
        Ok(())
    }

    /// `nictx`: runs when its CPU's other threads sleep (the kernel is not
    /// preemptive and it was queued behind them), so it ends a burst.
    pub(super) fn tx_thread(&self, ctx: &kern::ctx::ThreadCtx, cpu: usize) {
        let pc = &self.cpus[cpu];
        let mut seen = 0u32;
        loop {
            {
                let _na = kern::ast::no_ast();
                self.flush_deferred(cpu);
            }
            let g = pc.tx_work.lock();
            if *g != seen {
                seen = *g;
                continue;
            }
            if kern::sched::sleep_interlocked(ctx, kern::sched::wchan(&pc.tx_work), g).is_err() {
                let _na = kern::ast::no_ast();
                self.flush_deferred(cpu);
                return;
            }
        }
    }

    /// Send every reply CPU `cpu` held back.
    pub(super) fn flush_deferred(&self, cpu: usize) {
        let pc = &self.cpus[cpu];
        if pc.ndeferred.load(Acquire) == 0 {
            return;
        }
        let v = std::mem::take(&mut *lock(&pc.deferred));
        pc.ndeferred.store(0, Release);
        for c in v {
            c.tx_deferred.store(false, SeqCst);
            self.transmit(&c);
        }
    }

    /// Hold `c`'s queued replies back on CPU `me` if it has more requests
    /// to serve (their replies will leave together); false: send now.
    pub(super) fn defer(&self, me: usize, c: &Arc<NConn>, bytes: u64) -> bool {
        let pc = &self.cpus[me];
        if me != c.nic
            || bytes >= TX_DEFER_BYTES
            || pc.nreqs.load(Acquire) == 0
            || pc.ndeferred.load(Relaxed) >= TX_DEFER
        {
            return false;
        }
        pc.ndeferred.fetch_add(1, AcqRel);
        if !c.tx_deferred.swap(true, SeqCst) {
            let first = {
                let mut d = lock(&pc.deferred);
                d.push(Arc::clone(c));
                d.len() == 1
            };
            if first {
                // Queue `nictx` behind this CPU's runnable threads.
                let mut g = pc.tx_work.lock();
                *g = g.wrapping_add(1);
                drop(g);
                kern::sched::wakeup_one_on(kern::sched::wchan(&pc.tx_work), me);
            }
        }
        true
    }

    /// Queue a reply and send what the socket takes.
    pub(super) fn queue(&self, c: &Arc<NConn>, out: Out) {
        lock(&c.tx).q.push_back(out);
        self.transmit(c);
    }

    /// Send queued replies until the socket would block; free what was
    /// sent (or, on a broken socket, everything).
    pub(super) fn transmit(&self, c: &Arc<NConn>) {
        let sh = self.sh();
        let mut done: Vec<Out> = Vec::new();
        {
            let mut tx = lock(&c.tx);
            while !tx.q.is_empty() && !tx.broken {
                let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(TX_BATCH * 2);
                for o in tx.q.iter().take(TX_BATCH) {
                    match o {
                        Out::Local(b, _) => iov.push(IoSlice::new(b)),
                        Out::Done(r, head) => {
                            iov.push(IoSlice::new(head));
                            if r.error.is_none() && r.op == ReqOp::Read {
                                for ch in &r.chunks {
                                    iov.push(IoSlice::new(ch.as_slice()));
                                }
                            }
                        }
                    }
                }
                let mut skip = tx.sent;
                let mut first = 0;
                while first < iov.len() && skip >= iov[first].len() {
                    skip -= iov[first].len();
                    first += 1;
                }
                let r = {
                    let mut iov = &mut iov[first..];
                    if skip > 0 {
                        IoSlice::advance_slices(&mut iov, skip);
                    }
                    (&c.sock).write_vectored(iov)
                };
                drop(iov);
                match r {
                    Ok(0) => tx.broken = true,
                    Ok(n) => {
                        sh.stats.tx_sends.fetch_add(1, Relaxed);
                        c.active.store(self.now_ms(), Relaxed);
                        let mut n = tx.sent + n;
                        while let Some(o) = tx.q.front() {
                            let len = out_len(o);
                            if n < len {
                                break;
                            }
                            n -= len;
                            done.push(tx.q.pop_front().expect("front"));
                        }
                        tx.sent = n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if c.tx_since.load(Relaxed) == 0 {
                            c.tx_since.store(self.now_ms(), Relaxed);
                        }
                        break;
                    }
                    Err(_) => tx.broken = true,
                }
            }
            if tx.broken {
                done.extend(tx.q.drain(..));
                tx.sent = 0;
                c.rx_done.store(true, SeqCst);
            }
            if tx.q.is_empty() {
                c.tx_since.store(0, Relaxed);
            }
        }
        if done.is_empty() {
            return;
        }
        let (mut freed, mut served) = (0u64, 0u64);
        for o in done {
            match o {
                Out::Local(_, held) => freed += held,
                Out::Done(r, _) => {
                    sh.stats.served(&r);
                    freed += sh.budget.charge(r.op, r.len, c.p.max_transfer);
                    served += 1;
                }
            }
        }
        // Credits back before the in-flight count drops (as the writer).
        sh.budget.release(&c.held, freed);
        c.inflight.fetch_sub(served, SeqCst);
        if c.rx_done.load(SeqCst) {
            self.maybe_finish(c);
        }
    }
}

fn out_len(o: &Out) -> usize {
    match o {
        Out::Local(b, _) => b.len(),
        Out::Done(r, head) => {
            head.len()
                + if r.error.is_none() && r.op == ReqOp::Read {
                    r.chunks.iter().map(IoBuf::len).sum()
                } else {
                    0
                }
        }
    }
}
