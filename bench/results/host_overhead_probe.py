"""Per-call host overhead of the cached forward, before/after the hooks redesign: tiny FLUX (2+6 blocks, 32x32),
CPU, 1 thread, where the host dominates; eager and regional (Inductor default). Prints ms per transformer call."""
import statistics, sys, time, json
import torch
torch.set_num_threads(1)
import dbcache_compile as dbc
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline
lowering = sys.argv[1]
pipe = tiny_flux_pipeline()
calls = []
def pre(*a, **k): calls.append(time.perf_counter())
def post(*a, **k): calls[-1] = time.perf_counter() - calls[-1]
pipe.transformer.register_forward_pre_hook(pre); pipe.transformer.register_forward_hook(post)
kw = {} if lowering == "eager" else dict(mode="default", graph="regional")
dbc.optimize(pipe, cache="F1B0_W2M0MC2_T0O1_R0.4", **kw)
run = lambda: pipe(**flux_inputs(), num_inference_steps=10, generator=torch.Generator().manual_seed(0))
for _ in range(3): run()
s = dbc.summary(pipe); cached = set(s.cached_steps)
hit, miss = [], []
for _ in range(30):
    calls.clear(); run()
    for i, c in enumerate(calls): (hit if i in cached else miss).append(c)
print(json.dumps({"lowering": lowering, "hit_ms_median": round(1e3 * statistics.median(hit), 3), "hit_ms_min": round(1e3 * min(hit), 3), "miss_ms_median": round(1e3 * statistics.median(miss), 3), "miss_ms_min": round(1e3 * min(miss), 3)}))
