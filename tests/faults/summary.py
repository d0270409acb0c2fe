"""Run the fault cases and print one table: case, backend, injections, shards, lost, duplicated, final state.

    python -m tests.faults.summary                       # every case on every backend available here
    python -m tests.faults.summary --cases kill_children --backends servers --kills 20 --seed 3

Runs the same cases as the pytest modules in this folder: the functions there marked with `@fault_case`
(tests/faults/bench.py), found by importing those modules. Server cases need Redis (127.0.0.1:6379) and PostgreSQL
(127.0.0.1:5432, or ORCH_TEST_REDIS_URL / ORCH_TEST_PG_URL); without them they are listed as skipped (with CI set,
the command fails). Rows marked "(known bug)" show a bug that is not fixed yet (the tests mark them xfail). Exit
status 0 when every other case kept the promise and every known bug still shows, 1 otherwise.
"""

from __future__ import annotations

import os

# one thread per process, before torch is imported (the workers run with OMP_NUM_THREADS=1 too)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from shared.settings import Settings  # noqa: E402
from tests.faults.bench import KNOWN_BUGS, LEASE_SECONDS, Bench, Case, Outcome, Skip, short_lease  # noqa: E402
from tests.faults.cluster import start_zygote  # noqa: E402
from tests.faults.state import References, make_inputs  # noqa: E402

PG_ADMIN_URL = os.environ.get("ORCH_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ORCH_TEST_REDIS_URL", "redis://127.0.0.1:6379")
#: The order of the table: the quicker cases first. A test module not named here comes after these, by name.
MODULES = ("test_kill", "test_shutdown", "test_outages", "test_redelivery", "test_storage", "test_submitter",
           "test_freeze", "test_messages")
COLUMNS = ("case", "backend", "injections", "shards", "lost", "duplicated", "final state", "= fault-free", "checks",
           "s")


def discover() -> dict[str, Case]:
    """Every fault case of this folder's test modules, by name: the functions marked with `@fault_case`, in the
    order of MODULES, then in the order each module defines them."""
    folder = Path(__file__).parent
    modules = sorted((p.stem for p in folder.glob("test_*.py")),
                     key=lambda m: (MODULES.index(m) if m in MODULES else len(MODULES), m))
    cases: dict[str, Case] = {}
    for name in modules:
        module = importlib.import_module(f"tests.faults.{name}")
        for obj in vars(module).values():
            case = getattr(obj, "fault_case", None)
            if not isinstance(case, Case) or obj.__module__ != module.__name__:
                continue  # not a case, or one imported from another module (listed there)
            if cases.setdefault(case.name, case) is not case:
                raise RuntimeError(f"two fault cases named {case.name!r}: in {cases[case.name].fn.__module__} "
                                   f"and {module.__name__}")
    return cases


def _reachable(url: str, default_port: int) -> bool:
    u = urlsplit(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def row(o: Outcome) -> dict[str, str]:
    case = o.case + (" (known bug)" if o.case in KNOWN_BUGS else "")
    return {"case": case, "backend": o.backend, "injections": str(o.injections), "shards": str(o.shards),
            "lost": str(o.lost), "duplicated": str(o.duplicated), "final state": o.state,
            "= fault-free": "yes" if o.equal else "no",
            "checks": f"{len(o.checks) - len(o.failures())}/{len(o.checks)}", "s": f"{o.seconds:.0f}"}


def markdown(rows: list[dict[str, str]]) -> str:
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in COLUMNS}

    def line(values) -> str:
        return "| " + " | ".join(v.ljust(widths[c]) for c, v in zip(COLUMNS, values, strict=True)) + " |"

    out = [line(COLUMNS), "|" + "|".join("-" * (widths[c] + 2) for c in COLUMNS) + "|"]
    out += [line([r.get(c, "") for c in COLUMNS]) for r in rows]
    return "\n".join(out)


def run_all(cases: list[Case], benches: dict[str, Bench | str], kill_kw: dict) -> tuple[list[dict], list[str]]:
    """Every case on every backend it applies to: (table rows, failures)."""
    rows: list[dict[str, str]] = []
    failures: list[str] = []
    for case in cases:
        name = case.name
        for backend, bench in benches.items():
            if backend not in case.backends:
                continue
            if isinstance(bench, str):
                rows.append({"case": name, "backend": backend, "final state": f"skipped: {bench}"})
                continue
            print(f"-- {name} on {backend} ...", file=sys.stderr, flush=True)
            try:
                outcomes = case.run(bench, **(kill_kw if name == "kill_children" else {}))
            except Skip as e:
                rows.append({"case": name, "backend": backend, "final state": f"skipped: {e}"})
                continue
            except Exception as e:  # report it and go on with the other cases
                traceback.print_exc()
                rows.append({"case": name, "backend": backend, "final state": f"error: {type(e).__name__}"})
                failures.append(f"{name} [{backend}]: {type(e).__name__}: {e}")
                continue
            for o in outcomes:
                rows.append(row(o))
                if o.case in KNOWN_BUGS and not o.failures():
                    failures.append(f"{o.case} [{backend}] kept the promise: the known bug is fixed, remove it from "
                                    "tests/faults/bench.py KNOWN_BUGS (and so its xfail)")
                elif o.case not in KNOWN_BUGS and o.failures():
                    failures.append(o.report())
    return rows, failures


def _bench(stack: contextlib.ExitStack, backend: str, work: Path, inputs, refs) -> Bench | str:
    if backend == "embedded":
        s = Settings.from_env({"ORCH_HOME": str(work / "embedded")})
        s.ensure_local_folders()
        return Bench(backend, short_lease(s), inputs, refs, work / "embedded-cases")
    if backend != "servers":
        raise SystemExit(f"unknown backend {backend!r}: use servers or embedded")
    if not (_reachable(PG_ADMIN_URL, 5432) and _reachable(REDIS_URL, 6379)):
        if os.environ.get("CI"):
            raise SystemExit("Redis/PostgreSQL are not reachable and CI is set: the server cases must run in CI")
        return "Redis/PostgreSQL not reachable"
    import redis

    from tests.faults.infra import temporary_pg_database

    url = stack.enter_context(temporary_pg_database(PG_ADMIN_URL))
    # the DB indices tests/conftest.py uses (ORCH_TEST_REDIS_DB when set); emptied before each case and after
    index = int(os.environ.get("ORCH_TEST_REDIS_DB", str(3 + random.randrange(12))))
    broker = f"{REDIS_URL}/{index}"
    stack.callback(lambda: redis.Redis.from_url(broker).flushdb())
    s = Settings.from_env({"ORCH_HOME": str(work / "servers"), "ORCH_BROKER_URL": broker,
                           "ORCH_DATABASE_URL": url, "ORCH_STORAGE": str(work / "servers" / "artifacts")})
    s.ensure_local_folders()
    return Bench(backend, short_lease(s), inputs, refs, work / "servers-cases")


def main(argv: list[str] | None = None) -> int:
    cases = discover()
    p = argparse.ArgumentParser(prog="python -m tests.faults.summary", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(cases), help=f"comma-separated, from: {', '.join(cases)}")
    p.add_argument("--backends", default="servers,embedded", help="comma-separated: servers, embedded")
    p.add_argument("--kills", type=int, default=None,
                   help="pool children killed by kill_children (default: 20 on servers, 4 on embedded)")
    p.add_argument("--seed", type=int, default=0, help="seeds the moments kill_children kills at")
    p.add_argument("--work", default=None, help="keep logs and state in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in cases]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(cases)}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    kill_kw = {"seed": args.seed, **({"kills": args.kills} if args.kills else {})}

    with contextlib.ExitStack() as stack:
        if args.work:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="faults-")))
        t0 = time.monotonic()
        zygote = start_zygote(work / "zygote")
        stack.callback(zygote.close)
        inputs = make_inputs(work / "inputs")
        refs = References(inputs, work / "refs")
        refs.prefetch()
        stack.callback(refs.close)
        benches: dict[str, Bench | str] = {}
        for backend in backends:
            bench = _bench(stack, backend, work, inputs, refs)
            if isinstance(bench, Bench):
                bench.zygote = zygote
            benches[backend] = bench
        rows, failures = run_all([cases[n] for n in names], benches, kill_kw)
        print(markdown(rows))
        print(f"\n{len(rows)} rows in {time.monotonic() - t0:.0f} s (lease {LEASE_SECONDS:.0f} s, kill seed "
              f"{args.seed}).")
        shown = {r["case"].removesuffix(" (known bug)") for r in rows}
        for title, reason in KNOWN_BUGS.items():
            if title in shown:
                print(f"known bug, {title}: {reason}")
        for f in failures:
            print("\n" + f)
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
