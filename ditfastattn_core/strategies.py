"""The five per-(step, layer) attention strategies of DiTFastAttn and their letters.

A plan stores one letter per layer per step; the letters are part of the plan file format
and must never change meaning.
"""

from __future__ import annotations

import enum


class Strategy(enum.Enum):
    """How one attention layer is computed at one step."""

    FULL = "F"
    """Dense attention. Refreshes this layer's window residual when a later step reads it."""
    WA_RS = "W"
    """Window attention plus the residual cached at this layer's most recent FULL step."""
    ASC = "C"
    """Dense attention on the conditional rows only; the unconditional rows get a copy."""
    WA_RS_ASC = "X"
    """WA_RS on the conditional rows only (conditional residual); copied to the uncond rows."""
    AST = "T"
    """Reuse this layer's output from the previous step; no attention at all."""

    @property
    def letter(self) -> str:
        return self.value

    @classmethod
    def from_letter(cls, letter: str) -> Strategy:
        try:
            return _BY_LETTER[letter]
        except KeyError:
            known = ", ".join(f"{s.value}={s.name}" for s in cls)
            raise ValueError(f"unknown strategy letter {letter!r} (known: {known})") from None

    @property
    def uses_window(self) -> bool:
        return self in (Strategy.WA_RS, Strategy.WA_RS_ASC)

    @property
    def shares_cfg(self) -> bool:
        return self in (Strategy.ASC, Strategy.WA_RS_ASC)

    @property
    def without_cfg_sharing(self) -> Strategy:
        """The strategy a CFG-sharing one falls back to when there is no branch to share with."""
        return {Strategy.ASC: Strategy.FULL, Strategy.WA_RS_ASC: Strategy.WA_RS}.get(self, self)

    def reads_residual(self, branch: int) -> bool:
        """Whether this strategy reads the window residual of CFG branch ``branch`` (0 = cond)."""
        if self is Strategy.WA_RS:
            return True
        return self is Strategy.WA_RS_ASC and branch == COND


_BY_LETTER = {s.value: s for s in Strategy}

COND = 0
"""ComfyUI's ``cond_or_uncond`` value for the conditional branch."""
UNCOND = 1
"""ComfyUI's ``cond_or_uncond`` value for the unconditional branch."""

CANDIDATE_ORDER: tuple[Strategy, ...] = (
    Strategy.AST,
    Strategy.WA_RS_ASC,
    Strategy.WA_RS,
    Strategy.ASC,
)
"""Algorithm 1's try order: cheapest first; FULL is what remains when none passes."""
