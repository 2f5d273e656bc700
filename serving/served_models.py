"""The one table of served models: what a run is served as, read by packaging, the client, the command
line, the benchmarks and the demo.

A run can be served as more than one model: THAT is ``that`` (its classifier) and ``that_knn`` (the
kNN endpoint over its memory bank). Per model the table says which recipe's run it serves, which
modes (the first is the default), the request parameter that picks one, the handler (``handlers/``)
that translates TorchServe requests for it, and the request parameters its usage example shows.
What a mode computes and which parameters its post-processing takes come from the recipe and
``serving.postprocess``; adding a defense's served model is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServedModel:
    name: str  # the TorchServe model name: POST /predictions/<name>
    recipe: str  # the run it serves
    handler: str  # handlers/<handler>.py
    modes: tuple[str, ...] | None = None  # None: every mode of the run, in the recipe's order
    mode_parameter: str = "mode"
    example: dict[str, str] = field(default_factory=dict)  # the parameters its curl example sends


SERVED_MODELS: dict[str, ServedModel] = {m.name: m for m in [
    ServedModel("dhat", "dhat", "dual_head", mode_parameter="head", example={"head": "both"}),
    ServedModel("that", "that", "classifier", modes=("classifier",)),
    ServedModel("that_knn", "that", "knn", modes=("knn",), example={"k": "10"}),
    ServedModel("ducat", "ducat", "dummy_classes"),
    *(ServedModel(r, r, "classifier") for r in ("natural", "pgd_at", "trades", "mart", "consistency_at", "aft_dra",
                                                 "act")),
]}


def served_models_of(recipe_id: str) -> list[ServedModel]:
    """The models a run of ``recipe_id`` is served as (any recipe not listed: one model of its own name)."""
    return [m for m in SERVED_MODELS.values() if m.recipe == recipe_id] or [ServedModel(recipe_id, recipe_id,
                                                                                        "classifier")]
