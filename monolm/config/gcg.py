"""`attacks.gcg`: the knobs of universal GCG (Zou et al. 2023, as GraySwan's nanoGCG implements
it) and of its gradient-free control. Defaults follow nanoGCG (250 steps, width 512, top-k 256,
one replaced position, no buffer) except the width, which `monolm plan` sizes for a 1.4B model
(see docs/science.md, "GCG")."""

from __future__ import annotations

from pydantic import model_validator

from monolm.config.base import NonNegInt, PositiveInt, Strict


class GCGConfig(Strict):
    trigger_len: PositiveInt = 10  # as UAT, so the two attacks compare
    steps: PositiveInt = 250  # GCG iterations per restart
    search_width: PositiveInt = 64  # candidate triggers scored exactly per step (nanoGCG: 512; sized by `monolm plan`)
    topk: PositiveInt = 256  # gradient-ranked tokens per position a candidate draws from
    n_replace: PositiveInt = 1  # trigger positions replaced per candidate
    buffer_size: NonNegInt = 0  # best triggers kept to step from; 0: always move to the step's best
    restarts: PositiveInt = 3  # independent restarts: the replicates of a universal trigger
    allow_non_ascii: bool = False  # non-ASCII tokens are filtered out by default (special ones always)
    filter_ids: bool = True  # drop candidates whose decode/re-encode changes the ids
    random_control: bool = True  # the same loop with random candidates, at the same budget
    n_opt_texts: PositiveInt = 80  # the first n of UAT's optimisation texts
    n_eval_texts: PositiveInt = 120  # the first n of the held-out attack texts
    text_max_tokens: PositiveInt = 128
    grad_batch_size: PositiveInt = 16  # texts per gradient pass (all texts are used every step)
    score_batch_size: PositiveInt = 128  # candidate sequences per forward; halves on OOM

    @model_validator(mode="after")
    def _check(self) -> GCGConfig:
        if self.n_replace > self.trigger_len:
            raise ValueError(
                f"attacks.gcg.n_replace={self.n_replace} exceeds attacks.gcg.trigger_len={self.trigger_len}; "
                f"allowed: 1..{self.trigger_len}"
            )
        if self.trigger_len >= self.text_max_tokens:
            raise ValueError(
                f"attacks.gcg.trigger_len={self.trigger_len} is not shorter than attacks.gcg.text_max_tokens="
                f"{self.text_max_tokens}; allowed: 1..{self.text_max_tokens - 1}"
            )
        return self
