"""Hyper-parameters of a preference objective.

The defaults here are the only ones: the recipe schema (``objective:``) reads them too.

FPO's feature constraint has three choices on which the paper's text, its Eq. 10 and the
authors' released code differ; each is a named mode (see :mod:`.features` for the formulas):

- ``pooling`` over response tokens: ``mean`` (the paper's text, "average pooling"), ``sum``
  (Eq. 10 as written), ``padded_mean`` (the released code: the response sum divided by T − 1,
  T = the padded length of the pair).
- ``feature_set``: ``union`` = topk(policy) ∪ topk(reference) (Eq. 10), ``policy`` = topk(policy)
  only, the reference read at those indices (the released code).
- ``normalisation`` of the squared differences: ``mean`` over the selected features (an MSE:
  the paper's text, and the released code, whose set always has k members), ``k`` = 1/k times
  the sum over the set (Eq. 10; with ``union`` the set has between k and 2k members).
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import get_method

POOLING_MODES: tuple[str, ...] = ("mean", "sum", "padded_mean")
FEATURE_SETS: tuple[str, ...] = ("union", "policy")
NORMALISATIONS: tuple[str, ...] = ("mean", "k")

DEFAULT_ALPHA = 0.5  # the paper's α for FPO (and TDPO-2's)
DEFAULT_K = 50  # the paper's Fig. 2 ("top-50") and the released code's hard-coded k
DEFAULT_POOLING = "mean"  # the paper's text; D stays on one scale whatever the response length
# Eq. 10's union: a feature the reference uses and the policy drops is constrained too (with
# `policy` it leaves the set the moment it falls out of the policy's top-k).
DEFAULT_FEATURE_SET = "union"
# An MSE, as the paper's text says: the scale of D does not grow with how far the two top-k sets
# have drifted apart (1/k over a union of up to 2k features does), and equals the released
# code's mean over its k features when the sets agree.
DEFAULT_NORMALISATION = "mean"
DEFAULT_STOP_GRADIENT = True


@dataclass(frozen=True)
class ObjectiveConfig:
    """Configuration of ``u = LPD − margin − constraint``, ``loss = −log σ(u)``.

    - ``method``: one of ``dpo, simpo, tdpo1, tdpo2, simpo_kl, fpo`` (see :mod:`.registry`).
    - ``beta`` (β): reward scale, in LPD, the reference margins and the constraints.
    - ``alpha`` (α): constraint weight for TDPO-2, SimPO+KL and FPO (unused by TDPO-1).
    - ``gamma`` (γ): constant target margin for SimPO and SimPO+KL, absolute: u = LPD − γ.
    - ``gamma_beta_ratio``: the same margin given as γ/β (SimPO's code and the FPO authors'
      code write u = β·(Δ − γ)); the margin used is then ``gamma_beta_ratio · beta``. At most
      one of the two (see :attr:`target_margin`).
    - ``k``: top-k of the FPO feature index set.
    - ``pooling``: ``mean``, ``sum`` or ``padded_mean`` of SAE activations over response tokens.
    - ``feature_set``: ``union`` or ``policy`` (whose top-k features D compares).
    - ``normalisation``: ``mean`` (over the selected features) or ``k`` (1/k · sum).
    - ``stop_gradient``: sg(·) on the chosen side's constraint (TDPO-2, SimPO+KL, FPO).
    """

    method: str
    beta: float
    alpha: float = DEFAULT_ALPHA
    gamma: float | None = None
    gamma_beta_ratio: float | None = None
    k: int = DEFAULT_K
    pooling: str = DEFAULT_POOLING
    feature_set: str = DEFAULT_FEATURE_SET
    normalisation: str = DEFAULT_NORMALISATION
    stop_gradient: bool = DEFAULT_STOP_GRADIENT

    def __post_init__(self) -> None:
        get_method(self.method)  # ValueError listing valid names
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.gamma is not None and self.gamma_beta_ratio is not None:
            raise ValueError("give gamma (absolute margin) or gamma_beta_ratio (margin / beta), not both")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        for name, value, allowed in (("pooling", self.pooling, POOLING_MODES),
                                     ("feature_set", self.feature_set, FEATURE_SETS),
                                     ("normalisation", self.normalisation, NORMALISATIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    @property
    def spec(self):
        """The :class:`~.registry.MethodSpec` of ``method``."""
        return get_method(self.method)

    @property
    def target_margin(self) -> float:
        """The absolute margin γ in u = LPD − γ (0 when neither gamma nor gamma_beta_ratio is set)."""
        if self.gamma_beta_ratio is not None:
            return float(self.gamma_beta_ratio) * float(self.beta)
        return float(self.gamma or 0.0)
