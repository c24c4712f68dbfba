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
- Optionally (issue 28): **normalised embeddings** and **virtual adversarial training** on unlabelled
  reviews (:mod:`training.adversarial`), and **distillation**: binary cross-entropy between the
  model's last-token prediction and a teacher's probability (an ensemble of exported models, or a
  larger one) on the same unlabelled batches.

Resumable mid-epoch like the language model: :class:`FineTunePhase` supplies the step and the
epoch's evaluation to the shared loop (``training/loop.py``), which owns resuming, the learning-rate
schedule, checkpoints and the time box.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from sentiment.batching import length_buckets
from sentiment.model import ModelConfig, SentimentLSTM, pad_batch
from training.adversarial import (
    NormalisedEmbedding,
    bake,
    fold_normalisation,
    last_logit,
    plain_embedding,
    step_logits_from_embeddings,
    unit,
    virtual_adversarial_loss,
)
from training.loop import (
    LRSchedule,
    PhasePlan,
    Position,
    TrainingLoop,
    TrainingPhase,
    training_seconds,
)
from training.state import RunState, TimeBox, model_device

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
    normalise_embeddings: bool = False  # the LSTM reads frequency-normalised embeddings (training.adversarial)
    vat_eps: float = 0.0  # virtual adversarial training on unlabelled reviews (0: off)
    vat_weight: float = 1.0
    vat_xi: float = 0.1  # norm of the power iteration's random start
    distill_weight: float = 0.0  # BCE to a teacher's probabilities on the unlabelled reviews (0: off)
    aux_weight: float = 0.2
    clip: float = 1.0
    bf16: bool = False
    log_every: int = 100


def sentiment_loss(step: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                   aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE on the last real token plus ``aux_weight`` × BCE averaged over all real timesteps.

    The per-step term (target replication, Lipton et al. 2015) gives every step a gradient, which
    helps a long LSTM train and makes the trace meaningful early in a review. Returns (loss, last logits (B,)).
    """
    step = step.float()
    last = last_logit(step, lengths)  # (B,)
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
    return (eps * scale) * unit(g.detach())  # (B, T, E)


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
        # Normalised embeddings are in the paper's units already; raw ones are scaled by their spread.
        normalised = isinstance(model.embedding, NormalisedEmbedding)
        scale = 1.0 if normalised else float(model.embedding.weight.detach()[1:].float().std())
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


@dataclass
class FineTuneTally:
    """An epoch's running sums: clean and adversarial loss (× reviews), correct predictions, reviews seen."""

    loss_sum: float = 0.0
    adv_sum: float = 0.0
    vat_sum: float = 0.0  # VAT loss × unlabelled batches (a batch mean each)
    distill_sum: float = 0.0  # distillation loss, the same way
    correct: int = 0
    seen: int = 0


class FineTunePhase(TrainingPhase[FineTuneTally]):
    """Sentiment fine-tuning with layer-group rates, gradual unfreezing and a weight average (EMA)."""

    tally_type = FineTuneTally
    extendable = False  # its final checkpoint holds the average, not the weights it trains

    def __init__(self, model: SentimentLSTM, train: tuple[list[list[int]], list[int]], cfg: FineTuneConfig,
                 seed: int, evaluate: Callable[[SentimentLSTM], dict], unlabelled: Sequence[Sequence[int]] = (),
                 freqs: torch.Tensor | None = None, teacher: Sequence[float] | None = None) -> None:
        self.model, self.cfg, self.seed, self.evaluate = model, cfg, seed, evaluate
        self.ids, self.labels = train
        self.freqs = freqs
        if cfg.normalise_embeddings:
            if freqs is None:
                raise ValueError("normalised embeddings need the word frequencies")
            fold_normalisation(model, freqs)  # before the optimizer sees the parameters
        if (cfg.vat_eps > 0 or cfg.distill_weight > 0) and not unlabelled:
            raise ValueError("virtual adversarial training and distillation need unlabelled reviews")
        if cfg.distill_weight > 0 and (teacher is None or len(teacher) != len(unlabelled)):
            raise ValueError("distillation needs a teacher probability for every unlabelled review")
        self.unlabelled, self.teacher = unlabelled, teacher
        self.unlabelled_lengths = [len(x) for x in unlabelled]
        self.unlabelled_batches: list[list[int]] = []
        self.groups = parameter_groups(model)
        # The head gets ``lr``, each group below it ``group_decay`` times less (ULMFiT).
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "name": name, "lr_scale": cfg.group_decay ** -(len(self.groups) - 1 - i)}
             for i, (name, ps) in enumerate(self.groups)], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lengths = [len(x) for x in self.ids]
        per_epoch = len(length_buckets(self.lengths, cfg.batch_size, seed=seed))
        total = per_epoch * cfg.epochs
        schedule = LRSchedule(cfg.lr, total, int(cfg.warmup_fraction * total), cfg.min_lr_ratio, cfg.rewarm_steps)
        self.plan = PhasePlan(PHASE, "fine-tuning", "batch", cfg.epochs, per_epoch, schedule, cfg.clip, cfg.log_every,
                              fresh_after_fp16_resume="the optimizer's moments and the weight average")
        self.ema = self.copy_of_weights()
        self.batches: list[list[int]] = []
        self.trainable = len(self.groups)  # layer groups training this epoch, counted from the head down

    def record_fields(self) -> dict:
        return {"config": asdict(self.cfg)}

    def copy_of_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)

    def restore(self, compact_state: dict, exact_state: dict | None) -> None:
        device = model_device(self.model)
        self.ema = {k: v.to(device) for k, v in exact_state["ema"].items()} if exact_state else self.copy_of_weights()

    def exact_extras(self) -> dict:
        return {"ema": self.ema}

    def start_epoch(self, position: Position[FineTuneTally]) -> int:
        self.batches = length_buckets(self.lengths, self.cfg.batch_size, seed=self.seed + position.epoch)
        if self.uses_unlabelled:  # a new draw of unlabelled batches every epoch, reproducible from the epoch
            self.unlabelled_batches = length_buckets(self.unlabelled_lengths, self.cfg.batch_size,
                                                     seed=self.seed + 7919 * position.epoch)
        self.trainable = unfrozen_groups(position.epoch, self.cfg.gradual_unfreezing)
        for i, (_, ps) in enumerate(self.groups):
            for p in ps:
                p.requires_grad_(i >= len(self.groups) - self.trainable)
        return len(self.batches)

    def batch_loss(self, position: Position[FineTuneTally]) -> torch.Tensor:
        self.model.train()
        device = model_device(self.model)
        batch = self.batches[position.batch]
        ids, lens = pad_batch([self.ids[i] for i in batch])  # (B, T), (B,)
        ids, lens = ids.to(device), lens.to(device)
        y = torch.tensor([self.labels[i] for i in batch], dtype=torch.float32, device=device)  # (B,)
        loss, parts = training_loss(self.model, ids, lens, y, self.cfg)
        tally = position.tally
        tally.loss_sum += float(parts["clean"]) * len(batch)
        tally.adv_sum += float(parts.get("adversarial", 0.0)) * len(batch)
        tally.correct += int(((parts["last"] > 0).float() == y).sum())
        tally.seen += len(batch)
        if self.uses_unlabelled:
            loss = loss + self.unlabelled_loss(position, len(batch))
        return loss

    @property
    def uses_unlabelled(self) -> bool:
        return self.cfg.vat_eps > 0 or self.cfg.distill_weight > 0

    def unlabelled_loss(self, position: Position[FineTuneTally], labelled: int) -> torch.Tensor:
        """VAT and distillation on this step's batch of unlabelled reviews (tallied per labelled review)."""
        device, cfg, tally = model_device(self.model), self.cfg, position.tally
        pick = self.unlabelled_batches[position.batch % len(self.unlabelled_batches)]
        ids, lens = pad_batch([list(self.unlabelled[i]) for i in pick])
        ids, lens = ids.to(device), lens.to(device)
        loss = torch.zeros((), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            if cfg.vat_eps > 0:
                vat = virtual_adversarial_loss(self.model, ids, lens, cfg.vat_eps, cfg.vat_xi)
                tally.vat_sum += float(vat.detach()) * labelled
                loss = loss + cfg.vat_weight * vat
            if cfg.distill_weight > 0:
                target = torch.tensor([self.teacher[i] for i in pick], dtype=torch.float32, device=device)
                student = last_logit(step_logits_from_embeddings(self.model, self.model.embedding(ids)), lens)
                distill = F.binary_cross_entropy_with_logits(student.float(), target)
                tally.distill_sum += float(distill.detach()) * labelled
                loss = loss + cfg.distill_weight * distill
        return loss

    def after_step(self, position: Position[FineTuneTally]) -> None:
        # The average forgets fast at first (decay (1+t)/(10+t)), so early weights do not linger in it.
        decay = min(self.cfg.ema_decay, (1 + position.step) / (10 + position.step))
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if v.is_floating_point():
                    self.ema[k].mul_(decay).add_(v.float(), alpha=1 - decay)

    def progress(self, position: Position[FineTuneTally]) -> str:
        t = position.tally
        return (f"clean loss {t.loss_sum / t.seen:.4f}, adversarial {t.adv_sum / t.seen:.4f}, "
                f"vat {t.vat_sum / t.seen:.4f}, "
                f"acc {t.correct / t.seen:.4f}, {t.seen / position.seconds:.0f} reviews/s")

    def end_epoch(self, position: Position[FineTuneTally]) -> dict:
        raw = self.evaluate(self.model)
        avg = self.evaluate(self.averaged())
        t, seen = position.tally, max(1, position.tally.seen)
        frozen = len(self.groups) - self.trainable
        return {"trainable_groups": [name for name, _ in self.groups[frozen:]],
                "train_loss": round(t.loss_sum / seen, 5), "train_adversarial_loss": round(t.adv_sum / seen, 5),
                **({"train_vat_loss": round(t.vat_sum / seen, 5)} if self.cfg.vat_eps > 0 else {}),
                **({"train_distill_loss": round(t.distill_sum / seen, 5)} if self.cfg.distill_weight > 0 else {}),
                "train_accuracy": round(t.correct / seen, 5),
                "val_accuracy": raw["accuracy"], "val_accuracy_ema": avg["accuracy"],
                "seconds": round(position.seconds, 1),
                "reviews_per_second": round(t.seen / max(1e-9, position.seconds), 1)}

    def averaged(self) -> SentimentLSTM:
        """A copy of the model holding the weight average."""
        copy = SentimentLSTM(model_config(self.model))
        copy.load_state_dict(self.final_weights())
        return copy.to(model_device(self.model))

    def final_weights(self) -> dict[str, torch.Tensor]:
        """The average as a plain model's weights (the normalisation baked into the embedding)."""
        return bake(self.ema, self.freqs) if self.cfg.normalise_embeddings else self.ema

    def finish(self) -> dict[str, torch.Tensor]:
        """The average is what gets exported: it goes into the model and the phase's final checkpoint."""
        for p in self.model.parameters():
            p.requires_grad_(True)
        final = self.final_weights()
        plain_embedding(self.model)
        self.model.load_state_dict(final)
        return final


def fine_tune(model: SentimentLSTM, train: tuple[list[list[int]], list[int]], cfg: FineTuneConfig, seed: int,
              state: RunState, timebox: TimeBox, evaluate: Callable[[SentimentLSTM], dict],
              log: Callable[[str], None] = print, unlabelled: Sequence[Sequence[int]] = (),
              freqs: torch.Tensor | None = None, teacher: Sequence[float] | None = None) -> dict:
    """Fine-tune ``model`` on ``train`` (ids, labels), resumably; leaves the EMA weights in ``model``.

    ``evaluate`` scores a model on the validation split (a metrics dict with ``accuracy``); it runs on
    the raw and the averaged weights after every epoch. ``unlabelled`` (id sequences, truncated like
    the classifier's input) feeds virtual adversarial training; ``freqs`` (per id) the embedding
    normalisation; ``teacher`` (one probability per unlabelled review) the distillation. Raises :class:`TimeBoxReached` after a
    checkpoint when the time box runs out. Returns the phase report for the model card.
    """
    record = state.phase(PHASE)
    phase = FineTunePhase(model, train, cfg, seed, evaluate, unlabelled, freqs, teacher)
    TrainingLoop(phase, state, timebox, log).run()
    plain_embedding(model)  # a run finished earlier loaded its final (baked) weights into the wrapper
    return {"history": record["history"], "config": asdict(cfg), "exported_weights": "ema",
            "seconds": training_seconds(record["history"])}


def model_config(model: SentimentLSTM) -> ModelConfig:
    """The :class:`ModelConfig` of an eager model (to build a same-shaped copy)."""
    return ModelConfig(model.embedding.num_embeddings, model.embedding.embedding_dim, model.lstm.hidden_size,
                       model.lstm.num_layers, model.dropout.p, model.embedding.padding_idx or 0)
