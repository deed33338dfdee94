"""The benchmark's machinery on the CPU (its numbers need a GPU: python -m kernels.bench)."""
import pytest

from kernels import bench


def test_quick_bench_prints_a_row_per_case(tmp_path, capsys):
    out = tmp_path / "table.md"
    rows = bench.main(["--device", "cpu", "--quick", "--no-compile", "--dtypes", "bf16", "--out", str(out)])
    # 4 head resolutions x (CE, OHEM) loss rows, NCHW and channels_last BGA rows, batch 2
    assert [row["case"].split()[0] for row in rows] == ["loss"] * 8 + ["BGA"] * 2
    assert all(row["eager_ms"] > 0 and "fused_ms" not in row for row in rows)
    table = out.read_text().splitlines()
    assert table[0].startswith("device: CPU") and len([line for line in table if line.startswith("| loss")]) == 8
    assert "OHEM main 1/8 2x19x8x8 -> 64^2 bf16" in capsys.readouterr().out


def test_a_run_stopped_partway_leaves_its_rows_in_the_table_file(tmp_path, monkeypatch):
    """.ci/gpu kills a bench past its time limit: the rows measured by then are in --out."""
    def wrong(args, device):
        raise bench.WrongResult("kernels.bench: BGA: fused disagrees with eager")
        yield
    monkeypatch.setattr(bench, "bga_rows", wrong)
    out = tmp_path / "table.md"
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--quick", "--no-compile", "--dtypes", "fp32", "--heads", "32", "--out", str(out)])
    table = out.read_text()
    assert table.startswith("device: CPU") and len([line for line in table.splitlines() if line.startswith("| loss")]) == 2


def test_profile_lists_each_rows_kernels_by_time(tmp_path):
    """--profile: per row, what the profiled variant ran (ops on the CPU, CUDA kernels on a
    GPU), largest first, in the table file."""
    out = tmp_path / "table.md"
    rows = bench.main(["--device", "cpu", "--quick", "--no-compile", "--dtypes", "fp32", "--heads", "32",
                       "--profile", "--out", str(out)])
    for row in rows:
        assert row["profiled"] == "eager" and row["kernels"]
        times = [us for _, _, us in row["kernels"]]
        assert times == sorted(times, reverse=True) and times[-1] > 0
    bga = dict((name, launches) for name, launches, _ in rows[-1]["kernels"])
    assert bga["aten::upsample_bilinear2d"] == 2 and bga["aten::sigmoid"] == 2  # the BGA's two of each
    text = out.read_text()
    assert text.count("us a step in") == len(rows) and "| `aten::upsample_bilinear2d` | 2 |" in text


def test_a_profiler_that_fails_costs_the_breakdown_not_the_table(tmp_path, monkeypatch):
    def no_profiler(*args):
        raise RuntimeError("CUPTI unavailable")
    monkeypatch.setattr(bench, "kernel_times", no_profiler)
    out = tmp_path / "table.md"
    rows = bench.main(["--device", "cpu", "--quick", "--no-compile", "--dtypes", "fp32", "--heads", "32",
                       "--profile", "--out", str(out)])
    assert all(row["eager_ms"] > 0 for row in rows)
    assert out.read_text().count("no profile (RuntimeError: CUPTI unavailable)") == len(rows)


def test_an_out_that_cannot_be_written_is_said_before_measuring(tmp_path, capsys, monkeypatch):
    """A folder, or a file in the way of its folder, stops before any measurement (both
    benchmarks' flags); a write that fails later (a full disk) is one line."""
    import bench as training_bench
    (tmp_path / "file").write_text("in the way")
    for parse_args in (bench.parse_args, training_bench.parse_args):
        for out, named in ((tmp_path, "a folder, not the file to write"),
                           (tmp_path / "file" / "table.md", "cannot make its folder")):
            with pytest.raises(SystemExit) as stop:
                parse_args(["--out", str(out)])
            assert stop.value.code == 2 and f"--out {out}: {named}" in capsys.readouterr().err.splitlines()[-1]
    monkeypatch.setattr(bench, "open", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device")),
                        raising=False)
    with pytest.raises(SystemExit) as stop:
        bench.write_text(tmp_path / "table.md", "| table |")
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"kernels.bench: error: --out {tmp_path / 'table.md'}: cannot write it " \
                                      "(No space left on device)\n"


@pytest.mark.parametrize("flags", [["--quick"], ["--tiles"]])
def test_cuda_bench_without_cuda_is_one_line(capsys, flags):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as stop:
        bench.main(flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith("torch sees no CUDA device (--device cpu times the eager column alone, or --tiles the C++ loops)")


def test_sass_table_sizes_every_kernel_of_the_ops(extension, tmp_path, capsys):
    """--sass: a row for every __global__ kernel of each op's .cu (one per instantiation), with
    its instructions and registers, for an architecture the libraries were built for; one
    they were not built for is one line, exit 1, and a malformed --arch a usage error."""
    import re

    import kernels
    from kernels import build
    try:
        bench.find_cuobjdump()
    except SystemExit:
        pytest.skip("no cuobjdump here (PATH, the CUDA toolkit, triton's wheel)")
    arch = "sm_" + build.arch_list().split(";")[0].replace(".", "")
    out = tmp_path / "sass.md"
    text = bench.main(["--sass", "--arch", arch, "--out", str(out)])
    assert out.read_text() == text + "\n"
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| loss") or line.startswith("| bga")]
    for op, extension_of_op in kernels.EXTENSIONS.items():
        for source in extension_of_op.source_paths():
            if source.suffix != ".cu":
                continue
            for kernel in re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(", source.read_text()):
                assert any(row[0] == f"| {op}" and row[1].startswith(f"`{kernel}<") for row in rows), (op, kernel)
    for row in rows:
        instructions, registers = int(row[2]), int(row[3])
        assert instructions > 0 and 0 < registers <= 255, row
    assert any(row[1] == "`bga_forward_kernel<bf16, float, 8, int>`" for row in rows)
    built = {"sm_" + entry.replace(".", "") for entry in build.arch_list().split(";")}
    absent = next(candidate for candidate in ("sm_75", "sm_86", "sm_100") if candidate not in built)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        bench.main(["--sass", "--arch", absent])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"holds no {absent} code" in err[0]
    with pytest.raises(SystemExit) as stop:
        bench.main(["--sass", "--arch", "90"])
    assert stop.value.code == 2 and "--arch 90: an architecture such as sm_90" in capsys.readouterr().err


def test_host_table_times_each_ops_kernel_path_on_the_cpu(extension, tmp_path, monkeypatch):
    """--host: each op down its kernel path (the C++ loops running) and its reference, a row
    an op; the ops' CPU tensors take the references again afterwards."""
    import kernels
    import torch
    seen = []
    real = torch.ops.bisenet_cuda.bga_forward

    class Recording:  # torch.ops.bisenet_cuda.bga_forward, noting each call
        def __call__(self, *args):
            seen.append(args[0].device.type)
            return real(*args)

    monkeypatch.setattr(torch.ops.bisenet_cuda, "bga_forward", Recording())
    out = tmp_path / "host.md"
    bench.main(["--host", "--iters", "1", "--warmup", "1", "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| loss")
            or line.startswith("| BGA")]
    assert [row[0].strip() for row in rows] == ["loss CE", "loss OHEM", "BGA"]
    assert all(float(cell) > 0 for row in rows for cell in row[1:])
    assert seen and set(seen) == {"cpu"}  # the BGA's kernel path ran its C++ op
    assert not any(extension.cpu_loops for extension in kernels.EXTENSIONS.values())


def test_host_parts_table_times_each_piece_and_profiles_the_steps(cpu_loops):
    """--host on a GPU machine adds, at the benchmark's shapes, each op's C++ call alone, each
    kernel path's step, the references', one aten op and torch's fixed cost of a tiny forward
    + backward (an aten op's, a Function's), then where a fused step's host time
    goes (torch.profiler's CPU events). Here on the CPU, tiny shapes, the C++ loops running."""
    import torch
    args = bench.parse_args(["--host", "--batch", "1", "--size", "64"])
    text = bench.host_parts_table(args, torch.device("cpu"))
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()
            if line.count("|") == 3 and not line.startswith(("| piece", "| ---"))}
    assert list(rows) == [
        "one aten op (add_, 1 element)", "torch's fixed cost: (x * 2).sum().backward(), 1 element",
        "torch's fixed cost: an autograd.Function's (x * 2).sum().backward(), 1 element",
        "bisenet_cuda::bga_forward", "bisenet_cuda::bga_backward",
        "BGA kernel path, forward + backward", "BGA reference, forward + backward",
        "bisenet_cuda::upsample_ce_forward", "bisenet_cuda::upsample_ce_backward",
        "bisenet_cuda::upsample_ce_forward_grad", "bisenet_cuda::ohem_weights",
        "loss CE kernel path, forward + backward", "loss OHEM kernel path, forward + backward",
        "loss CE reference, forward + backward"], rows
    assert all(float(us) > 0 for us in rows.values())
    # each profile lists the step's own C++ ops among its events
    profiles = text.split("the host's CPU events by self time")
    assert len(profiles) == 3
    assert "`bisenet_cuda::bga_forward` | 1 |" in profiles[1] and "`bisenet_cuda::bga_backward` | 1 |" in profiles[1]
    assert "`bisenet_cuda::upsample_ce_forward_grad` | 1 |" in profiles[2]  # the CE step: one op


def tile_rows(path, header):
    """The rows of the table whose header line starts with `header`, as lists of cells."""
    tables = [table.splitlines() for table in path.read_text().split("\n\n")]
    (lines,) = [lines for lines in tables if lines and lines[0].startswith(header)]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[2:]]


def test_tiles_table_times_the_automatic_tile_and_those_around_it(extension, tmp_path):
    """--tiles: per head the forward op alone, then the backward with the automatic tile (first,
    1.00x) and the tiles around it that fit, each checked against the automatic one; then the
    forward with gradient likewise, and against the two ops, with the CE mean's backward after
    it (its time and share of the copy bandwidth) on the automatic tile's row."""
    out = tmp_path / "tiles.md"
    bench.main(["--tiles", "--device", "cpu", "--batch", "1", "--size", "64", "--dtypes", "bf16", "--iters", "1",
                "--warmup", "0", "--out", str(out)])
    rows = tile_rows(out, "| head | forward us |")
    automatic = [row for row in rows if row[2].endswith("(automatic)")]
    assert [row[0] for row in automatic] == ["main 1/8", "aux 1/4", "aux 1/16", "aux 1/32"]
    assert all(row[6] == "1.00x" for row in automatic) and len(rows) > len(automatic)
    assert all(float(row[1]) > 0 and float(row[5]) > 0 for row in rows)
    rows = tile_rows(out, "| head | tile (low-res rows x columns) | shared KiB | parts | forward with gradient us |")
    automatic = [row for row in rows if row[1].endswith("(automatic)")]
    assert [row[0] for row in automatic] == ["main 1/8", "aux 1/4", "aux 1/16", "aux 1/32"]
    assert all(row[5] == "1.00x" for row in automatic) and len(rows) > len(automatic)
    assert all(float(row[4]) > 0 and float(row[6].rstrip("x")) > 0 for row in rows)
    assert all(float(row[7]) > 0 and row[8].endswith("%") for row in automatic)
    assert all(row[7] == row[8] == "" for row in rows if row not in automatic)


def test_tiles_table_times_the_bga_backward_tiles_too(extension, tmp_path):
    """--tiles, second table: the BGA backward alone, NCHW and channels_last, the automatic
    tile first (1.00x), in channels_last then the automatic tile with one walk lane, then the
    tiles around it that fit, each checked against it."""
    out = tmp_path / "tiles.md"
    bench.main(["--tiles", "--device", "cpu", "--batch", "1", "--size", "128", "--dtypes", "bf16", "--iters", "1",
                "--warmup", "0", "--heads", "32", "--out", str(out)])
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.read_text().splitlines()
            if line.startswith(("| NCHW", "| NHWC"))]
    automatic = [row for row in rows if row[1].endswith("(automatic)")]
    assert [row[0] for row in automatic] == ["NCHW", "NHWC"] and all(row[6] == "1.00x" for row in automatic)
    assert [row[3] for row in automatic] == ["—", "2"]  # bf16, 128 channels: a channel pair a walk item
    one_lane = [row for row in rows if row[1].endswith("(the automatic tile)")]
    assert [(row[0], row[3]) for row in one_lane] == [("NHWC", "1")]
    assert one_lane[0][1].split(" (")[0] == automatic[1][1].split(" (")[0]
    assert {row[0] for row in rows if row not in automatic + one_lane} == {"NCHW", "NHWC"}
    assert all(float(row[5]) > 0 for row in rows)


@pytest.mark.parametrize("op, size, head, message", [
    ("upsample_ce_backward", "64", "8", "the main 1/8 backward with tile"),
    ("upsample_ce_forward_grad", "64", "8", "the main 1/8 forward with gradient with tile"),
    ("bga_backward", "128", "32", "the BGA NCHW backward with tile")])
def test_tiles_table_stops_at_a_tile_that_disagrees(extension, monkeypatch, capsys, op, size, head, message):
    import torch
    real = getattr(torch.ops.bisenet_cuda, op)

    inputs = 3 if op == "upsample_ce_forward_grad" else 5

    def wrong_off_the_automatic_tile(*args):  # the op's inputs, then the tile (none: automatic)
        result = real(*args)
        if len(args) == inputs or args[inputs] == 0:
            return result
        return 2 * result if isinstance(result, torch.Tensor) else tuple(2 * grad for grad in result)

    monkeypatch.setattr(torch.ops.bisenet_cuda, op, wrong_off_the_automatic_tile)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--tiles", "--device", "cpu", "--batch", "1", "--size", size, "--dtypes", "fp32", "--iters", "1",
                    "--warmup", "0", "--heads", head])
    assert stop.value.code == 1
    assert f"kernels.bench: {message}" in capsys.readouterr().err
