#!/bin/bash
# 4 KiB random reads at depth 1 against dvma and nbdkit under four host
# idle placements and policies (docs/bench/rtc.md, "qd1: the client's wake-up"):
#   halt   the machine as it is (on the development VM: the guest haltpoll
#          cpuidle driver with guest_halt_poll_ns = 0: an idle CPU halts at
#          once, and waking it takes an IPI to a halted vCPU);
#   poll   guest_halt_poll_ns = 200000 (the Linux default: an idle CPU
#          polls 200 us before it halts);
#   spin   as `halt`, with a nice-19 busy loop that keeps the other host
#          CPU from idling;
#   pin    as `halt`, with the server and fio both pinned to host CPU 0
#          (`taskset -c 0`; dvma with `--cpus 1`): client and server share
#          one core, so neither waits for a halted one.
# Servers: `dvma serve` with no flags, `dvma serve --completion thread`,
# nbdkit's file plugin with -t 16. REPS repetitions (default 5); within one,
# every (policy, server) runs once, in reverse order on odd repetitions.
# Needs root for `poll` (it writes the sysfs parameter and restores it on
# exit). Prints one line per run and a summary: median (min-max) over the
# repetitions of IOPS, total-latency p50 and server CPU per I/O (utime +
# stime over 1 s of the run), and dvma / nbdkit in the same repetition.
# usage: qd1-idle.sh [REPS]
set -u
reps=${1:-5}
dvma=${DVMA:-/work/main/target/release/dvma}
dir=${DIR:-/tmp/q1}
mkdir -p "$dir"
out="$dir/qd1-idle.txt"
: > "$out"
[ -s "$dir/img" ] || head -c 268435456 /dev/urandom > "$dir/img"
printf '[[disk]]\nname = "sd0"\nfile = "%s/img"\n' "$dir" > "$dir/d.toml"
hp=/sys/module/haltpoll/parameters/guest_halt_poll_ns
orig=$(cat $hp 2>/dev/null)
policies="halt poll spin pin"
if [ -z "$orig" ] || ! [ -w $hp ]; then
    echo "qd1-idle: $hp cannot be read or written here: skipping the poll policy" >&2
    policies="halt spin pin"
fi
spin= pid=
cleanup() {
    [ -n "$orig" ] && [ -w $hp ] && echo "$orig" > $hp
    [ -n "$spin" ] && kill "$spin" 2>/dev/null
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

one() { # policy server rep: one line to $out
    local port=$((20000 + RANDOM % 10000)) exp=sd0 f u0 s0 u1 s1 pin= cpus=
    case $1 in
        poll) echo 200000 > $hp;;
        *) [ -n "$orig" ] && [ -w $hp ] && echo "$orig" > $hp;;
    esac
    [ "$1" = spin ] && { nice -n 19 sh -c 'while :; do :; done' & spin=$!; }
    [ "$1" = pin ] && { pin="taskset -c 0"; cpus="--cpus 1"; }
    case $2 in
        dvma) $pin "$dvma" serve --config "$dir/d.toml" $cpus --listen 127.0.0.1:$port >/dev/null 2>&1 & pid=$!;;
        dvma-thread) $pin "$dvma" serve --config "$dir/d.toml" $cpus --completion thread --listen 127.0.0.1:$port >/dev/null 2>&1 & pid=$!;;
        nbdkit) $pin nbdkit -f -p $port -t 16 file "$dir/img" & pid=$!; exp=;;
    esac
    sleep 0.8
    cat "$dir/img" > /dev/null
    $pin fio --name=t --ioengine=nbd --uri=nbd://127.0.0.1:$port/$exp --rw=randread --bs=4k \
        --iodepth=1 --size=256M --time_based --runtime=3 --ramp_time=0.5 --lat_percentiles=1 \
        --output-format=json > "$dir/fio.json" 2>/dev/null & f=$!
    sleep 1.5
    read -r u0 s0 < <(awk '{print $14, $15}' /proc/$pid/stat); sleep 1
    read -r u1 s1 < <(awk '{print $14, $15}' /proc/$pid/stat)
    wait $f
    kill $pid; wait $pid 2>/dev/null; pid=
    [ -n "$spin" ] && { kill "$spin"; wait "$spin" 2>/dev/null; spin=; }
    python3 - "$1" "$2" "$3" $((u1 + s1 - u0 - s0)) "$dir/fio.json" >> "$out" <<'PY'
import json, sys
pol, srv, rep, ticks, path = sys.argv[1:]
s = open(path).read()
j = json.loads(s[s.index("{"):])["jobs"][0]["read"]
# ticks of 10 ms over 1 s: CPU us per I/O = ticks * 1e4 / IOPS
print(f"run {pol} {srv} {rep} {j['iops']:.0f} {j['lat_ns']['percentile']['50.000000'] / 1000:.1f} {int(ticks) * 1e4 / j['iops']:.1f}")
PY
}

runs=()
for p in $policies; do
    for s in dvma dvma-thread nbdkit; do
        [ $p != halt ] && [ $p != poll ] && [ $s = dvma-thread ] && continue
        runs+=("$p $s")
    done
done
for ((r = 0; r < reps; r++)); do
    order=("${runs[@]}")
    if ((r % 2)); then
        order=()
        for ((i = ${#runs[@]} - 1; i >= 0; i--)); do order+=("${runs[i]}"); done
    fi
    for x in "${order[@]}"; do
        one $x $r
        tail -n 1 "$out"
    done
done
python3 - "$out" <<'PY'
import sys
from collections import defaultdict
rows = [l.split()[1:] for l in open(sys.argv[1]) if l.startswith("run ")]
d = defaultdict(dict)
for pol, srv, rep, iops, p50, cpu in rows:
    d[(pol, srv)][int(rep)] = (float(iops), float(p50), float(cpu))
def mm(v, f=None):
    v = sorted(v)
    f = f or (",.1f" if v[0] < 100 else ",.0f")
    return f"{v[len(v) // 2]:{f}} ({v[0]:{f}}-{v[-1]:{f}})"
print("| idle policy | server | IOPS | p50 us | server CPU us/I/O | vs nbdkit |")
print("|---|---|---:|---:|---:|---:|")
for (pol, srv), reps in d.items():
    nb = d.get((pol, "nbdkit"), {})
    ratio = [reps[r][0] / nb[r][0] for r in reps if r in nb] if srv != "nbdkit" else []
    print(f"| {pol} | {srv} | {mm([x[0] for x in reps.values()])} | {mm([x[1] for x in reps.values()])} | "
          f"{mm([x[2] for x in reps.values()])} | {mm(ratio, '.2f') if ratio else ''} |")
PY
