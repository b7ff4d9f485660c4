"""Edit-direction math and sentence banks (pure)."""
import pytest
import torch

from z2i.guidance.edit_direction import EditDirection, apply_direction, construct_direction
from z2i.guidance.sentences import TEMPLATES, parse_sentences, template_sentences, with_article


def test_direction_is_target_mean_minus_source_mean():
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(5, 77, 768, generator=g), torch.randn(7, 77, 768, generator=g)
    d = construct_direction(src, tgt)
    hand = sum(tgt[i] for i in range(7)) / 7 - sum(src[i] for i in range(5)) / 5
    assert d.shape == (1, 77, 768) and torch.allclose(d[0], hand, atol=1e-6)
    assert torch.equal(construct_direction(src, src), torch.zeros(1, 77, 768))


def test_apply_tiles_every_chunk_and_scales_linearly():
    g = torch.Generator().manual_seed(1)
    cond, delta = torch.randn(2, 154, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    out1 = apply_direction(cond, delta, 1.0)
    assert torch.allclose(out1[:, :77] - cond[:, :77], delta.expand(2, -1, -1), atol=1e-6)
    assert torch.allclose(out1[:, 77:] - cond[:, 77:], delta.expand(2, -1, -1), atol=1e-6)
    out3 = apply_direction(cond, delta, 3.0)
    assert torch.allclose(out3 - cond, 3 * (out1 - cond), atol=1e-5)
    assert torch.equal(apply_direction(cond, delta, 0.0), cond)
    with pytest.raises(ValueError, match="width mismatch"):
        apply_direction(torch.zeros(1, 77, 2048), delta, 1.0)


def test_safetensors_roundtrip_format():
    d = EditDirection(torch.randn(1, 77, 2048), torch.randn(1, 1280), {"width": 2048, "source": "cat"})
    t, m = d.to_safetensors()
    back = EditDirection.from_safetensors(t, m)
    assert torch.equal(back.delta, d.delta) and torch.equal(back.pooled, d.pooled) and back.meta == d.meta
    with pytest.raises(ValueError, match="not a Z2I edit direction"):
        EditDirection.from_safetensors(t, {"format": "other"})


def test_template_bank_is_large_varied_and_deterministic():
    assert len(TEMPLATES) >= 60 and len(set(TEMPLATES)) == len(TEMPLATES)
    a = template_sentences("cat", 100, seed=3)
    assert a == template_sentences("cat", 100, seed=3) and a != template_sentences("cat", 100, seed=4)
    assert len(set(a[:len(TEMPLATES)])) == len(TEMPLATES)
    assert all("cat" in s for s in a)
    dogs = template_sentences("dog", 100, seed=3)
    assert [s.replace("dog", "cat") for s in dogs] == a      # paired banks: only the word differs
    assert with_article("owl") == "an owl" and with_article("cat") == "a cat" and with_article("the sun") == "the sun"
    with pytest.raises(ValueError):
        template_sentences("  ", 3)


def test_parse_sentences():
    assert parse_sentences("a cat\n\n  # comment\n a dog on a sofa \n") == ["a cat", "a dog on a sofa"]
