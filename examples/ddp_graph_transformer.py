"""Data parallelism over many graphs: a small graph transformer trained with DDP.

Each process (rank) reads its own part of a PyG dataset (``DistributedSampler``), batches its
graphs, and runs the same model; ``DistributedDataParallel`` averages the gradients over the
ranks, so every rank takes the same step that one process would take on the union of the ranks'
batches. The script checks exactly that: after the backward of a step each rank recomputes,
in float64, the gradient of one process on the union batch (the same graphs, gathered from every
rank's share of the sampler) and compares it with its DDP-averaged gradient.

The model: an embedding, two ``SelfAttentionConv`` layers attending over each graph's complete
graph (no edges built, no padding; built once per batch with ``gatattn.build_graph`` and passed
to both layers as ``graph=``), mean pooling per graph, a classifier; on PyG's
``FakeDataset`` (random graphs whose node features are shifted by the graph's class).

Run:

* ``python examples/ddp_graph_transformer.py [--smoke] [--threads N]``: spawns 2 local processes
  (gloo), each with N torch threads on CPU (default 1).
* One machine, N processes: ``torchrun --nproc-per-node=N examples/ddp_graph_transformer.py``.
* Several machines: on each, ``torchrun --nnodes=M --node-rank=I --nproc-per-node=N
  --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 examples/ddp_graph_transformer.py``. torchrun
  sets RANK, WORLD_SIZE and the rendezvous; the script uses gloo on CPU and NCCL when CUDA is
  available (one GPU per process, LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
from datetime import timedelta

import _smoke  # examples/_smoke.py, beside this script
import _threads  # examples/_threads.py
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from torch_geometric.data import Batch
from torch_geometric.datasets import FakeDataset
from torch_geometric.loader import DataLoader
from torch_geometric.nn import global_mean_pool

import gatattn
from gatattn import SelfAttentionConv

CLASSES, FEATURES, TOLERANCE = 4, 8, 1e-9


class GraphTransformer(nn.Module):
    def __init__(self, features: int, dim: int, heads: int, classes: int):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.convs = nn.ModuleList(
            SelfAttentionConv(dim, dim // heads, heads=heads, out_proj=True) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.head = nn.Linear(dim, classes)

    def forward(self, data):
        h = self.embed(data.x)
        graph = gatattn.build_graph(batch=data.batch)  # once per batch, for both layers
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = norm(h + conv(h, graph=graph))  # each graph's complete graph, no edges
        return self.head(global_mean_pool(h, data.batch))


def graphs(count: int) -> FakeDataset:
    """The same graphs on every rank: FakeDataset draws from Python's and torch's generators."""
    random.seed(0)
    torch.manual_seed(0)
    return FakeDataset(num_graphs=count, avg_num_nodes=20, avg_degree=3,
                       num_channels=FEATURES, num_classes=CLASSES, task="graph")


def union_batch(dataset, world: int, epoch: int, step: int, batch_size: int) -> Batch:
    """The graphs all ranks train on at ``step``, rank by rank, as one process would batch them:
    each rank's sampler order is a function of the seed and the epoch, so no exchange is
    needed."""
    members = []
    for rank in range(world):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0)
        sampler.set_epoch(epoch)
        members += list(sampler)[step * batch_size:(step + 1) * batch_size]
    return Batch.from_data_list([dataset[i] for i in members])


def max_gradient_gap(model: DistributedDataParallel, batch: Batch, device) -> float:
    """Largest |DDP-averaged gradient - one process's gradient on ``batch``| over the params."""
    single = GraphTransformer(FEATURES, model.module.embed.out_features,
                              model.module.convs[0].heads, CLASSES).to(device).double()
    single.load_state_dict(model.module.state_dict())
    batch = batch.to(device)
    F.cross_entropy(single(batch), batch.y).backward()
    return max((p.grad - q.grad).abs().max().item()
               for p, q in zip(single.parameters(), model.module.parameters(), strict=True))


def train(rank: int, world: int, device: torch.device, smoke: bool) -> None:
    count, epochs, batch_size = (64, 1, 8) if smoke else (4000, 5, 32)
    dataset = graphs(count)
    torch.manual_seed(1)  # DDP broadcasts rank 0's initial weights anyway
    model = GraphTransformer(FEATURES, 32, 4, CLASSES).to(device).double()
    on_gpu = device.type == "cuda"
    model = DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    steps = 3 if smoke else len(loader)
    if rank == 0:
        print(f"{world} ranks, {count} graphs ({len(sampler)} per rank), batches of "
              f"{batch_size} graphs per rank, float64")
        print("| epoch | step | loss (rank 0) | max abs gradient gap to one process |")
        print("|---|---|---|---|")
    epoch_losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, graphs
        for step, batch in enumerate(loader):
            if step == steps:
                break
            batch = batch.to(device)
            batch.x = batch.x.double()
            opt.zero_grad()
            loss = F.cross_entropy(model(batch), batch.y)
            loss.backward()
            total += torch.tensor([loss.item() * batch.num_graphs, batch.num_graphs],
                                  dtype=torch.float64, device=device)
            if smoke or step == 0:  # the check costs a second forward and backward
                union = union_batch(dataset, world, epoch, step, batch_size)
                union.x = union.x.double()
                gap = max_gradient_gap(model, union, device)
                if not gap <= TOLERANCE:
                    raise AssertionError(f"rank {rank}: DDP gradients differ from one process "
                                         f"on the union batch by {gap:.3e} > {TOLERANCE}")
                if rank == 0:
                    print(f"| {epoch} | {step} | {loss.item():.4f} | {gap:.2e} |", flush=True)
            opt.step()
        dist.all_reduce(total)
        epoch_losses.append(float(total[0] / total[1]))
    if rank == 0:
        print("\n| epoch | mean training loss (all ranks) |\n|---|---|")
        for epoch, loss in enumerate(epoch_losses):
            print(f"| {epoch} | {loss:.4f} |")
        print(f"\nDDP gradients equal one process's on the union batch (to {TOLERANCE:.0e}) at "
              "every checked step", flush=True)


def run_rank(rank: int, world: int, port: int | None, smoke: bool, threads: int) -> None:
    """One rank: joins the process group (torchrun's environment, or the spawning parent's
    port), trains, leaves."""
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        _threads.apply(threads, report=False)  # rank 0's main reported it
    init = "env://" if port is None else f"tcp://127.0.0.1:{port}"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank,
                            world_size=world, timeout=timedelta(minutes=5))
    try:
        train(rank, world, device, smoke)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="64 graphs, 3 steps")
    parser.add_argument("--processes", type=int, default=2,
                        help="processes to spawn without torchrun (default: 2)")
    _threads.add_option(parser, scope="each process on CPU")
    args = parser.parse_args()
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        _smoke.announce(args.smoke)
        print(f"torch threads per process on CPU: {args.threads} (--threads)", flush=True)
    if under_torchrun:
        run_rank(rank, int(os.environ["WORLD_SIZE"]), None, args.smoke, args.threads)
    else:
        mp.start_processes(run_rank, args=(args.processes, free_port(), args.smoke, args.threads),
                           nprocs=args.processes, start_method="spawn")


if __name__ == "__main__":
    main()
