#!/bin/bash
# Two-seed samples (seeds 1-2, 3-4, ..., 63-64) of the issue workload at 80 % in the simulator:
# per switch factor, exo-lb / best static p95 and nginx model / exo-lb p95.
# Run from the repository root after `cargo build --release -p exo-lb-bench`: two-seed-samples.sh OUT
out=$1
: > $out
for a in $(seq 1 2 63); do
  b=$((a+1))
  target/release/exo-lb-bench --workload issue --out /tmp/pair simulate --requests 120 --seeds $a,$b --utilizations 0.8 --switch-factors 0.2,1,2.5,8 --static-factors 1,3,10 2>/dev/null \
    | awk -F'|' -v s="$a,$b" '/^\| 80%/ {gsub(/ /,"",$3); gsub(/ /,"",$11); gsub(/ /,"",$12); print s, $3, $11, $12}' >> $out
done
