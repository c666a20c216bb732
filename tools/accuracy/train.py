"""Train a tiny DeepSeek-V3 (MLA, grouped top-k MoE, one MTP layer) on the synthetic tasks.

    python -m tools.accuracy.train OUT_DIR [--steps N] [--seed S]

writes a checkpoint that stock vLLM loads: `model.safetensors` (bfloat16), `config.json`,
the tokenizer and `wideep_trained_model.json` (training settings, final losses, greedy
accuracy per task kind on held-out items, library versions). The same settings, library
versions and CPU give the same bytes: one thread, `torch.use_deterministic_algorithms`,
every random draw from `seed`.

The model (`model_config`) is DeepSeek-V3 in miniature: hidden size 128, 3 layers (layer 0
dense, layers 1-2 MoE with 16 routed experts in 4 groups, top-4 of the 2 best groups,
sigmoid scores, 1 shared expert) and MLA with `kv_lora_rank + qk_rope_head_dim` = 512 + 64,
the only size vLLM's CPU MLA kernel takes. It is trained with transformers'
`DeepseekV3ForCausalLM`, built with one layer more than it uses: that layer is the decoder
block of the MTP module (`MTPHead`), so `save_pretrained` writes it under vLLM's names.

Multi-token prediction, depth 1, as DeepSeek-V3 trains it and as vLLM's
`deepseek_mtp.py` runs it: at position i, with h_i the main model's final (normed) hidden
state and t_{i+1} the next input token,

    h'_i = Block(eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]))     (Emb zeroed at position 0)
    p(t_{i+2}) = softmax(lm_head(shared_head.norm(h'_i)))

with the embedding and output head shared with the main model. Loss = main cross-entropy
+ `mtp_weight` x MTP cross-entropy, both on the answer tokens and end of text only.

No load balancing: the routers' correction bias stays zero and there is no auxiliary loss,
so routing ends up skewed (some experts take much more than 1/16 of the tokens), as it is
in real models before a balancer spreads it.

Tokenizer: one token per character (`VOCAB`, 64 tokens: end of text, pad, digits, lowercase
letters, space, newline and 24 punctuation marks), a byte-level BPE without merges that
`AutoTokenizer` and vLLM load from the folder. It adds no BOS: a prompt's first character
is at position 0, in training and in vLLM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tools.accuracy.tasks import KINDS, Item, held_out_items, training_items
from vllm_wideep.tiny_models import (
    EOS_TOKEN,
    EOS_TOKEN_ID,
    PAD_TOKEN,
    PAD_TOKEN_ID,
    deepseek_v3_config,
    wrap_tokenizer,
)

if TYPE_CHECKING:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerFast

CHARS = string.digits + string.ascii_lowercase + " \n" + string.punctuation[:24]
VOCAB: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN, *CHARS)
assert len(VOCAB) == 64 and len(set(VOCAB)) == 64
STOP_TOKEN_IDS = (EOS_TOKEN_ID, VOCAB.index(";"), VOCAB.index("\n"))

NUM_LAYERS = 3  # layer 0 dense, layers 1-2 MoE; the MTP block is layer 3
NUM_HEADS = 2
KV_LORA_RANK = 512  # 512 + 64 = 576, the only latent size CPU MLA supports
TRAIN_KV_LORA_RANK = 64  # the latent used in training (`widen_latent`)
STAMP_FILE = "wideep_trained_model.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults make the committed checkpoint."""

    seed: int = 0
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 60
    min_lr_ratio: float = 0.05  # cosine decay to lr x this
    weight_decay: float = 0.01
    mtp_weight: float = 0.3  # lambda of DeepSeek-V3's MTP loss
    eval_items: int = 100  # held-out items per kind for the accuracy in the stamp
    # The kinds of the training items, drawn uniformly from this list: addition, the
    # slowest to learn, comes twice as often as the others.
    mix: tuple[str, ...] = ("add", "add", "copy", "shift", "minmax")


# --------------------------------------------------------------------------- #
# Tokenizer and model
# --------------------------------------------------------------------------- #


def _byte_level(char: str) -> str:
    """GPT-2's byte-to-unicode map for ASCII: printable characters stand for themselves,
    byte b < 33 (space, newline) is chr(256 + b)."""
    b = ord(char)
    assert b < 127, char
    return chr(256 + b) if b < 33 else char


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of `VOCAB`; token ids are positions in `VOCAB`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {_byte_level(c) if len(c) == 1 else c: i for i, c in enumerate(VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    return wrap_tokenizer(tok, 512, clean_up_tokenization_spaces=False)


def encode(text: str) -> list[int]:
    """Token ids of `text` (the same as the tokenizer's, without loading it)."""
    return [VOCAB.index(c) for c in text]


def model_config(
    num_layers: int = NUM_LAYERS, kv_lora_rank: int = KV_LORA_RANK
) -> DeepseekV3Config:
    """The trained model's config with `num_layers` decoder layers (and the MLA latent
    size `kv_lora_rank`: `TRAIN_KV_LORA_RANK` in training, `KV_LORA_RANK` in the file):
    the tiny models' DeepSeek-V3 with this vocabulary, 512 positions, 2 heads and
    `v_head_dim` 32."""
    return deepseek_v3_config(
        num_layers,
        vocab_size=len(VOCAB),
        max_position_embeddings=512,
        num_heads=NUM_HEADS,
        v_head_dim=32,
        kv_lora_rank=kv_lora_rank,
    )


def _mtp_modules(hidden: int, eps: float) -> torch.nn.ModuleDict:
    """The MTP tensors beyond its decoder block, named as vLLM's `deepseek_mtp.py` loads them."""
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    return torch.nn.ModuleDict(
        {
            "enorm": DeepseekV3RMSNorm(hidden, eps),
            "hnorm": DeepseekV3RMSNorm(hidden, eps),
            "eh_proj": torch.nn.Linear(2 * hidden, hidden, bias=False),
            "shared_head_norm": DeepseekV3RMSNorm(hidden, eps),
        }
    )


class TaskModel:
    """`DeepseekV3ForCausalLM` with `NUM_LAYERS` + 1 layers, the last the MTP block,
    and the MTP module's other tensors (`mtp`)."""

    def __init__(self, seed: int):
        import torch
        from transformers import DeepseekV3ForCausalLM

        torch.manual_seed(seed)
        config = model_config(NUM_LAYERS + 1, TRAIN_KV_LORA_RANK)
        config._attn_implementation = "eager"
        self.hf: DeepseekV3ForCausalLM = DeepseekV3ForCausalLM(config)
        # The trunk runs layers[:num_hidden_layers]; the MTP block is layers[NUM_LAYERS].
        self.hf.config.num_hidden_layers = NUM_LAYERS
        self.mtp = _mtp_modules(config.hidden_size, config.rms_norm_eps)
        self.mtp_block = self.hf.model.layers[NUM_LAYERS]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.hf.parameters(), *self.mtp.parameters()]

    def train(self, mode: bool = True) -> None:
        self.hf.train(mode)
        self.mtp.train(mode)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` `[B, T]` -> main logits `[B, T, V]` (position i predicts t_{i+1})
        and MTP logits `[B, T - 1, V]` (position i predicts t_{i+2})."""
        import torch

        hidden = self.hf.model(input_ids=input_ids).last_hidden_state  # [B, T, H], normed
        logits = self.hf.lm_head(hidden)
        seq = input_ids.shape[1] - 1
        embeds = self.hf.model.embed_tokens(input_ids[:, 1:])  # Emb(t_{i+1}) at position i
        embeds[:, 0] = 0.0  # vLLM zeroes the MTP input embedding at position 0
        x = self.mtp["eh_proj"](
            torch.cat([self.mtp["enorm"](embeds), self.mtp["hnorm"](hidden[:, :seq])], dim=-1)
        )
        positions = torch.arange(seq).unsqueeze(0)
        mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
        x = self.mtp_block(
            x,
            attention_mask=mask,
            position_ids=positions,
            position_embeddings=self.hf.model.rotary_emb(x, positions),
        )
        mtp_logits = self.hf.lm_head(self.mtp["shared_head_norm"](x))
        return logits, mtp_logits

    def greedy(self, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
        """Greedy answers of the main model up to end of text, ";" or a newline (the
        stops of the lm-eval tasks), all prompts in one right-padded batch (no cache:
        every step reruns the whole sequence)."""
        import torch

        self.train(False)
        seqs = [encode(p) for p in prompts]
        done = [False] * len(seqs)
        with torch.no_grad():
            for _ in range(max_new_tokens):
                ids, lengths = pad_batch(seqs)
                hidden = self.hf.model(input_ids=ids).last_hidden_state
                last = hidden[torch.arange(len(seqs)), lengths - 1]
                next_tokens = self.hf.lm_head(last).argmax(-1).tolist()
                for i, token in enumerate(next_tokens):
                    if not done[i]:
                        done[i] = token in STOP_TOKEN_IDS
                        if not done[i]:
                            seqs[i].append(token)
                if all(done):
                    break
        return [
            "".join(VOCAB[t] for t in seq[len(prompt) :])
            for seq, prompt in zip(seqs, prompts, strict=True)
        ]


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists with `PAD_TOKEN_ID`: ids `[B, T]` int64, lengths `[B]` int64.

    Attention is causal, so padding after a sequence changes nothing before it."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_TOKEN_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def make_batch(items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `[B, T]` of prompt + answer + more queries + end of text, and `[B, T]`
    bool: True after the prompt (the tokens the loss counts)."""
    import torch

    seqs = [encode(it.prompt + it.answer + it.more) + [EOS_TOKEN_ID] for it in items]
    ids, _ = pad_batch(seqs)
    scored = torch.zeros_like(ids, dtype=torch.bool)
    for i, it in enumerate(items):
        scored[i, len(it.prompt) : len(seqs[i])] = True
    return ids, scored


def batches(rng: random.Random, cfg: TrainConfig) -> Iterator[list[Item]]:
    """Training batches, endless, of every kind mixed (`accumulate_gradients` runs each
    kind's items apart: the sequences of a kind all have the same length, no padding)."""
    while True:
        yield training_items(rng, cfg.batch_size, cfg.mix)


def accumulate_gradients(model: TaskModel, items: list[Item], mtp_weight: float) -> tuple:
    """Backward of one batch, one kind at a time: each kind's sequences are padded only
    to their own longest, and each kind's mean token loss weighs its share of the items,
    so a kind with long answers does not drown the others. Returns the main and MTP
    losses, weighted the same way."""
    main_sum = mtp_sum = 0.0
    for kind in sorted({it.kind for it in items}):
        group = [it for it in items if it.kind == kind]
        share = len(group) / len(items)
        main, mtp = losses(model, *make_batch(group))
        (share * (main + mtp_weight * mtp)).backward()
        main_sum, mtp_sum = main_sum + share * main.item(), mtp_sum + share * mtp.item()
    return main_sum, mtp_sum


def losses(model: TaskModel, ids: torch.Tensor, scored: torch.Tensor) -> tuple[Any, Any]:
    """Main and MTP cross-entropy, each the mean over the scored target tokens."""
    import torch.nn.functional as F

    logits, mtp_logits = model.forward(ids)
    main = F.cross_entropy(logits[:, :-1][scored[:, 1:]], ids[:, 1:][scored[:, 1:]])
    mtp = F.cross_entropy(mtp_logits[:, :-1][scored[:, 2:]], ids[:, 2:][scored[:, 2:]])
    return main, mtp


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def train(
    cfg: TrainConfig, log_every: int = 50, eval_every: int = 0
) -> tuple[TaskModel, dict[str, Any]]:
    """Train from scratch; return the model and a summary (final losses, accuracy)."""
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = TaskModel(cfg.seed)
    params = model.parameters()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        weight_decay=0.0,
    )
    rng = random.Random(f"train {cfg.seed}")
    model.train()
    start = time.monotonic()
    main = mtp = None
    data = batches(rng, cfg)
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        main, mtp = accumulate_gradients(model, next(data), cfg.mtp_weight)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print(
                f"step {step:5d}  loss {main:.4f}  mtp {mtp:.4f}  "
                f"lr {_lr_at(step, cfg):.2e}  {time.monotonic() - start:6.0f} s",
                flush=True,
            )
        if eval_every and step % eval_every == eval_every - 1 and step != cfg.steps - 1:
            print(f"step {step:5d}  held-out {held_out_accuracy(model, 40)}", flush=True)
            model.train()
    summary = {
        "final_loss": None if main is None else round(main, 4),
        "final_mtp_loss": None if mtp is None else round(mtp, 4),
        "held_out_accuracy": held_out_accuracy(model, cfg.eval_items),
    }
    return model, summary


def held_out_accuracy(model: TaskModel, n: int, seed: int = 1) -> dict[str, float]:
    """Greedy exact-match accuracy per kind on `n` held-out items (seed 1: not the lm-eval
    items, which use seed 0)."""
    result = {}
    for kind in KINDS:
        items = held_out_items(kind, n, seed)
        answers = model.greedy([it.prompt for it in items])
        hits = sum(a == it.answer for a, it in zip(answers, items, strict=True))
        result[kind] = round(hits / max(1, n), 4)
    return result


# --------------------------------------------------------------------------- #
# Checkpoint
# --------------------------------------------------------------------------- #


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def mtp_tensors(model: TaskModel) -> dict[str, torch.Tensor]:
    """The MTP tensors outside its decoder block, under vLLM's names (layer `NUM_LAYERS`):
    `model.layers.3.{enorm,hnorm,eh_proj,shared_head.norm,shared_head.head,embed_tokens}`.
    The head and embedding are copies of the main model's, which the MTP module shares."""
    prefix = f"model.layers.{NUM_LAYERS}."
    tensors = {
        "enorm.weight": model.mtp["enorm"].weight,
        "hnorm.weight": model.mtp["hnorm"].weight,
        "eh_proj.weight": model.mtp["eh_proj"].weight,
        "shared_head.norm.weight": model.mtp["shared_head_norm"].weight,
        "shared_head.head.weight": model.hf.lm_head.weight,
        "embed_tokens.weight": model.hf.model.embed_tokens.weight,
    }
    return {prefix + k: v.detach().clone().contiguous() for k, v in tensors.items()}


def save_checkpoint(
    model: TaskModel, out_dir: str | os.PathLike[str], stamp: dict[str, Any], dtype: str
) -> Path:
    """Write the vLLM-loadable checkpoint (weights in `dtype`) and tokenizer to `out_dir`,
    replacing what is there. The folder appears whole (written next to it, then renamed)."""
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_checkpoint(model, tmp, stamp, dtype)
        for path in tmp.iterdir():  # mkdtemp and save_file create owner-only modes
            path.chmod(0o644)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def widen_latent(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The same model with MLA latent size `KV_LORA_RANK` instead of `rank`.

    Training uses a small latent (`TRAIN_KV_LORA_RANK`); vLLM's CPU MLA kernel takes only
    512. The latent grows with zeros: `kv_a_proj_with_mqa` gets zero rows between the
    latent and the rope part, `kv_b_proj` zero columns. RMSNorm then divides by a mean
    square `rank / KV_LORA_RANK` times smaller, so `kv_a_layernorm.weight` is scaled by
    sqrt(rank / KV_LORA_RANK) (and is zero on the new dims). The outputs are unchanged
    up to the norm's epsilon (1e-6 now weighs `KV_LORA_RANK / rank` times more)."""
    import torch

    pad = KV_LORA_RANK - rank
    out = {}
    for name, t in state.items():
        if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):  # [rank + rope, H]
            t = torch.cat([t[:rank], t.new_zeros(pad, t.shape[1]), t[rank:]])
        elif name.endswith("self_attn.kv_a_layernorm.weight"):  # [rank]
            t = torch.cat([t * (rank / KV_LORA_RANK) ** 0.5, t.new_zeros(pad)])
        elif name.endswith("self_attn.kv_b_proj.weight"):  # [heads * (nope + v), rank]
            t = torch.cat([t, t.new_zeros(t.shape[0], pad)], dim=1)
        out[name] = t
    return out


def export_model(model: TaskModel, dtype: str) -> DeepseekV3ForCausalLM:
    """A `DeepseekV3ForCausalLM` with the checkpoint's config (latent `KV_LORA_RANK`,
    `NUM_LAYERS` + 1 layers, the last the MTP block) and the trained weights in `dtype`."""
    import torch
    from transformers import DeepseekV3ForCausalLM, GenerationConfig

    config = model_config(NUM_LAYERS + 1, KV_LORA_RANK)
    config._attn_implementation = "eager"
    hf = DeepseekV3ForCausalLM(config)
    hf.load_state_dict(widen_latent(model.hf.state_dict(), TRAIN_KV_LORA_RANK), strict=True)
    hf.generation_config = GenerationConfig(
        bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID
    )
    return hf.to(getattr(torch, dtype))


def _write_checkpoint(model: TaskModel, out: Path, stamp: dict[str, Any], dtype: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    hf = export_model(model, dtype)
    hf.save_pretrained(out)
    hf.config.num_hidden_layers = NUM_LAYERS  # the MTP layer is not counted
    hf.config.num_nextn_predict_layers = 1
    hf.config.save_pretrained(out)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    tensors.update({k: v.to(getattr(torch, dtype)) for k, v in mtp_tensors(model).items()})
    save_file(tensors, weights, metadata={"format": "pt"})
    build_tokenizer().save_pretrained(out)
    (out / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def train_and_save(
    out_dir: str | os.PathLike[str],
    cfg: TrainConfig,
    dtype: str = "bfloat16",
    log_every: int = 50,
    eval_every: int = 0,
) -> dict[str, Any]:
    """Train with `cfg` and write the checkpoint; return its stamp."""
    model, summary = train(cfg, log_every=log_every, eval_every=eval_every)
    stamp = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "train_config": asdict(cfg),
        "versions": _versions(),
        **summary,
    }
    save_checkpoint(model, out_dir, stamp, dtype)
    return stamp


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m tools.accuracy.train",
        description="Train the tiny DeepSeek-V3 on the synthetic tasks; write a vLLM checkpoint.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument(
        "--eval-every", type=int, default=500, help="log held-out accuracy every N steps (0: off)"
    )
    args = parser.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size)
    start = time.monotonic()
    stamp = train_and_save(args.out_dir, cfg, dtype=args.dtype, eval_every=args.eval_every)
    print(json.dumps({k: stamp[k] for k in ("final_loss", "held_out_accuracy")}))
    print(f"wrote {args.out_dir} in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
