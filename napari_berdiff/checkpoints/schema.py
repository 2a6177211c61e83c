"""The schema of our checkpoint description, checked before anything is built from it.

A checkpoint's metadata is data from a file: every field is checked for its type and for
bounds that no real model comes near (:data:`LIMITS`), so that a damaged or hostile document
is refused at once, by field name, instead of building a list of 10⁹ timesteps or a network
of 10⁶ blocks. :func:`validate_description` then builds the (cheap, frozen) configs, whose
own checks cover the relations between fields, and :func:`check_network_size` refuses a
network whose parameters would not fit in memory.

Absent fields take the config dataclasses' defaults; the schema only checks what is present.
Top-level sections this version does not know (``sampling_tuned``, ``refiner`` …) are kept
as they are; the ``data`` section may carry extra keys (``dataset``); the ``network`` and
``diffusion`` sections may not, since they are rebuilt field for field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import CheckpointError

__all__ = ["LIMITS", "MAX_PARAMETERS", "validate_description", "check_network_size",
           "available_memory_bytes"]

#: Bounds on the description's numbers: far above any real model, far below trouble.
LIMITS = {
    "timesteps": 100_000,
    "levels": 8,  # entries of channel_mult / attention_resolutions
    "mult": 16,  # one channel_mult entry
    "width": 2048,  # model_channels, encoder_channels, full_res_head
    "blocks": 16,  # num_res_blocks, encoder_blocks
    "channels": 64,  # image / mask / output channels
    "image_size": 16_384,
    "heads": 64,
    "norm_groups": 64,
    "unshuffle": 16,
    "readers": 1024,
    "temperature": 1000.0,
    "text": 100_000,  # characters of a string field
}
#: More parameters than this (32 GB as float32) is refused whatever the machine.
MAX_PARAMETERS = 8_000_000_000

_Strict = ConfigDict(strict=True, extra="forbid")
_L = LIMITS

Width = Annotated[int, Field(ge=1, le=_L["width"])]
Blocks = Annotated[int, Field(ge=1, le=_L["blocks"])]
Channels = Annotated[int, Field(ge=1, le=_L["channels"])]
ImageSize = Annotated[int, Field(ge=1, le=_L["image_size"])]
Heads = Annotated[int, Field(ge=1, le=_L["heads"])]
NormGroups = Annotated[int, Field(ge=1, le=_L["norm_groups"])]
Mult = Annotated[list[Annotated[int, Field(ge=1, le=_L["mult"])]],
                 Field(min_length=1, max_length=_L["levels"])]
Unit = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=_L["text"])]
Activation = Literal["sigmoid", "none"]


class _Section(BaseModel):
    model_config = _Strict


class UNetSection(_Section):
    """``network`` for ``type: "unet"`` (:class:`~napari_berdiff.networks.UNetConfig`)."""

    type: Literal["unet"]
    image_size: Optional[ImageSize] = None
    image_channels: Optional[Annotated[int, Field(ge=0, le=_L["channels"])]] = None
    mask_channels: Optional[Channels] = None
    out_channels: Optional[Channels] = None
    model_channels: Optional[Width] = None
    num_res_blocks: Optional[Blocks] = None
    attention_resolutions: Optional[Annotated[
        list[Annotated[int, Field(ge=1, le=2 ** (_L["levels"] - 1))]],
        Field(max_length=_L["levels"])]] = None
    dropout: Optional[Unit] = None
    channel_mult: Optional[Mult] = None
    num_heads: Optional[Heads] = None
    num_head_channels: Optional[Annotated[int, Field(ge=-1, le=_L["width"])]] = None
    num_heads_upsample: Optional[Annotated[int, Field(ge=-1, le=_L["heads"])]] = None
    use_scale_shift_norm: Optional[bool] = None
    resblock_updown: Optional[bool] = None
    use_new_attention_order: Optional[bool] = None
    concat_order: Optional[Literal["mask_first", "image_first"]] = None
    output_activation: Optional[Activation] = None
    norm_groups: Optional[NormGroups] = None

    @model_validator(mode="after")
    def _no_zero_heads(self) -> "UNetSection":
        for name in ("num_head_channels", "num_heads_upsample"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be -1 (unset) or >= 1, got 0")
        return self


class CondOnceSection(_Section):
    """``network`` for ``type: "condition_once"`` (:class:`~napari_berdiff.networks.CondOnceConfig`)."""

    type: Literal["condition_once"]
    image_size: Optional[ImageSize] = None
    image_channels: Optional[Channels] = None
    mask_channels: Optional[Channels] = None
    out_channels: Optional[Channels] = None
    model_channels: Optional[Width] = None
    channel_mult: Optional[Mult] = None
    num_res_blocks: Optional[Blocks] = None
    encoder_channels: Optional[Width] = None
    encoder_blocks: Optional[Annotated[int, Field(ge=0, le=_L["blocks"])]] = None
    unshuffle: Optional[Annotated[int, Field(ge=1, le=_L["unshuffle"])]] = None
    full_res_head: Optional[Annotated[int, Field(ge=0, le=_L["width"])]] = None
    prior_head: Optional[bool] = None
    presence_head: Optional[bool] = None
    readers: Optional[Annotated[int, Field(ge=0, le=_L["readers"])]] = None
    self_condition: Optional[bool] = None
    norm_groups: Optional[NormGroups] = None
    dropout: Optional[Unit] = None
    output_activation: Optional[Activation] = None
    segmentor: Optional["CondOnceSection"] = None


CondOnceSection.model_rebuild()


class NCSNppSection(_Section):
    """``network`` for ``type: "ncsnpp_adagn"`` (:class:`~napari_berdiff.networks.NCSNppConfig`,
    the cDAL generator)."""

    type: Literal["ncsnpp_adagn"]
    image_size: Optional[ImageSize] = None
    image_channels: Optional[Channels] = None
    mask_channels: Optional[Channels] = None
    nf: Optional[Width] = None
    ch_mult: Optional[Mult] = None
    num_res_blocks: Optional[Blocks] = None
    attn_resolutions: Optional[Annotated[
        list[Annotated[int, Field(ge=1, le=_L["image_size"])]],
        Field(max_length=_L["levels"])]] = None
    nz: Optional[Width] = None
    z_emb_dim: Optional[Width] = None
    n_mlp: Optional[Blocks] = None
    cond_enc_layers: Optional[Blocks] = None
    cond_enc_num_res_blocks: Optional[Blocks] = None
    fir_kernel: Optional[Annotated[list[Annotated[int, Field(ge=0, le=64)]],
                                   Field(min_length=1, max_length=8)]] = None
    skip_rescale: Optional[bool] = None
    centered: Optional[bool] = None
    use_tanh: Optional[bool] = None
    dropout: Optional[Unit] = None
    unshuffle: Optional[Annotated[int, Field(ge=1, le=_L["unshuffle"])]] = None


class DiffusionSection(_Section):
    """``diffusion`` (:class:`~napari_berdiff.diffusion.DiffusionConfig`)."""

    kind: Optional[Literal["bernoulli", "gaussian", "cdal"]] = None
    timesteps: Optional[Annotated[int, Field(ge=1, le=_L["timesteps"])]] = None
    schedule: Optional[Literal["cosine", "linear", "alpha_bar_linear", "vp"]] = None
    prediction: Optional[Literal["eps", "x0"]] = None
    learn_sigma: Optional[bool] = None
    default_steps: Optional[Union[Annotated[int, Field(ge=1, le=_L["timesteps"])],
                                  Annotated[str, Field(min_length=1, max_length=64)]]] = None
    sampler: Optional[Literal["ddim", "ddpm"]] = None
    draw_correlation: Optional[Annotated[float, Field(ge=0.0, le=1.0,
                                                      allow_inf_nan=False)]] = None
    temperature: Optional[Annotated[float, Field(gt=0.0, le=_L["temperature"],
                                                 allow_inf_nan=False)]] = None
    inverted_masks: Optional[bool] = None
    presence_draw: Optional[Literal["independent", "stratified"]] = None
    latent_draw: Optional[Literal["independent", "stratified"]] = None
    presence_temperature: Optional[Annotated[float, Field(gt=0.0, le=_L["temperature"],
                                                          allow_inf_nan=False)]] = None


Finite = Annotated[float, Field(allow_inf_nan=False)]


class NormalisationSection(_Section):
    """``data.normalisation``: how images are scaled before the network sees them."""

    mode: Literal["minmax", "unit", "fixed", "zscore", "standardise", "none"] = "minmax"
    min: Optional[Finite] = None
    max: Optional[Finite] = None
    mean: Optional[Annotated[list[Finite], Field(min_length=1, max_length=_L["channels"])]] = None
    std: Optional[Annotated[list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]],
                            Field(min_length=1, max_length=_L["channels"])]] = None
    range: Optional[Annotated[list[Finite], Field(min_length=2, max_length=2)]] = None

    @model_validator(mode="after")
    def _fixed_range(self) -> "NormalisationSection":
        if self.mode == "standardise" and (self.mean is None or self.std is None
                                           or len(self.mean) != len(self.std)):
            raise ValueError("mode 'standardise' needs mean and std lists of one length")
        if self.mode == "fixed":
            if self.min is None or self.max is None:
                raise ValueError("mode 'fixed' needs both min and max")
            if not self.max > self.min:
                raise ValueError(f"mode 'fixed' needs max > min, got min={self.min}, "
                                 f"max={self.max}")
            if not math.isfinite(self.max - self.min):
                raise ValueError(f"the range max - min overflows: min={self.min}, "
                                 f"max={self.max}")
        return self


class DataSection(BaseModel):
    """``data``: what the model was trained on (extra keys such as ``dataset`` allowed)."""

    model_config = ConfigDict(strict=True, extra="allow")
    image_size: Optional[ImageSize] = None
    image_channels: Optional[Annotated[int, Field(ge=0, le=_L["channels"])]] = None
    normalisation: Optional[NormalisationSection] = None
    spacing: Optional[Annotated[list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]],
                                Field(max_length=4)]] = None
    description: Optional[Text] = None


class Description(BaseModel):
    """The whole ``metadata["napari_berdiff"]`` document."""

    model_config = ConfigDict(strict=True, extra="allow")
    format: Literal["napari-berdiff/1"]
    kind: Optional[Literal["bernoulli", "gaussian", "cdal", "refiner", "segmentor"]] = None
    name: Optional[Text] = None
    preset: Optional[Text] = None
    source_file: Optional[Text] = None
    network: Annotated[Union[UNetSection, CondOnceSection, NCSNppSection],
                       Field(discriminator="type")]
    diffusion: DiffusionSection
    data: Optional[DataSection] = None
    training: Optional[dict[str, Any]] = None
    metrics: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _kinds_agree(self) -> "Description":
        dk = self.diffusion.kind
        if self.kind in ("bernoulli", "gaussian", "cdal") and dk is not None and dk != self.kind:
            raise ValueError(f"kind {self.kind!r} contradicts diffusion.kind {dk!r}")
        return self


def _where(loc: tuple[Any, ...]) -> str:
    # Drop pydantic's union tags ('int', 'str', 'unet' …) that are not field names.
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in _UNION_TAGS)]
    return ".".join(parts) or "(document)"


_UNION_TAGS = {"unet", "condition_once", "ncsnpp_adagn", "int", "str", "constrained-int",
               "constrained-str"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_error(name: str, err: ValidationError) -> CheckpointError:
    lines = []
    for e in err.errors(include_url=False)[:6]:
        loc, value = tuple(e.get("loc", ())), e.get("input")
        if e.get("type", "").startswith("union_tag"):  # the network's type is unknown
            loc, value = (*loc, "type"), (e.get("ctx") or {}).get("tag")
        where = _where(loc)
        quiet = e.get("type") in ("missing", "union_tag_not_found") or isinstance(value, dict)
        shown = "" if quiet else f" = {_short(value)}"
        lines.append(f"{where}{shown}: {e.get('msg')}")
    more = err.error_count() - len(lines)
    if more > 0:
        lines.append(f"… and {more} more problem(s)")
    return CheckpointError(
        f"{name}: its napari_berdiff metadata is invalid, so no model was built from it:\n  "
        + "\n  ".join(lines)
        + "\n  The file was damaged or edited; use an unmodified copy."
    )


def validate_description(doc: Any, path: str | Path) -> dict[str, Any]:
    """Check the whole description against the schema and the config classes.

    Returns ``doc`` unchanged. Nothing large is allocated: every number is bounded before
    any config object is made, and no network is built here.

    Raises
    ------
    CheckpointError
        Naming each bad field, its value and what was expected.
    """
    name = Path(path).name
    try:
        Description.model_validate(doc)
    except ValidationError as e:
        raise _schema_error(name, e) from None
    from ..diffusion import DiffusionConfig
    from ..networks.registry import network_config_from_metadata

    for section, build in (("network", network_config_from_metadata),
                           ("diffusion", DiffusionConfig.from_dict)):
        try:
            build(doc[section])
        except (TypeError, ValueError, ArithmeticError) as e:
            raise CheckpointError(f"{name}: its metadata's {section} section is invalid: {e}. "
                                  "The file was damaged or edited; use an unmodified "
                                  "copy.") from None
    return doc


def available_memory_bytes() -> int:
    """Memory this process can still take on this machine (psutil's ``available``)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil or no /proc: assume the physical size
        import os

        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_network_size(net: Any, path: str | Path) -> int:
    """Refuse a (meta-built) network whose weights could not be held; returns its parameter
    count. The count comes from the config's shapes, no memory is allocated."""
    name = Path(path).name
    count = sum(p.numel() for p in net.parameters())
    need = 4 * count
    limit = min(4 * MAX_PARAMETERS, int(0.8 * available_memory_bytes()))
    if need > limit:
        cfg = getattr(net, "config", None)
        fields = ", ".join(f"{k}={getattr(cfg, k)}" for k in
                           ("model_channels", "channel_mult", "num_res_blocks",
                            "encoder_channels") if hasattr(cfg, k))
        raise CheckpointError(
            f"{name}: its network description asks for {count:,} parameters "
            f"({need / 2**30:.1f} GiB as float32), more than this machine can hold "
            f"({limit / 2**30:.1f} GiB); network fields: {fields}. Refusing to build it."
        )
    return count
