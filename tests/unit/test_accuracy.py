"""The accuracy kit: task data, lm-eval task files, reproducible training, eval helpers."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from tools.accuracy import eval as acc_eval  # noqa: E402
from tools.accuracy.fp8 import (  # noqa: E402
    Fp8ExpertsModel,
    pad_moe_intermediate,
    padded_size,
    write_fp8_experts_model,
)
from tools.accuracy.tasks import (  # noqa: E402
    DATA_DIR,
    EVAL_ITEMS_PER_TASK,
    KINDS,
    NUM_CHOICES,
    TASKS_DIR,
    held_out_items,
    is_held_out,
    jsonl,
    task_data,
    training_items,
)
from tools.accuracy.train import (  # noqa: E402
    KV_LORA_RANK,
    NUM_LAYERS,
    TRAIN_KV_LORA_RANK,
    VOCAB,
    TaskModel,
    TrainConfig,
    build_tokenizer,
    encode,
    export_model,
    make_batch,
    model_config,
    train_and_save,
)

# --------------------------------------------------------------------------- task data


def test_generators_are_deterministic() -> None:
    assert training_items(random.Random(3), 50) == training_items(random.Random(3), 50)
    assert training_items(random.Random(3), 50) != training_items(random.Random(4), 50)
    for kind in KINDS:
        assert held_out_items(kind, 20, seed=0) == held_out_items(kind, 20, seed=0)
        assert held_out_items(kind, 20, seed=0) != held_out_items(kind, 20, seed=1)


def test_training_never_sees_a_held_out_context() -> None:
    items = training_items(random.Random(0), 20_000)
    assert {it.kind for it in items} == set(KINDS)
    assert not any(is_held_out(it.context) for it in items)
    for kind in KINDS:
        held = held_out_items(kind, EVAL_ITEMS_PER_TASK, seed=0)
        assert all(is_held_out(it.context) and it.prompt.startswith(it.context) for it in held)
        assert len({it.prompt for it in held}) == EVAL_ITEMS_PER_TASK
        assert {it.context for it in held}.isdisjoint(it.context for it in items)


def test_training_sequences_ask_every_query_of_a_context() -> None:
    for it in training_items(random.Random(2), 200):
        if it.kind == "minmax":
            queries = [q.split("=")[0] for q in (it.prompt[len(it.context) :] + it.more).split(";")]
            assert sorted(queries) == ["max", "min"]
        else:
            assert it.more == "" and it.context == it.prompt


def test_answers_are_right() -> None:
    for it in training_items(random.Random(5), 400):
        body = it.prompt.removesuffix("=")
        if it.kind == "add":
            a, b = body.split("+")
            assert int(it.answer[::-1]) == int(a) + int(b) and len(it.answer) == 3
        elif it.kind == "copy":
            assert it.answer == body.removeprefix("cpy ")
        elif it.kind == "shift":
            word = body.removeprefix("nxt ")
            assert [ord(y) - ord(x) for x, y in zip(word, it.answer, strict=True)] == [
                1 if x != "z" else -25 for x in word
            ]
        else:
            digits, query = body.removeprefix("dig ").split(":")
            assert it.answer == {"max": max, "min": min}[query](digits)


def test_every_character_is_in_the_vocabulary() -> None:
    for it in training_items(random.Random(1), 2000):
        encode(it.prompt + it.answer)


def test_committed_data_is_the_generators_output() -> None:
    expected = task_data()
    assert sorted(p.name for p in DATA_DIR.glob("*.jsonl")) == sorted(expected)
    for name, rows in expected.items():
        assert (DATA_DIR / name).read_text() == jsonl(rows), name


def test_multiple_choice_rows() -> None:
    rows = task_data()["mc.jsonl"]
    assert {row["kind"] for row in rows} == set(KINDS)
    held = [it for kind in KINDS for it in held_out_items(kind, 50, seed=2)]
    assert all(is_held_out(it.context) for it in held)
    answers = {it.prompt: it.answer for it in held}
    for row in rows:
        choices, gold = row["choices"], answers[row["prompt"]]
        assert len(set(choices)) == NUM_CHOICES and choices[row["label"]] == gold
        for wrong in choices:
            if wrong != gold:  # a prefix would never score below the answer
                assert not wrong.startswith(gold) and not gold.startswith(wrong)


# --------------------------------------------------------------------------- lm-eval tasks


def test_task_yamls_parse_and_read_the_data() -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(["wideep_tasks"])
    assert set(loaded["tasks"]) == set(acc_eval.METRICS)
    assert set(loaded["group_map"]["wideep_tasks"]) == set(acc_eval.METRICS)
    for name, task in loaded["tasks"].items():
        docs = list(task.test_docs())
        assert len(docs) == EVAL_ITEMS_PER_TASK, name
        if name == "wideep_mc":
            assert task.OUTPUT_TYPE == "multiple_choice"
            assert task.config.target_delimiter == ""
            assert task.doc_to_choice(docs[0])[task.doc_to_target(docs[0])]
        else:
            assert task.OUTPUT_TYPE == "generate_until"
            assert task.doc_to_text(docs[0]).endswith("=")
            assert task.doc_to_target(docs[0]) == docs[0]["answer"]


# --------------------------------------------------------------------------- training


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tokenizer_is_one_token_per_character(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "48+57=501 cpy abcd=abcd\ndig 123456:max=6;min=1"
    assert tok(text)["input_ids"] == encode(text)
    assert tok.decode(encode(text)) == text
    assert len(tok) == len(VOCAB) and tok.eos_token_id == 0 and tok.pad_token_id == 1


COMMITTED_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-dsv3-tasks"
# What the model computes; not what `save_pretrained` adds (versions, dtype, class).
ARCHITECTURE_FIELDS = (
    *("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"),
    *("intermediate_size", "moe_intermediate_size", "hidden_act", "rms_norm_eps"),
    *("num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank"),
    *("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "tie_word_embeddings"),
    *("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace"),
    *("n_group", "topk_group", "topk_method", "scoring_func", "routed_scaling_factor"),
    *("norm_topk_prob", "bos_token_id", "eos_token_id", "pad_token_id"),
)


def test_model_config_is_the_committed_models() -> None:
    committed = json.loads((COMMITTED_MODEL / "config.json").read_text())
    config = model_config().to_dict()
    assert config["num_hidden_layers"] == NUM_LAYERS and config["kv_lora_rank"] == KV_LORA_RANK
    assert committed["num_nextn_predict_layers"] == 1
    drift = {
        k: (config.get(k), committed.get(k, "missing"))
        for k in ARCHITECTURE_FIELDS
        if k not in committed or config.get(k) != committed[k]
    }
    assert drift == {}


def test_wider_latent_computes_the_same() -> None:
    import torch

    model = TaskModel(seed=0)
    exported = export_model(model, "float32")
    exported.config.num_hidden_layers = NUM_LAYERS
    assert exported.config.kv_lora_rank == KV_LORA_RANK > TRAIN_KV_LORA_RANK
    ids, _ = make_batch(training_items(random.Random(0), 4))
    with torch.no_grad():
        want = model.hf(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_short_training_is_bit_reproducible_and_saves_mtp(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=3, batch_size=8, warmup_steps=1, eval_items=2)
    first = train_and_save(tmp_path / "a", cfg, log_every=0)
    train_and_save(tmp_path / "b", cfg, log_every=0)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert first["train_config"]["steps"] == 3

    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["num_hidden_layers"] == NUM_LAYERS
    assert config["num_nextn_predict_layers"] == 1
    assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:
        names = set(f.keys())  # noqa: SIM118 (safe_open is no dict)
        mtp = f"model.layers.{NUM_LAYERS}."
        for name in (
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
            "embed_tokens.weight",
            "self_attn.kv_a_proj_with_mqa.weight",
            "mlp.gate.weight",
            "mlp.gate.e_score_correction_bias",
            "mlp.shared_experts.down_proj.weight",
            "mlp.experts.15.gate_proj.weight",
        ):
            assert mtp + name in names, name
        assert f.get_tensor(mtp + "eh_proj.weight").shape == (128, 256)
        assert (
            f.get_tensor(mtp + "shared_head.head.weight") == f.get_tensor("lm_head.weight")
        ).all()
    assert not any(n.startswith(f"model.layers.{NUM_LAYERS + 1}.") for n in names)


# --------------------------------------------------------------------------- eval helpers


def test_expert_load_concatenates_ranks_in_order() -> None:
    stats = [
        {"ep_rank": 1, "tokens_per_expert": {"model.layers.1.mlp.experts": [5, 6]}},
        {"ep_rank": 0, "tokens_per_expert": {"model.layers.1.mlp.experts": [1, 2]}},
    ]
    assert acc_eval.expert_load(stats) == {"model.layers.1.mlp.experts": [1, 2, 5, 6]}


def test_mtp_acceptance_sums_engines() -> None:
    metrics = "\n".join(
        [
            "# TYPE vllm:spec_decode_num_draft_tokens_total counter",
            'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 100.0',
            'vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="m"} 60.0',
            'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 90.0',
            'vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="m"} 30.0',
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 120.0',
        ]
    )
    assert acc_eval.mtp_acceptance(metrics) == pytest.approx(120 / 160)
    assert acc_eval.mtp_acceptance("") is None


def test_targets_and_table() -> None:
    tasks = list(acc_eval.METRICS)
    stock = acc_eval.Row("stock", "", scores=dict.fromkeys(tasks, 0.95))
    close = acc_eval.Row("wide-EP", "", scores=dict.fromkeys(tasks, 0.945))
    far = acc_eval.Row("far", "", scores={**dict.fromkeys(tasks, 0.95), tasks[0]: 0.93})
    assert acc_eval.check_targets([stock, close]) == []
    assert acc_eval.check_targets([stock, far]) == [f"far {tasks[0]}: 2.0 points from stock"]
    weak = acc_eval.Row("stock", "", scores=dict.fromkeys(tasks, 0.5))
    assert len(acc_eval.check_targets([weak])) == len(tasks)
    lines = acc_eval.table([stock, close]).splitlines()
    assert lines[0].startswith("| config | add |") and "94.5" in lines[3]


def test_targets_compare_fp8_wide_ep_with_stock_on_the_dequantized_copy() -> None:
    tasks = list(acc_eval.METRICS)
    dequant = acc_eval.Row(acc_eval.FP8_BASELINE, "", scores=dict.fromkeys(tasks, 0.8))
    fp8 = acc_eval.Row("wide-EP, FP8", "", scores=dict.fromkeys(tasks, 0.805))
    assert acc_eval.check_targets([dequant, fp8]) == []  # no stock row needed, none below 90 %
    stock = acc_eval.Row("stock", "", scores=dict.fromkeys(tasks, 1.0))
    assert acc_eval.check_targets([stock, dequant, fp8]) == []
    far = acc_eval.Row("wide-EP, FP8", "", scores={**dict.fromkeys(tasks, 0.8), tasks[1]: 0.75})
    assert acc_eval.check_targets([stock, dequant, far]) == [
        f"wide-EP, FP8 {tasks[1]}: 5.0 points from {acc_eval.FP8_BASELINE}"
    ]
    assert acc_eval.check_targets([stock, fp8]) == [
        f"no {acc_eval.FP8_BASELINE} scores to compare wide-EP, FP8 with"
    ]
    lines = acc_eval.table([stock, dequant, fp8]).splitlines()
    assert lines[3].startswith(f"| {acc_eval.FP8_BASELINE} | 80.0 |") and "80.5" in lines[4]


# --------------------------------------------------------------------------- FP8 experts


@pytest.fixture(scope="module")
def fp8_experts(tmp_path_factory: pytest.TempPathFactory) -> Fp8ExpertsModel:
    return write_fp8_experts_model(COMMITTED_MODEL, tmp_path_factory.mktemp("fp8") / "m-fp8")


def test_padded_experts_compute_the_same(tmp_path: Path) -> None:
    """The committed model and its experts padded to 128 units (unquantized): the same
    logits in float32 (transformers' forward)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM

    config = json.loads((COMMITTED_MODEL / "config.json").read_text())
    tensors = load_file(COMMITTED_MODEL / "model.safetensors")
    padded = pad_moe_intermediate(tensors, config, padded_size(config["moe_intermediate_size"]))
    assert padded["model.layers.1.mlp.experts.3.gate_proj.weight"].shape == (128, 128)
    assert padded["model.layers.2.mlp.experts.3.down_proj.weight"].shape == (128, 128)
    assert padded["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (128, 128)
    assert (
        padded["model.layers.1.self_attn.o_proj.weight"]
        is tensors["model.layers.1.self_attn.o_proj.weight"]
    )
    save_file(padded, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 128}))

    ids = torch.tensor([encode("48+57=501\ncpy kqzd=kqzd\nnxt kqzd=lrae\ndig 482915:max=9")])
    logits = []
    for folder in (COMMITTED_MODEL, tmp_path):
        model = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert model.config.moe_intermediate_size == (64 if folder == COMMITTED_MODEL else 128)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_fp8_experts_dequantize_to_the_copy(fp8_experts: Fp8ExpertsModel) -> None:
    import torch

    from vllm_wideep.kernels.fp8 import dequantize_block_fp8

    configs = [json.loads((d / "config.json").read_text()) for d in fp8_experts]
    assert configs[0].pop("quantization_config")["modules_to_not_convert"]
    assert configs[0] == configs[1] and configs[1]["moe_intermediate_size"] == 128
    quant = json.loads((fp8_experts.fp8 / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "fp8" and quant["weight_block_size"] == [128, 128]
    ignored = set(quant["modules_to_not_convert"])
    assert "model.layers.1.mlp.shared_experts.gate_up_proj" in ignored
    assert not any(".mlp.experts." in name for name in ignored)

    with (
        safe_open(fp8_experts.fp8 / "model.safetensors", "pt") as fp8,
        safe_open(fp8_experts.dequantized / "model.safetensors", "pt") as copy,
    ):
        copy_names = set(copy.keys())  # noqa: SIM118 (safe_open is no dict)
        scales = {n for n in fp8.keys() if n.endswith("_scale_inv")}  # noqa: SIM118
        assert set(fp8.keys()) == copy_names | scales  # noqa: SIM118
        expected = {
            f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight_scale_inv"
            for layer in (1, 2, 3)  # 3: the MTP layer
            for e in range(16)
            for p in ("gate", "up", "down")
        }
        assert scales == expected
        for name in sorted(copy_names):
            want = copy.get_tensor(name)
            if name + "_scale_inv" in scales:
                q, scale = fp8.get_tensor(name), fp8.get_tensor(name + "_scale_inv")
                assert q.dtype == torch.float8_e4m3fn and scale.shape == (1, 1)
                got = dequantize_block_fp8(q, scale).to(want.dtype)
            else:
                got = fp8.get_tensor(name)
            assert got.dtype == want.dtype and torch.equal(got, want), name


def test_fp8_experts_are_written_once(fp8_experts: Fp8ExpertsModel, tmp_path: Path) -> None:
    digests = [_digests(d) for d in fp8_experts]
    mtimes = [(d / "model.safetensors").stat().st_mtime_ns for d in fp8_experts]
    assert write_fp8_experts_model(COMMITTED_MODEL, fp8_experts.fp8) == fp8_experts
    assert [(d / "model.safetensors").stat().st_mtime_ns for d in fp8_experts] == mtimes
    again = write_fp8_experts_model(COMMITTED_MODEL, tmp_path / "m-fp8")
    assert [_digests(d) for d in again] == digests
    foreign = tmp_path / "other-fp8"
    foreign.mkdir()
    (foreign / "x").write_text("")
    with pytest.raises(FileExistsError, match="holds no"):
        write_fp8_experts_model(COMMITTED_MODEL, foreign)
