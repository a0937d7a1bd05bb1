"""Layer 2 — naming schemes: `mappings/*.toml`, checked against their schema, loaded into frozen rule objects.

template  name templates and layer-index arithmetic     sizes     config arithmetic (`num_attention_heads*head_dim`)
schema    the checks every key passes (`key`, `build`)  rules     the rule classes and `Scheme` (also the schema)
toml_lines  line numbers for errors                     loader    the schemes present; CLI choices, detection
renamer   module lists renamed by the tensors' rules    scales    the scale tensors' leaf names
"""

from nemoconv.schemes.loader import (
    get_scheme,
    load_schemes,
    mappings_dir,
    quantize_outputs,
    read_scheme,
    scheme_names,
)
from nemoconv.schemes.rules import Scheme
from nemoconv.schemes.sizes import config_product

__all__ = ["Scheme", "config_product", "get_scheme", "load_schemes", "mappings_dir", "quantize_outputs",
           "read_scheme", "scheme_names"]
