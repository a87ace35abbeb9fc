"""Parameter-name tables for original ControlNet files (``control_model.*``) <-> diffusers' ControlNetModel.

The original ControlNet (lllyasviel/ControlNet, ``cldm.py``) is the LDM U-Net's encoder with three extras,
so the tables are the U-Net's input/middle rows from ``keymaps.unet_module_table`` plus:

- ``input_hint_block``: an ``nn.Sequential`` of convs with a SiLU after each but the last, so the convs sit
  at the even indices: ``.0`` is diffusers' ``controlnet_cond_embedding.conv_in``, ``.2``, ``.4``, ... are
  ``blocks.0``, ``blocks.1``, ... and the last even index (``.14`` for the usual 4 levels) is ``conv_out``;
- ``zero_convs.{i}.0``: one zero-initialised 1x1 conv per skip connection = ``controlnet_down_blocks.{i}``;
- ``middle_block_out.0`` = ``controlnet_mid_block``.

Facts from diffusers' ``convert_controlnet_checkpoint`` (single_file_utils) and ``cldm.py``; the table is
ours. Files come with the ``control_model.`` prefix (``control_v11p_sd15_canny.pth``/``.safetensors``) or
without it (thibaud/controlnet-sd21): both are accepted.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .keymaps import ModuleTable, StateDict, UNetLayout, rename_keys, unet_module_table

CONTROL_PREFIX = "control_model."


def controlnet_module_table(layout: UNetLayout, hint_levels: int, *, sdxl: bool = False) -> ModuleTable:
    """(original prefix, diffusers prefix, suffix-table kind) rows for a ControlNet of this layout.

    ``hint_levels``: entries of ``conditioning_embedding_out_channels`` (4 in every released ControlNet).
    ``sdxl``: the ControlNet has SDXL's added-conditioning MLP (``label_emb.0.*`` = ``add_embedding.*``).
    """
    encoder_rows = [
        row
        for row in unet_module_table(layout)
        if not row[0].startswith(("output_blocks.", "out."))  # a ControlNet has no decoder half
    ]
    n_blocks = 2 * (hint_levels - 1)  # a same-size conv and a stride-2 conv per level after the first
    hint_rows = [("input_hint_block.0", "controlnet_cond_embedding.conv_in", "plain")]
    hint_rows += [
        (f"input_hint_block.{2 * (k + 1)}", f"controlnet_cond_embedding.blocks.{k}", "plain") for k in range(n_blocks)
    ]
    hint_rows.append((f"input_hint_block.{2 * (n_blocks + 1)}", "controlnet_cond_embedding.conv_out", "plain"))
    n_skips = 1 + layout.num_levels * layout.layers_per_block + (layout.num_levels - 1)
    zero_rows = [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", "plain") for i in range(n_skips)]
    rows = [*encoder_rows, *hint_rows, *zero_rows, ("middle_block_out.0", "controlnet_mid_block", "plain")]
    if sdxl:
        from .sdxl_files import ADD_EMBEDDING_ROWS

        rows += ADD_EMBEDDING_ROWS
    return rows


def strip_prefix(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop ``control_model.`` where present (files are published both ways)."""
    return {k.removeprefix(CONTROL_PREFIX): v for k, v in sd.items()}


def controlnet_original_to_diffusers(
    sd: Mapping[str, torch.Tensor], layout: UNetLayout, hint_levels: int, *, sdxl: bool = False
) -> tuple[StateDict, list[str]]:
    """Original names (prefix removed) -> diffusers ControlNetModel names (+ keys that matched no row)."""
    return rename_keys(sd, controlnet_module_table(layout, hint_levels, sdxl=sdxl), to_diffusers=True)


def controlnet_diffusers_to_original(
    sd: Mapping[str, torch.Tensor], layout: UNetLayout, hint_levels: int, *, sdxl: bool = False
) -> tuple[StateDict, list[str]]:
    """diffusers ControlNetModel names -> original names, without the ``control_model.`` prefix."""
    return rename_keys(sd, controlnet_module_table(layout, hint_levels, sdxl=sdxl), to_diffusers=False)
