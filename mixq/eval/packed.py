"""Packed weights in a transformers model: held as the MLX folder stores them, dequantized just in time.

A quantized tensor stays what `mixq convert` writes (`Packed`: uint32 words, scales, biases, its spec);
the model's parameter that it becomes is a zero-stride placeholder of the right shape and dtype (4 bytes),
and the module that owns it gets two forward hooks (torch's `register_forward_pre_hook` /
`register_forward_hook`, the mechanism accelerate's offloading uses): before the module runs, its
parameter is set to the dequantized tensor (`mixq.quant.quantize.dequantize`, bit-exact with
`mx.dequantize`), laid out and cast exactly as the dense engine loads it; after it ran, the placeholder
is put back. The module's own forward runs unchanged, so logits are bit-identical to a model built from
the dequantized weights, and memory for weights is the quantized size plus the largest single module's
dense weight at a time.

* An embedding (`nn.Embedding` and subclasses such as Gemma's scaled embedding) dequantizes only the
  rows of the tokens it looks up (the ids are remapped onto those rows; dequantization is row-wise, so
  the rows are the same numbers as the whole table's).
* A tied output head is the embedding's `Packed` tensor; `output_head` (eval/head.py) asks `JitParam.rows`
  for vocabulary slices, never the whole head at once, and so does the packed `lm_head`'s own forward
  (`head.slice_packed_head` replaces it; its hooks are then `own_forward` and leave the placeholder alone).
* MoE expert stacks (qwen3_moe's `gate_up_proj` = [gate; up], gpt-oss's interleaved, transposed
  `gate_up_proj` and transposed `down_proj`) are built from their MLX parts with the same layout
  functions as the dense engine (`mixq.quant.arch`), so the experts' own forward sees identical tensors
  with identical strides. Under transformers' eager experts implementation (the engine's, `load_model`)
  the stack is a `LazyExperts`: each routed expert is dequantized when the forward indexes it, one at a
  time, and no stack of all experts is made; under grouped_mm / batched_mm (which take the whole stack)
  a stack is allocated and only its routed experts are written (`JitParam.routed`).

`keep_dense(model, budget)` replaces the largest packed parameters by dense copies made once (memory for
speed: a token-by-token decode would otherwise dequantize every weight per token). `fuse_int4(model)` (generation
only) makes every packed linear layer left whose spec torch's CPU int4 kernel takes (`FusedInt4`) multiply by its
4-bit weight directly: no dense weight made per forward. `weight_paths(model)` says which path each spec takes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from mixq.io.safetensors import drop_pages
from mixq.quant import arch
from mixq.quant.quantize import dequantize, unpack_codes

_QWEN3_MOE = re.compile(r"^(model\.layers\.\d+\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_GPT_OSS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight$")
ATTR = "mixq_packed"   # the model attribute holding its `PackedWeights`


@dataclass
class Packed:
    """One quantized tensor as the MLX folder stores it; `shape` is the logical (unpacked) shape."""
    wq: torch.Tensor                    # uint32 [..., in * bits / 32]
    scales: torch.Tensor                # [..., in / group_size]
    biases: torch.Tensor | None         # [..., in / group_size] (affine)
    bits: int
    group_size: int
    name: str = ""
    extra: dict = field(default_factory=dict)   # further keywords of `dequantize` (e.g. mode)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.wq.shape[:-1], self.wq.shape[-1] * 32 // self.bits)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype `dense()` returns (affine: the scales')."""
        return self.extra.get("dtype") or (self.scales.dtype if self.scales.is_floating_point() else torch.bfloat16)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.wq, self.scales, self.biases) if t is not None)

    def dense(self, index=None) -> torch.Tensor:
        """Dequantized (as `mx.dequantize`), whole or the rows `index` (a slice or index tensor) of dim 0."""
        wq, s, b = self.wq, self.scales, self.biases
        if index is not None:
            wq, s, b = wq[index], s[index], (None if b is None else b[index])
        return dequantize(wq, s, b, bits=self.bits, group_size=self.group_size, name=self.name, **self.extra)

    def drop_pages(self, index: slice | None = None) -> None:
        """Give back the resident pages of its memory-mapped tensors (all, or the rows `index` of dim 0)."""
        ts = (self.wq, self.scales, self.biases)
        drop_pages(*(ts if index is None else (None if t is None else t[index] for t in ts)))

    def to(self, device) -> "Packed":
        return Packed(self.wq.to(device), self.scales.to(device), None if self.biases is None else
                      self.biases.to(device), self.bits, self.group_size, self.name, self.extra)


def _where(part) -> torch.device:
    return part.wq.device if isinstance(part, Packed) else part.device


def _dense(part, index=None) -> torch.Tensor:
    if isinstance(part, Packed):
        return part.dense(index)
    return part if index is None else part[index]


def _drop_pages(part, index: slice | None = None) -> None:
    if isinstance(part, Packed):
        part.drop_pages(index)
    else:
        drop_pages(part if index is None else part[index])


# ---------------------------------------------------------------- MLX tensors -> model parameters

@dataclass
class Target:
    """A model parameter (HF module name) made of MLX tensors: `build(tensors)` gives it (stored dtype)."""
    names: list[str]                     # the MLX tensors, in the order `build` takes them
    build: Callable | None               # None: the one tensor as it is
    experts: bool = False                # an MoE expert stack (dim 0: the expert)


def targets(config: dict, names) -> dict[str, Target]:
    """Model parameter -> its MLX tensors, for every weight whose layout differs between MLX and the
    transformers module (MoE experts); every other MLX tensor is the parameter of the same name."""
    mt = arch.model_type(config)
    out: dict[str, Target] = {}
    for name in names:
        m = _QWEN3_MOE.match(name) if mt == "qwen3_moe" else _GPT_OSS.match(name) if mt == "gpt_oss" else None
        if m is None:
            out[name] = Target([name], None)
            continue
        prefix, proj = m.groups()
        experts = f"{prefix}.experts" if mt == "qwen3_moe" else prefix
        stem = name.rsplit(".", 2)[0]
        if proj == "down_proj":
            key, parts = f"{experts}.down_proj", [name]
        else:
            key, parts = f"{experts}.gate_up_proj", [f"{stem}.gate_proj.weight", f"{stem}.up_proj.weight"]
        out[key] = Target(parts, _qwen3_moe_build(proj) if mt == "qwen3_moe" else _arch_build(parts, key, config),
                          experts=True)
    return out


def _qwen3_moe_build(proj: str):
    """qwen3_moe experts: transformers merges the per-expert checkpoint tensors into gate_up_proj =
    [gate; up] (dim 1) and down_proj: MLX's stacks are those tensors already."""
    if proj == "down_proj":
        return None
    return lambda ts: torch.cat(ts, dim=1)


def _arch_build(parts: list[str], key: str, config: dict):
    """The parameter as the dense engine makes it: `arch.hf_state_dict` of its MLX tensors (same layout, strides)."""
    def build(ts):
        return arch.hf_state_dict(list(zip(parts, ts)), config)[key]
    return build


def placeholder(shape, dtype, device="cpu") -> torch.Tensor:
    """A zero-stride tensor of `shape`: what a packed parameter holds between forwards (one element of memory)."""
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


def target_shape(target: Target, parts: dict) -> tuple[int, ...]:
    """The parameter's shape, from its parts' shapes (built on the meta device: no memory)."""
    metas = [torch.empty(parts[n].shape, dtype=parts[n].dtype, device="meta") for n in target.names]
    return tuple((target.build or (lambda ts: ts[0]))(metas).shape)


# ---------------------------------------------------------------- just-in-time parameters

@dataclass
class JitParam:
    """A model parameter made just in time from its parts (Packed or dense tensors, stored dtype)."""
    key: str                             # model parameter name (first owner)
    parts: list                          # Packed | torch.Tensor
    build: Callable | None
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None     # the compute dtype the model gave this parameter (set by `install`)
    holder: torch.Tensor | None = None   # the placeholder Parameter the owning modules hold (set by `install`)
    device: torch.device | None = None   # where the model computes; the parts stay where they are (CPU)
    experts: bool = False                # an MoE expert stack: dim 0 is the expert, each made alone (`routed`)

    def dense(self) -> torch.Tensor:
        """The parameter as the dense engine holds it (dequantized, laid out, cast, on the model's device)."""
        ts = [_dense(p) for p in self.parts]
        return (self.build(ts) if self.build else ts[0]).to(device=self.device, dtype=self.dtype)

    def routed(self, index: torch.Tensor) -> torch.Tensor:
        """An expert stack with only the experts `index` (sorted, unique) dequantized: a tensor of the dense
        parameter's shape and strides whose other experts are left unset (allocated, never written, never read:
        every experts implementation computes an expert only for the tokens routed to it). One expert at a time:
        no whole stack is ever held in the stored dtype beside the result. The experts made are the dense engine's,
        bit for bit: dequantization is row-wise and the layout functions work per expert."""
        meta = self._built([torch.empty(p.shape, dtype=p.dtype, device="meta") for p in self.parts])
        full = torch.empty_strided(meta.shape, meta.stride(), dtype=self.dtype, device=self.device)
        for e in index.tolist():  # one expert at a time: no second copy of the experts made
            full[e] = self._built([_dense(p, slice(e, e + 1)) for p in self.parts])[0].to(self.device)
        return full

    def expert(self, e: int) -> torch.Tensor:
        """Expert `e` of a stack alone, as the dense stack's `[e]` (same values, shape and strides)."""
        meta = self._built([torch.empty(p.shape, dtype=p.dtype, device="meta") for p in self.parts])
        out = torch.empty_strided(meta.shape[1:], meta.stride()[1:], dtype=self.dtype, device=self.device)
        return out.copy_(self._built([_dense(p, slice(e, e + 1)) for p in self.parts])[0])

    def _built(self, ts: list[torch.Tensor]) -> torch.Tensor:
        return (self.build(ts) if self.build else ts[0]).to(dtype=self.dtype)

    def rows(self, index) -> torch.Tensor:
        """Rows `index` (a slice or index tensor) of dim 0 only (a single-part parameter: embedding, head)."""
        if self.build is not None or len(self.parts) != 1:
            return self.dense()[index]
        part = self.parts[0]
        if isinstance(index, torch.Tensor):
            index = index.to(_where(part))
        out = _dense(part, index).to(device=self.device, dtype=self.dtype)
        _drop_pages(part, index if isinstance(index, slice) else None)
        return out

    def drop_pages(self) -> None:
        """Give back the resident pages of its parts read from a memory-mapped file (after each use: what a
        forward reads stays bounded by a module, whatever the model's size; the next use reads them again)."""
        for p in self.parts:
            _drop_pages(p)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes if isinstance(p, Packed) else p.numel() * p.element_size() for p in self.parts)

    @property
    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def to(self, device) -> None:
        self.parts = [p.to(device) for p in self.parts]


class LazyExperts:
    """Stands in for a packed expert stack while an experts module runs transformers' eager implementation, which
    reads the stack only as `stack[expert_idx]`, one routed expert at a time: indexing dequantizes that expert alone
    (`JitParam.expert`), so no stack of all experts is ever made (gpt-oss-20b: ~3.2 GB per layer in float32); at
    most one expert per stack is alive at a time, freed when the expression that used it ends."""

    def __init__(self, jp: JitParam):
        self.jp = jp
        self.shape, self.dtype, self.device = torch.Size(jp.shape), jp.dtype, jp.device

    def __getitem__(self, index) -> torch.Tensor:
        return self.jp.expert(int(index))

    def __len__(self) -> int:
        return self.shape[0]


def eager_experts(module) -> bool:
    """Whether an experts module computes with transformers' eager implementation (the one `LazyExperts` serves)."""
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", "eager") in (None, "eager")


class _Hooks:
    """The forward hooks of one module holding packed parameters {attribute: JitParam}."""

    def __init__(self, module: torch.nn.Module, params: dict[str, JitParam]):
        self.module = module
        self.params = params
        self.rows = isinstance(module, torch.nn.Embedding) and list(params) == ["weight"]
        self.experts = all(jp.experts for jp in params.values())
        self.padding_idx = getattr(module, "padding_idx", None)
        self.own_forward = False   # the module's forward reads its packed parameters itself (a sliced head)
        self.handles = [module.register_forward_pre_hook(self.pre, with_kwargs=True),
                        module.register_forward_hook(self.post, always_call=True)]

    def pre(self, module, args, kwargs):
        if self.own_forward:
            return None
        if self.rows:
            return self._pre_rows(module, args, kwargs)
        if self.experts and eager_experts(module):
            for attr, jp in self.params.items():
                module._parameters[attr] = LazyExperts(jp)
            return None
        routed = self._routed(args, kwargs) if self.experts else None
        for attr, jp in self.params.items():
            module._parameters[attr] = jp.dense() if routed is None else jp.routed(routed)
        return None

    def _routed(self, args, kwargs) -> torch.Tensor | None:
        """The experts an MoE experts module's call routes tokens to (its second argument: the top-k expert
        ids of every token; qwen3_moe's top_k_index, gpt-oss's router_indices), sorted; ids beyond the stack
        (expert-parallel sentinels) left out. None: not found (the whole stack is made)."""
        ids = args[1] if len(args) > 1 else next((kwargs[k] for k in ("top_k_index", "router_indices")
                                                  if kwargs.get(k) is not None), None)
        if not isinstance(ids, torch.Tensor):
            return None
        n = next(iter(self.params.values())).shape[0]
        uniq = torch.unique(ids)
        return uniq[(uniq >= 0) & (uniq < n)]

    def _pre_rows(self, module, args, kwargs):
        """Embedding lookup: dequantize only the rows of the ids looked up, and look up their positions there."""
        jp = self.params["weight"]
        key = None if args else next(k for k in ("input", "input_ids") if k in kwargs)
        ids = args[0] if args else kwargs[key]
        uniq, inverse = torch.unique(ids, return_inverse=True)
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= jp.shape[0]):
            raise IndexError(f"index out of range in self (ids {int(uniq[0])}..{int(uniq[-1])}, "
                             f"{jp.shape[0]} embeddings)")
        module._parameters["weight"] = jp.rows(uniq)
        module.padding_idx = None   # only gradients use it; F.embedding checks it against the rows held
        if args:
            return (inverse, *args[1:]), kwargs
        return args, {**kwargs, key: inverse}

    def post(self, module, args, output):
        for attr, jp in self.params.items():
            module._parameters[attr] = jp.holder
            jp.drop_pages()
        if self.rows:
            module.padding_idx = self.padding_idx
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class PackedWeights:
    """What a packed model holds beside its dense parameters (`model.mixq_packed`)."""
    params: dict[str, JitParam]                       # parameter name -> JitParam (the packed ones)
    hooks: list[_Hooks] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)          # parameter made dense (`keep_dense`) -> its spec
    fused: dict[str, "FusedInt4"] = field(default_factory=dict)  # module name -> its fused weight (`fuse_int4`)

    @property
    def nbytes(self) -> int:
        return sum(jp.nbytes for jp in self.params.values()) + sum(f.nbytes for f in self.fused.values())


def install(model, params: dict[str, JitParam]) -> PackedWeights:
    """Hook every module that holds one of `params`' placeholders (a tied head holds the embedding's). Each
    parameter keeps the dtype and device the model gave its placeholder."""
    owners: dict[str, list[tuple[torch.nn.Module, str]]] = {key: [] for key in params}
    by_id = {}
    for key in params:
        path, _, attr = key.rpartition(".")
        by_id[id(model.get_submodule(path)._parameters[attr])] = key
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) in by_id:
                owners[by_id[id(p)]].append((module, attr))
    per_module: dict[int, tuple[torch.nn.Module, dict]] = {}
    for key, jp in params.items():
        module, attr = owners[key][0]
        held = module._parameters[attr]
        jp.dtype, jp.device = held.dtype, held.device
        jp.holder = torch.nn.Parameter(placeholder(jp.shape, held.dtype, held.device), requires_grad=False)
        for module, attr in owners[key]:
            module._parameters[attr] = jp.holder
            per_module.setdefault(id(module), (module, {}))[1][attr] = jp
    state = PackedWeights(params, [_Hooks(m, ps) for m, ps in per_module.values()])
    setattr(model, ATTR, state)
    return state


def to_device(model, device) -> None:
    """Move `model` to `device`: dense parameters and buffers move; packed parameters stay packed where they are
    (CPU memory: `dequantize` runs there) behind placeholders on `device`, and each forward copies the
    dequantized weight over (one module at a time)."""
    state = packed_weights(model)
    owners = [(h.module, attr, jp) for h in state.hooks for attr, jp in h.params.items()] if state else []
    for module, attr, _ in owners:
        module._parameters[attr] = None   # not materialized by Module.to
    model.to(device)
    for jp in (state.params.values() if state else ()):
        jp.device = torch.device(device)
        jp.holder = torch.nn.Parameter(placeholder(jp.shape, jp.dtype, device), requires_grad=False)
    for module, attr, jp in owners:
        module._parameters[attr] = jp.holder


def packed_weights(model) -> PackedWeights | None:
    return getattr(model, ATTR, None)


def jit_param(model, module, attr: str = "weight") -> JitParam | None:
    """The JitParam behind `module.attr` of `model`, if that parameter is packed (None: a dense parameter)."""
    state = packed_weights(model)
    p = module._parameters.get(attr)
    if state is None or p is None:
        return None
    return next((jp for jp in state.params.values() if jp.holder is p), None)


def keep_dense(model, budget_bytes: int) -> int:
    """Replace packed parameters by dense copies made once, largest first, while the growth of the weights'
    memory (dense copy less the packed tensors it replaces) fits `budget_bytes` (memory for speed); returns
    that growth. Embeddings are left packed (they dequantize only the rows a forward looks up), unless they
    are also a tied head."""
    state = packed_weights(model)
    if state is None or budget_bytes <= 0:
        return 0
    rows_only = {id(jp) for h in state.hooks if h.rows for jp in h.params.values()}
    head_too = {id(jp) for h in state.hooks if not h.rows for jp in h.params.values()}
    used = 0
    for key, jp in sorted(state.params.items(), key=lambda kv: -kv[1].dense_nbytes):
        grow = jp.dense_nbytes - jp.nbytes
        if (id(jp) in rows_only and id(jp) not in head_too) or used + grow > budget_bytes:
            continue
        dense = torch.nn.Parameter(jp.dense(), requires_grad=False)
        state.kept[key] = spec_label(jp)
        for h in state.hooks:
            for attr, p in list(h.params.items()):
                if p is jp:
                    h.module._parameters[attr] = dense
                    del h.params[attr]
        del state.params[key]
        used += grow
    for h in [h for h in state.hooks if not h.params]:
        h.remove()
        state.hooks.remove(h)
    return used


def weight_bytes(model, device=None) -> int:
    """Bytes the model's weights hold in memory: dense parameters and buffers (each once: tied ones share their
    data; a view of a memory-mapped file counts its own bytes, a placeholder its one element) plus packed
    parameters as stored; only those on `device` if given."""
    seen, total = set(), 0
    dev = None if device is None else torch.device(device)
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr())
        if (dev is None or t.device.type == dev.type) and key not in seen:
            seen.add(key)
            total += min(t.untyped_storage().nbytes(), t.numel() * t.element_size())
    state = packed_weights(model)
    for jp in state.params.values() if state is not None else ():
        for p in jp.parts:
            t = p.wq if isinstance(p, Packed) else p
            if dev is None or t.device.type == dev.type:
                total += p.nbytes if isinstance(p, Packed) else p.numel() * p.element_size()
    for f in state.fused.values() if state is not None else ():
        if dev is None or dev.type == "cpu":
            total += f.nbytes
    return total


def dense_state_dict(model) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every packed parameter dequantized (what the dense engine would hold)."""
    state = packed_weights(model)
    sd = dict(model.state_dict())
    if state is None:
        return sd
    by_holder = {id(jp.holder): jp for jp in state.params.values()}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in by_holder:
            sd[name] = by_holder[id(p)].dense()
    return sd


# ---------------------------------------------------------------- fused int4 matmul (generation)

FUSED_GROUPS = (32, 64, 128, 256)   # the group sizes torch's CPU int4 kernel takes (16 is refused)
# The one activation dtype the kernel vectorizes (torch 2.13 CPU): with float32 or float16 activations it runs a
# scalar loop ~50x slower, slower than dequantizing the weight per forward.
FUSED_DTYPE = torch.bfloat16
FUSED_PATH = "fused int4 matmul (bfloat16 activations)"
DENSE_PATH, JIT_PATH, ROWS_PATH = "dense copies", "dequantized per forward", "rows dequantized per lookup"


def spec_label(jp: JitParam) -> str:
    """A packed parameter's spec in words, e.g. "4-bit g32 affine"."""
    p = next((p for p in jp.parts if isinstance(p, Packed)), None)
    return "dense" if p is None else _packed_label(p)


def _packed_label(p: Packed) -> str:
    return f"{p.bits}-bit g{p.group_size} {p.extra.get('mode', 'affine')}"


def _int4_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def fusable(module, jp: JitParam) -> bool:
    """Whether torch's CPU int4 kernel can compute `module` (a linear layer) with its packed weight `jp`: affine
    4-bit, a group size in `FUSED_GROUPS`, output features a multiple of 16 (the kernel's layout), on the CPU."""
    p = jp.parts[0] if len(jp.parts) == 1 else None
    return (isinstance(module, torch.nn.Linear) and isinstance(p, Packed) and jp.build is None and not jp.experts
            and p.bits == 4 and p.group_size in FUSED_GROUPS and p.extra.get("mode", "affine") == "affine"
            and len(jp.shape) == 2 and jp.shape[0] % 16 == 0 and torch.device(jp.device or "cpu").type == "cpu"
            and _int4_kernel())


@dataclass
class FusedInt4:
    """An affine 4-bit weight [N, K] in the layout of torch's CPU int4 kernel, which multiplies by it directly.

    The kernel (`_weight_int4pack_mm_for_cpu`, torch 2.13; established by experiment, tests/test_fused.py) computes
    w = (q - 8) * scale + zero per row and group; MLX's affine w = q * scale + bias is that with
    zero = bias + 8 * scale, exactly in real arithmetic. Its numbers differ from the dense engine's: activations,
    scales and zeros go in as bfloat16 (`FUSED_DTYPE`: zero = bias + 8 * scale is rounded there, and so is the
    result) and the weight is never rounded to the scales' dtype as `mx.dequantize` rounds it."""
    weight: torch.Tensor         # uint8 [N, K / 2] (`_convert_weight_to_int4pack_for_cpu`)
    scales_zeros: torch.Tensor   # FUSED_DTYPE [K / group_size, N, 2]: (scale, bias + 8 * scale)
    group_size: int
    spec: str                    # the packed weight's spec in words (`spec_label`)

    @classmethod
    def of(cls, p: Packed) -> "FusedInt4":
        codes = unpack_codes(p.wq, 4).to(torch.int32)
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)   # inner_k_tiles: unused on CPU
        s, b = p.scales.float(), p.biases.float()
        sz = torch.stack([s.T, (b + 8 * s).T], dim=-1).to(FUSED_DTYPE).contiguous()
        return cls(weight, sz, p.group_size, _packed_label(p))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ w.T` for x [..., K], in x's dtype."""
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(FUSED_DTYPE), self.weight,
                                                       self.group_size, self.scales_zeros)
        return y.to(x.dtype).reshape(*lead, y.shape[-1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales_zeros))


def _fused_forward(module: torch.nn.Linear, fused: FusedInt4):
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = fused(x)
        return y if module.bias is None else y + module.bias
    return forward


def fuse_int4(model) -> int:
    """Make every packed linear layer `fusable` accepts (a tied head too; not kept dense) compute with torch's CPU
    int4 kernel (`FusedInt4`, converted once, here): no dense weight per forward. Its hooks go; its packed
    parameter stays (a tied embedding still looks rows up in it; `dense_state_dict` still works). Generation only:
    the logits are close to, not those of, the dense engine. Returns how many layers."""
    state = packed_weights(model)
    if state is None:
        return 0
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    for h in list(state.hooks):
        jp = h.params.get("weight")
        if h.rows or list(h.params) != ["weight"] or not fusable(h.module, jp):
            continue
        fused = FusedInt4.of(jp.parts[0])
        jp.drop_pages()
        h.remove()
        state.hooks.remove(h)
        h.module.forward = _fused_forward(h.module, fused)
        state.fused[names[id(h.module)]] = fused
    return len(state.fused)


def weight_paths(model) -> dict[str, dict[str, int]]:
    """Spec ("4-bit g32 affine") -> {path: tensors}: how each quantized weight is computed with (`DENSE_PATH`: a
    dense copy made once; `FUSED_PATH`; `JIT_PATH`: dequantized by each forward; `ROWS_PATH`: an embedding's rows
    dequantized per lookup). A tied embedding and head count once per use while packed, once when made dense.
    Empty: nothing packed."""
    state = packed_weights(model)
    out: dict[str, dict[str, int]] = {}
    if state is None:
        return out

    def add(spec: str, path: str) -> None:
        ways = out.setdefault(spec, {})
        ways[path] = ways.get(path, 0) + 1

    for spec in state.kept.values():
        add(spec, DENSE_PATH)
    for h in state.hooks:
        for jp in h.params.values():
            add(spec_label(jp), ROWS_PATH if h.rows else JIT_PATH)
    for f in state.fused.values():
        add(f.spec, FUSED_PATH)
    return out


def path_lines(paths: dict[str, dict[str, int]]) -> list[str]:
    """`weight_paths` in words, one line per spec: "4-bit g32 affine: 210 tensors, fused int4 matmul (...)"."""
    lines = []
    for spec, ways in paths.items():
        n = sum(ways.values())
        how = ", ".join(f"{k} {p}" if len(ways) > 1 else p for p, k in ways.items())
        lines.append(f"{spec}: {n} tensor{'s' if n != 1 else ''}, {how}")
    return lines
