"""Queue lengths from both brokers, the Prometheus exporter over HTTP, and `orchestrator queue-length`.

Messages are published by the real `enqueue_shards`; the Redis numbers are checked against kombu's own count
(a passive queue declaration) including a priority message, and against a message held unacknowledged.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import exporter as ex
from orchestrator import jobs
from shared.settings import Settings
from workers.dispatch import enqueue_shards, get_app


def _publish(settings: Settings) -> dict[str, str]:
    """3 shards on the gpu queue and 1 training run on the train queue, published like `submit` does."""
    gpu = jobs.create_job(settings, "eval-translator", {}, 3)
    train = jobs.create_job(settings, "train-translator", {}, 1)
    assert enqueue_shards(settings, gpu) == 3 and enqueue_shards(settings, train) == 1
    return {"gpu": gpu, "train": train}


def _families(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_filesystem_broker_counts_message_files(embedded):
    _publish(embedded)
    lengths, unacked = ex.queue_lengths(embedded)
    assert lengths == {"gpu": 3, "train": 1, "cpu": 0} and unacked is None
    # the count is kombu's: one `<time>_<uuid>.<queue>.msg` file per waiting message
    files = sorted(p.name for p in (embedded.broker_folder / "in").iterdir())
    assert sum(name.endswith(".gpu.msg") for name in files) == 3


@pytest.mark.server
def test_redis_lengths_match_kombu_with_priorities_and_unacked(servers):
    _publish(servers)
    app = get_app(servers)
    app.send_task("eval_translator.shard", kwargs={"job_id": "x", "shard_index": 0}, queue="gpu", priority=5)
    import redis
    from kombu.transport.redis import Channel

    r = redis.Redis.from_url(servers.broker_url)
    assert r.llen(f"gpu{Channel.sep}3") == 1  # kombu put the priority-5 message in the step-3 list
    lengths, unacked = ex.queue_lengths(servers)
    assert lengths == {"gpu": 4, "train": 1, "cpu": 0} and unacked == 0
    assert ex.kombu_queue_lengths(servers) == lengths  # kombu's own _size agrees
    # a message delivered and not yet acknowledged leaves the list for the `unacked` hash
    with app.connection_for_read() as conn:
        chan = conn.channel()
        msg = chan.basic_get(queue="gpu", no_ack=False)
        assert msg is not None
        lengths, unacked = ex.queue_lengths(servers)
        assert lengths["gpu"] == 3 and unacked == 1
        msg.reject(requeue=True)
        chan.close()
    assert ex.queue_lengths(servers) == ({"gpu": 4, "train": 1, "cpu": 0}, 0)


@pytest.mark.server
def test_messages_left_unacked_by_a_killed_worker_are_counted_per_queue_with_their_age(servers):
    """A consumer killed with SIGKILL after taking a message leaves it in kombu's `unacked` hash (until the 2 h
    visibility timeout): the exporter counts it under its queue, and the age of the oldest grows."""
    import subprocess
    import sys
    import time

    _publish(servers)
    code = ("import os, signal, sys\n"
            "from kombu import Connection\n"
            "chan = Connection(sys.argv[1]).channel()\n"
            "assert chan.basic_get(queue=sys.argv[2], no_ack=False) is not None\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    for q in ("gpu", "train"):
        r = subprocess.run([sys.executable, "-c", code, servers.broker_url, q], capture_output=True, timeout=120)
        assert r.returncode == -9, r.stderr.decode()[-500:]
    time.sleep(1.2)
    snap = ex.collect(servers, db=False)
    assert snap.queues == {"gpu": 2, "train": 0, "cpu": 0} and snap.unacked == 2
    by_queue = snap.unacked_by_queue
    assert {q: n for q, (n, _age) in by_queue.items()} == {"gpu": 1, "train": 1, "cpu": 0}
    assert by_queue["gpu"][1] >= 1.0 and by_queue["train"][1] >= 1.0 and by_queue["cpu"][1] == 0
    fams = _families(ex.render_prometheus(snap, db=False))
    assert fams["orch_queue_unacked"][(("queue", "gpu"),)] == 1
    assert fams["orch_queue_unacked"][(("queue", "cpu"),)] == 0
    assert fams["orch_queue_unacked_oldest_seconds"][(("queue", "train"),)] >= 1.0
    assert fams["orch_broker_unacked_messages"][()] == 2


def test_exporter_serves_prometheus_text_over_http(embedded):
    _publish(embedded)
    server = ex.make_server(embedded, port=0, address="127.0.0.1")
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        with urllib.request.urlopen(base + "/healthz", timeout=10) as resp:
            assert resp.read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/nope", timeout=10)
        assert e.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
    fams = _families(text)
    q = {dict(k)["queue"]: v for k, v in fams["orch_queue_length"].items()}
    assert q == {"gpu": 3.0, "train": 1.0, "cpu": 0.0}
    jobs_by_state = {dict(k)["state"]: v for k, v in fams["orch_jobs"].items()}
    # submitted jobs stay queued until a worker starts a shard
    assert jobs_by_state["queued"] == 2.0 and jobs_by_state["running"] == 0.0 and len(jobs_by_state) == 5
    assert {dict(k)["state"]: v for k, v in fams["orch_shards"].items()} == {"pending": 0.0, "queued": 4.0,
                                                                              "running": 0.0}
    assert {dict(k)["source"]: v for k, v in fams["orch_scrape_error"].items()} == {"broker": 0.0, "db": 0.0}
    assert "orch_broker_unacked_messages" not in fams  # the filesystem broker has no such hash


def test_an_unreachable_broker_is_reported_not_fatal(embedded, tmp_path):
    broken = Settings(home=embedded.home, broker_url="redis://127.0.0.1:1/0", database_url=embedded.database_url,
                      storage=embedded.storage)
    snap = ex.collect(broken)
    assert snap.queues is None and "broker" in snap.errors and snap.jobs is not None
    fams = _families(ex.render_prometheus(snap))
    assert {dict(k)["source"]: v for k, v in fams["orch_scrape_error"].items()} == {"broker": 1.0, "db": 0.0}
    assert "orch_queue_length" not in fams and "orch_jobs" in fams


def test_queue_length_cli(embedded, monkeypatch, capsys):
    from orchestrator.cli import main

    _publish(embedded)
    monkeypatch.setenv("ORCH_HOME", str(embedded.home))
    for var in ("ORCH_BROKER_URL", "ORCH_DATABASE_URL", "ORCH_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["queue-length", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"gpu": 3, "train": 1, "cpu": 0}
    assert main(["queue-length"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["queue", "waiting"] and table[1].split() == ["gpu", "3"]
    assert main(["queue-length", "--queues", "gpu"]) == 0
    assert capsys.readouterr().out == "3\n"  # one queue: the bare number, for scripts
    assert main(["queue-length", "--queues", "gpu,video"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown queue video: use gpu, train, cpu"
    assert main(["exporter", "--once"]) == 0
    fams = _families(capsys.readouterr().out)
    assert fams["orch_queue_length"][(("queue", "gpu"),)] == 3.0
    monkeypatch.setenv("ORCH_BROKER_URL", "redis://127.0.0.1:1/0")
    assert main(["queue-length"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read queue lengths from broker redis://127.0.0.1:1/0") and "\n" not in err
