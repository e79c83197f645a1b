"""The weight-only quantization scheme: what `config.json`'s ``quantization`` key holds.

A `QuantScheme` says how block linears (``c_attn``, ``c_proj``, ``c_fc``) are stored: int8 with
one scale per output channel, or int4 in groups of `group_size` input columns, symmetric (zero
point fixed at 8) or with one integer zero point per group; and whether the output head is
quantized too (`quantize_head`), in the same format or in int8 (`head_bits=8`: an int4 model
with an int8 head, as llama.cpp's Q4_0 files keep an 8-bit output matrix). This module only
parses and validates; the modules live in `codeshell.quant.linear`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

METHOD = "codeshell-weight-only"
FORMAT_VERSION = 1
BITS = (4, 8)
# Any power of two that fits a nibble layout works in the reference path; torch's packed
# int4 CPU kernel takes 32/64/128/256 (16 runs through the dequantize path, for tiny models).
GROUP_SIZES = (16, 32, 64, 128, 256)


class QuantError(ValueError):
    """A quantization scheme, quantized checkpoint or quantized file that cannot be used."""


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int | None = 128  # int4 only; int8 is per output channel
    symmetric: bool = True
    quantize_head: bool = False
    head_bits: int | None = None  # the head's bits when quantize_head: None = `bits`, or 8

    def __post_init__(self) -> None:
        if self.head_bits is not None:
            if self.head_bits != 8:
                raise QuantError(f"unknown head_bits {self.head_bits!r}: the head is quantized with the "
                                 "model's bits or in int8 (head_bits 8)")
            if self.head_bits == self.bits or not self.quantize_head:
                object.__setattr__(self, "head_bits", None)  # one spelling per scheme
        if self.bits not in BITS:
            raise QuantError(f"unknown bits {self.bits!r}: choose 8 (int8, per channel) or 4 (int4, group-wise)")
        if self.bits == 8:
            if not self.symmetric:
                raise QuantError("int8 is symmetric per output channel; zero points are for int4 only")
            object.__setattr__(self, "group_size", None)
        elif self.group_size not in GROUP_SIZES:
            raise QuantError(f"unknown int4 group size {self.group_size!r}: choose one of "
                             + ", ".join(map(str, GROUP_SIZES)))

    @property
    def name(self) -> str:
        name = "int8" if self.bits == 8 else f"int4-g{self.group_size}" + ("" if self.symmetric else "-zp")
        return name + ("" if not self.quantize_head else "-head8" if self.head_bits else "-head")

    def head_scheme(self) -> "QuantScheme":
        """How the output head is stored when `quantize_head` (int8 per channel for head_bits 8)."""
        return QuantScheme(bits=8, quantize_head=True) if self.head_bits == 8 else self

    def module_scheme(self, name: str) -> "QuantScheme":
        """The scheme of one quantized module by its name (``lm_head`` or a block linear)."""
        return self.head_scheme() if name == "lm_head" else self

    def check_width(self, in_features: int, tensor: str) -> None:
        """Raise if the group size does not divide a linear's input width."""
        if self.bits == 4 and in_features % self.group_size:
            raise QuantError(f"int4 group size {self.group_size} does not divide the input width "
                             f"{in_features} of {tensor}; pick a group size that divides it")

    def to_dict(self) -> dict[str, Any]:
        d = {"method": METHOD, "format_version": FORMAT_VERSION, **asdict(self)}
        if d["head_bits"] is None:  # the key only where it says something: older files stay the same
            del d["head_bits"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantScheme":
        if not isinstance(d, dict):
            raise QuantError(f"config.json `quantization` must be an object, got {d!r}")
        method = d.get("method", METHOD)
        if method != METHOD:
            raise QuantError(f"config.json `quantization.method` is {method!r}; this runtime reads {METHOD!r} "
                             "(written by `codeshell quantize`)")
        if d.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise QuantError(f"quantized checkpoint format {d['format_version']} is newer than this "
                             f"runtime's ({FORMAT_VERSION}); upgrade codeshell")
        unknown = set(d) - {"method", "format_version", "bits", "group_size", "symmetric", "quantize_head",
                           "head_bits"}
        if unknown:
            raise QuantError(f"config.json `quantization` has unknown key(s): {', '.join(sorted(unknown))}")
        return cls(bits=d.get("bits", 4), group_size=d.get("group_size", 128),
                   symmetric=bool(d.get("symmetric", True)), quantize_head=bool(d.get("quantize_head", False)),
                   head_bits=d.get("head_bits"))

    @classmethod
    def parse(cls, spec: "str | dict | QuantScheme | None") -> "QuantScheme | None":
        """None/"none" -> None; "int8"; "int4" (group 128, symmetric); "int4-g32"; "int4-g64-zp";
        "-head" at the end quantizes the output head too, "-head8" in int8 ("int4-head8");
        a dict as in config.json; or a QuantScheme."""
        if spec is None or isinstance(spec, QuantScheme):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if not isinstance(spec, str):
            raise QuantError(f"quantization must be a string such as 'int8' or 'int4', got {type(spec).__name__}")
        s = spec.strip().lower()
        if s in ("", "none"):
            return None
        m = re.fullmatch(r"int(8|4)(?:-g(\d+))?(-zp)?(-head(8)?)?", s)
        if not m or (m.group(1) == "8" and (m.group(2) or m.group(3))):
            raise QuantError(f"unknown quantization {spec!r}: choose int8, int4, int4-g<32|64|128> "
                             "(add -zp for zero points, -head to quantize the output head too, -head8 "
                             "to quantize it in int8)")
        bits = int(m.group(1))
        return cls(bits=bits, group_size=int(m.group(2) or 128), symmetric=not m.group(3),
                   quantize_head=bool(m.group(4)), head_bits=8 if m.group(5) else None)
