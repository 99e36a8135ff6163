"""The whole matrix of options, drawn at random, against an independent model.

Each example draws a scenario (``matrix_scenario``: world size, algorithm,
mode, input form, layouts per rank, allow_unused with a random pattern of
skipped layers, comm_dtype or a low-bit compression, the non-finite mode
with a NaN on a random rank, uneven steps, layers frozen and unfrozen, a
mismatched call, an object one rank makes alone, torch without numpy; for
EA also tau, alpha or beta, asynchrony, error feedback), runs it on real
gloo processes (``world_pool``) and checks every rank's log against
``matrix_reference``. On failure Hypothesis prints
the scenario; ``DISTLEARN_MATRIX_SCENARIO='<its as_dict() as JSON>'`` runs
that one again (``test_one_scenario``).

CI runs a fixed budget; ``DISTLEARN_MATRIX_EXAMPLES=N`` runs N examples of
each algorithm (the longer run).
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, Phase, given, note, settings
from long_mode import LONG
from matrix_reference import check
from matrix_scenario import (
    EaScenario,
    SgdScenario,
    ea_scenarios,
    scenario_from_dict,
    sgd_scenarios,
)
from matrix_worker import run
from world_pool import pool

EXAMPLES = int(os.environ.get("DISTLEARN_MATRIX_EXAMPLES", "0"))
# In CI: enough to meet every option several times (each takes about half a
# second on 2 cores), few enough for the suite's budget (60 and 24 until
# 2026-12-07; the long mode, DISTLEARN_LONG=1, runs those).
SGD_EXAMPLES = EXAMPLES or (60 if LONG else 40)
EA_EXAMPLES = EXAMPLES or (24 if LONG else 16)
# A scenario's deadline: its collectives' own (12 s, matrix_worker.TIMEOUT)
# and a lone object's wait, with room; past it the world is killed.
SCENARIO_DEADLINE_S = 45.0


def matrix_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        phases=[Phase.generate, Phase.shrink]
        if not os.environ.get("DISTLEARN_MATRIX_NO_SHRINK")
        else [Phase.generate],
    )


def run_and_check(scenario: SgdScenario | EaScenario, in_hypothesis: bool = True) -> None:
    if in_hypothesis:
        note(f"scenario: {json.dumps(scenario.as_dict())}")
    outcomes = pool().run(scenario.world, run, scenario, timeout=SCENARIO_DEADLINE_S)
    hung = [rank for rank, o in enumerate(outcomes) if o.status != "ok"]
    assert not hung, f"ranks {hung} did not finish: {[o.value for o in outcomes]}"
    check(scenario, [o.value for o in outcomes])


@matrix_settings(SGD_EXAMPLES)
@given(scenario=sgd_scenarios())
def test_allreduce_sgd_matrix(scenario: SgdScenario) -> None:
    run_and_check(scenario)


@matrix_settings(EA_EXAMPLES)
@given(scenario=ea_scenarios())
def test_allreduce_ea_matrix(scenario: EaScenario) -> None:
    run_and_check(scenario)


if "DISTLEARN_MATRIX_SCENARIO" in os.environ:  # collected only when asked for

    def test_one_scenario() -> None:
        """Runs the scenario in DISTLEARN_MATRIX_SCENARIO (a failing example, printed)."""
        scenario = scenario_from_dict(json.loads(os.environ["DISTLEARN_MATRIX_SCENARIO"]))
        run_and_check(scenario, in_hypothesis=False)
