"""Stage 2, analyze: find the cacheable units of a captured denoiser.

A *unit* is a set of graph nodes (its *region*) and the values that leave it (its
*outputs*: region nodes used by nodes outside the region). Reusing a unit at a step
means: every use of one of its outputs by a node outside the region reads a static
cache buffer instead, and whatever then has no live user is not run.

Two ways a region is found:

- **module units**, from ``node.meta["nn_module_stack"]``: every node recorded under a
  module path belongs to that module's region. U-Nets give ``down_blocks.i``,
  ``mid_block``, ``up_blocks.i``, ``*.resnets.j``, ``*.attentions.j``; transformers
  give their blocks and the blocks' attention and feed-forward sublayers, found by
  structure (:func:`_block_lists`: a module list whose elements hold an attention
  module; ``transformer_blocks.i`` in most families, ``blocks.i`` in Wan) and named by
  their module paths; SD-like U-Nets give both.
- **cut units**, from a value: the region is every node that only that value needs
  (its exclusive ancestors). DeepCache's ``skip_branch.m`` is the cut at the
  main-branch input of the up layer that concatenates skip connection m
  (0 = shallowest), so reusing it skips everything deeper. Flux's single-stream
  blocks get ``single_transformer_blocks.i.branch``: the cut at ``proj_out``, i.e. the
  whole residual branch (attention and MLP run in parallel and are mixed by
  ``proj_out``, so caching only ``attn`` would leave the largest matmul running).

Units only annotate: the graph is not changed here. Each node's units are recorded in
``node.meta["fxcache.units"]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..plan import BLOCK_KINDS, UnitInfo, parse_span
from .costs import annotate_flops, graph_cost

__all__ = ["Unit", "UnitSet", "find_units", "live_nodes"]


@dataclass
class Unit:
    name: str
    kind: str
    region: frozenset  # node names
    outputs: tuple  # node names, graph order
    module_type: str | None = None
    index: int | None = None
    block: str | None = None
    flops: int = 0  # FLOPs of the region's live nodes (what reusing the unit skips at least)
    out_shapes: tuple = ()  # ((shape, dtype), ...) per output
    order: int = 0
    module: str | None = None  # module whose forward returns the unit's value(s)
    # residual spans: per output, the node its residual adds back (the cache holds
    # ``output - input``, a read is ``input_now + cache``); empty for every other unit
    residual: tuple = ()

    @property
    def cache_bytes(self) -> int:
        total = 0
        for shape, dtype in self.out_shapes:
            n = 1
            for s in shape:
                n *= int(s)
            total += n * torch.empty((), dtype=dtype).element_size()
        return total

    def contains(self, other: "Unit") -> bool:
        return other.region <= self.region and other.region != self.region or (
            other.region == self.region and other.order > self.order
        )

    def info(self, parent: str | None = None) -> UnitInfo:
        return UnitInfo(
            name=self.name,
            kind=self.kind,
            flops=self.flops,
            parent=parent,
            index=self.index,
            block=self.block,
            cache_bytes=self.cache_bytes,
        )

    def __repr__(self) -> str:
        return f"Unit({self.name!r}, kind={self.kind!r}, flops={self.flops}, outputs={len(self.outputs)})"


@dataclass
class UnitSet:
    """All units of one captured graph, with the graph's cost."""

    units: list[Unit]
    full_flops: int
    skipped: dict[str, str] = field(default_factory=dict)  # module path → why it is not a unit
    graph: fx.GraphModule | None = field(default=None, repr=False)  # the graph the units are of (for spans)

    def __iter__(self):
        return iter(self.units)

    def __len__(self):
        return len(self.units)

    def by_name(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}

    def add_span(self, name: str) -> Unit:
        """Materialise the residual span ``name`` (``span:FIRST..LAST``, see
        :mod:`fxcache.schedules.spans`) as a unit of this graph, append it and return it.

        Its region is every computation from the first node of block FIRST to the last
        node of block LAST in graph order (the blocks and the glue between them: Flux's
        text/image split between its two kinds of block). Its outputs are the values
        leaving that region; each must add back, through residual adds alone, exactly one
        value entering it (:func:`fxcache.analyze.residual.residual_source`), else the
        span has no residual form and is refused (:class:`UnsupportedModelError`)."""
        from .residual import residual_source

        existing = self.by_name().get(name)
        if existing is not None:
            return existing
        if self.graph is None:
            raise UnsupportedModelError(f"span '{name}': these units carry no graph to build a span from")
        gm = self.graph
        by_name = self.by_name()
        ends = parse_span(name)
        order = [u.name for u in self.units if u.kind in BLOCK_KINDS]
        if ends is None or not set(ends) <= set(order) or order.index(ends[1]) < order.index(ends[0]):
            raise UnsupportedModelError(f"'{name}' is not a span of this model's blocks (first..last, in order)")
        blocks = order[order.index(ends[0]): order.index(ends[1]) + 1]
        nodes = list(gm.graph.nodes)
        position = {n.name: i for i, n in enumerate(nodes)}
        start = min(position[n] for n in by_name[blocks[0]].region)
        end = max(position[n] for n in by_name[blocks[-1]].region)
        region = {n.name for n in nodes[start : end + 1] if n.op == "call_function"}
        for b in blocks:
            region |= by_name[b].region
        # the model's own glue right after the last block that reads only the span (Chroma
        # slices the image stream out of the joint sequence after its single-stream blocks)
        for n in nodes[end + 1:]:
            top = len([p for p, _ in (n.meta.get("nn_module_stack") or {}).values() if p]) == 0
            if not (n.op == "call_function" and top and n.all_input_nodes
                    and all(a.name in region for a in n.all_input_nodes)):
                break
            region.add(n.name)
        full_live = live_nodes(gm)
        outputs = [n.name for n in nodes if n.name in region and n.name in full_live
                   and any(u.name not in region for u in n.users)]
        if not outputs:
            raise UnsupportedModelError(f"span '{name}': no value leaves it (nothing after it uses its blocks)")
        metas = [_tensor_meta(n) for n in nodes if n.name in set(outputs)]
        residual = []
        for o in outputs:
            src = residual_source(gm, o, frozenset(region), what=f"span '{name}'")
            if src is None:
                raise UnsupportedModelError(
                    f"span '{name}': the value '{o}' leaves it but adds back none of its inputs through residual "
                    f"adds, so it has no residual (output - input) to cache; choose blocks whose outputs are "
                    f"residual streams, or cache their sublayers (FORA)"
                )
            residual.append(src)
        first = by_name[blocks[0]]
        unit = Unit(
            name=name,
            kind="span",
            region=frozenset(region),
            outputs=tuple(outputs),
            module_type="residual span",
            index=first.index,
            flops=graph_cost(gm, [n for n in nodes if n.name in region and n.name in full_live]).total,
            out_shapes=tuple(metas),
            order=len(self.units),
            residual=tuple(residual),
        )
        self.units.append(unit)
        for n in nodes:
            if n.name in region:
                n.meta.setdefault("fxcache.units", []).append(name)
        return unit

    def infos(self, names=None) -> list[UnitInfo]:
        """UnitInfos, with ``parent`` = the smallest enclosing unit among ``names``."""
        selected = [u for u in self.units if names is None or u.name in set(names)]
        if names is not None:
            order = {n: i for i, n in enumerate(names)}
            selected.sort(key=lambda u: order[u.name])
        out = []
        for u in selected:
            parents = [p for p in selected if p is not u and p.contains(u)]
            parent = min(parents, key=lambda p: len(p.region)).name if parents else None
            out.append(u.info(parent))
        return out


def _type_name(t) -> str:
    name = getattr(t, "__name__", None) or str(t)
    return name.rsplit(".", 1)[-1].strip("'>")


_UNET_PATTERNS = [
    (re.compile(r"^down_blocks\.\d+$"), "down_block"),
    (re.compile(r"^mid_block$"), "mid_block"),
    (re.compile(r"^up_blocks\.\d+$"), "up_block"),
    (re.compile(r"\.resnets\.\d+$"), "resnet"),
    (re.compile(r"\.attentions\.\d+$"), "attention"),
]
_SINGLE_RE = re.compile(r"(^|\.)(single_transformer_blocks)\.(\d+)$")
_ATTN_CHILD = {"attn", "attn1", "attn2"}
_MLP_CHILD = {"ff", "ff_context"}


_INDEXED_RE = re.compile(r"^(.*)\.(\d+)$")
_MLP_TYPES = {"FeedForward", "FluxFeedForward", "MLP", "Mlp"}


def _is_attention(child: str, type_name: str) -> bool:
    return child in _ATTN_CHILD or ("Attention" in type_name and not type_name.endswith("Processor"))


def _is_mlp(child: str, type_name: str) -> bool:
    return child in _MLP_CHILD or child in ("ffn", "mlp") or type_name in _MLP_TYPES


def _block_lists(module_type: dict[str, str]) -> set[str]:
    """Transformer blocks found by structure, not by name: the module lists (``X.0``,
    ``X.1``, ...) whose elements have an attention module as a direct child
    (``transformer_blocks`` in DiT, PixArt, SD3, Flux, CogVideoX and SD-like U-Nets,
    ``blocks`` in Wan). A U-Net's ``attentions`` list holds the attention (or its
    Transformer2DModel) itself, so it is not one. A list named ``transformer_blocks`` is
    one whatever its elements hold (as before structure was used). When the model has
    top-level block lists, a list found by structure deeper inside (HunyuanVideo's token
    refiner, ``context_embedder.token_refiner.refiner_blocks``) belongs to a conditioning
    sub-network and is not one."""
    children: dict[str, list[tuple[str, str]]] = {}
    for path, type_name in module_type.items():
        parent, _, child = path.rpartition(".")
        children.setdefault(parent, []).append((child, type_name))
    lists = set()
    for path in module_type:
        m = _INDEXED_RE.match(path)
        if not m:
            continue
        named = m.group(1).rpartition(".")[2] == "transformer_blocks"  # diffusers' name, whatever the block holds
        if named or any("Attention" in t and not t.endswith("Processor") for _, t in children.get(path, ())):
            lists.add(m.group(1))
    if any("." not in p for p in lists):
        lists = {p for p in lists if "." not in p or p.rpartition(".")[2] == "transformer_blocks"}
    return lists


def _classify(path: str, type_name: str, block_lists: set[str]) -> tuple[str, int | None, str | None] | None:
    m = _SINGLE_RE.search(path)
    if m:
        return "single_block", int(m.group(3)), None
    m = _INDEXED_RE.match(path)
    if m and m.group(1) in block_lists:
        return "transformer_block", int(m.group(2)), None
    parent, _, child = path.rpartition(".")
    pm = _SINGLE_RE.search(parent)
    bm = _INDEXED_RE.match(parent)
    if pm or (bm and bm.group(1) in block_lists):
        index = int(pm.group(3)) if pm else int(bm.group(2))
        if _is_attention(child, type_name):
            return "attention", index, parent
        if _is_mlp(child, type_name):
            return "mlp", index, parent
        return None
    for pattern, kind in _UNET_PATTERNS:
        if pattern.search(path):
            return kind, None, None
    return None


def _tensor_meta(node: fx.Node):
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return (tuple(val.shape), val.dtype)
    return None


def _innermost(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [p for p, _ in stack.values() if p]
    return paths[-1] if paths else None


def live_nodes(gm: fx.GraphModule, cut: dict | None = None) -> set:
    """Names of the nodes the graph output needs, when the nodes in ``cut`` (name →
    predicate on the user node's name, True when that use reads the cache instead)
    are not traversed for those uses."""
    cut = cut or {}
    out = gm.graph.find_nodes(op="output")[0]
    live: set = set()
    stack = [out]
    while stack:
        node = stack.pop()
        for arg in node.all_input_nodes:
            if arg.name in live:
                continue
            pred = cut.get(arg.name)
            if pred is not None and pred(node.name):
                continue
            live.add(arg.name)
            stack.append(arg)
    return live


def _exclusive_region(gm: fx.GraphModule, node: fx.Node, full_live: set, within: set | None = None) -> frozenset:
    cut_user_names = {u.name for u in node.users}
    live = live_nodes(gm, {node.name: lambda user: user in cut_user_names})
    region = full_live - live
    if within is not None:
        region &= within
    return frozenset(region)


def find_units(gm: fx.GraphModule) -> UnitSet:
    """Annotate ``gm`` with FLOPs and return its cacheable units (graph order)."""
    annotate_flops(gm)
    nodes = list(gm.graph.nodes)
    position = {n.name: i for i, n in enumerate(nodes)}
    module_nodes: dict[str, list[fx.Node]] = {}
    module_type: dict[str, str] = {}
    repeated: set[str] = set()
    for node in nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for key, (path, mtype) in stack.items():
            if not path:
                continue
            if re.search(r"@\d+$", key):
                repeated.add(path)
            module_nodes.setdefault(path, []).append(node)
            module_type.setdefault(path, _type_name(mtype))

    full_live = live_nodes(gm)
    full_cost = graph_cost(gm, [n for n in nodes if n.name in full_live])
    units: list[Unit] = []
    skipped: dict[str, str] = {}

    def add(name, kind, region, outputs, mtype=None, index=None, block=None):
        metas = [_tensor_meta(by_name[o]) for o in outputs]
        if not outputs:
            skipped[name] = "no value leaves it (nothing outside uses it)"
            return
        if any(m is None for m in metas):
            skipped[name] = "a value leaving it is not a tensor"
            return
        saved = graph_cost(gm, [by_name[n] for n in region if n in full_live]).total
        units.append(
            Unit(
                name=name,
                kind=kind,
                region=frozenset(region),
                outputs=tuple(outputs),
                module_type=mtype,
                index=index,
                block=block,
                flops=saved,
                out_shapes=tuple(metas),
                module=name if mtype not in ("skip branch", "residual branch") else _innermost(by_name[outputs[0]]),
            )
        )

    by_name = {n.name: n for n in nodes}
    block_lists = _block_lists(module_type)
    for path in sorted(module_nodes, key=lambda p: position[module_nodes[p][0].name]):
        cls = _classify(path, module_type[path], block_lists)
        if cls is None:
            continue
        if path in repeated:
            skipped[path] = "the module is called more than once in one forward"
            continue
        kind, index, block = cls
        region = {n.name for n in module_nodes[path]}
        outputs = [
            n.name for n in module_nodes[path] if n.name in full_live and any(u.name not in region for u in n.users)
        ]
        add(path, kind, region, outputs, module_type[path], index, block)
        if kind == "single_block":
            proj = module_nodes.get(f"{path}.proj_out")
            if proj:
                proj_region = {n.name for n in proj}
                outs = [n for n in proj if any(u.name not in proj_region for u in n.users)]
                if len(outs) == 1:
                    branch = _exclusive_region(gm, outs[0], full_live, within=region)
                    add(f"{path}.branch", "branch", branch, [outs[0].name], "residual branch", index, path)

    # DeepCache skip branches: the concatenations of the up path, shallowest last.
    cats = []
    for node in nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.cat.default:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        paths = [p for p, _ in stack.values()]
        if not paths or not re.fullmatch(r"up_blocks\.\d+", paths[-1]):
            continue
        tensors = node.args[0]
        if len(tensors) == 2 and node.name in full_live:
            cats.append(node)
    for m, cat in enumerate(reversed(cats)):
        main = cat.args[0][0]
        region = _exclusive_region(gm, main, full_live)
        add(f"skip_branch.{m}", "skip_branch", region, [main.name], "skip branch", m, None)

    for i, u in enumerate(units):
        u.order = i
    for node in nodes:
        node.meta["fxcache.units"] = [u.name for u in units if node.name in u.region]
    return UnitSet(units=units, full_flops=full_cost.total, skipped=skipped, graph=gm)


_TEMB_MODULES = ("time_embedding", "time_text_embed", "adaln_single.emb", "transformer_blocks.0.norm1.emb")


def temb_module(model: torch.nn.Module) -> str:
    """Path of the module whose output is the conditioning embedding, shape (batch, dim):
    the timestep embedding of U-Nets (``time_embedding``), SD3/Flux
    (``time_text_embed``) and PixArt (``adaln_single.emb``), and DiT's timestep + class
    embedding (``transformer_blocks.0.norm1.emb``; DiT recomputes the same value in
    every block). Scale-shift adapters are linear maps from this embedding."""
    for path in _TEMB_MODULES:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise UnsupportedModelError(
        f"{type(model).__name__} has none of the timestep-embedding modules {_TEMB_MODULES}; "
        f"scale-shift adapters need one: pass temb_module='path' naming the module whose output is "
        f"the (batch, dim) conditioning embedding"
    )


def temb_output(gm: fx.GraphModule, module: str) -> str:
    """Name of the node holding the output of ``module`` (the last of its nodes that is
    used outside it)."""
    # the first call only (DiT calls block 0's embedding again before its final layer)
    inside = [
        n
        for n in gm.graph.nodes
        if any(p == module and not re.search(r"@\d+$", key) for key, (p, _) in (n.meta.get("nn_module_stack") or {}).items())
    ]
    names = {n.name for n in inside}
    outs = [n for n in inside if any(u.name not in names for u in n.users)]
    if not outs:
        raise UnsupportedModelError(f"no value leaves module '{module}' in the captured graph; cannot read the embedding")
    return outs[-1].name
