"""Visualisations: attention maps, MAE reconstructions, position-embedding similarity, attention
distance (`ssl-vit visualize`), and TensorBoard image summaries during training."""

from ssl_vit.viz.attention import (
    cls_attention_maps,
    layer_attentions,
    mean_attention_distance,
    patch_distances,
    threshold_mask,
)
from ssl_vit.viz.images import dataset_images, load_image, to_pixels
from ssl_vit.viz.pos_embed import patch_pos_embed, pos_embed_similarity
from ssl_vit.viz.reconstruction import PANELS, load_mae, mae_panels
from ssl_vit.viz.segmentation import palette, segmentation_grid, segmentation_picture
from ssl_vit.viz.tensorboard import tensorboard_images

__all__ = [
    "PANELS",
    "cls_attention_maps",
    "dataset_images",
    "layer_attentions",
    "load_image",
    "load_mae",
    "mae_panels",
    "mean_attention_distance",
    "patch_distances",
    "patch_pos_embed",
    "palette",
    "pos_embed_similarity",
    "segmentation_grid",
    "segmentation_picture",
    "tensorboard_images",
    "threshold_mask",
    "to_pixels",
]
