r"""Time ``python -m idql_pl export`` and the exported policy's actions/s beside ``IDQL.act``'s (same batch).

    OMP_NUM_THREADS=1 python examples/time_exported_policy.py checkpoints/<run>/last.ckpt \
        --batch 10 --N 32 128

Per N: exports the pt2 and TorchScript files (seconds, in this process), then acts ``--repeats`` times on the
same ``[batch, obs_dim]`` states with ``IDQL.act`` (float32 on the CPU), the pt2 program and the TorchScript
module, after one warm-up call each, and prints actions/s (batch x calls / seconds) of the median of 3 rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def rate(fn, obs: torch.Tensor, repeats: int) -> float:
    fn(obs)  # warm-up
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn(obs)
        rounds.append(obs.shape[0] * repeats / (time.perf_counter() - start))
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--N", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from idql_pl.training.export import build_policy, load_model, save_policy

    model, _ = load_model(args.ckpt)
    obs = torch.randn(args.batch, int(model.hparams.obs_dim))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.N:
            timings, files = {}, {}
            for fmt, suffix in (("pt2", ".pt2"), ("torchscript", ".pt")):
                start = time.perf_counter()
                policy, info = build_policy(args.ckpt, num_samples=n)
                files[fmt] = Path(tmp) / f"policy_N{n}{suffix}"
                save_policy(policy, fmt, files[fmt], info)
                timings[fmt] = time.perf_counter() - start
            pt2 = torch.export.load(files["pt2"]).module()
            script = torch.jit.load(str(files["torchscript"]))
            with torch.no_grad():
                act = rate(lambda o, n=n: model.act(o, num_samples=n, precision="32"), obs, args.repeats)
                exported = rate(pt2, obs, args.repeats)
                scripted = rate(script, obs, args.repeats)
            print(f"N {n}: export pt2 {timings['pt2']:.1f} s, TorchScript {timings['torchscript']:.1f} s;"
                  f" actions/s IDQL.act {act:.0f}, pt2 {exported:.0f}, TorchScript {scripted:.0f}")


if __name__ == "__main__":
    main()
