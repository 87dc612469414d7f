"""Train the shipped digits model: ``python -m dbcache_compile.digits.train --out dbcache_compile/digits/weights``.

Rectified flow matching on the 16x16 upscaled sklearn digits (see :mod:`dbcache_compile.digits.model`):
for a clean image ``x0`` in [-1, 1], noise ``n ~ N(0, I)`` and ``sigma ~ U(0, 1)``, the transformer sees
``x_t = (1 - sigma) * x0 + sigma * n`` at ``timestep=sigma`` (FluxPipeline passes ``t / 1000`` with ``t`` in
[0, 1000], i.e. sigma) and regresses the velocity ``n - x0`` with an MSE loss. This is the convention of
``FlowMatchEulerDiscreteScheduler`` (shift 1.0), whose Euler step is ``x += (sigma_next - sigma) * v``.

The run is deterministic on CPU for a given torch build, CPU instruction set and thread count (fixed seeds,
one generator for data order / noise / sigmas, ``torch.use_deterministic_algorithms(True)``). It uses one thread
by default: the bitwise result then does not depend on the machine's core count, and a single thread degrades
gracefully on a shared CPU (two OpenMP threads competing with other processes slowed steps down ~20x). The
shipped weights took 1500 steps of batch 64 (~2 steps/s on an idle core, i.e. ~13 min; 19-20 min measured on a
busy shared 2-core machine), final smoothed loss 0.133; a rerun reproduced them bit for bit (torch 2.13.0+cpu). The saved weights are an exponential moving average of the trained ones, with the
adaLN-Zero initialisation of :func:`_adaln_zero_init`. Written files (2.9 MB in total)::

    OUT/transformer/{config.json, diffusion_pytorch_model.safetensors}
    OUT/conditioner/{config.json, diffusion_pytorch_model.safetensors}
    OUT/scheduler/scheduler_config.json
    OUT/training_info.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm import tqdm

from .model import (
    build_conditioner,
    build_transformer,
    image_ids,
    load_real_digits,
    pack_images,
    text_ids,
)

DEFAULT_STEPS = 1500
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 2e-3
DEFAULT_EMA_DECAY = 0.995
WARMUP_STEPS = 50


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over :data:`WARMUP_STEPS`, then cosine decay to 10% of the peak learning rate."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _adaln_zero_init(transformer: torch.nn.Module) -> None:
    """DiT-style "adaLN-Zero": zero the adaptive-norm modulations and the output projection.

    Every block then starts as the identity and the model predicts 0, which trains much faster than diffusers'
    default initialisation on this tiny budget.
    """
    for block in transformer.transformer_blocks:
        for linear in (block.norm1.linear, block.norm1_context.linear):
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
    for block in transformer.single_transformer_blocks:
        torch.nn.init.zeros_(block.norm.linear.weight)
        torch.nn.init.zeros_(block.norm.linear.bias)
    for linear in (transformer.norm_out.linear, transformer.proj_out):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)


def _train_models(steps: int, batch_size: int, lr: float, ema_decay: float, seed: int) -> tuple:
    """Run the training loop; returns ``(ema_transformer, ema_conditioner, smoothed_final_loss, seconds)``."""
    torch.manual_seed(seed)  # model initialisation
    gen = torch.Generator().manual_seed(seed)  # data order, noise and sigmas

    images, labels = load_real_digits()
    data = pack_images(torch.from_numpy(images)[:, None] * 2.0 - 1.0)  # (N, 64, 4) in [-1, 1]
    targets = torch.from_numpy(labels)
    n = data.shape[0]

    transformer = build_transformer().train()
    _adaln_zero_init(transformer)
    conditioner = build_conditioner().train()
    params = list(transformer.parameters()) + list(conditioner.parameters())
    ema_transformer = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_conditioner = copy.deepcopy(conditioner).eval().requires_grad_(False)
    ema_params = list(ema_transformer.parameters()) + list(ema_conditioner.parameters())

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    img_ids, txt_ids = image_ids(), text_ids()

    order = torch.randperm(n, generator=gen)
    cursor = 0
    loss_avg = float("nan")
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train digits", dynamic_ncols=True)
    for step in bar:
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size

        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(x0.shape[0], generator=gen)
        x_t = (1.0 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        enc, pooled = conditioner(targets[idx])
        pred = transformer(
            hidden_states=x_t,
            timestep=sigma,
            guidance=None,
            pooled_projections=pooled,
            encoder_hidden_states=enc,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for ema_p, p in zip(ema_params, params):
                ema_p.lerp_(p, 1.0 - ema_decay)

        loss_avg = loss.item() if step == 0 else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    return ema_transformer, ema_conditioner, loss_avg, time.perf_counter() - start


def train(
    out_dir: str | Path,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    ema_decay: float = DEFAULT_EMA_DECAY,
    seed: int = 0,
    threads: int = 1,
) -> dict:
    """Train the digits transformer + class conditioner and save them (EMA weights) under ``out_dir``.

    Global torch state touched for reproducibility (thread count, deterministic algorithms, the default CPU
    RNG) is restored afterwards. Returns the summary also written to ``out_dir/training_info.json``.
    """
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            transformer, conditioner, final_loss, seconds = _train_models(steps, batch_size, lr, ema_decay, seed)
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out_dir / "transformer", safe_serialization=True)
    conditioner.save_pretrained(out_dir / "conditioner", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False).save_pretrained(out_dir / "scheduler")
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "seed": seed,
        "threads": threads,
        "final_loss_smoothed": round(final_loss, 5),
        "train_seconds": round(seconds, 1),
        "torch_version": torch.__version__,
    }
    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (e.g. dbcache_compile/digits/weights)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--ema-decay", type=float, default=DEFAULT_EMA_DECAY)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (bitwise results depend on it)")
    args = parser.parse_args(argv)
    info = train(args.out, args.steps, args.batch_size, args.lr, args.ema_decay, args.seed, args.threads)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
