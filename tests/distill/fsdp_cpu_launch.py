"""QALoRA distillation steps under torch's FSDP2 (``fully_shard``) on CPU processes (gloo), for `test_distributed.py`.

    python -m torch.distributed.run --nproc_per_node 2 tests/distill/fsdp_cpu_launch.py <output file> <steps>
    python tests/distill/fsdp_cpu_launch.py <output file> <steps>          # the unsharded reference, one process

Each process shards the student (the QALoRA UNet) and runs the teacher as the same sharded model with its adapters
switched off, on its share of a global batch drawn identically everywhere; the one-process reference trains on the
whole batch.  FSDP2 refuses 0-d parameters (the per-tensor activation step sizes and zero points), so they are left
out of the sharding (``ignored_params``: replicated) and their gradients averaged by a hook as each is
accumulated (averaging them after ``backward()`` returns came too early: FSDP2 had not yet written them).  Process 0 writes the
gathered (full) adapter state to ``<output file>``.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel

import diffusers_qalora as dq

GLOBAL_BATCH = 4


def build():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=10,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(4)
    table = sorted(float(t) for t in scheduler.timesteps)
    model = dq.get_qalora_model(unet, dq.QALoraConfig(r=4, weight_bits=4, act_bits=4, timesteps=table))
    with torch.no_grad():  # a non-zero B, so that the LoRA A factors get gradients from the first step on
        for name, p in model.named_parameters():
            if ".qal_B." in name:
                p.normal_(0, 0.01)

    def calibration():
        g = torch.Generator().manual_seed(0)
        for t in scheduler.timesteps:
            model(torch.randn(4, 1, 8, 8, generator=g), t, class_labels=torch.arange(4))

    dq.calibrate_activations(model, calibration)
    for name, p in model.named_parameters():
        p.requires_grad_(".qal_" in name)
    return model, scheduler


def main(path: str, steps: int) -> None:
    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    model, scheduler = build()
    student = model
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if ".qal_" in k and v.is_floating_point()}
    scalars: set[torch.nn.Parameter] = set()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        scalars = {p for p in model.parameters() if p.dim() == 0}
        for block in [*model.down_blocks, *model.up_blocks]:
            fully_shard(block, ignored_params=scalars)
        fully_shard(model, ignored_params=scalars)

        def average_gradient(param: torch.nn.Parameter) -> None:  # FSDP leaves ignored parameters to us
            dist.all_reduce(param.grad)
            param.grad /= world

        for p in scalars:
            p.register_post_accumulate_grad_hook(average_gradient)
        assert type(next(p for p in model.parameters() if p.dim() > 0)).__name__ == "DTensor"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(7)
    share = GLOBAL_BATCH // world
    for step in range(steps):
        t = scheduler.timesteps[step % len(scheduler.timesteps)]
        x, y = torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        with torch.no_grad(), dq.adapters_disabled(model):
            target = student(x, t, class_labels=y).sample
        loss = F.mse_loss(student(x, t, class_labels=y).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if rank == 0:
        torch.save({"before": before, "after": {k: v.detach().clone() for k, v in state.items() if k in before}}, path)
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
