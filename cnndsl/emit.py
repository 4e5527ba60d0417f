"""`cnndsl emit`: one standalone Python module for a compiled network — the Triton
kernels it uses (their real source, relative imports removed), the autograd Functions
that launch them, and a torch.nn.Module whose forward is the network's launch
sequence written out line by line. It needs only torch and triton to run.

Everything from the .cnn file that reaches the text is a checked identifier (layer
names match [A-Za-z_][A-Za-z0-9_.]*) or a number, written with repr(), never inside a
docstring or comment; the class name is the network's, made distinct from every name the
module defines, every keyword and builtin; layers live under names that cannot be labels."""

import ast as pyast
import builtins
import keyword
import re
from importlib import resources

from . import ir
from .codegen import Step, layer_spec, lower
from .ir import Op
from .plan import plan as make_plan

# step kind (a plan rule or an op) -> (kernel modules, autograd Functions) its steps need;
# the kernel modules each of those imports come along.
NEEDS = {
    "conv_block": (("conv", "epilogue", "fold"), ("ConvBlockFn",)),
    "dense_block": (("dense",), ("DenseBlockFn",)),
    Op.BATCHNORM.value: (("batchnorm",), ("BatchNormFn",)),
    Op.ACTIVATION.value: ((), ("ActivationFn",)),
    Op.POOL.value: (("pool",), ("PoolFn",)),
    Op.GLOBAL_AVGPOOL.value: (("pool",), ("GlobalAvgPoolFn",)),
    Op.FLATTEN.value: ((), ()),
    Op.DROPOUT.value: (("dropout",), ("DropoutFn",)),
    Op.SOFTMAX.value: (("softmax",), ("SoftmaxFn",)),
    Op.ADD.value: ((), ("AddFn",)),
}
_ALWAYS_MODULES = ("_common", "activation", "add", "softmax")
_ALWAYS_FNS = ("ForkFn", "CrossEntropyFn")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")


def _strip(source: str, keep=None) -> str:
    """Source without relative imports and the module docstring; with `keep`, only the
    top-level imports and the classes named in it."""
    tree = pyast.parse(source)
    lines = source.splitlines()
    drop = set()
    for i, node in enumerate(tree.body):
        relative = isinstance(node, pyast.ImportFrom) and node.level > 0
        docstring = i == 0 and isinstance(node, pyast.Expr) and isinstance(node.value, pyast.Constant)
        unwanted = keep is not None and isinstance(node, pyast.ClassDef) and node.name not in keep
        if relative or docstring or unwanted:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            drop.update(range(first - 1, node.end_lineno))
    text = "\n".join(line for i, line in enumerate(lines) if i not in drop)
    return re.sub(r"\n{3,}", "\n\n\n", text).strip() + "\n"


def _private_names(source: str) -> set:
    return {t.id if isinstance(t, pyast.Name) else t.name
            for node in pyast.parse(source).body
            for t in ([node] if isinstance(node, (pyast.FunctionDef, pyast.ClassDef)) else
                      getattr(node, "targets", []))
            if isinstance(t, (pyast.Name, pyast.FunctionDef, pyast.ClassDef))
            and (t.id if isinstance(t, pyast.Name) else t.name).startswith("_")}


def _prefixed(mod: str, name: str) -> str:
    return f"_{mod.strip('_')}{name}"


def _kernel_module(mod: str) -> str:
    return resources.files("cnndsl.kernels").joinpath(f"{mod}.py").read_text()


def _imports(source: str) -> list[tuple[str, list[str]]]:
    """(module, names) of a kernel module's relative imports."""
    return [(node.module, [a.name for a in node.names]) for node in pyast.parse(source).body
            if isinstance(node, pyast.ImportFrom) and node.level > 0]


def _with_dependencies(modules) -> list[str]:
    """The modules and everything they import, each after its imports."""
    order = []

    def visit(mod):
        if mod not in order:
            for dep, _ in _imports(_kernel_module(mod)):
                visit(dep)
            order.append(mod)
    for mod in sorted(modules):
        visit(mod)
    return order


def _kernel_sources(modules) -> str:
    """Each module's text with its private top-level names prefixed by the module's name,
    so that `_CONFIGS` of two modules cannot collide in one namespace (private names it
    imports from another module get that module's prefix)."""
    out = []
    for mod in _with_dependencies(modules):
        source = _kernel_module(mod)
        text = _strip(source)
        renames = {name: _prefixed(mod, name) for name in _private_names(text)}
        renames.update({name: _prefixed(dep, name) for dep, names in _imports(source)
                        for name in names if name.startswith("_")})
        for name in sorted(renames, key=len, reverse=True):
            text = re.sub(rf"(?<![\w.]){re.escape(name)}\b", renames[name], text)
        out.append(f"# ---- kernels/{mod}.py " + "-" * 60 + "\n" + text)
    return "\n\n".join(out)


def _layer_ctor(net: ir.Network, node: ir.Node) -> str | None:
    spec = layer_spec(net, node)
    if spec is None:
        return None
    cls, args, kwargs = spec
    return f"nn.{cls}(" + ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]) + ")"


def _param(net: ir.Network, node_id: int | None) -> str:
    return "None" if node_id is None else f"self._p[{net.nodes[node_id].name!r}]"


def _call(net: ir.Network, step: Step, args: list[str], last: bool) -> str:
    k, p = step.kw, f"self._p[{step.node!r}]"
    x = args[0]
    match step.op:
        case "conv_block":
            conv, bn = _param(net, k["conv"]), _param(net, k["bn_node"])
            bn_args = ", ".join(f"{bn}.{a}" for a in ("weight", "bias", "running_mean", "running_var",
                                                       "num_batches_tracked")) if k["bn_node"] is not None \
                else "None, None, None, None, None"
            return (f"ConvBlockFn.apply({x}, {args[1] if len(args) > 1 else None}, {conv}.weight, {conv}.bias, "
                    f"{bn_args}, {k!r}, self.training, torch.is_grad_enabled(), "
                    f"self._caches.setdefault({step.group}, {{}}))")
        case "dense_block":
            if k["flatten"] is not None:
                x = _flatten(x, k["flatten"])
            seed = "int(torch.randint(2**31 - 1, ())) if self.training else None" if k["p"] > 0 else "None"
            softmax = f"{k['softmax']!r} and not logits" if last else repr(k["softmax"])
            dense = _param(net, k["dense"])
            return (f"DenseBlockFn.apply({x}, {dense}.weight, {dense}.bias, {k!r}, {seed}, {softmax}, "
                    f"torch.is_grad_enabled())")
    match Op(step.op):
        case Op.BATCHNORM:
            return (f"BatchNormFn.apply({x}, {p}.weight, {p}.bias, {p}.running_mean, {p}.running_var, "
                    f"{p}.num_batches_tracked, {k['eps']!r}, {k['momentum']!r}, self.training)")
        case Op.ACTIVATION:
            return f"ActivationFn.apply({x}, {k['kind']!r}, {k['slope']!r})"
        case Op.POOL:
            return (f"PoolFn.apply({x}, {k['mode']!r}, {k['kernel']!r}, {k['stride']!r}, {k['padding']!r}, "
                    f"{k['out_hw']!r})")
        case Op.GLOBAL_AVGPOOL:
            return f"GlobalAvgPoolFn.apply({x})"
        case Op.FLATTEN:
            return _flatten(x, k["permute"])
        case Op.DROPOUT:
            return (f"DropoutFn.apply({x}, {k['p']!r}, int(torch.randint(2**31 - 1, ()))) "
                    f"if self.training else {x}")
        case Op.SOFTMAX:
            return f"SoftmaxFn.apply({x})"
        case Op.ADD:
            return f"AddFn.apply({x}, {args[1]})"
    raise AssertionError(step.op)


def _flatten(x: str, permute: bool) -> str:
    """(N, H, W, C) -> (N, C*H*W) in C, H, W order (a view when H = W = 1: no permute)."""
    return f"{x}{'.permute(0, 3, 1, 2)' if permute else ''}.reshape({x}.shape[0], -1)"


def _class_name(net: ir.Network, taken: set) -> str:
    """The network's name in CamelCase (`cifar_small` -> `CifarSmall`), with `Net` added where
    that would be a keyword, a builtin or a name the module already defines (`none`, `p`,
    `cross_entropy_fn`), so that it can never shadow one."""
    words = re.findall(r"[A-Za-z0-9]+", net.name) or ["network"]
    name = "".join(w[:1].upper() + w[1:] for w in words)
    name = name if name[0].isalpha() else "Net" + name
    while keyword.iskeyword(name) or name in dir(builtins) or name in taken:
        name += "Net"
    return name


def _top_level_names(source: str) -> set:
    """Every name a module's top level binds (imports, functions, classes, assignments)."""
    names = set()
    for node in pyast.parse(source).body:
        if isinstance(node, (pyast.FunctionDef, pyast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (pyast.Import, pyast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        else:
            names.update(t.id for t in pyast.walk(node) if isinstance(t, pyast.Name) and isinstance(t.ctx, pyast.Store))
    return names


def _network_source(net: ir.Network, steps: tuple[Step, ...], cls: str) -> str:
    assert _NAME.match(net.name) and "." not in net.name, net.name  # a NAME token of the grammar
    readers = {}
    for s in steps:
        for i in s.inputs:
            readers[i] = readers.get(i, 0) + 1
    init = []
    for node in net.nodes:
        ctor = _layer_ctor(net, node)
        if ctor:
            assert _NAME.match(node.name), node.name
            init.append(f"        _place(self, {node.name!r}, {ctor})")

    def fork(i):
        k = readers.get(i, 0)
        if k <= 1:
            return []
        names = ", ".join(f"v{i}_{j}" for j in range(k))
        return [f"        {names} = ForkFn.apply(v{i}, {k})"]

    uses = {}
    body = ["        v0 = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)", *fork(0)]
    for s in steps:
        args = []
        for i in s.inputs:
            if readers[i] > 1:
                args.append(f"v{i}_{uses.get(i, 0)}")
                uses[i] = uses.get(i, 0) + 1
            else:
                args.append(f"v{i}")
        if s is steps[-1] and s.op == Op.SOFTMAX.value:
            body.append(f"        if logits:\n            return {args[0]}")
        call = _call(net, s, args, s is steps[-1])
        body.append(f"        v{s.output} = {call}  # {s.node}: {'x'.join(map(str, net.nodes[s.output].shape))}")
        body += fork(s.output)
    last = steps[-1].output
    out = f"v{last}.permute(0, 3, 1, 2).contiguous()" if len(net.output_shape) == 3 else f"v{last}"
    return f'''

# ---- the network {net.name!r} --------------------------------------------------------------
def _place(root, name, layer):
    *path, leaf = name.split(".")
    for part in path:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root._modules[part]
    root.add_module(leaf, layer)


class {cls}(nn.Module):
    """{net.name}: input {list(net.input_shape)} (N, C, H, W) -> output {list(net.output_shape)}."""

    def __init__(self):
        super().__init__()
{chr(10).join(init) or "        pass"}
        self._p = dict(self.named_modules())  # layer name -> layer
        self._caches = {{}}  # group -> its folded eval weights

    def forward(self, x, logits=False):
{chr(10).join(body)}
        return {out}

    def loss(self, x, target):
        """Mean cross-entropy of the logits against class indices."""
        return CrossEntropyFn.apply(self.forward(x, logits=True).contiguous(), target)
'''


def emit(net: ir.Network, fuse: bool = True) -> str:
    """The standalone module's text for `net`."""
    steps = lower(net, make_plan(net, fuse))
    modules, fns = set(_ALWAYS_MODULES), set(_ALWAYS_FNS)
    for step in steps:
        modules.update(NEEDS[step.op][0])
        fns.update(NEEDS[step.op][1])
    runtime = resources.files("cnndsl.runtime")
    functions = runtime.joinpath("functions.py").read_text() + "\n" + runtime.joinpath("blocks.py").read_text()
    # The docstring holds no text from the .cnn file or its path; those are repr() literals below.
    header = ('"""A network generated by `cnndsl emit` (SOURCE names its file): Triton kernels,\n'
              "their autograd Functions, and the network's launch sequence. Needs only torch and\n"
              'triton; without a GPU set TRITON_INTERPRET=1 before importing."""\n\n'
              "import torch\nfrom torch import nn\n\n"
              f"SOURCE = {net.filename or '<string>'!r}\n\n")
    body = (header + _kernel_sources(modules) + "\n\n# ---- autograd Functions " + "-" * 60 + "\n"
            + _strip(functions, keep=fns))
    return body + _network_source(net, steps, _class_name(net, _top_level_names(body) | {"_place"}))
