"""Per-layer weights of the image attention (ComfyUI_IPAdapter_plus's weight types and its
per-block layer_weights). Plain Python, no ComfyUI import.

A layer is named by its index among the UNet's spatial transformers in execution order: input
blocks, middle block, output blocks (the host's `transformer_index`, which IPAdapter_plus's
tables use). SDXL has 11 (0-3 input, 4 middle, 5-10 output; every transformer block inside one
shares its index), SD1.5 has 16 (0-5 input, 6 middle, 7-15 output). InstantStyle's finding:
in SDXL, index 6 (output block 1, diffusers up_blocks.0.attentions.1) carries the style and
index 3 (input block 8, down_blocks.2.attentions.1) the composition.
The two "precise" types also turn the reference around on some layers (`reversed_layers`):
there the image-conditioned rows get no image attention and the unconditional rows read the
reference's image tokens instead of its "no image" ones, so guidance pushes the result away
from the reference in those layers (style transfer precise: away from its composition).
"""
import math

WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input",
                "weak output", "weak middle", "strong middle", "style transfer", "composition",
                "strong style transfer", "style and composition", "strong style and composition",
                "style transfer precise", "composition precise")
EXECUTION_ORDER = {"input": 0, "middle": 1, "output": 2}
WEAK = 0.2  # the factor of the weakened blocks
EASE_FLOOR = 0.05  # the ease curves run from this to 1

# {weight type: {family: {transformer index: factor}}}; an index left out gets no image attention.
_SD15_STYLE = {i: 1.0 for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
BLOCK_TABLES = {
    "style transfer": {"sdxl": {6: 1.0}, "sd15": _SD15_STYLE},
    "composition": {"sdxl": {3: 1.0}, "sd15": {4: 0.25, 5: 1.0}},
    "strong style transfer": {"sdxl": {i: 1.0 for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)},
                              "sd15": {i: 1.0 for i in (0, 1, 2, 3) + tuple(range(6, 16))}},
    "style and composition": {"sdxl": {3: 1.0, 6: 1.0}, "sd15": {**_SD15_STYLE, 4: 0.25, 5: 1.0}},
    "strong style and composition": {"sdxl": {i: 1.0 for i in range(11)},
                                     "sd15": {i: 1.0 for i in range(16)}},
    "style transfer precise": {"sdxl": {3: 1.0, 6: 1.0}, "sd15": {**_SD15_STYLE, 4: 0.25, 5: 1.0}},
    "composition precise": {"sdxl": {**{i: 0.1 for i in range(11)}, 3: 1.0, 6: 1.0},
                            "sd15": {**{i: 1.0 for i in range(16)}, 4: 0.25, 6: 0.1, 7: 0.1,
                                     8: 0.1}},
}
# {precise weight type: {family: the composition layers}}: style transfer precise reverses the
# reference on them, composition precise on every other layer.
COMPOSITION_LAYERS = {"sdxl": (3,), "sd15": (4, 5)}
PRECISE = ("style transfer precise", "composition precise")
WEAK_SECTIONS = {"weak input": ("input",), "weak output": ("output",), "weak middle": ("middle",),
                 "strong middle": ("input", "output")}


def transformer_indices(locations):
    """{location: its spatial transformer's index in execution order} for ComfyUI attention
    locations (block_name, block_id, transformer_index)."""
    blocks = sorted({(loc[0], loc[1]) for loc in locations},
                    key=lambda block: (EXECUTION_ORDER[block[0]], block[1]))
    return {tuple(loc): blocks.index((loc[0], loc[1])) for loc in locations}


def parse_block_weights(text):
    """'3:1.0, 6:0.8' -> {3: 1.0, 6: 0.8}; a clear error for anything else."""
    weights = {}
    for item in (part.strip() for part in text.replace("\n", ",").split(",")):
        if not item:
            continue
        try:
            index, value = (s.strip() for s in item.split(":"))
            index, value = int(index), float(value)
        except ValueError:
            raise ValueError(f"block_weights: {item!r} is not 'index:weight'; write e.g. "
                             "'3:1.0, 6:0.8' (index of the spatial transformer: SDXL 0-10, "
                             "SD1.5 0-15)") from None
        if index < 0 or not math.isfinite(value):
            raise ValueError(f"block_weights: {item!r} needs an index >= 0 and a finite weight")
        weights[index] = value
    return weights


def layer_factors(locations, weight_type="linear", family="sdxl", block_weights=""):
    """{location: factor of the image attention's strength there}, for every location.
    `block_weights` ('index:weight, ...'), when given, replaces the weight type: listed
    indices get their weight, the others none."""
    indices = transformer_indices(locations)
    if block_weights.strip():
        table = parse_block_weights(block_weights)
        known = set(indices.values())
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"block_weights: index {unknown} is not a spatial transformer of this "
                             f"model (it has 0-{max(known)})")
        return {loc: table.get(i, 0.0) for loc, i in indices.items()}
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type: {weight_type!r} is not one of {WEIGHT_TYPES}")
    if weight_type in BLOCK_TABLES:
        table = BLOCK_TABLES[weight_type][family]
        return {loc: table.get(i, 0.0) for loc, i in indices.items()}
    count = len(set(indices.values()))  # 11 for SDXL, 16 for SD1.5
    half = count / 2
    curves = {"linear": lambda t: 1.0,
              "ease in": lambda t: EASE_FLOOR + (1 - EASE_FLOOR) * (1 - t / count),
              "ease out": lambda t: EASE_FLOOR + (1 - EASE_FLOOR) * (t / count),
              "ease in-out": lambda t: EASE_FLOOR + (1 - EASE_FLOOR) * (1 - abs(t - half) / half),
              "reverse in-out": lambda t: EASE_FLOOR + (1 - EASE_FLOOR) * (abs(t - half) / half)}
    if weight_type in curves:
        return {loc: curves[weight_type](i) for loc, i in indices.items()}
    weak = WEAK_SECTIONS[weight_type]
    return {loc: WEAK if loc[0] in weak else 1.0 for loc in indices}


def reversed_layers(locations, weight_type="linear", family="sdxl"):
    """The locations where a precise weight type turns the reference around (module docstring);
    empty for every other type. block_weights leave it as the type says."""
    if weight_type not in PRECISE:
        return frozenset()
    composition = COMPOSITION_LAYERS[family]
    on_composition = weight_type == "style transfer precise"
    return frozenset(loc for loc, i in transformer_indices(locations).items()
                     if (i in composition) == on_composition)
