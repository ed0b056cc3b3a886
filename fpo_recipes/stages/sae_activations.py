"""Activations for SAE training, streamed: corpus texts → tokens → the model's hook point →
activation vectors, as an endless iterator of ``[n, d_in]`` float32 chunks (CPU).

- The hook point is the module FPO reads (:func:`fpo_recipes.hooks.hook_module`, per model
  family), and the forward stops right after it: nothing of the model past the SAE layer
  runs, the LM head least of all.
- Texts are either one sequence each (cut at ``data.max_length``, padded and masked — the
  shape FPO's pairs have) or packed into ``context_size`` windows with sae-lens's own
  ``concat_and_batch_sequences`` (BOS first, texts separated by BOS, or EOS without one).
- BOS, padding and other special tokens are dropped: they fire features hugely, and FPO
  masks them too.
- The corpus is read epoch after epoch. An epoch read from its first text whose vectors fit
  in ``replay_bytes`` is kept, and later epochs replay it, reshuffled, instead of running the
  model again: a small corpus (the recipe's own pairs) costs one pass, a large one streams.
- :meth:`ActivationStream.state` / :meth:`~ActivationStream.restore` give the position
  (epoch, texts read) for resuming from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch

from fpo_recipes.hooks import first_tensor

REPLAY_BYTES = 2 << 30  # an epoch's activations kept for replay, at most (2 GiB)
REPLAY_CHUNK = 4096  # vectors per chunk when replaying

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the hooked module is needed."""


# --- the corpus --------------------------------------------------------------------------
def corpus_texts(recipe, tokenizer) -> tuple[Callable[[], Iterator[str]], str]:
    """(a function giving one epoch of the corpus's texts, a description of the corpus).

    ``corpus: data`` — the recipe's training pairs, prompt + chosen and prompt + rejected,
    templated exactly as precompute and training see them. Otherwise any text source
    `datasets` reads (``sae.train.corpus.path``), column ``text_column``."""
    corpus = recipe.sae.train.corpus
    if corpus == "data":
        from fpo_recipes.data import load_preference_data

        pairs = load_preference_data(recipe, "train", tokenizer)

        def pair_texts() -> Iterator[str]:
            for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
                yield prompt + chosen
                yield prompt + rejected

        return pair_texts, f"the recipe's training pairs ({len(pairs)} pairs)"
    ds = _load_corpus(recipe, corpus)
    column = corpus.text_column

    def source_texts() -> Iterator[str]:
        rows = islice(iter(ds), corpus.limit) if corpus.limit else iter(ds)
        for row in rows:
            if column not in row:
                raise ValueError(f"sae.train.corpus.text_column: {column!r} is not in the data (columns: {', '.join(row)})")
            text = row[column]
            if isinstance(text, str) and text.strip():
                yield text

    return source_texts, corpus.path


def _load_corpus(recipe, corpus):
    import datasets

    from fpo_recipes.data import quiet_datasets

    location = recipe.resolve_input(corpus.path)
    path = Path(location)
    local = path.exists()
    streaming = corpus.streaming if corpus.streaming is not None else not local
    with quiet_datasets():
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"sae.train.corpus.path: {path} has an unknown extension (expected {', '.join(_FILE_BUILDERS)})")
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
        if path.is_dir():
            try:
                ds = datasets.load_from_disk(str(path))
            except FileNotFoundError:  # a folder of data files rather than a saved data set
                return datasets.load_dataset(str(path), split=corpus.split, streaming=streaming)
            return ds[corpus.split] if isinstance(ds, datasets.DatasetDict) else ds
        if location.startswith((".", "/", "~")) or path.suffix:
            raise ValueError(f"sae.train.corpus.path: {location} does not exist")
        return datasets.load_dataset(location, split=corpus.split, streaming=streaming)


# --- the stream --------------------------------------------------------------------------
class ActivationStream:
    """Endless activation chunks of ``module``'s output in ``model`` over the corpus."""

    def __init__(self, model: torch.nn.Module, tokenizer, texts: Callable[[], Iterable[str]], module: torch.nn.Module, *,
                 context_size: int | None, max_length: int, batch_size: int, seed: int = 0,
                 replay_bytes: int = REPLAY_BYTES):
        self.model, self.tokenizer, self.texts, self.module = model, tokenizer, texts, module
        self.context_size, self.max_length, self.batch_size = context_size, max_length, batch_size
        self.replay_bytes = replay_bytes
        self.epoch, self.position = 0, 0  # texts read in the current epoch
        self.replaying = False
        self._replay: torch.Tensor | None = None
        self._skip = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self._device = next(model.parameters()).device

    # -- resuming --
    def state(self) -> dict:
        return {"epoch": self.epoch, "texts": 0 if self.replaying else self.position}

    def restore(self, state: dict) -> None:
        """Continue at ``state`` (texts already read in that epoch are skipped unread by the model)."""
        self.epoch, self._skip = int(state.get("epoch", 0)), int(state.get("texts", 0))

    # -- iteration --
    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            if self._replay is not None:
                self.replaying = True
                order = torch.randperm(self._replay.shape[0], generator=self._generator)
                for start in range(0, len(order), REPLAY_CHUNK):
                    yield self._replay[order[start: start + REPLAY_CHUNK]]
                self.epoch += 1
                continue
            whole = self._skip == 0  # an epoch read from its first text can be kept for replay
            kept: list[torch.Tensor] | None = [] if whole else None
            size, produced = 0, False
            for chunk in self._read_epoch():
                produced = True
                if kept is not None:
                    size += chunk.numel() * chunk.element_size()
                    if size <= self.replay_bytes:
                        kept.append(chunk)
                    else:
                        kept = None
                yield chunk
            if not produced:
                raise ValueError("sae.train.corpus: the corpus has no tokens to train on (every text is empty or special tokens)")
            if kept is not None:
                self._replay = torch.cat(kept)
            self.epoch, self.position = self.epoch + 1, 0

    def _texts(self) -> Iterator[str]:
        skip, self._skip, self.position = self._skip, 0, 0
        for text in self.texts():
            self.position += 1
            if self.position > skip:
                yield text

    def _read_epoch(self) -> Iterator[torch.Tensor]:
        if self.context_size is None:
            yield from self._per_text()
        else:
            yield from self._packed()

    def _per_text(self) -> Iterator[torch.Tensor]:
        bos = self.tokenizer.bos_token
        texts = self._texts()
        while batch := list(islice(texts, self.batch_size)):
            # Templated texts may already start with the BOS text: never add a second BOS.
            add_special = not (bos and all(t.startswith(bos) for t in batch))
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                                 add_special_tokens=add_special)
            yield from self._activations(enc["input_ids"], enc["attention_mask"])

    def _packed(self) -> Iterator[torch.Tensor]:
        from sae_lens.tokenization_and_batching import concat_and_batch_sequences

        tok = self.tokenizer
        bos = tok.bos_token_id
        separator = bos if bos is not None else tok.eos_token_id

        def token_ids() -> Iterator[torch.Tensor]:
            for text in self._texts():
                ids = tok(text, add_special_tokens=not (tok.bos_token and text.startswith(tok.bos_token)))["input_ids"]
                if ids:
                    yield torch.tensor(ids, dtype=torch.long)

        windows = concat_and_batch_sequences(token_ids(), self.context_size, begin_batch_token_id=bos,
                                             sequence_separator_token_id=separator)
        while batch := list(islice(windows, self.batch_size)):
            ids = torch.stack(batch)
            yield from self._activations(ids, torch.ones_like(ids))

    @torch.no_grad()
    def _activations(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}

        def capture(_mod, _inputs, output):
            captured["h"] = first_tensor(output)
            raise _StopForward

        handle = self.module.register_forward_hook(capture)
        try:
            self.model(input_ids=input_ids.to(self._device), attention_mask=attention_mask.to(self._device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        keep = attention_mask.bool() & ~torch.isin(input_ids, self._special)
        acts = captured["h"].float().cpu()[keep]
        if acts.shape[0]:
            yield acts
