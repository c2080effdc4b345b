"""Share of the time the popular model (model 0) holds 0, 1, 2 or 3 nodes in exo-lb's schedule
(twentieth session). Each node's model is taken as the model of the last request sent to it.

    for s in 1 2 3 4 5 6 7 8; do EXO_LB_SIM_LOG=1 target/release/exo-lb-bench --workload issue \\
      --out /tmp/sl simulate --requests 120 --seeds $s --static-factors 1 --utilizations 0.8 \\
      --switch-factors 1 2> /tmp/sl$s.log > /dev/null; done
    python3 docs/bench/twentieth-session/node_share.py /tmp/sl
"""
import collections
import re
import sys

prefix = sys.argv[1]
held = collections.Counter()
total = 0.0
for seed in range(1, 9):
    nodes, last = [0, 1, 2], 0.0  # node i starts with model i
    for line in open(f"{prefix}{seed}.log"):
        # exo-lb's run comes first; its end is the line with what it learned of the last model.
        if line.startswith("learned") and "deepseek" in line:
            break
        m = re.match(r"\s*([\d.]+) req\s+\d+ \(at\s+[\d.]+\) model (\d) -> node (\d)", line)
        if m:
            t, model, node = float(m.group(1)), int(m.group(2)), int(m.group(3))
            held[nodes.count(0)] += t - last
            total += t - last
            last = t
            nodes[node] = model
print({k: round(v / total, 3) for k, v in sorted(held.items())})
