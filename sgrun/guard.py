"""The divergence guard: a loss or a synthetic gradient that turns non-finite stops the run with one
line naming the step, what diverged and a fix.  The engine (:func:`sgrun.train.fit`) and every
pipeline stage call it on their logging steps and before every checkpoint."""

from __future__ import annotations

import math

from sgrun.errors import SgrunError


def check_finite(values: dict[str, float], step: int, lr: float,
                 checkpoint_step: int | None) -> None:
    """``values``: step values summed since the last logging step, tagged as logged
    (``loss/train``, ``dni/<cut>/sg_loss``...); ``checkpoint_step``: the last checkpoint written
    (``None``: none yet)."""
    bad = [tag for tag, v in values.items() if not math.isfinite(v)]
    if not bad:
        return
    kept = (f"the last good checkpoint (step {checkpoint_step}) is kept"
            if checkpoint_step is not None else "no checkpoint had been written yet")
    dni = [tag for tag in bad if tag.startswith("dni/")]
    if dni:
        cut = dni[0].split("/")[1]
        raise SgrunError(f"the synthetic gradient at interface {cut} became non-finite "
                         f"by step {step}: lower optim.lr (now {lr:.2g}) or dni.scale "
                         f"and run again; {kept}")
    raise SgrunError(f"the training loss ({bad[0]}) became non-finite by step {step}: "
                     f"lower optim.lr (now {lr:.2g}) and run again; {kept}")
