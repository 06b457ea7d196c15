"""The one rule for run-time self-checks: where devops-model computes something faster than the
library's plain path (eval's scorer, chat's decode loop), it compares the two on real input before it
trusts the fast one, and on a disagreement warns in one line naming the library release and uses the
plain path for the rest of the run. A fast wrong answer is the worst outcome this tool can have.
"""

from __future__ import annotations

# max |fast - plain| allowed, relative to max(1, |plain|): float32 paths are equal up to the order of
# float additions (2e-7 measured on the exam); in half precision the measured gaps were 2e-3 to 8e-3
# (bfloat16) and 2e-4 to 1e-3 (float16) on the tiny and mid models.
TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


# Half-precision rounding noise grows with depth like a random walk: the figures above come from models
# of up to MEASURED_LAYERS layers, and deeper ones get sqrt(layers / MEASURED_LAYERS) times as much. Seen on
# an H200 (bfloat16, the 28-layer Qwen2.5-7B shape with random weights): eval's fast path vs the plain
# forward differed by 0.065 and 0.106 at max |logit| 1.0 and 1.77, over the flat rule's 0.05 and 0.089.
MEASURED_LAYERS = 8


def tolerance(dtype, plain, layers: int = 0) -> float:
    """The allowed max |fast - plain| for tensors of `dtype` (torch dtype or its name) near `plain`,
    computed by a model `layers` deep (0: not known)."""
    name = str(dtype).removeprefix("torch.")
    depth = max(1.0, layers / MEASURED_LAYERS) ** 0.5 if name in ("float16", "bfloat16") else 1.0
    return TOLERANCE.get(name, 5e-2) * depth * max(1.0, plain.abs().max().item())


def depth(model) -> int:
    """A model's number of layers, for tolerance() (0 when its config does not say)."""
    return getattr(model.config.get_text_config(), "num_hidden_layers", 0) or 0


def library_versions(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in names or ("transformers",):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def fallback(command: str, what: str, detail: str, plain: str) -> str:
    """Warn that `what` of `command` failed its self-check (`detail`) and that `plain` takes over;
    returns the record of it, 'plain (WHAT failed self-check: DETAIL, LIBRARIES)', for results that
    say how they were made."""
    from devops_cli.console import warn

    detail = f"{detail}; {library_versions()}"
    warn(f"{command}: the {what} failed its self-check against the plain path ({detail}): using {plain} "
         "for the rest of this run")
    return f"plain ({what} failed self-check: {detail})"
