"""PyTorch reference implementations of the Arceus models and training recipe.

The C engine must match these numerically. Everything here is plain PyTorch
(Debian python3-torch 1.13); no third-party packages beyond torch and numpy.

Contents:
  * save_safetensors / load_safetensors: a minimal safetensors reader/writer
    (F32, I32, I64 only).
  * build_model(spec): GPT (pre-LN GPT-2, tied head) or MLP from a JSON spec.
  * loss_fn: mean cross entropy over all positions.
  * configure_optimizer: AdamW with decay on dim>=2 params only.
  * lr_at: linear warmup + cosine decay schedule.
"""

import json
import math
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------

_NP_TO_ST = {
    np.dtype(np.float32): "F32",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}
_ST_TO_NP = {v: k for k, v in _NP_TO_ST.items()}


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.float64 or x.dtype == torch.float16 or x.dtype == torch.bfloat16:
            x = x.float()
        return x.contiguous().numpy()
    a = np.asarray(x)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    return a


def save_safetensors(path, tensors, metadata=None):
    """Write {name: tensor|ndarray} to `path` in safetensors format.

    Tensors are stored in insertion order, little-endian, C-contiguous.
    float64 inputs are narrowed to F32; supported dtypes are F32, I32, I64.
    """
    header = {}
    blobs = []
    offset = 0
    for name, value in tensors.items():
        arr = np.ascontiguousarray(_to_numpy(value))
        if arr.dtype not in _NP_TO_ST:
            raise TypeError(f"{name}: unsupported dtype {arr.dtype}")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        header[name] = {
            "dtype": _NP_TO_ST[arr.dtype],
            "shape": [int(d) for d in arr.shape],
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    """Read a safetensors file -> (dict name -> torch.Tensor, metadata dict)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: truncated")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} exceeds file size")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    base = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    out = {}
    for name, info in header.items():
        dt = _ST_TO_NP.get(info["dtype"])
        if dt is None:
            raise TypeError(f"{name}: unsupported dtype {info['dtype']}")
        b, e = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if e - b != count * dt.itemsize or base + e > len(raw):
            raise ValueError(f"{name}: bad data_offsets {b},{e} for shape {shape}")
        arr = np.frombuffer(raw, dtype=dt.newbyteorder("<"), count=count, offset=base + b)
        arr = arr.astype(dt).reshape(shape)  # copy -> writable, native order
        out[name] = torch.from_numpy(arr)
    return out, metadata


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head = n_head
        self.n_embd = n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)
        mask = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        nh = self.n_head
        hs = C // nh
        qkv = self.c_attn(x)
        q, k, v = qkv.split(C, dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)
        k = k.view(B, T, nh, hs).transpose(1, 2)
        v = v.view(B, T, nh, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLPBlock(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, dropout)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLPBlock(n_embd, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, spec):
        super().__init__()
        V = int(spec["vocab_size"])
        if V <= 0:
            raise ValueError("GPT spec needs vocab_size > 0")
        self.vocab_size = V
        self.block_size = int(spec["block_size"])
        self.n_layer = int(spec["n_layer"])
        self.n_head = int(spec["n_head"])
        self.n_embd = int(spec["n_embd"])
        p = float(spec.get("dropout", 0.0))
        C = self.n_embd
        self.wte = nn.Embedding(V, C)
        self.wpe = nn.Embedding(self.block_size, C)
        self.drop = nn.Dropout(p)
        self.h = nn.ModuleList(
            [Block(C, self.n_head, self.block_size, p) for _ in range(self.n_layer)])
        self.ln_f = nn.LayerNorm(C, eps=1e-5)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = 0.02
        proj_std = 0.02 / math.sqrt(2 * self.n_layer)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                s = proj_std if name.endswith("c_proj") else std
                nn.init.normal_(mod.weight, mean=0.0, std=s)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, mean=0.0, std=std)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, idx):
        B, T = idx.shape
        assert T <= self.block_size
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.wte(idx.long()) + self.wpe(pos)[None, :, :]
        x = self.drop(x)
        for blk in self.h:
            x = blk(x)
        x = self.ln_f(x)
        return x @ self.wte.weight.t()


class MLP(nn.Module):
    def __init__(self, spec):
        super().__init__()
        dims = [int(spec["inputs"])] + [int(h) for h in spec.get("hidden", [])] + \
            [int(spec["classes"])]
        act = spec.get("activation", "relu")
        if act not in ("relu", "gelu"):
            raise ValueError(f"unknown activation {act!r}")
        self.activation = act
        self.fc = nn.ModuleList([nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])
        self.drop = nn.Dropout(float(spec.get("dropout", 0.0)))

    def forward(self, x):
        x = x.reshape(x.shape[0], -1).float()
        n = len(self.fc)
        for i, lin in enumerate(self.fc):
            x = lin(x)
            if i < n - 1:
                # "gelu" is the tanh approximation, as in the GPT MLP and the C engine.
                x = F.relu(x) if self.activation == "relu" else F.gelu(x, approximate="tanh")
                x = self.drop(x)
        return x


def build_model(spec):
    t = spec.get("type")
    if t == "gpt":
        return GPT(spec)
    if t == "mlp":
        return MLP(spec)
    raise ValueError(f"unknown model type {t!r}")


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------
# Loss, optimizer, schedule
# ---------------------------------------------------------------------------


def loss_fn(logits, targets):
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1).long())


def configure_optimizer(model, lr, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def lr_at(step, max_lr, min_lr, warmup, total):
    if step < warmup:
        return max_lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    p = min(1.0, max(0.0, p))
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * p))


def clip_grads(model, clip):
    """Clip the global grad norm to `clip` (<= 0: no clipping); returns the
    pre-clip total L2 norm over all parameter gradients."""
    max_norm = clip if clip and clip > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


def train_step(model, opt, x, y, step, max_lr, min_lr, warmup, total, clip):
    """One step of the reference recipe. Returns (loss, lr, pre-clip grad norm)."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    gn = clip_grads(model, clip)
    lr = lr_at(step, max_lr, min_lr, warmup, total)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    return float(loss.detach()), lr, gn
