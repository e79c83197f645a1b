"""A GGUF file's Q8_0 output head loads in int8 by default (`llm.gguf_head_scheme`, session 21):
the file's blocks as they are (Q4_0: int4 g32 bit for bit), the head an Int8Linear whose logits
stay within int8's rounding of the exact (bf16-widened) import; CODESHELL_GGUF_HEAD=bf16 keeps the
earlier import; a file whose head is not Q8_0 is untouched."""

from __future__ import annotations

import pytest
import torch

from codeshell import LLM
from codeshell.llm import gguf_head_scheme
from codeshell.quant.gguf_io import export_gguf
from codeshell.quant.linear import Int4Linear, Int8Linear
from codeshell.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir):
    src = make_tiny_checkpoint(tmp_path_factory.mktemp("src"), tokenizer_dir=tokenizer_dir)
    d = tmp_path_factory.mktemp("gguf")
    return {ty: export_gguf(src, d / f"m-{ty}.gguf", ty) for ty in ("q4_0", "q8_0", "f16")}


def test_default_scheme_by_file(files, monkeypatch):
    monkeypatch.delenv("CODESHELL_GGUF_HEAD", raising=False)
    assert gguf_head_scheme(files["q4_0"]).name == "int4-g32-head8"
    assert gguf_head_scheme(files["q8_0"]).name == "int8-head"
    assert gguf_head_scheme(files["f16"]) is None
    monkeypatch.setenv("CODESHELL_GGUF_HEAD", "bf16")
    assert gguf_head_scheme(files["q4_0"]) is None
    monkeypatch.setenv("CODESHELL_GGUF_HEAD", "fp8")
    with pytest.raises(ValueError, match="CODESHELL_GGUF_HEAD"):
        gguf_head_scheme(files["q4_0"])


@pytest.mark.parametrize("ty", ["q4_0", "q8_0"])
def test_int8_head_against_exact_import(files, ty, monkeypatch):
    ids = torch.randint(0, 70000, (2, 40), generator=torch.Generator().manual_seed(0))
    got = {}
    for mode in ("bf16", "int8"):
        monkeypatch.setenv("CODESHELL_GGUF_HEAD", mode)
        llm = LLM(str(files[ty]), dtype="float32")
        head, blk = llm.model.lm_head, llm.model.transformer.h[0].attn.c_attn
        assert (type(head) is Int8Linear) == (mode == "int8")
        assert type(blk) is (Int4Linear if ty == "q4_0" else Int8Linear)
        with torch.no_grad():
            got[mode] = llm.model(ids)
            if mode == "int8":  # the blocks are the same: the head's output alone differs
                exact = llm.model.transformer.wte.weight.float()
                h = torch.randn(5, exact.shape[1], generator=torch.Generator().manual_seed(1))
                want = h @ exact.T
                err = (head(h).float() - want).abs().max() / want.abs().max()
                assert err < 0.02, err
    a, b = got["int8"], got["bf16"]
    assert ((a - b).norm() / b.norm()).item() < 0.02


def test_the_header_is_read_once(files, monkeypatch):
    """The head's scheme comes from the tensor records `load_gguf` reads anyway (the header of a
    7B file, its 70k-token vocabulary included, was parsed twice before)."""
    from codeshell.quant import gguf_io, gguf_reader
    calls = []
    real = gguf_reader.read_gguf
    for mod in (gguf_io, gguf_reader):  # gguf_io's own name and the module's, wherever it is imported from
        monkeypatch.setattr(mod, "read_gguf", lambda p: calls.append(p) or real(p))
    monkeypatch.delenv("CODESHELL_GGUF_HEAD", raising=False)
    llm = LLM(str(files["q4_0"]), dtype="float32")
    assert len(calls) == 1
    assert type(llm.model.lm_head) is Int8Linear
