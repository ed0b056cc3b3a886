"""Hyper-parameters of a preference objective.

The defaults here are the only ones: the recipe schema (``objective:``) reads them too.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import get_method

POOLING_MODES: tuple[str, ...] = ("mean", "sum")

DEFAULT_ALPHA = 0.5  # the paper's α for FPO (and TDPO-2's)
DEFAULT_K = 64
# The authors' code sums over response tokens (Eq. 10); the paper's text says average.
DEFAULT_POOLING = "sum"
DEFAULT_STOP_GRADIENT = True


@dataclass(frozen=True)
class ObjectiveConfig:
    """Configuration of ``u = LPD − margin − constraint``, ``loss = −log σ(u)``.

    - ``method``: one of ``dpo, simpo, tdpo1, tdpo2, simpo_kl, fpo`` (see :mod:`.registry`).
    - ``beta`` (β): reward scale, in LPD, the reference margins and the constraints.
    - ``alpha`` (α): constraint weight for TDPO-2, SimPO+KL and FPO (unused by TDPO-1).
    - ``gamma`` (γ): constant target margin for SimPO and SimPO+KL.
    - ``k``: top-k of the FPO feature index set; D is normalised by 1/k.
    - ``pooling``: ``mean`` or ``sum`` of SAE activations over response tokens.
    - ``stop_gradient``: sg(·) on the chosen side's constraint (TDPO-2, SimPO+KL, FPO).
    """

    method: str
    beta: float
    alpha: float = DEFAULT_ALPHA
    gamma: float = 0.0
    k: int = DEFAULT_K
    pooling: str = DEFAULT_POOLING
    stop_gradient: bool = DEFAULT_STOP_GRADIENT

    def __post_init__(self) -> None:
        get_method(self.method)  # ValueError listing valid names
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")

    @property
    def spec(self):
        """The :class:`~.registry.MethodSpec` of ``method``."""
        return get_method(self.method)
