#!/bin/bash
# Server and fio CPU per request for one workload against one server (see
# docs/bench/rtc.md, 'seqread: the gap is TCP's'). Needs /tmp/q1/img (a
# fully allocated 256 MiB file) and the dvma configs it writes in /tmp/q1.
# FIOPIN='taskset -c N' pins fio.
# usage: cpu1.sh dvma|dvma1|nbdkit|nbdkit1 rw bs qd -- server task-clock per request
port=$((20000 + RANDOM % 10000))
case $1 in
  dvma) /work/main/target/release/dvma serve --config /tmp/q1/d.toml --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  dvma1) printf '[machine]\ncpus = 1\n[[disk]]\nname = "sd0"\nfile = "/tmp/q1/img"\n' > /tmp/q1/d1.toml
     /work/main/target/release/dvma serve --config /tmp/q1/d1.toml --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  dvma1np) printf "[machine]\ncpus = 1\nidle_poll_us = 0\n[[disk]]\nname = \"sd0\"\nfile = \"/tmp/q1/img\"\n" > /tmp/q1/d1np.toml
     /work/main/target/release/dvma serve --config /tmp/q1/d1np.toml --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  dvma1t) /work/main/target/release/dvma serve --config /tmp/q1/d1.toml --net threads --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  dvma1p) taskset -c 0 /work/main/target/release/dvma serve --config /tmp/q1/d1.toml --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  nbdkitp) taskset -c 0 nbdkit -f -p $port -t 1 file /tmp/q1/img & exp=;;
  dvmad) /work/main/target/release/dvma serve --config /tmp/q1/dd.toml --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  dvmac) /work/main/target/release/dvma serve --config /tmp/q1/d.toml --tcp-congestion cubic --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  nbdkit) nbdkit -f -p $port -t 4 file /tmp/q1/img & exp=;;
  nbdkit1) nbdkit -f -p $port -t 1 file /tmp/q1/img & exp=;;
esac
pid=$!; sleep 1
cat /tmp/q1/img > /dev/null
$FIOPIN fio --name=t --ioengine=nbd --uri=nbd://127.0.0.1:$port/$exp --rw=$2 --bs=$3 --iodepth=$4 --size=256M --time_based --runtime=4 --ramp_time=0.5 --output-format=json > /tmp/q1/fio.json 2>/dev/null &
f=$!; sleep 1.5
fpid=$(pgrep -n -x fio); perf stat -x, -e task-clock -p $fpid -- sleep 2 2> /tmp/q1/s2.txt & perf stat -x, -e task-clock -p $pid -- sleep 2 2> /tmp/q1/s1.txt; sleep 0.3
wait $f
iops=$(python3 -c 'import json;s=open("/tmp/q1/fio.json").read();j=json.loads(s[s.index("{"):])["jobs"][0];d=j["read"] if j["read"]["iops"]>0 else j["write"];print(d["iops"])')
printf "%-8s %-5s %-3s qd%-2s iops %6.0f server %5.0f fio %5.0f us/req\n" $1 $2 $3 $4 $iops $(awk -F, -v n=$(python3 -c "print($iops*2)") "{print \$1*1000/n}" /tmp/q1/s1.txt) $(awk -F, -v n=$(python3 -c "print($iops*2)") "{print \$1*1000/n}" /tmp/q1/s2.txt)
kill $pid; wait $pid 2>/dev/null
