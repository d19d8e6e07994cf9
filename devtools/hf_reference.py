"""HuggingFace transformers' PVT and PVT v2 (torch) made to compute the official PVT, for the benchmark and the
parity tests.

Two adjustments, both on the torch side where they are visible:
- HF uses one LayerNorm eps (1e-6) everywhere; the official code (whai362/PVT) uses 1e-5 in the patch-embedding and
  spatial-reduction norms (`set_official_norm_eps`).
- For the dense forward (stage maps), HF carries the cls token into the last stage and resizes position embeddings
  by reshaping the learned table to the target grid, which only works at the pretraining size. The official dense
  backbone has no cls token and resizes the learned grid bilinearly, align_corners=False
  (`as_official_dense_backbone`).
- PVT v2 (`PvtV2Model`) has neither, so only its eps differs (`official_dense_hf_v2_model`).
"""
import types

from pvt_dense.models.pvt_v2 import PVTv2Spec

NUM_CLASSES = 1000


def hf_pvt_config(spec, num_labels=NUM_CLASSES):
    """transformers.PvtConfig for a pvt_dense `PVTSpec` (HF's one eps for all norms; see `set_official_norm_eps`)."""
    import transformers
    return transformers.PvtConfig(
        image_size=spec.pretrain_size, num_channels=3, num_encoder_blocks=len(spec.depths),
        depths=list(spec.depths), sequence_reduction_ratios=list(spec.sr_ratios),
        hidden_sizes=list(spec.embed_dims), patch_sizes=list(spec.patch_sizes), strides=list(spec.patch_sizes),
        num_attention_heads=list(spec.num_heads), mlp_ratios=list(spec.mlp_ratios), hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, layer_norm_eps=1e-6,
        qkv_bias=True, num_labels=num_labels)


def set_official_norm_eps(pvt_model):
    """The official eps (1e-5) in the patch-embedding and spatial-reduction norms of an HF `PvtModel`."""
    for embedding in pvt_model.encoder.patch_embeddings:
        embedding.layer_norm.eps = 1e-5
    for stage in pvt_model.encoder.block:
        for layer in stage:
            attention = layer.attention.self
            if attention.sequences_reduction_ratio > 1:
                attention.layer_norm.eps = 1e-5
    return pvt_model


def _official_pos_resize(self, embeddings, height, width):
    import torch
    grid_h = self.image_size[0] // self.patch_size[0]
    grid_w = self.image_size[1] // self.patch_size[1]
    if (height, width) == (grid_h, grid_w):
        return embeddings
    grid = embeddings.reshape(1, grid_h, grid_w, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    return grid.reshape(1, -1, height * width).permute(0, 2, 1)


def as_official_dense_backbone(pvt_model):
    """An HF `PvtModel` changed in place to the official dense backbone: no cls token, and every stage's position
    embedding bilinearly resized from the pretraining grid."""
    import torch
    embeddings = pvt_model.encoder.patch_embeddings
    for embedding in embeddings:
        embedding.interpolate_pos_encoding = types.MethodType(_official_pos_resize, embedding)
    last = embeddings[-1]
    last.cls_token = None
    last.position_embeddings = torch.nn.Parameter(last.position_embeddings[:, 1:].clone())
    return pvt_model


def official_dense_hf_model(spec):
    """A fresh HF `PvtModel` (random weights) computing the official dense backbone of `spec`, in eval mode."""
    import transformers
    model = transformers.PvtModel(hf_pvt_config(spec))
    return as_official_dense_backbone(set_official_norm_eps(model)).eval()


def hf_pvt_v2_config(spec, num_labels=NUM_CLASSES):
    """transformers.PvtV2Config for a pvt_dense `PVTv2Spec` (HF's one eps; `set_official_v2_norm_eps` fixes it)."""
    import transformers
    return transformers.PvtV2Config(
        hidden_sizes=list(spec.embed_dims), depths=list(spec.depths), num_attention_heads=list(spec.num_heads),
        mlp_ratios=list(spec.mlp_ratios), sr_ratios=list(spec.sr_ratios), patch_sizes=list(spec.patch_sizes),
        strides=list(spec.patch_strides), linear_attention=spec.linear, qkv_bias=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0, layer_norm_eps=1e-6, num_labels=num_labels)


def set_official_v2_norm_eps(pvt_v2_model):
    """The official eps (1e-5) in the patch-embedding and spatial-reduction norms of an HF `PvtV2Model`."""
    for layer in pvt_v2_model.encoder.layers:
        layer.patch_embedding.layer_norm.eps = 1e-5
        for block in layer.blocks:
            if hasattr(block.attention, "layer_norm"):
                block.attention.layer_norm.eps = 1e-5
    return pvt_v2_model


def official_dense_hf_v2_model(spec):
    """A fresh HF `PvtV2Model` (random weights) computing the official PVT v2 backbone of `spec`, in eval mode; its
    forward computes all four stages (ask for `output_hidden_states` to get them)."""
    import transformers
    return set_official_v2_norm_eps(transformers.PvtV2Model(hf_pvt_v2_config(spec))).eval()


def hf_classifier(spec):
    """A fresh HF image classifier (PVT or PVT v2, by the spec's type) with random weights, in train mode."""
    import transformers
    if isinstance(spec, PVTv2Spec):
        return transformers.PvtV2ForImageClassification(hf_pvt_v2_config(spec)).train()
    return transformers.PvtForImageClassification(hf_pvt_config(spec)).train()


def official_dense_hf_backbone(spec):
    """The HF model computing the official dense backbone of `spec` (PVT or PVT v2), in eval mode."""
    if isinstance(spec, PVTv2Spec):
        return official_dense_hf_v2_model(spec)
    return official_dense_hf_model(spec)
