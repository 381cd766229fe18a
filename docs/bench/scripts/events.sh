#!/bin/bash
# Host events per request (wake-ups, wake-up IPIs, local timer interrupts,
# hrtimer starts, loopback packets) during a 1 MiB read workload against
# one server: `perf stat -a` on scheduler, IRQ and timer tracepoints over
# 2 s of a 4 s fio run (docs/bench/rtc.md, "seqread under bbr: pacing
# timers and client wake-ups"). Needs /tmp/q1/img (a fully allocated
# 256 MiB file) and the dvma configs of seqread-cpu.sh in /tmp/q1.
# RW, BS, QD override the workload (default read 1m 2).
# usage: events.sh dvma|dvma1|nbdkit|nbdkit1
label=$1; port=$((20000 + RANDOM % 10000))
case $label in
  dvma) /work/main/target/release/dvma serve --config /tmp/q1/d.toml --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  dvma1) /work/main/target/release/dvma serve --config /tmp/q1/d1.toml --listen 127.0.0.1:$port >/dev/null 2>&1 & exp=sd0;;
  nbdkit) nbdkit -f -p $port -t 4 file /tmp/q1/img & exp=;;
  nbdkit1) nbdkit -f -p $port -t 1 file /tmp/q1/img & exp=;;
esac
pid=$!; sleep 0.7
fio --name=t --ioengine=nbd --uri=nbd://127.0.0.1:$port/$exp --rw=${RW:-read} --bs=${BS:-1m} --iodepth=${QD:-2} --size=256M --time_based --runtime=4 --output-format=json > /tmp/q1/fe.json 2>/dev/null & f=$!
sleep 1.5
perf stat -a -x, -e sched:sched_wakeup,sched:sched_switch,irq_vectors:call_function_single_entry,irq_vectors:local_timer_entry,timer:hrtimer_start,net:netif_rx -- sleep 2 2> /tmp/q1/ev.txt
wait $f; kill $pid; wait $pid 2>/dev/null
iops=$(python3 -c 'import json;s=open("/tmp/q1/fe.json").read();j=json.loads(s[s.index("{"):])["jobs"][0];d=j["read"] if j["read"]["iops"]>0 else j["write"];print(d["iops"])')
printf "%-8s iops %6.0f per request:" $label $iops
awk -F, -v n=$(python3 -c "print($iops*2)") '{split($3,a,":"); printf " %s %.2f", a[2], $1/n}' /tmp/q1/ev.txt; echo
