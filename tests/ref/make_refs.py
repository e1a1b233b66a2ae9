#!/usr/bin/python3
"""Write PyTorch reference data for the Arceus numerics tests.

Usage: /usr/bin/python3 tests/ref/make_refs.py --out DIR

For each case NAME in (gpt_tiny, mlp) writes:
  DIR/NAME.spec.json          the model spec actually used (vocab_size filled in)
  DIR/NAME.weights.safetensors  initial state_dict (F32)
  DIR/NAME.io.safetensors     inputs, targets, logits, loss, grad.<param>,
                              steps.{inputs,targets,losses,lrs,grad_norms},
                              final.<param>; the training recipe is in
                              __metadata__ (all values are strings).

steps.inputs[0] / steps.targets[0] are the same batch as inputs / targets,
so steps.losses[0] == loss.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refmodels as rm  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

SEED = 1337
N_STEPS = 10
RECIPE = {
    "max_lr": 1e-3,
    "min_lr": 1e-4,
    "warmup": 3,
    "total": N_STEPS,
    "beta1": 0.9,
    "beta2": 0.99,
    "eps": 1e-8,
    "weight_decay": 0.1,
    "clip": 0.5,
}


def load_spec(name):
    with open(os.path.join(REPO, "configs", name)) as f:
        return json.load(f)


def make_batch(spec, gen):
    """One batch of (inputs, targets) for the spec, from generator `gen`."""
    if spec["type"] == "gpt":
        B, T, V = 4, int(spec["block_size"]), int(spec["vocab_size"])
        x = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64).to(torch.int32)
        y = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64).to(torch.int32)
    else:
        B = 32
        x = torch.rand((B, int(spec["inputs"])), generator=gen, dtype=torch.float32)
        y = torch.randint(0, int(spec["classes"]), (B,), generator=gen,
                          dtype=torch.int64).to(torch.int32)
    return x, y


def make_case(name, spec, out_dir):
    t0 = time.time()
    torch.manual_seed(SEED)
    model = rm.build_model(spec).float()
    model.eval()  # dropout off (p is 0 anyway)
    gen = torch.Generator().manual_seed(SEED + 1)

    init_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    assert names == list(init_sd.keys()), "state_dict has non-parameter entries"

    with open(os.path.join(out_dir, f"{name}.spec.json"), "w") as f:
        json.dump(spec, f, indent=2)
        f.write("\n")
    rm.save_safetensors(os.path.join(out_dir, f"{name}.weights.safetensors"), init_sd,
                        metadata={"spec": json.dumps(spec), "seed": str(SEED)})

    # --- single forward/backward at the initial weights ---
    x, y = make_batch(spec, gen)
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = rm.loss_fn(logits, y)
    loss.backward()
    io = {
        "inputs": x,
        "targets": y,
        "logits": logits.detach(),
        "loss": loss.detach().reshape(1),
    }
    for n, p in model.named_parameters():
        io[f"grad.{n}"] = p.grad.detach().clone()

    # --- 10 training steps ---
    r = RECIPE
    opt = rm.configure_optimizer(model, r["max_lr"], betas=(r["beta1"], r["beta2"]),
                                 weight_decay=r["weight_decay"], eps=r["eps"])
    xs, ys = [x], [y]
    for _ in range(N_STEPS - 1):
        bx, by = make_batch(spec, gen)
        xs.append(bx)
        ys.append(by)
    losses, lrs, gnorms = [], [], []
    for step in range(N_STEPS):
        l, lr, gn = rm.train_step(model, opt, xs[step], ys[step], step, r["max_lr"],
                                  r["min_lr"], r["warmup"], r["total"], r["clip"])
        losses.append(l)
        lrs.append(lr)
        gnorms.append(gn)
    io["steps.inputs"] = torch.stack(xs)
    io["steps.targets"] = torch.stack(ys)
    io["steps.losses"] = torch.tensor(losses, dtype=torch.float32)
    io["steps.lrs"] = torch.tensor(lrs, dtype=torch.float32)
    io["steps.grad_norms"] = torch.tensor(gnorms, dtype=torch.float32)
    for n, p in model.named_parameters():
        io[f"final.{n}"] = p.detach().clone()

    meta = {k: repr(v) if isinstance(v, float) else str(v) for k, v in r.items()}
    meta.update({
        "steps": str(N_STEPS),
        "batch": str(x.shape[0]),
        "seed": str(SEED),
        "spec": json.dumps(spec),
        "schedule": "lr(step)= step<warmup ? max_lr*(step+1)/warmup : "
                    "min_lr+0.5*(max_lr-min_lr)*(1+cos(pi*clamp((step-warmup)/max(1,total-warmup),0,1)))",
        "recipe": "per step: zero_grad; loss=mean CE; backward; clip_grad_norm_(clip); "
                  "set lr=lr(step) on all groups; AdamW step (decoupled wd on dim>=2 params)",
        "torch_version": torch.__version__,
    })
    rm.save_safetensors(os.path.join(out_dir, f"{name}.io.safetensors"), io, metadata=meta)

    # sanity: round-trip and step-0 consistency
    back, bmeta = rm.load_safetensors(os.path.join(out_dir, f"{name}.io.safetensors"))
    for k, v in io.items():
        assert torch.equal(back[k], v.to(back[k].dtype)), k
    assert bmeta["clip"] == meta["clip"]
    assert abs(losses[0] - float(loss)) < 1e-6, (losses[0], float(loss))

    n_clipped = sum(1 for g in gnorms if g > r["clip"])
    n_params = rm.count_params(model)
    print(f"[{name}] params={n_params} batch={tuple(x.shape)} loss0={float(loss):.6f} "
          f"({time.time() - t0:.2f}s)")
    print(f"[{name}] losses:     " + " ".join(f"{v:.4f}" for v in losses))
    print(f"[{name}] lrs:        " + " ".join(f"{v:.2e}" for v in lrs))
    print(f"[{name}] grad_norms: " + " ".join(f"{v:.4f}" for v in gnorms))
    print(f"[{name}] clipping (clip={r['clip']}) triggered on {n_clipped}/{N_STEPS} steps")
    if n_clipped == 0:
        print(f"[{name}] WARNING: clipping never triggered", file=sys.stderr)
    return n_clipped


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)

    gpt = load_spec("gpt-tiny.json")
    gpt["vocab_size"] = 65
    mlp = load_spec("mlp-fashion.json")

    for name, spec in (("gpt_tiny", gpt), ("mlp", mlp)):
        make_case(name, spec, args.out)
    print(f"wrote references to {args.out}")


if __name__ == "__main__":
    main()
