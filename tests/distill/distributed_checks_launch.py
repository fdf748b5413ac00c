"""Checks that need a real process group, run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo).

    accelerate launch ... tests/distill/distributed_checks_launch.py <output folder>

Each process writes ``<output folder>/rank<i>.pt`` with what it saw; `test_distributed.py` compares them with a
single-process run.
"""

import sys
from pathlib import Path

import torch

from diffusers_qalora.distill.distributed import (
    DistributedPhaseError,
    broadcast_module_state,
    distributed_phase,
    make_accelerator,
    release_process_group,
)
from diffusers_qalora.evaluation.metrics import digits_fid
from diffusers_qalora.evaluation.report import evaluate_seeds
from diffusers_qalora.testbed import load_testbed

out = Path(sys.argv[1])
acc = make_accelerator(out, collective_timeout=20)
rank = acc.process_index
seen = {}

# 1. Processes in different phases are told so, by name, instead of deadlocking.
try:
    with distributed_phase(f"phase of process {rank}"):
        pass
except DistributedPhaseError as err:
    seen["mismatch"] = str(err)

# 2. The main process scores alone while the other waits at a barrier: the metric must not synchronise.
testbed = load_testbed()
if rank == 0:
    seen["fid_main_only"] = digits_fid(
        testbed.reference_images[:40], testbed.reference_images[40:80], testbed.classifier
    )
acc.wait_for_everyone()

# 3. Evaluation spread over the processes returns the one-process samples and scores on every process.
summary = evaluate_seeds(
    testbed.pipeline, testbed.classifier, testbed.reference_images, [0], 7, 2, show_progress=False, distributed=True
)
seen["samples"] = summary["samples"][0]
seen["fid"] = summary["fid_mean"]

# 4. The broadcast gives every process the main process's adapter state (bool buffers included).
layer = torch.nn.Linear(3, 3)
layer.register_buffer("flag", torch.tensor([rank == 0]))
with torch.no_grad():
    layer.weight.fill_(float(rank))
seen["broadcast_count"] = broadcast_module_state(layer)
seen["weight_after_broadcast"] = layer.weight.detach().clone()
seen["flag_after_broadcast"] = layer.flag.clone()

with distributed_phase("save"):
    torch.save(seen, out / f"rank{rank}.pt")
    acc.wait_for_everyone()

# Without this, a gloo group left to the interpreter's exit can abort a process that finished its work.
release_process_group()
