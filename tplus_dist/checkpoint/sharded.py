"""The model and optimizer state in a layout-independent sharded form: what makes a checkpoint resumable on
another layout (data-parallel size, ZeRO stage, tensor or pipeline parallel size, one process) and exportable
from any process count.

Every rank writes ``state/rankNNNNN.safetensors`` holding *pieces*: for each decoder parameter it holds (by its
name in the whole decoder, so pipeline stages and interleaved chunks do not matter), a contiguous range
``[start, start + numel)`` of its flattened tensor-parallel slice, with the fp32 master value (``param``) and
every optimizer state of the parameter's shape (AdamW's ``exp_avg`` / ``exp_avg_sq``) over that range. Who
writes which range:

- ZeRO 1 / 2 and DeepSpeed's bf16 optimizer: the rank's own fragment of the flat fp32 partition
  (DeepSpeed's ``_hp_mapping``, the mapping its universal checkpoints use), nothing gathered;
- ZeRO 3: the rank's partition of each parameter (``ds_tensor`` and the fp32 partition behind it);
- ZeRO 0 and one process: each data-parallel rank writes an equal 1/DP of every parameter, so writes are spread
  over the ranks; optimizer states of another shape (Adafactor's factored moments, SOAP's preconditioners) are
  written whole by data-parallel rank 0, and scalars (``step``) with every piece.

Rank 0 gathers the pieces' positions into the manifest's ``state`` index: {name: {shape, pieces: [{file,
tp: [dim, index, parts] or null, local_shape, start, numel, keys, whole, scalars}]}}. Loading on any layout,
a rank reads exactly the ranges it needs (through safetensors' lazy slices: a memory map, not whole files)
when the tensor-parallel split is unchanged, and assembles whole tensors then takes its slice when it changed.
The files are plain safetensors, readable without tplus-dist.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tplus_dist.checkpoint.store import CheckpointError
from tplus_dist.model.init import Shard, shard_of

STATE_DIR = "state"
PARAM = "param"
_SEP = "::"
_COMPILED_PREFIX = "_orig_mod."

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def state_file(rank: int) -> str:
    return f"{STATE_DIR}/rank{rank:05d}.safetensors"


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> int:
    """Stream ``tensors`` into a safetensors file (no second copy of the whole state in memory: each tensor's bytes
    are written straight from its storage), fsynced. Returns the byte count."""
    header: dict[str, Any] = {}
    offset = 0
    for key, t in tensors:
        if t.dtype not in _DTYPES:
            raise TypeError(f"{key}: dtype {t.dtype} cannot be stored")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in tensors:
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


# --------------------------------------------------------------------------------------- the rank's parameters


def _core(trainer: Any) -> nn.Module:
    from tplus_dist.checkpoint.manager import engine_of

    engine = engine_of(trainer)
    return engine.module if engine is not None else trainer.model


def local_parameters(trainer: Any) -> list[tuple[str, nn.Parameter]]:
    """(decoder name, parameter) of every parameter this rank holds, each name once."""
    core = _core(trainer)
    rename = getattr(core, "decoder_name", None)
    out: dict[str, nn.Parameter] = {}
    for name, p in core.named_parameters():
        key = rename(name) if rename is not None else name
        key = key.removeprefix(_COMPILED_PREFIX)
        out.setdefault(key, p)
    return list(out.items())


def _local_shape(p: nn.Parameter) -> torch.Size:
    zp: Any = p
    return torch.Size(zp.ds_shape) if hasattr(p, "ds_id") else p.shape


def _tp(p: nn.Parameter) -> list[int] | None:
    s = shard_of(p)
    return None if s is None or s.parts == 1 else [s.dim, s.index, s.parts]


def _optimizer(trainer: Any) -> Any:
    from tplus_dist.checkpoint.manager import engine_of

    engine = engine_of(trainer)
    return engine.optimizer if engine is not None else trainer.optimizer


def _dp(trainer: Any) -> tuple[int, int]:
    groups = getattr(getattr(trainer, "layout", None), "groups", None)
    if groups is None:
        return 0, 1
    return dist.get_rank(groups.dp), dist.get_world_size(groups.dp)


def _hp_flats(zero: Any) -> list[torch.Tensor]:
    """The flat fp32 partition of each group of a ZeRO 1/2 or bf16 optimizer (what its base optimizer steps)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(zero, attr):
            return list(getattr(zero, attr))
    raise CheckpointError(f"unsupported DeepSpeed optimizer {type(zero).__name__}: no flat fp32 partitions found")


def _lp_groups(zero: Any) -> list[list[nn.Parameter]]:
    for attr in ("bit16_groups", "bf16_groups"):
        if hasattr(zero, attr):
            return list(getattr(zero, attr))
    raise CheckpointError(f"unsupported DeepSpeed optimizer {type(zero).__name__}: no parameter groups found")


def _zero3_partition(opt: Any, p: nn.Parameter, dp_rank: int) -> tuple[torch.Tensor, int, int, int]:
    """Where this rank's ZeRO 3 partition of ``p`` lies: (its group's flat fp32 partition, the offset in it, the
    partition's start in ``p``'s flattened slice, the number of real elements: 0 when it is all padding)."""
    zp: Any = p
    gi, off, num = opt.grad_position[opt.get_param_id(p)]
    start = dp_rank * num
    return opt.fp32_partitioned_groups_flat[gi], off, start, max(0, min(num, zp.ds_numel - start))


def _scalars(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            out[k] = v.detach()
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = torch.tensor(v, dtype=torch.int64 if isinstance(v, int) else torch.float64)
    return out


@dataclass
class Piece:
    name: str
    shape: list[int]  # the whole (logical) tensor
    local_shape: list[int]  # this tensor-parallel slice
    tp: list[int] | None
    start: int
    numel: int
    values: dict[str, torch.Tensor]  # PARAM and elementwise states, each [numel]
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    python: dict[str, str] = field(default_factory=dict)  # scalar key -> "int" / "float" when not a tensor

    def meta(self, file: str) -> dict[str, Any]:
        return {
            "file": file,
            "tp": self.tp,
            "local_shape": self.local_shape,
            "start": self.start,
            "numel": self.numel,
            "keys": sorted(self.values),
            "whole": sorted(self.whole),
            "scalars": {k: self.python.get(k, "tensor") for k in sorted(self.scalars)},
        }


def _piece(name: str, p: nn.Parameter, start: int, numel: int, values: dict[str, torch.Tensor]) -> Piece:
    local = _local_shape(p)
    s = shard_of(p)
    whole = s.full_shape(local) if s is not None else local
    return Piece(name, list(whole), list(local), _tp(p), start, numel, values)


def _add_scalars(piece: Piece, state: dict[str, Any]) -> None:
    piece.scalars = _scalars(state)
    piece.python = {k: type(v).__name__ for k, v in state.items() if isinstance(v, int | float)}


def collect_pieces(trainer: Any) -> Iterator[Piece]:
    """This rank's pieces (views into the live state: write them before the next step)."""
    opt = _optimizer(trainer)
    dp_rank, dp = _dp(trainer)
    for name, p in local_parameters(trainer):
        if hasattr(p, "ds_id"):  # ZeRO 3
            flat, off, start, valid = _zero3_partition(opt, p, dp_rank)
            if valid == 0:
                continue
            st = opt.optimizer.state.get(flat, {})
            values = {PARAM: flat.narrow(0, off, valid)}
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == flat.shape:
                    values[k] = v.narrow(0, off, valid)
            piece = _piece(name, p, start, valid, values)
            _add_scalars(piece, st)
            yield piece
        elif hasattr(p, "_hp_mapping"):  # ZeRO 1/2, DeepSpeed's bf16 optimizer
            m = p._hp_mapping
            if m is None:
                continue
            # The states are read from the flat partition itself: DeepSpeed 0.19.8 links the fragments' optimizer
            # views once, after the first group's first step, so later groups' views stay empty.
            a, h = m.lp_fragment_address, m.hp_fragment_address
            flat = _hp_flats(opt)[m.param_group_index]
            st = opt.optimizer.state.get(flat, {})
            values = {PARAM: m.get_hp_fragment()}
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == flat.shape:
                    values[k] = v.narrow(0, h.start, h.numel)
            piece = _piece(name, p, int(a.start), int(a.numel), values)
            _add_scalars(piece, st)
            yield piece
        else:  # one process, ZeRO 0: every data-parallel rank writes 1/DP of each parameter
            n = p.numel()
            chunk = math.ceil(n / dp)
            start = min(dp_rank * chunk, n)
            numel = min(chunk, n - start)
            st = opt.state.get(p, {})
            if numel == 0 and not (dp_rank == 0 and st):
                continue
            values = {PARAM: p.detach().reshape(-1).narrow(0, start, numel)}
            whole: dict[str, torch.Tensor] = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    values[k] = v.detach().reshape(-1).narrow(0, start, numel)
                elif isinstance(v, torch.Tensor) and v.dim() > 0 and dp_rank == 0:
                    whole[k] = v.detach()
            piece = _piece(name, p, start, numel, values)
            piece.whole = whole
            _add_scalars(piece, st)
            yield piece


def refuse_non_finite(pieces: list[Piece]) -> None:
    """Raise CheckpointError naming the first parameter whose values are not all finite: no path may publish a
    damaged state (a NaN step that got through would otherwise become ``latest`` and be resumed). One check per
    piece, read back at once (a single device sync)."""
    if not pieces:
        return
    finite = torch.stack([torch.isfinite(p.values[PARAM]).all() for p in pieces]).tolist()
    bad = [p.name for p, ok in zip(pieces, finite, strict=True) if not ok]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"parameter {bad[0]}{more} holds nan or inf values: refusing to save a damaged state")


def snapshot_state(
    trainer: Any, rank: int, buffers: dict[str, torch.Tensor] | None = None
) -> tuple[list[tuple[str, torch.Tensor]], list[dict[str, Any]]]:
    """This rank's pieces as (file key, tensor) pairs and their index entries (with the name and shape).

    Without ``buffers`` the tensors are views into the live state (write them before the next step). With a dict
    they are copied into host buffers kept there across saves (pinned when CUDA is available), so training may go
    on while a thread writes them: the copy is the step loop's whole stall."""
    file = state_file(rank)
    tensors: list[tuple[str, torch.Tensor]] = []
    metas = []
    pieces = list(collect_pieces(trainer))
    refuse_non_finite(pieces)
    for piece in pieces:
        key = f"{piece.name}{_SEP}{piece.start}"
        for k, v in piece.values.items():
            tensors.append((f"{key}{_SEP}{k}", v))
        for k, v in piece.whole.items():
            tensors.append((f"{key}{_SEP}whole{_SEP}{k}", v))
        for k, v in piece.scalars.items():
            tensors.append((f"{key}{_SEP}scalar{_SEP}{k}", v))
        metas.append({"name": piece.name, "shape": piece.shape, **piece.meta(file)})
    if buffers is not None:
        pin = torch.cuda.is_available()
        copied = []
        for key, t in tensors:
            buf = buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            buf.copy_(t.detach(), non_blocking=pin)
            copied.append((key, buf))
        if pin:
            torch.cuda.synchronize()
        tensors = copied
    return tensors, metas


def write_state(staging: Path, rank: int, tensors: list[tuple[str, torch.Tensor]]) -> Path:
    """Write a snapshot into ``staging/state``; returns the file."""
    (staging / STATE_DIR).mkdir(exist_ok=True)
    path = staging / state_file(rank)
    write_safetensors(path, tensors)
    return path


def build_index(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """{name: {shape, pieces}} from every rank's entries: copies of one range (a tied embedding on two pipeline
    stages) kept once, and each tensor-parallel slice checked to be covered exactly (CheckpointError if not)."""
    index: dict[str, Any] = {}
    seen: set[tuple[str, Any, int]] = set()
    for m in sorted(metas, key=lambda m: (m["name"], m["tp"] or [], m["start"], m["file"])):
        name = m.pop("name")
        shape = m.pop("shape")
        entry = index.setdefault(name, {"shape": shape, "pieces": []})
        if entry["shape"] != shape:
            raise CheckpointError(f"{name}: ranks disagree on its shape ({entry['shape']} vs {shape})")
        ident = (name, tuple(m["tp"] or ()), m["start"])
        if ident in seen:
            continue
        seen.add(ident)
        entry["pieces"].append(m)
    for name, entry in index.items():
        by_slice: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for piece in entry["pieces"]:
            by_slice.setdefault(tuple(piece["tp"] or ()), []).append(piece)
        parts = {tp[2] if tp else 1 for tp in by_slice}
        if len(parts) != 1 or len(by_slice) != next(iter(parts)):
            raise CheckpointError(f"{name}: the saved tensor-parallel slices are incomplete ({sorted(by_slice)})")
        for tp, pieces in by_slice.items():
            end = 0
            for piece in sorted(pieces, key=lambda q: q["start"]):
                if piece["start"] != end:
                    raise CheckpointError(f"{name} slice {tp or 'whole'}: no piece covers elements {end}.."
                                          f"{piece['start']}")  # fmt: skip
                end += piece["numel"]
            if end != math.prod(pieces[0]["local_shape"]):
                raise CheckpointError(f"{name} slice {tp or 'whole'}: pieces end at {end} of "
                                      f"{math.prod(pieces[0]['local_shape'])} elements")  # fmt: skip
    return index


# ---------------------------------------------------------------------------------------------------- reading


class StateReader:
    """Reads ranges of the saved tensors for any layout (files opened lazily, once, as memory maps)."""

    def __init__(self, root: Path, index: dict[str, Any]) -> None:
        self.root = root
        self.index = index
        self._files: dict[str, Any] = {}

    def _open(self, file: str) -> Any:
        if file not in self._files:
            from safetensors import safe_open

            path = self.root / file
            if not path.is_file():
                raise CheckpointError(f"{path} is missing")
            self._files[file] = safe_open(str(path), framework="pt", device="cpu")
        return self._files[file]

    def entry(self, name: str) -> dict[str, Any]:
        if name not in self.index:
            raise CheckpointError(f"the checkpoint {self.root} has no state for parameter {name}")
        entry: dict[str, Any] = self.index[name]
        return entry

    def keys(self, name: str) -> list[str]:
        return list(self.entry(name)["pieces"][0]["keys"])

    def saved_tp(self, name: str) -> int:
        tp = self.entry(name)["pieces"][0]["tp"]
        return int(tp[2]) if tp else 1

    def _range(self, name: str, key: str, tp_index: int | None, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start+numel) of the flattened saved slice ``tp_index`` (None: unsplit)."""
        out: torch.Tensor | None = None
        filled = 0
        for piece in self.entry(name)["pieces"]:
            if (piece["tp"][1] if piece["tp"] else None) != tp_index:
                continue
            a, b = max(start, piece["start"]), min(start + numel, piece["start"] + piece["numel"])
            if a >= b:
                continue
            if key not in piece["keys"]:
                raise CheckpointError(f"{self.root}: {name} has no saved {key!r}")
            sl = self._open(piece["file"]).get_slice(f"{name}{_SEP}{piece['start']}{_SEP}{key}")
            part = sl[a - piece["start"] : b - piece["start"]]
            if out is None:
                out = torch.empty(numel, dtype=part.dtype)
            out[a - start : b - start] = part
            filled += b - a
        if out is None or filled != numel:
            raise CheckpointError(f"{self.root}: elements {start}..{start + numel} of {name} ({key}) are missing")
        return out

    def local(self, name: str, key: str, shard: Shard | None, start: int = 0, numel: int | None = None) -> torch.Tensor:
        """Elements [start, start+numel) of the flattened slice ``shard`` of the whole tensor (None: the whole)."""
        entry = self.entry(name)
        whole = torch.Size(entry["shape"])
        parts = shard.parts if shard is not None else 1
        local_shape = shard_local_shape(whole, shard)
        n = math.prod(local_shape) if numel is None else numel
        saved_parts = self.saved_tp(name)
        if saved_parts == parts:  # the same split: read only the range
            return self._range(name, key, shard.index if shard is not None and parts > 1 else None, start, n)
        saved_local = entry["pieces"][0]["local_shape"]
        dim = entry["pieces"][0]["tp"][0] if saved_parts > 1 else 0  # unsplit: one slice, no join
        slices = [
            self._range(name, key, i if saved_parts > 1 else None, 0, math.prod(saved_local)).view(saved_local)
            for i in range(saved_parts)
        ]
        full = torch.cat(slices, dim=dim) if saved_parts > 1 else slices[0]
        mine = shard.take(full) if shard is not None and parts > 1 else full
        return mine.reshape(-1)[start : start + n].clone()

    def whole_state(self, name: str, key: str) -> torch.Tensor:
        for piece in self.entry(name)["pieces"]:
            if key in piece["whole"]:
                return self._open(piece["file"]).get_tensor(f"{name}{_SEP}{piece['start']}{_SEP}whole{_SEP}{key}")
        raise CheckpointError(f"{self.root}: {name} has no saved {key!r}")

    def scalars(self, name: str) -> dict[str, Any]:
        piece = self.entry(name)["pieces"][0]
        f = self._open(piece["file"])
        out: dict[str, Any] = {}
        for k, kind in piece["scalars"].items():
            t = f.get_tensor(f"{name}{_SEP}{piece['start']}{_SEP}scalar{_SEP}{k}")
            out[k] = int(t) if kind == "int" else float(t) if kind == "float" else t
        return out


def shard_local_shape(whole: torch.Size, shard: Shard | None) -> list[int]:
    shape = list(whole)
    if shard is not None and shard.parts > 1:
        if shape[shard.dim] % shard.parts:
            raise CheckpointError(f"a dimension of {shape} does not split into {shard.parts} tensor-parallel slices")
        shape[shard.dim] //= shard.parts
    return shape


# ---------------------------------------------------------------------------------------------------- loading


def check_loadable(index: dict[str, Any], trainer: Any) -> None:
    """Before anything is written: every local parameter is in the checkpoint with the same whole shape, and a state
    that is not elementwise (Adafactor's factored moments, SOAP's) is not asked to change its split."""
    for name, p in local_parameters(trainer):
        if name not in index:
            raise CheckpointError(f"the checkpoint has no state for parameter {name}")
        s = shard_of(p)
        local = _local_shape(p)
        whole = list(s.full_shape(local) if s is not None else local)
        if index[name]["shape"] != whole:
            raise CheckpointError(f"{name}: the checkpoint's shape is {index[name]['shape']}, the model's {whole}")
        pieces = index[name]["pieces"]
        saved_parts = pieces[0]["tp"][2] if pieces[0]["tp"] else 1
        if any(q["whole"] for q in pieces) and saved_parts != (s.parts if s is not None else 1):
            raise CheckpointError(
                f"{name}: its optimizer state is not elementwise ({', '.join(pieces[0]['whole'])}), so it cannot "
                "move to another tensor-parallel size"
            )


def load_state(trainer: Any, root: Path, index: dict[str, Any]) -> None:
    """Set this rank's parameters and optimizer state from the checkpoint at ``root`` (any saved layout)."""
    check_loadable(index, trainer)
    reader = StateReader(root, index)
    opt = _optimizer(trainer)
    dp_rank, _ = _dp(trainer)
    relink: set[int] = set()  # ZeRO 1/2 groups whose states were set
    for name, p in local_parameters(trainer):
        zp: Any = p  # DeepSpeed's attributes
        shard = shard_of(p)
        keys = [k for k in reader.keys(name) if k != PARAM]
        scalars = reader.scalars(name)
        with torch.no_grad():
            if hasattr(p, "ds_id"):  # ZeRO 3: this rank's partition of the slice
                flat, off, start, valid = _zero3_partition(opt, p, dp_rank)
                if valid == 0:
                    continue
                value = reader.local(name, PARAM, shard, start, valid)
                zp.ds_tensor.data.zero_()
                zp.ds_tensor.data.narrow(0, 0, valid).copy_(value)
                flat.narrow(0, off, valid).copy_(value)
                st = opt.optimizer.state[flat]
                for k in keys:
                    if k not in st:
                        st[k] = torch.zeros_like(flat)
                    st[k].narrow(0, off, valid).copy_(reader.local(name, k, shard, start, valid))
                st.update(_copy_scalars(scalars))
            elif hasattr(p, "_hp_mapping"):  # ZeRO 1/2, bf16: the whole slice (lp) and this rank's fp32 fragment
                p.data.copy_(reader.local(name, PARAM, shard).view(p.shape))
                m = p._hp_mapping
                if m is None:
                    continue
                a, h = m.lp_fragment_address, m.hp_fragment_address
                flat = _hp_flats(opt)[m.param_group_index]
                flat.narrow(0, h.start, h.numel).copy_(reader.local(name, PARAM, shard, int(a.start), int(a.numel)))
                st = opt.optimizer.state[flat]
                for k in keys:
                    if k not in st:
                        st[k] = torch.zeros_like(flat)  # (padding past the last parameter stays zero)
                    value = reader.local(name, k, shard, int(a.start), int(a.numel))
                    st[k].narrow(0, h.start, h.numel).copy_(value)
                st.update(_copy_scalars(scalars))
                relink.add(m.param_group_index)
            else:  # one process, ZeRO 0: the whole slice
                p.data.copy_(reader.local(name, PARAM, shard).view(p.shape))
                if keys or scalars:
                    state: dict[str, Any] = {k: reader.local(name, k, shard).view(p.shape).to(p.device) for k in keys}
                    for k in reader.entry(name)["pieces"][0]["whole"]:
                        state[k] = reader.whole_state(name, k).to(p.device)
                    state.update(_copy_scalars(scalars))
                    opt.state[p] = state
    if relink:  # point every fragment's optimizer views at the states just set (DeepSpeed's lazy link)
        flats, lp_groups = _hp_flats(opt), _lp_groups(opt)
        for gi in relink:
            for lp in lp_groups[gi]:
                mapping = getattr(lp, "_hp_mapping", None)
                if mapping is not None:
                    mapping.set_optim_state_fragment(flats[gi], opt.optimizer.state[flats[gi]])
        if hasattr(opt, "_hp_optimizer_states_linked"):
            opt._hp_optimizer_states_linked = True


def _copy_scalars(scalars: dict[str, Any]) -> dict[str, Any]:
    # torch's AdamW keeps ``step`` as a CPU tensor unless capturable/fused; keep what was saved, on the CPU.
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in scalars.items()}


def whole_tensors(root: Path, index: dict[str, Any], key: str = PARAM) -> dict[str, torch.Tensor]:
    """{name: the whole tensor} of one saved key (default: the parameters), in one process, from any layout."""
    reader = StateReader(root, index)
    return {name: reader.local(name, key, None).view(entry["shape"]) for name, entry in index.items()}


def checkpoint_parameters(path: Path) -> dict[str, torch.Tensor]:
    """The whole decoder's parameters saved in the published checkpoint at ``path`` (no checksum verification)."""
    from tplus_dist.checkpoint.store import read_manifest

    return whole_tensors(path, read_manifest(path)["state"])
