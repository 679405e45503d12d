"""Each model's training epoch against its PyTorch twin, timed in one run.

Command:  python experiments/models_vs_torch.py DATASET [vanilla-mlp,vae-conv,...]
          (DATASET: a folder of Fashion-MNIST IDX files, or mnist-sample)
It trains jaxae's scan epoch and the twin (``TWINS[(variant, arch)].torch_module`` with
``torch_reference.variant_loss``) on the same first 12,288 training images, batch 256, Adam
1e-3, torch on 2 threads, one warm-up epoch each, then 3 interleaved rounds, and prints the
median samples/s of each and their ratio. ``jaxae bench`` times the document's model only.
"""

import statistics
import sys
import time

import jax
import torch

from jaxae import torch_reference
from jaxae.convert.layouts import TWINS
from jaxae.data import load_dataset
from jaxae.train import TrainConfig, build

torch.set_num_threads(2)
train = load_dataset(sys.argv[1], "train")
images = train.images[:12288]
B = 256
models = (
    sys.argv[2].split(",")
    if len(sys.argv) > 2
    else ["vanilla-mlp", "vae-mlp", "denoising-mlp", "vanilla-conv", "vae-conv"]
)


class J:
    def __init__(s, cfg):
        s.trainer, s.state = build(cfg, images.shape[1:])
        s.images = jax.device_put(images.reshape(len(images), -1))
        s.ep = s.trainer.jit_train_epoch.lower(s.state, s.images, batch_size=B).compile()

    def run(s):
        s.state, m = s.ep(s.state, s.images)
        return float(m["loss"][-1])


class T:
    def __init__(s, cfg):
        torch.manual_seed(0)
        s.cfg = cfg
        s.m = TWINS[(cfg.variant, cfg.arch)].torch_module(cfg, images.shape[1:])
        s.opt = torch.optim.Adam(s.m.parameters(), lr=1e-3)
        s.data = torch.tensor(images.reshape(len(images), -1)).float().div(255)

    def run(s):
        perm = torch.randperm(len(s.data))
        for i in range(0, len(s.data), B):
            x = s.data[perm[i : i + B]]
            loss = torch_reference.variant_loss(s.m, x, s.cfg)
            s.opt.zero_grad()
            loss.backward()
            s.opt.step()
        return loss.item()


for name in models:
    v, a = name.split("-")
    cfg = TrainConfig(variant=v, arch=a, batch_size=B)
    j, t = J(cfg), T(cfg)
    j.run()
    t.run()
    rj, rt = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        j.run()
        rj.append(len(images) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        t.run()
        rt.append(len(images) / (time.perf_counter() - t0))
    mj, mt = statistics.median(rj), statistics.median(rt)
    print(f"{name}: jaxae {mj:,.0f}/s torch {mt:,.0f}/s ratio {mj / mt:.2f}x", flush=True)
