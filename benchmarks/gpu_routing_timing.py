"""GPU timings of the routing table: in-place update and select (run on a CUDA machine).

    PYTHONPATH=src python benchmarks/gpu_routing_timing.py
"""
import json

import torch
from cuda_timing import cuda_seconds

from resilient_ep.placement import place, replan
from resilient_ep.routing import RoutingTable

dev = torch.device("cuda")
L, E, R, S = 61, 256, 32, 9
lay = place(num_layers=L, num_experts=E, num_ranks=R, slots_per_rank=S, num_nodes=4, max_replicas=4)
table = RoutingTable(lay, device=dev)
ids = torch.randint(0, E, (4096, 8), device=dev)
live = torch.ones(R, dtype=torch.bool); live[3] = False
res = replan(lay, [3])

def timeit(fn, n=50):
    return cuda_seconds(fn, n, warmup=5) * 1e3

out = {
    "device": torch.cuda.get_device_name(),
    "update_mask_ms": timeit(lambda: table.update(live_mask=live, epoch=1)),
    "update_layout_ms": timeit(lambda: table.update(res.repaired_layout, live, epoch=2)),
    "select_4096x8_one_layer_ms": timeit(lambda: table.select(0, ids)),
}
g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3):
        sel = table.select(0, ids)
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g):
    sel = table.select(0, ids)
out["select_graph_replay_ms"] = timeit(lambda: g.replay(), n=200)
print(json.dumps(out))
