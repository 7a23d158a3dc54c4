"""Settings shared by the notebooks: quick or full mode, and where results go.

- ``LORAJAX_QUICK=1`` runs a notebook in quick mode (what CI executes): fewer steps, fewer
  settings, a smaller model where the claim allows it. Figures then go to
  ``LORAJAX_RESULTS`` (default: a temporary directory), so quick runs never overwrite
  the committed full-mode results.
- Full mode (the default) writes figures and tables to ``notebooks/results/``.

The model notebooks share their set-up: :func:`load_model` gives SmolLM2-135M-Instruct
(full mode) or a tiny random Llama (quick mode), and :func:`training_data` the batches
of the embedded corpus, and :func:`mean_loss_fn` the loss of a params tree.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

QUICK = os.environ.get("LORAJAX_QUICK", "0") == "1"
HERE = Path(__file__).resolve().parent


def load_model() -> tuple[Any, Any]:
    """``(model, tokenizer)``: the embedded SmolLM2-135M-Instruct in full mode; in quick
    mode a tiny random Llama (2 layers, width 64) with a byte-level tokenizer, which
    checks a notebook's code in seconds but measures nothing."""
    from flax import nnx

    from lorajax import models

    if not QUICK:
        return models.load()
    config = models.LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return models.Llama(config, rngs=nnx.Rngs(0)), models.Tokenizer.byte_level()


def training_data(
    tokenizer: Any, *, seq_len: int, batch_size: int, steps: int, eval_batches: int
) -> tuple[Any, list[Any], list[Any]]:
    """``(train_set, batches, evals)`` from the embedded corpus (its first 20 documents in
    quick mode): the first ``steps`` training batches in a fixed order (seed 0), and the
    first ``eval_batches`` batches of the held-out documents."""
    from lorajax import data

    texts = data.default_corpus()
    texts = texts[:20] if QUICK else texts
    train_set, eval_set = data.make_datasets(texts, tokenizer, seq_len=seq_len, seed=0)
    iterator = data.BatchIterator(train_set, batch_size, seed=0)
    batches = [batch for _, batch in zip(range(steps), iterator)]
    evals = data.eval_batches(eval_set, batch_size)[:eval_batches]
    return train_set, batches, evals


def mean_loss_fn(model: Any) -> Any:
    """``loss(params, tokens)``: the mean next-token cross-entropy of ``model`` with its
    ``nnx.Param`` values replaced by ``params`` (a nested dict, as the Trainer holds)."""
    from flax import nnx

    from lorajax import train

    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss(params: Any, tokens: Any) -> Any:
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        total, count = train.next_token_loss(logits, tokens)
        return total / count

    return loss


def results_dir() -> Path:
    """Where this run writes its figures and tables (created if needed)."""
    default = Path(tempfile.gettempdir()) / "lorajax-quick" if QUICK else HERE / "results"
    path = Path(os.environ.get("LORAJAX_RESULTS", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig: Any, name: str) -> Path:
    """Saves a matplotlib figure as ``<results>/<name>.png`` and returns the path."""
    path = results_dir() / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def save_table(rows: Any, name: str) -> Path:
    """Saves JSON-serialisable results as ``<results>/<name>.json``."""
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path
