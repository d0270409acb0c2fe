"""One cluster session: inputs, the fault-free reference (computed in the background while the cluster starts),
the harness, and the scenarios run in order on it (later ones reuse the warm nodes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.cluster import scenarios as sc
from tests.cluster.harness import Harness
from tests.cluster.netns import NetnsError
from tests.faults.state import References, make_inputs

SCENARIOS: dict[str, Callable[[sc.Context], sc.Result]] = {
    "spread": sc.spread,
    "partition": sc.partition,
    "node-loss": sc.node_loss,
    "netem": sc.netem,
}


def _ddp(ctx: sc.Context) -> sc.Result:
    from tests.cluster.ddp import multinode_ddp

    return multinode_ddp(ctx)


SCENARIOS["ddp"] = _ddp
#: Run by default (`make cluster`), every scenario; the multi-node DDP one last (it kills a node and starts a spare
#: one; 2-3 minutes of the total at load 5-11, docs/cluster.md). The pytest module runs the same ones.
DEFAULT = ("spread", "partition", "node-loss", "netem", "ddp")


class Session:
    class Unavailable(RuntimeError):
        """Namespaces, the head node's servers or the S3 server cannot be set up here."""

    def __init__(self, root: Path, model: Path | None = None):
        self.root = root
        self.inputs = make_inputs(root / "inputs", model)
        self.refs = References(self.inputs, root / "refs")
        self.h = Harness(root / "cluster")
        self.ctx: sc.Context | None = None

    def __enter__(self) -> Session:
        self.refs.prefetch((sc.PLAN,))  # the fault-free run, while the cluster starts
        try:
            self.h.start()
        except NetnsError as e:
            self.refs.close()
            raise Session.Unavailable(str(e)) from e
        except BaseException:
            self.refs.close()
            raise
        self.ctx = sc.Context(self.h, self.inputs, self.refs)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.h.close()
        finally:
            self.refs.close()

    def describe(self) -> str:
        f = self.h.fabric
        hosts = ", ".join(f"{r} {h.addr}" for r, h in f.hosts.items())
        return f"bridge in {f.switch}; {hosts}; storage {self.h.settings.storage}"

    def run(self, name: str) -> sc.Result:
        return SCENARIOS[name](self.ctx)


def table(results: list[sc.Result]) -> str:
    rows = [("scenario", "faults injected", "lost", "duplicated", "equal", "checks", "figures")]
    for r in results:
        if r.skipped:
            rows.append((r.scenario, r.faults, "-", "-", "-", "not run", r.skipped))
            continue
        checks = "ok" if not r.failures() else f"FAILED {len(r.failures())}"
        figs = "; ".join(f"{k}: {v}" for k, v in r.figures.items())
        rows.append((r.scenario, r.faults, str(r.lost), str(r.duplicated), str(r.equal), checks, figs))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    out = []
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row[:6], widths, strict=True)) + "  " + row[6])
    return "\n".join(out)
