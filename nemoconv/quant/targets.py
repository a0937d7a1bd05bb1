"""Which linears get FP8: presets, --exclude globs, and mixer groups that must stay together.

Every weight-bearing module of the network (2-D linears, plus conv1d and the embedding, which ModelOpt
also lists) is classified by kind. A preset selects kinds; --exclude removes modules by glob; then each
mixer is made all-or-nothing, because MAX marks a layer FP8 when any of its projections has a
weight_scale and then reads all of them as FP8 (Mamba in/out, MLP up/down, MoE routed + shared experts).
Everything not quantized is covered by `exclude_modules` (quant.exclusions: short patterns in hf, exact names in max).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from nemoconv.errors import NemoconvError
from nemoconv.storage.config import ATTENTION, MAMBA, MLP, MOE, ModelSpec

# Kinds a preset may select; every other kind is never quantized.
QUANTIZABLE = ("mamba", "mlp", "moe")
PRESETS: dict[str, tuple[str, ...]] = {
    "conservative": ("mlp",),
    "default": ("mamba", "mlp"),
    "aggressive": ("mamba", "mlp", "moe"),
}
KIND_LABELS = {"mamba": "Mamba in_proj/out_proj", "mlp": "MLP up_proj/down_proj",
               "moe": "MoE routed + shared experts"}
WHY_NEVER = {
    "embedding": "embedding", "conv1d": "Mamba conv1d", "attention": "attention projection",
    "router": "MoE router gate", "latent": "MoE latent projection", "lm_head": "output head",
    "mtp": "MTP head",
}


@dataclass(frozen=True)
class Module:
    name: str                 # HF module name, e.g. backbone.layers.3.mixer.in_proj
    kind: str                 # a QUANTIZABLE kind, or a WHY_NEVER key
    layer: int | None = None  # main-network layer index

    @property
    def group(self) -> str:
        """The mixer whose quantized projections MAX reads together."""
        return self.name.rsplit(".mixer.", 1)[0] + ".mixer" if ".mixer." in self.name else self.name


@dataclass
class Exclusion:
    module: str                  # HF name
    reason: str                  # "preset" | "--exclude" | "pair" | "unscalable" (no valid FP8 scale)
    detail: str
    partner: str | None = None   # for "pair": the excluded module of the same mixer that took it along (HF name)


@dataclass
class TargetPlan:
    """The outcome of preset + globs + grouping, in HF module names (network order)."""

    preset: str
    modules: list[Module]                      # every weight-bearing module, network order
    quantized: list[str]
    excluded: list[Exclusion]                  # quantizable modules left in bf16, with the reason
    glob_notes: list[str] = field(default_factory=list)

    @property
    def unquantized(self) -> list[str]:
        """Every module that stays in its source dtype (the exclude_modules list, HF names)."""
        chosen = set(self.quantized)
        return [m.name for m in self.modules if m.name not in chosen]

    def kind_of(self, name: str) -> str:
        if not hasattr(self, "_kinds"):
            self._kinds = {m.name: m.kind for m in self.modules}
        return self._kinds[name]


def network_modules(spec: ModelSpec, hf_tensor_names: set[str]) -> list[Module]:
    """Weight-bearing modules in network order. MTP modules only where the checkpoint holds them."""
    mods = [Module("backbone.embeddings", "embedding")]
    for i, code in enumerate(spec.layer_codes):
        base = f"backbone.layers.{i}.mixer"
        if code == MAMBA:
            mods += [Module(f"{base}.in_proj", "mamba", i), Module(f"{base}.conv1d", "conv1d", i),
                     Module(f"{base}.out_proj", "mamba", i)]
        elif code == ATTENTION:
            mods += [Module(f"{base}.{p}", "attention", i) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        elif code == MLP:
            mods += [Module(f"{base}.up_proj", "mlp", i), Module(f"{base}.down_proj", "mlp", i)]
        elif code == MOE:
            mods.append(Module(f"{base}.gate", "router", i))
            if spec.moe_latent_size:
                mods.append(Module(f"{base}.fc1_latent_proj", "latent", i))
            for j in range(spec.n_routed_experts):
                mods += [Module(f"{base}.experts.{j}.up_proj", "moe", i),
                         Module(f"{base}.experts.{j}.down_proj", "moe", i)]
            mods += [Module(f"{base}.shared_experts.up_proj", "moe", i),
                     Module(f"{base}.shared_experts.down_proj", "moe", i)]
            if spec.moe_latent_size:
                mods.append(Module(f"{base}.fc2_latent_proj", "latent", i))
    mods.append(Module("lm_head", "lm_head"))
    for name, shape in spec.mtp_shapes().items():
        if name.endswith(".weight") and len(shape) >= 2 and name in hf_tensor_names:
            mods.append(Module(name[: -len(".weight")], "mtp"))
    return mods


def plan_targets(spec: ModelSpec, hf_tensor_names: set[str], preset: str, exclude: list[str],
                 output_name) -> TargetPlan:
    """Apply the preset, the --exclude globs (HF names or output-scheme names) and mixer grouping.

    `output_name(hf_module)` gives a module's name in the output scheme, for globs written that way."""
    if preset not in PRESETS:
        raise NemoconvError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    modules = network_modules(spec, hf_tensor_names)
    kinds = PRESETS[preset]
    names = {m.name: output_name(m.name) for m in modules}

    matched: dict[str, str] = {}   # module → the first glob that matched it
    notes = []
    for glob in exclude:
        if not isinstance(glob, str) or not glob.strip():
            raise NemoconvError("--exclude needs a non-empty glob (e.g. 'backbone.layers.3.mixer.*')")
        hits = [m for m in modules
                if fnmatch.fnmatchcase(m.name, glob) or fnmatch.fnmatchcase(names[m.name], glob)]
        if not hits:
            example = next(m.name for m in modules if m.kind in QUANTIZABLE) if any(
                m.kind in QUANTIZABLE for m in modules) else modules[0].name
            raise NemoconvError(f"--exclude {glob!r} matches no module of this network "
                                f"(module names look like {example!r})")
        if all(m.kind not in QUANTIZABLE for m in hits):
            notes.append(f"--exclude {glob!r} matches only modules that are never quantized")
        for m in hits:
            matched.setdefault(m.name, glob)

    selected: list[Module] = []
    excluded: list[Exclusion] = []
    for m in modules:
        if m.kind not in QUANTIZABLE:
            continue
        if m.kind not in kinds:
            excluded.append(Exclusion(m.name, "preset", f"the {preset} preset does not quantize "
                                                        f"{KIND_LABELS[m.kind]}"))
        elif m.name in matched:
            excluded.append(Exclusion(m.name, "--exclude", f"matches --exclude {matched[m.name]!r}"))
        else:
            selected.append(m)

    # A mixer is FP8 as a whole: a user exclusion inside it takes its partners along.
    by_user = {}
    for e in excluded:
        if e.reason == "--exclude":
            by_user.setdefault(_group(e.module), e.module)
    quantized = []
    for m in selected:
        trigger = by_user.get(m.group)
        if trigger is not None:
            excluded.append(Exclusion(m.name, "pair", f"kept with {trigger}: MAX reads a mixer's projections "
                                                      f"as FP8 together", trigger))
        else:
            quantized.append(m.name)
    order = {m.name: k for k, m in enumerate(modules)}
    excluded.sort(key=lambda e: order[e.module])
    return TargetPlan(preset, modules, quantized, excluded, notes)


def exclude_unscalable(plan: TargetPlan, problems: dict[str, str]) -> TargetPlan:
    """The plan without the linears FP8 cannot scale (`problems`: HF module → why), each taking its
    mixer's partners along (MAX reads a mixer's projections as FP8 together)."""
    trigger = {}
    for module in problems:
        trigger.setdefault(_group(module), module)
    quantized, excluded = [], list(plan.excluded)
    for name in plan.quantized:
        first = trigger.get(_group(name))
        if first is None:
            quantized.append(name)
        elif name in problems:
            excluded.append(Exclusion(name, "unscalable", problems[name]))
        else:
            excluded.append(Exclusion(name, "pair", f"kept with {first}: MAX reads a mixer's projections as FP8 "
                                                    f"together", first))
    order = {m.name: k for k, m in enumerate(plan.modules)}
    excluded.sort(key=lambda e: order[e.module])
    return TargetPlan(plan.preset, plan.modules, quantized, excluded, list(plan.glob_notes))


def _group(name: str) -> str:
    return Module(name, "").group
