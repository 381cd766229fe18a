#!/bin/bash
# Interleaved A,B,A,B: dvma serve with engine threads vs uring, fio 4k randread qd32.
BIN=/work/main/target/tests/dvma
ctx() { local s=0; for f in /proc/$1/task/*/status; do s=$((s + $(awk '/ctxt_switches/{t+=$2} END{print t}' $f 2>/dev/null || echo 0))); done; echo $s; }
port=10950
for engine in threads uring threads uring; do
  port=$((port+1)); d=/tmp/ub/data-$engine-$port; mkdir -p $d
  dd if=/dev/urandom of=$d/sd0.img bs=1M count=128 status=none
  printf '[[disk]]\nname = "sd0"\nfile = "sd0.img"\nsize = "128M"\nengine = "%s"\n' $engine > $d/m.toml
  $BIN serve --config $d/m.toml --data-dir $d --listen 127.0.0.1:$port > $d/serve.log 2>&1 &
  pid=$!
  for i in $(seq 50); do grep -q serving $d/serve.log && break; sleep 0.2; done
  fio --name=w --ioengine=nbd --uri=nbd://127.0.0.1:$port/sd0 --rw=randread --bs=4k --iodepth=32 --size=64M --runtime=2 --time_based --output=/dev/null
  c0=$(ctx $pid)
  fio --name=t --ioengine=nbd --uri=nbd://127.0.0.1:$port/sd0 --rw=randread --bs=4k --iodepth=32 --size=64M --runtime=8 --time_based --output-format=json --output=$d/fio.json
  c1=$(ctx $pid)
  ios=$(python3 -c "import json;j=json.load(open('$d/fio.json'))['jobs'][0]['read'];print(j['total_ios'], round(j['iops']))")
  set -- $ios
  echo "$engine iops=$2 ios=$1 ctxsw=$((c1-c0)) per_io=$(python3 -c "print(round(($c1-$c0)/$1,3))")"
  kill -INT $pid; wait $pid
  rm -f $d/sd0.img
done
