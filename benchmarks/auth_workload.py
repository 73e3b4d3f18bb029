"""One run of auth_cost.py's workload in one authentication mode, for timing from outside
(``farm-bench``): ``python benchmarks/auth_workload.py off|tag|curve [REQUESTS]``.
Prints the median step time (ms) past warm-up."""
import statistics
import sys
import tempfile
from pathlib import Path

from auth_cost import MODES

from resilient_ep.config import ResilienceConfig
from resilient_ep.runtime.coordinator import Coordinator
from resilient_ep.runtime.model_builder import make_model
from resilient_ep.runtime.workload import prompts

mode = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
model = make_model(Path(tempfile.gettempdir()) / "rep-auth-cost-model")
cfg = ResilienceConfig().with_overrides(MODES[mode])
with Coordinator(model, num_ranks=4, config=cfg) as c:
    recs = [c.submit(p, 96) for p in prompts(n)]
    for r in recs:
        r.wait(600)
    steps = [s["t1"] - s["t0"] for s in c.steps[20:]]
print(f"{mode} step_ms {statistics.median(steps) * 1e3:.3f}")
