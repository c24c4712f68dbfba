"""Fine-tuning the pre-trained LSTM on the labelled reviews, keeping what the language model learned.

- **A learning rate per layer group** (ULMFiT, Howard & Ruder 2018): the head gets ``lr``, the LSTM
  ``lr / decay``, the embedding ``lr / decay²``, so the pre-trained layers move least.
- **Gradual unfreezing**: epoch 1 trains the head only, epoch 2 adds the LSTM, epoch 3 the embedding.
- **Warm-up then cosine decay** of every group's rate, over the planned epochs.
- **Weight averaging**: an exponential moving average (EMA) of the weights is what gets exported;
  it is evaluated next to the raw weights after every epoch.
- **Adversarial training on the embeddings** (Miyato, Dai & Goodfellow 2017): after the clean loss,
  each example's embedded sequence is pushed by ``r = ε·σ·g/‖g‖`` along the gradient ``g`` of the
  loss with respect to it (‖·‖ over the whole example; σ is the embedding matrix's standard
  deviation, so ε is measured in units of normalised embeddings, as in the paper), and the loss on
  the perturbed input is added. Training-only: the exported model is the plain SentimentLSTM.

Resumable mid-epoch like the language model (``training/state.py``).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sentiment.batching import length_buckets
from sentiment.model import SentimentLSTM, pad_batch
from training.state import (RunState, TimeBox, TimeBoxReached, compact, expand, model_device, rng_state,
                            set_rng_state)

PHASE = "finetune"


@dataclass
class FineTuneConfig:
    """Fine-tuning recipe (the ``--ft-*`` flags)."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    group_decay: float = 2.6
    gradual_unfreezing: bool = True
    warmup_fraction: float = 0.06
    min_lr_ratio: float = 0.02
    rewarm_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    adv_eps: float = 0.0
    adv_weight: float = 1.0
    aux_weight: float = 0.2
    clip: float = 1.0
    bf16: bool = False
    log_every: int = 100


def step_logits_from_embeddings(model: SentimentLSTM, emb: torch.Tensor) -> torch.Tensor:
    """The model's per-step logits from already-embedded input: (B, T, E) → (B, T).

    The same computation as :meth:`SentimentLSTM.step_logits` after its embedding lookup, so a
    perturbation can be added to the embeddings in between.
    """
    h, _ = model.lstm(model.dropout(emb))  # (B, T, H)
    return model.head(model.dropout(h)).squeeze(-1)  # (B, T)


def sentiment_loss(step: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                   aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE on the last real token plus ``aux_weight`` × BCE averaged over all real timesteps.

    The per-step term (target replication, Lipton et al. 2015) gives every step a gradient, which
    helps a long LSTM train and makes the trace meaningful early in a review. Returns (loss, last logits (B,)).
    """
    step = step.float()
    last = step.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)  # (B,)
    loss = F.binary_cross_entropy_with_logits(last, labels)
    if aux_weight > 0:
        mask = (torch.arange(step.size(1), device=step.device).unsqueeze(0) < lengths.unsqueeze(1)).float()  # (B, T)
        per_step = F.binary_cross_entropy_with_logits(step, labels.unsqueeze(1).expand_as(step), reduction="none")
        aux = (per_step * mask).sum(1) / lengths.float()  # (B,)
        loss = (1 - aux_weight) * loss + aux_weight * aux.mean()
    return loss, last


def adversarial_perturbation(loss: torch.Tensor, emb: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
    """``r = eps·scale·g/‖g‖`` per example, with ``g = ∂loss/∂emb`` (B, T, E) and ‖·‖ over (T, E).

    Padding positions have zero gradient (they never reach the loss), so they stay unperturbed.
    The graph is kept, so the clean loss can still be back-propagated afterwards.
    """
    (g,) = torch.autograd.grad(loss, emb, retain_graph=True)
    g = g.detach().float()
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
    return (eps * scale) * g / norm.view(-1, 1, 1)  # (B, T, E)


def training_loss(model: SentimentLSTM, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                  cfg: FineTuneConfig) -> tuple[torch.Tensor, dict]:
    """Clean loss, plus ``adv_weight`` × the loss on adversarially perturbed embeddings when ``adv_eps > 0``.

    Returns (total loss, {"clean", "adversarial", "last" logits}).
    """
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        emb = model.embedding(ids)  # (B, T, E)
        if cfg.adv_eps > 0 and not emb.requires_grad:
            emb = emb.detach().requires_grad_()  # frozen embedding: still need ∂loss/∂emb
        clean, last = sentiment_loss(step_logits_from_embeddings(model, emb), lengths, labels, cfg.aux_weight)
        parts = {"clean": clean.detach(), "last": last.detach()}
        if cfg.adv_eps <= 0:
            return clean, parts
        scale = float(model.embedding.weight.detach()[1:].float().std())
        r = adversarial_perturbation(clean, emb, cfg.adv_eps, scale)
        adv, _ = sentiment_loss(step_logits_from_embeddings(model, emb + r.to(emb.dtype)), lengths, labels,
                                cfg.aux_weight)
    parts["adversarial"] = adv.detach()
    return clean + cfg.adv_weight * adv, parts


def parameter_groups(model: SentimentLSTM) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """Layer groups from the input up: embedding, LSTM, head."""
    return [("embedding", list(model.embedding.parameters())), ("lstm", list(model.lstm.parameters())),
            ("head", list(model.head.parameters()))]


def unfrozen_groups(epoch: int, gradual: bool) -> int:
    """How many groups (counted from the head down) train in ``epoch`` (1-based)."""
    return min(3, epoch) if gradual else 3


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fine_tune(model: SentimentLSTM, train: tuple[list[list[int]], list[int]], cfg: FineTuneConfig, seed: int,
              state: RunState, timebox: TimeBox, evaluate: Callable[[SentimentLSTM], dict],
              log: Callable[[str], None] = print) -> dict:
    """Fine-tune ``model`` on ``train`` (ids, labels), resumably; leaves the EMA weights in ``model``.

    ``evaluate`` scores a model on the validation split (a metrics dict with ``accuracy``); it runs on
    the raw and the averaged weights after every epoch. Raises :class:`TimeBoxReached` after a
    checkpoint when the time box runs out. Returns the phase report for the model card.
    """
    ids_all, labels_all = train
    device = model_device(model)
    phase = state.phase(PHASE)
    groups = parameter_groups(model)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "name": name, "lr_scale": cfg.group_decay ** -(len(groups) - 1 - i)}
         for i, (name, ps) in enumerate(groups)], lr=cfg.lr, weight_decay=cfg.weight_decay)
    lengths = [len(x) for x in ids_all]
    per_epoch = len(length_buckets(lengths, cfg.batch_size, seed=seed))
    total_steps = per_epoch * cfg.epochs
    warmup = int(cfg.warmup_fraction * total_steps)
    pos = {"epoch": 1, "batch": 0, "step": 0, "loss_sum": 0.0, "adv_sum": 0.0, "correct": 0, "seen": 0,
           "seconds": 0.0}
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    rewarm_from: int | None = None
    small, full = state.load_phase(PHASE)
    report = {"history": phase["history"], "config": asdict(cfg), "exported_weights": "ema"}
    if phase.get("done") and small is not None:
        # Finished earlier: the saved weights are the final (averaged) ones.
        model.load_state_dict(full["weights"] if full else expand(small["weights"]))
        log(f"fine-tuning: finished earlier ({len(phase['history'])} epochs); using its final weights")
        return {**report, "seconds": round(sum(h["seconds"] for h in phase["history"]), 1)}
    if small is not None:
        model.load_state_dict(full["weights"] if full else expand(small["weights"]))
        pos = dict(small["position"])
        set_rng_state(small["rng"])
        if full:
            optimizer.load_state_dict(full["optimizer"])
            ema = {k: v.to(device) for k, v in full["ema"].items()}
            log(f"fine-tuning: resumed exactly at epoch {pos['epoch']}, batch {pos['batch']}/{per_epoch}")
        else:
            rewarm_from = pos["step"]
            ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
            log(f"fine-tuning: resumed from the committed fp16 state at epoch {pos['epoch']}, batch "
                f"{pos['batch']}/{per_epoch}; optimizer and weight average restart (lr re-warms over "
                f"{cfg.rewarm_steps} steps)")
    run_id = state.info.setdefault("run_id", uuid.uuid4().hex)
    phase["config"] = asdict(cfg)

    def checkpoint() -> None:
        phase["position"] = {k: pos[k] for k in ("epoch", "batch", "step")}
        payload = {"run_id": run_id, "step": pos["step"], "position": dict(pos), "rng": rng_state()}
        state.save_phase(PHASE, {**payload, "weights": compact(model.state_dict())},
                         {"run_id": run_id, "step": pos["step"], "weights": model.state_dict(), "ema": ema,
                          "optimizer": optimizer.state_dict()})

    def averaged() -> SentimentLSTM:
        copy = SentimentLSTM(model_config(model))
        copy.load_state_dict(ema)
        return copy.to(device)

    while pos["epoch"] <= cfg.epochs:
        epoch = pos["epoch"]
        batches = length_buckets(lengths, cfg.batch_size, seed=seed + epoch)
        trainable = unfrozen_groups(epoch, cfg.gradual_unfreezing)
        for i, (_, ps) in enumerate(groups):
            for p in ps:
                p.requires_grad_(i >= len(groups) - trainable)
        t_log = time.time()
        while pos["batch"] < len(batches):
            if timebox.expired():
                checkpoint()
                raise TimeBoxReached(PHASE, f"epoch {epoch}, batch {pos['batch']}/{len(batches)}")
            model.train()
            t0 = time.time()
            batch = batches[pos["batch"]]
            ids, lens = pad_batch([ids_all[i] for i in batch])  # (B, T), (B,)
            ids, lens = ids.to(device), lens.to(device)
            y = torch.tensor([labels_all[i] for i in batch], dtype=torch.float32, device=device)  # (B,)
            factor = lr_factor(pos["step"], total_steps, warmup, cfg.min_lr_ratio)
            if rewarm_from is not None:
                factor *= min(1.0, (pos["step"] - rewarm_from + 1) / max(1, cfg.rewarm_steps))
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * group["lr_scale"] * factor
            loss, parts = training_loss(model, ids, lens, y, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, ps in groups for p in ps if p.requires_grad], cfg.clip)
            optimizer.step()
            decay = min(cfg.ema_decay, (1 + pos["step"]) / (10 + pos["step"]))
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(decay).add_(v.float(), alpha=1 - decay)
            pos["batch"] += 1
            pos["step"] += 1
            pos["loss_sum"] += float(parts["clean"]) * len(batch)
            pos["adv_sum"] += float(parts.get("adversarial", 0.0)) * len(batch)
            pos["correct"] += int(((parts["last"] > 0).float() == y).sum())
            pos["seen"] += len(batch)
            pos["seconds"] += time.time() - t0
            timebox.step()
            if cfg.log_every and pos["batch"] % cfg.log_every == 0:
                log(f"fine-tune epoch {epoch} batch {pos['batch']}/{len(batches)}: clean loss "
                    f"{pos['loss_sum'] / pos['seen']:.4f}, adversarial {pos['adv_sum'] / pos['seen']:.4f}, "
                    f"acc {pos['correct'] / pos['seen']:.4f}, {pos['seen'] / pos['seconds']:.0f} reviews/s")
            if timebox.checkpoint_due():
                checkpoint()
        raw = evaluate(model)
        avg = evaluate(averaged())
        entry = {"epoch": epoch, "trainable_groups": [n for i, (n, _) in enumerate(groups) if i >= 3 - trainable],
                 "train_loss": round(pos["loss_sum"] / max(1, pos["seen"]), 5),
                 "train_adversarial_loss": round(pos["adv_sum"] / max(1, pos["seen"]), 5),
                 "train_accuracy": round(pos["correct"] / max(1, pos["seen"]), 5),
                 "val_accuracy": raw["accuracy"], "val_accuracy_ema": avg["accuracy"],
                 "seconds": round(pos["seconds"], 1),
                 "reviews_per_second": round(pos["seen"] / max(1e-9, pos["seconds"]), 1)}
        phase["history"].append(entry)
        log(f"fine-tune epoch {epoch}: {entry} ({time.time() - t_log:.0f}s)")
        pos.update({"epoch": epoch + 1, "batch": 0, "loss_sum": 0.0, "adv_sum": 0.0, "correct": 0, "seen": 0,
                    "seconds": 0.0})
        checkpoint()
    for p in model.parameters():
        p.requires_grad_(True)
    model.load_state_dict(ema)
    phase["done"] = True
    # The phase's state now holds the final (averaged) weights, so export can be re-run from it.
    state.save_phase(PHASE, {"run_id": run_id, "step": pos["step"], "position": dict(pos), "rng": rng_state(),
                             "weights": compact(ema)},
                     {"run_id": run_id, "step": pos["step"], "weights": ema})
    return {**report, "seconds": round(sum(h["seconds"] for h in phase["history"]), 1)}


def model_config(model: SentimentLSTM):
    """The :class:`ModelConfig` of an eager model (to build a same-shaped copy)."""
    from sentiment.model import ModelConfig

    return ModelConfig(model.embedding.num_embeddings, model.embedding.embedding_dim, model.lstm.hidden_size,
                       model.lstm.num_layers, model.dropout.p, model.embedding.padding_idx or 0)
