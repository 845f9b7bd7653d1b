"""Train the Fashion-MNIST judge on the train split only and report its test-split accuracy.

    python benchmarks/fashion_judge.py            # writes weights/fashion-judge.safetensors
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from ditcli.data.sources import load_fashion_mnist
from ditcli.evaluation.judge import JUDGE_FILE, FashionJudge, save_judge


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 1, 28, 28) in [-1, 1]


@torch.no_grad()
def accuracy(judge: FashionJudge, x: torch.Tensor, y: torch.Tensor) -> float:
    judge.eval()
    predictions = torch.cat([judge(chunk).argmax(1) for chunk in x.split(1000)])
    return (predictions == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(JUDGE_FILE))
    args = parser.parse_args()

    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    x, y = as_tensor(train.images), torch.from_numpy(train.labels)
    x_test, y_test = as_tensor(test.images), torch.from_numpy(test.labels)
    torch.manual_seed(args.seed)
    judge = FashionJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(x) // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        judge.train()
        order = torch.randperm(len(x), generator=generator)
        for batch in order[: len(order) // args.batch * args.batch].view(-1, args.batch):
            loss = F.cross_entropy(judge(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: test accuracy {accuracy(judge, x_test, y_test):.4f}", flush=True)
    result = {"test_accuracy": accuracy(judge, x_test, y_test), "train_accuracy": accuracy(judge, x, y),
              "epochs": args.epochs, "seconds": round(time.perf_counter() - started, 1), "out": args.out}
    save_judge(judge, args.out, result["test_accuracy"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
