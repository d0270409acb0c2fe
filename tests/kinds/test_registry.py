"""The kinds registry: every declared kind is reachable end to end, and a declaration that cannot work fails when
the registry is read (at import), not when its first message is routed."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types

import pytest

import kinds
from kinds.base import Kind, Plan, option
from shared import constants as C


def test_every_kind_has_a_consumed_queue_a_cli_subparser_a_task_route_and_a_report_section():
    from orchestrator.cli import build_parser
    from orchestrator.report import describe
    from orchestrator.report_pictures import BLOCKS
    from orchestrator.worker import default_queues

    consumed = set(default_queues(None).split(","))
    routes = kinds.task_routes()
    submit = next(a for a in build_parser()._subparsers._group_actions if "submit" in a.choices).choices["submit"]
    cli = next(a for a in submit._subparsers._group_actions).choices
    assert set(kinds.names()) >= {"invert", "train-translator", "eval-translator", "train-ncsn", "train-classifier",
                                  "sample", "eval-fid", "bench", "reconstruct"}
    for name, kind in kinds.all_kinds().items():
        assert kind.queue in consumed, name
        assert routes[kind.task] == {"queue": kind.queue}, name
        assert name in cli, name
        assert set(kind.pictures) <= set(BLOCKS), name
        job = {"kind": name, "spec": {}, "shards_total": 3}
        data = types.SimpleNamespace(job=job, summary={}, curves={}, checkpoints=[])
        sentence = describe(data)
        assert sentence.endswith(".") and not sentence.startswith(f"A {name} job"), (name, sentence)


def test_the_celery_app_registers_and_routes_exactly_the_kinds_tasks(embedded):
    from workers.dispatch import get_app

    app = get_app(embedded)
    app.loader.import_default_modules()
    ours = {n for n, t in app.tasks.items() if not n.startswith("celery.")}
    assert {k.task for k in kinds.all_kinds().values()} <= ours
    assert all(app.conf.task_routes[t]["queue"] in C.QUEUES for t in ours if t in app.conf.task_routes)


def test_a_kind_parses_typed_options_and_names_a_missing_required_one():
    k = kinds.get("sample")
    o = k.parse(argparse.Namespace(checkpoint=3, n=10, shards=2))
    assert dataclasses.is_dataclass(o) and o.checkpoint == 3 and o.batch_size == 1000 and o.steps_each is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.n = 5
    from shared.errors import UserError

    with pytest.raises(UserError, match="sample needs --checkpoint"):
        k.parse({"n": 10})
    with pytest.raises(UserError, match="unknown job kind 'smaple': use one of"):
        kinds.get("smaple")


@dataclasses.dataclass(frozen=True)
class _Opts:
    n: int = option(1, type=int)


@dataclasses.dataclass(frozen=True)
class _Untyped:
    n: int | None = option(None)  # a number without its converter: the CLI would hand the work a string


def _kind(**kw) -> Kind:
    base = dict(name="x-test", help="h", options=_Opts, plan=lambda s, o: Plan({}), describe=lambda d: "x.",
                queue=C.QUEUE_CPU, task="bench.shard", work="workers.tasks.bench:bench_work")
    return Kind(**{**base, **kw})


@pytest.mark.parametrize("bad, why", [
    (dict(queue="gpus"), "queue 'gpus' is not one the workers consume"),
    (dict(training=True), "a training kind names its entry point"),
    (dict(entry_point="workers.train.ncsn"), "a training kind names its entry point"),
    (dict(work="workers.tasks.bench.bench_work"), "'module:function' references"),
    (dict(pictures=("histograms",)), "pictures from"),
    (dict(queue=C.QUEUE_GPU), "task 'bench.shard' of kind 'x-test' differs in queue or work"),
    (dict(name="invert"), "two modules declare the kind 'invert'"),
    (dict(options=_Untyped), "option 'n' is a number: give option"),
])
def test_a_bad_declaration_fails_when_the_registry_is_read(monkeypatch, bad, why):
    mod = types.ModuleType("bad_kind_module")
    mod.KIND = _kind(**bad)
    monkeypatch.setitem(sys.modules, "bad_kind_module", mod)
    monkeypatch.setenv(kinds.EXTRA_ENV, "bad_kind_module")
    with pytest.raises(ValueError, match=why):
        kinds.all_kinds()
    monkeypatch.delenv(kinds.EXTRA_ENV)
    assert "x-test" not in kinds.all_kinds()  # the good registry is untouched


def test_options_must_be_frozen(monkeypatch):
    @dataclasses.dataclass
    class Loose:
        n: int = 1

    mod = types.ModuleType("loose_kind_module")
    mod.KIND = _kind(options=Loose)
    monkeypatch.setitem(sys.modules, "loose_kind_module", mod)
    monkeypatch.setenv(kinds.EXTRA_ENV, "loose_kind_module")
    with pytest.raises(ValueError, match="options must be a frozen dataclass"):
        kinds.all_kinds()
