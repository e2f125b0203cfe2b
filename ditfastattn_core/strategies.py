"""The five per-(step, layer) attention strategies of DiTFastAttn and their letters.

A plan stores one letter per layer per step; the letters are part of the plan file format
and must never change meaning.
"""

from __future__ import annotations

import enum


class Strategy(enum.Enum):
    """How one attention layer is computed at one step: its plan letter (the enum value), and
    the label and colour the editor's heatmap legend shows for it."""

    FULL = ("F", "FULL", "#5b6270")
    """Dense attention. Refreshes this layer's window residual when a later step reads it."""
    WA_RS = ("W", "WA-RS", "#3b82f6")
    """Window attention plus the residual cached at this layer's most recent FULL step."""
    ASC = ("C", "ASC", "#f59e0b")
    """Dense attention on the conditional rows only; the unconditional rows get a copy."""
    WA_RS_ASC = ("X", "WA-RS+ASC", "#10b981")
    """WA_RS on the conditional rows only (conditional residual); copied to the uncond rows."""
    AST = ("T", "AST", "#ef4444")
    """Reuse this layer's output from the previous step; no attention at all."""

    def __new__(cls, letter: str, label: str, colour: str) -> Strategy:
        member = object.__new__(cls)
        member._value_ = letter
        member.label = label
        member.colour = colour
        return member

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

def legend() -> list[dict[str, str]]:
    """Every strategy's letter, label and colour, in table order: what the editor's heatmap
    draws a plan with (sent with the plan, so the frontend holds no copy of this table)."""
    return [{"letter": s.letter, "label": s.label, "colour": s.colour} for s in Strategy]


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
