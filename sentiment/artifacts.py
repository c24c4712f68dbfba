"""Artifacts: TorchScript model + vocabulary + model card, written together and loaded back with checks.

The artifact directory is the only contract between training and serving:

    model.pt          TorchScript SentimentLSTM: forward(ids (B,T), lengths (B,)) → (last (B,), steps (B,T))
    vocab.json        Vocabulary with the tokenizer settings it was built with
    model_card.json   version, architecture, hyper-parameters, data checksum, metrics, file checksums
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sentiment.text import TextPipelineError, Vocabulary

MODEL_FILE, VOCAB_FILE, CARD_FILE = "model.pt", "vocab.json", "model_card.json"


class ArtifactError(RuntimeError):
    """An artifacts directory is missing a file, is corrupt, or its parts do not match."""


@dataclass
class Artifacts:
    """A loaded model, its vocabulary and its model card."""

    model: torch.jit.ScriptModule
    vocab: Vocabulary
    card: dict[str, Any]
    device: torch.device


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in chunks (artifact checksums, the training data's checksum)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cpu_model() -> str:
    """The CPU's model name (Linux), for model cards and benchmark reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX-512 BF16 or AMX), which oneDNN's bf16 LSTM needs.

    Without them (e.g. an AVX2-only AMD EPYC), bf16 autocast of ``nn.LSTM`` fails in oneDNN ("could not
    create a primitive descriptor"), and PyTorch's fallback LSTM in bf16 ran 40× slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def export_artifacts(model: torch.nn.Module, vocab: Vocabulary, card: dict[str, Any], out_dir: str | Path) -> Path:
    """Script ``model`` (on CPU, eval mode) and write it with ``vocab`` and ``card`` to ``out_dir``.

    File checksums go into the card so that a mismatched or corrupted file is caught at load time.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(model.cpu().eval())
    scripted.save(str(out / MODEL_FILE))
    vocab.save(out / VOCAB_FILE)
    card = dict(card)
    card["vocab_size"] = len(vocab)
    card["tokenizer"] = asdict(vocab.settings)
    card["files"] = {name: file_sha256(out / name) for name in (MODEL_FILE, VOCAB_FILE)}
    (out / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device (``cpu``, ``cuda:0`` …)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"device {name!r} requested but CUDA is not available")
    return device


def load_artifacts(directory: str | Path, device: str | torch.device = "auto") -> Artifacts:
    """Load and cross-check an artifacts directory; raise :class:`ArtifactError` on any problem."""
    root = Path(directory)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    for name in (MODEL_FILE, VOCAB_FILE, CARD_FILE):
        if not (root / name).is_file():
            raise ArtifactError(f"artifact {root / name} is missing")
    try:
        card = json.loads((root / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"model card {root / CARD_FILE} is not valid JSON: {exc}") from exc
    for name, expected in card.get("files", {}).items():
        if (root / name).is_file() and file_sha256(root / name) != expected:
            raise ArtifactError(f"{root / name} does not match the checksum in the model card (corrupt or mixed files)")
    try:
        vocab = Vocabulary.load(root / VOCAB_FILE)
    except TextPipelineError as exc:
        raise ArtifactError(str(exc)) from exc
    if card.get("vocab_size") not in (None, len(vocab)):
        raise ArtifactError(f"model card says vocab_size={card['vocab_size']} but vocab.json has {len(vocab)} tokens")
    try:
        model = torch.jit.load(str(root / MODEL_FILE), map_location=dev)
    except Exception as exc:  # torch raises RuntimeError/ValueError/… for a bad file
        raise ArtifactError(f"cannot load TorchScript model {root / MODEL_FILE}: {exc}") from exc
    model.eval()
    rows = model.embedding.weight.shape[0]
    if rows != len(vocab):
        raise ArtifactError(f"model embedding has {rows} rows but the vocabulary has {len(vocab)} tokens")
    return Artifacts(model, vocab, card, dev)
