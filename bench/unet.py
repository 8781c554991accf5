"""UNet speed and memory: our Flax NNX UNet against diffusers' PyTorch UNet, same weights, same inputs, one run.

For every (config, latent size, batch, mode) it builds the diffusers model with seeded random weights,
imports them into our UNet in-process (``create_abstract`` + ``load_torch_state`` with ``unet_key_map``),
jits our forward with the parameters as *arguments* (``nnx.split`` / ``nnx.merge``; nothing baked in as
constants), checks that both outputs agree, then times interleaved repetitions (ours, PyTorch, PyTorch,
ours, ...) and reports medians and the ratio ours / PyTorch.

Modes: ``fwd`` (PyTorch under ``torch.no_grad()``) and ``fwdbwd`` (value and gradient of
``mean(out ** 2)`` w.r.t. every parameter: ``jax.value_and_grad`` vs ``torch.autograd.grad``; the
gradients of both are compared key by key through the key map).

Reported per row: median seconds of each, ratio, our compile time (trace + lower + XLA compile, AOT),
max abs error (output, or gradient for ``fwdbwd``, with the reference's max magnitude for scale), peak
memory of one call for each framework (process RSS high-water delta, see ``bench/_common.py``), and
XLA's planned temporary buffer size. Combinations whose planned size does not fit in the currently
available memory are skipped and listed.

How ours is called (``--call``, default ``nnx,split``, timed interleaved with PyTorch in the same run):
``nnx`` the way a user calls a loaded model, ``nnx.jit(lambda m, x, t, c: m(x, t, c))(unet, x, t, c)`` (flax
walks the module graph on every call); ``nnx_tree`` the same with ``nnx.jit(..., graph=False)`` (flax's tree
mode, no graph traversal); ``split`` ``jax.jit`` of a function of the split state (``nnx.split`` once; what
the samplers and the trainer do). ``fwdbwd`` always uses ``split``.

Clocks (``--clock``): ``wall`` elapsed time with every CPU (PyTorch ``--threads``, XLA one intra-op
thread per CPU); ``cpu`` process CPU time pinned to one CPU (``--pin``: both frameworks single-threaded,
robust to other load on a shared machine); ``both`` (default) the wall-clock run here, then the CPU-time
run in a pinned subprocess, one table with both ratios. The load average is printed at start and end.

Examples::

    .venv/bin/python bench/unet.py --quick
    .venv/bin/python bench/unet.py --configs sd15 --latents 32,64 --batch 1,4 --mode fwd --repeats 5

:func:`facecrafter_jax.runtime.configure_cpu` defaults are applied before JAX is imported unless
``--no-runtime-defaults``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import prepare_process  # noqa: E402

prepare_process(sys.argv)  # before JAX / PyTorch start their thread pools

import numpy as np  # noqa: E402

from _common import (PeakRSS, available_bytes, interleaved_timings, load_average, markdown_table, mb,  # noqa: E402
                     median, run_pinned_child)

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# Same topology, half the width (about a quarter of the FLOPs and parameters).
REDUCED = dict(SD15, block_out_channels=(160, 320, 640, 640))
CONFIGS = {"sd15": SD15, "reduced": REDUCED}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _names(s: str, allowed) -> list[str]:
    out = [x for x in s.split(",") if x]
    bad = [x for x in out if x not in allowed]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}; allowed: {sorted(allowed)}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="reduced,sd15", help="comma list of: reduced, sd15")
    p.add_argument("--latents", default="32,64", help="latent sizes (square), comma list")
    p.add_argument("--batch", default="1,4", help="batch sizes, comma list")
    p.add_argument("--mode", default="fwd,fwdbwd", help="comma list of: fwd, fwdbwd")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each framework (median reported)")
    p.add_argument("--quick", action="store_true", help="reduced config, 32x32, batch 1 only")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="PyTorch intra-op threads (XLA uses all CPUs); default: CPUs available to this process")
    p.add_argument("--clock", choices=("both", "wall", "cpu"), default="both",
                   help="wall: all CPUs, elapsed time; cpu: pinned to one CPU (--pin), process CPU time; both "
                        "(default): wall here, then cpu in a pinned subprocess, one table")
    p.add_argument("--pin", action="store_true", help="run on one CPU (needed by --clock cpu)")
    p.add_argument("--call", default="nnx,split",
                   help="fwd, comma list: nnx (nnx.jit on the module, as a user calls it), nnx_tree (the same with "
                        "graph=False: no graph traversal per call), split (jax.jit on the split state); default "
                        "nnx,split")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-runtime-defaults", action="store_true",
                   help="do not apply facecrafter_jax.runtime.configure_cpu() (measure stock XLA flags)")
    p.add_argument("--no-check", action="store_true", help="skip the output/gradient comparison")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.latents, args.batch, args.clock = "reduced", "32", "1", "wall"
    if args.clock == "cpu" and not args.pin:
        p.error("--clock cpu needs --pin (one CPU; CPU time of several threads counts their spin-waiting)")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.configs = _names(args.configs, CONFIGS)
    args.call = _names(args.call, {"nnx", "nnx_tree", "split"})
    args.mode = _names(args.mode, {"fwd", "fwdbwd"})
    args.latents = _ints(args.latents)
    args.batch = _ints(args.batch)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    return args


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_torch_unet(cfg: dict, seed: int):
    """diffusers UNet with its default init, every parameter then moved by seeded noise (no zero layer)."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(seed)
    model = TorchUNet(**cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def import_into_flax(torch_model):
    """Our UNet holding the diffusers model's weights (in-process: no files), plus its key map."""
    from facecrafter_jax.convert.unet import unet_key_map
    from facecrafter_jax.convert.weights import load_torch_state
    from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

    config = UNet2DConditionConfig.from_diffusers_config(dict(torch_model.config))
    model = UNet2DConditionModel.create_abstract(config)
    rules = unet_key_map(model)
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    load_torch_state(model, state, rules)
    return model, rules


def make_inputs(batch: int, size: int, seed: int, channels: int = 4, ctx_dim: int = 768):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, size, size), dtype=np.float32)
    ctx = rng.standard_normal((batch, 77, ctx_dim), dtype=np.float32)
    t = np.full((batch,), 500, dtype=np.int32)
    return x, t, ctx


# --------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------


def _flax_fns(model, mode: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params = nnx.split(model)

    def forward(p, x, t, ctx):
        return nnx.merge(graphdef, p)(x, t, ctx)

    if mode == "fwd":
        return jax.jit(forward), params

    def loss(p, x, t, ctx):
        return jnp.mean(jnp.square(forward(p, x, t, ctx)))

    return jax.jit(jax.value_and_grad(loss)), params


def run_case(torch_model, flax_model, rules, *, mode: str, size: int, batch: int, repeats: int, seed: int,
             check: bool, clock: str = "wall", call=("nnx", "split")) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx


    x, t, ctx = make_inputs(batch, size, seed, torch_model.config.in_channels, torch_model.config.cross_attention_dim)
    tx, tt, tctx = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)
    jx, jt, jctx = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)

    fn, params = _flax_fns(flax_model, mode)
    t0 = time.perf_counter()
    compiled = fn.lower(params, jx, jt, jctx).compile()
    compile_s = time.perf_counter() - t0
    calls = list(call) if mode == "fwd" else ["split"]
    user_fn = nnx.jit(lambda m, x, t, c: m(x, t, c))  # what a user writes; walks the module graph on every call
    tree_fn = nnx.jit(lambda m, x, t, c: m(x, t, c), graph=False)  # flax's tree mode: modules as plain pytrees
    runners = {"nnx": lambda: user_fn(flax_model, jx, jt, jctx), "nnx_tree": lambda: tree_fn(flax_model, jx, jt, jctx),
               "split": lambda: compiled(params, jx, jt, jctx)}
    ma = compiled.memory_analysis()
    xla_temp = getattr(ma, "temp_size_in_bytes", 0) if ma is not None else 0
    xla_out = getattr(ma, "output_size_in_bytes", 0) if ma is not None else 0
    # Both frameworks need roughly the planned temporaries + outputs; require room for that plus a margin.
    need = 1.3 * (xla_temp + xla_out)
    avail = available_bytes()
    row = dict(mode=mode, size=size, batch=batch, compile_s=compile_s, xla_temp_mb=mb(xla_temp), clock=clock)
    if need > avail:
        row["skipped"] = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
        return [row]

    params_t = [p for p in torch_model.parameters()]
    ours_fns = {c: (lambda r=runners[c]: jax.block_until_ready(r())) for c in calls}
    ours = ours_fns[calls[0]]

    if mode == "fwd":
        def theirs():
            with torch.no_grad():
                return torch_model(tx, tt, tctx).sample
    else:
        def theirs():
            for p in params_t:
                p.requires_grad_(True)
            loss = torch_model(tx, tt, tctx).sample.square().mean()
            return loss, torch.autograd.grad(loss, params_t)

    # Warm-up (and the comparison), one framework's results alive at a time.
    r_ours = ours()
    r_theirs = theirs()
    if check:
        if mode == "fwd":
            ref = r_theirs.numpy().transpose(0, 2, 3, 1)
            row["max_err"] = float(np.max(np.abs(np.asarray(r_ours) - ref)))
            row["ref_scale"] = float(np.max(np.abs(ref)))
        else:
            (loss_j, grads_j), (loss_t, grads_t) = r_ours, r_theirs
            # Parameter by parameter through the key map (no second full copy of the gradients).
            ours_flat = dict(nnx.to_flat_state(grads_j))
            ref_grads = dict(zip((n for n, _ in torch_model.named_parameters()), grads_t))
            err = scale = 0.0
            for r in rules:
                g = ref_grads[r.torch_key].numpy()
                mine = r.to_torch(np.asarray(ours_flat[r.flax_path].get_value()))
                err = max(err, float(np.max(np.abs(mine - g))))
                scale = max(scale, float(np.max(np.abs(g))))
            del ours_flat, ref_grads, grads_j, grads_t
            row["max_err"], row["ref_scale"] = err, scale
            row["loss_err"] = abs(float(loss_j) - float(loss_t.detach()))
    del r_ours, r_theirs
    gc.collect()

    with PeakRSS() as m:
        ours()
    row["ours_peak_mb"] = mb(m.delta)
    gc.collect()
    with PeakRSS() as m:
        theirs()
    row["torch_peak_mb"] = mb(m.delta)
    gc.collect()

    for c in calls[1:]:  # warm-up (compiles the nnx.jit variant)
        ours_fns[c]()
    times = interleaved_timings({**{f"ours_{c}": f for c, f in ours_fns.items()}, "torch": theirs}, repeats,
                                clock=clock)
    rows = []
    for c in calls:
        r = dict(row, call=c, ours_s=median(times[f"ours_{c}"]), torch_s=median(times["torch"]),
                 ours_all=times[f"ours_{c}"], torch_all=times["torch"])
        r["ratio"] = r["ours_s"] / r["torch_s"]
        rows.append(r)
    for p in params_t:
        p.requires_grad_(False)
    return rows


def measure(args) -> list[dict]:
    import torch

    torch.set_num_threads(1 if args.pin else args.threads)
    torch.set_grad_enabled(True)
    rows, skipped = [], []
    for name in args.configs:
        t0 = time.perf_counter()
        torch_model = build_torch_unet(CONFIGS[name], args.seed)
        for p in torch_model.parameters():
            p.requires_grad_(False)
        flax_model, rules = import_into_flax(torch_model)
        n_params = sum(p.numel() for p in torch_model.parameters())
        print(f"# {name}: {n_params / 1e6:.1f}M parameters, built + imported in {time.perf_counter() - t0:.1f} s",
              flush=True)
        for mode in args.mode:
            for size in args.latents:
                for batch in args.batch:
                    case = run_case(torch_model, flax_model, rules, mode=mode, size=size, batch=batch,
                                    repeats=args.repeats, seed=args.seed, check=not args.no_check, clock=args.clock,
                                    call=args.call)
                    for row in case:
                        row["config"] = name
                        row["load"] = load_average()
                    if "skipped" in case[0]:
                        skipped.append(case[0])
                        print(f"# skip {name} {mode} {size}x{size} b{batch}: {case[0]['skipped']}", flush=True)
                        continue
                    rows.extend(case)
                    for row in case:
                        print(f"# {name} {mode} {size}x{size} b{batch} ({args.clock}, {row['call']}): ours "
                              f"{row['ours_s']:.3f} s {[round(v, 3) for v in row['ours_all']]}, torch "
                              f"{row['torch_s']:.3f} s {[round(v, 3) for v in row['torch_all']]}, ratio "
                              f"{row['ratio']:.2f}, compile {row['compile_s']:.1f} s, err "
                              f"{row.get('max_err', float('nan')):.2e}"
                              + (f", loss err {row['loss_err']:.1e}" if "loss_err" in row else "")
                              + f", load {row['load']}", flush=True)
                    gc.collect()
        del torch_model, flax_model, rules
        gc.collect()
    for r in skipped:
        print(f"# skipped: {r['config']} {r['mode']} {r['size']}x{r['size']} batch {r['batch']}: {r['skipped']}")
    return rows


def table(wall: list[dict], cpu: list[dict]) -> str:
    def key(r):
        return r["config"], r["mode"], r["size"], r["batch"], r.get("call", "-")

    by_wall, by_cpu = {key(r): r for r in wall}, {key(r): r for r in cpu}

    def f(r, k, fmt="{:.3f}"):
        return fmt.format(r[k]) if k in r else "-"

    out = []
    for k in dict.fromkeys([key(r) for r in wall + cpu]):
        w, c = by_wall.get(k, {}), by_cpu.get(k, {})
        m = w or c
        err = f"{m['max_err']:.1e} ({m['ref_scale']:.1e})" if "max_err" in m else "-"
        out.append([k[0], k[1], k[4], f"{k[2]}x{k[2]}", k[3], f(w, "ours_s"), f(w, "torch_s"),
                    f(w, "ratio", "**{:.2f}**"), f(c, "ours_s"), f(c, "torch_s"), f(c, "ratio", "**{:.2f}**"),
                    f(m, "compile_s", "{:.1f}"), err, f(m, "ours_peak_mb", "{:.0f}"), f(m, "torch_peak_mb", "{:.0f}"),
                    f(m, "xla_temp_mb", "{:.0f}")])
    headers = ["config", "mode", "call", "latent", "batch", "wall ours s", "wall torch s", "wall ours/torch",
               "1-thread CPU ours s", "1-thread CPU torch s", "CPU ours/torch", "compile s", "max abs err (ref max)",
               "peak MB ours", "peak MB torch", "XLA temp MB"]
    return markdown_table(headers, out)


def main(argv=None):
    args = parse_args(argv)
    if not args.no_runtime_defaults:
        from facecrafter_jax.runtime import configure_cpu

        configure_cpu()
    import jax
    import torch

    print(f"# jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"CPUs usable {len(os.sched_getaffinity(0))} of {os.cpu_count()}, clock {args.clock}, "
          f"load average {load_average()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    wall, cpu = [], []
    if args.clock == "cpu":
        cpu = measure(args)
    else:
        wall = measure(argparse.Namespace(**{**vars(args), "clock": "wall"}))
        if args.clock == "both":
            import tempfile

            child = [a for a in args.argv if a not in ("--pin",)]
            with tempfile.TemporaryDirectory() as d:
                cpu = run_pinned_child(__file__, child, os.path.join(d, "cpu.json"))
    print(f"\n# load average at the end {load_average()}; wall = all {len(os.sched_getaffinity(0))} CPUs, "
          "CPU = process CPU time pinned to one CPU; ratios < 1: ours faster\n")
    print(table(wall, cpu), flush=True)
    rows = wall + cpu
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items()} for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
