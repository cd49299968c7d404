"""Tests of gres.model.text: official tokens and BERT features, MiniLM offline, masks, freezing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from gres.config import TextConfig
from gres.model.text import (
    TextEncoder,
    build_text_encoder,
    build_tokenizer,
    convert_text_mask,
    freeze_text_layers,
    tokenize,
    validate_tokens,
)

from official_vectors import VECTORS, needs_vectors  # noqa: E402


def small_cfg(**kw) -> TextConfig:
    args = dict(
        name_or_path=None,
        hidden_size=32,
        num_layers=12,
        num_heads=2,
        intermediate_size=40,
        vocab_size=100,
        max_position_embeddings=24,
    )
    args.update(kw)
    return TextConfig(**args)


# --------------------------------------------------------------------------------------------------
# Official vectors
# --------------------------------------------------------------------------------------------------
@needs_vectors
def test_tokenize_reproduces_official_tokens():
    inputs = np.load(VECTORS / "inputs.npz")
    tokenizer = build_tokenizer(str(VECTORS / "vocab.txt"))
    ids, mask = tokenize(tokenizer, [str(s) for s in inputs["sentences"]])
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(ids, torch.from_numpy(inputs["lang_tokens"]))
    assert torch.equal(mask, torch.from_numpy(inputs["lang_mask"]).bool())
    # sample 1 has 26 tokens before truncation: hard cut, its [SEP] (id 3) is lost
    assert int(inputs["num_tokens_before_truncation"][1]) > 20
    assert mask[1].all() and 3 not in ids[1].tolist()


@needs_vectors
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_reproduces_official_hidden_state(attn):
    from safetensors.torch import load_file

    bert_config = json.loads((VECTORS / "official_config.json").read_text())["text"]["bert_config"]
    encoder = TextEncoder.from_config(bert_config, attn_implementation=attn).eval()
    sd = load_file(str(VECTORS / "state_dict.safetensors"))
    text_sd = {k[len("text_encoder.") :]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    encoder.bert.load_state_dict(text_sd, strict=True)  # official keys = ours under .bert
    assert {f"bert.{k}" for k in text_sd} == set(encoder.state_dict())

    inputs, outputs = np.load(VECTORS / "inputs.npz"), np.load(VECTORS / "outputs.npz")
    ids = torch.from_numpy(inputs["lang_tokens"])
    mask = torch.from_numpy(inputs["lang_mask"]).bool()
    with torch.no_grad():
        hidden = encoder(ids, mask)
    ref = torch.from_numpy(outputs["text_last_hidden_state"])
    assert hidden.shape == ref.shape == (2, 20, 768)
    assert float((hidden - ref).abs().max() / ref.abs().max()) <= 1e-4


# --------------------------------------------------------------------------------------------------
# Packaged MiniLM and hub names
# --------------------------------------------------------------------------------------------------
def test_minilm_loads_offline():
    encoder = build_text_encoder(TextConfig(name_or_path="minilm")).eval()
    tokenizer = build_tokenizer("minilm")
    assert encoder.hidden_size == 384 and encoder.num_layers == 6
    assert encoder.bert.pooler is None
    assert not any(k.startswith("bert.pooler") for k in encoder.state_dict())
    ids, mask = tokenize(tokenizer, ["the red circle", "two dogs on the left of the bench"])
    assert ids[0, :5].tolist() == [101, 1996, 2417, 4418, 102]  # bert-base-uncased ids
    with torch.no_grad():
        hidden = encoder(ids, mask)
    assert hidden.shape == (2, 20, 384) and torch.isfinite(hidden).all()


def test_unavailable_hub_name_gives_clear_error():
    with pytest.raises(FileNotFoundError, match="minilm"):
        TextEncoder.from_pretrained("gres-no-such-org/no-such-bert")
    with pytest.raises(FileNotFoundError, match="local folder"):
        build_tokenizer("gres-no-such-org/no-such-bert")


def test_local_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    encoder = build_text_encoder(small_cfg(num_layers=2)).eval()
    encoder.bert.save_pretrained(tmp_path)
    loaded = TextEncoder.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(encoder(ids, mask), loaded(ids, mask), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Tokenisation rule and masks
# --------------------------------------------------------------------------------------------------
def test_tokenize_truncates_and_pads():
    tokenizer = build_tokenizer("minilm")
    long = (
        "the tall man in the blue shirt standing right next to the old woman holding a very "
        "large red umbrella"
    )
    ids, mask = tokenize(tokenizer, [long, "dog"], max_tokens=20)
    full = tokenizer.encode(long, add_special_tokens=True)
    assert len(full) > 20
    assert ids[0].tolist() == full[:20] and mask[0].all()  # hard cut: no [SEP] at the end
    assert ids[0, -1].item() != tokenizer.sep_token_id
    assert ids[1, :3].tolist() == [101, 3899, 102]
    assert ids[1, 3:].eq(0).all() and mask[1].tolist() == [True] * 3 + [False] * 17
    single_ids, single_mask = tokenize(tokenizer, "dog", max_tokens=5)
    assert single_ids.shape == (1, 5) and single_mask.sum() == 3


def test_convert_text_mask_conventions():
    text_mask = torch.tensor([[True, True, False], [True, False, False]])
    hf = convert_text_mask(text_mask, "hf")
    assert hf.dtype == torch.int64 and hf.tolist() == [[1, 1, 0], [1, 0, 0]]
    kpm = convert_text_mask(text_mask, "key_padding")
    assert kpm.tolist() == [[False, False, True], [False, True, True]]
    # key_padding_mask semantics: MHA with padding ignored == MHA on the real keys only
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q, kv = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        masked, _ = mha(q, kv, kv, key_padding_mask=kpm)
        first, _ = mha(q[1:], kv[1:, :1], kv[1:, :1])
    assert torch.allclose(masked[1:], first, atol=1e-6)
    with pytest.raises(ValueError, match="bool"):
        convert_text_mask(text_mask.long(), "hf")
    with pytest.raises(ValueError, match="unknown mask convention"):
        convert_text_mask(text_mask, "additive")


def test_padding_tokens_do_not_change_real_tokens():
    torch.manual_seed(0)
    encoder = build_text_encoder(small_cfg(num_layers=2)).eval()
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]])
    mask = ids.ne(0) | (torch.arange(6) == 0)
    other = ids.clone()
    other[0, 4:] = 57  # garbage ids in masked positions
    with torch.no_grad():
        a, b = encoder(ids, mask), encoder(other, mask)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_bad_tokens_raise():
    encoder = build_text_encoder(small_cfg(num_layers=1)).eval()
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="token id 100 .*max id 99"):
        encoder(torch.tensor([[2, 5, 100, 3]]), mask)
    with pytest.raises(ValueError, match="token id -1"):
        encoder(torch.tensor([[2, -1, 7, 3]]), mask)
    with pytest.raises(ValueError, match="empty expression"):
        encoder(torch.tensor([[2, 5, 6, 3]]), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        validate_tokens(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool), 10)
    with pytest.raises(ValueError, match="integer"):
        validate_tokens(torch.zeros(1, 4), mask, 10)


# --------------------------------------------------------------------------------------------------
# Random init and freezing
# --------------------------------------------------------------------------------------------------
def test_random_init_is_deterministic_and_poolerless():
    torch.manual_seed(3)
    a = build_text_encoder(small_cfg(num_layers=2))
    torch.manual_seed(3)
    b = build_text_encoder(small_cfg(num_layers=2))
    assert a.hidden_size == 32 and a.bert.pooler is None
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.bert.config._attn_implementation == "sdpa"
    eager = build_text_encoder(small_cfg(attn_implementation="eager"))
    assert eager.bert.config._attn_implementation == "eager"


def test_freeze_text_layers_follows_recipe():
    torch.manual_seed(0)
    encoder = build_text_encoder(small_cfg(num_layers=12))
    frozen = freeze_text_layers(encoder, frozen_from=10, freeze_embeddings=True)
    assert any(n.startswith("embeddings.") for n in frozen)
    assert {n.split(".")[2] for n in frozen if n.startswith("encoder.layer.")} == {"10", "11"}
    trainable = {n for n, p in encoder.bert.named_parameters() if p.requires_grad}
    assert {n.split(".")[2] for n in trainable} == {str(i) for i in range(10)}
    ids = torch.randint(5, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    encoder(ids, mask).square().mean().backward()
    layer0 = encoder.bert.encoder.layer[0].attention.self.query.weight
    assert layer0.grad is not None and layer0.grad.abs().sum() > 0
    assert encoder.bert.encoder.layer[11].output.dense.weight.grad is None
    assert encoder.bert.embeddings.word_embeddings.weight.grad is None
    # a 6-layer MiniLM-sized model: nothing but the embeddings is frozen at frozen_from=10
    small = build_text_encoder(small_cfg(num_layers=6))
    assert all(n.startswith("embeddings.") for n in freeze_text_layers(small))
    with pytest.raises(ValueError):
        freeze_text_layers(small, frozen_from=-1)
