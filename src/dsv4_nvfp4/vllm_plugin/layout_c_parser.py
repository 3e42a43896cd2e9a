"""vLLM's ``hf`` config parser, subclassed: a layout-C DeepSeek V4 config comes back as layout B.

The config seam of :mod:`.layout_c` (its docstring says what and why). This module
subclasses vLLM's ``HFConfigParser`` at its top, so it imports vLLM there: it is
imported only by the post-import hook that :mod:`.registration` sets on
``vllm.transformers_utils.config``, i.e. once vLLM has imported that module itself.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import huggingface_hub
from transformers import PretrainedConfig
from vllm.transformers_utils.config import HFConfigParser

from dsv4_nvfp4.vllm_plugin.layout_c import (
    CONFIG_FORMAT,
    deepseek_v4_config_class,
    is_layout_c_config,
    is_mtp_draft,
    layout_b_view,
    logger,
    mtp_refusal,
)


class Dsv4Nvfp4ConfigParser(HFConfigParser):
    """vLLM's HF config parser; a layout-C DeepSeek V4 config comes back as layout B."""

    def parse(self, model: str | Path, trust_remote_code: bool, revision: str | None = None,
              code_revision: str | None = None, **kwargs: Any
              ) -> tuple[dict[str, Any], Any]:
        read_kwargs = {k: v for k, v in kwargs.items()
                       if k not in ("hf_overrides", "trust_remote_code")}
        read_kwargs["local_files_only"] = huggingface_hub.constants.HF_HUB_OFFLINE
        config_dict, _ = PretrainedConfig.get_config_dict(
            model, revision=revision, code_revision=code_revision, **read_kwargs)
        if not is_layout_c_config(config_dict):
            return super().parse(model, trust_remote_code, revision, code_revision, **kwargs)
        if is_mtp_draft(kwargs.get("hf_overrides")):
            raise ValueError(mtp_refusal(str(model)))
        b_config = layout_b_view(config_dict)
        # from_dict keeps (and transformers' rope validation edits) the dicts it is given
        config = deepseek_v4_config_class().from_dict(copy.deepcopy(b_config),
                                                      name_or_path=str(model))
        logger.info("dsv4_nvfp4: %s is layout C (ModelOpt full-NVFP4 export); vLLM serves it "
                    "as layout B, converting each module as it loads (no MTP layer)", model)
        return b_config, config


def register_parser(module: Any) -> None:
    """Post-import hook body for ``vllm.transformers_utils.config``: ours becomes ``hf``."""
    module.register_config_parser(CONFIG_FORMAT)(Dsv4Nvfp4ConfigParser)
