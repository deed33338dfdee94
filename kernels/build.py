"""JIT build of each op's CUDA extension (its own .cpp and .cu in csrc/, with the headers
there) with torch.utils.cpp_extension.load (ninja), lazily, into a cache folder keyed by
those files, the compiler flags, the torch version and the target architectures; a library
already in its folder is loaded as it is (the key says it is the one these would build), so
a cache folder built on another machine for the same torch and GPU serves as it is. An op
module declares its `Extension`; copying an op means copying its Python file, this one and
its csrc/ files.

Several ranks may start at once: one builds under a file lock, the others wait for it; a
lock left by a killed build (its process gone on this host, or older than
BISENET_KERNELS_LOCK_TIMEOUT seconds, default 1800) is removed with a message, never waited
on forever.
"""
import hashlib
import os
import socket
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"


def cache_root():
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bisenet_kernels"
    return Path(os.environ.get("BISENET_KERNELS_CACHE", default))


def arch_list():
    """TORCH_CUDA_ARCH_LIST where set (torch's own variable: e.g. 9.0 to build for an H100 on
    a machine without one), else the visible GPU's architecture, else sm_80 and sm_90."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "8.0;9.0"


# Where a CUDA toolkit usually is; used when torch's guess is not one (see check_cuda_home).
DEFAULT_TOOLKIT = "/usr/local/cuda"


def is_toolkit(home):
    """Whether `home` holds nvcc, include/cuda_runtime.h and libcudart."""
    return home is not None and (Path(home) / "bin" / "nvcc").is_file() and \
        (Path(home) / "include" / "cuda_runtime.h").is_file() and \
        any((Path(home) / lib).glob("libcudart.so*") for lib in ("lib64", "lib"))


def check_cuda_home():
    """-> the CUDA toolkit folder. torch guesses CUDA_HOME from the nvcc on PATH, which may be
    a wrapper outside the toolkit (then the guess is e.g. /usr/local); when the guess is not a
    toolkit and DEFAULT_TOOLKIT is, that is used, and the switch is logged. Otherwise a
    RuntimeError that says how to point at one."""
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    if is_toolkit(home):
        return home
    if is_toolkit(DEFAULT_TOOLKIT):
        print(f"kernels: CUDA_HOME={home} is not a CUDA toolkit (nvcc on PATH may be a wrapper); "
              f"using {DEFAULT_TOOLKIT}", file=sys.stderr, flush=True)
        cpp_extension.CUDA_HOME = DEFAULT_TOOLKIT
        os.environ["CUDA_HOME"] = DEFAULT_TOOLKIT
        return DEFAULT_TOOLKIT
    raise RuntimeError(f"kernels: CUDA_HOME={home} is not a CUDA toolkit (nvcc, include/cuda_runtime.h, "
                       "lib64/libcudart.so), nor is " + DEFAULT_TOOLKIT + "; torch guesses it from the nvcc on "
                       "PATH, which may be a wrapper: set CUDA_HOME, e.g. export CUDA_HOME=/opt/cuda")


def _lock_is_stale(lock, timeout):
    try:
        host, pid, started = lock.read_text().split()
        pid, started = int(pid), float(started)
    except (OSError, ValueError):
        return time.time() - lock.stat().st_mtime > 60  # unreadable for a minute: a torn write
    if time.time() - started > timeout:
        return True
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


@contextmanager
def build_lock(lock, timeout=None, poll=0.5):
    """Exclusive lock file holding 'hostname pid start-time'; waiters poll; a stale lock is
    removed loudly."""
    timeout = float(os.environ.get("BISENET_KERNELS_LOCK_TIMEOUT", 1800)) if timeout is None else timeout
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    announced = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                stale = _lock_is_stale(lock, timeout)
            except FileNotFoundError:
                continue
            if stale:
                print(f"kernels: removing stale build lock {lock} ({lock.read_text().strip() if lock.exists() else ''})",
                      file=sys.stderr, flush=True)
                lock.unlink(missing_ok=True)
                continue
            if not announced:
                print(f"kernels: waiting for the build in progress ({lock})", file=sys.stderr, flush=True)
                announced = True
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()} {time.time()}\n")
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


# no implicit multiply-add contraction on either side: the kernels' arithmetic is written with
# explicit fma (same_bits.h); nvcc compiles the architectures side by side (--threads=0: one
# thread per CPU; where two are built without a GPU, the .cu is the long pole)
CFLAGS = ["-O3", "-ffp-contract=off"]
CUDA_CFLAGS = ["-O3", "-lineinfo", "--fmad=false", "--threads=0"]


def library_path(name, sources):
    """The library `sources` build into: cache_root()/NAME_KEY/NAME_KEY.so, KEY a digest of
    the sources, csrc/'s headers, the flags, the torch and CUDA versions and arch_list()."""
    digest = hashlib.sha256()
    for path in sorted(sources) + sorted(CSRC.glob("*.h")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(f"{torch.__version__} {torch.version.cuda} {arch_list()} {CFLAGS} {CUDA_CFLAGS}".encode())
    full_name = f"{name}_{digest.hexdigest()[:16]}"
    return cache_root() / full_name / f"{full_name}.so"


@contextmanager
def arch_environment(arch):
    """TORCH_CUDA_ARCH_LIST=arch (torch's build reads it) while the block runs, then as it was.
    Builds side by side (load_all's threads) each set the same value inside an outer one, so
    none takes it away from another that is still building."""
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        yield
    finally:
        if old_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch


def build_and_load(name, sources, verbose=False):
    """Loads the library made of `sources` (paths), building it first unless its cache folder
    has it; its ops appear under torch.ops. Raises RuntimeError with the cause when it cannot."""
    from torch.utils import cpp_extension
    check_cuda_home()
    library = library_path(name, sources)
    build_dir = library.parent
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        with arch_environment(arch_list()), build_lock(build_dir / "bisenet_build.lock"):
            if library.is_file():  # under the lock: not one a build is still writing
                try:
                    torch.ops.load_library(str(library))
                    if verbose:
                        print(f"kernels: {library} was in the cache: loaded, not built", flush=True)
                    return
                except (OSError, RuntimeError) as e:  # e.g. cut short, or built against another libstdc++
                    print(f"kernels: the cached {library} does not load ({' '.join(str(e).split())[:200]}); "
                          "building it again", file=sys.stderr, flush=True)
            # torch's own baton ('lock') is never waited on here: under our lock it is stale
            (build_dir / "lock").unlink(missing_ok=True)
            cpp_extension.load(name=library.stem, sources=[str(p) for p in sources], extra_cflags=CFLAGS,
                               extra_cuda_cflags=CUDA_CFLAGS, build_directory=str(build_dir),
                               is_python_module=False, verbose=verbose)
    except Exception as e:
        raise RuntimeError(f"kernels: building the CUDA extension {name} in {build_dir} failed: "
                           f"{type(e).__name__}: {str(e)[-2000:]}") from e


class Extension:
    """One op's compiled library: `sources` (file names in csrc/) registering `ops` under
    torch.ops.bisenet_cuda, built on first need. `register_fakes`, called once when the
    library is first loaded (the ops exist from then on), gives the ops their fake
    implementations, which torch.compile traces.

    use_cuda_kernel says which implementation an op gives CUDA tensors:
      None  - the CUDA kernel if the library is already loaded (load()), else the reference;
      True  - the CUDA kernel, building and loading the library if needed (raises if that fails);
      False - the reference.
    CPU tensors get the reference, unless cpu_loops is set (the tests, `kernels.bench
    --host`): then they go down the kernel path too, where the ops' CPU implementation, the
    C++ loops, runs (the kernels' arithmetic, serially)."""

    def __init__(self, name, sources, ops, register_fakes=None):
        self.name, self.sources, self.ops = name, tuple(sources), tuple(ops)
        self.register_fakes = register_fakes
        self.use_cuda_kernel = None
        self.cpu_loops = False
        self.is_loaded = False  # set by load(): runs_kernel's per-call test is then one attribute

    def source_paths(self):
        return [CSRC / source for source in self.sources]

    def loaded(self):
        if self.is_loaded:
            return True
        try:
            for op in self.ops:
                getattr(torch.ops.bisenet_cuda, op)
        except (AttributeError, RuntimeError):
            return False
        return True

    def load(self, verbose=False):
        if self.is_loaded:
            return torch.ops.bisenet_cuda
        if not self.loaded():
            build_and_load(self.name, self.source_paths(), verbose=verbose)
            if not self.loaded():
                raise RuntimeError(f"kernels: {self.name} built but registers no {', '.join(self.ops)}")
        if self.register_fakes is not None:
            self.register_fakes()
        self.is_loaded = True
        return torch.ops.bisenet_cuda

    def runs_kernel(self, tensor):
        """Whether an op of this library sends `tensor` down its kernel path (see above)."""
        if tensor.device.type == "cuda":
            if self.use_cuda_kernel is False or (self.use_cuda_kernel is None and not self.loaded()):
                return False
        elif not self.cpu_loops:
            return False
        self.load()  # an attribute test once loaded
        return True


def load_all(extensions, verbose=False):
    """Extension.load() for each of `extensions`, those not yet loaded built (or loaded from
    the cache) side by side where the cores allow: a build keeps two busy (its .cpp and its
    .cu compiled at once), so as many at once as half the cores (a thread each; ninja and
    nvcc are processes). On a 2-core machine without a GPU that is one after the other, where
    nvcc's threads fill the cores (the three libraries of the tests: 93 s; 103-106 s all at
    once, 124 s before --threads). Raises the first failure, in the order given, once every
    build has ended."""
    extensions = list(extensions)
    to_build = [extension for extension in extensions if not extension.loaded()]
    workers = min(len(to_build), (os.cpu_count() or 1) // 2)
    if workers > 1:
        check_cuda_home()  # in this thread: it may switch CUDA_HOME for all of them

        def build(extension):
            try:
                build_and_load(extension.name, extension.source_paths(), verbose=verbose)
            except RuntimeError as error:
                return error

        with arch_environment(arch_list()), ThreadPoolExecutor(workers) as pool:
            errors = list(pool.map(build, to_build))
        for error in errors:
            if error is not None:
                raise error
    for extension in extensions:
        extension.load(verbose=verbose)


def plan_fits(cache, key, consequence, ask_plan, *args):
    """cache[key]: whether ask_plan(*args) (an op's C++ plan for some sizes) returns rather than
    raising that no tile fits a block's shared memory; asked once a key. A refusal warns once,
    its first line and `consequence` (what the op does instead)."""
    if key not in cache:
        try:
            ask_plan(*args)
            cache[key] = True
        except RuntimeError as e:
            warnings.warn(f"{str(e).splitlines()[0]}: {consequence}", stacklevel=4)
            cache[key] = False
    return cache[key]
