"""Which of a reference's image tokens a routed row reads, when they are not all read together
everywhere (plain torch, no ComfyUI import):
  * one view per batch image (IPAdapter Batch): the row of batch image f reads view f's tokens;
  * tiles on their own regions (IPAdapter Tiled): tile j's tokens (of every view) form a group
    of their own, acting where tile j lies.
Tokens run view after view and, inside a view, tile after tile, `span` tokens each.
"""
import torch

from .routing import RoutingInputError, region_weights


def view_of_each_image(ip_k, ip_v, counts, spans, frames, numbers):
    """Keys and values (rows, N, n, C) where a reference with spans[i] tokens per view (None =
    every row reads all its tokens) holds, in each row, only the view of that row's batch image
    frames[row] (a reference of one view serves every image). numbers: each reference's number
    for errors. Returns the keys, the values and the token counts."""
    if all(span is None for span in spans):
        return ip_k, ip_v, counts
    starts = []
    for number, span, count in zip(numbers, spans, counts):
        views = 1 if span is None else count // span
        if views > 1 and max(frames) >= views:
            raise RoutingInputError(f"references: reference {number} has {views} views, one per "
                                    f"batch image, for a batch with image {max(frames) + 1}; give "
                                    "one view per image (or one for all)")
        starts.append([0 if views == 1 else f * span for f in frames])
    counts = [count if span is None else span for span, count in zip(spans, counts)]
    index = torch.tensor(starts).T[:, :, None] + torch.arange(max(counts))
    index = index.clamp(max=ip_k.shape[2] - 1).to(ip_k.device)[..., None]
    take = lambda t: torch.gather(t, 2, index.expand(-1, -1, -1, t.shape[-1]))
    return take(ip_k), take(ip_v), counts


def tile_groups(counts, tiles, grid):
    """One token group per tile for references given as tiles[i] = (regions (K, h, w), span)
    (None = all its tokens one group, everywhere). Returns (the reference of each group,
    (groups, n) token positions inside the reference's tokens, padded with 0, (L, groups) where
    each group acts on the grid, token counts)."""
    groups, positions, columns = [], [], []
    for reference, (count, tiled) in enumerate(zip(counts, tiles)):
        if tiled is None:
            groups.append(reference)
            positions.append(list(range(count)))
            columns.append(torch.ones(grid[0] * grid[1]))
            continue
        regions, span = tiled
        on_grid = region_weights(regions, grid)
        for j in range(regions.shape[0]):
            groups.append(reference)
            positions.append([unit * span + p for unit in range(count // span)
                              if unit % regions.shape[0] == j for p in range(span)])
            columns.append(on_grid[:, j])
    sizes = [len(p) for p in positions]
    padded = torch.tensor([p + [0] * (max(sizes) - len(p)) for p in positions])
    return tuple(groups), padded, torch.stack(columns, dim=-1), sizes


def take_groups(tokens, groups, positions):
    """(rows, N, n, C) -> (rows, groups, n', C): each group's tokens of its reference."""
    slots = torch.tensor(groups, device=tokens.device)[:, None]
    return tokens[:, slots, positions.to(tokens.device)]


def mean_groups(counts, spans, tiles):
    """(N, T) the group of each token inside its reference, for embeds scaling's mean of the
    values (kernels.embeds): the tokens that act together, i.e. a view of a reference with
    spans[i] tokens per view (one per batch image), tile j of every view for tiles[i] = (K,
    tokens per tile) on their own regions, a tile of a view for both; None when every reference
    acts as one group."""
    if all(span is None for span in spans) and all(tile is None for tile in tiles):
        return None
    groups = torch.zeros(len(counts), max(counts), dtype=torch.long)
    for i, (span, tile) in enumerate(zip(spans, tiles)):
        token = torch.arange(max(counts))
        if tile is not None:
            tiles_per_view, per_tile = tile
            groups[i] = token // per_tile if span is not None else token // per_tile % tiles_per_view
        elif span is not None:
            groups[i] = token // span
    return groups
