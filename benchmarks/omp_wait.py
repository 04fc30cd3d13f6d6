"""Seconds for N SGD steps of a ConvNet (width 0.5) on 28 px batches of 128, with T threads (BENCHMARKS.md 14.1).

Run two at once to see what OpenMP's wait policy does to jobs that share cores:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/omp_wait.py 2 60 & OMP_WAIT_POLICY=PASSIVE python benchmarks/omp_wait.py 2 60 & wait
"""
import sys
import time

import torch

from prismdd.core.models import create_model

torch.set_num_threads(int(sys.argv[1]))
model = create_model("convnet", 10, 1, 28, 0.5)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
start = time.time()
for _ in range(int(sys.argv[2])):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
print(f"{time.time() - start:.1f}")
