"""Training throughput of train_ddp.py's step variants, and inference FPS: one markdown table.

    python bench.py --out bench.md                     # synthetic 1024x2048 frames, made once
    python bench.py --data-dir /data/cityscapes --num-workers 8
    python bench.py --configs all --profile all         # and where the 'all' step's GPU time goes
    python bench.py --io                                # predict.py on a folder, and evaluation: frames/s

Each row trains a fresh model in this process with train_ddp.py's own pieces (resolve_config
from the row's train_ddp flags, build_training, data.make_loader, data.next_batch,
train_step), so what is measured is the training loop itself. One process, one GPU; see
BENCHMARKS.md for the rows and the columns.
"""
import argparse
import contextlib
import datetime
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data
import predict
import prepare_data
import train_ddp
from bisenetv2 import BiSeNetV2
from data import BadInput
from kernels import bench as kernels_bench

BASELINE = dict(packed=False, aug_device="cpu", amp="none", channels_last=False, kernels="torch",
                fused_sgd=False, cudnn_benchmark=False, compile=False)
# (row name, what it changes against the baseline, the changed settings, runs on a CPU)
CONFIGS = [
    ("baseline", "eager fp32, NCHW, --kernels torch, PNG decode + per-sample aug in workers", {}, True),
    ("gpu-aug", "workers decode the PNGs only, batch augmented on the GPU", dict(aug_device="cuda"), False),
    ("packed+gpu-aug", "memory-mapped pack, workers gather uint8, batch augmented on the GPU",
     dict(packed=True, aug_device="cuda"), False),
    ("bf16", "bf16 autocast", dict(amp="bf16"), True),
    ("channels_last", "model and input channels_last", dict(channels_last=True), True),
    ("fused-kernels", "--kernels cuda (fused loss and BGA)", dict(kernels="cuda"), False),
    # the kernels where the reader does not bound the step (against packed+gpu-aug)
    ("packed+fused-kernels", "packed+gpu-aug and --kernels cuda", dict(packed=True, aug_device="cuda", kernels="cuda"),
     False),
    ("fused-sgd", "SGD(fused=True)", dict(fused_sgd=True), False),
    ("cudnn-benchmark", "cudnn.benchmark", dict(cudnn_benchmark=True), False),
    ("compile", "torch.compile of model and loss", dict(compile=True), False),
    ("all", "all of the above together (--kernels auto: the references if the build fails)",
     dict(packed=True, aug_device="cuda", amp="bf16", channels_last=True, kernels="auto", fused_sgd=True,
          cudnn_benchmark=True, compile=True), False),
]
ASSUMED_MULTI_GPU_OVERHEAD = 1.15  # 8-GPU step time / 1-GPU step time: an estimate (BENCHMARKS.md), not measured
PROFILE_STEPS = 5  # the steps --profile records after a row's measured ones
# each row's profile detaches CUPTI as it stops (kineto reads this then): left attached, torch's default (pytorch
# issue 144455), it slowed every later launch by some 10-20%, so every row timed after a profiled one
os.environ.setdefault("TEARDOWN_CUPTI", "1")


def parse_args(argv=None):
    parser = data.OneLineErrors(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-dir", help="a prepared Cityscapes root; None: a synthetic set of --image-size frames in the cache")
    add("--image-size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"),
        help="frame size of the synthetic dataset made when no --data-dir is given")
    add("--batch-size", type=int, default=4, help="crops per step")
    add("--crop-size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"))
    add("--num-workers", type=int, default=4, help="DataLoader workers")
    add("--iters", type=int, default=200, help="measured iterations per configuration")
    add("--warmup", type=int, default=20, help="iterations before measuring (compilation, cudnn autotuning)")
    add("--configs", nargs="+", default=None, metavar="NAME", choices=[name for name, *_ in CONFIGS],
        help=f"only these rows, of {', '.join(name for name, *_ in CONFIGS)}; None: all")
    add("--infer-size", type=int, nargs=2, action="append", default=None, metavar=("H", "W"),
        help="inference input size, repeatable; None: 1024 2048 and 512 1024 (the paper's FPS setting)")
    add("--infer-iters", type=int, default=50)
    add("--profile", nargs="+", default=[], metavar="NAME", choices=[name for name, *_ in CONFIGS],
        help=f"after these rows' measured iterations, {PROFILE_STEPS} more under torch.profiler: every CUDA "
             "kernel's time a step (on the CPU every op's), largest first, below the table")
    add("--io", action="store_true",
        help="instead: predict.py over a folder of the data's train frames and --eval-only over its val frames "
             "(random weights), frames/s with the threads that read ahead and write behind")
    add("--io-frames", type=int, default=32,
        help="--io: runs of N and 4N frames (the data's frames listed again as needed); frames/s from the "
             "difference, which leaves out loading and the first frames' warm-up")
    add("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    kernels_bench.check_out(parser, args.out)
    for name in ("iters", "infer_iters", "io_frames"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size < 2:  # train_ddp.py refuses one crop a step likewise
        parser.error("--batch-size must be at least 2 (the context block's BatchNorm of the pooled vector)")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.configs and (left_out := [name for name in args.profile if name not in args.configs]):
        parser.error(f"--profile {' '.join(left_out)}: not among --configs (only measured rows are profiled)")
    return args


def train_flags(settings):
    """A row's settings -> train_ddp.py flags."""
    on_off = lambda name: f"--{'' if settings[name] else 'no-'}{name.replace('_', '-')}"
    return [*([] if settings["packed"] else ["--no-pack"]), "--aug-device", settings["aug_device"],
            "--amp", settings["amp"], "--kernels", settings["kernels"], on_off("channels_last"),
            on_off("fused_sgd"), on_off("cudnn_benchmark"), *(["--compile"] if settings["compile"] else [])]


def run_config(args, env, data_dir, pairs, settings, profile=False):
    """train_row, then the compiled graphs and cached GPU memory it leaves are let go for the next
    row (its model, optimizer and loader went with its frame)."""
    try:
        return train_row(args, env, data_dir, pairs, settings, profile)
    finally:
        if settings["compile"]:
            torch._dynamo.reset()
        if env.device.type == "cuda":
            torch.cuda.empty_cache()


def train_row(args, env, data_dir, pairs, settings, profile):
    """Trains a fresh model for --warmup + --iters iterations with the row's settings. -> dict:
    images/s (measured iterations, wall clock, synchronised at both ends), median step ms (CUDA
    events between step starts on a GPU, the host clock on the CPU), reader share (time the
    host waited for the loader / wall time), peak memory MiB (CUDA); with profile, "profile": the
    kernels of PROFILE_STEPS more steps (kernels.bench.kernel_times) or the profiler's error."""
    measured = args.warmup + args.iters
    # kernel_times runs one step before its window; the loader serves every step's batch
    flags = ["--data-dir", data_dir, "--batch-size", str(args.batch_size), "--crop-size", *map(str, args.crop_size),
             "--num-workers", str(args.num_workers), "--iters", str(measured + (PROFILE_STEPS + 1 if profile else 0)),
             *train_flags(settings)]
    config, ops = train_ddp.resolve_config(train_ddp.parse_args(flags), env)
    info = data.read_dataset_info(data_dir)
    pack = data.find_pack(data_dir, "train", info) if config.pack else None
    model, step_model, criterion, optimizer, scaler = train_ddp.build_training(config, env, ops)
    batches = iter(data.make_loader(pairs, pack, info, config, 0, 1, 0))
    amp_dtype = train_ddp.AMP_DTYPES[config.amp]
    cuda = env.device.type == "cuda"
    clock = lambda: torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
    model.train()

    def step(it):
        images, labels, waited = data.next_batch(batches, env.device, config)
        train_ddp.train_step(step_model, criterion, optimizer, scaler, images, labels,
                             train_ddp.lr_at(it, config), train_ddp.step_seed(config.seed, it, env.rank), amp_dtype)
        return waited

    starts, reader_wait = [], 0.0
    for it in range(measured):
        if it == args.warmup:
            if cuda:
                torch.cuda.synchronize(env.device)
                torch.cuda.reset_peak_memory_stats(env.device)
            start, reader_wait = time.perf_counter(), 0.0
        if it >= args.warmup:
            starts.append(clock())
            if cuda:
                starts[-1].record()
        reader_wait += step(it)
    starts.append(clock())
    if cuda:
        starts[-1].record()
        torch.cuda.synchronize(env.device)
    steps_ms = [a.elapsed_time(b) if cuda else 1000 * (b - a) for a, b in zip(starts, starts[1:])]
    wall = time.perf_counter() - start
    result = dict(kernels=config.kernels, images_per_s=args.iters * args.batch_size / wall,
                  step_ms=float(np.median(steps_ms)), reader_share=reader_wait / wall,
                  peak_mib=torch.cuda.max_memory_allocated(env.device) / 2**20 if cuda else None)
    if profile:  # as kernels.bench.kernel_lines reads it
        later = iter(range(measured, config.iters))
        try:
            result["profile"] = dict(kernels=kernels_bench.kernel_times(lambda: step(next(later)), env.device,
                                                                        PROFILE_STEPS))
        except Exception as e:  # a profiler that cannot run (no CUPTI) costs the breakdown, not the row
            result["profile"] = dict(profile_error=f"{type(e).__name__}: {' '.join(str(e).split())[:120]}")
    return result


def benchmark(args, env):
    """Runs each CONFIGS row (or --configs) and the inference variants -> the table."""
    cuda = env.device.type == "cuda"
    data_dir = args.data_dir or str(prepare_data.synthetic_in_cache(args.image_size, 16, log=env.log))
    pairs, info = data.read_list(data_dir, "train"), data.read_dataset_info(data_dir)
    try:
        pack = data.find_pack(data_dir, "train", info)
        pack_note = "no pack: run prepare_data.py --pack"
    except BadInput as e:
        pack, pack_note = None, str(e)
    device_name = torch.cuda.get_device_name(env.device) if cuda else f"CPU ({os.cpu_count()} cores)"
    lines = [f"## `bench.py`: {device_name}", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
             f"{args.batch_size} crops of {args.crop_size[0]}x{args.crop_size[1]} per step, data {data_dir} "
             f"({'packed' if pack else 'no fresh pack'}), {args.num_workers} DataLoader workers, "
             f"{args.iters} measured iterations after {args.warmup} warm-up", "",
             "| config | change against the baseline | images/s | step ms (median) | reader share | peak MiB | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    results = {}
    for name, what, change, runs_on_cpu in CONFIGS:
        if args.configs and name not in args.configs:
            continue
        settings = dict(BASELINE, **change)
        note = "" if cuda or runs_on_cpu else "not run on CPU (compiling takes minutes)" if name == "compile" \
            else "needs CUDA"
        if not note and settings["packed"] and pack is None:
            note = pack_note
        if not note:
            env.log(f"bench: {name} ...")
            try:
                results[name] = result = run_config(args, env, data_dir, pairs, settings, name in args.profile)
                if settings["kernels"] != "torch":
                    note = {"cuda": "kernels: fused CUDA loss and BGA",
                            "torch": "kernels: PyTorch references (no build)"}.get(
                        result["kernels"], f"kernels: {result['kernels']}")
            except (BadInput, RuntimeError) as e:
                note = f"failed: {' '.join(data.one_line(e).split())[:160]}"
        if name not in results:
            lines.append(f"| {name} | {what} | - | - | - | - | {note} |")
            continue
        peak = "-" if result["peak_mib"] is None else f"{result['peak_mib']:.0f}"
        lines.append(f"| {name} | {what} | {result['images_per_s']:.1f} | {result['step_ms']:.1f} | "
                     f"{100 * result['reader_share']:.0f}% | {peak} | {note} |")
        # each row as it is measured: a run cut short by a time limit (.ci/gpu) keeps it in its log, and in --out
        env.log(f"bench: {name}: {result['images_per_s']:.1f} img/s, {result['step_ms']:.1f} ms a step, "
                f"reader {100 * result['reader_share']:.0f}%, peak {peak} MiB")
        if args.out:
            with contextlib.suppress(OSError):  # (the table's last write says so)
                data.atomic_write(args.out, "\n".join(lines + ["", "(the rows so far: the run goes on)"]) + "\n")
    # inference: predict.py's paths (fp32 eager, bf16 channels_last, compiled, CUDA graphs; onnxruntime on the CPU)
    sizes = [tuple(size) for size in args.infer_size] if args.infer_size else [(1024, 2048), (512, 1024)]
    lines += ["", predict.inference_table(BiSeNetV2(19), env.device, sizes=sizes, iters=args.infer_iters,
                                          log=env.log).rstrip("\n")]
    lines.append("")
    if "all" in results:
        step_ms = results["all"]["step_ms"]
        hours = 160000 * step_ms / 1000 * ASSUMED_MULTI_GPU_OVERHEAD / 3600
        lines.append(f"Projected 160k iterations on 8 GPUs (4 crops each): {hours:.1f} h = 160000 x {step_ms:.1f} ms "
                     f"(the 'all' median step) x {ASSUMED_MULTI_GPU_OVERHEAD} (assumed: DDP all-reduce and "
                     f"SyncBatchNorm are not measured on one GPU).")
    else:
        lines.append("Projected 160k iterations on 8 GPUs: n/a (the 'all' row was not measured).")
    # where the profiled rows' time goes: against the median step, the kernels' sum shows the gaps
    lines += kernels_bench.kernel_lines(
        [dict(case=f"{name}, median step {results[name]['step_ms']:.1f} ms",
              profiled=f"torch.profiler over {PROFILE_STEPS} steps", **results[name]["profile"])
         for name in args.profile if name in results], most=20)
    return "\n".join(lines) + "\n"


IO_ROWS = (  # label, predict.py flags, needs CUDA
    ("predict.py", [], False),
    ("predict.py --overlay", ["--overlay"], False),
    ("predict.py --cuda-graph", ["--cuda-graph"], True),
)


def io_table(args, env):
    """Markdown: predict.py over a folder of the data's train frames (IO_ROWS) and
    train_ddp.py --eval-only over its val frames, random weights, in this process: each at
    --io-frames N and 4N frames (symbolic links to the frames, again as needed), frames/s =
    3N over the difference of the two wall times, which leaves out the start (loading the
    weights, the first frames' warm-up)."""
    cuda = env.device.type == "cuda"
    data_dir = Path(args.data_dir or prepare_data.synthetic_in_cache(args.image_size, 16, log=env.log))
    train, val = data.read_list(data_dir, "train"), data.read_list(data_dir, "val")
    info = data.read_dataset_info(data_dir)
    counts = (args.io_frames, 4 * args.io_frames)
    width, height = data.check_headers(train[:1])[0]  # the header only, not a full decode
    lines = [f"## `bench.py --io`: {torch.cuda.get_device_name(env.device) if cuda else f'CPU ({os.cpu_count()} cores)'}",
             "", f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
             f"data {data_dir} (frames of {height}x{width}), random weights, {counts[0]} and {counts[1]} frames a run",
             "", f"| what | {counts[0]} frames s | {counts[1]} frames s | frames/s between | note |",
             "| --- | ---: | ---: | ---: | --- |"]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        weights = folder / "random.pt"
        torch.manual_seed(0)
        torch.save(dict(model=BiSeNetV2(len(info.class_names)).state_dict()), weights)

        def row(label, run):  # run(frames, folder) -> exit code
            times = []
            for count in counts:
                env.log(f"bench --io: {label}, {count} frames ...")
                quiet = io.StringIO()
                start = time.perf_counter()
                with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                    code = run(count, folder / f"{len(lines)}-{count}")
                times.append(time.perf_counter() - start)
                if code != 0:
                    last = quiet.getvalue().strip().splitlines()[-1:] or ["no output"]
                    lines.append(f"| {label} | - | - | - | failed: exit code {code}: {last[0][:160]} |")
                    return
            gap = times[1] - times[0]
            rate, note = (f"{(counts[1] - counts[0]) / gap:.1f}", "") if gap > 0 else \
                ("-", "the longer run was not slower: too few frames to tell")
            lines.append(f"| {label} | {times[0]:.2f} | {times[1]:.2f} | {rate} | {note} |")

        def predict_run(flags):
            def run(count, work):
                frames = work / "frames"
                frames.mkdir(parents=True)
                for i in range(count):  # symbolic links: the frames' files, no copies
                    (frames / f"{i:05d}{train[i % len(train)][0].suffix}").symlink_to(train[i % len(train)][0])
                return predict.main(["--weights", str(weights), "--input", str(frames), "--out", str(work / "out"),
                                     "--device", str(env.device), *flags])
            return run

        def eval_run(count, work):
            work.mkdir(parents=True)
            if (data_dir / "dataset.json").is_file():  # the data's classes, where not Cityscapes'
                (work / "dataset.json").write_bytes((data_dir / "dataset.json").read_bytes())
            (work / "val.txt").write_text("".join(f"{val[i % len(val)][0]} {val[i % len(val)][1]}\n"
                                                  for i in range(count)))
            return train_ddp.main(["--eval-only", "--weights", str(weights), "--data-dir", str(work),
                                   "--save-dir", str(work / "eval")])

        for label, flags, needs_cuda in IO_ROWS:
            if needs_cuda and not cuda:
                lines.append(f"| {label} | - | - | - | needs CUDA |")
            else:
                row(label, predict_run(flags))
        row("train_ddp.py --eval-only (float32)", eval_run)
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    env = train_ddp.setup_process()
    try:
        if env.world_size > 1:
            raise BadInput("bench.py runs in one process (one GPU)")
        table = io_table(args, env) if args.io else benchmark(args, env)
        print(table, flush=True)
        if args.out:
            try:
                data.atomic_write(args.out, table)
            except OSError as e:  # a full disk (the table is printed above)
                raise BadInput(f"--out {args.out}: cannot write it ({e.strerror or e})") from None
    except BadInput as e:
        print(f"bench.py: error: {data.one_line(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        train_ddp.cleanup_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
