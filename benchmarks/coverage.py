"""Which MoE architectures of vLLM 0.32 wide EP serves, proven against stock vLLM.

For every architecture of `vllm_wideep.tiny_models.COVERAGE_ARCHES` (and the built-in
tiny models), a tiny random-weight float32 checkpoint (bfloat16 where stock vLLM's CPU
kernels take nothing else) generates greedily on the reference prompts of tests/e2e
twice, with `trust_remote_code` for the checkpoints that carry their own configuration
file:

* stock vLLM at TP 1, the plugin not even loaded (`VLLM_PLUGINS=""`), in one process
  for all models (in-process engines, each model in turn);
* `--enable-wideep` at EP 2 through TP 2 (vLLM's mp executor), one process for all
  models too.

A child process that dies takes only the model it was running: the others go on in a
new one. Each architecture gets one status:

* ``identical``: the same tokens, logprobs within float32 noise (tests/e2e/compare.py);
  a model that runs in another dtype (``CoverageArch.dtype``) says so and names the
  logprob tolerance it met;
* ``refused: <reason>``: the plugin's own error (a message starting ``vllm_wideep:``);
* ``stock vLLM cannot run it on CPU: <reason>``: stock vLLM at TP 1 fails;
* ``differs`` or ``fails under wide EP``: a bug of the plugin, with the evidence.

    .venv/bin/python benchmarks/coverage.py                  # writes docs/coverage.md
    .venv/bin/python benchmarks/coverage.py --only gpt_oss llama4 --out -

The table goes into `docs/coverage.md` between the markers `TABLE_START` and `TABLE_END`
(the prose around it stays).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.e2e.compare import TOLERANCES, assert_greedy_parity  # noqa: E402
from tests.e2e.reference import PROMPTS  # noqa: E402
from tools.launch import CHILD_GROUPS, e2e_env  # noqa: E402

MAX_TOKENS = 8
DTYPE = "float32"
# Built-in tiny models (tests/e2e's parity suite) that stand for their architecture here.
BUILT_IN = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
WIDEEP_TP2 = {
    "tensor_parallel_size": 2,
    "distributed_executor_backend": "mp",
    "additional_config": {"wideep": {"enabled": True}},
}
DOC = REPO / "docs" / "coverage.md"
TABLE_START, TABLE_END = "<!-- TABLE_START -->", "<!-- TABLE_END -->"
COMMAND = ".venv/bin/python benchmarks/coverage.py"
CASE_TIMEOUT = 300  # seconds for one model's engine start and generation
_CASE_START, _CASE = "COVERAGE-CASE-START ", "COVERAGE-CASE "


# --------------------------------------------------------------------------- child


def _child(cases: list[dict]) -> None:
    """Run each case's engine in this process in turn; print its result or its error."""
    import gc

    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    for case in cases:
        print(_CASE_START + case["name"], flush=True)
        try:
            llm = LLM(
                model=case["model"],
                dtype=case["dtype"],
                max_model_len=256,
                enforce_eager=True,
                seed=0,
                **case["engine"],
            )
            outputs = llm.generate(PROMPTS, params, use_tqdm=False)
            result = {
                "tokens": [list(o.outputs[0].token_ids) for o in outputs],
                "logprobs": [
                    [
                        {str(t): lp.logprob for t, lp in step.items()}
                        for step in o.outputs[0].logprobs
                    ]
                    for o in outputs
                ],
            }
            del llm
        except Exception as error:  # noqa: BLE001 (each model's failure is a result)
            # A failed engine start leaves vLLM's process-wide groups half torn down (the
            # next model would fail on them): stop, the driver goes on in a new process.
            traceback.print_exc()
            print(_CASE + json.dumps({"name": case["name"], "error": _describe(error)}), flush=True)
            return
        gc.collect()
        print(_CASE + json.dumps({"name": case["name"], **result}), flush=True)


def _describe(error: Exception) -> str:
    """``Type: message``, and where it was raised when the message says little (a bare
    ``assert`` in vLLM)."""
    message = str(error).strip()
    if len(message) > 40:
        return f"{type(error).__name__}: {message}"
    frame = traceback.extract_tb(error.__traceback__)[-1]
    where = frame.filename.split("site-packages/")[-1]
    return f"{type(error).__name__}: {message} ({where}:{frame.lineno}: {frame.line})"


# --------------------------------------------------------------------------- driver


def run_cases(cases: list[dict], env: dict[str, str]) -> dict[str, dict]:
    """name -> {"tokens", "logprobs"} or {"error", "log"} for each case, in child
    processes: one for all, a new one for the rest whenever one dies or hangs."""
    results: dict[str, dict] = {}
    pending = list(cases)
    while pending:
        output, finished = _run_child(pending, env, CASE_TIMEOUT * len(pending) + 120)
        segments = _segments(output)
        for name, segment in segments.items():
            line = next((ln for ln in segment.splitlines() if ln.startswith(_CASE)), None)
            if line is not None:
                result = json.loads(line.removeprefix(_CASE))
                result.pop("name")
                if "error" in result:
                    result["log"] = segment
                results[name] = result
            else:
                why = "its process died" if finished else "timed out"
                results[name] = {"error": f"{why}: {last_error(segment)}", "log": segment}
        if not segments:  # the child died before the first case (import error)
            raise RuntimeError(f"coverage child failed before any case:\n{output[-4000:]}")
        pending = [c for c in pending if c["name"] not in results]
    return results


def _run_child(cases: list[dict], env: dict[str, str], timeout: float) -> tuple[str, bool]:
    """(the child's output, whether it exited by itself)."""
    with tempfile.TemporaryFile("w+") as log:
        args = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cases)]
        proc = CHILD_GROUPS.popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            proc.wait(timeout=timeout)
            exited = True
        except subprocess.TimeoutExpired:
            exited = False
        finally:
            CHILD_GROUPS.kill(proc)
        log.seek(0)
        return log.read(), exited


def _segments(output: str) -> dict[str, str]:
    """case name -> the child's output while it ran that case."""
    parts = re.split(rf"^{re.escape(_CASE_START)}(\S+)$", output, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


_ERROR_LINE = re.compile(r"\b[A-Z]\w*(?:Error|Exception): .*$")


def last_error(log: str) -> str:
    """The most telling error of a failed run: the plugin's own message if there is one,
    else the error the child reported, else the last exception line, else the last line."""
    own = re.findall(r"vllm_wideep: [^\n]*", log)
    if own:
        return own[-1]
    found = (_ERROR_LINE.search(ln) for ln in log.splitlines() if not ln.startswith(_CASE))
    errors = [m.group(0) for m in found if m and "Engine core initialization" not in m.group(0)]
    case_line = next((ln for ln in log.splitlines() if ln.startswith(_CASE)), None)
    if case_line is not None:
        reported = json.loads(case_line.removeprefix(_CASE))["error"]
        # vLLM logged the cause and raised "see the logs": the logged cause says more.
        causes = [e for e in errors if not e.startswith(reported.split(":")[0])]
        if "check the logs" in reported.lower() and causes:
            return causes[-1]
        return reported
    if errors:
        return errors[-1]
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


@dataclass(frozen=True)
class Row:
    name: str
    architecture: str
    status: str
    detail: str = ""


def classify(name: str, architecture: str, stock: dict, wideep: dict, dtype: str = DTYPE) -> Row:
    """The table row of one architecture from its stock TP 1 and wide-EP results in
    ``dtype`` (which sets compare.py's tolerances)."""
    if "error" in stock:
        why = last_error(stock.get("log", stock["error"]))
        return Row(name, architecture, f"stock vLLM cannot run it on CPU: {_short(why)}")
    if "error" in wideep:
        why = last_error(wideep.get("log", wideep["error"]))
        if why.startswith("vllm_wideep:"):
            return Row(name, architecture, f"refused: {_short(why)}")
        return Row(name, architecture, f"fails under wide EP: {_short(why)}")
    if any(math.isnan(lp) for seq in stock["logprobs"] for step in seq for lp in step.values()):
        why = "its logprobs on this tiny checkpoint are NaN (no reference to compare with)"
        return Row(name, architecture, f"stock vLLM cannot run it on CPU: {why}")
    try:
        parity = assert_greedy_parity(stock, wideep, dtype)
    except AssertionError as error:
        return Row(name, architecture, "differs", _short(str(error)))
    if parity.forks:
        return Row(name, architecture, "identical up to near-ties", f"forks {parity.forks}")
    tokens = sum(len(t) for t in stock["tokens"])
    if dtype != DTYPE:  # not float32 noise: say which tolerance it met
        tolerance = TOLERANCES[dtype][1]
        return Row(name, architecture, f"identical in {dtype} (logprobs within {tolerance})")
    return Row(name, architecture, "identical", f"{tokens} tokens")


def _short(text: str, limit: int = 220) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_models(names: list[str], root: Path) -> dict[str, tuple[str, str]]:
    """name -> (checkpoint path, vLLM architecture) for each coverage or built-in name."""
    from vllm_wideep.tiny_models import COVERAGE_ARCHES, build_coverage_model, build_tiny_model

    models = {}
    for name in names:
        if name in BUILT_IN:
            path = build_tiny_model(root / name, name, dtype=DTYPE)
            models[name] = (str(path), BUILT_IN[name])
        else:
            path = build_coverage_model(root / name, name, dtype=model_dtype(name))
            models[name] = (str(path), COVERAGE_ARCHES[name].architecture)
    return models


def model_dtype(name: str) -> str:
    """The dtype model ``name`` runs in: float32 but where stock vLLM's CPU kernels need
    another (``CoverageArch.dtype``)."""
    from vllm_wideep.tiny_models import COVERAGE_ARCHES

    return COVERAGE_ARCHES[name].dtype if name in COVERAGE_ARCHES else DTYPE


def _case(name: str, model: str, engine: dict) -> dict:
    """One child case: remote-code configs get ``trust_remote_code`` (the code is the
    checkpoint's own file, nothing is downloaded)."""
    from vllm_wideep.tiny_models import COVERAGE_ARCHES

    if name in COVERAGE_ARCHES and COVERAGE_ARCHES[name].trust_remote_code:
        engine = {**engine, "trust_remote_code": True}
    return {"name": name, "model": model, "dtype": model_dtype(name), "engine": engine}


def stock_cases(models: dict[str, tuple[str, str]]) -> list[dict]:
    return [_case(n, m, {}) for n, (m, _) in models.items()]


def wideep_cases(models: dict[str, tuple[str, str]]) -> list[dict]:
    return [_case(n, m, WIDEEP_TP2) for n, (m, _) in models.items()]


STOCK_ENV = {"VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def coverage(names: list[str], root: Path) -> list[Row]:
    """One row per name: stock TP 1 for all in one process, then wide EP 2 through TP 2."""
    models = build_models(names, root)
    stock = run_cases(stock_cases(models), e2e_env(**STOCK_ENV))
    runnable = {n: models[n] for n in models if "error" not in stock[n]}
    wideep = run_cases(wideep_cases(runnable), e2e_env(num_ranks=2)) if runnable else {}
    return [
        classify(name, arch, stock[name], wideep.get(name, {"error": "not run"}), model_dtype(name))
        for name, (_, arch) in models.items()
    ]


TABLE_HEADER = (
    "| model (tiny checkpoint) | vLLM architecture | EP 2 through TP 2 vs stock TP 1 |",
    "|---|---|---|",
)


def _markdown_row(row: Row) -> str:
    status = (
        row.status
        if not row.detail or row.status == "identical"
        else f"{row.status} ({row.detail})"
    )
    return f"| `{row.name}` | `{row.architecture}` | {status} |"


def markdown(rows: list[Row]) -> str:
    lines = [*TABLE_HEADER, *(_markdown_row(r) for r in sorted(rows, key=lambda r: r.name))]
    return "\n".join(lines) + "\n"


def write_doc(rows: list[Row], doc: Path) -> None:
    """Put the table of ``rows`` between the markers of ``doc``; the rows of other models
    already there stay (``--only`` reruns some)."""
    text = doc.read_text()
    before, rest = text.split(TABLE_START, 1)
    old_table, after = rest.split(TABLE_END, 1)
    kept = {ln.split("`")[1]: ln for ln in old_table.splitlines() if ln.startswith("| `")}
    for row in rows:
        kept[row.name] = _markdown_row(row)
    table = "\n".join([*TABLE_HEADER, *(kept[name] for name in sorted(kept))]) + "\n"
    doc.write_text(f"{before}{TABLE_START}\n{table}{TABLE_END}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="rerun these models; other rows stay"
    )
    parser.add_argument("--out", default=str(DOC), help="the page to update, or - for stdout")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(json.loads(args.child))
        return 0
    from vllm_wideep.tiny_models import COVERAGE_ARCHES

    names = args.only or sorted([*BUILT_IN, *COVERAGE_ARCHES])
    root = Path(os.environ.get("WIDEEP_TEST_CACHE", REPO / ".cache")) / "coverage-models"
    start = time.monotonic()
    rows = coverage(names, root)
    print(markdown(rows))
    print(f"{len(rows)} models in {time.monotonic() - start:.0f} s", file=sys.stderr)
    if args.out != "-":
        write_doc(rows, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
