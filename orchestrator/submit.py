"""`orchestrator submit KIND ...`: the kind's options, its plan (every check before anything exists), then the job.

What a kind checks and how it shards lives in its module under kinds/; this is the one path they all take.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import kinds
from orchestrator import jobs
from shared.settings import Settings


def say(line: str | None) -> None:
    """A line for the person at the terminal, on stderr: stdout stays the job id (or JSON) that scripts read."""
    if line:
        print(line, file=sys.stderr, flush=True)


def submit(settings: Settings, kind: str, given: Any) -> str:
    """Create and enqueue a job of `kind` from `given` (the kind's options, an argparse Namespace or a dict).

    UserError, before any row or message exists, for an unknown kind, a missing or bad option, or input that the
    kind's plan refuses."""
    k = kinds.get(kind)
    plan = k.plan(settings, k.parse(given))
    for line in plan.notes:
        say(line)
    job_id = jobs.submit(settings, k.name, plan.spec, plan.shards, plan.items, plan.lineage, plan.rejections)
    say(plan.summary)
    return job_id


def submitter(kind: str) -> Callable[[Settings, Any], str]:
    """``submit`` with the kind fixed, for code that hands a submission around (the demo, benchmarks, tests)."""
    def run(settings: Settings, given: Any) -> str:
        return submit(settings, kind, given)

    run.__name__ = f"submit[{kind}]"
    return run
