"""Default grids and coefficients of the analysis (pure constants: the CLI prints them without torch)."""

from __future__ import annotations

DEFAULT_ALPHAS: tuple[float, ...] = tuple(-0.5 + 0.25 * i for i in range(9))
DEFAULT_OTHERS_SCALE = 0.3
DEFAULT_CTL_LAMBDA = 0.3  # a typical task-arithmetic coefficient (Ilharco et al. 2023 search λ ∈ [0, 1])
DEFAULT_SEARCH_REGION = (0.05, 1.0)
