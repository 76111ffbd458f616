"""The command line: happy paths and one-line errors on bad files."""

import subprocess
import sys

import numpy as np
import pytest

from entrokit.cli import main


def _points(tmp_path, name, arr, fmt="npy"):
    p = tmp_path / f"{name}.{fmt}"
    if fmt == "npy":
        np.save(p, arr)
    else:
        np.savetxt(p, arr, delimiter=",", header="x,y", comments="")
    return str(p)


def test_solve_points_writes_npz_and_plot(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = _points(tmp_path, "src", rng.normal(size=(30, 2)))
    tgt = _points(tmp_path, "tgt", rng.normal(size=(25, 2)) + 1.0, fmt="csv")
    out, fig = tmp_path / "r.npz", tmp_path / "f.png"
    code = main(["solve", src, tgt, "--eps", "0.1", "--out", str(out), "--plot", str(fig), "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "converged=True" in text
    data = np.load(out)
    P = data["plan"]
    assert P.shape == (30, 25)
    np.testing.assert_allclose(P.sum(1), np.full(30, 1 / 30), atol=1e-6)
    assert fig.stat().st_size > 1000


def test_solve_goes_online_above_the_memory_budget(tmp_path, capsys):
    rng = np.random.default_rng(2)
    src = _points(tmp_path, "s", rng.normal(size=(40, 2)))
    tgt = _points(tmp_path, "t", rng.normal(size=(30, 2)))
    out = tmp_path / "o.npz"
    assert main(["solve", src, tgt, "--eps", "0.5", "--quiet"]) == 0
    dense = capsys.readouterr().out
    assert "cost=dense" in dense
    # 40 x 30 float64 entries, 4 copies: 38400 bytes; a smaller budget goes online
    assert main(["solve", src, tgt, "--eps", "0.5", "--quiet", "--memory-budget", "38399", "--out", str(out)]) == 0
    online = capsys.readouterr().out
    assert "cost=online" in online and "converged=True" in online
    assert "plan" not in np.load(out).files
    value = lambda text: float(text.split("transport_cost=")[1].split()[0])  # noqa: E731
    assert abs(value(online) - value(dense)) < 1e-6


def test_solve_weighted_and_images(tmp_path, capsys):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    pts = np.c_[rng.normal(size=(10, 2)), rng.random(10)]
    src = _points(tmp_path, "w", pts)
    assert main(["solve", src, src, "--weighted", "--eps", "0.5", "--quiet"]) == 0
    img1, img2 = tmp_path / "a.png", tmp_path / "b.png"
    im = np.zeros((8, 8))
    im[2:5, 2:5] = 1.0
    plt.imsave(img1, im, cmap="gray")
    plt.imsave(img2, np.roll(im, 2, axis=1), cmap="gray")
    assert main(["solve", str(img1), str(img2), "--eps", "0.01", "--quiet"]) == 0
    assert "transport_cost=" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,msg",
    [
        (None, "no such file"),
        (b"not numbers at all\n1,2,oops\n", "could not parse"),
        (b"\x00\x01garbage", "not a readable .npy"),
    ],
)
def test_bad_files_one_line_error(tmp_path, capsys, content, msg):
    suffix = ".npy" if content and content.startswith(b"\x00") else ".csv"
    p = tmp_path / f"bad{suffix}"
    if content is not None:
        p.write_bytes(content)
    good = _points(tmp_path, "good", np.zeros((3, 2)))
    assert main(["solve", str(p), good, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("entrokit: error:") and msg in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_values_and_types(tmp_path, capsys):
    good = _points(tmp_path, "good", np.zeros((3, 2)))
    nan = _points(tmp_path, "nan", np.array([[0.0, np.nan], [1.0, 1.0]]))
    assert main(["solve", nan, good, "--quiet"]) == 2
    assert "NaN" in capsys.readouterr().err
    dim = _points(tmp_path, "dim", np.zeros((3, 3)))
    assert main(["solve", dim, good, "--quiet"]) == 2
    assert "dimension" in capsys.readouterr().err
    txt = tmp_path / "x.json"
    txt.write_text("{}")
    assert main(["solve", str(txt), good, "--quiet"]) == 2
    assert "unsupported file type" in capsys.readouterr().err
    neg = _points(tmp_path, "neg", np.array([[0.0, -1.0], [1.0, 1.0]]))
    assert main(["solve", neg, good, "--weighted", "--quiet"]) == 2
    assert "nonnegative" in capsys.readouterr().err


def test_console_script_bad_file_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "entrokit", "solve", str(tmp_path / "missing.npy"), str(tmp_path / "x.npy")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("entrokit: error:") and "Traceback" not in proc.stderr


def test_demo_runs_and_writes_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--eps", "0.1", "0.05", "--size", "12", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sinkhorn" in text and "0.05" in text
    assert out.stat().st_size > 5000


def test_bench_unknown_suite(capsys):
    assert main(["bench", "--suite", "nope"]) == 2
    assert "unknown benchmark suite" in capsys.readouterr().err


def _one_line_error(capsys, *needles):
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "error:" in err, err
    for s in needles:
        assert s in err, err
    assert "method=" not in cap.out  # refused before any solve
    return err


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--plot", "fig.xyz"], ["unsupported figure format .xyz", ".png"]),
        (["--plot", "no/such/folder/f.png"], ["does not exist"]),
        (["--out", "no/such/folder/r"], ["does not exist"]),
        (["--eps", "1e300"], ["--eps 1e+300 is above 1e+06 x the largest cost", "use --eps <="]),
        (["--eps", "inf"], ["expected a finite number > 0"]),
        (["--memory-budget", "nan"], ["--memory-budget: expected a finite number > 0, got 'nan'"]),
        (["--memory-budget", "-5"], ["--memory-budget"]),
        (["--method", "newton"], ["invalid choice: 'newton'", "'ssns'"]),
        (["--max-iter", "0"], ["expected an integer >= 1"]),
    ],
)
def test_solve_bad_arguments_one_line_exit_2(tmp_path, capsys, argv, needles):
    rng = np.random.default_rng(0)
    src = _points(tmp_path, "s", rng.normal(size=(60, 2)))
    tgt = _points(tmp_path, "t", rng.normal(size=(50, 2)) + 1.0, fmt="csv")
    argv = [a if "/" not in a else str(tmp_path / a) for a in argv]
    assert main(["solve", src, tgt, "--quiet", *argv]) == 2
    _one_line_error(capsys, *needles)
    assert not list(tmp_path.glob("*.xyz")) and not list(tmp_path.glob("*.npz"))


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--size", "0"], ["--size: expected an integer >= 2, got '0'"]),
        (["--size", "1"], ["--size: expected an integer >= 2, got '1'"]),
        (["--size", "1000"], ["--size 1000", "memory budget"]),
        (["--digits", "0", "5000"], ["--digits: digit index must be in [0, 1797), got 5000"]),
        (["--digits", "-1", "3"], ["--digits: expected an integer >= 0"]),
        (["--eps", "0.1", "1e9"], ["--eps 1e+09 is above"]),
        (["--out", "demo.xyz"], ["unsupported figure format .xyz"]),
    ],
)
def test_demo_bad_arguments_one_line_exit_2(tmp_path, capsys, argv, needles):
    argv = [str(tmp_path / a) if a.endswith(".xyz") else a for a in argv]
    assert main(["demo", "--quiet", *argv]) == 2
    _one_line_error(capsys, *needles)


def test_bench_without_the_bench_extra_names_it(monkeypatch, capsys):
    """A missing anchor package (None in sys.modules makes its import fail, as when it is
    not installed) is reported on one line naming the extra, before any suite runs."""
    monkeypatch.setitem(sys.modules, "ot", None)
    assert main(["bench", "--quick", "--suite", "sinkhorn"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ModuleNotFoundError" not in err
    assert "pip install 'entrokit[bench]'" in err and "'pot'" in err


def _gray(path, img):
    from PIL import Image

    Image.fromarray(img).save(path)
    return str(path)


def test_sixteen_bit_image_is_scaled_by_its_own_range(tmp_path, capsys):
    """--invert on a 16-bit image: white is 65535 (it was divided by 255, giving negative
    darkness); the result equals the same picture saved as 8-bit."""
    im8 = np.full((8, 8), 255, np.uint8)
    im8[2:5, 2:5] = 0
    im8[5, 5] = 128
    im16 = (im8.astype(np.uint32) * 257).astype(np.uint16)  # 255 -> 65535, 128 -> 32896
    a8, b8 = _gray(tmp_path / "a8.png", im8), _gray(tmp_path / "b8.png", np.roll(im8, 2, axis=1))
    a16, b16 = _gray(tmp_path / "a16.tif", im16), _gray(tmp_path / "b16.tif", np.roll(im16, 2, axis=1))
    cost = lambda text: float(text.split("transport_cost=")[1].split()[0])  # noqa: E731
    assert main(["solve", a8, b8, "--invert", "--eps", "0.05", "--quiet"]) == 0
    ref = cost(capsys.readouterr().out)
    assert main(["solve", a16, b16, "--invert", "--eps", "0.05", "--quiet"]) == 0
    assert cost(capsys.readouterr().out) == pytest.approx(ref, rel=1e-9)


def test_all_white_image_with_invert_is_refused(tmp_path, capsys):
    """White RGB -> gray is 0.9999999999999999: inverted, that noise was solved as mass."""
    white = _gray(tmp_path / "w.png", np.full((6, 6, 3), 255, np.uint8))
    assert main(["solve", white, white, "--invert", "--quiet"]) == 2
    _one_line_error(capsys, "w.png: image is white everywhere", "no mass")


def test_out_without_suffix_prints_the_path_written(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = _points(tmp_path, "s", rng.normal(size=(20, 2)))
    name = tmp_path / "result"
    assert main(["solve", src, src, "--eps", "0.5", "--quiet", "--out", str(name)]) == 0
    wrote = capsys.readouterr().out.strip().splitlines()[-1]
    assert wrote == f"wrote {name}.npz"
    assert np.load(f"{name}.npz")["f"].shape == (20,)


def test_progress_bar_names_the_method_that_ran(tmp_path, capsys, monkeypatch):
    """auto picks ssns on this problem (eps well below the cost range); the bar said
    'sinkhorn'. With no delay the bar is drawn at once."""
    import entrokit.cli as cli

    monkeypatch.setattr(cli, "PROGRESS_DELAY", 0.0)
    rng = np.random.default_rng(0)
    src = _points(tmp_path, "s", rng.normal(size=(60, 2)))
    tgt = _points(tmp_path, "t", rng.normal(size=(50, 2)) + 1.0)
    assert main(["solve", src, tgt, "--eps", "0.01"]) == 0
    cap = capsys.readouterr()
    assert "method=ssns" in cap.out
    assert "ssns" in cap.err and "sinkhorn" not in cap.err


def test_solve_help_gives_defaults_and_choices(capsys):
    assert main(["solve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for s in ["--eps EPS entropic regularization", "(default: 0.01)", "one of: auto, sinkhorn, sns, ssns",
              "(default: auto)", "--tol TOL L1 marginal error of the returned plan (default: 1e-06)",
              "--max-iter MAX_ITER iteration budget", "one of: sqeuclidean, euclidean (default: sqeuclidean)"]:
        assert s in text, s


def test_solve_forced_online_small_cloud_picks_newton(tmp_path, capsys):
    # issue 19: `entrokit solve src.npy tgt.csv --memory-budget 1000` (60 x 50 points, forced
    # online) ran Sinkhorn for 10,000 iterations and ended with converged=False
    rng = np.random.default_rng(0)
    src = tmp_path / "src.npy"
    np.save(src, rng.standard_normal((60, 2)))
    tgt = tmp_path / "tgt.csv"
    np.savetxt(tgt, rng.standard_normal((50, 2)) + 1, delimiter=",")
    assert main(["solve", str(src), str(tgt), "--memory-budget", "1000", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "cost=online" in out and "method=ssns" in out and "converged=True" in out
    assert int(out.split("iterations=")[1].split()[0]) < 100


def test_a_failed_write_names_the_file(tmp_path, capsys):
    from entrokit.cli import CLIError, _write

    target = tmp_path / "gone" / "out.npz"  # its folder vanished after the up-front check
    with pytest.raises(CLIError, match=r"gone/out\.npz: cannot write \(No such file or directory\)"):
        _write(target, lambda path: np.savez(path, x=np.zeros(2)))
    assert "wrote" not in capsys.readouterr().out
    _write(tmp_path / "out.npz", lambda path: np.savez(path, x=np.zeros(2)))
    assert capsys.readouterr().out == f"wrote {tmp_path / 'out.npz'}\n"
    assert np.load(tmp_path / "out.npz")["x"].shape == (2,)
