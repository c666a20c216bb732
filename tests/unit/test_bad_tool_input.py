"""Bad input to the `vllm-wideep` commands and the file readers (issue 16, item 6).

Every case is one line `vllm-wideep SUB: error: ...` on stderr and exit code 2 (commands),
or a ValueError naming the file and the problem (readers); never a traceback, a hang or a
silent wrong answer. `vllm-wideep eplb record` runs against a tiny HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from vllm_wideep.cli import SUBCOMMANDS
from vllm_wideep.cli import main as wideep_main
from vllm_wideep.eplb.files import (
    LoadRecord,
    ModelIdentity,
    read_load,
    read_placement,
    write_load,
    write_placement,
)
from vllm_wideep.eplb.files import PlacementRecord as _PlacementRecord
from vllm_wideep.eplb.placement import Placement

MODEL = ModelIdentity("Qwen3MoeForCausalLM", num_experts=16, hidden_size=128)
LAYERS = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def run(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """`vllm-wideep ARGV` must fail with exit code 2 and one error line; returns it."""
    capsys.readouterr()
    assert wideep_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vllm-wideep {argv[0]}: error: "), err
    return lines[0]


@pytest.fixture
def load_file(tmp_path: Path) -> Path:
    path = tmp_path / "load.json"
    load = torch.arange(32, dtype=torch.float64).reshape(2, 16)
    write_load(path, LoadRecord(MODEL, LAYERS, load))
    return path


def _placement(load_path: Path, out: Path, *extra: str) -> list[str]:
    return ["eplb", "placement", "--load", str(load_path), "--out", str(out), *extra]


# --- eplb placement: flags -----------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ep-size", "0"], "--ep-size 0: must be >= 1"),
        (["--ep-size", "-1"], "--ep-size -1: must be >= 1"),
        (["--ep-size", "3"], "--ep-size 3 must divide the 16 experts"),
        (["--ep-size", "2", "--redundant-experts", "-2"], "--redundant-experts -2: must be >= 0"),
        (
            ["--ep-size", "2", "--redundant-experts", "2000000"],
            "--redundant-experts 2000000: must be at most 16 = 16 experts x (--ep-size 2 - 1)",
        ),
        (["--ep-size", "2", "--redundant-experts", "3"], "must be a multiple of --ep-size 2"),
    ],
)
def test_placement_flags_out_of_range(tmp_path, load_file, capsys, flags, message):
    start = time.monotonic()
    line = run(_placement(load_file, tmp_path / "p.json", *flags), capsys)
    assert message in line
    assert time.monotonic() - start < 5
    assert not (tmp_path / "p.json").exists()


def test_placement_at_the_redundant_bound_still_works(tmp_path, load_file):
    out = tmp_path / "p.json"
    args = _placement(load_file, out, "--ep-size", "2", "--redundant-experts", "16")
    assert wideep_main(args) == 0
    assert read_placement(out).placement.slots_per_rank == 16


# --- load and placement files --------------------------------------------------------------


def _load_doc(**model) -> dict:
    return {
        "format": "vllm-wideep-load",
        "version": 1,
        "model": {**MODEL.__dict__, **model},
        "layers": LAYERS,
        "load": [[1.0] * 16, [2.0] * 16],
    }


def _placement_doc(**model) -> dict:
    row = list(range(16)) + [0, 1]
    return {
        "format": "vllm-wideep-placement",
        "version": 1,
        "model": {**MODEL.__dict__, **model},
        "num_ranks": 2,
        "slots_per_rank": 9,
        "layers": LAYERS,
        "physical_to_logical": [row, row],
    }


READERS = {"load": (read_load, _load_doc), "placement": (read_placement, _placement_doc)}


@pytest.mark.parametrize("kind", READERS)
@pytest.mark.parametrize(
    "text, message",
    [
        ('"num_experts": Infinity', "'model' num_experts must be a positive integer, got inf"),
        ('"num_experts": 4.9', "'model' num_experts must be a positive integer, got 4.9"),
        ('"num_experts": 16.0', "'model' num_experts must be a positive integer, got 16.0"),
        ('"num_experts": "16"', "'model' num_experts must be a positive integer, got '16'"),
        ('"num_experts": true', "'model' num_experts must be a positive integer, got True"),
        ('"hidden_size": NaN', "'model' hidden_size must be a positive integer, got nan"),
        ('"architecture": 7', "'model' architecture must be a non-empty string, got 7"),
    ],
)
def test_model_counts_must_be_integers(tmp_path, kind, text, message):
    read, doc = READERS[kind]
    key = text.split(":")[0].strip('"')
    path = tmp_path / "f.json"
    raw = json.dumps(doc(**{key: "@@"})).replace('"@@"', text.split(": ", 1)[1])
    path.write_text(raw)
    with pytest.raises(ValueError) as e:
        read(path)
    assert str(path) in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("kind", READERS)
def test_deeply_nested_json_is_refused(tmp_path, kind):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply") as e:
        READERS[kind][0](path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("kind", READERS)
def test_a_directory_or_an_empty_path_is_refused(tmp_path, kind):
    read = READERS[kind][0]
    with pytest.raises(ValueError, match="is a directory, expected a vllm-wideep-") as e:
        read(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(ValueError, match="the file path is empty"):
        read("")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_load_with_nan_or_infinity_is_refused(tmp_path, value):
    path = tmp_path / "load.json"
    path.write_text(json.dumps(_load_doc()).replace("2.0", value, 1))
    with pytest.raises(ValueError, match="'load' holds NaN or Infinity") as e:
        read_load(path)
    assert str(path) in str(e.value)


def test_load_must_hold_numbers_only(tmp_path):
    doc = _load_doc()
    doc["load"][0][3] = True
    path = tmp_path / "load.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="'load' must hold numbers only"):
        read_load(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda d, f: ["--load", str(d)], "is a directory, expected a vllm-wideep-load file"),
        (lambda d, f: ["--load", ""], "the file path is empty"),
        (lambda d, f: ["--load", str(f), "--out", str(d)], "it is a directory"),
    ],
)
def test_placement_command_path_errors(tmp_path, load_file, capsys, args, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["eplb", "placement", "--ep-size", "2", "--load", str(load_file)]
    argv += ["--out", str(tmp_path / "p.json"), *args(out_dir, load_file)]
    before = sorted(tmp_path.rglob("*"))
    assert message in run(argv, capsys)
    assert sorted(tmp_path.rglob("*")) == before  # no stray temporary file


def test_placement_command_with_infinite_experts(tmp_path, capsys):
    path = tmp_path / "load.json"
    path.write_text(json.dumps(_load_doc(num_experts="@@")).replace('"@@"', "Infinity"))
    line = run(_placement(path, tmp_path / "p.json", "--ep-size", "2"), capsys)
    assert f"{path}: 'model' num_experts must be a positive integer, got inf" in line


def test_write_does_not_follow_a_planted_tmp_link(tmp_path, load_file):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "p.json"
    for name in ("p.json.tmp", ".p.json.tmp"):
        (tmp_path / name).symlink_to(victim)
    assert wideep_main(_placement(load_file, out, "--ep-size", "2")) == 0
    assert victim.read_text() == "keep me\n"
    assert (tmp_path / "p.json.tmp").readlink() == victim
    assert read_placement(out).placement.num_ranks == 2
    extra = {p.name for p in tmp_path.iterdir()} - {"load.json", "p.json", "victim.txt"}
    assert extra == {"p.json.tmp", ".p.json.tmp"}  # only the planted links


def test_written_files_keep_the_usual_permissions(tmp_path, load_file):
    mask = os.umask(0o022)
    try:
        path = tmp_path / "again.json"
        write_load(path, read_load(load_file))
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_writers_refuse_nan_load_and_unwritable_paths(tmp_path):
    record = LoadRecord(MODEL, LAYERS, torch.full((2, 16), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="not written, the load holds NaN"):
        write_load(tmp_path / "l.json", record)
    (tmp_path / "file").write_text("")
    placement = Placement(torch.arange(16).repeat(2, 1), 2)
    with pytest.raises(ValueError, match="cannot write .*file/p.json"):
        write_placement(tmp_path / "file" / "p.json", _PlacementRecord(MODEL, LAYERS, placement))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --- eplb record ---------------------------------------------------------------------------


def _reply(rank: int, layers=LAYERS, **changes) -> dict:
    return {
        "ep_rank": rank,
        "num_ranks": 2,
        "model": MODEL.__dict__,
        "layers": layers,
        "load": [[float(rank + 1)] * 16 for _ in layers],
        "physical_to_logical": [],
        **changes,
    }


class _Server:
    """A threading HTTP server on 127.0.0.1 whose POST handler is `handle(request)`."""

    def __init__(self) -> None:
        self.handle: Callable[[BaseHTTPRequestHandler], None] = lambda r: None
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with contextlib.suppress(OSError):  # the client hung up
                    outer.handle(self)

            def do_GET(self) -> None:  # noqa: N802
                with contextlib.suppress(OSError):
                    outer.handle(self)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        def handle(request: BaseHTTPRequestHandler) -> None:
            request.send_response(status)
            request.send_header("Content-Type", content_type)
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)

        self.handle = handle

    def reply_json(self, doc) -> None:
        self.reply(200, json.dumps(doc).encode())

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _record(url: str, out: Path, timeout: float = 5, source: str = "rpc") -> list[str]:
    return [
        *("eplb", "record", "--url", url, "--out", str(out), "--timeout", str(timeout)),
        *("--source", source),
    ]


def test_record_from_a_local_server(server, tmp_path, capsys):
    server.reply_json({"results": [_reply(1), _reply(0)]})
    out = tmp_path / "load.json"
    assert wideep_main(_record(server.url, out)) == 0
    assert read_load(out).load.tolist() == [[3.0] * 16] * 2
    assert "from 2 EP ranks" in capsys.readouterr().out


def test_record_with_no_server_listening(tmp_path, capsys):
    with socket.socket() as s:  # bound, not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        line = run(_record(url, tmp_path / "load.json"), capsys)
    assert f"cannot reach {url}: Connection refused" in line


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://host/x", "http://", "http://h:port"])
def test_record_with_a_bad_url(tmp_path, capsys, url):
    assert f"--url {url!r}" in run(_record(url, tmp_path / "load.json"), capsys)


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_record_with_a_bad_timeout(tmp_path, capsys, timeout):
    line = run(_record("http://127.0.0.1:1", tmp_path / "l.json", timeout), capsys)
    assert "must be a finite number of seconds > 0" in line


def test_record_http_error_status(server, tmp_path, capsys):
    server.reply(404, b'{"detail": "Not Found"}')
    line = run(_record(server.url, tmp_path / "load.json"), capsys)
    assert "answered HTTP 404 Not Found" in line and "VLLM_SERVER_DEV_MODE=1" in line
    server.reply(500, b"engine\nfailed")
    line = run(_record(server.url, tmp_path / "load.json"), capsys)
    assert "answered HTTP 500 Internal Server Error: 'engine failed'" in line


def test_record_non_json_reply(server, tmp_path, capsys):
    server.reply(200, b"<html>hello</html>", "text/html")
    assert "is not JSON" in run(_record(server.url, tmp_path / "load.json"), capsys)
    assert not (tmp_path / "load.json").exists()


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"result": []}, "has no 'results' list"),
        ([1, 2], "has no 'results' list"),
        ({"results": []}, "returned no wideep_load replies"),
        ({"results": ["x"]}, "wideep_load reply 0 is 'x', not an object"),
        ({"results": [{"num_ranks": 1}]}, "reply 0: 'ep_rank' must be an integer >= 0, got None"),
        ({"results": [_reply(0, ep_rank="0")]}, "'ep_rank' must be an integer >= 0, got '0'"),
        ({"results": [_reply(0, num_ranks=1.5)]}, "'num_ranks' must be an integer >= 0"),
        ({"results": [_reply(0, model=None)]}, "EP rank 0: 'model' must hold architecture"),
        ({"results": [_reply(0, layers="abc")]}, "EP rank 0: 'layers' must be a list"),
        ({"results": [{**_reply(0), "load": None}]}, "'load' must be a list of equal-length"),
        ({"results": [{**_reply(0), "load": [[1.0] * 8] * 2}]}, "'load' is (2, 8), expected"),
        ({"results": [{**_reply(0), "load": [[-1.0] * 16] * 2}]}, "negative entries"),
        ({"results": [_reply(0), _reply(0)]}, "got load from EP ranks [0, 0], expected all of"),
        ({"results": [_reply(0), _reply(1, num_ranks=3)]}, "disagree on the EP size: [2, 3]"),
        (
            {"results": [_reply(0), _reply(1, model={**MODEL.__dict__, "hidden_size": 64})]},
            "EP rank 1 reports model",
        ),
    ],
)
def test_record_wrong_shaped_reply(server, tmp_path, capsys, doc, message):
    server.reply_json(doc)
    assert message in run(_record(server.url, tmp_path / "load.json"), capsys)
    assert not (tmp_path / "load.json").exists()


def test_record_ranks_with_different_layer_lists(server, tmp_path, capsys):
    one_layer = LAYERS[:1]
    server.reply_json({"results": [_reply(0), _reply(1, layers=one_layer)]})
    line = run(_record(server.url, tmp_path / "load.json"), capsys)
    assert "EP rank 1 reports layers" in line and "cannot be summed" in line
    server.reply_json({"results": [_reply(0), _reply(1, layers=LAYERS[::-1])]})  # same shape
    assert "EP rank 1 reports layers" in run(_record(server.url, tmp_path / "l.json"), capsys)
    assert not list(tmp_path.iterdir())


def test_record_from_a_server_that_drips_past_the_timeout(server, tmp_path, capsys):
    body = json.dumps({"results": [_reply(0, num_ranks=1)]}).encode()

    def drip(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        for i in range(len(body)):  # one byte every 20 ms: every read is quick
            if server.stop.wait(0.02):
                return
            request.wfile.write(body[i : i + 1])
            request.wfile.flush()

    server.handle = drip
    start = time.monotonic()
    line = run(_record(server.url, tmp_path / "load.json", timeout=0.5), capsys)
    assert f"no complete reply from {server.url} within --timeout 0.5 s" in line
    assert time.monotonic() - start < 2
    assert not (tmp_path / "load.json").exists()


def test_record_from_a_silent_server(server, tmp_path, capsys):
    server.handle = lambda request: server.stop.wait(5)
    start = time.monotonic()
    line = run(_record(server.url, tmp_path / "load.json", timeout=0.3), capsys)
    assert "within --timeout 0.3 s" in line and time.monotonic() - start < 2


# --- plan ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--imbalance nan", "--imbalance nan: must be a finite number >= 1"),
        ("--imbalance 0.5", "--imbalance 0.5: must be a finite number >= 1"),
        ("--isl nan", "--isl nan: must be a finite number in [0, 1e+09]"),
        ("--osl -1", "--osl -1: must be a finite number in [0, 1e+09]"),
        ("--context inf", "--context inf: must be a finite number in [0, 1e+09]"),
        ("--user-rate nan", "--user-rate nan: must be a finite number > 0"),
        ("--user-rate 0", "--user-rate 0: must be a finite number > 0"),
        ("--tpot-target -5", "--tpot-target -5: must be a finite number > 0"),
        ("--gpus 0", "--gpus 0: must be an integer in [1, 1000000]"),
        ("--gpus -8", "--gpus -8: must be an integer in [1, 1000000]"),
        ("--ep 8,0", "--ep 0: must be an integer in [1, 1000000]"),
        ("--batch 1,nan", "--batch nan: must be a finite number in (0, 1e+09]"),
        ("--batch 0", "--batch 0: must be a finite number in (0, 1e+09]"),
        ("--mtp-tokens 50000000", "--mtp-tokens 50000000: must be an integer in [0, 64]"),
        ("--mtp-tokens -1", "--mtp-tokens -1: must be an integer in [0, 64]"),
        ("--mtp-acceptance 1.5", "--mtp-acceptance 1.5: must be a finite number in [0, 1]"),
        ("--overlap nan", "--overlap nan: must be a finite number in [0, 1]"),
        ("--memory-utilization 0", "--memory-utilization 0: must be a finite number in (0, 1]"),
        ("--prefill-tokens 0", "--prefill-tokens 0: must be a finite number in (0, 1e+09]"),
        ("--redundant-experts -4", "--redundant-experts -4: must be an integer >= 0"),
        (
            "--ep 8,16 --gpus 16 --redundant-experts 5000",
            "--redundant-experts 5000: must be an integer in [0, 3840] (256 experts x (widest "
            "EP 16 - 1))",
        ),
        ("--extra-slots-per-gpu 300", "--extra-slots-per-gpu 300: must be an integer in [0, 256]"),
    ],
)
def test_plan_numbers_out_of_range(capsys, flags, message):
    start = time.monotonic()
    line = run(["plan", "--model", "deepseek-r1", *flags.split()], capsys)
    assert message in line
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "0"], "--repeats 0: must be an integer >= 1"),
        (["--threads", "-2"], "--threads -2: must be an integer >= 1"),
        (["--batch", "1,0"], "--batch 0: must be an integer in [1, 1e+09]"),
    ],
)
def test_plan_measure_cpu_numbers_out_of_range(tmp_path, capsys, argv, message):
    out = tmp_path / "x.json"
    assert message in run(["plan", "measure-cpu", "--out", str(out), *argv], capsys)
    assert not out.exists()


# --- the top-level command -----------------------------------------------------------------


def _fake_subcommand(monkeypatch, error: Exception) -> None:
    module = types.ModuleType("fake_wideep_sub")

    def main(argv):
        raise error

    module.main = main
    monkeypatch.setitem(sys.modules, "fake_wideep_sub", module)
    monkeypatch.setitem(SUBCOMMANDS, "fake", ("fake_wideep_sub", "a test subcommand"))


def test_top_level_turns_a_value_error_into_one_line(monkeypatch, capsys):
    _fake_subcommand(monkeypatch, ValueError("vllm_wideep: bad value\nsecond line"))
    assert run(["fake"], capsys) == "vllm-wideep fake: error: bad value second line"


def test_top_level_keeps_the_traceback_of_a_bug(monkeypatch):
    _fake_subcommand(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError, match="a bug"):
        wideep_main(["fake"])


def test_record_from_the_metrics_page(server, tmp_path, capsys, monkeypatch):
    """Snapshots of two ranks -> the collector's /metrics page -> a load file: the load
    summed over ranks, without the dev-mode RPC."""
    import prometheus_client

    from vllm_wideep.config import WideEPConfig
    from vllm_wideep.eplb.balancer import Balancer
    from vllm_wideep.eplb.location import ExpertSlots
    from vllm_wideep.plugin import metrics

    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(metrics.METRICS_RUN_ENV, "run")
    for rank in (0, 1):
        layers = []
        for name in ("model.layers.10.mlp.experts", "model.layers.9.mlp.experts"):
            slots = ExpertSlots.create(name, [torch.zeros(16, 2)], 16, 1, 0, routed=False)
            slots.route(torch.tensor([[rank], [15]]), torch.randn(2, 8))
            layers.append(slots)
        balancer = Balancer(layers, WideEPConfig(enabled=True), None)
        balancer.step()
        metrics.Publisher(rank).publish(balancer)
    registry = prometheus_client.CollectorRegistry()
    registry.register(metrics.WideEPCollector(tmp_path, "run", MODEL.__dict__))
    server.reply(200, prometheus_client.generate_latest(registry), "text/plain")
    out = tmp_path / "load.json"
    assert wideep_main(_record(server.url, out, source="metrics")) == 0
    record = read_load(out)
    assert record.model == MODEL
    assert record.layers == ["model.layers.9.mlp.experts", "model.layers.10.mlp.experts"]
    expected = [1.0, 1.0] + [0.0] * 13 + [2.0]  # expert 0 from rank 0, 1 from rank 1
    assert record.load.tolist() == [expected, expected]
    assert "/metrics (summed over EP ranks)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("page", "message"),
    [
        (b"# nothing here\n", "no vllm_wideep:model_info"),
        (b"not { prometheus", "is not a Prometheus page"),
    ],
)
def test_record_from_a_metrics_page_without_wide_ep(server, tmp_path, capsys, page, message):
    server.reply(200, page, "text/plain")
    assert wideep_main(_record(server.url, tmp_path / "x.json", source="metrics")) == 2
    assert message in capsys.readouterr().err
