"""Time one language-model step and one fine-tuning step on real reviews, in fp32 and bf16 autocast.

    python -m training.speed --hidden-size 384 --precision fp32 bf16

For choosing a model size and the --precision of ``training.train`` on a given machine. Reviews come
from the tokenised-corpus cache (run ``training.train`` once first, or it is built here). Run it
while nothing else heavy runs: the figures are per-core throughput, and contention halves them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence

import numpy as np
import torch

from sentiment.model import ModelConfig, SentimentLSTM, pad_batch
from sentiment.text import TokenizerSettings, Vocabulary
from training.data import load_tokenized
from training.finetune import FineTuneConfig, training_loss
from training.pretrain import NextTokenHead, batchify, build_stream, lm_chunk_loss


def time_lm(model: SentimentLSTM, data: torch.Tensor, bptt: int, bf16: bool, steps: int) -> float:
    """Tokens per second of full language-model training steps (forward, softmax, backward, AdamW)."""
    head = NextTokenHead(model.lstm.hidden_size, model.embedding.num_embeddings)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    hidden, times = None, []
    model.train()
    for i in range(steps + 1):
        x, y = data[:, i * bptt : (i + 1) * bptt], data[:, i * bptt + 1 : (i + 1) * bptt + 1]
        t = time.perf_counter()
        loss, _, hidden = lm_chunk_loss(model, head, x, y, hidden, 0.1, bf16)
        hidden = (hidden[0].detach().float(), hidden[1].detach().float())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        times.append(time.perf_counter() - t)
    return data.size(0) * bptt / statistics.median(times[1:])  # the first step warms up oneDNN


def time_finetune(model: SentimentLSTM, reviews: list[list[int]], batch_size: int, cfg: FineTuneConfig,
                  steps: int) -> float:
    """Reviews per second of fine-tuning steps (adversarial when ``cfg.adv_eps > 0``)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    model.train()
    for i in range(steps + 1):
        batch = reviews[i * batch_size : (i + 1) * batch_size]
        ids, lens = pad_batch(batch)
        y = torch.tensor([j % 2 for j in range(len(batch))], dtype=torch.float32)
        t = time.perf_counter()
        loss, _ = training_loss(model, ids, lens, y, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return batch_size / statistics.median(times[1:])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    p.add_argument("--cache-dir", default=".cache", help="tokenised-corpus cache (as training.train)")
    p.add_argument("--embedding-dim", type=int, default=200, help="embedding size")
    p.add_argument("--hidden-size", type=int, nargs="+", default=[384], help="LSTM hidden sizes to time")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="precisions to time (bf16: torch.autocast on CPU)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per measurement (after one warm-up step)")
    p.add_argument("--adv-eps", type=float, default=5.0, help="adversarial epsilon of the fine-tuning step (0: off)")
    p.add_argument("--workers", type=int, default=2, help="tokenisation processes if the cache is cold")
    args = p.parse_args(argv)

    corpus = load_tokenized(args.data, TokenizerSettings(max_tokens=400), args.cache_dir, args.workers)
    vocab = Vocabulary.build(corpus.tokens["train"], TokenizerSettings(max_tokens=400), 3, 25_000)
    texts = [np.asarray(vocab.lookup(t), dtype=np.int32) for t in corpus.tokens["unsup"][:3000]]
    data = batchify(build_stream(texts, 0, 1), 64)  # (64, cols): the LM's real batch shape
    reviews = [vocab.encode_tokens(t).ids for t in corpus.tokens["train"][: 64 * (args.steps + 1)]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for hidden in args.hidden_size:
        for precision in args.precision:
            bf16 = precision == "bf16"
            torch.manual_seed(0)
            model = SentimentLSTM(ModelConfig(len(vocab), args.embedding_dim, hidden))
            try:
                lm = time_lm(model, data, 80, bf16, args.steps)
                ft = time_finetune(model, reviews, 64, FineTuneConfig(adv_eps=args.adv_eps, bf16=bf16), args.steps)
                print(f"H{hidden} {precision}: language model {lm:,.0f} tokens/s; fine-tuning "
                      f"{ft:.0f} reviews/s (adversarial eps {args.adv_eps:g})", flush=True)
            except RuntimeError as exc:
                print(f"H{hidden} {precision}: fails on this machine: {str(exc).splitlines()[0][:120]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
