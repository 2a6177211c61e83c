"""Named network configurations.

``berdiff-lidc-128`` and ``wolleb-brats-256`` rebuild the networks of the released official
models (BerDiff's LIDC model, Wolleb et al.'s BraTS model) so that their checkpoints load key
for key; ``cdal-lung-256``, ``cdal-monu-256`` and ``cdal-hippo-32`` rebuild cDAL's generators
(NCSN++ with adaptive group norm) from the official ``parameters_lung.json``,
``parameters_monu.json`` and the hippocampus training script. Their diffusion settings
(schedule, T, prediction mode) live with the diffusion configuration, not here.
"""

from __future__ import annotations

from typing import Any, Union

from .ncsnpp import NCSNppConfig, NCSNppGenerator
from .unet import ConditionalUNet, UNetConfig

__all__ = [
    "NETWORK_PRESETS",
    "get_network_preset",
    "build_network",
    "tiny_config",
    "official_attention_ds",
]


def official_attention_ds(
    image_size: int, attention_resolutions: str | int | tuple | list
) -> tuple[int, ...]:
    """Convert the official ``--attention_resolutions`` flag to downsample factors.

    The official scripts take feature-map resolutions (e.g. ``"16,8"``) and build the network
    with ``ds = image_size // res`` for each entry.  ``official_attention_ds(128, "16")`` is
    ``(8,)``.
    """
    if isinstance(attention_resolutions, str):
        items = [s for s in attention_resolutions.split(",") if s.strip()]
    elif isinstance(attention_resolutions, int):
        items = [attention_resolutions]
    else:
        items = list(attention_resolutions)
    return tuple(image_size // int(r) for r in items)


NETWORK_PRESETS: dict[str, UNetConfig | NCSNppConfig] = {
    # BerDiff (Chen et al., MICCAI 2023), released LIDC model "BerDiff_epsilon.pt":
    # image_size 128, num_channels 128, num_res_blocks 2, num_heads 1,
    # attention_resolutions "16" (→ ds 8), use_scale_shift_norm False, 1 image channel,
    # SegmentationModel: input cat([x_t, img]), sigmoid output.
    "berdiff-lidc-128": UNetConfig(
        image_size=128,
        image_channels=1,
        mask_channels=1,
        out_channels=1,
        model_channels=128,
        num_res_blocks=2,
        attention_resolutions=official_attention_ds(128, "16"),
        dropout=0.0,
        channel_mult=(1, 1, 2, 3, 4),
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        concat_order="mask_first",
        output_activation="sigmoid",
    ),
    # Wolleb et al. 2021 ("Diffusion models for implicit image segmentation ensembles"),
    # BraTS: image_size 256, num_channels 128, num_res_blocks 2, num_heads 1,
    # attention_resolutions "16" (→ ds 16), learn_sigma (out 2), use_scale_shift_norm False;
    # input cat([4 MR channels, x_t]) = 5 channels, raw output (ε, variance value).
    "wolleb-brats-256": UNetConfig(
        image_size=256,
        image_channels=4,
        mask_channels=1,
        out_channels=2,
        model_channels=128,
        num_res_blocks=2,
        attention_resolutions=official_attention_ds(256, "16"),
        dropout=0.0,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        concat_order="image_first",
        output_activation="none",
    ),
    # cDAL (Hejrati et al.), chest X-ray lungs, parameters_lung.json: num_channels_dae 32,
    # ch_mult (1,1,2,2,4,4), num_res_blocks 1, attn_resolutions (16,), cond_enc_layers 3 x
    # cond_enc_num_res_blocks 2, nz 100, z_emb_dim 256, n_mlp 3, 256 px, grey image.
    # Accepts 256x256 only: 456 tensors, 8,843,777 parameters.
    "cdal-lung-256": NCSNppConfig(
        image_size=256, image_channels=1, mask_channels=1, nf=32, ch_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=1, attn_resolutions=(16,), nz=100, z_emb_dim=256, n_mlp=3,
        cond_enc_layers=3, cond_enc_num_res_blocks=2,
    ),
    # cDAL, MoNuSeg nuclei, parameters_monu.json: num_channels_dae 64, ch_mult
    # (1,1,1,2,2,4,4), num_res_blocks 2, attn_resolutions (16, 8), cond_enc_layers 5 x 1,
    # nz 100, z_emb_dim 256, RGB image (3 channels). Accepts 256x256 only (the official
    # evaluation tiles 512x512 images into four 256x256 patches).
    "cdal-monu-256": NCSNppConfig(
        image_size=256, image_channels=3, mask_channels=1, nf=64,
        ch_mult=(1, 1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16, 8), nz=100,
        z_emb_dim=256, n_mlp=3, cond_enc_layers=5, cond_enc_num_res_blocks=1,
    ),
    # cDAL, hippocampus (Medical Segmentation Decathlon), train_cDAL_hippo.py defaults:
    # num_channels 3 (one-hot background / anterior / posterior), num_channels_dae 32,
    # ch_mult (1,2,2,2), num_res_blocks 1, attn_resolutions (16,), nz 50, z_emb_dim 128,
    # grey image. Accepts 32x32 only. (sampling_hippo.py's defaults differ: num_res_blocks 2.)
    "cdal-hippo-32": NCSNppConfig(
        image_size=32, image_channels=1, mask_channels=3, nf=32, ch_mult=(1, 2, 2, 2),
        num_res_blocks=1, attn_resolutions=(16,), nz=50, z_emb_dim=128, n_mlp=3,
        cond_enc_layers=3, cond_enc_num_res_blocks=2,
    ),
}


def tiny_config(**overrides: Any) -> UNetConfig:
    """A very small configuration for tests and smoke runs (16 px, two levels, 32/64 wide).

    Keyword arguments override any :class:`UNetConfig` field.
    """
    base = dict(
        image_size=16,
        image_channels=1,
        mask_channels=1,
        out_channels=1,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=(2,),
        dropout=0.0,
        channel_mult=(1, 2),
        num_heads=1,
        concat_order="mask_first",
        output_activation="sigmoid",
    )
    base.update(overrides)
    return UNetConfig(**base)


def get_network_preset(name: str) -> UNetConfig | NCSNppConfig:
    """The network configuration registered under ``name``."""
    try:
        return NETWORK_PRESETS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(NETWORK_PRESETS))
        raise ValueError(f"unknown network preset {name!r}; known presets: {known}") from None


def build_network(
    config_or_preset: Union[UNetConfig, NCSNppConfig, str, dict],
) -> ConditionalUNet | NCSNppGenerator:
    """Build a network from a config, a UNet config dict or a preset name."""
    if isinstance(config_or_preset, NCSNppConfig):
        return NCSNppGenerator(config_or_preset)
    if isinstance(config_or_preset, str):
        config = get_network_preset(config_or_preset)
        if isinstance(config, NCSNppConfig):
            return NCSNppGenerator(config)
    elif isinstance(config_or_preset, dict):
        config = UNetConfig.from_dict(config_or_preset)
    elif isinstance(config_or_preset, UNetConfig):
        config = config_or_preset
    else:
        raise TypeError(
            f"expected a UNetConfig, a dict or a preset name, got {type(config_or_preset).__name__}"
        )
    return ConditionalUNet(config)
