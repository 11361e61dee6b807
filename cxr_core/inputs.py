"""The admitted inputs of one TorchServe batch on their way through the handler (admit -> run -> judge -> answer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cxr_core.policy import Refusal
from cxr_core.served import Outputs


@dataclass
class PreparedBatch:
    """One TorchServe batch on its way through the handler.

    preprocess sets, per request, its rows of `images` (`spans`, None when refused) or the Refusal that
    refuses it (`refusals`), and whether it asked for an explanation; inference sets the model's `outputs`,
    adds the gate's and the population check's refusals and, for requests that asked, `explanations` (one
    dict per image); postprocess only turns this into answers."""
    spans: list[tuple[int, int] | None]
    refusals: dict[int, Refusal]
    images: torch.Tensor | None
    explain: list[bool]
    outputs: Outputs | None = None
    explanations: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def scores(self, start: int, end: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The gate's and the population check's scores of rows start:end (None where not computed)."""
        gate, population = self.outputs.gate_scores, self.outputs.population_scores
        return (None if gate is None else gate[start:end]), (None if population is None else population[start:end])

    def accepted(self) -> list[tuple[int, int, int]]:
        """(request index, start, end) of every request still to be answered."""
        return [(index, *span) for index, span in enumerate(self.spans)
                if span is not None and index not in self.refusals]
