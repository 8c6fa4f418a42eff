"""Train the fixed feature extractor of semdiff-FD (run once; the result ships in the package).

    python -m semdiff.training.fd_features --out semdiff/pretrained/fd-features

The network (:class:`semdiff.evaluation.FDFeatureNet`) learns to classify shape, colour and background and
to regress size and position on 20,000 procedural shapes images (seed 1234, a different seed from any
training set). Its 128-d pooled features define the semdiff-FD space. Weights are stored as float16 (<1 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def train_fd_features(out: str | Path, *, n: int = 20_000, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3,
                      seed: int = 1234, threads: int | None = None) -> Path:
    from safetensors.torch import save_file

    from semdiff.data import make_shapes
    from semdiff.evaluation import FD_WEIGHTS, FDFeatureNet

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    data = make_shapes(n + 2000, 32, seed=seed)
    x = data.images
    y = {k: data.labels[k] for k in ("shape", "color", "background")}
    geo = torch.stack([data.labels["size"], data.labels["x"], data.labels["y"]], 1)
    geo = (geo - geo.mean(0)) / geo.std(0)
    tr, va = torch.arange(n), torch.arange(n, n + 2000)
    net = FDFeatureNet(len(data.label_names["shape"]), len(data.label_names["color"]),
                       len(data.label_names["background"]))
    steps = epochs * (n // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        perm = tr[torch.randperm(n, generator=g)]
        net.train()
        for s in range(0, n - batch_size + 1, batch_size):
            idx = perm[s:s + batch_size]
            xb = x[idx]
            # mild photometric jitter, so the features are not tuned to the exact palette
            xb = (xb * (1 + 0.1 * torch.randn(len(idx), 3, 1, 1, generator=g))).clamp(0, 1)
            outs = net(xb)
            loss = sum(F.cross_entropy(outs[k], y[k][idx]) for k in y) + F.mse_loss(outs["geometry"], geo[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f}", flush=True)
    net.eval()
    with torch.no_grad():
        outs = net(x[va])
        acc = {k: float((outs[k].argmax(1) == y[k][va]).float().mean()) for k in y}
        acc["geometry_mse"] = float(F.mse_loss(outs["geometry"], geo[va]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / FD_WEIGHTS), metadata={"format": "pt", "name": "semdiff-FD v1"})
    sha = hashlib.sha256((out / FD_WEIGHTS).read_bytes()).hexdigest()
    info = {"name": "semdiff-FD v1", "trained_on": f"make_shapes({n + 2000}, 32, seed={seed}), first {n} for training",
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "validation": acc, "sha256": sha,
            "seconds": round(time.time() - t0, 1)}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "pretrained" / "fd-features"))
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    train_fd_features(args.out, n=args.n, epochs=args.epochs, threads=args.threads)


if __name__ == "__main__":
    main()
