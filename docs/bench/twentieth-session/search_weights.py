"""Random search over the scheduling rule's weights (twentieth session; an experiment, not shipped).

Build the bench with the weights read from the environment, then run this from the repo root:
    git apply docs/bench/twentieth-session/weights-as-knobs.patch
    cargo build --release -p exo-lb-bench && mkdir -p /tmp/exp/rs
    cp target/release/exo-lb-bench /tmp/exp/bench-knob
    python3 docs/bench/twentieth-session/search_weights.py SEED TRIALS > out.jsonl
    git checkout filter/src/logic/schedule.rs
Each line: the weights tried (trial 0: none, the shipped rule), the nginx model / exo-lb p95
ratio at 80 % load for switch times 0.2x, 1x, 2.5x over seeds 1-32, and their geometric mean.
Weights (default in brackets): K_AWAY [2] the switch-there-and-back time an only copy's arrivals
are counted over; K_LIKELY [1] the weight of the likely switch back; K_EVICT2 [1] the weight of
the drain lost by evicting one of several serving copies; K_HORIZON [8] generations of growth;
K_HALF [0.5] the share of a generation added to a warm queue's drain; K_SWITCH [1] the weight of
the switch cost; K_COLD [0: never] a model no node has: its drain taken as K_COLD x (oldest wait
+ queued work) instead of forever (draws under 0.3 are taken as 0).
"""
import random, subprocess, os, math, json, sys
from concurrent.futures import ThreadPoolExecutor
SEEDS=','.join(str(i) for i in range(1,33))
def run(knobs, tag):
    env=dict(os.environ); env.update({k:str(v) for k,v in knobs.items()})
    out=subprocess.run(['/tmp/exp/bench-knob','--workload','issue','--out','/tmp/exp/rs/'+tag,'simulate','--requests','120','--seeds',SEEDS,'--static-factors','1','--utilizations','0.8','--switch-factors','0.2,1,2.5'],env=env,capture_output=True,text=True).stdout
    r=[float(l.split('|')[-2]) for l in out.splitlines() if l.startswith('| 80%')]
    return r
space={'K_AWAY':(0.5,4),'K_LIKELY':(0,2.5),'K_EVICT2':(0.5,3),'K_HORIZON':(4,16),'K_HALF':(0,1),'K_SWITCH':(0.75,2),'K_COLD':(0,2)}
random.seed(int(sys.argv[1]) if len(sys.argv)>1 else 1)
trials=[{}]+[{k:round(random.uniform(*v),2) for k,v in space.items()} for _ in range(int(sys.argv[2]) if len(sys.argv)>2 else 40)]
for t in trials:
    if t.get('K_COLD',1)<0.3: t['K_COLD']=0
def job(i):
    r=run(trials[i],'t%d'%i)
    g=math.exp(sum(math.log(x) for x in r)/len(r)) if r else 0
    line=json.dumps({'i':i,'knobs':trials[i],'r':r,'g':round(g,4)})
    print(line,flush=True)
with ThreadPoolExecutor(2) as ex:
    list(ex.map(job,range(len(trials))))
