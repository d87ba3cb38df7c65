"""Interop with other frameworks' checkpoints (Hugging Face Llama)."""
from effjax.interop.hf_llama import (config_from_hf, from_hf_model, hf_config_dict, load_hf_dir,
                                     params_from_state_dict, read_hf_config, save_hf_dir,
                                     state_dict_from_params, to_hf_model)

__all__ = ["config_from_hf", "from_hf_model", "hf_config_dict", "load_hf_dir",
           "params_from_state_dict", "read_hf_config", "save_hf_dir", "state_dict_from_params",
           "to_hf_model"]
