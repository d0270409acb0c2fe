"""`python -m tests.cluster` (`make cluster`): build the namespaced cluster, run every scenario, print the table.

    python -m tests.cluster                 # all scenarios
    python -m tests.cluster spread partition

Exit status 0 when every scenario kept its checks, 1 otherwise, 2 when the cluster cannot be built here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster.run import DEFAULT, Session, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.splitlines()[0])
    p.add_argument("scenarios", nargs="*", default=[], metavar="SCENARIO",
                   help=f"scenarios to run (default: {', '.join(DEFAULT)})")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs) after the run")
    args = p.parse_args(argv)
    names = args.scenarios or list(DEFAULT)
    root = Path(tempfile.mkdtemp(prefix="orch-cluster-"))
    t0 = time.monotonic()
    results = []
    try:
        with Session(root) as session:
            print(f"cluster up in {session.h.setup_seconds:.1f} s: {session.describe()}", flush=True)
            for name in names:
                r = session.run(name)
                print(r.report(), flush=True)
                results.append(r)
    except Session.Unavailable as e:
        print(f"cannot build the cluster here: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"work folder kept: {root}")
    print()
    print(table(results))
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    return 0 if all(not r.failures() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
