"""Run under torchrun (2 gloo ranks): the objective on each rank's slice of one global batch
whose guide embeddings make rank 1's row 4 a false negative of rank 0's anchor 0. Writes, on
rank 0, each rank's loss, masked count and the gradient of its local views to <out>.pt."""

import sys

import torch
from harness import process_group

from simcse_dist.distributed import gather_no_grad
from simcse_dist.train.objective import Objective, ObjectiveSpec


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z, guide = (
        torch.randn(6, 3, 16, generator=g, dtype=torch.float64),
        torch.randn(6, 3, 8, generator=g, dtype=torch.float64),
    )
    guide[4, 1] = guide[0, 1]  # the guide sees row 4's positive as row 0's own: a false negative of anchor 0
    return z, guide


SPEC = ObjectiveSpec(
    0.05,
    0.0,
    matryoshka=((16, 1.0), (8, 0.5)),
    guide_margin=0.01,
    contrast_anchors=True,
    contrast_positives=True,
    distill_temperature=0.1,
)


def main() -> None:
    out = sys.argv[1]
    with process_group() as env:
        z, guide = batch()
        teacher = z.detach() * 0.5 + 0.1  # any fixed embeddings
        rows = slice(3 * env.rank, 3 * env.rank + 3)
        local = z[rows].clone().requires_grad_()
        loss, masked = Objective(SPEC, env.rank, env.world_size)(local, None, None, guide[rows], teacher[rows])
        loss.backward()
        results = gather_no_grad(torch.cat([loss.detach().view(1), masked.double().view(1), local.grad.flatten()]))
        if env.is_main:
            torch.save(results.view(env.world_size, -1), out)


if __name__ == "__main__":
    main()
