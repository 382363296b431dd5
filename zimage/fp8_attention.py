"""FP8 attention, for fp8_e4m3fn_fast: q, k and v as e4m3 codes with one scale each, the softmax in float32, on
cuDNN's FP8 flash-attention kernel through NVIDIA's cuDNN frontend, on Hopper and newer.

The kernel comes from a maintained package rather than from here: `pip install nvidia-cudnn-frontend` (the
optional dependency; PyTorch already ships the cuDNN library it drives). Chosen because cuDNN's bf16 kernel is the
fastest bf16 attention measured on an H100 for this model's shape, and PyPI's Triton SageAttention ran slower
than it there; how much faster cuDNN's FP8 kernel is here is not yet measured (bench/bench_attention.py).

q, k and v are made by fused.qk_norm_e4m3 in the pass that normalizes and rotates q and k, so no separate
quantization pass runs. The probabilities are quantized by the kernel itself (scale 256: they lie in [0, 1]); the
output comes back in bf16 as the next projection takes it.

Where it cannot run (the package missing, an older GPU or cuDNN, a shape the kernel refuses, a batch of captions
of different lengths, which needs a mask), the exact attention it wraps runs instead, after one log line that says
why. On the CPU the same codes are attended in float32 (tests see the rounding of q, k and v that the GPU sees).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .attention import Attention, AttentionKernel
from .fp8 import E4M3, E4M3_TOP
from .fused import qk_norm_e4m3

P_SCALE = 256.0  # the probabilities' e4m3 scale: P <= 1 lands on 256, below the top code, a power of two


class Fp8Attention(AttentionKernel):
    """attention(q, k, v, key_mask) computed in FP8, or by `exact` where FP8 cannot run (see the module)."""

    def __init__(self, exact: Attention):
        self.exact = exact
        self.graphs: dict[tuple, _CudnnGraph | None] = {}  # per shape and device; None: cuDNN refused it
        self.refusal: dict[torch.device, str | None] = {}  # per device: why FP8 attention cannot run there

    @property
    def backend(self) -> str:
        return f"fp8 ({self.exact.backend} where FP8 cannot run)"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
        """q, k, v [B, H, S, D] in the compute dtype -> [B, H, S, D]: each quantized with its largest magnitude."""
        if not self._runs(q, key_mask):
            return self.exact(q, k, v, key_mask)
        tensors = torch.stack((q, k, v)).transpose(2, 3)  # [3, B, S, H, D], the layout the kernel reads
        amax = torch.linalg.vector_norm(tensors.flatten(1), float("inf"), dim=1).float().clamp(min=1e-12)
        factors = E4M3_TOP / amax
        codes = (tensors * factors[:, None, None, None, None].to(q.dtype)).to(E4M3)
        return self._attend(codes, 1 / factors.to(q.dtype).float(), q.dtype).transpose(1, 2)

    def from_projection(self, qkv, n_heads, q_norm, k_norm, rope, key_mask):
        if not self._runs(qkv, key_mask):
            return self.exact.from_projection(qkv, n_heads, q_norm, k_norm, rope, key_mask)
        codes, scales = qk_norm_e4m3(qkv, n_heads, q_norm, k_norm, *rope)
        return self._attend(codes, scales, qkv.dtype).flatten(2)

    def _runs(self, x: torch.Tensor, key_mask) -> bool:
        if key_mask is not None:  # batches of captions of different lengths: the exact kernel takes the mask
            return False
        if x.device.type != "cuda":
            return True  # attended in float32 from the codes (_attend)
        if x.device not in self.refusal:
            self.refusal[x.device] = fp8_attention_blocker(x.device)
            if self.refusal[x.device]:
                logging.warning(f"Z-Image: FP8 attention cannot run here ({self.refusal[x.device]}); attention runs "
                                f"in {x.dtype} with the {self.exact.backend} kernels, the matrix multiplies stay FP8.")
        return self.refusal[x.device] is None

    def _attend(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """codes [3, B, S, H, D] e4m3 (q, k, v) with scales [3] -> attention output [B, S, H, D] in dtype."""
        if codes.device.type != "cuda":
            q, k, v = (codes.float() * scales[:, None, None, None, None]).transpose(2, 3)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).to(dtype)
        batch, seq_len, heads, head_dim = codes.shape[1:]
        key = (batch, seq_len, heads, head_dim, dtype, codes.device)
        if key not in self.graphs:  # the first call at a shape: eager, never inside a CUDA graph capture
            try:
                graph = _CudnnGraph(batch, seq_len, heads, head_dim, dtype, codes.device)
                out = graph(codes, scales)  # cuDNN's refusals can come as late as the first run
            except Exception as e:  # and as several exception types
                logging.warning(f"Z-Image: cuDNN has no FP8 attention for {heads} heads of {seq_len} tokens "
                                f"({type(e).__name__}: {str(e)[:200]}); this shape attends in {dtype}.")
                self.graphs[key] = None
            else:
                self.graphs[key] = graph
                return out
        graph = self.graphs[key]
        if graph is None:
            q, k, v = (codes.to(dtype) * scales[:, None, None, None, None].to(dtype)).transpose(2, 3)
            return self.exact(q, k, v, None).transpose(1, 2)
        return graph(codes, scales)

    def __repr__(self):
        return f"Fp8Attention({self.exact!r})"


def fp8_attention_blocker(device: torch.device) -> str | None:
    """Why cuDNN's FP8 attention cannot run on this CUDA device, or None."""
    if torch.cuda.get_device_capability(device) < (9, 0):
        return f"{torch.cuda.get_device_name(device)} is older than Hopper, which cuDNN's FP8 attention needs"
    try:
        import cudnn  # noqa: F401  (NVIDIA's cuDNN frontend: pip install nvidia-cudnn-frontend)
    except Exception as e:  # not installed, or its library does not load
        return (f"the cuDNN frontend does not import ({type(e).__name__}: {str(e)[:120]}); "
                f"`pip install nvidia-cudnn-frontend` adds it")
    return None


def use_fp8_attention(model) -> None:
    """Run an S3DiT's attention in FP8 (Fp8Attention over its own attention), in every block that attends."""
    from .blocks import SelfAttention

    if isinstance(model.attention, Fp8Attention):
        return
    model.attention = Fp8Attention(model.attention)
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.attend = model.attention


_HANDLES: dict[torch.device, object] = {}


class _CudnnGraph:
    """One shape's cuDNN FP8 attention: the built graph, its constant scales and its unused amax outputs."""

    def __init__(self, batch: int, seq_len: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        import cudnn

        with torch.cuda.device(device):
            if device not in _HANDLES:
                _HANDLES[device] = cudnn.create_handle()
            self.handle = _HANDLES[device]
            self.shape = (batch, seq_len, heads, head_dim)
            self.dtype = dtype
            # cuDNN refused its inference kernel (no softmax statistics) in some processes with "only supported
            # on cuDNN 9.13.0 and newer", on a machine whose PyTorch reports cuDNN 9.19 (cause not found): there
            # the kernel that also writes the statistics runs, into a buffer nobody reads
            try:
                self._build(batch, seq_len, heads, head_dim, dtype, device, with_stats=False)
            except Exception as e:  # cuDNN's refusals come as several exception types
                logging.info(f"Z-Image: cuDNN's FP8 inference attention refused ({type(e).__name__}: "
                             f"{str(e)[:160]}); using its FP8 attention that also writes softmax statistics.")
                self._build(batch, seq_len, heads, head_dim, dtype, device, with_stats=True)

    def _build(self, batch, seq_len, heads, head_dim, dtype, device, with_stats: bool) -> None:
        import cudnn

        self.cudnn = cudnn
        graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        # [B, H, S, D] as the kernel sees them, laid out [B, S, H, D] as qk_norm_e4m3 writes them
        dims, strides = [batch, heads, seq_len, head_dim], [seq_len * heads * head_dim, head_dim, heads * head_dim, 1]
        q, k, v = (graph.tensor(name=n, dim=dims, stride=strides, data_type=cudnn.data_type.FP8_E4M3) for n in "qkv")
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)
        self.descale = [graph.tensor(name=f"descale_{n}", **scalar) for n in "qkv"]
        s_scale, s_descale, o_scale = (graph.tensor(name=n, **scalar) for n in ("scale_s", "descale_s", "scale_o"))
        inputs = dict(q=q, k=k, v=v, descale_q=self.descale[0], descale_k=self.descale[1], descale_v=self.descale[2],
                      descale_s=s_descale, scale_s=s_scale, scale_o=o_scale, attn_scale=1 / math.sqrt(head_dim),
                      use_causal_mask=False)
        try:  # the frontend's newer releases name the inference flag by what it leaves out
            o, stats, s_amax, o_amax = graph.sdpa_fp8(**inputs, generate_stats=with_stats)
        except TypeError:
            o, stats, s_amax, o_amax = graph.sdpa_fp8(**inputs, is_inference=not with_stats)
        o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(
            cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF)
        for amax in (s_amax, o_amax):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        f32 = dict(dtype=torch.float32, device=device)
        # constants the graph reads at every call (and a CUDA graph replays with): kept here
        self.constants = {s_scale: torch.full((1,), P_SCALE, **f32), s_descale: torch.full((1,), 1 / P_SCALE, **f32),
                          o_scale: torch.ones(1, **f32), s_amax: torch.empty(1, **f32), o_amax: torch.empty(1, **f32)}
        if with_stats:
            stats.set_output(True).set_dim([batch, heads, seq_len, 1]).set_stride(
                [heads * seq_len, seq_len, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
            self.constants[stats] = torch.empty(batch, heads, seq_len, 1, **f32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.tensors = dict(q=q, k=k, v=v, o=o)
        with torch.cuda.device(device):
            self.workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)

    def __call__(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        out = torch.empty(self.shape, dtype=self.dtype, device=codes.device)
        pack = {t["q"]: codes[0], t["k"]: codes[1], t["v"]: codes[2], t["o"]: out,
                self.descale[0]: scales[0:1], self.descale[1]: scales[1:2], self.descale[2]: scales[2:3],
                **self.constants}
        # the kernel launches on the handle's stream: the caller's (a CUDA graph capture's side stream included)
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(codes.device).cuda_stream)
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return out
