"""Elastic weight consolidation (Kirkpatrick et al. 2017) for continual pretraining.

    loss_total = loss + (lambda / 2) * sum_i F_i * (theta_i - theta*_i)^2

* F is the diagonal (empirical) Fisher: the mean over general samples of the squared gradient of each sample's
  log-likelihood, summed over its tokens (one sequence at a time), as in Kirkpatrick et al. Then, to second order,
  (1/2) sum_i F_i (theta_i - theta*_i)^2 approximates the rise of a general sample's summed NLL, so lambda has a
  scale: lambda = 1 weighs one general sample's loss rise like the training loss (a per-token mean). Squaring the
  gradient of the token-MEAN loss instead shrinks F by ~(tokens per sample)^2 and needs a lambda ~10^5 larger to
  matter. The default lambda comes from the sweep in bench/ewc.py (results in bench/README.md).
* theta* are the parameters before continual pretraining (the anchor).
* Only parameters that require grad are covered (with LoRA those are the adapters: EWC then means little).
* F and theta* are stored together as one safetensors file (`fisher.<name>`, `anchor.<name>`), so a resumed run
  uses the Fisher of the base model, not of a half-trained one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():  # named_parameters skips tied duplicates already; keep it explicit
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def compute_fisher(
    model: torch.nn.Module, samples: Iterable[Sequence[int]], max_samples: int | None = None
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: mean over `samples` (token id sequences) of the squared gradients of each sample's summed
    log-likelihood."""
    params = _trainable(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    count = 0
    try:
        for ids in samples:
            if max_samples is not None and count >= max_samples:
                break
            x = torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids, dtype=torch.long, device=device).view(
                1, -1
            )
            if x.shape[1] < 2:
                continue
            model.zero_grad(set_to_none=True)
            out = model(input_ids=x, labels=x, use_cache=False)
            # the sample's summed log-likelihood: the HF loss is its mean over the x.shape[1] - 1 predicted tokens
            # (the gradient's sign does not matter once squared)
            (-out.loss * (x.shape[1] - 1)).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if count == 0:
        raise ValueError("compute_fisher: no usable general samples (need sequences of at least 2 tokens)")
    return {n: f / count for n, f in fisher.items()}


class EWC:
    """The EWC penalty for a model whose parameter names match `fisher` / `anchor`."""

    def __init__(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], lambda_: float):
        missing = set(fisher) ^ set(anchor)
        if missing:
            raise ValueError(f"EWC: fisher and anchor cover different parameters: {sorted(missing)[:5]}")
        self.fisher, self.anchor, self.lambda_ = fisher, anchor, float(lambda_)

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, samples: Iterable[Sequence[int]], lambda_: float, max_samples: int | None = None
    ) -> EWC:
        fisher = compute_fisher(model, samples, max_samples)
        anchor = {n: p.detach().clone().float() for n, p in _trainable(model).items()}
        return cls(fisher, anchor, lambda_)

    def to(self, device: torch.device | str) -> EWC:
        self.fisher = {n: t.to(device) for n, t in self.fisher.items()}
        self.anchor = {n: t.to(device) for n, t in self.anchor.items()}
        return self

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """(lambda/2) * sum_i F_i (theta_i - theta*_i)^2 over the covered parameters (differentiable)."""
        params = dict(model.named_parameters())
        total = None
        for n, f in self.fisher.items():
            term = (f * (params[n].float() - self.anchor[n]) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.lambda_ * total

    def drift(self, model: torch.nn.Module) -> float:
        """Fisher-weighted squared drift sum_i F_i (theta_i - theta*_i)^2 (the penalty without lambda/2)."""
        with torch.no_grad():
            params = dict(model.named_parameters())
            return float(sum((f * (params[n].float() - self.anchor[n]) ** 2).sum() for n, f in self.fisher.items()))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"fisher.{n}": t.contiguous().cpu() for n, t in self.fisher.items()}
        tensors.update({f"anchor.{n}": t.contiguous().cpu() for n, t in self.anchor.items()})
        save_file(tensors, str(path), metadata={"lambda": repr(self.lambda_)})

    @classmethod
    def load(cls, path: Path, lambda_: float | None = None) -> EWC:
        from safetensors import safe_open

        fisher, anchor = {}, {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                kind, name = key.split(".", 1)
                (fisher if kind == "fisher" else anchor)[name] = f.get_tensor(key)
        return cls(fisher, anchor, float(meta.get("lambda", 1.0)) if lambda_ is None else lambda_)
