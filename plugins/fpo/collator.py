"""Batches of preference pairs plus their cached reference values.

Built on ``fpo_recipes.data.collate_pairs`` (chosen then rejected, stacked [2B, T]) so the
padding and response masks match the precompute stage exactly. Cache columns become
tensors under ``ref_*`` keys; the trainer pops every key before the model's forward, so
nothing reaches ``model.forward`` that it does not take (the TRL #3349 trap).
"""

from __future__ import annotations

import torch

from fpo_recipes.data import collate_pairs


class FPOCollator:
    """Collate rows of the plugin's data set.

    Output: ``input_ids``, ``attention_mask``, ``response_mask`` [2B, T] and, when the rows
    carry them, ``ref_logps`` [2B] (float64 sums), ``ref_sae_indices`` / ``ref_sae_values`` [2B, n_layers, k_cache] and
    ``ref_target_values`` [2B, n_layers, n_targeted] — first B rows chosen, next B rejected.
    Axolotl's builder passes the tokenizer and padding kwargs; padding is right-padding to
    the longest sequence, optionally up to a multiple of ``pad_to_multiple_of``.
    """

    def __init__(self, tokenizer=None, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None, **_ignored):
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(tokenizer, "eos_token_id", None)
        if pad_token_id is None:
            raise ValueError("FPOCollator needs a pad token id (the tokenizer has neither pad nor eos)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad_width(self, batch: dict) -> dict:
        m = self.pad_to_multiple_of
        width = batch["input_ids"].shape[1]
        if not m or width % m == 0:
            return batch
        extra = m - width % m
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=self.pad_token_id)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
        batch["response_mask"] = torch.nn.functional.pad(batch["response_mask"], (0, extra), value=False)
        return batch

    def __call__(self, rows: list[dict]) -> dict:
        batch = self._pad_width(collate_pairs(rows, self.pad_token_id))
        first = rows[0]
        if "ref_chosen_logps" in first:
            batch["ref_logps"] = torch.tensor(
                [r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows], dtype=torch.float64
            )
        if "chosen_sae_indices" in first:
            batch["ref_sae_indices"] = torch.tensor(
                [r["chosen_sae_indices"] for r in rows] + [r["rejected_sae_indices"] for r in rows], dtype=torch.long
            )
            batch["ref_sae_values"] = torch.tensor(
                [r["chosen_sae_values"] for r in rows] + [r["rejected_sae_values"] for r in rows], dtype=torch.float32
            )
            targets = [r["chosen_target_values"] for r in rows] + [r["rejected_target_values"] for r in rows]
            n_layers = len(first["chosen_sae_indices"])
            batch["ref_target_values"] = torch.tensor(
                [t if any(len(x) for x in t) else [[]] * n_layers for t in targets], dtype=torch.float32
            ).reshape(len(targets), n_layers, -1)
        return batch
