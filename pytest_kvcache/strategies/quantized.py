"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantization with a full-precision residual window.

Follows Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024), Section 3
and Algorithm 1 ("The KIVI Prefill & Decoding Algorithm"), and the reference code jy-yuan/KIVI
(`models/llama_kivi.py`, `LlamaFlashAttention_KIVI.forward`; `quant/new_pack.py`,
`triton_quantize_and_pack_along_last_dim`):
- min-max asymmetric quantization `code = round((x - min) / scale)`, `scale = (max - min) / (2^bits - 1)`,
  dequantized as `code * scale + min`; scales and zero-points (the minima) are stored at the model's dtype;
- keys per channel: each channel of a group of `group_size` consecutive tokens shares a scale/zero-point; values
  per token: each group of `group_size` consecutive head_dim entries of one token shares one;
- keys are quantized after RoPE, at their original positions (KIVI quantizes `key_states` after
  `apply_rotary_pos_emb`);
- prefill attends in full precision, then stores the prompt as the reference splits it: keys `P - P % R`
  quantized, the last `P % R` in the residual; values all but the last `R` quantized;
- each decode step attends over the dequantized part plus the full-precision residual (the new token included),
  then: keys whose residual reached `R` tokens are all quantized (R / group_size groups) and the key residual
  empties; values whose residual exceeds `R` quantize their oldest token, so `R` stay in full precision.
  So the quantized key count is always a multiple of `R`, the quantized value count any number.

Deliberate differences from the reference, each without effect on the quantized values:
- codes are packed into uint8 bytes along head_dim (8 // bits codes per byte) for keys and values alike; KIVI
  packs int32 words, keys along tokens, for its CUDA kernel. Resident bytes are identical.
- attention dequantizes the quantized part and calls SDPA over it plus the residual, batched over slots with a
  validity mask, instead of KIVI's fused `cuda_bmm_fA_qB_outer` kernels.
- a group whose min equals its max (scale 0) gets code 0 and dequantizes exactly to its min; KIVI divides by 0.
- one `bits` setting for keys and values (KIVI's config has k_bits and v_bits; the paper's KIVI-2/KIVI-4 use
  equal ones); 8 bits is allowed because KIVI's packing supports it (its README and kernels announce 2 and 4).
- resident bytes are counted between steps (after prefill and after each decode step): the transient state in
  which one step holds `R` full-precision keys before they are quantized is not part of the peak.

Storage is preallocated per slot for the whole context (no eviction), but as packed codes + scales + zero-points
plus a residual window of `min(R, slot_tokens)` full-precision tokens, so the memory saving is real. A token at
position t that is in a residual window lives in cell `t % R` (the key residual starts at a multiple of R; the
value residual holds the last R tokens, which occupy distinct cells).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import LoadedModel
from pytest_kvcache.strategies.base import AttendSpec, KVStrategy, SlotCache, Step
from pytest_kvcache.traces import Request

BITS = (2, 4, 8)


def _minmax_quantize(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization of x's groups along `dim`: (codes uint8 like x, scale, min keeping dim)."""
    mn = x.amin(dim=dim, keepdim=True)
    scale = (x.amax(dim=dim, keepdim=True) - mn) / (2**bits - 1)
    scaled = torch.where(scale > 0, (x - mn) / torch.where(scale > 0, scale, 1), 0)
    codes = scaled.clamp(0, 2**bits - 1).round().to(torch.uint8)
    return codes, scale, mn


def quantize_keys(k: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel key quantization: k (..., T, D), T a multiple of `group` -> codes (..., T, D) uint8,
    scale and zero-point (..., T // group, D)."""
    *lead, tokens, dim = k.shape
    codes, scale, mn = _minmax_quantize(k.reshape(*lead, tokens // group, group, dim), -2, bits)
    return codes.reshape(k.shape), scale.squeeze(-2), mn.squeeze(-2)


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of quantize_keys: codes (..., T, D), scale/zero (..., T // group, D) -> (..., T, D) at scale's dtype."""
    *lead, tokens, dim = codes.shape
    grouped = codes.reshape(*lead, tokens // group, group, dim).to(scale.dtype)
    return (grouped * scale.unsqueeze(-2) + zero.unsqueeze(-2)).reshape(codes.shape)


def quantize_values(v: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token value quantization: v (..., T, D), D a multiple of `group` -> codes (..., T, D) uint8,
    scale and zero-point (..., T, D // group)."""
    *lead, tokens, dim = v.shape
    codes, scale, mn = _minmax_quantize(v.reshape(*lead, tokens, dim // group, group), -1, bits)
    return codes.reshape(v.shape), scale.squeeze(-1), mn.squeeze(-1)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of quantize_values: codes (..., T, D), scale/zero (..., T, D // group) -> (..., T, D)."""
    *lead, tokens, dim = codes.shape
    grouped = codes.reshape(*lead, tokens, dim // group, group).to(scale.dtype)
    return (grouped * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(codes.shape)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `bits`-bit codes (..., D) into bytes (..., D * bits // 8), lowest bits first, as KIVI's pack_tensor."""
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: bytes (..., D * bits // 8) -> codes (..., D) uint8."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1).to(torch.uint8)


@dataclass(frozen=True)
class KiviLayout:
    """Per-head, per-layer sizes of one slot and the exact bytes of a given fill (all K and V of all layers)."""

    layers: int
    kv_heads: int
    head_dim: int
    elem: int
    bits: int
    group: int
    residual: int

    def bytes(self, keys_quantized: int, keys_residual: int, values_quantized: int, values_residual: int) -> int:
        """Bytes of K and V over all layers and heads: packed codes + scales + zero-points + full-precision tokens."""
        d, g, elem = self.head_dim, self.group, self.elem
        keys = keys_quantized * d * self.bits // 8 + 2 * (keys_quantized // g) * d * elem + keys_residual * d * elem
        values = values_quantized * d * self.bits // 8 + 2 * values_quantized * (d // g) * elem
        values += values_residual * d * elem
        return self.layers * self.kv_heads * (keys + values)

    def slot_bytes(self, tokens: int, keys_quantized: int, values_quantized: int) -> int:
        """Bytes resident for one request of `tokens` tokens, of which these keys and values are quantized."""
        return self.bytes(keys_quantized, tokens - keys_quantized, values_quantized, tokens - values_quantized)

    def split(self, tokens: int) -> tuple[int, int]:
        """(quantized keys, quantized values) after a prefill of `tokens` tokens (KIVI's prompt split)."""
        return tokens - tokens % self.residual, max(0, tokens - self.residual)

    def capacity(self, slot_tokens: int) -> tuple[int, int, int]:
        """(quantized key tokens, quantized value tokens, residual cells) a slot of `slot_tokens` tokens needs."""
        cells = min(self.residual, slot_tokens)
        return slot_tokens // self.residual * self.residual, max(0, slot_tokens - self.residual), cells

    def allocated_slot_bytes(self, slot_tokens: int) -> int:
        """Bytes one preallocated slot occupies (what an engine's memory plan should charge per slot)."""
        keys, values, cells = self.capacity(slot_tokens)
        return self.bytes(keys, cells, values, cells)


class QuantizedCache(SlotCache):
    """KIVI storage per (layer, slot, kv head): packed key/value codes, their scales and zero-points, and
    full-precision residual keys/values; `kq[slot]`/`vq[slot]` count each request's quantized tokens.

    Not captured in a CUDA graph: which slots flush or shift this step is decided on the host (eager on CUDA)."""

    capturable = False

    def __init__(self, strategy: Quantized, model: LoadedModel, n_slots: int, slot_tokens: int) -> None:
        self.layout = strategy.layout(model)
        super().__init__(strategy, model, n_slots, 0)  # the full-precision slot buffers stay empty
        self.slot_tokens = slot_tokens
        self.bits, self.group, self.residual = strategy.bits, strategy.group_size, strategy.residual
        head_dim = model.head_dim
        keys, values, cells = self.layout.capacity(slot_tokens)
        lead = (model.num_layers, n_slots, model.num_kv_heads)
        packed = head_dim * self.bits // 8

        def buffer(*shape: int, dtype: torch.dtype = model.dtype) -> torch.Tensor:
            return torch.zeros(lead + shape, dtype=dtype, device=model.device)

        self.k_codes, self.v_codes = buffer(keys, packed, dtype=torch.uint8), buffer(values, packed, dtype=torch.uint8)
        self.k_scale, self.k_zero = buffer(keys // self.group, head_dim), buffer(keys // self.group, head_dim)
        self.v_scale, self.v_zero = buffer(values, head_dim // self.group), buffer(values, head_dim // self.group)
        self.k_res, self.v_res = buffer(cells, head_dim), buffer(cells, head_dim)

    def reset(self) -> None:
        super().reset()
        self.kq = [0] * self.n_slots
        self.vq = [0] * self.n_slots
        self.resident = [0] * self.n_slots

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every per-slot tensor, indexed (layer, slot, ...): what a move copies and allocation counts."""
        return self.k_codes, self.k_scale, self.k_zero, self.k_res, self.v_codes, self.v_scale, self.v_zero, self.v_res

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the preallocated codes, scales, zero-points and residual cells (the full buffers are empty)."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def _set_bytes(self, slots: range | list[int]) -> None:
        """Recount the resident bytes of `slots` from their fill and add the change to the counters at once."""
        delta = 0
        for slot in slots:
            now = self.layout.slot_bytes(self.kept[slot], self.kq[slot], self.vq[slot])
            delta += now - self.resident[slot]
            self.resident[slot] = now
        self.counters.add_resident(delta)

    def admit(self, slot: int, request: Request) -> None:
        """A new request starts with nothing quantized."""
        super().admit(slot, request)
        self.kq[slot] = self.vq[slot] = 0

    def release(self, slot: int) -> None:
        """Free a finished request: its quantized and residual bytes leave the resident count."""
        self.counters.tokens_kept_final += self.kept[slot]
        self.kept[slot] = self.kq[slot] = self.vq[slot] = 0
        self._set_bytes([slot])

    def move(self, src: int, dst: int) -> None:
        """Move a running request's codes, scales and residual cells into a freed slot (slots stay contiguous)."""
        for buf in self.buffers:
            buf[:, dst] = buf[:, src]
        self.kq[dst], self.vq[dst], self.resident[dst] = self.kq[src], self.vq[src], self.resident[src]
        self.kept[dst], self.seen[dst], self.limit[dst] = self.kept[src], self.seen[src], self.limit[src]
        self.kept[src] = self.kq[src] = self.vq[src] = self.resident[src] = 0

    def store_prefill(self, layer: int, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize the prompt's rotated keys and values as KIVI splits them; the rest goes to the residual cells."""
        length = k.shape[2]
        kq, vq = self.layout.split(length)
        if kq:
            codes, scale, zero = quantize_keys(k[0, :, :kq], self.group, self.bits)
            self.k_codes[layer, slot, :, :kq] = pack_codes(codes, self.bits)
            self.k_scale[layer, slot, :, : kq // self.group] = scale
            self.k_zero[layer, slot, :, : kq // self.group] = zero
        if vq:
            codes, scale, zero = quantize_values(v[0, :, :vq], self.group, self.bits)
            self.v_codes[layer, slot, :, :vq] = pack_codes(codes, self.bits)
            self.v_scale[layer, slot, :, :vq] = scale
            self.v_zero[layer, slot, :, :vq] = zero
        positions = torch.arange(length, device=k.device)
        self.k_res[layer, slot, :, positions[kq:] % self.residual] = k[0, :, kq:]
        self.v_res[layer, slot, :, positions[vq:] % self.residual] = v[0, :, vq:]

    def finish_prefill(self, slot: int, prompt_tokens: int) -> None:
        """Record the prompt's split between quantized part and residual; count its exact bytes."""
        self.seen[slot] = self.kept[slot] = prompt_tokens
        self.kq[slot], self.vq[slot] = self.layout.split(prompt_tokens)
        self.counters.tokens_stored += prompt_tokens
        self._set_bytes([slot])

    def prepare(self, batch: int) -> None:
        """Per-step indices shared by all layers: which positions come from codes, residual cells or the new token,
        which slots flush their key residual and which quantize their oldest residual value."""
        device = self.v.device
        kept = torch.tensor(self.kept[:batch], device=device)
        kq = torch.tensor(self.kq[:batch], device=device)
        vq = torch.tensor(self.vq[:batch], device=device)
        span = max(self.kept[:batch]) + 1
        cells = torch.arange(span, device=device)
        flush = [s for s in range(batch) if self.kept[s] + 1 - self.kq[s] == self.residual]
        shift = [s for s in range(batch) if self.kept[s] - self.vq[s] == self.residual]
        key_flush = torch.tensor(flush, dtype=torch.long, device=device)
        value_shift = torch.tensor(shift, dtype=torch.long, device=device)
        self.step = _KiviStep(
            span=span,
            write=kept % self.residual,
            lengths=kept + 1,
            max_kq=max(self.kq[:batch]),
            max_vq=max(self.vq[:batch]),
            key_quantized=(cells.unsqueeze(0) < kq.unsqueeze(1))[:, None, :, None],
            value_quantized=(cells.unsqueeze(0) < vq.unsqueeze(1))[:, None, :, None],
            new=(cells.unsqueeze(0) == kept.unsqueeze(1))[:, None, :, None],
            cells=cells % self.residual,
            flush_slots=flush,
            shift_slots=shift,
            key_flush=key_flush,
            key_flush_tokens=kq[key_flush].unsqueeze(1) + torch.arange(self.residual, device=device),
            value_shift=value_shift,
            value_shift_tokens=vq[value_shift].unsqueeze(1),
        )

    def step_kv_bytes(self, batch: int) -> int:
        """Attention reads every resident code, scale and residual cell of the batch."""
        return sum(self.resident[:batch])

    def _gather(
        self, quantized: torch.Tensor | None, mask: torch.Tensor, residual: torch.Tensor, new: torch.Tensor
    ) -> torch.Tensor:
        """Full-precision (B, H, span, D) view of each slot's tokens: dequantized part, residual cells, new token."""
        step = self.step
        out = torch.where(step.new, new.unsqueeze(2), residual[:, :, step.cells])
        if quantized is None:
            return out
        padded = F.pad(quantized, (0, 0, 0, step.span - quantized.shape[2]))
        return torch.where(mask, padded, out)

    def _dequantized_keys(self, layer: int, batch: int) -> torch.Tensor | None:
        """Dequantized keys (B, H, max_kq, D) of the batch, or None when no slot has quantized keys."""
        n = self.step.max_kq
        if n == 0:
            return None
        codes = unpack_codes(self.k_codes[layer, :batch, :, :n], self.bits)
        groups = n // self.group
        scale, zero = self.k_scale[layer, :batch, :, :groups], self.k_zero[layer, :batch, :, :groups]
        return dequantize_keys(codes, scale, zero, self.group)

    def _dequantized_values(self, layer: int, batch: int) -> torch.Tensor | None:
        """Dequantized values (B, H, max_vq, D) of the batch, or None when no slot has quantized values."""
        n = self.step.max_vq
        if n == 0:
            return None
        codes = unpack_codes(self.v_codes[layer, :batch, :, :n], self.bits)
        scale, zero = self.v_scale[layer, :batch, :, :n], self.v_zero[layer, :batch, :, :n]
        return dequantize_values(codes, scale, zero, self.group)

    def write_target(self, layer: int, step: Step) -> None:
        return None

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step,
              written: bool = False) -> AttendSpec:
        """Attention reads dequantized + residual + new K/V (a full-precision copy); then the new token is stored
        and what left the window is quantized (KIVI's update after attention)."""
        kivi, batch = self.step, step.batch
        k_res, v_res = self.k_res[layer, :batch], self.v_res[layer, :batch]
        keys = self._gather(self._dequantized_keys(layer, batch), kivi.key_quantized, k_res, k)
        values = self._gather(self._dequantized_values(layer, batch), kivi.value_quantized, v_res, v)
        spec = AttendSpec(keys, values, kivi.lengths, kivi.span)
        rows = torch.arange(batch, device=q.device)
        shift, shift_tokens = kivi.value_shift, kivi.value_shift_tokens
        if kivi.shift_slots:
            oldest = v_res[shift, :, kivi.write[shift]].unsqueeze(2)
            codes, v_scale, v_zero = quantize_values(oldest, self.group, self.bits)
            self._put(self.v_codes, layer, shift, shift_tokens, pack_codes(codes, self.bits))
            self._put(self.v_scale, layer, shift, shift_tokens, v_scale)
            self._put(self.v_zero, layer, shift, shift_tokens, v_zero)
        self.k_res[layer, rows, :, kivi.write] = k
        self.v_res[layer, rows, :, kivi.write] = v
        flush, flush_tokens = kivi.key_flush, kivi.key_flush_tokens
        if kivi.flush_slots:
            codes, k_scale, k_zero = quantize_keys(self.k_res[layer, flush], self.group, self.bits)
            groups = flush_tokens[:, :: self.group] // self.group
            self._put(self.k_codes, layer, flush, flush_tokens, pack_codes(codes, self.bits))
            self._put(self.k_scale, layer, flush, groups, k_scale)
            self._put(self.k_zero, layer, flush, groups, k_zero)
        return spec

    @staticmethod
    def _put(buffer: torch.Tensor, layer: int, rows: torch.Tensor, tokens: torch.Tensor, data: torch.Tensor) -> None:
        """buffer[layer, rows[i], :, tokens[i]] = data[i] for every i: buffer (L, S, H, T, X), rows (n,),
        tokens (n, t), data (n, H, t, X)."""
        buffer[layer].transpose(1, 2)[rows.unsqueeze(1), tokens] = data.transpose(1, 2).to(buffer.dtype)

    def advance(self, batch: int) -> None:
        """Advance every slot by one token and the quantized counts by what this step quantized."""
        kivi = self.step
        for slot in kivi.flush_slots:
            self.kq[slot] += self.residual
        for slot in kivi.shift_slots:
            self.vq[slot] += 1
        for slot in range(batch):
            self.seen[slot] += 1
            self.kept[slot] += 1
        self.counters.tokens_stored += batch
        self._set_bytes(range(batch))
        self.step = None


@dataclass
class _KiviStep:
    """Per-step indices of one KIVI decode step (host-built: the step is not captured in a graph)."""

    span: int
    write: torch.Tensor
    lengths: torch.Tensor
    max_kq: int
    max_vq: int
    key_quantized: torch.Tensor
    value_quantized: torch.Tensor
    new: torch.Tensor
    cells: torch.Tensor
    flush_slots: list[int]
    shift_slots: list[int]
    key_flush: torch.Tensor
    key_flush_tokens: torch.Tensor
    value_shift: torch.Tensor
    value_shift_tokens: torch.Tensor


@dataclass(frozen=True)
class Quantized(KVStrategy):
    """bits: code width (paper: 2 or 4); group_size: tokens per key group and head_dim entries per value group
    (paper: 32); residual: full-precision recent tokens R, a multiple of group_size (paper: 128)."""

    name = "quantized"
    cache_class = QuantizedCache
    bits: int = 2
    group_size: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        """Reject settings KIVI cannot run (head_dim divisibility is checked when the cache meets the model)."""

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not integer(self.bits) or self.bits not in BITS:
            raise KVConfigError(f"quantized: bits must be one of 2, 4, 8, got {self.bits!r}")
        g = self.group_size
        if not integer(g) or not 1 <= g <= 256 or g & (g - 1):
            raise KVConfigError(f"quantized: group_size must be a power of two in [1, 256], got {g!r}")
        r = self.residual
        if not integer(r) or r < g or r % g or r > 1 << 20:
            raise KVConfigError(
                f"quantized: residual must be a multiple of group_size {g} in [{g}, {1 << 20}], got {r!r}"
            )

    def layout(self, model: LoadedModel) -> KiviLayout:
        """Byte layout on `model`; group_size must divide head_dim since values are grouped along it."""
        if model.head_dim % self.group_size:
            raise KVConfigError(
                f"quantized: group_size must divide head_dim {model.head_dim} of model {model.name!r}, "
                f"got {self.group_size}"
            )
        elem = torch.finfo(model.dtype).bits // 8
        return KiviLayout(
            model.num_layers, model.num_kv_heads, model.head_dim, elem, self.bits, self.group_size, self.residual
        )

    def slot_bytes(self, model: LoadedModel, slot_tokens: int, context_tokens: int | None = None) -> int:
        """Bytes one slot of `slot_tokens` tokens allocates: what HFEngine.plan_slots should charge per slot under
        kv_limit_bytes (it charges slot_tokens * kv_bytes_per_token today)."""
        return self.layout(model).allocated_slot_bytes(slot_tokens)
