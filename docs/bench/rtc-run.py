#!/usr/bin/env python3
"""Interleaved comparison: dvma serve (run to completion and threaded) vs nbdkit and qemu-nbd.

Every server serves the same fully allocated file (random bytes, written
before the run), whose page cache is filled before every run. Each repetition runs every server once per workload, in
the same order (A, B, C, ... A, B, C ...), so slow drifts of the shared
host hit all of them alike. Reported: the median of the repetitions and the
min-max, IOPS and p50 of the total latency (--lat_percentiles=1) from fio's nbd engine, host context switches
per I/O (every thread of the server, sampled between 0.5 s into the run and
0.5 s before its end) and server CPU per I/O (utime + stime).

usage: rtc-run.py [--reps N] [--runtime S] [--bin PATH] [--out FILE] [--servers a,b] [--workloads a,b]
"""
import argparse, json, os, signal, socket, statistics, subprocess, sys, tempfile, time

WORKLOADS = {
    "randread-4k-qd1": ("randread", "4k", 1),
    "randread-4k-qd32": ("randread", "4k", 32),
    "randwrite-4k-qd32": ("randwrite", "4k", 32),
    "seqread-1m-qd8": ("read", "1m", 8),
    "seqwrite-1m-qd8": ("write", "1m", 8),
}
SIZE_MB = 256
CLK = os.sysconf("SC_CLK_TCK")


def dvma_cfg(d, name, machine, disk):
    p = os.path.join(d, f"{name}.toml")
    with open(p, "w") as f:
        if machine:
            f.write("[machine]\n" + machine + "\n")
        f.write(disk + "\n")
    return p


def servers(d, img, binary):
    disk = f'[[disk]]\nname = "sd0"\nfile = "{img}"\n'
    dv = lambda name, machine, extra_disk="", args=(): (
        [binary, "serve", "--config", dvma_cfg(d, name, machine, disk + extra_disk), *args, "--listen", "127.0.0.1:{port}"],
        "sd0",
    )
    s = {
        # `dvma serve` with no flags: as many vCPUs as host cores, --net poll,
        # engine uring, idle_poll_us 50.
        "dvma-default": dv("default", ""),
        "dvma-1cpu": dv("1cpu", "cpus = 1"),
        # The previous default: threaded transmission, worker-thread engine,
        # 5 us idle poll.
        "dvma-before": dv("before", "idle_poll_us = 5", 'engine = "threads"\n', ("--net", "threads")),
    }
    for t in (4, 16):
        s[f"nbdkit-t{t}"] = (["nbdkit", "-f", "-p", "{port}", "-t", str(t), "file", img], "")
    for aio, cache in (("threads", "writeback"), ("io_uring", "writeback"), ("io_uring", "none")):
        s[f"qemu-nbd-{aio}-{cache}"] = (
            ["qemu-nbd", "-f", "raw", "-p", "{port}", "-b", "127.0.0.1", "-x", "sd0", "--shared=64", "-t",
             f"--aio={aio}", f"--cache={cache}", img],
            "sd0",
        )
    return s


def free_port():
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


def wait_port(port, proc, secs=20):
    t = time.time()
    while time.time() - t < secs:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not listen")


def switches(pid, seen):
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                n = 0
                for l in open(f"/proc/{pid}/task/{tid}/status"):
                    if "ctxt_switches" in l:
                        n += int(l.split()[1])
                seen[tid] = n
            except OSError:
                pass
    except OSError:
        pass
    return sum(seen.values())


def cputime(pid):
    f = open(f"/proc/{pid}/stat").read()
    f = f[f.rfind(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / CLK


def warm(img):
    # The file's page cache as every server finds it: full. (qemu-nbd
    # --cache=none writes with O_DIRECT, which drops the cached pages it
    # writes; whichever server ran next read them from the disk.)
    with open(img, "rb") as f:
        while f.read(1 << 20):
            pass


def run_one(cmd, export, wl, runtime, img):
    warm(img)
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in cmd]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        rw, bs, qd = WORKLOADS[wl]
        uri = f"nbd://127.0.0.1:{port}/{export}"
        fio = subprocess.Popen(
            ["fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
             f"--size={SIZE_MB}M", "--time_based", f"--runtime={runtime}", "--ramp_time=0.5", "--lat_percentiles=1", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(1.0)
        seen = {}
        c0, u0, t0 = switches(proc.pid, seen), cputime(proc.pid), time.time()
        time.sleep(max(runtime - 1.0, 0.5))
        c1, u1, t1 = switches(proc.pid, seen), cputime(proc.pid), time.time()
        out, _ = fio.communicate(timeout=runtime + 60)
        j = json.loads(out[out.index("{"):])["jobs"][0]
        side = j["read"] if j["read"]["iops"] > 0 else j["write"]
        iops = side["iops"]
        ios = iops * (t1 - t0)
        return {
            "iops": iops,
            "p50_us": side["lat_ns"]["percentile"]["50.000000"] / 1000,
            "cs_per_io": (c1 - c0) / max(ios, 1),
            "cpu_us_per_io": (u1 - u0) * 1e6 / max(ios, 1),
        }
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--runtime", type=float, default=3)
    ap.add_argument("--bin", default="target/release/dvma")
    ap.add_argument("--out", default="rtc-results.json")
    ap.add_argument("--servers", default="")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="rtc-")
    img = os.path.join(d, "disk.img")
    subprocess.run(["dd", "if=/dev/urandom", f"of={img}", "bs=1M", f"count={SIZE_MB}", "status=none"], check=True)
    subprocess.run(["sync"])
    all_s = servers(d, img, os.path.abspath(a.bin))
    names = [n for n in all_s if not a.servers or n in a.servers.split(",")]
    wls = a.workloads.split(",")
    res = {w: {n: [] for n in names} for w in wls}
    for r in range(a.reps):
        for w in wls:
            for n in names:
                cmd, export = all_s[n]
                try:
                    m = run_one(cmd, export, w, a.runtime, img)
                except Exception as e:  # noqa: BLE001 - a failed run is reported, not hidden
                    print(f"rep {r} {w} {n}: FAILED {e}", flush=True)
                    continue
                res[w][n].append(m)
                print(f"rep {r} {w:18} {n:26} {m['iops']:9.0f} IOPS p50 {m['p50_us']:7.1f} us "
                      f"cs/io {m['cs_per_io']:.3f} cpu/io {m['cpu_us_per_io']:.1f} us", flush=True)
    json.dump({"reps": a.reps, "runtime": a.runtime, "results": res}, open(a.out, "w"), indent=1)
    print()
    for w in wls:
        print(f"## {w}")
        peers = [n for n in names if not n.startswith("dvma")]
        best_peer = max(peers, key=lambda n: statistics.median(x["iops"] for x in res[w][n]) if res[w][n] else 0) if peers else None
        for n in names:
            xs = res[w][n]
            if not xs:
                continue
            io = [x["iops"] for x in xs]
            line = (f"{n:26} IOPS median {statistics.median(io):9.0f} (min {min(io):.0f} max {max(io):.0f})"
                    f" p50 {statistics.median(x['p50_us'] for x in xs):7.1f} us"
                    f" cs/io {statistics.median(x['cs_per_io'] for x in xs):.3f}"
                    f" cpu/io {statistics.median(x['cpu_us_per_io'] for x in xs):.1f} us")
            if best_peer and res[w][best_peer] and n.startswith("dvma"):
                # Ratio per repetition against the best peer's run of the same repetition.
                pairs = [x["iops"] / y["iops"] for x, y in zip(xs, res[w][best_peer])]
                line += f"  vs {best_peer}: {statistics.median(pairs):.2f} ({min(pairs):.2f}-{max(pairs):.2f})"
            print(line)
        print()


if __name__ == "__main__":
    sys.exit(main())
