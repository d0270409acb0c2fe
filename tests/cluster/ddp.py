"""Multi-node DDP on the namespaced cluster: one torchrun agent on each of two nodes, meeting through torchrun's c10d
rendezvous over the bridge, running the real NCSN training entry point (`workers.train.ncsn`), as
deploy/slurm/train-multinode.sbatch and deploy/k8s/examples/ddp-multinode.yaml launch it.

The job system runs a training shard on one node (`torchrun --standalone`); a run spanning nodes is launched
outside the queue, as those deploy files do. So here the harness plays srun / the Indexed Job: it starts the two
agents itself. Each node keeps its own private run folder; rank 0 writes checkpoints there, and the harness copies
each one to the cluster's object storage as it appears (what the supervisor's adopt does for queue runs). When a
node is killed, the surviving agent fails (its peer is gone); the run is then launched again on the survivor and
a replacement node, each resuming from the latest stored checkpoint fetched into its own folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from shared.storage import Storage
from tests.cluster.scenarios import Context, Result
from tests.faults import cluster as cl

RDZV_PORT = 29400
#: The run: 2 ranks x 16 samples a step, 256 samples -> 8 steps an epoch, 3 epochs; a checkpoint every 2 steps.
TRAIN = {"epochs": 3, "batch_size": 16, "seed": 0, "log_every": 1, "checkpoint_every": 2, "device": "cpu",
         "data": "mnist:embedded", "max_train_samples": 256, "preset": "ncsn", "base_channels": 8, "lr": 1e-3}


#: torch's log line prefix, e.g. "I1202 14:02:31.345000 18625 torch/...": level, month and day, time of day.
_STAMP = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d(?:\.\d+)?) ")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


class Agent:
    """One torchrun agent in a node's namespace."""

    def __init__(self, ctx: Context, role: str, attempt: int, run_id: str, endpoint: str,
                 resume_from: str | None):
        h = ctx.h
        self.role = role
        self.folder = h.private(role) / "ddp" / f"attempt{attempt}"
        self.folder.mkdir(parents=True, exist_ok=True)
        local_resume = None
        if resume_from is not None:  # fetched from object storage into the node's own folder
            local_resume = self.folder / resume_from.rsplit("/", 1)[-1]
            local_resume.write_bytes(Storage(h.settings.storage).read_bytes(resume_from))
        self.events = self.folder / "events.jsonl"
        cfg = {**TRAIN, "run_dir": str(self.folder / "run"), "events": str(self.events),
               "resume_from": str(local_resume) if local_resume else None}
        config = self.folder / "config.json"
        config.write_text(json.dumps(cfg))
        host = h.fabric.hosts[role]
        # is_host: the c10d rendezvous backend hosts its store only where the endpoint matches this machine's
        # host name or one of its addresses. Every namespace shares the machine's host name, which /etc/hosts
        # maps to 127.0.0.1 only, so without the flag no agent matched 10.213.0.x: none hosted the store and
        # both timed out connecting to it. --local-addr is what each agent advertises for the same reason.
        # GLOO_SOCKET_IFNAME: the node's veth end is named eth0 inside its namespace (netns.py, Fabric.plug).
        argv = host.exec(sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                         "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}:{RDZV_PORT}", f"--rdzv-id={run_id}",
                         f"--local-addr={host.addr}", f"--rdzv-conf=is_host={int(host.addr == endpoint)}",
                         "--max-restarts=0", "-m", "workers.train.ncsn",
                         "--config", str(config))
        # LOGLEVEL=INFO: the agent logs when it starts the rendezvous and when it is complete (Agent.rendezvous)
        env = {**h.worker_env(role), "GLOO_SOCKET_IFNAME": "eth0", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5",
               "LOGLEVEL": "INFO"}
        self.log = self.folder / "torchrun.log"
        self.launched = time.time()  # wall clock, as the events' "time"
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(argv, env=env, cwd=cl.REPO, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def ev(self) -> list[dict]:
        return _events(self.events)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def rendezvous(self) -> float | None:
        """Seconds from the agent starting the c10d rendezvous to its completion (None: not
        logged), from the time stamps of torch's own log lines."""
        times = {}
        for line in self.text().splitlines():
            for key, needle in (("join", "Rendezvous'ing worker group"), ("joined", "Rendezvous complete")):
                if key not in times and needle in line and (m := _STAMP.match(line)):
                    times[key] = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
        if len(times) < 2:
            return None
        return (times["joined"] - times["join"]) % 86400  # across midnight too


def _store(ctx: Context, agents: list[Agent], stored: dict[int, str]) -> None:
    """Upload new checkpoints (rank 0's events) to object storage, checking each against its recorded sha256."""
    storage = Storage(ctx.h.settings.storage)
    for a in agents:
        for e in a.ev():
            if e.get("event") == "checkpoint" and e["step"] not in stored:
                src = Path(e["path"])
                if _sha(src) != e["sha256"]:
                    raise AssertionError(f"checkpoint {src} differs from its recorded sha256")
                obj = storage.write_bytes(f"ddp/step-{e['step']:08d}.pt", src.read_bytes())
                if obj.sha256 != e["sha256"]:
                    raise AssertionError(f"stored checkpoint {obj.uri} differs from {src}")
                stored[e["step"]] = obj.uri


def multinode_ddp(ctx: Context, a: str = "w1", b: str = "w3", spare: str = "w2") -> Result:
    h = ctx.h
    res = Result("multi-node DDP", f"torchrun c10d over the bridge on {a}+{b}; {b} killed mid-run")
    res.notes.append("launched by the harness (as srun / an Indexed Job would), not through the queue: the job "
                     "system runs a training shard on one node only")
    endpoint = h.fabric.hosts[a].addr
    stored: dict[int, str] = {}
    t0 = time.monotonic()
    first = [Agent(ctx, a, 1, "ddp-run-1", endpoint, None), Agent(ctx, b, 1, "ddp-run-1", endpoint, None)]
    try:
        def mid_run():
            _store(ctx, first, stored)
            return any(s >= 4 for s in stored) or any(ag.proc.poll() is not None for ag in first)
        cl.wait_for(mid_run, 300, 0.1, "the first checkpoints of the two-node run")
        if any(ag.proc.poll() is not None for ag in first):
            raise AssertionError("an agent exited before the kill:\n" + "\n".join(ag.text()[-2000:] for ag in first))
        starts = [e for ag in first for e in ag.ev() if e.get("event") == "start"]
        step_at_kill = max((e["step"] for ag in first for e in ag.ev() if e.get("event") == "progress"), default=0)
        t_kill = time.monotonic()
        killed = h.fabric.kill_host(b)
        try:  # the survivor's rank loses its peer and fails (gloo), and its agent ends the run
            first[0].proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first[0].proc.kill()
            res.notes.append(f"the agent on {a} did not end by itself within 120 s after its peer died: killed")
        t_down = time.monotonic() - t_kill
        _store(ctx, first, stored)
        # the node that was killed also lost its pool: the fault-free nodes must start again after this
    finally:
        for ag in first:
            if ag.proc.poll() is None:
                ag.proc.kill()
    last = max(stored)
    second = [Agent(ctx, a, 2, "ddp-run-2", endpoint, stored[last]),
              Agent(ctx, spare, 2, "ddp-run-2", endpoint, stored[last])]
    try:
        for ag in second:
            ag.proc.wait(timeout=400)
    finally:
        for ag in second:
            if ag.proc.poll() is None:
                ag.proc.kill()
    _store(ctx, second, stored)
    t_total = time.monotonic() - t0
    ev2 = [e for ag in second for e in ag.ev()]
    start2 = next((e for e in ev2 if e.get("event") == "start"), {})
    done = next((e for e in ev2 if e.get("event") == "done"), None)
    total = start2.get("total_steps")
    steps = sorted(stored)
    res.faults += f" ({killed} processes)"
    res.lost = 0 if done is not None else 1
    res.duplicated = 0
    # launch to the start event: agents start, meet, start their ranks, which load the data (rank 0 logs it)
    ready = [f"{e['time'] - ag.launched:.0f} s" for ag in first + second for e in ag.ev()
             if e.get("event") == "start"]
    # the rendezvous lasts until the last agent arrives: the longest wait of the two agents
    joined = [max((t for ag in agents if (t := ag.rendezvous()) is not None), default=None)
              for agents in (first, second)]
    res.figures["rendezvous"] = (f"c10d at {endpoint}:{RDZV_PORT}, world size {starts[0].get('world_size')}, "
                                 f"joined in {' / '.join('?' if t is None else f'{t:.1f} s' for t in joined)}, "
                                 f"training started {' / '.join(ready)} after launch (attempt 1 / 2)")
    res.figures["killed at step"] = f"{step_at_kill} (resumed from the last stored checkpoint, step {last})"
    res.figures["survivor's agent ended after"] = f"{t_down:.1f} s"
    res.figures["checkpoint steps"] = ",".join(map(str, steps))
    res.figures["run wall time (both attempts)"] = f"{t_total:.1f} s"
    res.checks["both attempts ran across two nodes (world size 2)"] = (
        bool(starts) and starts[0].get("world_size") == 2 and start2.get("world_size") == 2)
    res.checks[f"the run resumed from its last checkpoint (step {last})"] = start2.get("step") == last
    res.checks["the resumed run finished"] = (done is not None and all(ag.proc.returncode == 0 for ag in second)
                                              and done.get("step") == total)
    res.checks["one checkpoint per step, each stored whole (sha256 = bytes)"] = (
        len(steps) == len(set(steps)) and steps[-1] == total)
    if done is None:
        res.notes += [ag.text()[-1500:] for ag in second]
    h.start_worker(b)  # the killed node's worker comes back for any scenario after this one
    return res
