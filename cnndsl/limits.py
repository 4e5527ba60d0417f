"""Every bound the front end puts on work that an input can grow, defined once. Each trips
before the work it bounds is done, with a located CnnError (docs/reliability.md lists them
with their messages)."""

MAX_SOURCE_CHARS = 100_000  # a .cnn text, ~2,500 lines (a file is refused from its size before it is read)
MAX_LINE_CHARS = 1_000  # one physical line
MAX_DIGITS = 30  # one number literal
MAX_OPERATORS = 200  # operators in one expression
MAX_EVALUATIONS = 1_000_000  # operators evaluated while expanding, each call's and repetition's counted
MAX_INT = 2**63  # integer results of .cnn arithmetic, in absolute value
MAX_SIZE = 2**31 - 1  # any size, count, stride, padding or dilation (a tensor dimension)
MAX_VALUES = 2**31 - 1  # values in one image's tensor at any layer, C*H*W (8 GiB in fp32)
MAX_POOL_WINDOW = 65_536  # taps of one pooling window (256x256): each output reads them all
MAX_DEPTH = 64  # block calls nested inside each other
MAX_NESTING = 64  # residual branches nested inside each other (through block calls too)
MAX_NODES = 100_000  # layers after expansion (the input not counted): far beyond any real network
MAX_EXPANSIONS = 250_000  # statements expanded: layers, block calls, residuals, concat branches, each repetition
MAX_NAME_CHARS = 20_000_000  # the layers' dotted names together (block-call labels nest into each)
