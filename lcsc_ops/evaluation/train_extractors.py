"""Train the two shipped digits feature classifiers and write their weights.

    python -m lcsc_ops.evaluation.train_extractors [--out DIR]

Both train on the train part of ``digits_split(seed=0)`` for a fixed number of epochs
(no early stopping, so the held-out part is never used for model selection) with
random one-pixel shifts as augmentation, from fixed seeds: 0 for the CNN, 1 for the MLP.
Shuffling and augmentation draw from their own seeded generator, so a rerun with the
same torch version on the same kind of CPU writes the same bytes. Writes
``digits_cnn.safetensors``, ``digits_mlp.safetensors`` (arch, seed and held-out accuracy
in the safetensors metadata) and ``digits_extractors.json`` (the same plus sha256 and
parameter counts) into ``lcsc_ops/assets`` by default.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lcsc_ops.evaluation.data import digits_split
from lcsc_ops.evaluation.features import DigitsCNN, DigitsMLP

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class Recipe:
    name: str          # asset file stem and metadata "arch"
    cls: type[nn.Module]
    seed: int
    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 1e-4


RECIPES = (
    Recipe("digits_cnn", DigitsCNN, seed=0, epochs=30, lr=2e-3),
    Recipe("digits_mlp", DigitsMLP, seed=1, epochs=150, lr=2e-3),
)


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return shifted.gather(3, cols)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model.classify`` labels correctly (model in eval mode)."""
    was_training = model.training
    model.eval()
    acc = (model.classify(x).argmax(dim=1) == y).double().mean().item()
    model.train(was_training)
    return acc


def train(recipe: Recipe, x_train: torch.Tensor, y_train: torch.Tensor) -> nn.Module:
    """Train one classifier by ``recipe`` (Adam, cosine learning rate, label smoothing 0.05)."""
    torch.manual_seed(recipe.seed)
    model = recipe.cls()
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-len(x_train) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i:i + recipe.batch_size]
            xb = random_shift(x_train[idx], gen)
            loss = F.cross_entropy(model.classify(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def save(model: nn.Module, recipe: Recipe, test_accuracy: float, out: Path) -> dict:
    """Write ``<name>.safetensors`` with its recipe in the metadata; return the manifest entry."""
    from safetensors.torch import save_file

    meta = {"arch": recipe.cls.__name__, "seed": recipe.seed, "epochs": recipe.epochs,
            "test_accuracy": round(test_accuracy, 6), "split": "digits_split(seed=0, test_fraction=0.25)"}
    path = out / f"{recipe.name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # One metadata key holding sorted JSON: safetensors does not promise a key order, and
    # the file's sha256 should only change when the weights or the recipe do.
    save_file(state, str(path), metadata={"lcsc_extractor": json.dumps(meta, sort_keys=True)})
    path.chmod(0o644)  # save_file creates 0600 files; package data must be readable by all users
    return {**meta, "file": path.name, "params": sum(p.numel() for p in model.parameters()),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="folder for the weights (default: package assets)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = digits_split(seed=0)
    manifest = {}
    for recipe in RECIPES:
        start = time.perf_counter()
        model = train(recipe, x_train, y_train)
        acc = accuracy(model, x_test, y_test)
        manifest[recipe.name] = save(model, recipe, acc, args.out)
        print(f"{recipe.name}: held-out accuracy {acc:.4f} ({len(x_test)} images), "
              f"{manifest[recipe.name]['params']} parameters, {time.perf_counter() - start:.1f} s")
    (args.out / "digits_extractors.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
