"""Where the 1B batch-8 decode attention's time goes: microseconds per layer of the split-K kernel at one layer
shape (batch 8, 8 KV heads x 4 query heads each, head dim 64, 2080 cells) for each valid length 1 ... 2048 and
each of seven configurations (chunk / key tile / warps), over 16 layers' distinct KV in one CUDA graph.

A length of 1 shows the launch's fixed cost (6-9 us); 2 warps instead of 4 shows what a narrow head dim wants.

    python benchmarks/attention_warps.py OUT.json      (one GPU; prints a line per case)

Result on the H200 (benchmarks/results/h200/call24-9a42f4f/probe.json): 5.9-8.8 us at length 1; at length 2048
15.5 us (CHUNK 256 / BLOCK_N 64, 2 warps) against 18.5 us (the 4-warp default) and 17.8 us (512/64, the best
4-warp one), which is why the tuner now also chooses among two 2-warp configurations (kernels.ATTENTION_CONFIGS).
"""

from __future__ import annotations

import json
import sys

import torch
import triton

from pytest_kvcache import kernels
from pytest_kvcache.split_k import graph_ms

BATCH, KV_HEADS, GROUP, DIM, CELLS, LAYERS = 8, 8, 4, 64, 2080, 16
LENGTHS = (1, 64, 256, 1024, 2048)
CONFIGS = {
    "256/64": kernels.DEFAULT_CONFIG,
    "512/64/3": triton.Config({"CHUNK": 512, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    "64/64": triton.Config({"CHUNK": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    "128/64/2w": triton.Config({"CHUNK": 128, "BLOCK_N": 64}, num_warps=2, num_stages=2),
    "256/64/2w": triton.Config({"CHUNK": 256, "BLOCK_N": 64}, num_warps=2, num_stages=3),
    "256/128/2w": triton.Config({"CHUNK": 256, "BLOCK_N": 128}, num_warps=2, num_stages=2),
    "2048/64": triton.Config({"CHUNK": 2048, "BLOCK_N": 64}, num_warps=4, num_stages=3),
}


def main(out_path: str) -> int:
    if not torch.cuda.is_available():
        print("attention_warps.py needs a CUDA device", file=sys.stderr)
        return 2
    keys = [torch.randn(BATCH, KV_HEADS, CELLS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    values = [torch.randn_like(k) for k in keys]
    q = torch.randn(BATCH, KV_HEADS * GROUP, DIM, device="cuda", dtype=torch.bfloat16)
    workspace = kernels.DecodeWorkspace(BATCH, KV_HEADS, GROUP, DIM, CELLS, torch.device("cuda"))
    out = torch.empty_like(q)
    counter = torch.zeros(1, device="cuda")
    report = {"empty_add_x16_us": graph_ms(lambda: [counter.add_(1) for _ in range(LAYERS)]) * 1e3 / LAYERS}
    for length in LENGTHS:
        lengths = torch.full((BATCH,), length, device="cuda", dtype=torch.int32)
        for name, config in CONFIGS.items():
            try:
                def layers(c=config, n=lengths) -> None:
                    for k, v in zip(keys, values):
                        kernels.decode_attention(q, k, v, n, DIM**-0.5, workspace, out, config=c)

                us = graph_ms(layers) * 1e3 / LAYERS
            except (RuntimeError, triton.runtime.errors.OutOfResources) as failure:  # recorded, not fatal
                us = repr(failure)[:100]
            report[f"len{length} {name}"] = us
            print(length, name, us, flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
