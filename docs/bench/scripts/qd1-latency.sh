#!/bin/bash
# The total latency (submission + completion, fio --lat_percentiles=1) of
# 4 KiB random reads at depth 1, at the 10th..90th and 99th percentiles
# (docs/bench/rtc.md, "qd1: a bimodal latency"). Needs /tmp/q1/img and
# the dvma configs of seqread-cpu.sh in /tmp/q1.
# usage: qd1-latency.sh dvma|dvma1|dvma1np|nbdkit
label=$1; port=$((20000 + RANDOM % 10000))
case $label in
  dvma) /work/main/target/release/dvma serve --config /tmp/q1/d.toml --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  dvma1) /work/main/target/release/dvma serve --config /tmp/q1/d1.toml --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  dvma1np) /work/main/target/release/dvma serve --config /tmp/q1/d1np.toml --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  nbdkit) nbdkit -f -p $port -t 16 file /tmp/q1/img & exp=;;
esac
pid=$!; sleep 0.7
fio --name=t --ioengine=nbd --uri=nbd://127.0.0.1:$port/$exp --rw=randread --bs=4k --iodepth=1 --size=256M --time_based --runtime=2 --ramp_time=0.5 --lat_percentiles=1 --percentile_list=10:20:30:40:50:60:70:80:90:99 --output-format=json > /tmp/q1/fp.json 2>/dev/null
kill $pid; wait $pid 2>/dev/null
python3 - $label <<'PY'
import json, sys
s = open("/tmp/q1/fp.json").read()
j = json.loads(s[s.index("{"):])["jobs"][0]["read"]
p = sorted(j["lat_ns"]["percentile"].items(), key=lambda x: float(x[0]))
print("%-8s iops %6.0f mean %5.1f slat %4.1f | p10..p90,p99 (us): %s" % (sys.argv[1], j["iops"], j["lat_ns"]["mean"] / 1000, j["slat_ns"]["mean"] / 1000, " ".join("%.0f" % (v / 1000) for _, v in p)))
PY
