"""The ``ggspeed.gg_init`` section: generalized-Gaussian (GG) weight initialization."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section

#: Parameter-name patterns (fnmatch, on the full parameter name) of layers that write into the
#: residual stream in common model families; a model's own ``output_layer_names()`` wins.
DEFAULT_OUTPUT_LAYERS: tuple[str, ...] = (
    "*.c_proj.weight",  # GPT-2 (attn.c_proj, mlp.c_proj)
    "*.o_proj.weight",  # Llama, Mistral, Qwen
    "*.down_proj.weight",
    "*.out_proj.weight",  # OPT, torch MultiheadAttention
    "*.fc2.weight",  # OPT
    "*.dense_4h_to_h.weight",  # GPT-NeoX, Megatron legacy
    "*.attention.dense.weight",
    "*.linear_proj.weight",  # megatron-core
    "*.linear_fc2.weight",
    "*.proj.weight",  # ggspeed nanogpt
    "*.fc_out.weight",
)


class GGInitConfig(Section):
    """Generalized-Gaussian weight initialization (GG Init)."""

    enabled: bool = Field(False, description="Initialize weights from a generalized Gaussian.")
    shape: float = Field(
        1.0,
        gt=0.05,
        le=5.0,
        description=(
            "GG shape nu in (0.05, 5]: 2 is Gaussian, 1 Laplacian. To align with trained-model "
            "statistics use the pooled_standardized shape that tools/fit_gg.py fits to a "
            "trained checkpoint."
        ),
    )
    rule: Literal["megatron", "lecun", "kaiming", "paper"] = Field(
        "megatron",
        description=(
            "Variance rule. megatron: a fixed std (Megatron's init_method_std); lecun: xi/fan "
            "with xi=1; kaiming: xi=2; paper: the method authors' own rule (every 2-D parameter "
            "incl. embeddings, n = shape[0], xi = 2, 1-D weights 1, biases 0)."
        ),
    )
    std: float | None = Field(
        None,
        gt=0.0,
        description="Standard deviation for rule 'megatron' (default 0.02); not used by other rules.",
    )
    xi: float | None = Field(
        None,
        gt=0.0,
        description=(
            "Variance numerator for lecun/kaiming/paper (Var = xi / n); default 1 (lecun) or 2 "
            "(kaiming, paper); 2/(1+k^2) for LeakyReLU slope k."
        ),
    )
    fan: Literal["in", "out"] = Field(
        "in",
        description=(
            "Fan used by lecun/kaiming: 'in' (inputs of the layer) or 'out' (fidelity with the "
            "authors' code on torch Linear, where shape[0] is the fan-out)."
        ),
    )
    output_layer_scaling: bool = Field(
        True,
        description=(
            "Scale the std of output projections (attention out, MLP down) by 1/sqrt(2 * "
            "num_layers), as Megatron's scaled_init_method_normal."
        ),
    )
    num_layers: int | None = Field(
        None,
        ge=1,
        description=(
            "Transformer layers for output_layer_scaling; default: read from the model "
            "(cfg.n_layer, config.num_hidden_layers, ...)."
        ),
    )
    output_layers: list[str] | None = Field(
        None,
        description=(
            "fnmatch patterns of parameter names scaled as output projections; default: the "
            "model's output_layer_names() if it has one, else common names (c_proj, o_proj, "
            "down_proj, out_proj, fc2, dense_4h_to_h, linear_proj, linear_fc2, proj, fc_out)."
        ),
    )
    embeddings: Literal["gg", "gaussian", "untouched"] = Field(
        "gg",
        description=(
            "Embedding tables: GG like the other weights, Gaussian with the same std, or left "
            "as the model built them (rule 'paper' always uses GG)."
        ),
    )
    embedding_std: float | None = Field(
        None,
        gt=0.0,
        description=(
            "Std of embedding tables (Megatron's embedding_init_method_std); default: std for "
            "rule 'megatron', sqrt(xi / embedding_dim) for lecun/kaiming, the paper rule for paper."
        ),
    )
    seed: int | None = Field(
        None,
        ge=0,
        description=(
            "None: draw from the device's default generator, seeded by the caller as Megatron "
            "does (torch.manual_seed / model_parallel_cuda_manual_seed). An integer: each "
            "parameter draws from its own generator seeded by (seed, parameter name), so the "
            "weights do not depend on build order or on which layers a pipeline stage holds."
        ),
    )

    @model_validator(mode="after")
    def _rule_fields(self) -> GGInitConfig:
        if self.std is not None and self.rule != "megatron":
            raise ValueError(
                f"ggspeed.gg_init.std applies to rule 'megatron' only (rule is {self.rule!r}); "
                "use xi for lecun/kaiming/paper"
            )
        if self.xi is not None and self.rule == "megatron":
            raise ValueError(
                "ggspeed.gg_init.xi applies to rules lecun/kaiming/paper; rule 'megatron' takes std"
            )
        if self.rule == "paper" and self.fan != "in":
            raise ValueError(
                "ggspeed.gg_init.fan: rule 'paper' fixes n = shape[0]; leave fan unset"
            )
        return self

    @property
    def effective_std(self) -> float:
        """The std of rule 'megatron' (0.02 when not given)."""
        return 0.02 if self.std is None else self.std

    @property
    def effective_xi(self) -> float:
        """xi of the lecun/kaiming/paper rules."""
        if self.xi is not None:
            return self.xi
        return 1.0 if self.rule == "lecun" else 2.0
