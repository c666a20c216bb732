"""Engine-config hook: check and adjust vLLM's settings when wide EP is on.

Wraps `EngineArgs.create_engine_config`, which every entry point (LLM, serve, headless)
calls in the front-end process before any worker starts, so a bad setting fails here,
before a weight is loaded.
"""

from __future__ import annotations

import dataclasses
import os

from vllm_wideep.config import ADDITIONAL_CONFIG_KEY, WideEPConfig
from vllm_wideep.plugin.hooks import wrap

WORKER_EXTENSION = "vllm_wideep.plugin.worker.WideEPWorkerExtension"
_DEFAULT_ALL2ALL = "allgather_reducescatter"


def _logger():
    from vllm.logger import init_logger

    return init_logger("vllm_wideep")


def adjust_engine_args(engine_args, config: WideEPConfig) -> None:
    """Refuse conflicting options and set the ones wide EP needs (in place, logged)."""
    logger = _logger()
    if engine_args.enable_eplb:
        raise ValueError(
            "vllm_wideep: --enable-eplb (vLLM's own load balancer) cannot run with "
            "--enable-wideep: the two would move the same expert weights. Drop "
            "--enable-eplb; wide EP brings its own balancer."
        )
    if engine_args.enable_dbo:
        raise ValueError(
            "vllm_wideep: --enable-dbo (dual-batch overlap) is not supported with "
            "--enable-wideep yet: it needs vLLM's DeepEP all2all backends, which "
            "wide EP replaces. Drop --enable-dbo."
        )
    if engine_args.pipeline_parallel_size > 1:
        raise ValueError(
            "vllm_wideep: --pipeline-parallel-size > 1 is not supported with --enable-wideep."
        )
    if engine_args.prefill_context_parallel_size > 1:
        raise ValueError(
            "vllm_wideep: --prefill-context-parallel-size > 1 is not supported with "
            "--enable-wideep."
        )
    if engine_args.all2all_backend != _DEFAULT_ALL2ALL:
        logger.warning(
            "vllm_wideep: --all2all-backend %s is replaced by wide EP's own token "
            "exchange (%s); using vLLM's default %s for everything else.",
            engine_args.all2all_backend,
            config.token_exchange,
            _DEFAULT_ALL2ALL,
        )
        engine_args.all2all_backend = _DEFAULT_ALL2ALL
    if engine_args.worker_extension_cls not in ("", WORKER_EXTENSION):
        raise ValueError(
            f"vllm_wideep: --worker-extension-cls {engine_args.worker_extension_cls} cannot "
            f"run with --enable-wideep, which brings its own worker extension "
            f"({WORKER_EXTENSION}: the wideep_stats and wideep_load RPCs)."
        )
    engine_args.worker_extension_cls = WORKER_EXTENSION
    _apply_cuda_graph_policy(engine_args, config)
    if not engine_args.enable_expert_parallel:
        logger.info(
            "vllm_wideep: enabling expert parallelism (EP size = DP x TP = %d).",
            engine_args.data_parallel_size * engine_args.tensor_parallel_size,
        )
        engine_args.enable_expert_parallel = True


def cuda_graph_policy(config: WideEPConfig) -> tuple[bool, str]:
    """(keep vLLM's CUDA-graph mode, why) for the chosen token exchange. Pure.

    `capacity` moves fixed-size buffers and never reads a count on the host inside a
    captured batch (its buffers are sized to the largest graph batch), so the MoE layers
    can be captured. `alltoall` and `allgather` learn their split sizes on the host, a sync
    per layer that a CUDA graph cannot capture."""
    if config.token_exchange == "capacity":
        return True, "the capacity exchange has fixed sizes and no host sync"
    return False, f"the {config.token_exchange} exchange syncs with the host"


def _apply_cuda_graph_policy(engine_args, config: WideEPConfig) -> None:
    """Turn CUDA graphs off on GPUs when `cuda_graph_policy` says so, with a log line."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CUDAGraphMode
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike() or engine_args.enforce_eager:
        return
    keep, why = cuda_graph_policy(config)
    if keep:
        _logger().info("vllm_wideep: CUDA graphs stay on (%s).", why)
        return
    compilation = engine_args.compilation_config
    if isinstance(compilation, dict):
        compilation = CompilationConfig(**compilation)
    if compilation.cudagraph_mode not in (None, CUDAGraphMode.NONE):
        _logger().warning(
            "vllm_wideep: cudagraph_mode %s replaced by NONE: %s; "
            "--wideep-token-exchange capacity keeps CUDA graphs.",
            compilation.cudagraph_mode,
            why,
        )
    else:
        _logger().info(
            "vllm_wideep: CUDA graphs off (%s); --wideep-token-exchange capacity keeps them.",
            why,
        )
    compilation.cudagraph_mode = CUDAGraphMode.NONE
    engine_args.compilation_config = compilation


def check_model(model_config, data_parallel_size: int, tensor_parallel_size: int) -> None:
    """Refuse models wide EP cannot serve, naming the model and the numbers.

    Runs before vLLM builds its config: with expert parallelism forced on, vLLM's own
    check would refuse a dense model first, with a message that does not say why."""
    num_experts = model_config.get_num_experts()
    if num_experts <= 0:
        raise ValueError(
            f"vllm_wideep: --enable-wideep needs a mixture-of-experts model, but "
            f"{model_config.model!r} ({', '.join(model_config.architectures or [])}) "
            f"has no routed experts. Drop --enable-wideep for dense models."
        )
    ep_size = data_parallel_size * tensor_parallel_size
    if num_experts % ep_size != 0:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"vllm_wideep: the EP size (data parallel {data_parallel_size} x tensor "
            f"parallel {tensor_parallel_size} = {ep_size}) must divide the number of "
            f"routed experts ({num_experts}) of {model_config.model!r}; EP sizes that "
            f"do: {divisors}"
        )


SUPPORTED_CHECKPOINTS = (
    "unquantized (bfloat16, float16, float32)",
    "fp8 with 128x128 block scales (DeepSeek's format: quant_method fp8, weight_block_size "
    "[128, 128])",
    "compressed-tensors FP8 with 128x128 weight blocks and dynamic activations "
    "(llm-compressor's FP8 block format)",
)


def choose_quantization(model_config) -> str | None:
    """The quantization method the engine must use for this checkpoint under wide EP:
    None (unquantized), `wideep_fp8` or `wideep_ct_fp8`; any other format is refused,
    naming it."""
    from vllm_wideep.layer.fp8 import (
        CT_QUANTIZATION_NAME,
        QUANTIZATION_NAME,
        compressed_tensors_fp8_block_problem,
    )

    method = model_config.quantization
    if method in (None, QUANTIZATION_NAME, CT_QUANTIZATION_NAME):
        return method
    quant_cfg = getattr(model_config.hf_config, "quantization_config", None) or {}
    if not isinstance(quant_cfg, dict):
        quant_cfg = quant_cfg.to_dict()
    block = quant_cfg.get("weight_block_size")
    if method == "fp8" and list(block or []) == [128, 128]:
        return QUANTIZATION_NAME
    problem = None
    if method == "compressed-tensors":
        problem = compressed_tensors_fp8_block_problem(quant_cfg)
        if problem is None:
            return CT_QUANTIZATION_NAME
    what = {
        "fp8": f"fp8 with weight_block_size {block}",
        "compressed-tensors": f"compressed-tensors ({problem})",
        "mxfp4": "MXFP4 (mxfp4)",
        "gpt_oss_mxfp4": "MXFP4 (gpt_oss_mxfp4, gpt-oss's format)",
    }.get(method, method)
    raise ValueError(
        f"vllm_wideep: --enable-wideep cannot serve {model_config.model!r}: its "
        f"checkpoint is quantized as {what}. Supported checkpoints: "
        + "; ".join(SUPPORTED_CHECKPOINTS)
        + ". Drop --enable-wideep for this model."
    )


# The most device memory the load statistics may take per rank (the window's ring).
MAX_STATS_BYTES = 1 << 30


def check_option_memory(config: WideEPConfig, model_config) -> None:
    """Refuse option values whose memory is out of proportion, saying how much they imply.

    eplb_window: the 'window' statistics keep a ring of `window x layers x experts` int64
    on every rank. redundant_experts: each redundant slot holds a copy of an expert; more
    than one copy of every expert (E redundant slots) is refused."""
    num_experts = model_config.get_num_experts()
    layers = model_config.get_total_num_hidden_layers()
    if config.eplb_stats == "window":
        ring = config.eplb_window * layers * num_experts * 8
        if ring > MAX_STATS_BYTES:
            raise ValueError(
                f"vllm_wideep: --wideep-eplb-window {config.eplb_window} would keep "
                f"{ring / 2**30:.1f} GiB of load statistics per rank ({config.eplb_window} "
                f"steps x {layers} layers x {num_experts} experts x 8 bytes; at most "
                f"{MAX_STATS_BYTES / 2**30:.0f} GiB): use a smaller window, or "
                f"--wideep-eplb-stats decay, which keeps one step's worth"
            )
    if config.redundant_experts > num_experts:
        raise ValueError(
            f"vllm_wideep: --wideep-redundant-experts {config.redundant_experts} is more than "
            f"one extra copy of each of the model's {num_experts} routed experts (each slot "
            f"holds a whole expert's weights); use at most {num_experts}"
        )


def resolve_balancing(config: WideEPConfig, model_config, ep_size: int) -> WideEPConfig:
    """Check the load-balancing options against the model and EP size; a placement file
    fixes the slot count (`redundant_experts` follows from it when not given)."""
    num_experts = model_config.get_num_experts()
    redundant = config.redundant_experts
    check_option_memory(config, model_config)
    if config.placement is not None:
        from vllm_wideep.eplb.files import ModelIdentity, read_placement

        if not config.placement.strip():
            raise ValueError("vllm_wideep: --wideep-placement is empty: give a placement file")
        path = os.path.abspath(config.placement)
        record = read_placement(path)
        record.model.check_matches(ModelIdentity.from_model_config(model_config), path)
        if record.placement.num_ranks != ep_size:
            raise ValueError(
                f"vllm_wideep: placement file {path} is for {record.placement.num_ranks} EP "
                f"ranks, but this deployment has EP size {ep_size}"
            )
        file_redundant = record.placement.num_slots - num_experts
        if redundant not in (0, file_redundant):
            raise ValueError(
                f"vllm_wideep: --wideep-redundant-experts {redundant} disagrees with the "
                f"placement file {path}, which has {file_redundant} redundant slots per layer"
            )
        config = dataclasses.replace(config, placement=path, redundant_experts=file_redundant)
    elif redundant % ep_size != 0:
        raise ValueError(
            f"vllm_wideep: --wideep-redundant-experts {redundant} must be a multiple of the "
            f"EP size {ep_size} (every rank gets the same number of extra slots)"
        )
    _check_loader_takes_slots(config, model_config)
    return config


# Models whose vLLM loader slices the checkpoint's experts into E/EP local experts itself,
# so a layer with extra slots cannot be filled by it.
LOADERS_WITHOUT_EXTRA_SLOTS = ("GptOssForCausalLM",)


def _check_loader_takes_slots(config: WideEPConfig, model_config) -> None:
    architectures = set(model_config.architectures or [])
    refused = architectures.intersection(LOADERS_WITHOUT_EXTRA_SLOTS)
    if config.redundant_experts > 0 and refused:
        raise ValueError(
            f"vllm_wideep: redundant expert slots ({config.redundant_experts}, from "
            f"--wideep-redundant-experts or the placement file) are not supported for "
            f"{', '.join(sorted(refused))}: vLLM's loader for it fills only E/EP experts "
            f"per rank; online rebalancing without redundant slots works"
        )


def patch_engine_config() -> None:
    """Wrap `EngineArgs.create_engine_config`: every entry point calls it in the front end."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_wideep.eplb.files import ModelIdentity
    from vllm_wideep.plugin.metrics import install_collector
    from vllm_wideep.plugin.ray_cpu import prepare_ray_workers, refuse_ray_on_cpu

    def wrap_create_engine_config(original):
        def create_engine_config(self, *args, **kwargs):
            config = WideEPConfig.from_additional_config(self.additional_config)
            if not config.enabled:
                refuse_ray_on_cpu(self)  # stock vLLM's answer; wide EP lifts it
                return original(self, *args, **kwargs)
            adjust_engine_args(self, config)
            model_config = self.create_model_config()
            check_model(model_config, self.data_parallel_size, self.tensor_parallel_size)
            self.quantization = choose_quantization(model_config)
            config = resolve_balancing(
                config, model_config, self.data_parallel_size * self.tensor_parallel_size
            )
            # Store the validated, complete option set: workers read it back from here.
            self.additional_config = {
                **(self.additional_config or {}),
                ADDITIONAL_CONFIG_KEY: config.to_dict(),
            }
            install_collector(dataclasses.asdict(ModelIdentity.from_model_config(model_config)))
            vllm_config = original(self, *args, **kwargs)
            prepare_ray_workers(vllm_config)
            _logger().info("vllm_wideep: wide EP enabled with %s", config)
            return vllm_config

        return create_engine_config

    wrap(EngineArgs, "create_engine_config", wrap_create_engine_config)
