"""The ``entrokit`` command line: ``demo``, ``solve`` and ``bench``.

The commands need the ``cli`` extra (``pip install 'entrokit[cli]'``: matplotlib, tqdm,
scikit-learn); ``bench`` also needs the ``bench`` extra. Optional packages are imported
inside the commands, and a missing one is reported on one line with the extra to install.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from entrokit._errors import ConvergenceWarning, InputError
from entrokit._optional import require

__all__ = ["main"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm"}
DEMO_EPS = (1e-1, 1e-2, 1e-3)
#: largest eps / (largest cost): above it the plan is the independent coupling a x b to
#: 1e-6 and float64 loses the value (it carries eps * (sum P - 1), a rounding of eps * 1e-16)
MAX_EPS_OVER_COST = 1e6
#: image intensities below this fraction of white are zero (RGB-to-gray rounding is 1e-16,
#: a 16-bit step 1.5e-5)
IMAGE_ZERO = 1e-6
#: the packages of the ``bench`` extra that the suites import
BENCH_PACKAGES = ("ot", "regot")
#: seconds before a progress bar appears (short runs show none)
PROGRESS_DELAY = 0.5


class CLIError(Exception):
    """A user-facing error: printed on one line, exit status 2."""


# ---------------------------------------------------------------------------- loading
def load_measure(path: str, *, weighted: bool = False, invert: bool = False):
    """Read points ``[N, d]`` and weights ``[N]`` from ``.npy``/``.csv`` or an image.

    Point files: one point per row; with ``weighted`` the last column holds the weights.
    Images: grayscale intensities become weights on the pixel grid (scaled into [0, 1]^2,
    aspect kept); ``invert`` uses darkness instead of brightness.
    """
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{path}: no such file")
    if not p.is_file():
        raise CLIError(f"{path}: not a regular file")
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _load_image(p, invert)
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:  # numpy raises several types for corrupt files
            raise CLIError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from None
    elif suffix in (".csv", ".txt"):
        arr = _load_csv(p)
    else:
        raise CLIError(
            f"{path}: unsupported file type {suffix or '(none)'}; expected .npy, .csv or an image "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if arr.dtype.kind not in "fiu":
        raise CLIError(f"{path}: expected numbers, got array of dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise CLIError(f"{path}: expected a 2-D array of points (N rows, d columns), got shape {arr.shape}")
    if weighted:
        if arr.shape[1] < 2:
            raise CLIError(f"{path}: --weighted needs at least 2 columns (coordinates + weight), got {arr.shape[1]}")
        pts, w = arr[:, :-1], arr[:, -1]
    else:
        pts, w = arr, np.ones(arr.shape[0])
    if not np.isfinite(arr).all():
        raise CLIError(f"{path}: contains NaN or infinite values")
    if (w < 0).any() or w.sum() <= 0:
        raise CLIError(f"{path}: weights must be nonnegative with a positive sum")
    return torch.as_tensor(pts), torch.as_tensor(w / w.sum()), None


def _load_csv(p: Path) -> np.ndarray:
    for skip in (0, 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = np.loadtxt(p, delimiter=",", skiprows=skip, ndmin=2, comments="#")
            return arr
        except ValueError:
            continue
        except Exception as exc:
            raise CLIError(f"{p}: could not read CSV ({type(exc).__name__}: {exc})") from None
    raise CLIError(f"{p}: could not parse as comma-separated numbers (one point per row)")


def _load_image(p: Path, invert: bool):
    """Intensities in [0, 1] of the image's own range: integer pixels are divided by their
    type's white (255 for 8-bit, 65535 for 16-bit); float pixels (PNG) are already in
    [0, 1]. RGB(A) becomes luma, gray+alpha its gray channel."""
    mpimg = require("matplotlib.image", "reading images")
    try:
        raw = np.asarray(mpimg.imread(p))
    except Exception as exc:
        raise CLIError(f"{p}: not a readable image ({type(exc).__name__}: {exc})") from None
    if raw.dtype.kind in "ui":
        white = float(np.iinfo(raw.dtype).max)
    elif raw.dtype.kind == "f":
        white = 1.0
    else:
        raise CLIError(f"{p}: unsupported pixel type {raw.dtype}")
    img = raw.astype(np.float64) / white
    if img.ndim == 3:
        ch = img.shape[-1]
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114]) if ch >= 3 else img[..., 0]
    if img.ndim != 2 or img.size == 0:
        raise CLIError(f"{p}: expected a 2-D grayscale or RGB image, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise CLIError(f"{p}: image contains NaN or infinite values")
    if img.min() < 0.0 or (invert and img.max() > 1.0 + IMAGE_ZERO):
        raise CLIError(
            f"{p}: float pixels outside [0, 1] (range {img.min():.3g} to {img.max():.3g}); "
            + ("--invert needs the white level: save the image as 8- or 16-bit" if invert else
               "intensities must be nonnegative")
        )
    img = np.clip(1.0 - img, 0.0, 1.0) if invert else img
    img[img <= IMAGE_ZERO] = 0.0  # rounding of the gray conversion, not mass
    w = img.flatten()
    if w.sum() <= 0:
        what = "is white everywhere (--invert: dark pixels carry the mass)" if invert else "is black everywhere"
        raise CLIError(f"{p}: image {what}; no mass to transport")
    h, wd = img.shape
    s = max(h, wd) - 1 or 1
    yy, xx = np.meshgrid(np.arange(h) / s, np.arange(wd) / s, indexing="ij")
    pts = np.stack([yy.flatten(), xx.flatten()], -1)
    return torch.as_tensor(pts), torch.as_tensor(w / w.sum()), img.shape


# ---------------------------------------------------------------------------- output
class _Table:
    """A titled plain-text table with notes (the demo's output; no benchmark imports)."""

    def __init__(self, title: str, columns: Sequence[str]) -> None:
        self.title = title
        self.columns = [str(c) for c in columns]
        self.rows: list[list[str]] = []
        self.notes: list[str] = []

    def add(self, *row: object) -> None:
        self.rows.append([str(x) for x in row])

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for r in self.rows:
            widths = [max(w, len(x)) for w, x in zip(widths, r)]
        line = "  ".join(c.ljust(w) for c, w in zip(self.columns, widths))
        out = [self.title, "=" * len(self.title), line, "-" * len(line)]
        out += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in self.rows]
        out += [f"  * {n}" for n in self.notes]
        return "\n".join(out)


# ---------------------------------------------------------------------------- commands
def _progress(quiet: bool, desc: str):
    """A tqdm bar named ``desc`` (the method that runs), fed by the solver callback; shown
    only on runs longer than :data:`PROGRESS_DELAY`."""
    if quiet:
        return None, None
    tqdm = require("tqdm.auto", "the progress bar (or pass --quiet)").tqdm
    bar = tqdm(desc=desc, unit="it", delay=PROGRESS_DELAY, leave=False, file=sys.stderr)
    state = {"last": 0}

    def callback(it: int, err: float) -> None:
        bar.update(it - state["last"])
        state["last"] = it
        bar.set_postfix_str(f"marginal error {err:.2e}", refresh=False)

    return bar, callback


def _check_eps(eps: float, max_cost: float, what: str) -> None:
    """Refuse an eps at which float64 cannot tell the problem from eps = infinity."""
    limit = MAX_EPS_OVER_COST * (max_cost if max_cost > 0 else 1.0)
    if eps > limit:
        raise CLIError(
            f"--eps {eps:g} is above {MAX_EPS_OVER_COST:g} x the largest cost ({max_cost:.3g}, {what}): "
            f"the plan is then the independent coupling a x b to 1e-6 and the value loses its digits in "
            f"float64; use --eps <= {limit:.3g}"
        )


def _check_output(path: str, option: str, *, figure: bool = False) -> Path:
    """Checked before any solve: the folder exists and (figures) matplotlib writes the format."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: folder {parent} does not exist")
    if out.is_dir():
        raise CLIError(f"{option} {path}: is a folder; give a file name")
    if figure:
        canvas = require("matplotlib.backend_bases", "writing figures").FigureCanvasBase
        formats = canvas.get_supported_filetypes()
        fmt = out.suffix.lower().lstrip(".")
        if fmt not in formats:
            raise CLIError(
                f"{option} {path}: unsupported figure format {('.' + fmt) if fmt else '(no suffix)'}; "
                f"use one of {', '.join('.' + f for f in sorted(formats))}"
            )
    return out


def _write(path: Path, save: Callable[[Path], object]) -> None:
    """Write ``path`` with ``save(path)``; an ``OSError`` becomes a :class:`CLIError` naming the file."""
    try:
        save(path)
    except OSError as exc:
        raise CLIError(f"{path}: cannot write ({exc.strerror})") from None
    print(f"wrote {path}")


def cmd_solve(args) -> int:
    import entrokit
    from entrokit import PointCloud
    from entrokit.problem import make_problem
    from entrokit.solvers.solve import auto_method

    out = _check_output(args.out if args.out.endswith(".npz") else args.out + ".npz", "--out") if args.out else None
    plot = _check_output(args.plot, "--plot", figure=True) if args.plot else None
    x, a, shape_x = load_measure(args.source, weighted=args.weighted, invert=args.invert)
    y, b, shape_y = load_measure(args.target, weighted=args.weighted, invert=args.invert)
    if x.shape[1] != y.shape[1]:
        raise CLIError(f"source points have dimension {x.shape[1]} but target points have {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    # the library's rule: online when the dense path would exceed the memory budget
    geom = PointCloud(x, y, args.cost, memory_budget=args.memory_budget)
    problem = make_problem(a, b, geom)
    _check_eps(args.eps, float(geom.max_cost().max()), f"{args.cost} cost of these points")
    # the method that will run names the progress bar
    method = auto_method(problem, args.eps)[0] if args.method == "auto" else args.method
    bar, callback = _progress(args.quiet, method)
    opts = {"callback": callback} if callback is not None else {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        res = entrokit.solve(
            problem.a, problem.b, problem.geometry, eps=args.eps, method=method, tol=args.tol,
            max_iter=args.max_iter, check_inputs=False, **opts
        )
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    for w in caught:
        print(f"entrokit: warning: {w.message}", file=sys.stderr)
    print(
        f"method={res.method} eps={args.eps:g} n={n} m={m} iterations={int(res.n_iter)} "
        f"converged={bool(res.converged)} marginal_error={float(res.marginal_error):.3e} "
        f"transport_cost={float(res.transport_cost):.8g} value={float(res.value):.8g} time={elapsed:.3f}s "
        f"cost={'online' if geom.is_online else 'dense'}"
    )
    if out is not None:
        payload = dict(
            f=res.f.numpy(), g=res.g.numpy(), value=float(res.value), transport_cost=float(res.transport_cost),
            marginal_error=float(res.marginal_error), n_iter=int(res.n_iter), converged=bool(res.converged),
            eps=args.eps, method=res.method, errors=res.errors.numpy(), a=a.numpy(), b=b.numpy(),
        )
        if not geom.is_online:
            payload["plan"] = res.plan.numpy()
        _write(out, lambda path: np.savez(path, **payload))
    if plot is not None:
        from entrokit.plotting import plot_solve

        fig = plot_solve(res, x, y, a, b, shape_x, shape_y)
        _write(plot, lambda path: fig.savefig(path, dpi=120))
    return 0


def demo_methods() -> list[str]:
    from entrokit import METHODS

    return ["sinkhorn"] + [m for m in ("sns", "ssns") if m in METHODS]


def cmd_demo(args) -> int:
    import entrokit
    from entrokit.data import digit_density, grid_cost
    from entrokit.geometry import memory_budget

    out = _check_output(args.out, "--out", figure=True)
    cells = args.size**2
    if 4 * 8 * cells * cells > memory_budget():  # the dense cost and the solvers' copies
        raise CLIError(
            f"--size {args.size}: the {cells} x {cells} dense cost needs more than the memory budget "
            f"({memory_budget() / 2**30:.3g} GiB; $ENTROKIT_MEMORY_BUDGET); use a smaller --size"
        )
    for eps in args.eps:
        _check_eps(eps, 1.0, "the normalised grid cost")
    try:
        a = digit_density(args.digits[0], args.size)
        b = digit_density(args.digits[1], args.size)
    except IndexError as exc:
        raise CLIError(f"--digits: {exc}") from None
    C = grid_cost(args.size, 2)
    table = _Table(
        f"Entropic OT between digits {args.digits[0]} and {args.digits[1]} of load_digits "
        f"({args.size}x{args.size} grid, squared-Euclidean cost normalised to [0, 1], float64, tol {args.tol:g})",
        ["eps", "method", "work", "marginal error", "transport cost <C,P>", "time"],
    )
    from entrokit.plotting import _work_label

    with warnings.catch_warnings():
        # first calls pay one-time costs (imports, allocator); keep them out of the timings
        warnings.simplefilter("ignore", ConvergenceWarning)
        for method in demo_methods():
            entrokit.solve(a, b, C, eps=max(args.eps), method=method, tol=args.tol, max_iter=2)
    runs = []
    for eps in args.eps:
        for method in demo_methods():
            bar, callback = _progress(args.quiet, f"{method} eps={eps:g}")
            opts = {"callback": callback} if method == "sinkhorn" else {}
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                res = entrokit.solve(a, b, C, eps=eps, method=method, tol=args.tol, max_iter=args.max_iter, **opts)
            elapsed = time.perf_counter() - t0
            if bar is not None:
                bar.close()
            flag = "" if bool(res.converged) else " (not converged)"
            table.add(
                f"{eps:g}", method, f"{_work_label(res)}{flag}", f"{float(res.marginal_error):.2e}",
                f"{float(res.transport_cost):.6f}", f"{elapsed:.3f} s",
            )
            runs.append((eps, method, res, elapsed))
            for w in caught:
                table.notes.append(f"{method} eps={eps:g}: {w.message}")
    print(table.render())
    from entrokit.plotting import plot_demo

    fig = plot_demo(runs, a, b, args.size, tol=args.tol)
    _write(out, lambda path: fig.savefig(path, dpi=110))
    return 0


def cmd_bench(args) -> int:
    import importlib

    from entrokit.bench import SUITES
    from entrokit.bench.common import machine_info, write_results

    names = args.suite or list(SUITES)
    for name in names:
        if name not in SUITES:
            raise CLIError(f"unknown benchmark suite {name!r}; available: {', '.join(SUITES)}")
    for pkg in BENCH_PACKAGES:  # the anchors, before any suite runs
        require(pkg, "entrokit bench (the anchors POT and RegOT)", extra="bench")
    limiter = None
    if args.threads is not None:
        # the same thread count for every side: torch, and the BLAS behind numpy / POT
        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=args.threads)
        except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
            pass
    print(f"machine: {machine_info()}")
    for name in names:
        mod, fn = SUITES[name].split(":")
        tables = getattr(importlib.import_module(mod), fn)(quick=args.quick)
        for t in tables:
            print()
            print(t.render())
        path = write_results(name + ("_quick" if args.quick else ""), tables, args.results)
        if path is not None:
            print(f"\nwrote {path}")
    if limiter is not None:
        limiter.restore_original_limits()
    return 0


# ---------------------------------------------------------------------------- parser
def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s!r}")
    return v


def _int_at_least(low: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {s!r}")
        return v

    parse.__name__ = f"integer >= {low}"
    return parse


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from entrokit import METHODS, __version__

    p = _Parser(prog="entrokit", description="Entropy-regularized optimal transport in PyTorch.")
    p.add_argument("--version", action="version", version=f"entrokit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="entropic OT between two handwritten digits: every solver at several eps (embedded data)")
    d.add_argument("--eps", type=_positive_float, nargs="+", default=list(DEMO_EPS),
                   help="regularization strengths, on the cost normalised to [0, 1] (default: %(default)s)")
    d.add_argument("--digits", type=_int_at_least(0), nargs=2, default=(0, 1), metavar=("I", "J"),
                   help="indices of two of scikit-learn's 1797 digit images (default: 0 1)")
    d.add_argument("--size", type=_int_at_least(2), default=28, help="grid side (default: %(default)s, as in the SNS paper)")
    d.add_argument("--tol", type=_positive_float, default=1e-6,
                   help="L1 marginal error of the returned plan (default: %(default)g)")
    d.add_argument("--max-iter", type=_int_at_least(1), default=20_000, help="iteration budget per solve (default: %(default)s)")
    d.add_argument("--out", default="entrokit_demo.png",
                   help="figure: the two digits, time to tolerance per solver and eps, the plan (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("solve", help="entropic OT between two point clouds or images")
    s.add_argument("source", metavar="SOURCE", help=".npy/.csv points (one per row) or a grayscale image")
    s.add_argument("target", metavar="TARGET", help="the same kinds of file as SOURCE")
    s.add_argument("--cost", choices=["sqeuclidean", "euclidean"], default="sqeuclidean",
                   help="ground cost between points, not normalised; one of: %(choices)s (default: %(default)s)")
    s.add_argument("--eps", type=_positive_float, default=1e-2,
                   help="entropic regularization, in the units of the cost (default: %(default)g)")
    methods = ["auto", *sorted(m for m in METHODS if m != "smooth")]
    s.add_argument("--method", default="auto", choices=methods,
                   help="solver; one of: %(choices)s. auto lets entrokit.solve choose (Newton at small eps, "
                        "Sinkhorn otherwise; the progress bar names its choice) (default: %(default)s)")
    s.add_argument("--tol", type=_positive_float, default=1e-6,
                   help="L1 marginal error of the returned plan (default: %(default)g)")
    s.add_argument("--max-iter", type=_int_at_least(1), default=None,
                   help="iteration budget (default: the method's own, 10000 for sinkhorn)")
    s.add_argument("--weighted", action="store_true", help="last column of point files holds weights")
    s.add_argument("--invert", action="store_true", help="images: dark pixels carry the mass")
    s.add_argument("--memory-budget", type=_positive_float, default=None, metavar="BYTES",
                   help="bytes the dense cost may use; above it the cost is computed online in tiles "
                        "(default: entrokit.geometry.memory_budget(), 2 GiB or $ENTROKIT_MEMORY_BUDGET)")
    s.add_argument("--out", help="write potentials, value, errors (and the plan when dense) to this .npz "
                                 "(the suffix is added when missing)")
    s.add_argument("--plot", help="write a figure of the measures, the matching and the convergence curve "
                                  "(format from the suffix: .png, .pdf, .svg, ...)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_solve)

    b = sub.add_parser("bench", help="run the benchmark suites against the anchors (POT, RegOT, GeomLoss)")
    b.add_argument("--quick", action="store_true", help="small sizes and short time budgets")
    b.add_argument("--suite", action="append", help="run only this suite (repeatable)")
    b.add_argument("--results", default=None, help="folder for the markdown tables (e.g. benchmarks/results)")
    b.add_argument("--threads", type=_int_at_least(1), default=None, help="threads for every library (default: as configured)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad argument (one line, status 2)
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return int(args.func(args) or 0)
    except (CLIError, InputError) as exc:
        print(f"entrokit: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # a missing optional package: one line naming the extra
        if "pip install" not in str(exc):
            raise
        print(f"entrokit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("entrokit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
