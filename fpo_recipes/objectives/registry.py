"""Registry of preference objectives as configurations of one unified form.

Every method computes, per pair (x, y_w, y_l),

    u    = LPD − margin − constraint
    loss = −log σ(u)

and differs only in how the three terms are built (SPEC §1):

    method     LPD                     margin                            constraint
    dpo        β·logπθ(y_w) − β·logπθ(y_l)   β·(logπref(y_w) − logπref(y_l))   0
    simpo      β/|y_w|·logπθ(y_w) − β/|y_l|·logπθ(y_l)   γ                 0
    tdpo1      as dpo                  as dpo                            β·(SeqKL(y_l) − SeqKL(y_w))
    tdpo2      as dpo                  as dpo                            α·(β·SeqKL(y_l) − sg(β·SeqKL(y_w)))
    simpo_kl   as simpo                γ                                 as tdpo2
    fpo        as simpo                γ_refLN = β/|y_w|·logπref(y_w) − β/|y_l|·logπref(y_l)
                                                                         α·(β·D(y_l) − sg(β·D(y_w)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

MarginKind = Literal["reference", "reference_ln", "gamma"]
ConstraintKind = Literal["none", "seqkl_tdpo1", "seqkl_tdpo2", "feature"]

MARGIN_KINDS: tuple[str, ...] = get_args(MarginKind)
CONSTRAINT_KINDS: tuple[str, ...] = get_args(ConstraintKind)


@dataclass(frozen=True)
class MethodSpec:
    """How one method instantiates ``u = LPD − margin − constraint``.

    - ``length_normalised``: LPD uses β/|y|·logπθ(y) instead of β·logπθ(y).
    - ``margin``: ``reference`` = β·(logπref(y_w) − logπref(y_l)); ``reference_ln`` =
      β/|y_w|·logπref(y_w) − β/|y_l|·logπref(y_l); ``gamma`` = the constant γ.
    - ``constraint``: ``seqkl_tdpo1`` = β·(SeqKL(y_l) − SeqKL(y_w));
      ``seqkl_tdpo2`` = α·(β·SeqKL(y_l) − sg(β·SeqKL(y_w)));
      ``feature`` = α·(β·D(y_l) − sg(β·D(y_w))); ``none`` = 0.
    - ``needs_online_reference``: the reference model runs during training (full distributions).
    - ``needs_cached_logps``: the reference's summed response log-probs come from the offline cache.
    - ``needs_sae``: the policy's SAE activations are needed at train time (and a recipe
      needs an ``sae:`` section; only such methods take feature-level ``constraints:``).
    """

    name: str
    length_normalised: bool
    margin: MarginKind
    constraint: ConstraintKind
    needs_online_reference: bool
    needs_cached_logps: bool
    needs_sae: bool
    description: str = ""

    def __post_init__(self) -> None:
        if self.margin not in MARGIN_KINDS:
            raise ValueError(f"margin must be one of {MARGIN_KINDS}, got {self.margin!r}")
        if self.constraint not in CONSTRAINT_KINDS:
            raise ValueError(f"constraint must be one of {CONSTRAINT_KINDS}, got {self.constraint!r}")

    @property
    def needs_reference_logps(self) -> bool:
        """Whether the margin needs logπref(y_w), logπref(y_l) (cached or online)."""
        return self.margin in ("reference", "reference_ln")

    @property
    def uses_alpha(self) -> bool:
        """α scales the constraint (TDPO-2 style constraints only; TDPO-1's is unweighted)."""
        return self.constraint in ("seqkl_tdpo2", "feature")

    @property
    def uses_gamma(self) -> bool:
        """The margin is the constant γ (which the recipe must then give)."""
        return self.margin == "gamma"


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="dpo",
            length_normalised=False,
            margin="reference",
            constraint="none",
            needs_online_reference=False,
            needs_cached_logps=True,
            needs_sae=False,
            description="DPO (Rafailov et al.): sigmoid loss on β-scaled policy/reference log-ratios.",
        ),
        MethodSpec(
            name="simpo",
            length_normalised=True,
            margin="gamma",
            constraint="none",
            needs_online_reference=False,
            needs_cached_logps=False,
            needs_sae=False,
            description="SimPO (Meng et al.): length-normalised reward, constant target margin γ, no reference.",
        ),
        MethodSpec(
            name="tdpo1",
            length_normalised=False,
            margin="reference",
            constraint="seqkl_tdpo1",
            needs_online_reference=True,
            needs_cached_logps=False,
            needs_sae=False,
            description="TDPO-1 (Zeng et al.): DPO plus β·(SeqKL(y_l) − SeqKL(y_w)).",
        ),
        MethodSpec(
            name="tdpo2",
            length_normalised=False,
            margin="reference",
            constraint="seqkl_tdpo2",
            needs_online_reference=True,
            needs_cached_logps=False,
            needs_sae=False,
            description="TDPO-2 (Zeng et al.): DPO plus α·(β·SeqKL(y_l) − sg(β·SeqKL(y_w))).",
        ),
        MethodSpec(
            name="simpo_kl",
            length_normalised=True,
            margin="gamma",
            constraint="seqkl_tdpo2",
            needs_online_reference=True,
            needs_cached_logps=False,
            needs_sae=False,
            description="SimPO+KL: SimPO's LPD and γ margin with the TDPO-2 sequential-KL constraint.",
        ),
        MethodSpec(
            name="fpo",
            length_normalised=True,
            margin="reference_ln",
            constraint="feature",
            needs_online_reference=False,
            needs_cached_logps=True,
            needs_sae=True,
            description=(
                "FPO (Yin et al., arXiv 2411.07618): length-normalised LPD, offline γ_refLN margin, "
                "SAE feature-level constraint α·(β·D(y_l) − sg(β·D(y_w)))."
            ),
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    """Return the :class:`MethodSpec` for ``name``; ValueError listing the valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown objective method {name!r}; valid methods: {valid}") from None
